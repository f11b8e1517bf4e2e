"""The Python client against a real server: inputs, typed results, errors, retries."""

from __future__ import annotations

import asyncio
import io
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import FakeBackend, ThreadServer, image_bytes, make_settings
from tunnelvision import AsyncClient, Client
from tunnelvision.client import AuthenticationError, InvalidRequest, Overloaded
from tunnelvision.schemas import DetectResponse, SegmentResponse
from tunnelvision.security.keys import KeyStore

PNG = image_bytes(40, 30)


def test_every_image_kind_gives_a_typed_result(server: ThreadServer, tmp_path: Path) -> None:
    path = tmp_path / "cat.png"
    path.write_bytes(PNG)
    pil = Image.open(io.BytesIO(PNG))
    with Client(server.url) as client:
        for image in (str(path), path, PNG, pil, np.asarray(pil)):
            result = client.detect(image, prompt="a cat")
            assert isinstance(result, DetectResponse)
            assert (result.image.width, result.image.height) == (40, 30)
            assert result.detections[0].label == "a cat"
        segmented = client.segment(PNG, prompt=["cat", "dog"], multimask=True)
        assert isinstance(segmented, SegmentResponse) and segmented.detections[0].label == "cat"
        again = client.segment(image_id=segmented.image_id, boxes=[[0, 0, 10, 10]])
        assert again.image_id == segmented.image_id
        assert Image.open(io.BytesIO(client.annotate(PNG, prompt="cat"))).size == (40, 30)
        assert client.models().pipelines[0].models[0].id == "fake-detector"


def test_server_errors_raise_typed_exceptions_with_the_json_error(server: ThreadServer) -> None:
    with Client(server.url) as client:
        with pytest.raises(InvalidRequest) as caught:
            client.detect(PNG, prompt="cat", box_threshold=2)
        assert caught.value.status == 422 and "box_threshold" in caught.value.message
        assert caught.value.request_id
        with pytest.raises(InvalidRequest) as missing:
            client.segment(image_id="0" * 32, prompt="cat")
        assert missing.value.status == 404 and missing.value.code == "not_found"


def test_url_and_key_come_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keys = tmp_path / "keys.json"
    key = KeyStore(keys).add("sdk")
    with ThreadServer(make_settings(keys_file=keys), FakeBackend()) as srv:
        monkeypatch.setenv("TUNNELVISION_URL", srv.url)
        with Client() as anonymous, pytest.raises(AuthenticationError):
            anonymous.detect(PNG, prompt="cat")
        monkeypatch.setenv("TUNNELVISION_API_KEY", key)
        with Client() as client:
            assert client.detect(PNG, prompt="cat").detections


def test_retry_after_is_honoured_then_the_request_succeeds() -> None:
    settings = make_settings(rate_limit_per_minute=60, rate_limit_burst=1)
    with ThreadServer(settings, FakeBackend()) as srv, Client(srv.url) as client:
        client.detect(PNG, prompt="cat")
        began = time.monotonic()
        assert client.detect(PNG, prompt="cat").detections  # 429, Retry-After: 1, then 200
        assert time.monotonic() - began >= 0.9


def test_retries_are_bounded_and_end_in_overloaded(server: ThreadServer) -> None:
    with Client(server.url, retries=2, max_wait_s=0.05) as client, pytest.raises(Overloaded) as caught:
        client.segment(PNG, prompt="oom")
    assert caught.value.status == 503 and caught.value.code == "device_out_of_memory"
    assert caught.value.retry_after_s == 7


def test_async_client(server: ThreadServer) -> None:
    async def scenario() -> list[DetectResponse]:
        async with AsyncClient(server.url) as client:
            return list(await asyncio.gather(*(client.detect(PNG, prompt=f"thing {i}") for i in range(4))))

    results = asyncio.run(scenario())
    assert [r.detections[0].label for r in results] == [f"thing {i}" for i in range(4)]


def test_jobs_through_the_client(server: ThreadServer, tmp_path: Path) -> None:
    path = tmp_path / "first.png"
    path.write_bytes(PNG)
    with Client(server.url) as client:
        created = client.create_job([path, image_bytes(20, 10)], prompt="cat . dog", box_threshold=0.1)
        assert created.total == 2
        finished = client.wait_job(created.id, poll_s=0.05, timeout_s=30)
        assert (finished.status, finished.done) == ("done", 2)
        coco = client.job_result(created.id)
        assert sorted(i["file_name"] for i in coco["images"]) == ["first.png", "image-00001.png"]
        assert client.cancel_job(created.id).status == "done"  # nothing left to cancel
        with pytest.raises(InvalidRequest):
            client.job("missing")

    async def via_async() -> str:
        async with AsyncClient(server.url) as client:
            job = await client.create_job([PNG], prompt="cat")
            return (await client.job(job.id)).id

    assert asyncio.run(via_async())
