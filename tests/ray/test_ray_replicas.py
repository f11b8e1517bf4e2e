"""What each replica does on its side of the hop, seen from outside: a call whose client hung up
is cancelled on the replica, every replica warms up before it takes traffic, each reports its
embedding cache (summed in /metrics, per replica in /readyz), and a request reusing an image_id
reaches the replica that holds its embedding."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray", reason="Ray mode needs `pip install 'tunnelvision[ray]'`")

# The serving tests' one-node cluster (its environment set before Ray starts); module-scoped,
# so this module gets its own.
from test_ray_serve import PNG, app_of, cluster, post, replica_handle  # noqa: E402, F401

from support import cli_server, keyed_cli_server  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")


def readyz_ray(url: str, key: str) -> dict[str, Any]:
    section: dict[str, Any] = httpx.get(
        f"{url}/readyz", headers={"Authorization": f"Bearer {key}"}, timeout=10
    ).json()["ray"]
    return section


def replica_stats(url: str, key: str) -> dict[str, dict[str, Any]]:
    """Each replica's numbers as its last reply carried them, through /readyz."""
    stats: dict[str, dict[str, Any]] = readyz_ray(url, key)["replica_stats"]
    return stats


def every_replica(url: str, count: int) -> dict[str, dict[str, Any]]:
    """Each replica's own `stats()`, asked until `count` different replicas have answered."""
    handle = replica_handle(url)
    seen: dict[str, dict[str, Any]] = {}
    deadline = time.monotonic() + 30
    while len(seen) < count and time.monotonic() < deadline:
        stats = handle.stats.remote().result(timeout_s=30)
        seen[stats["id"]] = stats
    return seen


@pytest.fixture(scope="module")
def slow(
    cluster: str,  # noqa: F811
    tiny_models: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, str]]:
    """A keyed server on one replica whose simulated device takes 1.5 s a pass."""
    extra = ["--ray", "--ray-address", cluster, "--backend", "simulated", "--simulated-batch-ms", "1500"]
    with keyed_cli_server(tiny_models, tmp_path_factory.mktemp("keys"), "cancel", *extra) as (url, key):
        yield url, key


def test_a_client_that_hangs_up_has_its_call_cancelled_on_the_replica(slow: tuple[str, str]) -> None:
    url, key = slow
    kept: list[httpx.Response] = []
    first = threading.Thread(target=lambda: kept.append(post(url, "/v1/detect", key=key, prompt="cat")))
    first.start()
    time.sleep(0.4)  # the first call holds the replica's device for 1.5 s
    # The second call reaches the replica and waits there for the device; its client gives up.
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{url}/v1/detect",
            files={"image": ("i.png", PNG, "image/png")},
            data={"prompt": "dog"},
            headers={"Authorization": f"Bearer {key}"},
            timeout=0.6,
        )
    first.join(30)
    assert kept[0].status_code == 200, kept[0].text
    assert post(url, "/v1/detect", key=key, prompt="bird").status_code == 200  # healthy after
    # The replica's counters, through /readyz: the third call's reply carries them.
    (stats,) = replica_stats(url, key).values()
    assert stats["cancelled_items"] == 1, stats
    assert stats["device_passes"] == 2, "the hung-up call never used the device"
    assert readyz_ray(url, key)["deployment"]["alive"] == 1


def test_every_replica_warms_up_before_the_server_is_ready(
    cluster: str,  # noqa: F811
    tiny_models: tuple[Path, Path],
) -> None:
    extra = ["--ray", "--ray-address", cluster, "--backend", "simulated", "--simulated-batch-ms", "300"]
    extra += ["--ray-min-replicas", "2", "--ray-max-replicas", "2"]
    with cli_server(*tiny_models, *extra) as (url, _):  # with warm-up (no --no-warmup)
        # cli_server returned at the first 200 from /readyz: by then both replicas were warm.
        replicas = every_replica(url, 2)
        assert len(replicas) == 2
        for stats in replicas.values():
            assert stats["warmups"] == 1, stats
            assert stats["warmup_s"] >= 0.3, "one simulated pass per pipeline"


def test_reusing_an_image_id_hits_the_replica_that_holds_its_embedding(
    cluster: str,  # noqa: F811
    tiny_models: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    extra = ["--ray", "--ray-address", cluster, "--ray-min-replicas", "2", "--ray-max-replicas", "2"]
    extra += ["--public-metrics"]
    with keyed_cli_server(tiny_models, tmp_path_factory.mktemp("keys"), "cache", *extra) as (url, key):
        first = post(url, "/v1/segment", key=key, boxes="[[4, 4, 40, 30]]")
        assert first.status_code == 200, first.text
        image_id = first.json()["image_id"]
        time.sleep(1.0)  # the replica announces the id; Serve's router hears within a second
        headers = {"Authorization": f"Bearer {key}"}
        for _ in range(6):
            again = httpx.post(
                f"{url}/v1/segment",
                json={"image_id": image_id, "boxes": [[4, 4, 40, 30]]},
                headers=headers,
                timeout=60,
            )
            assert again.status_code == 200, again.text
        # One miss (the first call computed the embedding), then six hits on the same replica.
        caches = {rid: s["cache"] for rid, s in replica_stats(url, key).items()}
        holder = [c for c in caches.values() if c.get("misses")]
        assert len(holder) == 1 and holder[0]["misses"] == 1 and holder[0]["hits"] == 6, caches
        metrics = httpx.get(f"{url}/metrics", timeout=10).text  # the replicas' caches, added up
        assert 'tunnelvision_cache_hits_total{cache="embeddings"} 6.0' in metrics, metrics
        assert 'tunnelvision_cache_misses_total{cache="embeddings"} 1.0' in metrics
        (replica,) = [rid for rid, c in caches.items() if c.get("misses")]
        assert f'tunnelvision_replica_cache_hits_total{{replica="{replica}"}} 6.0' in metrics
