"""The engine as an async library: `async with Engine(...) as engine: await engine.segment(...)`.

decode + prepare (CPU pool) -> scheduler queue -> device worker -> finish (CPU pool).
The event loop only awaits; it never runs image or model code.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from tunnelvision.engine.backend import Backend, BackendInfo
from tunnelvision.engine.scheduler import INTERACTIVE, Scheduler
from tunnelvision.errors import DeadlineExceeded, InvalidInput
from tunnelvision.imaging import RGBImage, decode_image
from tunnelvision.schemas import (
    DetectParams,
    DetectResponse,
    ImageInfo,
    Segmentation,
    SegmentParams,
    SegmentResponse,
)

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class EngineConfig:
    max_queue: int = 64
    deadline_s: float = 100.0
    max_image_pixels: int = 40_000_000
    cpu_threads: int = 2


@dataclass
class _Outcome:
    image: RGBImage
    detections: list[Any]
    timings_ms: dict[str, float]


class Engine:
    def __init__(self, backends: Sequence[Backend], config: EngineConfig) -> None:
        if not backends:
            raise ValueError("an engine needs at least one backend")
        self.config = config
        self.backends = list(backends)
        self.scheduler: Scheduler[Backend] = Scheduler(self.backends, config.max_queue)
        self._cpu = ThreadPoolExecutor(config.cpu_threads, thread_name_prefix="cpu")

    @property
    def info(self) -> BackendInfo:
        return self.backends[0].info

    async def __aenter__(self) -> Engine:
        self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def start(self) -> None:
        self.scheduler.start()

    def begin_shutdown(self) -> None:
        """Safe to call early (on SIGTERM): queued requests fail now, running ones finish."""
        self.scheduler.begin_shutdown()

    async def close(self) -> None:
        self.begin_shutdown()
        await asyncio.to_thread(self.scheduler.join, self.config.deadline_s)
        self._cpu.shutdown(wait=False, cancel_futures=True)

    def stats(self) -> dict[str, Any]:
        return self.scheduler.stats()

    # -- requests --------------------------------------------------------------------------

    async def detect(self, image: bytes, params: DetectParams) -> DetectResponse:
        outcome = await self._process(image, params)
        return DetectResponse(
            image=_image_info(outcome.image), detections=outcome.detections, timings_ms=outcome.timings_ms
        )

    async def segment(self, image: bytes, params: SegmentParams) -> SegmentResponse:
        outcome = await self._process(image, params)
        detections = [d for d in outcome.detections if isinstance(d, Segmentation)]
        return SegmentResponse(
            image=_image_info(outcome.image),
            mask_format=params.mask_format,
            detections=detections,
            timings_ms=outcome.timings_ms,
        )

    async def warmup(self) -> None:
        """One pass through decode, both models and mask encoding, so the first user isn't slow."""
        image = np.full((480, 640, 3), 127, dtype=np.uint8)
        params = SegmentParams(prompt="object", box_threshold=0.0, max_detections=1)
        await self._process_decoded(image, params, time.monotonic())

    async def _process(self, data: bytes, params: DetectParams) -> _Outcome:
        started = time.monotonic()
        image = await self._on_cpu(partial(decode_image, data, self.config.max_image_pixels))
        decoded = time.monotonic()
        outcome = await self._process_decoded(image, params, started)
        outcome.timings_ms["decode"] = _ms(decoded - started)
        return outcome

    async def _process_decoded(self, image: RGBImage, params: DetectParams, started: float) -> _Outcome:
        deadline = started + self.config.deadline_s
        check_prompts_inside(image, params)
        t_prepare = time.monotonic()
        backend = self.backends[0]  # prepare/finish are CPU work: any replica's processors do
        prepared = await self._on_cpu(partial(backend.prepare, image, params))
        t_submit = time.monotonic()
        raw, device_start, device_end = await self.scheduler.run(
            partial(_timed_run, prepared=prepared, params=params),
            timeout_s=_remaining(deadline),
            priority=INTERACTIVE,
        )
        detections = await self._on_cpu(partial(backend.finish, raw, params, prepared))
        done = time.monotonic()
        timings = {
            "prepare": _ms(t_submit - t_prepare),
            "queue": _ms(device_start - t_submit),
            "device": _ms(device_end - device_start),
            "finish": _ms(done - device_end),
            "total": _ms(done - started),
        }
        return _Outcome(image, detections, timings)

    async def _on_cpu(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn)


def _timed_run(backend: Backend, prepared: Any, params: DetectParams) -> tuple[Any, float, float]:
    start = time.monotonic()
    raw = backend.run(prepared, params)
    return raw, start, time.monotonic()


def check_prompts_inside(image: RGBImage, params: DetectParams) -> None:
    """Boxes and points must lie inside the image (a box may touch its edges)."""
    if not isinstance(params, SegmentParams):
        return
    height, width = image.shape[:2]
    for i, (_, _, x2, y2) in enumerate(params.boxes or []):
        if x2 > width or y2 > height:
            raise InvalidInput(f"box {i} reaches outside the {width}x{height} image")
    for i, (x, y, _) in enumerate(params.points or []):
        if x >= width or y >= height:
            raise InvalidInput(f"point {i} lies outside the {width}x{height} image")


def _remaining(deadline: float) -> float:
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise DeadlineExceeded("deadline passed before the request reached the queue")
    return remaining


def _image_info(image: RGBImage) -> ImageInfo:
    return ImageInfo(width=int(image.shape[1]), height=int(image.shape[0]))


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
