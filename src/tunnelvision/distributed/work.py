"""What crosses the Ray hop, and the replica's side of it (no Ray here, so it runs in any test).

The ingress sends a batch of `Item`s (decoded pixels, the request's parameters and what is left
of its deadline); a replica answers one `Answer` per item after prepare -> device pass -> finish
on its own backend.
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from tunnelvision.engine.backend import Backend, Check, Deadline
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


def run_items(backend: Backend, items: list[Item], device: DeviceLock | None = None) -> list[Answer]:
    """prepare -> device (grouped by the backend's batch key) -> finish, each item on its own
    deadline: an item whose deadline has passed never reaches the device."""
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
        raws = _run_group(backend, [(prepared[i], items[i].params) for i in group], device)
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
    backend: Backend, batch: list[tuple[Any, DetectParams]], device: DeviceLock | None
) -> list[Any]:
    """One device pass; if it raises, each item alone, so one bad item stays one failure."""
    if not batch:
        return []
    held = device.held() if device is not None else nullcontext()
    try:
        with held:
            return backend.run_batch(batch)
    except Exception as exc:
        if len(batch) == 1:
            return [exc]
    return [_run_group(backend, [one], device)[0] for one in batch]


def _finish(backend: Backend, raw: Any, item: Item, prepared: Any, deadline: Deadline) -> Answer:
    if isinstance(raw, BaseException):
        return Answer(raw, {})
    try:
        deadline.check()
        detections = backend.finish(raw, item.params, prepared, deadline.check)
    except Exception as exc:
        return Answer(exc, {})
    return Answer(detections, backend.device_steps(prepared))
