"""The engine as an async library: `async with Engine(...) as engine: await engine.segment(...)`.

decode + prepare (CPU pool) -> scheduler queue -> device worker -> finish (CPU pool).
The event loop only awaits; it never runs image or model code.

What is served (one backend per device) is a `Serving`; a reload puts a new one in place while
the requests already on their way finish on the one they started with (see `Engine.reload`).
"""

from __future__ import annotations

import asyncio
import gc
import hashlib
import hmac
import logging
import secrets
import time
import weakref
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any, TypeVar

from tunnelvision.drawing import annotate
from tunnelvision.engine.backend import Backend, BackendInfo, Deadline, PipelineSummary, is_device_lost
from tunnelvision.engine.cache import ByteLRU
from tunnelvision.engine.reload import (
    Loaded,
    Loader,
    Reloaded,
    load_beside,
    retire_backends,
    warm_up_each,
    warmup_image,
    warmup_params,
)
from tunnelvision.engine.scheduler import (
    BACKGROUND,
    INTERACTIVE,
    BatchObserver,
    FailureObserver,
    Scheduler,
)
from tunnelvision.errors import (
    DeadlineExceeded,
    InvalidInput,
    NotFound,
    ReloadInProgress,
    RequestTooCostly,
)
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
ANONYMOUS = "anonymous"  # the owner of requests made without authentication


@dataclass(frozen=True)
class EngineConfig:
    max_queue: int = 64
    deadline_s: float = 100.0
    max_image_pixels: int = 40_000_000
    cpu_threads: int = 2
    max_batch: int = 1
    batch_wait_ms: float = 0.0
    image_cache_bytes: int = 0  # decoded images kept for `image_id` requests
    max_mask_pixels: int = 2_000_000_000  # masks x image pixels one request may make


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
    deadline: Deadline


class Serving:
    """What the engine serves at one moment: a backend per device, in the device workers' order.
    A request keeps the Serving it started with to its end; `requests` counts those under way."""

    def __init__(self, number: int, backends: Sequence[Backend]) -> None:
        self.number = number  # part of every batch key: one batch never mixes two Servings
        self.backends = tuple(backends)
        self.requests = 0
        self.idle = asyncio.Event()  # set while no request is under way (the event loop's only)
        self.idle.set()

    def enter(self) -> None:
        self.requests += 1
        self.idle.clear()

    def leave(self) -> None:
        self.requests -= 1
        if self.requests == 0:
            self.idle.set()


@dataclass(frozen=True)
class _Submitted:
    """A scheduler item. Its Serving is held weakly: the request's coroutine holds it until the
    answer, and an idle worker still holding its last batch must not keep replaced models alive."""

    serving: weakref.ref[Serving]
    prepared: Any
    params: DetectParams


# Work that is not an image request (a chunk of video frames): `fn(backend, device_index)` runs
# on the device worker alone, queued at its priority like any request.
DeviceFn = Callable[[Backend, int], T]


@dataclass(frozen=True)
class _DeviceCall:
    serving: weakref.ref[Serving]
    fn: DeviceFn[Any]


class Engine:
    """`owner` names who sent a request (an API key's principal, or ANONYMOUS): an image and its
    embedding are found again only by the owner who sent them (see `image_id_for`).

    `on_failure` is told (from a worker thread) when the device can no longer serve: the last
    worker ended, or the device was lost (a CUDA error other than out-of-memory)."""

    def __init__(
        self,
        backends: Sequence[Backend],
        config: EngineConfig,
        on_batch: BatchObserver | None = None,
        on_failure: FailureObserver | None = None,
    ) -> None:
        if not backends:
            raise ValueError("an engine needs at least one backend")
        self.config = config
        self._serving = Serving(0, backends)
        started = datetime.now(timezone.utc)
        self.loaded = {p.name: Loaded(1, started) for p in self.info.pipelines}
        self._reloading = False
        # Workers know their device by index; each batch runs on its own Serving's backend there.
        self.scheduler: Scheduler[int] = Scheduler(
            list(range(len(backends))),
            config.max_queue,
            runner=run_on_device,
            max_batch=config.max_batch,
            batch_wait_s=config.batch_wait_ms / 1000,
            on_batch=on_batch,
            company_hint=lambda: self._preparing,
            is_fatal=is_device_lost,
            on_failure=on_failure,
        )
        self._preparing = 0  # requests decoded or being prepared, not yet queued
        self.images: ByteLRU[RGBImage] = ByteLRU(config.image_cache_bytes)  # by (owner, image_id)
        self._id_key = secrets.token_bytes(32)  # per process: ids are never comparable across runs
        self._cpu = ThreadPoolExecutor(config.cpu_threads, thread_name_prefix="cpu")

    @property
    def backends(self) -> tuple[Backend, ...]:
        """What new requests go to: one backend per device."""
        return self._serving.backends

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

    async def detect(
        self, image: bytes | None, params: DetectParams, owner: str = ANONYMOUS
    ) -> DetectResponse:
        """`image` is the encoded file; None to use `params.image_id` from an earlier call."""
        outcome = await self._process(image, params, owner)
        return DetectResponse(
            image=_image_info(outcome.image),
            image_id=outcome.image_id,
            detections=outcome.detections,
            timings_ms=outcome.timings_ms,
        )

    async def segment(
        self,
        image: bytes | None,
        params: SegmentParams,
        owner: str = ANONYMOUS,
        priority: int = INTERACTIVE,
    ) -> SegmentResponse:
        """`priority`: BACKGROUND for batch jobs, which then yield to interactive requests."""
        outcome = await self._process(image, params, owner, priority)
        detections = [d for d in outcome.detections if isinstance(d, Segmentation)]
        return SegmentResponse(
            image=_image_info(outcome.image),
            image_id=outcome.image_id,
            mask_format=params.mask_format,
            detections=detections,
            timings_ms=outcome.timings_ms,
        )

    async def annotate(
        self, image: bytes | None, params: AnnotateParams, owner: str = ANONYMOUS
    ) -> Annotation:
        """The image with masks, boxes and labels drawn on it (PNG or JPEG)."""
        as_rle = params.model_copy(update={"mask_format": "rle"})
        outcome = await self._process(image, as_rle, owner)
        draw = partial(annotate, outcome.image, outcome.detections, params.format)
        picture = await self._on_cpu(draw, outcome.deadline)
        return Annotation(picture, f"image/{params.format}", outcome.image_id, len(outcome.detections))

    @property
    def devices(self) -> list[str]:
        return [backend.info.device for backend in self.backends]

    def check_request(self, params: DetectParams) -> None:
        """UnknownModel or UnsupportedPrompt, before any work: the pipeline exists and can do it."""
        self.info.pipeline(params.model).check(params)

    async def warmup(self) -> None:
        """One pass through decode, every model and mask encoding, so the first user isn't slow."""
        image = warmup_image()
        for pipeline in self.info.pipelines:
            params = warmup_params(pipeline)
            if params is not None:
                await self._process_decoded(image, "", params, Deadline.after(self.config.deadline_s))

    async def _process(
        self, data: bytes | None, params: DetectParams, owner: str, priority: int = INTERACTIVE
    ) -> _Outcome:
        started = time.monotonic()
        deadline = Deadline.after(self.config.deadline_s, started)
        self.check_request(params)
        if data is None:
            image, image_id = self._cached_image(owner, params.image_id or "")
        else:
            decode = partial(decode_image_with_digest, data, self.config.max_image_pixels)
            image, digest = await self._on_cpu(decode, deadline)
            image_id = image_id_for(self._id_key, owner, digest)
            self.images.put((owner, image_id), image, image.nbytes)
        decoded = time.monotonic()
        outcome = await self._process_decoded(image, image_id, params, deadline, priority)
        outcome.timings_ms["decode"] = _ms(decoded - started)
        return outcome

    def _cached_image(self, owner: str, image_id: str) -> tuple[RGBImage, str]:
        """Another owner's image_id is as unknown as one never given out: the same 404."""
        image = self.images.get((owner, image_id))
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
        deadline: Deadline,
        priority: int = INTERACTIVE,
    ) -> _Outcome:
        check_prompts_inside(image, params)
        check_mask_work(image, params, self.config.max_mask_pixels)
        deadline.check()
        serving = self._serving  # to the end, even if a reload replaces it meanwhile
        serving.enter()
        try:
            return await self._run_on(serving, image, image_id, params, deadline, priority)
        finally:
            serving.leave()

    async def _run_on(
        self,
        serving: Serving,
        image: RGBImage,
        image_id: str,
        params: DetectParams,
        deadline: Deadline,
        priority: int,
    ) -> _Outcome:
        t_prepare = time.monotonic()
        backend = serving.backends[0]  # prepare/finish are CPU work: any replica's processors do
        self._preparing += 1
        try:
            prepare = partial(backend.prepare, image, params, image_id, deadline.check)
            prepared = await self._on_cpu(prepare, deadline)
            t_submit = time.monotonic()
            key = backend.batch_key(prepared, params)
            task = self.scheduler.submit(
                _Submitted(weakref.ref(serving), prepared, params),
                deadline.at,
                priority,
                key=None if key is None else (serving.number, key),
                affinity=image_id or None,  # the replica that holds (or will hold) its embedding
            )
        finally:
            self._preparing -= 1
        try:
            raw, device_start, device_end = await self.scheduler.wait(task)
        except asyncio.CancelledError:  # the client left: a backend that sent it away may call it back
            abandon = getattr(backend, "abandon", None)
            if abandon is not None:
                abandon(prepared)
            raise
        deadline.check()
        finish = partial(backend.finish, raw, params, prepared, deadline.check)
        detections = await self._on_cpu(finish, deadline)
        done = time.monotonic()
        timings = {
            "prepare": _ms(t_submit - t_prepare),
            "queue": _ms(device_start - t_submit),
            "device": _ms(device_end - device_start),
            "finish": _ms(done - device_end),
            "total": _ms(done - deadline.started),
            **backend.device_steps(prepared),
        }
        return _Outcome(image, image_id, detections, timings, deadline)

    async def on_device(
        self, fn: DeviceFn[T], timeout_s: float, priority: int = BACKGROUND, affinity: Any = None
    ) -> T:
        """`fn(backend, device_index)` on a device worker, queued at `priority` (background by
        default: interactive requests go first) and dropped unrun if not started within
        `timeout_s`. For long device work cut in pieces (video chunks); keep CPU work outside."""
        serving = self._serving
        serving.enter()
        try:
            deadline = time.monotonic() + timeout_s
            call = _DeviceCall(weakref.ref(serving), fn)
            task = self.scheduler.submit(call, deadline, priority, key=None, affinity=affinity)
            result, _, _ = await self.scheduler.wait(task)
            return result  # type: ignore[no-any-return]
        finally:
            serving.leave()

    # -- replacing weights -----------------------------------------------------------------

    async def reload(self, name: str, load: Loader) -> Reloaded:
        """Replace pipeline `name` with no downtime. `load` builds the new backends beside the
        old ones in a thread (the event loop and the device workers go on serving); the new
        pipeline is warmed up on every device; then new requests go to it while those already
        under way finish on the old backends, which are retired once the last has finished (or
        after a deadline's time). Any failure before the switch leaves the old ones serving.
        ReloadInProgress while another reload runs; NotFound for a pipeline not served."""
        self.served_pipeline(name)
        if self._reloading:  # checked and set with no await between: one reload at a time
            raise ReloadInProgress(f"another reload is under way; retry once it has finished ('{name}')")
        self._reloading = True
        try:
            return await self._reload(name, load)
        finally:
            self._reloading = False

    def served_pipeline(self, name: str) -> PipelineSummary:
        """The pipeline named `name` as it serves now; NotFound naming those served."""
        for pipeline in self.info.pipelines:
            if pipeline.name == name:
                return pipeline
        known = ", ".join(p.name for p in self.info.pipelines)
        raise NotFound(f"no model '{name}' here; this server serves: {known}")

    async def _reload(self, name: str, load: Loader) -> Reloaded:
        started = time.monotonic()
        swap = await asyncio.to_thread(load_beside, load, self.backends)
        loaded = time.monotonic()
        await asyncio.to_thread(warm_up_each, swap.backends, name)
        warmed = time.monotonic()
        old, self._serving = self._serving, Serving(self._serving.number + 1, swap.backends)
        self.loaded[name] = Loaded(self.loaded[name].generation + 1, datetime.now(timezone.utc))
        log.info("reloaded '%s' (generation %d)", name, self.loaded[name].generation)
        drained = await _wait_idle(old, self.config.deadline_s)
        retire, backends = swap.retire, old.backends
        del old, swap  # the last references: what only the old backends held can now go
        await asyncio.to_thread(retire_backends, retire, backends)
        del backends
        await asyncio.to_thread(gc.collect)  # model objects in reference cycles, too
        return Reloaded(name, self.loaded[name], loaded - started, warmed - loaded, drained)

    async def _on_cpu(self, fn: Callable[[], T], deadline: Deadline) -> T:
        """Run `fn` in the CPU pool; past the deadline the request answers at once. The thread
        cannot be interrupted: `fn` stops at its next `deadline.check`, or its result is dropped."""
        work = asyncio.get_running_loop().run_in_executor(self._cpu, fn)
        try:
            return await asyncio.wait_for(work, timeout=deadline.remaining())
        except TimeoutError:
            raise deadline.exceeded() from None


def run_on_device(device: int, items: list[_Submitted | _DeviceCall]) -> list[Any]:
    """The scheduler's runner for the worker of device number `device`. A batch holds one
    Serving's items (their key names it); a device call is always alone (its key is None)."""
    serving = items[0].serving()
    if serving is None:  # every waiter has gone, and its Serving was replaced: nobody to answer
        return [DeadlineExceeded("abandoned by its client before it ran") for _ in items]
    if isinstance(items[0], _DeviceCall):
        return [run_timed_call(items[0].fn, serving.backends[device], device)]
    requests = [(item.prepared, item.params) for item in items if isinstance(item, _Submitted)]
    return run_timed_batch(serving.backends[device], requests)


def run_timed_call(fn: DeviceFn[Any], backend: Backend, device: int) -> Any:
    start = time.monotonic()
    try:
        result = fn(backend, device)
    except Exception as exc:  # this call's failure only; the worker goes on
        return exc
    return (result, start, time.monotonic())


def run_timed_batch(backend: Backend, items: list[tuple[Any, DetectParams]]) -> list[Any]:
    """The scheduler's runner: one device pass for the batch, its start and end for each item."""
    start = time.monotonic()
    raws = backend.run_batch(items)
    end = time.monotonic()
    return [raw if isinstance(raw, BaseException) else (raw, start, end) for raw in raws]


async def _wait_idle(serving: Serving, timeout_s: float) -> bool:
    """True once no request is under way on `serving`; False after `timeout_s` (requests stop
    within their deadline anyway: after it, nobody waits for them)."""
    try:
        await asyncio.wait_for(serving.idle.wait(), timeout_s)
    except TimeoutError:
        return False
    return True


def decode_image_with_digest(data: bytes, max_pixels: int) -> tuple[RGBImage, bytes]:
    """The pixels, and the SHA-256 of the file (what `image_id_for` turns into an id)."""
    return decode_image(data, max_pixels), hashlib.sha256(data).digest()


def image_id_for(key: bytes, owner: str, digest: bytes) -> str:
    """An id for this owner's image: the same owner sending the same file gets the same id (and
    cache hits); another owner gets another id, and without the process's key an id tells
    nothing about the content (a bare hash would confirm that an image was seen before)."""
    message = owner.encode("utf-8", "surrogatepass") + b"\0" + digest
    return hmac.new(key, message, hashlib.sha256).hexdigest()[:32]


def check_mask_work(image: RGBImage, params: DetectParams, max_mask_pixels: int) -> None:
    """Every mask is upscaled to the image's size and encoded: bound masks x pixels up front."""
    if not isinstance(params, SegmentParams):
        return
    masks = len(params.boxes) if params.boxes else 1 if params.points else params.max_detections
    height, width = image.shape[:2]
    work = masks * width * height
    if work > max_mask_pixels:
        raise RequestTooCostly(
            f"up to {masks} masks of {width}x{height} pixels is {work} mask pixels, over this "
            f"server's {max_mask_pixels}: lower max_detections, send fewer boxes or a smaller image"
        )


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
