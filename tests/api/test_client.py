"""The Python client against a real server: inputs, typed results, errors, retries."""

from __future__ import annotations

import asyncio
import inspect
import io
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from support import FakeBackend, ThreadServer, image_bytes, make_settings
from tunnelvision import AsyncClient, Client
from tunnelvision.client import APIError, AuthenticationError, InvalidRequest, Overloaded
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


async def _wait_job_async(url: str) -> tuple[str, int, bool]:
    async with AsyncClient(url) as client:
        job = await client.create_job([PNG, PNG], prompt="cat")
        finished = await client.wait_job(job.id, poll_s=0.05, timeout_s=30)
        return finished.status, finished.done, await client.ready()


def test_async_client_waits_for_jobs_and_says_when_ready(server: ThreadServer) -> None:
    assert asyncio.run(_wait_job_async(server.url)) == ("done", 2, True)


def public_methods(cls: type) -> dict[str, inspect.Signature]:
    return {
        name: inspect.signature(member)
        for name, member in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_")
    }


# Methods that stream: a generator in Client, an async generator (`async for`) in AsyncClient.
STREAMS = {"video_events"}


def test_both_clients_have_the_same_public_methods_and_arguments() -> None:
    sync, asynchronous = public_methods(Client), public_methods(AsyncClient)
    assert sorted(sync) == sorted(asynchronous)
    for name, signature in sync.items():
        if name in STREAMS:
            assert asynchronous[name].parameters == signature.parameters, name
            assert asynchronous[name].return_annotation == f"Async{signature.return_annotation}", name
            assert inspect.isasyncgenfunction(getattr(AsyncClient, name)), name
            assert inspect.isgeneratorfunction(getattr(Client, name)), name
            continue
        assert asynchronous[name] == signature, name  # parameters, defaults, annotations, return
        assert inspect.iscoroutinefunction(getattr(AsyncClient, name)), name
        assert not inspect.iscoroutinefunction(getattr(Client, name)), name


@pytest.mark.parametrize("prompt", ["1984", "null", "true", "-7", "[1]"])
def test_a_prompt_that_reads_as_json_stays_text_with_an_image_id(server: ThreadServer, prompt: str) -> None:
    with Client(server.url) as client:
        first = client.segment(PNG, prompt="cat")
        again = client.segment(image_id=first.image_id, prompt=prompt)
        assert [d.label for d in again.detections] == [prompt]
        found = client.detect(image_id=first.image_id, prompt=prompt, box_threshold=np.float32(0.25))
        assert found.detections[0].label == prompt


def test_numpy_boxes_are_sent_in_both_encodings(server: ThreadServer) -> None:
    boxes = np.array([[0, 0, 10, 10], [5, 5, 20, 20]])
    with Client(server.url) as client:
        first = client.segment(PNG, boxes=boxes)
        again = client.segment(image_id=first.image_id, boxes=boxes)
    assert first.detections[0].label is again.detections[0].label is None  # box prompts: no label


IMPORT_PROBE = """
import sys
import tunnelvision
light = not {"httpx", "numpy", "PIL", "tunnelvision.client"} & set(sys.modules)
from tunnelvision import (
    APIError, AsyncClient, AuthenticationError, Client, ConnectionFailed, InvalidRequest,
    Overloaded, ServerError, TransportError,
)
import tunnelvision.client as client
same = all(getattr(client, name) is getattr(tunnelvision, name) for name in tunnelvision.__all__[:-1])
bases = all(issubclass(kind, APIError) for kind in (AuthenticationError, ConnectionFailed,
            InvalidRequest, Overloaded, ServerError, TransportError))
print(light, same, bases, issubclass(ConnectionFailed, TransportError))
"""


def test_the_error_classes_come_from_the_top_level_package_which_stays_light() -> None:
    done = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True"] * 4
    with pytest.raises(AttributeError, match="NoSuchThing"):
        import tunnelvision

        tunnelvision.NoSuchThing  # noqa: B018
    assert issubclass(InvalidRequest, APIError)
