"""What crosses the Ray hop, and the replica's side of it (no Ray here, so it runs in any test).

The ingress sends a batch of `Item`s (decoded pixels, the request's parameters and what is left
of its deadline); a replica answers one `Answer` per item after prepare -> device pass -> finish
on its own backend.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Hashable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from tunnelvision.engine.backend import Backend, Check, Deadline
from tunnelvision.engine.reload import warm_up
from tunnelvision.errors import DeadlineExceeded
from tunnelvision.imaging import RGBImage
from tunnelvision.schemas import Detection, DetectParams


@dataclass
class Item:
    """One request's device work, as sent to a replica. `budget_s`: what is left of its deadline
    when sent (clocks are per process: a remaining time, not a moment, crosses the hop)."""

    image: RGBImage
    params: DetectParams
    image_id: str
    budget_s: float
    steps: dict[str, float] = field(default_factory=dict)  # the replica's device_steps, once back


@dataclass(frozen=True)
class Answer:
    """The replica's answer for one item: detections, or the domain error that stopped it."""

    detections: list[Detection] | BaseException
    steps: dict[str, float]


@dataclass(frozen=True)
class Reply:
    """A replica's answer to one call: an Answer per item, and the replica's own numbers then
    (its id, counters and embedding cache), which the ingress keeps per replica for /readyz and
    /metrics without ever asking a replica on its own."""

    answers: list[Answer]
    replica: dict[str, Any]


class Abandoned(DeadlineExceeded):
    """The answer for an item whose call was cancelled before its device pass: every client of
    its batch had gone, so no one reads it."""


def abandoned() -> Abandoned:
    return Abandoned("abandoned by its client before it ran")


def affinity_id(items: list[Item]) -> str:
    """The image_id most items of a batch reuse ('' for none): the replica holding its
    embedding is the one to ask."""
    ids = Counter(item.image_id for item in items if item.image_id)
    return ids.most_common(1)[0][0] if ids else ""


class ReplicaStats:
    """What a replica counts, read by any thread: calls, items, device passes, items skipped
    because their call was cancelled, and its warm-up."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counts = {"calls": 0, "items": 0, "device_passes": 0, "cancelled_items": 0, "warmups": 0}
        self.warmup_s = 0.0

    def add(self, **counts: int) -> None:
        with self._lock:
            for name, value in counts.items():
                self.counts[name] += value

    def warmed(self, seconds: float) -> None:
        with self._lock:
            self.counts["warmups"] += 1
            self.warmup_s = round(seconds, 3)

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            return {**self.counts, "warmup_s": self.warmup_s}


def warm_up_all(backend: Backend, stats: ReplicaStats) -> None:
    """One pass of every pipeline, in the replica's constructor: Serve sends a replica no
    traffic until its constructor returns, so no user waits on a cold replica, whether it is
    one of the first or one that autoscaling added."""
    started = time.monotonic()
    for pipeline in backend.info.pipelines:
        warm_up(backend, pipeline.name)
    stats.warmed(time.monotonic() - started)


def deadline_of(check: Check, fallback_s: float) -> Deadline:
    """The request's Deadline behind `check` (the engine passes `deadline.check`); a fresh one of
    `fallback_s` for callers without a deadline (warm-up, tests)."""
    owner = getattr(check, "__self__", None)
    return owner if isinstance(owner, Deadline) else Deadline.after(fallback_s)


class DeviceLock:
    """One device pass at a time on a replica; prepare and finish of other batches run meanwhile."""

    def __init__(self) -> None:
        self._lock = threading.Lock()

    def held(self) -> AbstractContextManager[Any]:
        return self._lock


def run_items(
    backend: Backend,
    items: list[Item],
    device: DeviceLock | None = None,
    cancelled: threading.Event | None = None,
    stats: ReplicaStats | None = None,
) -> list[Answer]:
    """prepare -> device (grouped by the backend's batch key) -> finish, each item on its own
    deadline: an item whose deadline has passed never reaches the device, nor does any item once
    `cancelled` is set (the ingress cancelled the call: every client of the batch has gone)."""
    answers = _run_items(backend, items, device, cancelled or threading.Event(), stats)
    if stats is not None:
        skipped = sum(1 for a in answers if isinstance(a.detections, Abandoned))
        stats.add(calls=1, items=len(items), cancelled_items=skipped)
    return answers


def _run_items(
    backend: Backend,
    items: list[Item],
    device: DeviceLock | None,
    cancelled: threading.Event,
    stats: ReplicaStats | None,
) -> list[Answer]:
    deadlines = [Deadline.after(item.budget_s) for item in items]
    prepared: dict[int, Any] = {}
    answers: dict[int, Answer] = {}
    for i, item in enumerate(items):
        try:
            deadlines[i].check()
            prepared[i] = backend.prepare(item.image, item.params, item.image_id, deadlines[i].check)
        except Exception as exc:  # a domain error (or a bug) answers this item only
            answers[i] = Answer(exc, {})
    for group in _groups(backend, items, prepared):
        group = _still_wanted(group, deadlines, answers)
        batch = [(prepared[i], items[i].params) for i in group]
        raws = _run_group(backend, batch, device, cancelled, stats)
        for i, raw in zip(group, raws, strict=True):
            answers[i] = _finish(backend, raw, items[i], prepared[i], deadlines[i])
    return [answers[i] for i in range(len(items))]


def _groups(backend: Backend, items: list[Item], prepared: dict[int, Any]) -> Iterator[list[int]]:
    """Items that may share a device pass (equal batch keys); a None key goes alone."""
    by_key: dict[Hashable, list[int]] = {}
    for i, ready in prepared.items():
        key = backend.batch_key(ready, items[i].params)
        if key is None:
            yield [i]
        else:
            by_key.setdefault(key, []).append(i)
    yield from by_key.values()


def _still_wanted(group: list[int], deadlines: list[Deadline], answers: dict[int, Answer]) -> list[int]:
    """The group's items whose deadline has not passed; the others are answered now."""
    wanted = []
    for i in group:
        if deadlines[i].remaining() > 0:
            wanted.append(i)
        else:
            answers[i] = Answer(deadlines[i].exceeded(), {})
    return wanted


def _run_group(
    backend: Backend,
    batch: list[tuple[Any, DetectParams]],
    device: DeviceLock | None,
    cancelled: threading.Event,
    stats: ReplicaStats | None,
) -> list[Any]:
    """One device pass; if it raises, each item alone, so one bad item stays one failure.
    Cancellation is checked once the device is ours: a cancelled call waiting behind another
    batch gives the device up without using it."""
    if not batch:
        return []
    held = device.held() if device is not None else nullcontext()
    try:
        with held:
            if cancelled.is_set():
                return [abandoned() for _ in batch]
            if stats is not None:
                stats.add(device_passes=1)
            return backend.run_batch(batch)
    except Exception as exc:
        if len(batch) == 1:
            return [exc]
    return [_run_group(backend, [one], device, cancelled, stats)[0] for one in batch]


def _finish(backend: Backend, raw: Any, item: Item, prepared: Any, deadline: Deadline) -> Answer:
    if isinstance(raw, BaseException):
        return Answer(raw, {})
    try:
        deadline.check()
        detections = backend.finish(raw, item.params, prepared, deadline.check)
    except Exception as exc:
        return Answer(exc, {})
    return Answer(detections, backend.device_steps(prepared))
