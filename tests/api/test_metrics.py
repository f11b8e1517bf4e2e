"""/metrics: Prometheus text with the engine's numbers and request histograms."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from support import FakeBackend, ThreadServer, image_bytes, make_settings
from tunnelvision.security.keys import KeyStore


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_count_requests_batches_and_outcomes(server: ThreadServer) -> None:
    png = image_bytes(32, 24)
    for prompt in ("cat", "cat", "oom"):
        httpx.post(server.url + "/v1/segment", files={"image": ("i.png", png)}, data={"prompt": prompt})
    httpx.get(server.url + "/no/such/route")
    httpx.get(server.url + "/v1/jobs/no-such-job")  # a route with a parameter: labelled by its template
    response = httpx.get(server.url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = samples(response.text)
    assert values[("tunnelvision_requests_total", (("route", "/v1/segment"), ("status", "200")))] == 2
    assert values[("tunnelvision_requests_total", (("route", "/v1/segment"), ("status", "503")))] == 1
    assert values[("tunnelvision_requests_total", (("route", "other"), ("status", "404")))] == 1
    assert values[("tunnelvision_requests_total", (("route", "/v1/jobs/{job_id}"), ("status", "404")))] == 1
    assert values[("tunnelvision_tasks_total", (("outcome", "executed"),))] == 2
    assert values[("tunnelvision_device_oom_total", ())] == 1
    assert values[("tunnelvision_batch_size_count", ())] == 3
    assert values[("tunnelvision_queue_wait_seconds_count", ())] == 3
    assert values[("tunnelvision_stage_seconds_count", (("stage", "device"),))] == 2
    assert values[("tunnelvision_queue_depth", ())] == 0 and values[("tunnelvision_ready", ())] == 1
    assert ("tunnelvision_cache_hits_total", (("cache", "images"),)) in values


def test_metrics_need_a_key_unless_public(tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    key = KeyStore(keys).add("prometheus", ["admin"])
    with ThreadServer(make_settings(keys_file=keys), FakeBackend()) as srv:
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/metrics", headers={"X-API-Key": key}).status_code == 200
    with ThreadServer(make_settings(keys_file=keys, public_metrics=True), FakeBackend()) as srv:
        assert httpx.get(srv.url + "/metrics").status_code == 200
