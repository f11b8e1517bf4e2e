"""Bounded priority queue in front of one exclusive worker thread per model replica (device).

A task moves queued -> running -> done | failed, or queued -> dropped (deadline, cancelled,
shutdown). Its future is resolved exactly once. Dropped tasks never reach the device.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tunnelvision.errors import (
    DeadlineExceeded,
    QueueFull,
    ShuttingDown,
    TunnelvisionError,
    WorkerUnavailable,
)

log = logging.getLogger(__name__)

R = TypeVar("R")  # a model replica: what the device work runs on
T = TypeVar("T")

INTERACTIVE = 0  # priorities: lower runs first
BACKGROUND = 10


@dataclass(eq=False)
class Task(Generic[R, T]):
    work: Callable[[R], T]
    deadline: float
    priority: int
    enqueued_at: float
    future: Future[T] = field(default_factory=Future)
    state: str = "queued"


class Scheduler(Generic[R]):
    """Thread-safe; `submit` never blocks, `run` is the asyncio face."""

    def __init__(
        self,
        replicas: Sequence[R],
        max_queue: int,
        clock: Callable[[], float] = time.monotonic,
        name: str = "device",
    ) -> None:
        self._replicas = list(replicas)
        self._max_queue = max_queue
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, Task[R, Any]]] = []
        self._order = itertools.count()
        self._queued = 0
        self._running = 0
        self._accepting = True
        self._alive = 0
        self._threads: list[threading.Thread] = []
        self._counts: Counter[str] = Counter()
        self._service_s = 0.0  # moving average of device time per task

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for index, replica in enumerate(self._replicas):
            thread = threading.Thread(
                target=self._worker_main, args=(replica,), name=f"{self._name}-{index}", daemon=True
            )
            self._threads.append(thread)
            self._alive += 1
            thread.start()

    def begin_shutdown(self) -> None:
        """Stop admitting, fail everything queued; the running tasks finish."""
        with self._cond:
            self._accepting = False
            dropped = self._drain_queue("shutdown")
            self._cond.notify_all()
        for task in dropped:
            task.future.set_exception(ShuttingDown("server is shutting down; retry shortly"))

    def join(self, timeout_s: float | None = None) -> bool:
        """Wait for the workers to finish their current task; True when all have."""
        end = None if timeout_s is None else self._clock() + timeout_s
        for thread in self._threads:
            thread.join(None if end is None else max(0.0, end - self._clock()))
        return not any(t.is_alive() for t in self._threads)

    @property
    def healthy(self) -> bool:
        return self._alive > 0

    # -- submitting ----------------------------------------------------------------------

    def submit(self, work: Callable[[R], T], deadline: float, priority: int = 0) -> Task[R, T]:
        """Admission is decided now: a full queue raises QueueFull at once."""
        task: Task[R, T] = Task(work, deadline, priority, self._clock())
        with self._cond:
            self._check_admission()
            heapq.heappush(self._heap, (priority, next(self._order), task))
            self._queued += 1
            self._counts["submitted"] += 1
            self._cond.notify()
        return task

    async def run(self, work: Callable[[R], T], timeout_s: float, priority: int = 0) -> T:
        """Submit and await; on deadline or cancellation a queued task is dropped, not run."""
        task = self.submit(work, self._clock() + timeout_s, priority)
        waiter = asyncio.wrap_future(task.future)
        waiter.add_done_callback(_consume_result)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), timeout=timeout_s)
        except TimeoutError:
            self.cancel(task, "expired")
            raise DeadlineExceeded(f"no result within the {timeout_s:g} s deadline") from None
        except asyncio.CancelledError:
            self.cancel(task, "cancelled")
            raise

    def cancel(self, task: Task[R, Any], reason: str) -> bool:
        """Drop a task that is still queued; a running one cannot be stopped (returns False)."""
        with self._cond:
            if task.state != "queued":
                return False
            self._mark_dropped(task, reason)
        task.future.cancel()
        return True

    # -- numbers ---------------------------------------------------------------------------

    def retry_after_s(self) -> float:
        """Estimated seconds until the queue has room: its length x recent service time."""
        per_task = self._service_s or 1.0
        workers = max(1, self._alive)
        return float(max(1, math.ceil(self._queued * per_task / workers)))

    def stats(self) -> dict[str, Any]:
        with self._cond:
            return {
                "queued": self._queued,
                "running": self._running,
                "max_queue": self._max_queue,
                "workers_alive": self._alive,
                "accepting": self._accepting,
                "service_time_s": round(self._service_s, 4),
                **{key: self._counts[key] for key in _COUNTERS},
                "failed_by_code": {
                    k.removeprefix("failed:"): v for k, v in self._counts.items() if k.startswith("failed:")
                },
            }

    # -- internals -------------------------------------------------------------------------

    def _check_admission(self) -> None:
        if not self._accepting:
            raise ShuttingDown("server is shutting down; retry shortly", retry_after_s=5.0)
        if self._alive == 0:
            raise WorkerUnavailable("the device worker has stopped; the server needs a restart", 30.0)
        if self._queued >= self._max_queue:
            self._counts["rejected"] += 1
            raise QueueFull(
                f"queue is full ({self._max_queue} waiting); retry later",
                retry_after_s=self.retry_after_s(),
            )

    def _mark_dropped(self, task: Task[R, Any], reason: str) -> None:
        task.state = "dropped"
        self._queued -= 1
        self._counts["dropped"] += 1
        self._counts[f"dropped_{reason}"] += 1

    def _drain_queue(self, reason: str) -> list[Task[R, Any]]:
        drained = []
        while self._heap:
            _, _, task = heapq.heappop(self._heap)
            if task.state == "queued":
                self._mark_dropped(task, reason)
                drained.append(task)
        return drained

    def _next_task(self) -> Task[R, Any] | None:
        """Block until a live task is available; None when shutting down with nothing queued."""
        with self._cond:
            while True:
                while self._heap:
                    _, _, task = heapq.heappop(self._heap)
                    if task.state != "queued":
                        continue  # dropped while waiting; its slot was already freed
                    if self._clock() >= task.deadline:
                        self._mark_dropped(task, "expired")
                        task.future.set_exception(DeadlineExceeded("deadline passed while queued"))
                        continue
                    task.state = "running"
                    self._queued -= 1
                    self._running += 1
                    return task
                if not self._accepting:
                    return None
                self._cond.wait()

    def _worker_main(self, replica: R) -> None:
        try:
            while (task := self._next_task()) is not None:
                self._execute(task, replica)
        except BaseException:  # the thread ends either way; say why, then fail the waiters
            log.critical("%s worker died", self._name, exc_info=True)
        finally:
            self._on_worker_exit()

    def _execute(self, task: Task[R, Any], replica: R) -> None:
        if not task.future.set_running_or_notify_cancel():
            with self._cond:
                self._running -= 1
            return
        started = self._clock()
        try:
            result = task.work(replica)
        except Exception as exc:  # one failure stays one failure: the loop lives on
            self._finish(task, started, f"failed:{_error_code(exc)}")
            task.future.set_exception(exc)
        except BaseException:
            self._finish(task, started, "failed:worker_unavailable")
            task.future.set_exception(WorkerUnavailable("the device worker stopped", 30.0))
            raise
        else:
            self._finish(task, started, "executed")
            task.future.set_result(result)

    def _finish(self, task: Task[R, Any], started: float, outcome: str) -> None:
        elapsed = self._clock() - started
        with self._cond:
            task.state = "failed" if outcome.startswith("failed") else "done"
            self._running -= 1
            self._counts[outcome] += 1
            if outcome.startswith("failed:"):
                self._counts["failed"] += 1
            self._service_s = elapsed if self._service_s == 0 else 0.8 * self._service_s + 0.2 * elapsed

    def _on_worker_exit(self) -> None:
        """A worker that ends leaves nobody hanging: when it was the last, fail every waiter."""
        with self._cond:
            self._alive -= 1
            orphans = self._drain_queue("worker_stopped") if self._alive == 0 else []
            if self._alive == 0 and self._accepting:
                log.error("%s worker stopped unexpectedly; failing %d queued", self._name, len(orphans))
        for task in orphans:
            task.future.set_exception(WorkerUnavailable("the device worker stopped", 30.0))


_COUNTERS = (
    "submitted",
    "executed",
    "failed",
    "rejected",
    "dropped",
    "dropped_expired",
    "dropped_cancelled",
    "dropped_shutdown",
)


def _error_code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, TunnelvisionError) else "internal_error"


def _consume_result(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned waiter's exception as retrieved, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()
