from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from support import make_settings
from tunnelvision.tunnel.config import TunnelConfigError, build_config, ingress_problems, render_config
from tunnelvision.tunnel.doctor import classify_public_answer
from tunnelvision.tunnel.systemd import api_unit, env_file, env_value, next_steps

UUID = "6ff42ae2-765d-4adf-8112-31c55c1551ef"


def test_generated_config_routes_the_hostname_to_the_port_with_a_catch_all_last() -> None:
    text = render_config(build_config("API.example.com", UUID, f"/etc/cloudflared/{UUID}.json", 8123))
    config = yaml.safe_load(text)
    assert config["tunnel"] == UUID and config["credentials-file"].endswith(".json")
    assert config["ingress"] == [
        {"hostname": "api.example.com", "service": "http://127.0.0.1:8123"},
        {"service": "http_status:404"},
    ]
    assert config["originRequest"]["keepAliveTimeout"] == "90s"  # below the API's 120 s keep-alive
    assert config["metrics"] == "127.0.0.1:20241"
    assert ingress_problems(config, 8123) == []


@pytest.mark.parametrize(("hostname", "tunnel"), [("not a host", UUID), ("api.example.com", "1234")])
def test_bad_hostname_or_tunnel_id_is_refused(hostname: str, tunnel: str) -> None:
    with pytest.raises(TunnelConfigError):
        build_config(hostname, tunnel, "c.json", 8000)


def test_ingress_problems_are_named() -> None:
    no_catch_all = {"ingress": [{"hostname": "a.example.com", "service": "http://127.0.0.1:8000"}]}
    assert "catch-all" in ingress_problems(no_catch_all, 8000)[0]
    wrong_port = {
        "ingress": [
            {"hostname": "a.example.com", "service": "http://localhost:9000"},
            {"service": "http_status:404"},
        ]
    }
    assert "127.0.0.1:8000" in ingress_problems(wrong_port, 8000)[0]
    assert ingress_problems({}, 8000) == ["no ingress rules"]


def test_systemd_unit_restarts_waits_for_network_and_reads_an_env_file() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(api_unit(["/opt/tv/bin/tunnelvision"], "tv", make_settings()))
    assert parser["Unit"]["After"] == "network-online.target"
    assert parser["Service"]["Restart"] == "always"
    assert parser["Service"]["ExecStart"] == "/opt/tv/bin/tunnelvision serve"
    assert parser["Service"]["EnvironmentFile"].endswith("tunnelvision.env")
    assert int(parser["Service"]["TimeoutStopSec"]) > 30  # the running request may finish
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    env = env_file(make_settings())
    assert "TUNNELVISION_HOST=127.0.0.1" in env and "TUNNELVISION_AUTH=keys" in env


@pytest.mark.parametrize(
    ("status", "body", "words"),
    [
        (200, '{"status": "ok"}', "answers 200"),
        (502, "Bad gateway", "API did not answer"),
        (530, "error code: 1033", "cannot reach the tunnel"),
        (403, "error code: 1033", "cannot reach the tunnel"),
        (524, "A timeout occurred", "125 s"),
        (401, "Unauthorized", "Cloudflare Access"),
        (404, "Not Found", "not routed"),
    ],
)
def test_public_answers_are_classified(status: int, body: str, words: str) -> None:
    check = classify_public_answer("https://api.example.com/healthz", httpx.Response(status, text=body), 8000)
    assert words in check.detail
    assert check.ok is (status == 200)


def unquote_exec_start(line: str) -> list[str]:
    """ExecStart= words as systemd reads them: %% and $$ are literal, a quoted word keeps its
    spaces, and inside it \\" and \\\\ are escapes."""
    words = re.findall(r'"((?:[^"\\]|\\.)*)"|(\S+)', line)
    values = [bare or re.sub(r"\\(.)", r"\1", quoted) for quoted, bare in words]
    return [v.replace("%%", "%") for v in values[:1]] + [
        v.replace("%%", "%").replace("$$", "$") for v in values[1:]
    ]


def unquote_env_value(value: str) -> str:
    """An EnvironmentFile= value as systemd reads it (double quotes; \\ escapes " \\ ` $)."""
    if value.startswith('"') and value.endswith('"'):
        return re.sub(r'\\(["\\`$])', r"\1", value[1:-1])
    return value


def unit_lines(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith("#"))


def test_systemd_values_with_spaces_and_percent_signs_survive() -> None:
    command = ["/opt/my venv/100% tools/bin/python", "-m", 'tunnel"vision $HOME']
    unit = unit_lines(api_unit(command, "tv", make_settings(), "/etc/tunnel vision/100%.env"))
    assert unit["ExecStart"] == '"/opt/my venv/100%% tools/bin/python" -m "tunnel\\"vision $$HOME" serve'
    assert unquote_exec_start(unit["ExecStart"]) == [*command, "serve"]
    assert unit["EnvironmentFile"] == "-/etc/tunnel vision/100%%.env"
    settings = make_settings(detector="/models/my gdino", segmenter='/m/"sam" $x `y`\\z')
    env = unit_lines(env_file(settings))
    assert env["TUNNELVISION_DETECTOR"] == '"/models/my gdino"'
    assert unquote_env_value(env["TUNNELVISION_DETECTOR"]) == "/models/my gdino"
    assert unquote_env_value(env["TUNNELVISION_SEGMENTER"]) == settings.segmenter
    assert env["TUNNELVISION_HOST"] == "127.0.0.1"  # plain values stay plain
    with pytest.raises(ValueError, match="line break"):
        env_value("a\nTUNNELVISION_AUTH=auto")
    steps = next_steps("/tmp/my units/tunnelvision.service", "e", ["/opt/tv/bin/tunnelvision"], "svc", 8000)
    assert "'/tmp/my units/tunnelvision.service'" in steps


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit_for_an_executable_under_a_path_with_spaces_and_percent(
    tmp_path: Path,
) -> None:
    program = tmp_path / "my venv" / "100% sure" / "tunnelvision"
    program.parent.mkdir(parents=True)
    program.write_text("#!/bin/sh\n")
    program.chmod(0o755)
    unit = tmp_path / "tunnelvision.service"
    unit.write_text(api_unit([str(program)], "root", make_settings(), str(tmp_path / "env file")))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_systemd_next_steps_are_the_commands_that_work_as_pasted() -> None:
    steps = next_steps(
        "/tmp/u/tunnelvision.service",
        "/tmp/u/tunnelvision.env",
        ["/opt/tv venv/bin/tunnelvision"],
        "vision",
        8123,
    )
    # sudo's PATH lacks a venv's bin: the executable by its full path, quoted.
    assert "sudo '/opt/tv venv/bin/tunnelvision' keys add me --keys-file /etc/tunnelvision/keys.json" in steps
    assert "sudo chown vision /etc/tunnelvision/keys.json" in steps and "<service user>" not in steps
    assert "http://127.0.0.1:8123" in steps and "--port 8123" in steps
    # Nothing is written under /etc without sudo: the config goes to /tmp, then sudo copies it.
    for line in steps.splitlines():
        if "/etc/" in line and not line.strip().startswith(("sudo", "--credentials-file")):
            raise AssertionError(f"writes under /etc without sudo: {line}")
