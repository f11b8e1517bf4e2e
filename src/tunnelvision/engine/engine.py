"""The engine as an async library: `async with Engine(...) as engine: await engine.segment(...)`.

decode + prepare (CPU pool) -> scheduler queue -> device worker -> finish (CPU pool).
The event loop only awaits; it never runs image or model code.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import numpy as np

from tunnelvision.drawing import annotate
from tunnelvision.engine.backend import Backend, BackendInfo
from tunnelvision.engine.cache import ByteLRU
from tunnelvision.engine.scheduler import INTERACTIVE, BatchObserver, Scheduler
from tunnelvision.errors import InvalidInput, NotFound
from tunnelvision.imaging import RGBImage, decode_image
from tunnelvision.schemas import (
    AnnotateParams,
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
    max_batch: int = 1
    batch_wait_ms: float = 0.0
    image_cache_bytes: int = 0  # decoded images kept for `image_id` requests


@dataclass(frozen=True)
class Annotation:
    content: bytes
    media_type: str
    image_id: str
    detections: int


@dataclass
class _Outcome:
    image: RGBImage
    image_id: str
    detections: list[Any]
    timings_ms: dict[str, float]


class Engine:
    def __init__(
        self, backends: Sequence[Backend], config: EngineConfig, on_batch: BatchObserver | None = None
    ) -> None:
        if not backends:
            raise ValueError("an engine needs at least one backend")
        self.config = config
        self.backends = list(backends)
        self.scheduler: Scheduler[Backend] = Scheduler(
            self.backends,
            config.max_queue,
            runner=run_timed_batch,
            max_batch=config.max_batch,
            batch_wait_s=config.batch_wait_ms / 1000,
            on_batch=on_batch,
            company_hint=lambda: self._preparing,
        )
        self._preparing = 0  # requests decoded or being prepared, not yet queued
        self.images: ByteLRU[RGBImage] = ByteLRU(config.image_cache_bytes)
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

    def cache_stats(self) -> dict[str, dict[str, int]]:
        embeddings: dict[str, int] = {}
        for backend in self.backends:  # one embedding cache per replica: add them up
            for name, value in backend.cache_stats().items():
                embeddings[name] = embeddings.get(name, 0) + value
        return {"embeddings": embeddings, "images": self.images.stats()}

    def device_memory(self) -> dict[str, int]:
        """Bytes allocated per device, where the backend can tell (CUDA)."""
        memory = {}
        for backend in self.backends:
            allocated = getattr(backend, "memory_allocated", lambda: None)()
            if allocated is not None:
                memory[backend.info.device] = int(allocated)
        return memory

    # -- requests --------------------------------------------------------------------------

    async def detect(self, image: bytes | None, params: DetectParams) -> DetectResponse:
        """`image` is the encoded file; None to use `params.image_id` from an earlier call."""
        outcome = await self._process(image, params)
        return DetectResponse(
            image=_image_info(outcome.image),
            image_id=outcome.image_id,
            detections=outcome.detections,
            timings_ms=outcome.timings_ms,
        )

    async def segment(
        self, image: bytes | None, params: SegmentParams, priority: int = INTERACTIVE
    ) -> SegmentResponse:
        """`priority`: BACKGROUND for batch jobs, which then yield to interactive requests."""
        outcome = await self._process(image, params, priority)
        detections = [d for d in outcome.detections if isinstance(d, Segmentation)]
        return SegmentResponse(
            image=_image_info(outcome.image),
            image_id=outcome.image_id,
            mask_format=params.mask_format,
            detections=detections,
            timings_ms=outcome.timings_ms,
        )

    async def annotate(self, image: bytes | None, params: AnnotateParams) -> Annotation:
        """The image with masks, boxes and labels drawn on it (PNG or JPEG)."""
        as_rle = params.model_copy(update={"mask_format": "rle"})
        outcome = await self._process(image, as_rle)
        picture = await self._on_cpu(partial(annotate, outcome.image, outcome.detections, params.format))
        return Annotation(picture, f"image/{params.format}", outcome.image_id, len(outcome.detections))

    async def warmup(self) -> None:
        """One pass through decode, both models and mask encoding, so the first user isn't slow."""
        image = np.full((480, 640, 3), 127, dtype=np.uint8)
        params = SegmentParams(prompt="object", box_threshold=0.0, max_detections=1)
        await self._process_decoded(image, "warmup", params, time.monotonic())

    async def _process(
        self, data: bytes | None, params: DetectParams, priority: int = INTERACTIVE
    ) -> _Outcome:
        started = time.monotonic()
        if data is None:
            image, image_id = self._cached_image(params.image_id or "")
        else:
            image, image_id = await self._on_cpu(
                partial(decode_image_with_id, data, self.config.max_image_pixels)
            )
            self.images.put(image_id, image, image.nbytes)
        decoded = time.monotonic()
        outcome = await self._process_decoded(image, image_id, params, started, priority)
        outcome.timings_ms["decode"] = _ms(decoded - started)
        return outcome

    def _cached_image(self, image_id: str) -> tuple[RGBImage, str]:
        image = self.images.get(image_id)
        if image is None:
            raise NotFound(
                f"image_id '{image_id}' is not in the cache (evicted or never sent): send the image again"
            )
        return image, image_id

    async def _process_decoded(
        self,
        image: RGBImage,
        image_id: str,
        params: DetectParams,
        started: float,
        priority: int = INTERACTIVE,
    ) -> _Outcome:
        deadline = started + self.config.deadline_s
        check_prompts_inside(image, params)
        t_prepare = time.monotonic()
        backend = self.backends[0]  # prepare/finish are CPU work: any replica's processors do
        self._preparing += 1
        try:
            prepared = await self._on_cpu(partial(backend.prepare, image, params, image_id))
            t_submit = time.monotonic()
            task = self.scheduler.submit(
                (prepared, params), deadline, priority, key=backend.batch_key(prepared, params)
            )
        finally:
            self._preparing -= 1
        raw, device_start, device_end = await self.scheduler.wait(task)
        detections = await self._on_cpu(partial(backend.finish, raw, params, prepared))
        done = time.monotonic()
        timings = {
            "prepare": _ms(t_submit - t_prepare),
            "queue": _ms(device_start - t_submit),
            "device": _ms(device_end - device_start),
            "finish": _ms(done - device_end),
            "total": _ms(done - started),
        }
        return _Outcome(image, image_id, detections, timings)

    async def _on_cpu(self, fn: Callable[[], T]) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._cpu, fn)


def run_timed_batch(backend: Backend, items: list[tuple[Any, DetectParams]]) -> list[Any]:
    """The scheduler's runner: one device pass for the batch, its start and end for each item."""
    start = time.monotonic()
    raws = backend.run_batch(items)
    end = time.monotonic()
    return [raw if isinstance(raw, BaseException) else (raw, start, end) for raw in raws]


def decode_image_with_id(data: bytes, max_pixels: int) -> tuple[RGBImage, str]:
    """The pixels, and an id for the content (what `image_id` and the caches are keyed by)."""
    return decode_image(data, max_pixels), hashlib.sha256(data).hexdigest()[:32]


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


def _image_info(image: RGBImage) -> ImageInfo:
    return ImageInfo(width=int(image.shape[1]), height=int(image.shape[0]))


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 2)
