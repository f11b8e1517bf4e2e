"""Works through video jobs a chunk of frames at a time, at background priority.

Per chunk: decode its frames (CPU thread) -> track them (one device call: an interactive request
that arrives meanwhile waits at most this chunk) -> encode the masks (CPU thread) -> commit the
frames and the pass's new position in one transaction -> tell the live streams. Active videos take
turns chunk by chunk. After a restart a pass resumes at its first uncommitted frame: the tracker
is seeded with the objects committed on the frame before (engine/video.py). A deleted job's
session is closed before its next chunk would run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from tunnelvision.engine.engine import Engine
from tunnelvision.engine.scheduler import BACKGROUND
from tunnelvision.engine.video import (
    Chunk,
    FrameResult,
    Seed,
    SessionLost,
    Track,
    TrackedObject,
    TrackOptions,
    UserPrompt,
    prepare_chunk,
)
from tunnelvision.errors import Retryable, TunnelvisionError
from tunnelvision.jobs.runner import keep_stepping
from tunnelvision.jobs.store import ACTIVE
from tunnelvision.masks import decode_rle, encode_rle
from tunnelvision.schemas import RLE
from tunnelvision.video.decode import VideoLimits
from tunnelvision.video.events import VideoEvents
from tunnelvision.video.frames import FrameSource
from tunnelvision.video.store import CommittedFrame, PassRow, VideoRow, VideoStore

log = logging.getLogger(__name__)
IDLE_POLL_S = 1.0
RETRY_S = 1.0  # after a retryable failure (queue full, shutting down): the chunk is tried again
MAX_CHUNK_FAILURES = 3  # then the job fails with the reason
SWEEP_EVERY_S = 600.0


@dataclass
class Working:
    """What the runner keeps for one video between chunks (the tracker session among it)."""

    seq: int
    track: Track
    source: FrameSource
    failures: int = 0


class VideoRunner:
    def __init__(
        self,
        store: VideoStore,
        engine: Callable[[], Engine | None],
        events: VideoEvents,
        chunk_frames: int = 8,
        retention_s: float = 7 * 86400.0,
        chunk_timeout_s: float = 600.0,
        limits: VideoLimits | None = None,
    ) -> None:
        self.limits = limits or VideoLimits()
        self.store, self.engine, self.events = store, engine, events
        self.chunk_frames = chunk_frames
        self.retention_s = retention_s
        self.chunk_timeout_s = chunk_timeout_s
        self.wake = asyncio.Event()
        self._working: dict[str, Working] = {}
        self._last: str | None = None
        self._next_sweep = 0.0

    async def run_forever(self) -> None:
        await keep_stepping(self._step, "video")

    def close(self) -> None:
        for working in self._working.values():
            working.track.close()
            working.source.close()
        self._working.clear()

    async def _step(self) -> None:
        await self._sweep_if_due()
        engine = self.engine()
        found = await asyncio.to_thread(self.store.next_active, self._last)
        for video_id in await asyncio.to_thread(self._gone, list(self._working)):
            self._drop(video_id)
        if found is None or engine is None:
            await self._sleep(IDLE_POLL_S)
            return
        video, pass_row = found
        self._last = video.id
        await self._chunk(engine, video, pass_row)

    async def _sleep(self, seconds: float) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=seconds)

    async def _sweep_if_due(self) -> None:
        now = time.time()
        if now >= self._next_sweep:  # at least twice per retention time, so short ones expire on time
            self._next_sweep = now + min(SWEEP_EVERY_S, self.retention_s / 2)
            for video_id in await asyncio.to_thread(self.store.expire, now - self.retention_s):
                self._drop(video_id)

    def _gone(self, video_ids: list[str]) -> list[str]:
        """Those of `video_ids` deleted (or ended) since their last chunk: their sessions go."""
        rows = {video_id: self.store.get(video_id) for video_id in video_ids}
        return [video_id for video_id, row in rows.items() if row is None or row.status not in ACTIVE]

    def _drop(self, video_id: str) -> None:
        working = self._working.pop(video_id, None)
        if working is not None:
            working.track.close()
            working.source.close()

    # -- one chunk -----------------------------------------------------------------------------

    async def _chunk(self, engine: Engine, video: VideoRow, pass_row: PassRow) -> None:
        working = self._working_for(video, pass_row)
        indices = list(pass_row.remaining[: self.chunk_frames])
        try:
            results = await self._track(engine, working, video, pass_row, indices)
        except Retryable as exc:
            log.info("video %s: %s; trying again", video.id, exc.message)
            await asyncio.sleep(exc.retry_after_s or RETRY_S)
            return
        except TunnelvisionError as exc:
            await self._failed(video, working, exc.message)
            return
        except Exception as exc:  # a bug or a model error: a few tries, then the job says why
            working.failures += 1
            log.exception("video %s: tracking failed (try %d)", video.id, working.failures)
            working.track.close()
            if working.failures >= MAX_CHUNK_FAILURES:
                await self._failed(video, working, f"tracking failed: {type(exc).__name__}")
            else:
                await asyncio.sleep(RETRY_S)
            return
        encoded = await asyncio.to_thread(encode_frames, results)
        # Fewer frames than asked: the clip ended early (a declared length was an estimate).
        position = results[-1].frame + pass_row.step if len(results) == len(indices) else pass_row.stop
        track = working.track
        committed = await asyncio.to_thread(
            self.store.commit, video.id, pass_row.seq, encoded, position, track.next_id, track.labels
        )
        working.failures = 0
        self.events.publish(video.id, committed)
        if working.source.failure is not None:  # committed up to the damaged frame; no further
            await self._failed(video, working, working.source.failure.message)
            return
        if not range(position, pass_row.stop, pass_row.step):
            self._drop(video.id)  # the pass is done; the next one starts with its own session
            self.events.publish_status(video.id)

    async def _track(
        self, engine: Engine, working: Working, video: VideoRow, pass_row: PassRow, indices: list[int]
    ) -> list[FrameResult]:
        read = partial(self._prepared_chunk, engine, working, video, pass_row, indices)
        chunk = await asyncio.to_thread(read)
        try:
            return await engine.on_device(
                partial(working.track.run, chunk), self.chunk_timeout_s, BACKGROUND, affinity=video.id
            )
        except SessionLost:  # another device took the chunk: start again there from what is committed
            working.track.close()
            chunk = await asyncio.to_thread(read)  # without a session: seeded (a replay if resumed)
            return await engine.on_device(partial(working.track.run, chunk), self.chunk_timeout_s, BACKGROUND)

    async def _failed(self, video: VideoRow, working: Working, reason: str) -> None:
        log.warning("video %s failed: %s", video.id, reason)
        await asyncio.to_thread(self.store.fail, video.id, reason)
        self._drop(video.id)
        self.events.publish_status(video.id)

    def _working_for(self, video: VideoRow, pass_row: PassRow) -> Working:
        working = self._working.get(video.id)
        if working is not None and working.seq == pass_row.seq:
            return working
        self._drop(video.id)
        options = TrackOptions(**video.options["track"])
        track = Track(options, next_id=video.next_id, labels=dict(video.labels))
        working = Working(pass_row.seq, track, FrameSource(video.file, self.limits))
        self._working[video.id] = working
        return working

    def _prepared_chunk(
        self, engine: Engine, working: Working, video: VideoRow, pass_row: PassRow, indices: list[int]
    ) -> Chunk:
        """The chunk read and its frames prepared for the tracker (CPU work, in a thread)."""
        chunk = self._read_chunk(working, video, pass_row, indices)
        return prepare_chunk(chunk, engine.backends[0], working.track.options.pipeline)

    def _read_chunk(self, working: Working, video: VideoRow, pass_row: PassRow, indices: list[int]) -> Chunk:
        """The chunk's frames; when no session runs yet, with what to start it from."""
        step = pass_row.frames.index(indices[0])  # frames of the pass before this chunk
        prompts = (
            {pass_row.start: user_prompts(pass_row.prompts)} if pass_row.position == pass_row.start else {}
        )
        if working.track.session is not None:
            return Chunk(working.source.read(indices), prompts, step=step)
        if pass_row.position == pass_row.start:  # a pass begins: seeded with what is kept on its frame
            seed = Seed(self._kept_objects(video.id, pass_row))
            return Chunk(working.source.read(indices), prompts, seed=seed, step=step)
        previous = pass_row.position - pass_row.step  # a resumed pass: replay the last committed frame
        committed = self.store.frame(video.id, previous)
        seed = Seed(decode_objects(committed) if committed else [])
        frames = working.source.read([previous, *indices])
        return Chunk(frames, {}, seed=seed, replay_first=True, step=max(0, step - 1))

    def _kept_objects(self, video_id: str, pass_row: PassRow) -> list[TrackedObject]:
        """A correction's pass starts from the objects committed on its frame, less those it
        corrects (the first pass has none)."""
        committed = self.store.frame(video_id, pass_row.start) if pass_row.seq > 0 else None
        replaced = {p["object_id"] for p in pass_row.prompts.get("objects", [])}
        return [o for o in (decode_objects(committed) if committed else []) if o.object_id not in replaced]


def user_prompts(prompts: dict[str, Any]) -> list[UserPrompt]:
    """A pass's stored prompts (see api/routes/videos.py) as the engine takes them."""
    return [
        UserPrompt(
            int(p["object_id"]),
            str(p.get("label") or "object"),
            tuple(p["box"]) if p.get("box") else None,
            tuple(tuple(point) for point in p.get("points", [])),
            tuple(p.get("point_labels", [])),
        )
        for p in prompts.get("objects", [])
    ]


def encode_frames(results: list[FrameResult]) -> list[tuple[int, list[dict[str, Any]]]]:
    """Each frame's objects as stored and sent: id, label, score, box and RLE mask."""
    return [(result.frame, [encode_object(o) for o in result.objects]) for result in results]


def encode_object(tracked: TrackedObject) -> dict[str, Any]:
    return {
        "id": tracked.object_id,
        "label": tracked.label,
        "score": round(tracked.score, 4),
        "box": [round(v, 2) for v in tracked.box],
        "mask": encode_rle(tracked.mask).model_dump(),
    }


def decode_objects(committed: CommittedFrame) -> list[TrackedObject]:
    """A committed frame's objects with their masks as arrays again (to seed a new session)."""
    return [decode_object(o) for o in committed.objects]


def decode_object(stored: dict[str, Any]) -> TrackedObject:
    mask = decode_rle(RLE.model_validate(stored["mask"])).astype(np.bool_)
    x1, y1, x2, y2 = stored["box"]
    return TrackedObject(stored["id"], stored["label"], stored["score"], (x1, y1, x2, y2), mask)
