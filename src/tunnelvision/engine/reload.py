"""Replacing a pipeline's weights while serving: the new backends are loaded beside the old ones
and warmed up outside the scheduler; Engine.reload then switches and retires the old ones. Also
the warm-up pass, which start-up runs too."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from tunnelvision.engine.backend import Backend, PipelineSummary
from tunnelvision.errors import ReloadFailed, TunnelvisionError
from tunnelvision.imaging import RGBImage
from tunnelvision.schemas import DetectParams, SegmentParams

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Swap:
    """What a reload's loader returns: the new backends (one per device, in the order of the
    current ones) and `retire`, told the old backends once their last request has finished, to
    free what only they held (embedding caches of models the new backends do not share)."""

    backends: Sequence[Backend]
    retire: Callable[[Sequence[Backend]], None]


# Called in a thread with the current backends; builds the new ones beside them (may take minutes).
Loader = Callable[[Sequence[Backend]], Swap]


@dataclass(frozen=True)
class Loaded:
    """When a pipeline's weights were loaded, and how many times (1: at start)."""

    generation: int
    at: datetime


@dataclass(frozen=True)
class Reloaded:
    name: str
    loaded: Loaded
    load_s: float
    warmup_s: float
    drained: bool  # every request on the old copy finished (within the deadline) before it was freed


def warmup_image() -> RGBImage:
    return np.full((480, 640, 3), 127, dtype=np.uint8)


def warmup_params(pipeline: PipelineSummary) -> DetectParams | None:
    """A request that runs every model of the pipeline once (None: nothing to warm up)."""
    text = {"prompt": "object", "box_threshold": 0.0, "max_detections": 1, "model": pipeline.name}
    if {"text", "masks"} <= pipeline.abilities:
        return SegmentParams(**text)
    if "masks" in pipeline.abilities and "boxes" in pipeline.abilities:
        return SegmentParams(boxes=[[0, 0, 64, 64]], model=pipeline.name)
    if "text" in pipeline.abilities:
        return DetectParams(**text)
    return None


def load_beside(load: Loader, current: Sequence[Backend]) -> Swap:
    """The loader's new backends, or ReloadFailed with its reason (for the admin who asked)."""
    try:
        swap = load(current)
    except ReloadFailed:
        raise
    except TunnelvisionError as exc:
        raise ReloadFailed(f"the new weights did not load: {exc.message}") from exc
    except Exception as exc:
        log.exception("reload: loading failed")
        raise ReloadFailed(f"the new weights did not load: {describe_failure(exc)}") from exc
    if len(swap.backends) != len(current):
        raise ReloadFailed(f"the loader made {len(swap.backends)} copies for {len(current)} devices")
    return swap


def warm_up_each(backends: Sequence[Backend], name: str) -> None:
    """One pass of pipeline `name` through each new backend, outside the scheduler: the copy is
    not serving yet, so it needs no queue, and the device workers go on serving meanwhile."""
    for backend in backends:
        try:
            warm_up(backend, name)
        except Exception as exc:
            log.exception("reload: the warm-up of '%s' failed", name)
            reason = describe_failure(exc)
            raise ReloadFailed(f"the new weights loaded but failed their warm-up: {reason}") from exc


def warm_up(backend: Backend, name: str) -> None:
    params = warmup_params(backend.info.pipeline(name))
    if params is None:
        return
    prepared = backend.prepare(warmup_image(), params)
    (raw,) = backend.run_batch([(prepared, params)])
    if isinstance(raw, BaseException):
        raise raw
    backend.finish(raw, params, prepared)


def retire_backends(retire: Callable[[Sequence[Backend]], None], backends: Sequence[Backend]) -> None:
    """A failure to free caches is logged, not answered: the new weights are serving already."""
    try:
        retire(backends)
    except Exception:
        log.exception("reload: retiring the old backends failed")


def describe_failure(exc: BaseException) -> str:
    """The exception's type and first line, bounded: for an admin's reload answer (the log has
    the traceback)."""
    first_line = (str(exc).splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first_line}"[:500]
