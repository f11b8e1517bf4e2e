"""Queueing, deadlines, disconnects, failures and readiness, over real HTTP to a real uvicorn."""

from __future__ import annotations

import base64
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from support import FakeBackend, ThreadServer, image_bytes, make_settings, send_and_hang_up, stats, wait_for
from tunnelvision.engine.backend import Backend
from tunnelvision.errors import ModelUnavailable

PNG = image_bytes(64, 48)


def segment(url: str, prompt: str = "cat", timeout: float = 30, **fields: Any) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/segment",
        files={"image": ("i.png", PNG, "image/png")},
        data={"prompt": prompt, **fields},
        timeout=timeout,
    )


def test_multipart_and_json_give_the_same_answer(server: ThreadServer) -> None:
    form = segment(server.url, "Cat . dog")
    body = {"image": base64.b64encode(PNG).decode(), "prompt": ["Cat", "dog"]}
    as_json = httpx.post(f"{server.url}/v1/segment", json=body)
    assert form.status_code == as_json.status_code == 200
    assert form.json()["detections"] == as_json.json()["detections"]
    assert form.json()["detections"][0]["label"] == "Cat"  # as the user wrote it
    assert set(form.json()["timings_ms"]) >= {"decode", "queue", "device", "total"}


def test_cloudflare_ray_id_becomes_the_request_id(server: ThreadServer) -> None:
    response = httpx.get(f"{server.url}/healthz", headers={"CF-Ray": "8d1f2a3b4c5d6e7f-AMS"})
    assert response.headers["x-request-id"] == "8d1f2a3b4c5d6e7f-AMS"
    assert len(httpx.get(f"{server.url}/healthz").headers["x-request-id"]) == 32


def test_healthz_answers_instantly_while_the_device_is_busy(server: ThreadServer, fake: FakeBackend) -> None:
    fake.slow_s = 2.0
    with ThreadPoolExecutor(1) as pool:
        slow = pool.submit(segment, server.url, "slow cat")
        assert fake.started.wait(5)
        latencies = []
        for _ in range(10):
            began = time.monotonic()
            assert httpx.get(f"{server.url}/healthz").status_code == 200
            latencies.append(time.monotonic() - began)
        assert stats(server.url)["running"] == 1  # the slow request was still on the device
        assert max(latencies) < 0.5
        assert slow.result().status_code == 200


def test_full_queue_answers_503_with_retry_after_at_once(fake: FakeBackend) -> None:
    fake.slow_s = 1.5
    with ThreadServer(make_settings(max_queue=1), fake) as srv, ThreadPoolExecutor(2) as pool:
        running = pool.submit(segment, srv.url, "slow cat")
        assert fake.started.wait(5)
        queued = pool.submit(segment, srv.url, "slow cat")
        wait_for(lambda: stats(srv.url)["queued"] == 1)
        began = time.monotonic()
        rejected = segment(srv.url)
        assert time.monotonic() - began < 1.0
        assert rejected.status_code == 503
        assert rejected.json()["error"]["code"] == "queue_full"
        assert int(rejected.headers["retry-after"]) >= 1
        assert running.result().status_code == queued.result().status_code == 200


def test_request_past_its_deadline_while_queued_never_reaches_the_device(fake: FakeBackend) -> None:
    fake.slow_s = 1.5
    with ThreadServer(make_settings(deadline_s=0.5), fake) as srv, ThreadPoolExecutor(2) as pool:
        first = pool.submit(segment, srv.url, "slow cat")
        assert fake.started.wait(5)
        second = pool.submit(segment, srv.url, "cat")
        for response in (first.result(), second.result()):
            assert response.status_code == 504
            assert response.json()["error"]["code"] == "deadline_exceeded"
        wait_for(lambda: stats(srv.url)["running"] == 0)
        assert fake.executed == 1  # only the one that was already running
        assert stats(srv.url)["dropped_expired"] == 1


def test_client_that_disconnects_while_queued_is_never_run(server: ThreadServer, fake: FakeBackend) -> None:
    fake.slow_s = 1.5
    with ThreadPoolExecutor(1) as pool:
        busy = pool.submit(segment, server.url, "slow cat")
        assert fake.started.wait(5)
        send_and_hang_up(server.url, PNG)
        wait_for(lambda: stats(server.url)["dropped_cancelled"] == 1)
        assert busy.result().status_code == 200
    wait_for(lambda: stats(server.url)["running"] == 0)
    assert fake.executed == 1
    assert stats(server.url)["executed"] == 1


def test_a_backend_bug_fails_only_its_request_without_leaking_details(server: ThreadServer) -> None:
    response = segment(server.url, "explode")
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["code"] == "internal_error" and error["request_id"]
    assert "passwd" not in response.text and "Traceback" not in response.text
    assert segment(server.url).status_code == 200


def test_out_of_memory_is_a_503_with_retry_after_and_serving_goes_on(server: ThreadServer) -> None:
    response = segment(server.url, "oom")
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "device_out_of_memory"
    assert response.headers["retry-after"] == "7"
    assert segment(server.url).status_code == 200
    assert stats(server.url)["failed_by_code"] == {"device_out_of_memory": 1}


def test_a_dead_worker_fails_its_waiters_and_readiness(server: ThreadServer, fake: FakeBackend) -> None:
    fake.slow_s = 1.0
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(segment, server.url, "slow cat")
        assert fake.started.wait(5)
        killer = pool.submit(segment, server.url, "die")
        wait_for(lambda: stats(server.url)["queued"] == 1)  # in this order: the killer runs first
        waiter = pool.submit(segment, server.url, "cat")
        wait_for(lambda: stats(server.url)["queued"] == 2)
        assert first.result().status_code == 200
        for response in (killer.result(), waiter.result()):
            assert response.status_code == 503
            assert response.json()["error"]["code"] == "worker_unavailable"
    ready = httpx.get(f"{server.url}/readyz")
    assert ready.status_code == 503 and "worker" in ready.json()["error"]["message"]
    assert segment(server.url).status_code == 503
    assert httpx.get(f"{server.url}/healthz").status_code == 200


class SlowLoading:
    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self, settings: Any) -> list[Backend]:
        assert self.release.wait(10)
        return [FakeBackend()]


def test_readyz_is_503_while_loading_then_200(monkeypatch: pytest.MonkeyPatch) -> None:
    loader = SlowLoading()
    srv = ThreadServer(make_settings(), FakeBackend())
    srv.app.state.tunnelvision.backend_factory = loader
    srv.thread.start()
    try:
        wait_for(lambda: _answers(srv.url))
        loading = httpx.get(f"{srv.url}/readyz")
        assert loading.status_code == 503 and loading.json()["reason"] == "loading"
        assert loading.headers["retry-after"] == "5"
        assert segment(srv.url).json()["error"]["code"] == "not_ready"
        assert httpx.get(f"{srv.url}/healthz").status_code == 200
        loader.release.set()
        wait_for(lambda: httpx.get(f"{srv.url}/readyz").status_code == 200)
        models = httpx.get(f"{srv.url}/v1/models").json()
        assert models["detector"]["id"] == "fake-detector"
        assert [(p["name"], p["default"]) for p in models["pipelines"]] == [("grounded-sam", True)]
    finally:
        loader.release.set()
        srv.__exit__()


def test_models_that_cannot_load_make_readyz_say_why() -> None:
    def broken(settings: Any) -> list[Backend]:
        raise ModelUnavailable("cannot load the detector 'x/y': unreachable")

    reasons: list[str] = []
    srv = ThreadServer(make_settings(), FakeBackend())
    srv.app.state.tunnelvision.backend_factory = broken
    srv.app.state.tunnelvision.on_fatal = reasons.append
    srv.thread.start()
    try:
        wait_for(lambda: bool(reasons))
        ready = httpx.get(f"{srv.url}/readyz")
        assert ready.status_code == 503 and ready.json()["reason"] == "failed"  # details need a key
        assert reasons == ["cannot load the detector 'x/y': unreachable"]
    finally:
        srv.__exit__()


def _answers(url: str) -> bool:
    try:
        return httpx.get(f"{url}/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def test_openapi_documents_both_encodings_and_every_route(server: ThreadServer) -> None:
    spec = httpx.get(f"{server.url}/openapi.json").json()
    assert {"/v1/detect", "/v1/segment", "/healthz", "/readyz", "/v1/models"} <= set(spec["paths"])
    for route in ("/v1/detect", "/v1/segment"):
        content = spec["paths"][route]["post"]["requestBody"]["content"]
        assert set(content) == {"multipart/form-data", "application/json"}
        assert content["multipart/form-data"]["schema"]["properties"]["image"]["format"] == "binary"
        assert "example" in content["application/json"]
    assert httpx.get(f"{server.url}/docs").status_code == 200
