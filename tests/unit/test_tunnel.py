from __future__ import annotations

import configparser
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from support import make_settings, run_tunnelvision
from tunnelvision.tunnel.config import (
    MAX_REPLICAS,
    TOPOLOGIES,
    TunnelConfigError,
    build_config,
    config_notes,
    ingress_problems,
    render_config,
)
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


# -- beyond one box: --origin and --topology ------------------------------------------------------


def test_origin_sends_the_hostname_to_another_box_or_a_ray_proxy() -> None:
    config = build_config("api.example.com", UUID, "c.json", 8000, origin="HTTP://10.0.0.5:8123/")
    assert config["ingress"][0] == {"hostname": "api.example.com", "service": "http://10.0.0.5:8123"}
    assert config["ingress"][-1] == {"service": "http_status:404"}
    assert config["originRequest"]["keepAliveTimeout"] == "90s"  # whatever the origin
    ipv6 = build_config("api.example.com", UUID, "c.json", 8000, origin="https://[fd00::5]:8443")
    assert ipv6["ingress"][0]["service"] == "https://[fd00::5]:8443"


@pytest.mark.parametrize(
    ("origin", "words"),
    [
        ("10.0.0.5:8000", "http:// or https://"),
        ("ftp://10.0.0.5:8000", "http:// or https://"),
        ("http://:8000", "http:// or https://"),
        ("http://10.0.0.5", "give the port"),
        ("http://10.0.0.5:99999", "out of range"),
        ("http://10.0.0.5:8000/v1", "no path"),
        ("http://user:pw@10.0.0.5:8000", "no path, query or user"),
        ("http://10.0.0.5:8000/?a=1", "no path"),
    ],
)
def test_a_bad_origin_is_refused_with_the_reason(origin: str, words: str) -> None:
    with pytest.raises(TunnelConfigError, match=re.escape(words)):
        build_config("api.example.com", UUID, "c.json", 8000, origin=origin)


def test_a_remote_origin_says_what_the_api_there_needs_and_a_local_one_says_nothing() -> None:
    remote = config_notes(
        build_config("api.example.com", UUID, "c.json", 8000, origin="http://10.0.0.5:8000"), "box"
    )
    assert any("TUNNELVISION_HOST" in line for line in remote)
    assert any("TUNNELVISION_TRUSTED_PROXIES" in line for line in remote)
    assert any("private network" in line for line in remote)
    for origin in (None, "http://localhost:8000", "http://[::1]:8000", "http://127.0.0.2:8000"):
        assert config_notes(build_config("api.example.com", UUID, "c.json", 8000, origin=origin), "box") == []


def test_each_topology_says_what_cloudflare_does_and_does_not_balance() -> None:
    config = build_config("api.example.com", UUID, "c.json", 8000)
    replicas = " ".join(config_notes(config, "replicas"))
    assert "nearest" in replicas and "no round robin" in replicas and "not load balancing" in replicas
    assert f"up to {MAX_REPLICAS}" in replicas and "502" in replicas  # the API down: no failover
    sites = " ".join(config_notes(config, "sites"))
    assert f"{UUID}.cfargotunnel.com" in sites and "Host: api.example.com" in sites
    assert "/readyz" in sites and "paid add-on" in sites and "route dns" in sites
    assert f"cloudflared tunnel route lb {UUID} api.example.com <pool>" in sites
    ray = " ".join(
        config_notes(
            build_config("api.example.com", UUID, "c.json", 8000, origin="http://127.0.0.1:8001"), "ray"
        )
    )
    assert "http://127.0.0.1:8001" in ray and "--ray-max-replicas" in ray and "doctor --port 8001" in ray


def test_the_monitor_advice_matches_the_config_it_goes_with() -> None:
    """The monitor's Host header is what reaches /readyz; without it the catch-all answers 404."""
    config = build_config("api.example.com", UUID, "c.json", 8000)
    rules = config["ingress"]
    by_host = {rule.get("hostname"): rule["service"] for rule in rules}
    assert by_host["api.example.com"] == "http://127.0.0.1:8000"
    assert by_host[None] == "http_status:404"
    assert "monitor sees 404" in " ".join(config_notes(config, "sites"))


def test_the_cli_offers_every_topology() -> None:
    from tunnelvision.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(
        ["tunnel", "config", "--hostname", "a.example.com", "--tunnel", UUID, "--credentials-file", "c"]
    )
    assert args.topology == "box" and args.origin is None and args.port is None
    for topology in TOPOLOGIES:
        parsed = parser.parse_args(
            [
                "tunnel",
                "config",
                "--hostname",
                "a.example.com",
                "--tunnel",
                UUID,
                "--credentials-file",
                "c",
                "--topology",
                topology,
            ]
        )
        assert parsed.topology == topology


def tunnel_config(*extra: str) -> subprocess.CompletedProcess[str]:
    return run_tunnelvision(
        "tunnel",
        "config",
        "--hostname",
        "api.example.com",
        "--tunnel",
        UUID,
        "--credentials-file",
        "c.json",
        *extra,
    )


def test_tunnel_config_prints_yaml_on_stdout_and_the_advice_on_stderr() -> None:
    result = tunnel_config("--origin", "http://10.0.0.5:8000", "--topology", "sites")
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(result.stdout)  # stdout is the YAML alone, ready for `> config.yml`
    assert config["ingress"][0]["service"] == "http://10.0.0.5:8000"
    assert "cfargotunnel.com" in result.stderr and "TUNNELVISION_TRUSTED_PROXIES" in result.stderr
    assert "cfargotunnel.com" not in result.stdout
    plain = tunnel_config()
    assert plain.returncode == 0 and plain.stderr == ""  # one box: as before, nothing to add
    assert yaml.safe_load(plain.stdout)["ingress"][0]["service"] == "http://127.0.0.1:8000"


def test_tunnel_config_writes_the_file_then_advises(tmp_path: Path) -> None:
    out = tmp_path / "config.yml"
    result = tunnel_config("--port", "8123", "--topology", "replicas", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(out.read_text())["ingress"][0]["service"] == "http://127.0.0.1:8123"
    assert result.stderr.index(f"wrote {out}") < result.stderr.index("replicas of tunnel")


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--origin", "http://10.0.0.5:8000", "--port", "8000"), "give --origin or --port, not both"),
        (("--origin", "http://10.0.0.5"), "give the port"),
        (("--topology", "mesh"), "invalid choice"),
    ],
)
def test_tunnel_config_refuses_contradictions_and_nonsense(extra: tuple[str, ...], words: str) -> None:
    result = tunnel_config(*extra)
    assert result.returncode == 2 and words in result.stderr and result.stdout == ""
    assert "Traceback" not in result.stderr


def test_the_scaling_guide_commands_parse_and_name_every_topology() -> None:
    """Each `tunnelvision tunnel config` line in docs/SCALING.md works as pasted (placeholders filled),
    and the guide covers every --topology the command offers."""
    import shlex

    from tunnelvision.cli import build_parser

    guide = (Path(__file__).resolve().parents[2] / "docs" / "SCALING.md").read_text()
    joined = guide.replace("\\\n", " ")
    commands = [
        line.strip() for line in joined.splitlines() if line.strip().startswith("tunnelvision tunnel config")
    ]
    assert len(commands) >= 4
    for command in commands:
        filled = re.sub(r"<UUID(-\w+)?>", UUID, command.split("#")[0])
        args = build_parser().parse_args(shlex.split(filled)[1:])
        build_config(args.hostname, args.tunnel, args.credentials_file, args.port or 8000, origin=args.origin)
    for topology in TOPOLOGIES:
        assert f"--topology {topology}" in guide or topology == "box", topology
    for fact in (
        "nearest",
        "25 active replicas",
        "paid add-on",
        "/readyz",
        "cfargotunnel.com",
        "to be measured",
    ):
        assert fact in guide, fact
