"""The live stream of a video job (api/routes/videos.py's event_stream) on a real store: a comment
line keeps an idle stream open (proxies close silent connections), a committed chunk wakes it at
once with its frames, and it ends after the job does."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

from tunnelvision.api.routes.videos import event_stream
from tunnelvision.jobs.store import JobStore
from tunnelvision.video.events import VideoEvents
from tunnelvision.video.store import VideoStore

INFO = {"width": 8, "height": 8, "frames": 2, "fps": 25.0}
OPTIONS = {
    "track": {"pipeline": "track"},
    "frames": {"start": 0, "end": None, "stride": 1},
    "initial_passes": 1,
}


class Connected:
    async def is_disconnected(self) -> bool:
        return False


async def next_event(stream: AsyncIterator[str]) -> str:
    return await asyncio.wait_for(anext(stream), timeout=5)


def test_an_idle_stream_sends_keepalives_then_frames_then_ends(tmp_path: Path) -> None:
    store = VideoStore(JobStore(tmp_path / "jobs"))
    clip = tmp_path / "clip.bin"
    clip.write_bytes(b"not decoded here")
    video_id = store.create("me", clip, ".mp4", OPTIONS, INFO, (range(0, 2), {}), (10**9, 10**9))
    state = SimpleNamespace(videos=store, video_events=VideoEvents())

    async def scenario() -> list[str]:
        stream = event_stream(state, video_id, 0, 0.05, Connected())  # type: ignore[arg-type]
        seen = [await next_event(stream) for _ in range(3)]  # retry, status, then silence
        commit = store.commit(video_id, 0, [(0, []), (1, [])], 2, 1, {})
        state.video_events.publish(video_id, commit)
        seen += [event async for event in stream]  # the frames, the final status, the end
        return seen

    events = asyncio.run(scenario())
    assert events[0].startswith("retry:")
    assert events[1].startswith("event: status")
    assert events[2] == ": keep-alive\n\n"  # nothing happened for keepalive_s
    frames = [e for e in events if e.startswith("id:")]
    assert [json.loads(e.split("data: ")[1])["frame"] for e in frames] == [0, 1]
    assert json.loads(events[-1].split("data: ")[1])["status"] == "done"
