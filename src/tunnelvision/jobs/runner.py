"""Works through stored jobs one image at a time at background priority, so interactive requests
go first. On start it simply continues: finished images are never redone."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from pathlib import Path

from tunnelvision.engine.engine import Engine
from tunnelvision.engine.scheduler import BACKGROUND
from tunnelvision.errors import DeadlineExceeded, Retryable, TunnelvisionError
from tunnelvision.jobs.store import JobStore
from tunnelvision.schemas import SegmentParams

log = logging.getLogger(__name__)
IDLE_POLL_S = 1.0


class JobRunner:
    def __init__(self, store: JobStore, engine: Callable[[], Engine | None]) -> None:
        self.store = store
        self.engine = engine
        self.wake = asyncio.Event()

    async def run_forever(self) -> None:
        while True:
            pending = await asyncio.to_thread(self.store.next_pending)
            engine = self.engine()
            if pending is None or engine is None:
                await self._sleep(IDLE_POLL_S)
                continue
            await self._process(engine, *pending)

    async def _sleep(self, seconds: float) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=seconds)

    async def _process(self, engine: Engine, job_id: str, index: int, path: str) -> None:
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is None or job.status not in ("queued", "running"):
            return
        await asyncio.to_thread(self.store.start_item, job_id, index)
        params = SegmentParams.model_validate({**job.options, "mask_format": "rle"})
        try:
            data = await asyncio.to_thread(Path(path).read_bytes)
            result = await engine.segment(data, params, priority=BACKGROUND)
        except (Retryable, DeadlineExceeded) as exc:  # busy or shutting down: the image stays pending
            await self._sleep(getattr(exc, "retry_after_s", 1.0))
            return
        except TunnelvisionError as exc:
            await self._finish(job_id, index, None, exc.message)
            return
        except Exception:
            log.exception("job %s image %d failed", job_id, index)
            await self._finish(job_id, index, None, "internal error")
            return
        await self._finish(job_id, index, result.model_dump_json(include={"image", "detections"}), None)

    async def _finish(self, job_id: str, index: int, result: str | None, error: str | None) -> None:
        await asyncio.to_thread(self.store.finish_item, job_id, index, result, error)
        job = await asyncio.to_thread(self.store.get, job_id)
        if job is not None and job.status not in ("queued", "running"):
            await asyncio.to_thread(self.store.delete_files, job_id)  # uploads no longer needed
