"""cloudflared's config.yml for a locally managed tunnel, an offline check of one, and what to do
with it when one box is not enough (replicas, sites behind Load Balancing, a Ray cluster)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from tunnelvision.config import CLOUDFLARED_KEEPALIVE_S
from tunnelvision.exposure import is_loopback

DEFAULT_METRICS = "127.0.0.1:20241"
DEFAULT_PORT = 8000
# How the config is used: one box, replicas of one tunnel, one tunnel per site behind Cloudflare
# Load Balancing, or one tunnel in front of a Ray cluster. docs/SCALING.md draws each.
TOPOLOGIES = ("box", "replicas", "sites", "ray")
MAX_REPLICAS = 25  # Cloudflare's default limit of active cloudflared replicas per tunnel
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,63}$")
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")


class TunnelConfigError(ValueError):
    pass


def build_config(
    hostname: str,
    tunnel: str,
    credentials_file: str,
    port: int,
    metrics: str = DEFAULT_METRICS,
    origin: str | None = None,
) -> dict[str, Any]:
    """`hostname` -> the API on this box's `port`, or -> `origin` (another box, a Ray proxy)."""
    hostname, tunnel = hostname.lower(), tunnel.lower()
    if not _HOSTNAME.match(hostname):
        raise TunnelConfigError(f"'{hostname}' is not a hostname like api.example.com")
    if not _UUID.match(tunnel):
        raise TunnelConfigError(f"'{tunnel}' is not a tunnel UUID (`cloudflared tunnel list` shows it)")
    service = origin_service(origin, port)
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
            {"hostname": hostname, "service": service},
            {"service": "http_status:404"},  # the catch-all must come last
        ],
    }


def origin_service(origin: str | None, port: int) -> str:
    """The ingress rule's service: http://127.0.0.1:PORT, or `origin` checked and normalised."""
    if origin is None:
        if not 1 <= port <= 65535:
            raise TunnelConfigError(f"port {port} is out of range")
        return f"http://127.0.0.1:{port}"
    problem = f"'{origin}' is not an origin like http://10.0.0.5:8000"
    parts = urlsplit(origin.strip())
    try:
        origin_port = parts.port
    except ValueError:
        raise TunnelConfigError(f"{problem}: its port is out of range") from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise TunnelConfigError(f"{problem}: it needs http:// or https:// and a host")
    if origin_port is None:
        # cloudflared would guess 80 or 443, which is never where the API listens.
        raise TunnelConfigError(f"{problem}: give the port")
    if parts.username or parts.password or parts.path not in ("", "/") or parts.query or parts.fragment:
        raise TunnelConfigError(f"{problem}: only scheme, host and port (no path, query or user)")
    return f"{parts.scheme.lower()}://{parts.netloc.lower()}"


def origin_is_local(service: str) -> bool:
    return is_loopback(urlsplit(service).hostname or "")


def origin_notes(service: str) -> list[str]:
    """What the API behind a non-loopback origin needs, which a loopback one gets by default."""
    if origin_is_local(service):
        return []
    host = urlsplit(service).hostname
    return [
        f"the API at {service} must listen where this box reaches it (TUNNELVISION_HOST there, "
        "e.g. its private address); it then refuses to start without keys or Access",
        "add this box's address to TUNNELVISION_TRUSTED_PROXIES there, or every visitor looks "
        "like this box to per-client limits (CF-Connecting-IP is believed only from trusted peers)",
        f"keep the hop from this box to {host} on a private network: cloudflared's traffic to the "
        "origin is plain HTTP unless the origin is https://",
    ]


def config_notes(config: dict[str, Any], topology: str) -> list[str]:
    """Everything worth saying about a config built by `build_config`, for `topology`."""
    service = str(config["ingress"][0]["service"])
    hostname = str(config["ingress"][0]["hostname"])
    return origin_notes(service) + topology_notes(topology, hostname, str(config["tunnel"]), service)


def topology_notes(topology: str, hostname: str, tunnel: str, service: str) -> list[str]:
    """What to do with the written config for `topology`, and what Cloudflare does and does not do
    for it. Words for a person, printed after the config; docs/SCALING.md says the same at length."""
    tunnel = tunnel.lower()
    if topology == "replicas":
        return [
            f"replicas of tunnel {tunnel} (availability, not load balancing):",
            "- copy this file and the credentials file to each host at the same paths, then on each: "
            "sudo cloudflared service install (one cloudflared service per host)",
            f"- each replica keeps 4 connections to Cloudflare; a tunnel takes up to {MAX_REPLICAS} "
            "active replicas",
            "- Cloudflare sends a request to the replica nearest to where it entered its network and "
            "tries another only when that connection fails: no round robin, no weights, no "
            "least-busy choice, so one replica may get nearly all the traffic",
            f"- Cloudflare watches cloudflared, not the API: a replica whose {service} is down stays "
            "connected and its visitors get 502. For health-checked failover and real spreading, "
            "use one tunnel per site behind Load Balancing (--topology sites)",
            "- restart replicas one at a time: on SIGTERM cloudflared takes no new requests and lets "
            "running ones finish (grace-period, 30 s by default) while the others take the traffic",
        ]
    if topology == "sites":
        return [
            f"{hostname} on one tunnel per site behind Cloudflare Load Balancing (a paid add-on):",
            f"- each site: its own tunnel (cloudflared tunnel create) and this command with its "
            f"UUID; the same --hostname {hostname} everywhere",
            f"- do not `cloudflared tunnel route dns` {hostname}: the load balancer owns that name",
            f"- pool endpoint for this site: {tunnel}.cfargotunnel.com with the Host header "
            f"{hostname} (or: cloudflared tunnel route lb {tunnel} {hostname} <pool>)",
            f"- monitor: HTTPS, path /readyz, expected code 200, header Host: {hostname} (without "
            "it no ingress rule matches and the monitor sees 404). /readyz needs no key and "
            "answers 503 while models load, while shutting down and once the device worker is gone",
            "- steering: a pool per site; 'least outstanding requests' sends work to the least busy "
            "site, 'geo' or 'proximity' to the nearest; unhealthy pools get no traffic",
        ]
    if topology == "ray":
        return [
            f"one tunnel to a Ray cluster's ingress ({service}):",
            "- run cloudflared on the node where `tunnelvision serve --ray` runs the HTTP app; "
            "Ray Serve spreads the device work over the cluster's GPUs, Cloudflare sees one origin",
            "- capacity is the number of Ray replicas (--ray-max-replicas), not of tunnels or "
            "cloudflared replicas: this node is the one way in, and jobs live in its data folder",
            f"- `tunnelvision doctor --port {urlsplit(service).port}` there checks the API and the tunnel",
        ]
    return []


def render_config(config: dict[str, Any]) -> str:
    header = "# Written by `tunnelvision tunnel config`. Check it: cloudflared tunnel ingress validate\n"
    return header + yaml.safe_dump(config, sort_keys=False)


def ingress_problems(config: Any, port: int, remote_ok: bool = False) -> list[str]:
    """What is wrong with a config.yml for serving tunnelvision on `port` (empty: sound).
    `remote_ok`: a rule to an API on another machine (`--origin URL`) routes to the API too."""
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
    routed = remote_ok and any(is_remote_origin(service) for service in services)
    if not routed and not any(_points_at_port(service, port) for service in services):
        problems.append(
            f"no ingress rule sends traffic to http://127.0.0.1:{port} (services: "
            f"{', '.join(services) or 'none'})"
        )
    return problems


def is_remote_origin(service: str) -> bool:
    """An http(s)://HOST:PORT service on another machine (what `--origin URL` writes)."""
    parts = urlsplit(service)
    try:
        port = parts.port
    except ValueError:
        return False
    has_origin = parts.scheme in ("http", "https") and bool(parts.hostname) and port is not None
    return has_origin and not origin_is_local(service)


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
