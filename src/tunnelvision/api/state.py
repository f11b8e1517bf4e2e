"""The server's life: loading -> warming up -> ready -> shutting down (or failed)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence
from typing import Any

from tunnelvision.config import PipelineSpec, Settings, parse_pipeline
from tunnelvision.engine.backend import Backend, PipelineSummary
from tunnelvision.engine.engine import Engine, EngineConfig
from tunnelvision.engine.reload import Reloaded, Swap
from tunnelvision.errors import InvalidInput, ModelUnavailable, NotReady, ShuttingDown, WorkerUnavailable
from tunnelvision.jobs.runner import JobRunner
from tunnelvision.jobs.store import JobStore
from tunnelvision.metrics import Metrics
from tunnelvision.schemas import DetectParams
from tunnelvision.video.decode import VideoLimits
from tunnelvision.video.events import VideoEvents
from tunnelvision.video.runner import VideoRunner
from tunnelvision.video.store import VideoStore

log = logging.getLogger(__name__)

BackendFactory = Callable[[Settings], Sequence[Backend]]
# Loads one pipeline anew beside the current backends (see models.factory.replace_pipeline).
Reloader = Callable[[Settings, PipelineSpec, Sequence[Backend]], Swap]


class AppState:
    def __init__(
        self, settings: Settings, backend_factory: BackendFactory, reloader: Reloader | None = None
    ) -> None:
        self.settings = settings
        self.backend_factory = backend_factory
        self.reloader = reloader  # None: models.factory's, imported at the first reload (it needs torch)
        self.engine: Engine | None = None
        self.phase = "starting"
        self.failure: str | None = None
        # Called with the reason when models cannot load, or the device is lost after: `serve`
        # uses it to exit non-zero, so systemd or Docker restart the process.
        self.on_fatal: Callable[[str], None] | None = None
        self.metrics = Metrics(self.snapshot)
        self.jobs = JobStore(settings.data_dir / "jobs")
        self.job_runner = JobRunner(
            self.jobs,
            lambda: self.engine if self.not_ready_reason() is None else None,
            max_attempts=settings.job_max_attempts,
            retention_s=settings.jobs_retention_s,
        )
        self.videos = VideoStore(self.jobs)
        self.video_events = VideoEvents()
        self.video_runner = VideoRunner(
            self.videos,
            lambda: self.engine if self.not_ready_reason() is None else None,
            self.video_events,
            chunk_frames=settings.video_chunk_frames,
            retention_s=settings.jobs_retention_s,
            chunk_timeout_s=settings.deadline_s,
            limits=video_limits(settings),
        )

    async def load(self) -> None:
        try:
            self.phase = "loading models"
            backends = await asyncio.to_thread(self.backend_factory, self.settings)
            self.engine = Engine(
                backends,
                engine_config(self.settings),
                on_batch=self.metrics.on_batch,
                on_failure=self._from_worker(asyncio.get_running_loop()),
            )
            self.engine.start()
            if self.settings.warmup:
                self.phase = "warming up"
                await self.engine.warmup()
            if self.phase in ("loading models", "warming up"):  # not if shutdown began meanwhile
                self.phase = "ready"
                log.info("ready: %s", self.engine.info)
        except ModelUnavailable as exc:
            self._fail(exc.message)
        except Exception as exc:
            log.exception("start-up failed")
            self._fail(f"start-up failed: {type(exc).__name__}: {exc}")

    def _fail(self, reason: str) -> None:
        self.phase, self.failure = "failed", reason
        log.error("%s", reason)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def _from_worker(self, loop: asyncio.AbstractEventLoop) -> Callable[[str], None]:
        """The engine's failure callback, on a worker thread: hop onto the loop."""

        def device_failed(reason: str) -> None:
            with contextlib.suppress(RuntimeError):  # the loop has closed: nothing to tell
                loop.call_soon_threadsafe(self._device_failed, reason)

        return device_failed

    def _device_failed(self, reason: str) -> None:
        """The engine has failed its waiters; not ready from now on, and the process is done
        (on_fatal) so that it restarts with a fresh device."""
        if self.phase != "ready":  # shutting down anyway
            return
        self.failure = reason
        log.error("%s", reason)
        if self.on_fatal is not None:
            self.on_fatal(reason)

    def begin_shutdown(self) -> None:
        if self.phase != "failed":
            self.phase = "shutting down"
        if self.engine is not None:
            self.engine.begin_shutdown()

    async def close(self) -> None:
        self.begin_shutdown()
        self.video_runner.close()
        if self.engine is not None:
            await self.engine.close()

    def not_ready_reason(self) -> str | None:
        if self.phase == "ready" and self.failure is not None:
            return self.failure
        if self.phase == "ready" and self.engine is not None and not self.engine.scheduler.healthy:
            return "the device worker has stopped"
        if self.phase == "failed":
            return self.failure
        return None if self.phase == "ready" else self.phase

    def ready_engine(self) -> Engine:
        """The engine, or the reason why requests cannot be served right now."""
        reason = self.not_ready_reason()
        if reason is None and self.engine is not None:
            return self.engine
        if self.phase == "shutting down":
            raise ShuttingDown("server is shutting down; retry shortly", 5.0)
        if self.phase == "ready":  # the reason's exception text is for the log, not the client
            raise WorkerUnavailable("not serving: the device worker has stopped; retry after a restart", 30.0)
        raise NotReady(f"not ready: {reason}", 5.0)

    def check_request(self, params: DetectParams) -> None:
        """The request's pipeline exists and can answer it (checked once the models are known;
        before that, the engine checks when the work runs)."""
        if self.engine is not None:
            self.engine.check_request(params)

    async def reload(self, name: str, source: str | None) -> Reloaded:
        """New weights for pipeline `name` (from `source`, a SPEC; None: its current sources),
        swapped in with no downtime; the old copy serves on if they fail to load."""
        engine = self.ready_engine()
        spec = reload_spec(engine.served_pipeline(name), source)
        reloader, settings = self.reloader or default_reloader(), self.settings
        return await engine.reload(name, lambda current: reloader(settings, spec, current))

    def stats(self) -> dict[str, Any]:
        return self.engine.stats() if self.engine is not None else {}

    def snapshot(self) -> dict[str, Any]:
        """Everything /metrics reports at a scrape."""
        engine = self.engine
        return {
            "ready": self.not_ready_reason() is None,
            "queue": self.stats(),
            "caches": engine.cache_stats() if engine is not None else {},
            "device_memory": engine.device_memory() if engine is not None else {},
            "replicas": self.replica_stats(),
        }

    def replica_stats(self) -> dict[str, dict[str, Any]]:
        """Ray mode: each replica's last reported numbers (from the status snapshot; never blocks)."""
        for backend in self.engine.backends if self.engine is not None else ():
            report = getattr(backend, "cluster_status", None)
            if callable(report):
                return dict((report() or {}).get("replica_stats") or {})
        return {}


def reload_spec(pipeline: PipelineSummary, source: str | None) -> PipelineSpec:
    """What to load for `pipeline`: `source` as `--pipeline NAME=SPEC` takes SPEC, or the
    sources it serves from now (their files may have been replaced)."""
    if source is None:
        return PipelineSpec(pipeline.name, tuple(model.source for model in pipeline.models))
    try:
        return parse_pipeline(f"{pipeline.name}={source}")
    except ValueError as exc:
        raise InvalidInput(f"source: {exc}") from None


def default_reloader() -> Reloader:
    from tunnelvision.models.factory import replace_pipeline

    return replace_pipeline


def video_limits(settings: Settings) -> VideoLimits:
    return VideoLimits(
        max_bytes=settings.max_body_bytes,
        max_duration_s=settings.video_max_duration_s,
        max_frames=settings.video_max_frames,
        max_width=settings.video_max_width,
        max_height=settings.video_max_height,
    )


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        max_queue=settings.max_queue,
        deadline_s=settings.deadline_s,
        max_image_pixels=settings.max_image_pixels,
        cpu_threads=settings.cpu_threads,
        max_batch=settings.max_batch,
        batch_wait_ms=settings.batch_wait_ms,
        image_cache_bytes=settings.image_cache_bytes,
        max_mask_pixels=settings.max_mask_pixels,
    )
