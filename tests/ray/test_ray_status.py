"""Ray mode's status: /readyz's `ray` section for a caller with a key (the anonymous answer is
unchanged), `doctor`'s ray check, and readiness following a replica that Ray restarts."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray mode needs `pip install 'tunnelvision[ray]'`")

# The same one-node cluster fixture as the serving tests (its environment set before Ray starts);
# module-scoped, so this module gets its own cluster.
from test_ray_serve import app_of, cluster, replica_pid  # noqa: E402, F401

from support import keyed_cli_server, wait_for  # noqa: E402
from tunnelvision.tunnel.doctor import check_ray, ray_check  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")


@pytest.fixture(scope="module")
def keyed(
    cluster: str,  # noqa: F811
    tiny_models: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str]]:
    extra = ["--ray", "--ray-address", cluster, "--backend", "simulated", "--simulated-batch-ms", "50"]
    with keyed_cli_server(tiny_models, tmp_path_factory.mktemp("keys"), "status", *extra) as (url, key):
        yield url, key


def readyz(url: str, key: str = "") -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.get(f"{url}/readyz", headers=headers, timeout=10)


def polled(done: bool) -> bool:
    """`done`, after a pause when not: the server is asked ten times a second, not hundreds."""
    if not done:
        time.sleep(0.1)
    return done


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_readyz_reports_the_cluster_to_a_key_holder_only(keyed: tuple[str, str]) -> None:
    url, key = keyed
    anonymous = readyz(url)
    assert (anonymous.status_code, anonymous.json()) == (200, {"status": "ready"})
    started = time.monotonic()
    body = readyz(url, key).json()
    assert time.monotonic() - started < 1.0, "readyz must answer from the cached snapshot"
    ray_section = body["ray"]
    assert ray_section["reachable"] is True
    assert ray_section["app"] == app_of(url)
    assert ray_section["deployment"]["alive"] == 1
    assert ray_section["deployment"]["replicas"] == {"RUNNING": 1}
    assert ray_section["deployment"]["pipelines"] == ["grounded-sam"]
    assert ray_section["gpus"]["total"] == ray.cluster_resources().get("GPU", 0)
    check = check_ray(port_of(url), key)
    assert check is not None and check.ok is True, check
    assert "1 replica(s) alive" in check.detail and "grounded-sam" in check.detail


def test_a_killed_replica_is_not_ready_until_ray_restarts_it(keyed: tuple[str, str]) -> None:
    url, key = keyed
    pid = replica_pid(url)
    os.kill(pid, signal.SIGKILL)
    seen: list[dict[str, Any]] = []

    def not_ready() -> bool:
        response = readyz(url, key)
        if response.status_code == 503:
            seen.append(response.json())
        return polled(response.status_code == 503)

    wait_for(not_ready, timeout_s=20)
    body = seen[-1]
    assert body["reason"] == "no_replicas" and body["ray"]["deployment"]["alive"] == 0
    assert body["error"]["code"] == "not_ready"
    anonymous = readyz(url)
    if anonymous.status_code == 503:  # anyone sees the word, never the cluster's details
        assert "ray" not in anonymous.json() and anonymous.json()["reason"] == "no_replicas"
    assert ray_check(body, keyed=True).ok is False
    wait_for(lambda: polled(readyz(url, key).status_code == 200), timeout_s=40)
    assert readyz(url, key).json()["ray"]["deployment"]["alive"] == 1
    assert replica_pid(url) != pid
