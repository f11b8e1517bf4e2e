"""The deployment files say what DEPLOY.md promises (no Docker engine runs here to build them)."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]


def test_compose_runs_the_api_on_a_gpu_and_cloudflared_after_it_is_healthy() -> None:
    compose = yaml.safe_load((ROOT / "deploy" / "compose.yaml").read_text())
    api, tunnel = compose["services"]["tunnelvision"], compose["services"]["cloudflared"]
    (device,) = api["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert api["environment"]["TUNNELVISION_AUTH"] == "keys"
    assert any(v.endswith(":/home/tunnelvision/.cache/huggingface") for v in api["volumes"])
    # keys and jobs on named volumes (they start owned by the image's user, unlike a bind mount)
    mounts = {target: source for source, target in (v.split(":")[:2] for v in api["volumes"])}
    assert mounts["/config"] in compose["volumes"] and mounts["/data"] in compose["volumes"]
    assert api["environment"]["TUNNELVISION_DATA_DIR"] == "/data"
    assert api["environment"]["TUNNELVISION_KEYS_FILE"].startswith("/config/")
    assert tunnel["image"].startswith("cloudflare/cloudflared")
    assert tunnel["command"].split()[0] == "tunnel" and tunnel["command"].split()[-1] == "run"
    assert "TUNNEL_TOKEN" in tunnel["environment"]
    assert tunnel["depends_on"]["tunnelvision"]["condition"] == "service_healthy"
    assert tunnel["network_mode"] == "service:tunnelvision"


def test_dockerfile_uses_cuda_a_non_root_user_and_a_healthcheck() -> None:
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert re.search(r"^FROM nvidia/cuda:\S+runtime", dockerfile, re.M)
    assert re.search(r"download\.pytorch\.org/whl/cu\d+", dockerfile)
    users = re.findall(r"^USER (\S+)", dockerfile, re.M)
    assert users and users[-1] not in ("root", "0")
    # readiness, not liveness: unhealthy while models load or once the device is unusable
    assert re.search(r"^HEALTHCHECK .*\n?.*/readyz", dockerfile, re.M)
    assert "/healthz" not in dockerfile.split("HEALTHCHECK", 1)[1]
    assert 'VOLUME ["/home/tunnelvision/.cache/huggingface", "/config", "/data"]' in dockerfile
    # the folders the volumes start from belong to the service user, so it can write keys and jobs
    chown = re.search(r"chown -R tunnelvision:tunnelvision ([^\n]+)", dockerfile)
    assert chown and {"/config", "/data"} <= set(chown.group(1).split())
    assert "TUNNELVISION_DATA_DIR=/data" in dockerfile
    assert dockerfile.strip().endswith('CMD ["tunnelvision", "serve"]')


def test_deploy_guide_covers_both_routes_and_the_error_table() -> None:
    guide = (ROOT / "docs" / "DEPLOY.md").read_text()
    for words in (
        "cloudflared service install <TOKEN>",
        "tunnelvision tunnel config",
        "**502",
        "**1033**",
        "**524**",
        "**413**",
        "**429**",
        "tunnelvision doctor",
        "tunnelvision up",
    ):
        assert words in guide, words


def test_each_install_gets_the_extras_it_needs() -> None:
    """`pip install tunnelvision` is the light client; the server, the scripts and the image ask for
    `[server]` (the tests for `[dev]`, which includes it)."""
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]

    def names(requirements: list[str]) -> set[str]:
        return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}

    server_only = {"torch", "transformers", "fastapi", "uvicorn", "safetensors", "scipy", "pyjwt"}
    assert not names(project["dependencies"]) & server_only
    assert server_only <= names(extras["server"])
    assert any(r.startswith("tunnelvision[") and "server" in r for r in extras["dev"])
    assert "torch>=2.4" in extras["server"]  # a plain range: a torch installed first is kept
    assert 'install_project "[server]"' in (ROOT / "scripts" / "serve").read_text()
    assert 'install_project "[dev]"' in (ROOT / "scripts" / "test").read_text()
    assert re.search(r'^RUN pip install "\.\[server\]"$', (ROOT / "deploy" / "Dockerfile").read_text(), re.M)
    readme = (ROOT / "README.md").read_text()
    assert "pip install tunnelvision" in readme and "pip install 'tunnelvision[server]'" in readme
