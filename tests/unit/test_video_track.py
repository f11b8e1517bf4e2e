"""engine/video.py's Track with a scripted tracker: stable ids across sessions. A text tracker
picks its own ids; after a restart (a new session seeded on the last committed frame) its objects
must keep the ids committed before, matched by mask overlap, and only new objects get new ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import pytest

from tunnelvision.engine.backend import ModelPart, PipelineSummary
from tunnelvision.engine.video import Chunk, Seed, SessionLost, Track, TrackOptions, VideoPipeline
from tunnelvision.errors import UnsupportedPrompt
from tunnelvision.models.video_tracking import ObjectPrompt, TrackedFrame, boxes_of

H, W = 20, 30


def square(x: int, y: int, side: int = 6) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[y : y + side, x : x + side] = True
    return mask


class ScriptedSession:
    """Answers each push with the next scripted frame: {own id: mask}."""

    def __init__(
        self, script: list[dict[int, np.ndarray]], pushed: list[Sequence[ObjectPrompt]], pixels: list[Any]
    ) -> None:
        self.script, self.pushed, self.pixels = list(script), pushed, pixels

    def push(
        self, frame: np.ndarray, prompts: Sequence[ObjectPrompt] = (), pixels: Any = None
    ) -> TrackedFrame:
        self.pushed.append(prompts)
        self.pixels.append(pixels)
        found = self.script.pop(0)
        masks = np.stack(list(found.values())) if found else np.zeros((0, H, W), bool)
        return TrackedFrame(list(found), [0.9] * len(found), masks, boxes_of(masks), [0] * len(found))

    def close(self) -> None:
        pass


class ScriptedTextTracker:
    role: ClassVar[str] = "video_tracker"
    family: ClassVar[str] = "scripted"
    video_abilities: ClassVar[frozenset[str]] = frozenset({"video-text"})

    def __init__(self, *scripts: list[dict[int, np.ndarray]]) -> None:
        self.scripts, self.pushed = list(scripts), []  # type: ignore[var-annotated]
        self.pixels: list[Any] = []  # what each push got as prepared pixels
        self.sessions = 0

    def start(self, height: int, width: int, phrases: Sequence[str] = ()) -> ScriptedSession:
        self.sessions += 1
        return ScriptedSession(self.scripts.pop(0), self.pushed, self.pixels)

    def prepare(self, frame: np.ndarray) -> str:
        return f"prepared {frame.shape}"


class Backend:
    def __init__(self, tracker: Any) -> None:
        part = ModelPart("video_tracker", "scripted", "scripted", "cpu", "float32")
        summary = PipelineSummary("text", frozenset({"video-text"}), (part,))
        self.pipelines = {"text": VideoPipeline("text", tracker, None, summary)}


def frames(*indices: int) -> list[tuple[int, np.ndarray]]:
    return [(i, np.zeros((H, W, 3), np.uint8)) for i in indices]


def ids(results: list[Any]) -> list[list[int]]:
    return [sorted(o.object_id for o in r.objects) for r in results]


def test_a_restarted_text_tracker_keeps_the_committed_ids_by_overlap() -> None:
    first = [{7: square(2, 2)}, {7: square(3, 2), 9: square(20, 10)}]
    # After the restart the new session numbers the same two objects the other way round, and
    # finds a third one on the next frame.
    second = [{1: square(20, 10), 2: square(3, 2)}, {1: square(21, 10), 2: square(4, 2), 3: square(10, 12)}]
    tracker = ScriptedTextTracker(first, second)
    backend = Backend(tracker)

    before = Track(TrackOptions("text", ("cat",)))
    results = before.run(Chunk(frames(0, 1), seed=Seed([])), backend, 0)  # type: ignore[arg-type]
    assert ids(results) == [[1], [1, 2]]  # stable ids are ours, from 1
    committed = results[-1].objects

    after = Track(TrackOptions("text", ("cat",)), next_id=before.next_id, labels=dict(before.labels))
    resumed = after.run(Chunk(frames(1, 2), seed=Seed(committed), replay_first=True), backend, 0)  # type: ignore[arg-type]
    assert [r.frame for r in resumed] == [2]  # the replayed frame is not answered again
    (frame2,) = resumed
    by_id = {o.object_id: o for o in frame2.objects}
    assert set(by_id) == {1, 2, 3}  # the two committed objects kept their ids; the new one is 3
    assert by_id[1].mask[2:8, 4:10].all() and by_id[2].mask[10:16, 21:27].all()
    assert {o.label for o in frame2.objects} == {"cat"}


def test_a_chunk_on_another_device_asks_for_a_seed() -> None:
    tracker = ScriptedTextTracker([{1: square(2, 2)}, {1: square(2, 2)}])
    backend, track = Backend(tracker), Track(TrackOptions("text", ("cat",)))
    track.run(Chunk(frames(0), seed=Seed([])), backend, 0)  # type: ignore[arg-type]
    with pytest.raises(SessionLost):
        track.run(Chunk(frames(1)), backend, 1)  # type: ignore[arg-type]


def test_box_prompts_on_a_text_tracker_are_refused() -> None:
    from tunnelvision.engine.video import UserPrompt

    tracker = ScriptedTextTracker([{}])
    chunk = Chunk(frames(0), {0: [UserPrompt(1, "box", (1, 1, 5, 5))]}, seed=Seed([]))
    with pytest.raises(UnsupportedPrompt):
        Track(TrackOptions("text", ("cat",))).run(chunk, Backend(tracker), 0)  # type: ignore[arg-type]


def test_only_a_backend_holding_the_tracker_serves_video() -> None:
    from tunnelvision.engine.video import serves_video

    assert serves_video(Backend(ScriptedTextTracker()), "text")  # type: ignore[arg-type]
    assert not serves_video(Backend(ScriptedTextTracker()), "other")  # type: ignore[arg-type]
    assert not serves_video(object(), "text")  # type: ignore[arg-type]  # a Ray ingress's backend


def test_frames_prepared_on_the_cpu_reach_the_tracker_that_prepared_them() -> None:
    from tunnelvision.engine.video import prepare_chunk

    tracker = ScriptedTextTracker([{}, {}])
    backend = Backend(tracker)
    chunk = prepare_chunk(Chunk(frames(0, 1), seed=Seed([])), backend, "text")  # type: ignore[arg-type]
    Track(TrackOptions("text", ("cat",))).run(chunk, backend, 0)  # type: ignore[arg-type]
    assert tracker.pixels == [f"prepared {(H, W, 3)}"] * 2  # the device step did not prepare them
    reloaded = Backend(ScriptedTextTracker([{}, {}]))  # another tracker since: it prepares its own
    Track(TrackOptions("text", ("cat",))).run(chunk, reloaded, 0)  # type: ignore[arg-type]
    assert reloaded.pipelines["text"].tracker.pixels == [None, None]  # type: ignore[attr-defined]
