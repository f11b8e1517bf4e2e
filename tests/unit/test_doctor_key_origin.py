"""`doctor --key` (else TUNNELVISION_API_KEY) for the live probes, and a cloudflared config whose
ingress sends the hostname to an API on another machine (`tunnel config --origin URL`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_doctor_ray import KEY, RAY_UP, FakeReadyz

from tunnelvision.tunnel.config import build_config
from tunnelvision.tunnel.doctor import (
    DoctorOptions,
    check_config,
    check_local_server,
    config_problems,
    probe_key,
    run_checks,
)

UUID = "6ff42ae2-765d-4adf-8112-31c55c1551ef"
READY: dict[str, Any] = {"status": "ready", "phase": "ready", "detail": None, "queue": {}, "auth": None}


def written(tmp_path: Path, **options: Any) -> Path:
    """A config.yml as `tunnelvision tunnel config` writes it."""
    config = build_config("api.example.com", UUID, "/etc/cloudflared/c.json", **options)
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_key_flag_wins_over_the_environment() -> None:
    options = DoctorOptions(port=8000, key="tv_flag")
    assert probe_key(options, {"TUNNELVISION_API_KEY": "tv_env"}) == "tv_flag"
    assert probe_key(DoctorOptions(port=8000), {"TUNNELVISION_API_KEY": "tv_env"}) == "tv_env"
    assert probe_key(DoctorOptions(port=8000), {}) is None


def test_the_ray_check_uses_the_key_given_to_doctor(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNNELVISION_API_KEY", raising=False)
    with FakeReadyz({"status": "ready"}, {**READY, "ray": RAY_UP}) as fake:
        options = DoctorOptions(port=fake.port, key=KEY, service_env=None, up=None)
        keyed = {c.name: c for c in run_checks(options)}
        anonymous = {c.name: c for c in run_checks(DoctorOptions(port=fake.port, service_env=None))}
    assert keyed["ray"].ok is True and "2 replica(s) alive" in keyed["ray"].detail
    assert anonymous["ray"].ok is None and "--key" in anonymous["ray"].detail


def test_the_command_line_passes_its_key_to_the_probes(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from tunnelvision.cli import main

    monkeypatch.delenv("TUNNELVISION_API_KEY", raising=False)
    with FakeReadyz({"status": "ready"}, {**READY, "ray": RAY_UP}) as fake:
        main(["doctor", "--port", str(fake.port), "--key", KEY, "--json", "--data-dir", str(tmp_path)])
    checks = {c["name"]: c for c in json.loads(capsys.readouterr().out)["checks"]}
    assert checks["ray"]["ok"] is True, checks["ray"]


def test_not_ready_says_the_full_reason_to_a_key_holder() -> None:
    anonymous = {
        "status": "not_ready",
        "reason": "no_replicas",
        "error": {"message": "not ready: no_replicas"},
    }
    keyed = {**anonymous, "error": {"message": "not ready: no model replica is alive (replicas: 1 starting)"}}
    with FakeReadyz(anonymous, keyed) as fake:
        (with_key,) = check_local_server(fake.port, KEY)
        (without,) = check_local_server(fake.port)
    assert with_key.ok is False and "1 starting" in with_key.detail
    assert without.ok is False and "1 starting" not in without.detail


def test_a_config_to_an_api_on_another_machine_is_sound(tmp_path: Path) -> None:
    path = written(tmp_path, port=8000, origin="http://10.0.0.5:8000")
    check = check_config(path, 8000)
    assert check.ok is True, check
    assert "http://10.0.0.5:8000" in check.detail and "another machine" in check.detail


def test_a_remote_origin_still_needs_its_catch_all(tmp_path: Path) -> None:
    config = build_config("api.example.com", UUID, "/c.json", 8000, origin="https://gpu.internal:9000")
    config["ingress"].pop()  # no catch-all
    problems, remote = config_problems(config, 8000)
    assert remote == ["https://gpu.internal:9000"]
    assert len(problems) == 1 and "catch-all" in problems[0]


def test_a_local_config_to_another_port_is_still_a_problem(tmp_path: Path) -> None:
    check = check_config(written(tmp_path, port=8001), 8000)
    assert check.ok is False and "127.0.0.1:8000" in check.detail
    assert check_config(written(tmp_path, port=8000), 8000).ok is True
    problems, remote = config_problems({"ingress": [{"service": "http_status:404"}]}, 8000)
    assert remote == [] and problems
