"""`tunnelvision serve --ray` on a local one-node Ray cluster started here (CPU, tiny models):
the same answers as the plain server, our 503 with Retry-After when the queue is full, auth at
the ingress, and a replica killed mid-request answered, not hung."""

from __future__ import annotations

import json
import os
import secrets
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

# Before Ray is imported (here or in a server): no usage reporting, a one-off auth token (the
# servers started below inherit it) and a node that stays on 127.0.0.1.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
# Load reported every half second (10 s by default), so autoscaling is seen within seconds.
os.environ.setdefault("RAY_SERVE_REPLICA_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")
os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "0.5")

ray = pytest.importorskip("ray", reason="Ray mode needs `pip install 'tunnelvision[ray]'`")
serve = pytest.importorskip("ray.serve")

from bench.ray_serve import local_cluster  # noqa: E402
from support import (  # noqa: E402
    ThreadServer,
    cli_server,
    image_bytes,
    keyed_cli_server,
    make_settings,
    wait_for,
)
from tunnelvision.models.factory import build_backends  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::pydantic.warnings.PydanticDeprecatedSince20")

PNG = image_bytes(64, 48)
LOW = {"box_threshold": "0", "text_threshold": "0"}  # random weights: let every box through


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A one-node cluster in its own temp dir; its GCS address for `--ray-address`."""
    with local_cluster(logical_cpus=4) as address:
        serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
        yield address


@pytest.fixture(scope="module")
def ray_url(cluster: str, tiny_models: tuple[Path, Path]) -> Iterator[str]:
    with cli_server(*tiny_models, "--no-warmup", "--ray", "--ray-address", cluster) as (url, _):
        yield url


@pytest.fixture(scope="module")
def plain_url(tiny_models: tuple[Path, Path]) -> Iterator[str]:
    settings = make_settings(detector=str(tiny_models[0]), segmenter=str(tiny_models[1]))
    with ThreadServer(settings, build_backends(settings)[0]) as server:
        yield server.url


@pytest.fixture(scope="module")
def slow(
    cluster: str, tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A keyed Ray server whose (simulated) device takes 1.5 s a pass, with room for one waiter."""
    extra = ["--ray", "--ray-address", cluster, "--backend", "simulated", "--simulated-batch-ms", "1500"]
    extra += ["--max-queue", "1", "--deadline-s", "30"]
    with keyed_cli_server(tiny_models, tmp_path_factory.mktemp("keys"), "ray", *extra) as (url, key):
        yield url, key


def post(url: str, route: str, key: str = "", **fields: str) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    files = {"image": ("i.png", PNG, "image/png")}
    return httpx.post(f"{url}{route}", files=files, data=fields, headers=headers, timeout=60)


def answer(response: httpx.Response) -> dict[str, Any]:
    """What must not depend on where the models ran (image ids are per server, timings vary)."""
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return {k: v for k, v in body.items() if k not in ("image_id", "timings_ms")}


@pytest.mark.parametrize("route", ["/v1/detect", "/v1/segment"])
def test_answers_equal_the_plain_servers(route: str, ray_url: str, plain_url: str) -> None:
    fields = {"prompt": "cat . dog", **LOW}
    through_ray = answer(post(ray_url, route, **fields))
    assert through_ray["detections"], "random weights with zero thresholds should find something"
    assert through_ray == answer(post(plain_url, route, **fields))


def test_box_prompts_and_models_list_through_ray(ray_url: str, plain_url: str) -> None:
    fields = {"boxes": json.dumps([[4, 4, 40, 30]])}
    assert answer(post(ray_url, "/v1/segment", **fields)) == answer(post(plain_url, "/v1/segment", **fields))
    pipelines = httpx.get(f"{ray_url}/v1/models").json()["pipelines"]
    assert [p["name"] for p in pipelines] == ["grounded-sam"]


def test_hostile_input_is_a_4xx_at_the_ingress(ray_url: str) -> None:
    response = httpx.post(
        f"{ray_url}/v1/detect", files={"image": ("i.png", b"not an image", "image/png")}, data={"prompt": "x"}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_image"


def test_a_bad_key_is_refused_at_the_ingress(slow: tuple[str, str]) -> None:
    url, _ = slow
    response = post(url, "/v1/detect", key="tv_not-a-key", prompt="cat")
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"]


def test_a_full_queue_is_our_503_with_retry_after(slow: tuple[str, str]) -> None:
    url, key = slow
    responses: list[httpx.Response] = []

    def send() -> None:
        responses.append(post(url, "/v1/detect", key=key, prompt="cat"))

    threads = [threading.Thread(target=send) for _ in range(5)]
    for thread in threads:
        thread.start()
        time.sleep(0.05)
    for thread in threads:
        thread.join(60)
    statuses = sorted(r.status_code for r in responses)
    assert 200 in statuses and 503 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert float(refused.headers["Retry-After"]) > 0
    assert refused.json()["error"]["code"] == "queue_full"


def app_of(url: str) -> str:
    """The Serve application of the server at `url` (on this machine)."""
    from tunnelvision.distributed.remote import app_name

    return app_name(make_settings(port=int(url.rsplit(":", 1)[1])))


def replica_handle(url: str) -> Any:
    from tunnelvision.distributed.remote import DEPLOYMENT

    return serve.get_deployment_handle(DEPLOYMENT, app_name=app_of(url))


def replica_pid(url: str) -> int:
    return int(replica_handle(url).pid.remote().result(timeout_s=30))


def test_a_replica_killed_mid_request_is_answered_not_hung(slow: tuple[str, str]) -> None:
    url, key = slow
    pid = replica_pid(url)
    responses: list[httpx.Response] = []
    sender = threading.Thread(target=lambda: responses.append(post(url, "/v1/detect", key=key, prompt="cat")))
    started = time.monotonic()
    sender.start()
    time.sleep(0.7)  # the request is on the (1.5 s) device now
    os.kill(pid, signal.SIGKILL)
    sender.join(60)
    assert not sender.is_alive(), "the request hung"
    assert time.monotonic() - started < 30
    (response,) = responses
    # Retried once, on the replica Ray started in its place (a second loss would be a 503).
    assert response.status_code == 200, response.text
    assert replica_pid(url) != pid


def running_replicas(url: str) -> int:
    from tunnelvision.distributed.remote import DEPLOYMENT

    application = serve.status().applications[app_of(url)]
    return int(application.deployments[DEPLOYMENT].replica_states.get("RUNNING", 0))


def test_replicas_scale_from_one_to_two_under_load_and_back(
    cluster: str, tiny_models: tuple[Path, Path]
) -> None:
    extra = ["--ray", "--ray-address", cluster, "--backend", "simulated", "--simulated-batch-ms", "500"]
    extra += ["--ray-min-replicas", "1", "--ray-max-replicas", "2"]
    extra += ["--ray-upscale-delay-s", "1", "--ray-downscale-delay-s", "2", "--max-inflight-per-client", "0"]
    with cli_server(*tiny_models, "--no-warmup", *extra) as (url, _):
        assert running_replicas(url) == 1
        loaded = threading.Event()

        def load() -> None:
            while not loaded.is_set():
                assert post(url, "/v1/detect", prompt="cat").status_code == 200

        senders = [threading.Thread(target=load) for _ in range(6)]
        for sender in senders:
            sender.start()
        try:
            wait_for(lambda: running_replicas(url) == 2, timeout_s=30)
        finally:
            loaded.set()
            for sender in senders:
                sender.join(30)
        wait_for(lambda: running_replicas(url) == 1, timeout_s=40)


def test_a_job_runs_through_the_replicas(ray_url: str) -> None:
    """Jobs live in the ingress's SQLite; its runner submits through the same remote backends."""
    files = [("images", (f"img{i}.png", image_bytes(40 + i, 30, seed=i), "image/png")) for i in range(2)]
    created = httpx.post(f"{ray_url}/v1/jobs", files=files, data={"prompt": "cat . dog", **LOW})
    assert created.status_code == 202, created.text
    job = f"{ray_url}/v1/jobs/{created.json()['id']}"
    wait_for(lambda: httpx.get(job).json()["status"] == "done", timeout_s=30)
    assert (httpx.get(job).json()["done"], httpx.get(job).json()["failed"]) == (2, 0)
    coco = httpx.get(f"{job}/result").json()
    assert sorted(i["file_name"] for i in coco["images"]) == ["img0.png", "img1.png"]
    assert coco["annotations"], "zero thresholds: every image has detections"
