"""`doctor`'s ray check against a fake server's /readyz (no Ray needed)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tunnelvision.tunnel.doctor import check_ray, render

KEY = "tv_test-key"
RAY_UP = {
    "reachable": True,
    "app": "tunnelvision-8000",
    "deployment": {
        "name": "device",
        "status": "HEALTHY",
        "pipelines": ["grounded-sam", "owl"],
        "replicas": {"RUNNING": 2},
        "alive": 2,
    },
    "gpus": {"total": 2.0, "free": 0.0},
    "age_s": 0.4,
}


class FakeReadyz:
    """/readyz answering `anonymous` without a key and `keyed` with KEY (as the real one does);
    /healthz always 200, as a running server's."""

    def __init__(self, anonymous: dict[str, Any], keyed: dict[str, Any]) -> None:
        answers = (anonymous, keyed)

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = answers[self.headers.get("Authorization") == f"Bearer {KEY}"]
                if self.path == "/healthz":
                    body = {"status": "ok"}
                data = json.dumps(body).encode()
                self.send_response(503 if body.get("status") == "not_ready" else 200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]

    def __enter__(self) -> FakeReadyz:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ready() -> Iterator[dict[str, Any]]:
    yield {"status": "ready", "phase": "ready", "detail": None, "queue": {}, "auth": None}


def test_replicas_alive_and_gpus_seen(ready: dict[str, Any]) -> None:
    with FakeReadyz({"status": "ready"}, {**ready, "ray": RAY_UP}) as fake:
        check = check_ray(fake.port, KEY)
    assert check is not None and check.ok is True
    assert "2 replica(s) alive (2 running) serving grounded-sam, owl" in check.detail
    assert "2 GPU(s) in the cluster, 0 free" in check.detail


def test_no_replica_alive_fails_with_a_remedy() -> None:
    down = {**RAY_UP, "deployment": {**RAY_UP["deployment"], "replicas": {"STARTING": 1}, "alive": 0}}  # type: ignore[dict-item]
    keyed = {"status": "not_ready", "reason": "no_replicas", "phase": "ready", "ray": down}
    with FakeReadyz({"status": "not_ready", "reason": "no_replicas"}, keyed) as fake:
        with_key, without = check_ray(fake.port, KEY), check_ray(fake.port, None)
    assert with_key is not None and with_key.ok is False
    assert "no replica" in with_key.detail and "1 starting" in with_key.detail
    assert "Ray restarts" in with_key.remedy
    assert without is not None and without.ok is False and "TUNNELVISION_API_KEY" in without.remedy
    assert "✗ ray:" in render([with_key], as_json=False)


def test_an_unreachable_cluster_fails() -> None:
    keyed = {"status": "not_ready", "reason": "cluster_unreachable", "phase": "ready"}
    keyed["ray"] = {"reachable": False, "error": "ConnectionError: GCS gone"}  # type: ignore[assignment]
    with FakeReadyz({"status": "not_ready", "reason": "cluster_unreachable"}, keyed) as fake:
        check = check_ray(fake.port, KEY)
    assert check is not None and check.ok is False and "GCS gone" in check.detail


def test_skipped_when_not_in_ray_mode(ready: dict[str, Any]) -> None:
    with FakeReadyz({"status": "ready"}, ready) as fake:
        keyed, anonymous = check_ray(fake.port, KEY), check_ray(fake.port, None)
    assert keyed is not None and keyed.ok is None and "not in Ray mode" in keyed.detail
    assert anonymous is not None and anonymous.ok is None


def test_nothing_answering_adds_no_check() -> None:
    with FakeReadyz({}, {}) as fake:
        port = fake.port
    assert check_ray(port, KEY) is None
