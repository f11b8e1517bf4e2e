"""Video jobs through the Python client (`Client` and `AsyncClient`) against `tunnelvision serve`
with a tiny random SAM 2 video tracker: upload, the live event stream (in order, resumed after a
cut), waiting with progress (and by polling where the stream is refused), the results in every
format, a correction, deletion, and another key's video that does not exist for it."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from support import video_cli_server
from tunnelvision.client import AsyncClient, Client, EventReader, InvalidRequest
from tunnelvision.video.synthetic import write_moving_square_clip

FRAMES, WIDTH, HEIGHT = 12, 96, 64
BOX = [0.0, 20.0, 20.0, 40.0]  # the square on frame 0


@pytest.fixture(scope="module")
def server(
    tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, str]]:
    """(url, alice's key, bob's key), a `track` pipeline of a tiny random sam2-video checkpoint."""
    both = ["predict", "jobs"]
    with video_cli_server(tiny_models, tmp_path_factory.mktemp("video"), both, both) as (url, (alice, bob)):
        yield url, alice, bob


@pytest.fixture(scope="module")
def clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("clips") / "square.mp4"
    write_moving_square_clip(path, FRAMES, WIDTH, HEIGHT, fps=10)
    return path


def frame_count(mp4: bytes) -> int:
    with av.open(io.BytesIO(mp4), "r") as container:
        return len(list(container.decode(video=0)))


def check_results(results: list[Any], video_id: str) -> None:
    """The json, mot and mp4 results of a finished job on `clip` (one object, every frame)."""
    json_result, mot, mp4 = results
    assert isinstance(json_result, dict) and isinstance(mot, str) and isinstance(mp4, bytes)
    assert json_result["id"] == video_id and json_result["status"] == "done"
    assert [f["frame"] for f in json_result["frames"]] == list(range(FRAMES))
    (summary,) = json_result["objects"]
    assert (summary["id"], summary["first_frame"], summary["last_frame"]) == (1, 0, FRAMES - 1)
    lines = mot.splitlines()
    assert len(lines) == FRAMES and [line.split(",")[:2] for line in lines[:2]] == [["1", "1"], ["2", "1"]]
    assert frame_count(mp4) == FRAMES


def test_upload_follow_the_events_wait_and_read_every_format(
    server: tuple[str, str, str], clip: Path
) -> None:
    url, alice, _ = server
    with Client(url, alice) as client:
        status = client.track_video(clip, model="track", boxes=[BOX], frame=0)
        assert status["status"] in ("queued", "running") and status["frames_total"] == FRAMES
        assert status["video"] == {"width": WIDTH, "height": HEIGHT, "frames": FRAMES, "fps": 10.0}
        seen: list[dict[str, Any]] = []
        final = client.wait_video(status["id"], timeout_s=60, on_progress=seen.append)
        assert final["status"] == "done" and final["frames_done"] == FRAMES and final["progress"] == 1.0
        done = [s["frames_done"] for s in seen]
        assert done == sorted(done) and done[-1] == FRAMES and seen[-1]["status"] == "done"

        events = list(client.video_events(status["id"]))
        frames = [e for e in events if e["event"] == "frame"]
        assert [e["data"]["frame"] for e in frames] == list(range(FRAMES))  # in order, each once
        assert [int(e["id"]) for e in frames] == sorted(int(e["id"]) for e in frames)
        assert frames[0]["data"]["objects"][0]["id"] == 1 and frames[0]["data"]["objects"][0]["mask"]["size"]
        assert events[-1]["event"] == "status" and events[-1]["data"]["status"] == "done"
        resumed = [e for e in client.video_events(status["id"], frames[4]["id"]) if e["event"] == "frame"]
        assert [e["data"]["frame"] for e in resumed] == list(range(5, FRAMES))

        assert status["id"] in [v["id"] for v in client.videos()]
        results = [client.video_result(status["id"], fmt) for fmt in ("json", "mot", "mp4")]
        check_results(results, status["id"])


def test_a_correction_retracks_and_delete_removes_the_job(server: tuple[str, str, str], clip: Path) -> None:
    url, alice, _ = server
    with Client(url, alice) as client:
        video_id = client.track_video(clip.read_bytes(), model="track", points=[[10, 30, 1]])["id"]
        client.wait_video(video_id, timeout_s=60)
        corrected = client.correct_video(video_id, 4, box=[30, 20, 60, 44], label="square")
        assert corrected["corrections_pending"] == 1 or corrected["status"] == "done"
        assert client.wait_video(video_id, timeout_s=60)["status"] == "done"
        result = client.video_result(video_id)
        assert isinstance(result, dict)
        added = {o["id"]: o for o in result["objects"]}[2]
        assert (added["label"], added["first_frame"], added["last_frame"]) == ("square", 4, FRAMES - 1)

        with pytest.raises(InvalidRequest) as refused:
            client.correct_video(video_id, 4)  # neither a box nor points
        assert refused.value.status == 422
        client.delete_video(video_id)
        for call in (client.video, client.delete_video, client.video_result):
            with pytest.raises(InvalidRequest) as gone:
                call(video_id)
            assert gone.value.status == 404 and gone.value.code == "not_found"


def test_another_keys_video_does_not_exist_for_it(server: tuple[str, str, str], clip: Path) -> None:
    url, alice, bob = server
    with Client(url, alice) as owner, Client(url, bob) as other:
        video_id = owner.track_video(clip, model="track", boxes=[BOX])["id"]
        assert video_id not in [v["id"] for v in other.videos()]
        for call in (other.video, other.delete_video, lambda i: list(other.video_events(i))):
            with pytest.raises(InvalidRequest) as hidden:
                call(video_id)
            assert hidden.value.status == 404
        assert owner.wait_video(video_id, timeout_s=60)["status"] == "done"  # untouched by bob
        owner.delete_video(video_id)


def test_bad_uploads_are_refused_with_the_reason(server: tuple[str, str, str], clip: Path) -> None:
    url, alice, _ = server
    with Client(url, alice) as client:
        with pytest.raises(InvalidRequest, match="not both"):
            client.track_video(clip, model="track", boxes=[BOX], points=[[1, 1, 1]])
        with pytest.raises(InvalidRequest, match="text") as text:
            client.track_video(clip, model="track", prompt="square")  # sam2-video takes no text
        assert text.value.status == 422
        with pytest.raises(InvalidRequest):
            client.track_video(b"not a clip at all", model="track", boxes=[BOX])


class CutOnce(httpx.HTTPTransport):
    """The first event stream breaks after a few events, as a dropped connection does; every
    /events request's Last-Event-ID is kept."""

    def __init__(self) -> None:
        super().__init__()
        self.resumed_after: list[str | None] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        response = super().handle_request(request)
        if request.url.path.endswith("/events"):
            self.resumed_after.append(request.headers.get("last-event-id"))
            if len(self.resumed_after) == 1:
                response.stream = Cut(response.stream)
        return response


class Cut(httpx.SyncByteStream):
    def __init__(self, stream: Any) -> None:
        self.stream = stream

    def __iter__(self) -> Iterator[bytes]:
        sent = b""
        for chunk in self.stream:
            yield chunk[: len(chunk) // 2] if sent.count(b"id: ") >= 3 else chunk
            sent += chunk
            if sent.count(b"id: ") >= 4:  # in the middle of an event
                raise httpx.RemoteProtocolError("peer closed connection (cut by the test)")

    def close(self) -> None:
        self.stream.close()


def test_a_cut_stream_resumes_after_the_last_whole_event(server: tuple[str, str, str], clip: Path) -> None:
    url, alice, _ = server
    cutter = CutOnce()
    with Client(url, alice) as client:
        video_id = client.track_video(clip, model="track", boxes=[BOX])["id"]
        client.wait_video(video_id, timeout_s=60)
    with Client(url, alice, transport=cutter, backoff_s=0.01) as client:
        frames = [e["data"]["frame"] for e in client.video_events(video_id) if e["event"] == "frame"]
    assert frames == list(range(FRAMES))  # none lost, none twice
    assert len(cutter.resumed_after) == 2 and cutter.resumed_after[0] is None
    assert cutter.resumed_after[1] is not None and int(cutter.resumed_after[1]) >= 1


class NoStreams(httpx.HTTPTransport):
    """A proxy that refuses event streams (502)."""

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(502, text="bad gateway", request=request)
        return super().handle_request(request)


def test_wait_polls_where_the_stream_is_refused(server: tuple[str, str, str], clip: Path) -> None:
    url, alice, _ = server
    with Client(url, alice, transport=NoStreams()) as client:
        video_id = client.track_video(clip, model="track", boxes=[BOX])["id"]
        seen: list[dict[str, Any]] = []
        final = client.wait_video(video_id, timeout_s=60, on_progress=seen.append, poll_s=0.1)
        assert final["status"] == "done" and seen[-1]["status"] == "done"
        client.delete_video(video_id)


def test_the_async_client_does_the_same(server: tuple[str, str, str], clip: Path) -> None:
    url, alice, bob = server

    async def run() -> None:
        async with AsyncClient(url, alice) as client, AsyncClient(url, bob) as other:
            status = await client.track_video(clip, model="track", boxes=[BOX])
            seen: list[dict[str, Any]] = []
            final = await client.wait_video(status["id"], timeout_s=60, on_progress=seen.append)
            assert final["status"] == "done" and seen[-1]["frames_done"] == FRAMES
            events = [e async for e in client.video_events(status["id"])]
            assert [e["data"]["frame"] for e in events if e["event"] == "frame"] == list(range(FRAMES))
            assert events[-1]["data"]["status"] == "done"
            assert status["id"] in [v["id"] for v in await client.videos()]
            assert (await client.video(status["id"]))["status"] == "done"
            results = [await client.video_result(status["id"], fmt) for fmt in ("json", "mot", "mp4")]
            check_results(results, status["id"])
            corrected = await client.correct_video(status["id"], 2, box=[10, 20, 30, 44], label="again")
            assert corrected["id"] == status["id"]
            assert (await client.wait_video(status["id"], timeout_s=60))["objects"] == 2
            with pytest.raises(InvalidRequest):
                await other.video(status["id"])
            await client.delete_video(status["id"])
            with pytest.raises(InvalidRequest):
                await client.video(status["id"])

    asyncio.run(run())


def test_event_lines_are_parsed_as_server_sent_events() -> None:
    reader = EventReader()
    lines = [
        "retry: 2000",
        "",
        ": keep-alive",
        "",
        "id: 7",
        "event: frame",
        'data: {"frame":',
        "data: 3}",
        "",
    ]
    parsed = [event for line in lines if (event := reader.feed(line)) is not None]
    assert parsed == [
        {"event": "", "id": None, "data": "keep-alive"},
        {"event": "frame", "id": "7", "data": {"frame": 3}},
    ]
    assert reader.retry_s == 2.0 and reader.last_event_id == "7"
    assert reader.feed("data:plain text") is None and reader.feed("") == {
        "event": "message",
        "id": None,
        "data": "plain text",
    }
    reader.feed("id: 8")
    assert reader.connect()["Last-Event-ID"] == "7"  # a half-received event is dropped
    assert reader.feed("") is None and reader.last_event_id == "7"
