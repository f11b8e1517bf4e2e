"""Works through stored jobs one image at a time at background priority, so interactive requests
go first. Active jobs take turns, image by image, so one slow or failing job never holds up the
others; an image gets `max_attempts` tries (a crash mid-image counts), then it is recorded as
failed with the reason. On start it simply continues: finished images are never redone.
Finished jobs are deleted, results and all, `retention_s` after they finish."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from tunnelvision.engine.engine import Engine
from tunnelvision.engine.scheduler import BACKGROUND
from tunnelvision.errors import DeadlineExceeded, DeviceOutOfMemory, Retryable, TunnelvisionError
from tunnelvision.jobs.store import ACTIVE, JobRow, JobStore, PendingItem
from tunnelvision.schemas import SegmentParams

log = logging.getLogger(__name__)
IDLE_POLL_S = 1.0
SWEEP_EVERY_S = 600.0  # how often finished jobs past their retention are looked for
STORE_RETRY_FIRST_S = 0.5  # after a database or disk error; doubled each time, up to the max
STORE_RETRY_MAX_S = 60.0
CRASHED = "the server stopped while working on it"


class JobRunner:
    def __init__(
        self,
        store: JobStore,
        engine: Callable[[], Engine | None],
        max_attempts: int = 3,
        retention_s: float = 7 * 86400.0,
    ) -> None:
        self.store = store
        self.engine = engine
        self.max_attempts = max_attempts
        self.retention_s = retention_s
        self.wake = asyncio.Event()
        self._last_job: str | None = None  # whose turn it was: the next image comes from another job
        self._next_sweep = 0.0

    async def run_forever(self) -> None:
        await keep_stepping(self._step, "job")

    async def _step(self) -> None:
        await self._sweep_if_due()
        engine = self.engine()
        pending = await asyncio.to_thread(self.store.next_pending, self._last_job)
        if pending is None or engine is None:
            await self._sleep(IDLE_POLL_S)
            return
        self._last_job = pending.job_id
        await self._process(engine, pending)

    async def _sleep(self, seconds: float) -> None:
        self.wake.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.wake.wait(), timeout=seconds)

    async def _sweep_if_due(self) -> None:
        now = time.time()
        if now < self._next_sweep:
            return
        self._next_sweep = now + min(SWEEP_EVERY_S, self.retention_s / 2)
        expired = await asyncio.to_thread(self.store.expire, now - self.retention_s)
        if expired:
            log.info("deleted %d finished jobs older than %g s", len(expired), self.retention_s)

    async def _process(self, engine: Engine, item: PendingItem) -> None:
        job = await asyncio.to_thread(self.store.get, item.job_id)
        if job is None or job.status not in ACTIVE:
            return
        if item.attempts >= self.max_attempts:  # each ended with the server gone, or was retried
            await self._give_up(item, item.attempts, item.error or CRASHED)
            return
        await asyncio.to_thread(self.store.start_item, item.job_id, item.index)
        try:
            data = await asyncio.to_thread(Path(item.path).read_bytes)
        except OSError:
            await self._finish(item, None, "the stored image is missing or unreadable")
            return
        await self._segment(engine, job, item, data)

    async def _segment(self, engine: Engine, job: JobRow, item: PendingItem, data: bytes) -> None:
        try:
            params = SegmentParams.model_validate({**job.options, "mask_format": "rle"})
            result = await engine.segment(data, params, owner=job.owner, priority=BACKGROUND)
        except (DeviceOutOfMemory, DeadlineExceeded) as exc:  # this image may pass on another try
            await self._retry_later(item, exc)
            return
        except Retryable as exc:  # busy or stopping: not this image's fault, the try is given back
            await asyncio.to_thread(self.store.release_item, item.job_id, item.index)
            await self._sleep(exc.retry_after_s)
            return
        except TunnelvisionError as exc:
            await self._finish(item, None, exc.message)
            return
        except Exception:
            log.exception("job %s image %d failed", item.job_id, item.index)
            await self._finish(item, None, "internal error")
            return
        await self._finish(item, result.model_dump_json(include={"image", "detections"}), None)

    async def _retry_later(self, item: PendingItem, exc: TunnelvisionError) -> None:
        attempts = item.attempts + 1
        if attempts >= self.max_attempts:
            await self._give_up(item, attempts, exc.message)
            return
        await asyncio.to_thread(self.store.retry_item, item.job_id, item.index, exc.message)
        # Meanwhile the other jobs take their turns; a pause lets the device's memory settle.
        await self._sleep(min(getattr(exc, "retry_after_s", 0.0), IDLE_POLL_S))

    async def _give_up(self, item: PendingItem, attempts: int, reason: str) -> None:
        log.warning(
            "job %s image %d failed %d times; giving up: %s", item.job_id, item.index, attempts, reason
        )
        await self._finish(item, None, f"failed {attempts} times: {reason}")

    async def _finish(self, item: PendingItem, result: str | None, error: str | None) -> None:
        await asyncio.to_thread(self.store.finish_item, item.job_id, item.index, result, error)
        job = await asyncio.to_thread(self.store.get, item.job_id)
        if job is not None and job.status not in ACTIVE:
            await asyncio.to_thread(self.store.delete_files, item.job_id)  # uploads no longer needed


async def keep_stepping(step: Callable[[], Awaitable[None]], what: str) -> None:
    """`step` forever, one at a time; the loop outlives database and disk errors (and bugs),
    backing off. `what` names the runner in the log."""
    failures = 0
    while True:
        try:
            await step()
            failures = 0
            continue
        except (sqlite3.Error, OSError) as exc:  # one line: it may repeat for a while
            failures += 1
            error = f"{type(exc).__name__}: {exc}"
            log.error("%s store failed (%s); retrying in %.1f s", what, error, backoff_s(failures))
        except Exception:
            failures += 1
            log.exception("%s runner step failed; retrying in %.1f s", what, backoff_s(failures))
        await asyncio.sleep(backoff_s(failures))


def backoff_s(failures: int) -> float:
    """Seconds to wait after this many failures in a row: doubling, up to a minute."""
    return min(STORE_RETRY_MAX_S, STORE_RETRY_FIRST_S * 2.0 ** (failures - 1))
