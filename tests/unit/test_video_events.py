"""Video jobs on a real store, without models: the live stream (a comment line keeps an idle stream
open, a committed chunk wakes it at once with its frames, it ends after the job does), and the
runner sending a chunk again after its session moved."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from tunnelvision.api.routes.videos import event_stream
from tunnelvision.engine.video import SessionLost
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


class MovedEngine:
    """An engine whose first device call lands on a device without the session (SessionLost)."""

    def __init__(self) -> None:
        self.backends = [object()]  # holds no tracker: frames are not prepared ahead
        self.chunks: list[Any] = []

    async def on_device(self, fn: Any, timeout_s: float, priority: int, affinity: Any = None) -> list[Any]:
        self.chunks.append(fn.args[0])
        if len(self.chunks) == 1:
            raise SessionLost("on another device")
        return []


def test_a_resumed_chunk_sent_again_after_session_lost_replays_its_frame_once(tmp_path: Path) -> None:
    from tunnelvision.video.runner import VideoRunner
    from tunnelvision.video.synthetic import write_moving_square_clip

    store = VideoStore(JobStore(tmp_path / "jobs"))
    clip = write_moving_square_clip(tmp_path / "clip.mp4", 6, 32, 32)
    options = {**OPTIONS, "track": {"pipeline": "track", "phrases": []}}
    video_id = store.create(
        "me", clip, ".mp4", options, {**INFO, "frames": 6}, (range(0, 6), {}), (10**9,) * 2
    )
    store.commit(video_id, 0, [(0, [])], 1, 1, {})  # frame 0 committed: the pass resumes at 1
    video, pass_row = store.next_active(None)  # type: ignore[misc]
    runner = VideoRunner(store, lambda: None, VideoEvents())
    engine = MovedEngine()

    async def track() -> None:
        working = runner._working_for(video, pass_row)
        await runner._track(engine, working, video, pass_row, [1, 2])  # type: ignore[arg-type]

    asyncio.run(track())
    assert [[index for index, _ in chunk.frames] for chunk in engine.chunks] == [[0, 1, 2], [0, 1, 2]]
    assert all(chunk.replay_first and chunk.seed is not None for chunk in engine.chunks)
