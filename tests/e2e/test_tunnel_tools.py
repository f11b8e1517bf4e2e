"""`tunnelvision doctor` and `tunnel` commands against local stand-ins for cloudflared and the edge."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from support import (
    FakeBackend,
    ThreadServer,
    free_port,
    image_bytes,
    make_settings,
    run_tunnelvision,
    wait_for,
)
from tunnelvision.security.keys import KeyStore
from tunnelvision.tunnel.up import pid_alive

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
    path = {"PATH": f"{path_dir}{os.pathsep}{os.environ['PATH']}"} if path_dir is not None else {}
    return run_tunnelvision(*args, env={**path, **(env or {})})


def keys_file_with_a_key(folder: Path) -> tuple[Path, str]:
    path = folder / "keys.json"
    return path, KeyStore(path).add("me")


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
    assert "502 Bad Gateway" in checks["api"]["detail"]  # what visitors see meanwhile
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
    keys, _ = keys_file_with_a_key(tmp_path)
    with ThreadServer(make_settings(keys_file=keys), FakeBackend()) as api:
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
    keys, _ = keys_file_with_a_key(tmp_path)
    result = tunnelvision(
        "tunnel",
        "quick",
        "--port",
        "8321",
        "--keys-file",
        str(keys),
        path_dir=bin_dir,
        env={"HOME": str(tmp_path)},
    )
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
    keys, _ = keys_file_with_a_key(tmp_path)
    environment = {"PATH": os.path.dirname(sys.executable), "TUNNELVISION_KEYS_FILE": str(keys)}
    result = tunnelvision("tunnel", "quick", env=environment)
    assert result.returncode == 1 and "not installed" in result.stdout and "apt" in result.stdout


def test_quick_tunnel_refuses_to_publish_without_authentication(tmp_path: Path) -> None:
    bin_dir = fake_cloudflared(tmp_path / "bin", 'echo "$@" > "$(dirname "$0")/args"')
    refused = tunnelvision("tunnel", "quick", path_dir=bin_dir, env={"HOME": str(tmp_path)})
    assert refused.returncode == 2
    assert "refusing to publish" in refused.stderr and "tunnelvision keys add NAME" in refused.stderr
    assert not (bin_dir / "args").exists()  # cloudflared never started
    allowed = tunnelvision(
        "tunnel", "quick", "--insecure-no-auth", path_dir=bin_dir, env={"HOME": str(tmp_path)}
    )
    assert allowed.returncode == 0 and "INSECURE" in allowed.stderr
    assert (bin_dir / "args").exists()


def test_doctor_json_into_a_closed_pipe_ends_quietly() -> None:
    """`tunnelvision doctor --json | head -1`: the reader is gone before the report is written."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    environment = {**os.environ, "TUNNELVISION_KEYS_FILE": "/nonexistent/keys.json"}
    result = subprocess.run(
        [sys.executable, "-m", "tunnelvision.cli", "doctor", "--json", "--port", str(free_port())],
        stdout=write_end,
        stderr=subprocess.PIPE,
        text=True,
        timeout=60,
        env=environment,
    )
    os.close(write_end)
    assert "Traceback" not in result.stderr and "BrokenPipeError" not in result.stderr, result.stderr
    assert result.returncode == 1


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


# -- `tunnelvision up` -------------------------------------------------------------------------

QUICK_URL = "https://quiet-river-1234.trycloudflare.com"
FAKE_QUICK_TUNNEL = f"""
import json, os, sys, threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
args = sys.argv[1:]
with open(os.path.join(os.path.dirname(sys.argv[0]), "started.json"), "w") as f:
    json.dump({{"pid": os.getpid(), "args": args}}, f)
class Ready(BaseHTTPRequestHandler):  # cloudflared's metrics server: /ready
    def do_GET(self):
        body = b'{{"status": 200, "readyConnections": 4, "connectorId": "x"}}'
        self.send_response(200); self.send_header("content-length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a): pass
host, port = args[args.index("--metrics") + 1].split(":")
server = ThreadingHTTPServer((host, int(port)), Ready)
print("INF Requesting new quick Tunnel on trycloudflare.com...", flush=True)
print("INF |  {QUICK_URL}  |", flush=True)
server.serve_forever()
"""


def fake_quick_tunnel(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    binary = folder / "cloudflared"
    binary.write_text(f"#!{sys.executable}\n{FAKE_QUICK_TUNNEL}")
    binary.chmod(0o755)
    return folder


def start_up(tmp_path: Path, bin_dir: Path, keys: Path, port: int) -> subprocess.Popen[str]:
    command = [sys.executable, "-m", "tunnelvision.cli", "up", "--backend", "simulated", "--port", str(port)]
    command += ["--keys-file", str(keys), "--data-dir", str(tmp_path / "data"), "--no-access-log"]
    environment = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "HOME": str(tmp_path)}
    return subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=environment
    )


def read_until(process: subprocess.Popen[str], marker: str, timeout_s: float = 60) -> list[str]:
    """Lines of stdout, at least up to the one holding `marker` (a thread reads them, so a silent
    child cannot hang the test)."""
    lines: list[str] = []
    assert process.stdout is not None
    stdout = process.stdout

    def read() -> None:
        for line in stdout:
            lines.append(line)

    threading.Thread(target=read, daemon=True).start()
    wait_for(lambda: any(marker in line for line in lines) or process.poll() is not None, timeout_s)
    assert any(marker in line for line in lines), "".join(lines)
    return lines


def test_up_serves_with_a_new_key_publishes_and_ctrl_c_stops_both(tmp_path: Path) -> None:
    bin_dir, keys, port = fake_quick_tunnel(tmp_path / "bin"), tmp_path / "keys.json", free_port()
    up = start_up(tmp_path, bin_dir, keys, port)
    try:
        lines = read_until(up, "curl ")
        text = "".join(lines)
        (key,) = set(re.findall(r"tv_[A-Za-z0-9_-]{20,}", text))  # created, shown, used in the curl line
        assert [entry.name for entry in KeyStore(keys).entries()] == ["first"]
        curl = next(line for line in lines if "curl " in line)
        assert f"Bearer {key}" in curl and f"{QUICK_URL}/v1/detect" in curl
        tunnel = json.loads((bin_dir / "started.json").read_text())
        assert tunnel["args"][tunnel["args"].index("--url") + 1] == f"http://127.0.0.1:{port}"
        api = f"http://127.0.0.1:{port}"
        upload = {"image": ("a.png", image_bytes(), "image/png")}
        assert httpx.post(f"{api}/v1/detect", files=upload, data={"prompt": "cat"}).status_code == 401
        answer = httpx.post(
            f"{api}/v1/detect",
            files=upload,
            data={"prompt": "cat"},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert answer.status_code == 200, answer.text
        state = json.loads((tmp_path / "data" / "up.json").read_text())
        assert state["public_url"] == QUICK_URL and state["tunnel_pid"] == tunnel["pid"]
        edge = Canned(200, '{"status": "ok"}')  # the public URL is never called from a test
        try:
            code, checks = doctor_json(
                "--data-dir", str(tmp_path / "data"), "--public-url", f"http://{edge.address}"
            )
        finally:
            edge.httpd.shutdown()
        assert code == 0, checks
        assert checks["up"]["ok"] and QUICK_URL in checks["up"]["detail"]
        assert checks["api"]["ok"] and checks["tunnel connection"]["ok"] and checks["keys file"]["ok"]
        assert "config.yml" not in checks and "cloudflared service" not in checks
        up.send_signal(signal.SIGINT)
        assert up.wait(60) == 0
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert not pid_alive(tunnel["pid"]) and not pid_alive(state["api_pid"])
    assert processes_mentioning(str(tmp_path / "data")) == []  # the API's command line names it
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{api}/healthz")
    assert not (tmp_path / "data" / "up.json").exists()


def test_up_without_cloudflared_says_how_to_install_and_starts_nothing(tmp_path: Path) -> None:
    environment = {"PATH": os.path.dirname(sys.executable), "HOME": str(tmp_path)}
    keys = tmp_path / "keys.json"
    result = tunnelvision(
        "up", "--keys-file", str(keys), "--data-dir", str(tmp_path / "data"), env=environment
    )
    assert (
        result.returncode == 1 and "cloudflared is not installed" in result.stderr and "apt" in result.stderr
    )
    assert not keys.exists() and not (tmp_path / "data").exists()


def test_up_never_publishes_without_a_key(tmp_path: Path) -> None:
    bin_dir = fake_quick_tunnel(tmp_path / "bin")
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")  # the keys file cannot be created below a file
    result = tunnelvision(
        "up", "--keys-file", str(blocker / "keys.json"), path_dir=bin_dir, env={"HOME": str(tmp_path)}
    )
    assert result.returncode == 2 and "keys file" in result.stderr
    assert not (bin_dir / "started.json").exists()  # no key, no tunnel


def processes_mentioning(text: str) -> list[int]:
    """Pids whose command line holds `text` (a test's own temporary path: nobody else's)."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@pytest.mark.skipif(not Path("/proc/self/cmdline").exists(), reason="reads /proc")
def test_up_stops_the_api_when_cloudflared_gives_up(tmp_path: Path) -> None:
    bin_dir = fake_cloudflared(
        tmp_path / "bin",
        "echo 'ERR failed to request quick Tunnel: Post \"https://api.trycloudflare.com/tunnel\"'\nexit 1",
    )
    data = tmp_path / "data"
    result = tunnelvision(
        "up",
        "--backend",
        "simulated",
        "--port",
        str(free_port()),
        "--keys-file",
        str(tmp_path / "keys.json"),
        "--data-dir",
        str(data),
        path_dir=bin_dir,
        env={"HOME": str(tmp_path)},
    )
    assert result.returncode == 1
    assert "cloudflared exited with 1" in result.stderr and "failed to request quick Tunnel" in result.stderr
    assert "is public at" not in result.stdout  # api.trycloudflare.com is not the tunnel's URL
    assert processes_mentioning(str(data)) == [] and not (data / "up.json").exists()


def test_doctor_judges_auth_by_the_running_server_not_its_own_shell(tmp_path: Path) -> None:
    keys, _ = keys_file_with_a_key(tmp_path)
    with ThreadServer(make_settings(), FakeBackend()) as open_server:
        # This shell has keys; the server does not: the server is what the internet reaches.
        code, checks = doctor_json("--port", str(open_server.port), env={"TUNNELVISION_KEYS_FILE": str(keys)})
    assert code == 1
    assert checks["auth"]["ok"] is False and "without any key" in checks["auth"]["detail"]
    with ThreadServer(make_settings(keys_file=keys), FakeBackend()) as keyed_server:
        # The reverse: the documented systemd setup, doctor run from a shell without its settings.
        code, checks = doctor_json("--port", str(keyed_server.port))
    assert checks["auth"]["ok"] is True and "401" in checks["auth"]["detail"]


def test_doctor_reads_the_services_environment_file(tmp_path: Path) -> None:
    from tunnelvision.config import Settings
    from tunnelvision.tunnel.doctor import read_env_file, service_settings

    env_file = tmp_path / "tunnelvision.env"
    env_file.write_text(
        '# settings\nTUNNELVISION_KEYS_FILE="/etc/tunnel vision/keys.json"\n'
        "TUNNELVISION_PORT=8123\nPORT=1\nHF_HOME=/var/cache/hf\nbroken line\n"
    )
    assert read_env_file(env_file)["TUNNELVISION_KEYS_FILE"] == "/etc/tunnel vision/keys.json"
    settings = service_settings(Settings(port=8000), env_file)
    assert settings.port == 8123 and str(settings.keys_file) == "/etc/tunnel vision/keys.json"
    assert service_settings(Settings(port=8000), tmp_path / "absent.env").port == 8000


def test_doctor_says_a_public_url_needs_its_scheme() -> None:
    code, checks = doctor_json("--port", str(free_port()), "--public-url", "api.example.com")
    assert code == 1
    check = checks["public URL"]
    assert "no scheme" in check["detail"] and "https://api.example.com" in check["remedy"]
