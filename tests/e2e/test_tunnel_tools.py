"""`tunnelvision doctor` and `tunnel` commands against local stand-ins for cloudflared and the edge."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from support import FakeBackend, ThreadServer, free_port, make_settings

UUID = "6ff42ae2-765d-4adf-8112-31c55c1551ef"


class Canned:
    """An HTTP server on 127.0.0.1 that answers every GET with a fixed status and body."""

    def __init__(self, status: int, body: str) -> None:
        canned = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                data = canned.body.encode()
                self.send_response(canned.status)
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.status, self.body = status, body
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.address = f"127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture
def canned() -> Iterator[list[Canned]]:
    servers: list[Canned] = []
    yield servers
    for server in servers:
        server.httpd.shutdown()


def serve_canned(servers: list[Canned], status: int, body: str) -> Canned:
    server = Canned(status, body)
    servers.append(server)
    return server


def tunnelvision(
    *args: str,
    path_dir: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "TUNNELVISION_KEYS_FILE": "/nonexistent/keys.json", **(env or {})}
    if path_dir is not None:
        environment["PATH"] = f"{path_dir}{os.pathsep}{environment['PATH']}"
    return subprocess.run(
        [sys.executable, "-m", "tunnelvision.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=environment,
    )


def write_config(out: Path, port: int, path_dir: Path | None = None) -> subprocess.CompletedProcess[str]:
    return tunnelvision(
        "tunnel",
        "config",
        "--hostname",
        "api.example.com",
        "--tunnel",
        UUID,
        "--credentials-file",
        "c.json",
        "--port",
        str(port),
        "--out",
        str(out),
        path_dir=path_dir,
    )


def doctor_json(*args: str, **kwargs: Any) -> tuple[int, dict[str, dict[str, Any]]]:
    result = tunnelvision("doctor", "--json", *args, **kwargs)
    report = json.loads(result.stdout)
    return result.returncode, {check["name"]: check for check in report["checks"]}


def test_doctor_diagnoses_origin_down(canned: list[Canned]) -> None:
    ready = serve_canned(canned, 200, '{"status": 200, "readyConnections": 4, "connectorId": "x"}')
    edge = serve_canned(canned, 502, "Bad gateway")
    code, checks = doctor_json(
        "--port", str(free_port()), "--metrics", ready.address, "--public-url", f"http://{edge.address}"
    )
    assert code == 1
    assert checks["api"]["ok"] is False and "nothing answers" in checks["api"]["detail"]
    assert checks["tunnel connection"]["ok"] is True
    assert checks["public URL"]["ok"] is False and "502" in checks["public URL"]["detail"]
    assert "tunnelvision running" in checks["public URL"]["remedy"]


def test_doctor_diagnoses_a_tunnel_without_edge_connections(canned: list[Canned]) -> None:
    ready = serve_canned(canned, 503, '{"status": 503, "readyConnections": 0, "connectorId": "x"}')
    edge = serve_canned(canned, 530, "error code: 1033")
    with ThreadServer(make_settings(), FakeBackend()) as api:
        code, checks = doctor_json(
            "--port", str(api.port), "--metrics", ready.address, "--public-url", f"http://{edge.address}"
        )
    assert code == 1
    assert checks["api"]["ok"] is True
    assert checks["tunnel connection"]["ok"] is False and "1033" in checks["tunnel connection"]["detail"]
    assert "--protocol http2" in checks["tunnel connection"]["remedy"]
    assert "cannot reach the tunnel" in checks["public URL"]["detail"]


def test_doctor_passes_when_everything_answers(canned: list[Canned], tmp_path: Path) -> None:
    ready = serve_canned(canned, 200, '{"status": 200, "readyConnections": 2, "connectorId": "x"}')
    keys = tmp_path / "keys.json"
    keys.write_text('{"keys": []}')
    with ThreadServer(make_settings(), FakeBackend()) as api:
        config = tmp_path / "config.yml"
        assert write_config(config, api.port).returncode == 0
        edge = serve_canned(canned, 200, '{"status": "ok"}')
        result = tunnelvision(
            "doctor",
            "--port",
            str(api.port),
            "--metrics",
            ready.address,
            "--config",
            str(config),
            "--public-url",
            f"http://{edge.address}",
            env={"TUNNELVISION_KEYS_FILE": str(keys)},
        )
    assert result.returncode == 0, result.stdout
    assert "✓ config.yml" in result.stdout and "✓ public URL" in result.stdout and "✗" not in result.stdout


def test_doctor_names_a_config_without_catch_all(tmp_path: Path) -> None:
    config = tmp_path / "config.yml"
    config.write_text(
        yaml.safe_dump(
            {"tunnel": UUID, "ingress": [{"hostname": "api.example.com", "service": "http://127.0.0.1:8000"}]}
        )
    )
    code, checks = doctor_json("--port", "8000", "--config", str(config), "--metrics", "127.0.0.1:1")
    assert code == 1 and "catch-all" in checks["config.yml"]["detail"]


def fake_cloudflared(folder: Path, script: str) -> Path:
    folder.mkdir(exist_ok=True)
    binary = folder / "cloudflared"
    binary.write_text(f"#!/bin/sh\n{script}\n")
    binary.chmod(0o755)
    return folder


def test_quick_tunnel_prints_the_url_and_its_limits(tmp_path: Path) -> None:
    bin_dir = fake_cloudflared(
        tmp_path / "bin",
        'echo "$@" > "$(dirname "$0")/args"\necho "INF |  https://quiet-river-1234.trycloudflare.com  |"',
    )
    result = tunnelvision("tunnel", "quick", "--port", "8321", path_dir=bin_dir, env={"HOME": str(tmp_path)})
    assert result.returncode == 0
    assert "Public URL: https://quiet-river-1234.trycloudflare.com" in result.stdout
    assert "200 in-flight" in result.stdout and "no SLA" in result.stdout
    assert (bin_dir / "args").read_text().split() == [
        "tunnel",
        "--no-autoupdate",
        "--url",
        "http://127.0.0.1:8321",
    ]


def test_quick_tunnel_without_cloudflared_explains_how_to_install(tmp_path: Path) -> None:
    result = tunnelvision("tunnel", "quick", env={"PATH": os.path.dirname(sys.executable)})
    assert result.returncode == 1 and "not installed" in result.stdout and "apt" in result.stdout


def test_tunnel_config_is_validated_by_cloudflared_when_installed(tmp_path: Path) -> None:
    bin_dir = fake_cloudflared(
        tmp_path / "bin", 'echo "$@" > "$(dirname "$0")/args"; echo "Validating rules"'
    )
    out = tmp_path / "config.yml"
    result = write_config(out, 8000, path_dir=bin_dir)
    assert result.returncode == 0 and "Validating rules" in result.stderr
    assert (bin_dir / "args").read_text().split() == ["tunnel", "--config", str(out), "ingress", "validate"]
    bad = tunnelvision("tunnel", "config", "--hostname", "nope", "--tunnel", UUID, "--credentials-file", "c")
    assert bad.returncode == 2 and "not a hostname" in bad.stderr


def test_tunnel_systemd_writes_unit_and_env_file(tmp_path: Path) -> None:
    result = tunnelvision(
        "tunnel", "systemd", "--out-dir", str(tmp_path), "--exec", "/usr/local/bin/tunnelvision"
    )
    assert result.returncode == 0
    assert "ExecStart=/usr/local/bin/tunnelvision serve" in (tmp_path / "tunnelvision.service").read_text()
    assert "TUNNELVISION_PORT=8000" in (tmp_path / "tunnelvision.env").read_text()
    assert "cloudflared service install <TOKEN>" in result.stdout
