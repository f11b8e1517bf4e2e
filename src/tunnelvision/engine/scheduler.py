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
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from tunnelvision.errors import (
    DeadlineExceeded,
    DeviceOutOfMemory,
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
MOVED_KEYS = 65_536  # affinity keys remembered on another worker than their hash's (see `home_of`)


@dataclass(eq=False)
class Task(Generic[T]):
    item: Any  # what the runner gets
    deadline: float
    priority: int
    enqueued_at: float
    key: Hashable | None = None  # tasks with equal keys may share one device pass; None: never
    affinity: Hashable | None = None  # tasks with equal affinity go to one worker (see `submit`)
    home: int | None = None  # that worker; None: any
    future: Future[T] = field(default_factory=Future)
    state: str = "queued"


# Runs a batch of items on a replica; returns one result per item, in order. A result that is an
# exception instance fails that item only. Raising fails the batch: it is then split and retried.
BatchRunner = Callable[[R, list[Any]], list[Any]]
BatchObserver = Callable[[int, float, list[float]], None]  # size, device seconds, queue waits
# Told why, from the worker thread, when the scheduler cannot go on serving as configured (the
# last worker ended, or one hit a fatal error): the process should then restart.
FailureObserver = Callable[[str], None]


class WorkerStopped(Exception):
    """Raised inside a worker to end it: the error left its replica unusable."""


def run_each(replica: Any, items: list[Any]) -> list[Any]:
    """The default runner: items are callables taking the replica, run one after another."""
    results: list[Any] = []
    for item in items:
        try:
            results.append(item(replica))
        except Exception as exc:
            results.append(exc)
    return results


class Scheduler(Generic[R]):
    """Thread-safe; `submit` never blocks, `run` is the asyncio face."""

    def __init__(
        self,
        replicas: Sequence[R],
        max_queue: int,
        runner: BatchRunner[R] = run_each,
        max_batch: int = 1,
        batch_wait_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
        name: str = "device",
        on_batch: BatchObserver | None = None,
        company_hint: Callable[[], int] | None = None,
        is_fatal: Callable[[BaseException], bool] = lambda exc: False,
        on_failure: FailureObserver | None = None,
    ) -> None:
        self._replicas = list(replicas)
        self._max_queue = max_queue
        self._runner = runner
        self._max_batch = max_batch
        self._batch_wait_s = batch_wait_s
        self._on_batch = on_batch
        # How many requests are on their way to the queue (being decoded/prepared); with none,
        # waiting for company only adds latency. None: always wait up to batch_wait_s.
        self._company_hint = company_hint
        # An error after which the replica is unusable (a lost CUDA context): its worker ends,
        # failing its batch, instead of retrying items on a broken device.
        self._is_fatal = is_fatal
        self._on_failure = on_failure
        self._clock = clock
        self._name = name
        self._cond = threading.Condition()
        self._heap: list[tuple[int, int, Task[Any]]] = []
        self._order = itertools.count()
        self._queued = 0
        self._running = 0
        self._accepting = True
        self._alive = 0
        self._threads: list[threading.Thread] = []
        self._counts: Counter[str] = Counter()
        self._service_s = 0.0  # moving average of device time per task
        self._busy = [False] * len(self._replicas)  # per worker: holds a batch
        self._live = [False] * len(self._replicas)  # per worker: its thread still runs
        self._moved: OrderedDict[Hashable, int] = OrderedDict()  # affinity -> the worker that took it

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for index, replica in enumerate(self._replicas):
            thread = threading.Thread(
                target=self._worker_main, args=(index, replica), name=f"{self._name}-{index}", daemon=True
            )
            self._threads.append(thread)
            self._alive += 1
            self._live[index] = True
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

    def submit(
        self,
        item: Any,
        deadline: float,
        priority: int = 0,
        key: Hashable | None = None,
        affinity: Hashable | None = None,
    ) -> Task[Any]:
        """Admission is decided now: a full queue raises QueueFull at once.

        Tasks with equal `affinity` (an image_id) go to one worker, the one whose replica holds
        that image's cached embedding; another worker takes such a task only when it has nothing
        of its own to do and that one has kept the task waiting for a service time while busy, or
        has stopped. The key then follows the task to the worker that ran it."""
        task: Task[Any] = Task(item, deadline, priority, self._clock(), key, affinity)
        with self._cond:
            self._check_admission()
            task.home = self.home_of(affinity)
            heapq.heappush(self._heap, (priority, next(self._order), task))
            self._queued += 1
            self._counts["submitted"] += 1
            # A pinned task must reach its own worker: wake them all, the others go back to sleep.
            self._cond.notify() if task.home is None else self._cond.notify_all()
        return task

    def home_of(self, affinity: Hashable | None) -> int | None:
        """The worker for an affinity key: the last one that took a task for it elsewhere than
        its hash said, else its hash's (stable for the life of the process, which the caches it
        stands for do not outlive). None with one worker: nothing to choose."""
        if affinity is None or len(self._replicas) < 2:
            return None
        with self._cond:
            moved = self._moved.get(affinity)
        return hash(affinity) % len(self._replicas) if moved is None else moved

    async def run(self, item: Any, timeout_s: float, priority: int = 0, key: Hashable | None = None) -> Any:
        """Submit and await; on deadline or cancellation a queued task is dropped, not run."""
        return await self.wait(self.submit(item, self._clock() + timeout_s, priority, key))

    async def wait(self, task: Task[Any]) -> Any:
        """Await a submitted task until its deadline; cancelling the waiter drops a queued task."""
        timeout_s = max(0.0, task.deadline - self._clock())
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

    def cancel(self, task: Task[Any], reason: str) -> bool:
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

    def _mark_dropped(self, task: Task[Any], reason: str) -> None:
        task.state = "dropped"
        self._queued -= 1
        self._counts["dropped"] += 1
        self._counts[f"dropped_{reason}"] += 1

    def _drain_queue(self, reason: str) -> list[Task[Any]]:
        drained = []
        while self._heap:
            _, _, task = heapq.heappop(self._heap)
            if task.state == "queued":
                self._mark_dropped(task, reason)
                drained.append(task)
        return drained

    def _next_batch(self, worker: int) -> list[Task[Any]] | None:
        """Block until a live task this worker may take is available, then gather company for it:
        up to `max_batch` queued tasks with the same key, waiting at most `batch_wait_s`. None at
        shutdown."""
        with self._cond:
            while (first := self._pop_live(worker)) is None:
                if not self._accepting:
                    return None
                self._cond.wait(self._until_stealable(worker))
            batch = [first]
            if self._max_batch > 1 and first.key is not None:
                self._gather(batch, first.key, worker)
            self._busy[worker] = True
            for task in batch:
                self._count_affinity(task, worker)
            if self._queued:  # idle workers re-time their wait for tasks pinned to this one
                self._cond.notify_all()
            return batch

    def _gather(self, batch: list[Task[Any]], key: Hashable, worker: int) -> None:
        """Wait for company without claiming it, so a companion that is cancelled or expires
        meanwhile is simply not taken: the batch holds what is still wanted when it starts."""
        room = self._max_batch - len(batch)
        until = self._clock() + self._batch_wait_s
        while self._accepting and self._count_compatible(key, worker) < room and self._company_coming():
            remaining = until - self._clock()
            if remaining <= 0:
                break
            self._cond.wait(remaining)
        batch += self._take_compatible(key, room, worker)

    # -- affinity: which worker may take a task ------------------------------------------------

    def _is_mine(self, task: Task[Any], worker: int) -> bool:
        """Unpinned, pinned to this worker, or pinned to one that has stopped."""
        home = task.home
        return home is None or home == worker or not self._live[home]

    def _stealable(self, task: Task[Any]) -> bool:
        """Pinned to a busy worker that has kept it waiting for one service time: a worker with
        nothing of its own to do then runs it (a cache miss costs less than idling meanwhile)."""
        home = task.home
        return (
            home is not None
            and self._busy[home]
            and self._clock() - task.enqueued_at >= self._steal_after_s()
        )

    def _steal_after_s(self) -> float:
        return max(self._service_s, self._batch_wait_s)

    def _until_stealable(self, worker: int) -> float | None:
        """How long an idle worker may sleep before a task pinned to a busy worker becomes its to
        take; None: until woken (nothing pinned elsewhere, or its worker is idle and takes it)."""
        waits = [
            task.enqueued_at + self._steal_after_s() - self._clock()
            for _, _, task in self._heap
            if task.state == "queued" and task.home not in (None, worker) and self._busy[task.home]
        ]
        return max(0.001, min(waits)) if waits else None

    def _count_affinity(self, task: Task[Any], worker: int) -> None:
        """Count where a pinned task ran; one that ran elsewhere moves its key there, since that
        replica now holds the embedding (bounded: the oldest moves are forgotten first)."""
        if task.home is None:
            return
        self._counts["affinity_kept" if task.home == worker else "affinity_moved"] += 1
        if task.home != worker:
            self._moved[task.affinity] = worker
            self._moved.move_to_end(task.affinity)
            if len(self._moved) > MOVED_KEYS:
                self._moved.popitem(last=False)

    def _company_coming(self) -> bool:
        return self._company_hint is None or self._company_hint() > 0

    def _count_compatible(self, key: Hashable, worker: int) -> int:
        return sum(
            1
            for _, _, task in self._heap
            if task.state == "queued" and task.key == key and self._is_mine(task, worker)
        )

    def _pop_live(self, worker: int) -> Task[Any] | None:
        """The first task in order that is this worker's (the head, usually); with none, one
        pinned to a busy worker that has kept it waiting (see `_stealable`)."""
        while self._heap:
            task = self._heap[0][2]
            if task.state == "queued" and not self._is_mine(task, worker):
                return self._pop_mine_or_steal(worker)
            heapq.heappop(self._heap)
            if self._claim(task):
                return task
        return None

    def _pop_mine_or_steal(self, worker: int) -> Task[Any] | None:
        """Down the queue in order: this worker's first task, unless a stealable one comes
        first with a better priority (interactive work does not wait behind a batch job)."""
        thief: Task[Any] | None = None
        for _, _, task in sorted(self._heap, key=lambda entry: entry[:2]):
            if task.state != "queued":
                continue
            if self._is_mine(task, worker):
                if thief is not None and thief.priority < task.priority and self._claim(thief):
                    return thief
                if self._claim(task):
                    return task
            elif thief is None and self._stealable(task):
                thief = task
        return thief if thief is not None and self._claim(thief) else None

    def _take_compatible(self, key: Hashable, room: int, worker: int) -> list[Task[Any]]:
        taken: list[Task[Any]] = []
        for _, _, task in sorted(self._heap, key=lambda entry: entry[:2]):
            if len(taken) >= room:
                break
            if task.key == key and self._is_mine(task, worker) and self._claim(task):
                taken.append(task)  # left in the heap: no longer 'queued', so skipped later
        return taken

    def _claim(self, task: Task[Any]) -> bool:
        """queued -> running, unless it was dropped meanwhile or its deadline has passed."""
        if task.state != "queued":
            return False
        if self._clock() >= task.deadline:
            self._mark_dropped(task, "expired")
            task.future.set_exception(DeadlineExceeded("deadline passed while queued"))
            return False
        task.state = "running"
        self._queued -= 1
        self._running += 1
        return True

    def _worker_main(self, worker: int, replica: R) -> None:
        reason = ""
        try:
            while (batch := self._next_batch(worker)) is not None:
                try:
                    self._execute(batch, replica)
                finally:
                    with self._cond:
                        self._busy[worker] = False
        except BaseException as exc:  # the thread ends either way; say why, then fail the waiters
            cause = exc.__cause__ if isinstance(exc, WorkerStopped) and exc.__cause__ else exc
            reason = f"{type(cause).__name__}: {cause}"
            log.critical("%s worker died", self._name, exc_info=True)
        finally:
            self._on_worker_exit(worker, reason)

    def _execute(self, batch: list[Task[Any]], replica: R) -> None:
        live = [task for task in batch if task.future.set_running_or_notify_cancel()]
        if len(live) < len(batch):
            with self._cond:
                self._running -= len(batch) - len(live)
        if not live:
            return
        started = self._clock()
        try:
            outcomes = self._run_isolated(replica, live)
        except BaseException:
            for task in live:
                self._finish(task, "failed:worker_unavailable")
                task.future.set_exception(WorkerUnavailable("the device worker stopped", 30.0))
            raise
        elapsed = self._clock() - started
        self._record_batch(live, started, elapsed)
        for task, outcome in zip(live, outcomes, strict=True):
            self._settle(task, outcome)

    def _run_isolated(self, replica: R, tasks: list[Task[Any]]) -> list[Any]:
        """One failure stays one failure: a failing batch is split (halves after running out of
        memory, singles otherwise) and retried before anything is failed."""
        try:
            results = self._runner(replica, [task.item for task in tasks])
            if len(results) != len(tasks):
                raise RuntimeError(f"runner returned {len(results)} results for {len(tasks)} items")
            for outcome in results:
                if isinstance(outcome, BaseException):
                    self._raise_if_fatal(outcome)
            return results
        except Exception as exc:
            self._raise_if_fatal(exc)
            if len(tasks) == 1:
                return [exc]
            oom = isinstance(exc, DeviceOutOfMemory)
            with self._cond:
                self._counts["batch_splits_oom" if oom else "batch_retries_single"] += 1
            parts = [tasks[: len(tasks) // 2], tasks[len(tasks) // 2 :]] if oom else [[t] for t in tasks]
            return [outcome for part in parts for outcome in self._run_isolated(replica, part)]

    def _raise_if_fatal(self, exc: BaseException) -> None:
        if isinstance(exc, WorkerStopped):
            raise exc
        if self._is_fatal(exc):
            raise WorkerStopped(f"{self._name} unusable") from exc

    def _settle(self, task: Task[Any], outcome: Any) -> None:
        if isinstance(outcome, BaseException):
            self._finish(task, f"failed:{_error_code(outcome)}")
            task.future.set_exception(outcome)
        else:
            self._finish(task, "executed")
            task.future.set_result(outcome)

    def _finish(self, task: Task[Any], outcome: str) -> None:
        with self._cond:
            task.state = "failed" if outcome.startswith("failed") else "done"
            self._running -= 1
            self._counts[outcome] += 1
            if outcome.startswith("failed:"):
                self._counts["failed"] += 1

    def _record_batch(self, batch: list[Task[Any]], started: float, elapsed: float) -> None:
        per_task = elapsed / len(batch)
        with self._cond:
            self._counts["batches"] += 1
            self._counts["batched_items"] += len(batch)
            self._service_s = per_task if self._service_s == 0 else 0.8 * self._service_s + 0.2 * per_task
        if self._on_batch is not None:
            self._on_batch(len(batch), elapsed, [started - task.enqueued_at for task in batch])

    def _on_worker_exit(self, worker: int, reason: str) -> None:
        """A worker that ends leaves nobody hanging: when it was the last, fail every waiter
        (else the others take the tasks pinned to it). Then, unless shutting down, say so: a dead
        worker or a lost device needs a restart."""
        with self._cond:
            self._alive -= 1
            self._live[worker] = False
            self._cond.notify_all()
            orphans = self._drain_queue("worker_stopped") if self._alive == 0 else []
            unexpected = self._accepting  # at shutdown, workers end by design
            if self._alive == 0 and self._accepting:
                log.error("%s worker stopped unexpectedly; failing %d queued", self._name, len(orphans))
        for task in orphans:
            task.future.set_exception(WorkerUnavailable("the device worker stopped", 30.0))
        if unexpected and self._on_failure is not None:
            self._on_failure(f"the {self._name} worker has stopped ({reason or 'it returned'})")


_COUNTERS = (
    "submitted",
    "executed",
    "failed",
    "rejected",
    "dropped",
    "dropped_expired",
    "dropped_cancelled",
    "dropped_shutdown",
    "batches",
    "batched_items",
    "batch_retries_single",
    "batch_splits_oom",
    "affinity_kept",
    "affinity_moved",
)


def _error_code(exc: BaseException) -> str:
    return exc.code if isinstance(exc, TunnelvisionError) else "internal_error"


def _consume_result(future: asyncio.Future[Any]) -> None:
    """Mark an abandoned waiter's exception as retrieved, so asyncio does not log it."""
    if not future.cancelled():
        future.exception()
