"""cloudflared's config.yml for a locally managed tunnel, and an offline check of one."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import yaml

from tunnelvision.config import CLOUDFLARED_KEEPALIVE_S

DEFAULT_METRICS = "127.0.0.1:20241"
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class TunnelConfigError(ValueError):
    pass


def build_config(
    hostname: str, tunnel: str, credentials_file: str, port: int, metrics: str = DEFAULT_METRICS
) -> dict[str, Any]:
    hostname, tunnel = hostname.lower(), tunnel.lower()
    if not _HOSTNAME.match(hostname):
        raise TunnelConfigError(f"'{hostname}' is not a hostname like api.example.com")
    if not _UUID.match(tunnel):
        raise TunnelConfigError(f"'{tunnel}' is not a tunnel UUID (`cloudflared tunnel list` shows it)")
    if not 1 <= port <= 65535:
        raise TunnelConfigError(f"port {port} is out of range")
    return {
        "tunnel": tunnel,
        "credentials-file": credentials_file,
        "metrics": metrics,  # for `tunnelvision doctor`: /ready tells whether the edge is connected
        "originRequest": {
            "connectTimeout": "30s",
            # Below the API's keep-alive (120 s), so cloudflared drops idle connections first.
            "keepAliveTimeout": f"{CLOUDFLARED_KEEPALIVE_S}s",
            "keepAliveConnections": 100,
        },
        "ingress": [
            {"hostname": hostname, "service": f"http://127.0.0.1:{port}"},
            {"service": "http_status:404"},  # the catch-all must come last
        ],
    }


def render_config(config: dict[str, Any]) -> str:
    header = "# Written by `tunnelvision tunnel config`. Check it: cloudflared tunnel ingress validate\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def ingress_problems(config: Any, port: int) -> list[str]:
    """What is wrong with a config.yml for serving tunnelvision on `port` (empty: sound)."""
    if not isinstance(config, dict):
        return ["not a YAML mapping"]
    rules = config.get("ingress")
    if not isinstance(rules, list) or not rules:
        return ["no ingress rules"]
    problems = []
    if not isinstance(rules[-1], dict) or "hostname" in rules[-1] or "path" in rules[-1]:
        problems.append(
            "the last ingress rule must be a catch-all without hostname, e.g. '- service: http_status:404'"
        )
    services = [str(r.get("service", "")) for r in rules if isinstance(r, dict)]
    if not any(_points_at_port(service, port) for service in services):
        problems.append(
            f"no ingress rule sends traffic to http://127.0.0.1:{port} (services: "
            f"{', '.join(services) or 'none'})"
        )
    return problems


def _points_at_port(service: str, port: int) -> bool:
    return bool(re.match(rf"^https?://(127\.0\.0\.1|localhost|\[::1\]):{port}/?$", service))


def validate_with_cloudflared(path: Path) -> tuple[bool, str] | None:
    """cloudflared's own offline check; None when cloudflared is not installed."""
    binary = shutil.which("cloudflared")
    if binary is None:
        return None
    result = subprocess.run(
        [binary, "tunnel", "--config", str(path), "ingress", "validate"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result.returncode == 0, (result.stdout + result.stderr).strip()
