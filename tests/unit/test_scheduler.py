"""The scheduler's promises, checked with plain callables whose cost and failures we control."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import Future
from typing import Any

import pytest

from support import image_bytes
from tunnelvision.engine.engine import Engine, EngineConfig
from tunnelvision.engine.scheduler import BACKGROUND, INTERACTIVE, Scheduler
from tunnelvision.errors import (
    DeadlineExceeded,
    DeviceOutOfMemory,
    QueueFull,
    ShuttingDown,
    WorkerUnavailable,
)
from tunnelvision.models.simulated import SimulatedBackend
from tunnelvision.schemas import DetectParams, SegmentParams


class Gate:
    """A device task that blocks until the test opens the gate."""

    def __init__(self) -> None:
        self.entered = threading.Event()
        self.release = threading.Event()

    def __call__(self, replica: Any) -> str:
        self.entered.set()
        assert self.release.wait(10)
        return "gate"


def started(max_queue: int = 8) -> Scheduler[str]:
    scheduler: Scheduler[str] = Scheduler(["replica"], max_queue=max_queue)
    scheduler.start()
    return scheduler


def far() -> float:
    return time.monotonic() + 60


def result(future: Future[Any]) -> Any:
    return future.result(timeout=10)


def test_runs_work_on_the_replica_and_counts_it() -> None:
    scheduler = started()
    assert result(scheduler.submit(lambda r: f"ran on {r}", far()).future) == "ran on replica"
    assert scheduler.stats()["executed"] == 1


def test_first_come_first_served_within_a_priority_and_interactive_before_background() -> None:
    scheduler, gate, order = started(), Gate(), []
    scheduler.submit(gate, far())
    assert gate.entered.wait(5)

    def record(name: str) -> Any:
        return lambda replica: order.append(name)

    tasks = [
        scheduler.submit(record(name), far(), priority)
        for name, priority in [
            ("bg1", BACKGROUND),
            ("a", INTERACTIVE),
            ("bg2", BACKGROUND),
            ("b", INTERACTIVE),
        ]
    ]
    gate.release.set()
    for task in tasks:
        result(task.future)
    assert order == ["a", "b", "bg1", "bg2"]


def test_full_queue_rejects_at_submit_with_a_retry_estimate() -> None:
    scheduler, gate = started(max_queue=2), Gate()
    scheduler.submit(gate, far())
    assert gate.entered.wait(5)
    queued = [scheduler.submit(lambda r: None, far()) for _ in range(2)]
    began = time.monotonic()
    with pytest.raises(QueueFull) as caught:
        scheduler.submit(lambda r: None, far())
    assert time.monotonic() - began < 0.1  # decided at once, no waiting
    assert caught.value.retry_after_s >= 1
    assert scheduler.stats()["rejected"] == 1
    gate.release.set()
    for task in queued:
        result(task.future)


def test_task_past_its_deadline_is_dropped_without_running() -> None:
    scheduler, gate, ran = started(), Gate(), []
    scheduler.submit(gate, far())
    assert gate.entered.wait(5)
    late = scheduler.submit(lambda r: ran.append(1), time.monotonic() + 0.05)
    time.sleep(0.1)
    gate.release.set()
    with pytest.raises(DeadlineExceeded):
        result(late.future)
    assert ran == []
    stats = scheduler.stats()
    assert (stats["executed"], stats["dropped_expired"]) == (1, 1)


def test_async_run_times_out_at_the_deadline_and_the_task_never_runs() -> None:
    scheduler, gate, ran = started(), Gate(), []

    async def scenario() -> None:
        scheduler.submit(gate, far())
        assert gate.entered.wait(5)
        began = time.monotonic()
        with pytest.raises(DeadlineExceeded):
            await scheduler.run(lambda r: ran.append(1), timeout_s=0.2)
        assert 0.15 < time.monotonic() - began < 2  # the waiter hears at its deadline, not later

    asyncio.run(scenario())
    gate.release.set()
    scheduler.begin_shutdown()
    assert scheduler.join(5)
    assert ran == []
    assert scheduler.stats()["dropped_expired"] == 1


def test_cancelled_waiter_drops_its_queued_task() -> None:
    scheduler, gate, ran = started(), Gate(), []

    async def scenario() -> None:
        scheduler.submit(gate, far())
        assert gate.entered.wait(5)
        waiter = asyncio.create_task(scheduler.run(lambda r: ran.append(1), timeout_s=30))
        await asyncio.sleep(0.05)
        assert scheduler.stats()["queued"] == 1
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert scheduler.stats()["queued"] == 0  # the slot is free at once

    asyncio.run(scenario())
    gate.release.set()
    scheduler.begin_shutdown()
    assert scheduler.join(5)
    assert ran == []
    assert scheduler.stats()["dropped_cancelled"] == 1


def test_an_exception_fails_only_its_task_and_the_worker_lives_on() -> None:
    scheduler = started()

    def broken(replica: Any) -> None:
        raise ValueError("bug")

    with pytest.raises(ValueError):
        result(scheduler.submit(broken, far()).future)
    assert result(scheduler.submit(lambda r: "fine", far()).future) == "fine"
    stats = scheduler.stats()
    assert (stats["failed"], stats["executed"], stats["failed_by_code"]) == (1, 1, {"internal_error": 1})


class Fatal(BaseException):
    pass


def test_a_dead_worker_fails_every_waiter_and_refuses_new_work() -> None:
    scheduler, gate = started(), Gate()
    scheduler.submit(gate, far())
    assert gate.entered.wait(5)

    def fatal(replica: Any) -> None:
        raise Fatal()

    killer = scheduler.submit(fatal, far())
    waiting = [scheduler.submit(lambda r: "never", far()) for _ in range(3)]
    gate.release.set()
    futures: list[Future[Any]] = [killer.future, *(t.future for t in waiting)]
    for future in futures:
        with pytest.raises(WorkerUnavailable):
            result(future)
    assert not scheduler.healthy
    with pytest.raises(WorkerUnavailable):
        scheduler.submit(lambda r: None, far())


def test_shutdown_lets_the_running_task_finish_and_fails_the_queued() -> None:
    scheduler, gate = started(), Gate()
    running = scheduler.submit(gate, far())
    assert gate.entered.wait(5)
    queued = [scheduler.submit(lambda r: "never", far()) for _ in range(3)]
    scheduler.begin_shutdown()
    for task in queued:
        with pytest.raises(ShuttingDown):
            result(task.future)
    with pytest.raises(ShuttingDown):
        scheduler.submit(lambda r: None, far())
    gate.release.set()
    assert result(running.future) == "gate"
    assert scheduler.join(5)
    assert scheduler.stats()["dropped_shutdown"] == 3


def test_one_worker_per_replica_runs_tasks_side_by_side() -> None:
    scheduler: Scheduler[str] = Scheduler(["gpu0", "gpu1"], max_queue=8)
    scheduler.start()
    barrier = threading.Barrier(2, timeout=5)

    def meet(replica: str) -> str:
        barrier.wait()  # only passes when both replicas run at the same time
        return replica

    tasks = [scheduler.submit(meet, far()) for _ in range(2)]
    assert sorted(result(t.future) for t in tasks) == ["gpu0", "gpu1"]


def test_retry_after_grows_with_the_queue() -> None:
    scheduler, gate = started(max_queue=50), Gate()
    scheduler.submit(lambda r: time.sleep(0.2), far()).future.result(5)  # learn a service time
    scheduler.submit(gate, far())
    assert gate.entered.wait(5)
    short = scheduler.retry_after_s()
    queued = [scheduler.submit(lambda r: None, far()) for _ in range(40)]
    assert scheduler.retry_after_s() > short
    gate.release.set()
    for task in queued:
        result(task.future)


class Recorder:
    """A batch runner that records the batches it gets and can be told to fail."""

    def __init__(self, fail_over: int | None = None, oom_over: int | None = None) -> None:
        self.batches: list[list[Any]] = []
        self.fail_over, self.oom_over = fail_over, oom_over

    def __call__(self, replica: Any, items: list[Any]) -> list[Any]:
        self.batches.append(list(items))
        if self.oom_over is not None and len(items) > self.oom_over:
            raise DeviceOutOfMemory("out of memory")
        if self.fail_over is not None and len(items) > self.fail_over:
            raise RuntimeError("the whole batch failed")
        return [
            ValueError(f"bad {item}") if str(item).startswith("bad") else f"done {item}" for item in items
        ]


def batching(runner: Recorder, max_batch: int = 4, wait_s: float = 0.2) -> Scheduler[str]:
    scheduler: Scheduler[str] = Scheduler(["r"], 32, runner=runner, max_batch=max_batch, batch_wait_s=wait_s)
    scheduler.start()
    return scheduler


def test_tasks_with_the_same_key_share_a_batch_and_other_keys_wait() -> None:
    runner = Recorder()
    scheduler = batching(runner)
    tasks = [
        scheduler.submit(name, far(), key=key)
        for name, key in [("a1", "A"), ("b1", "B"), ("a2", "A"), ("a3", "A"), ("n1", None), ("n2", None)]
    ]
    assert [result(t.future) for t in tasks] == [
        "done a1",
        "done b1",
        "done a2",
        "done a3",
        "done n1",
        "done n2",
    ]
    assert runner.batches == [["a1", "a2", "a3"], ["b1"], ["n1"], ["n2"]]
    assert scheduler.stats()["batches"] == 4


def test_the_worker_waits_at_most_batch_wait_for_company() -> None:
    runner = Recorder()
    scheduler = batching(runner, wait_s=0.3)
    began = time.monotonic()
    first = scheduler.submit("a1", far(), key="A")
    time.sleep(0.1)
    second = scheduler.submit("a2", far(), key="A")
    assert (result(first.future), result(second.future)) == ("done a1", "done a2")
    assert runner.batches == [["a1", "a2"]]
    assert 0.25 < time.monotonic() - began < 2


def test_a_full_batch_starts_without_waiting() -> None:
    runner = Recorder()
    scheduler, gate = batching(runner, max_batch=2, wait_s=5.0), Gate()
    began = time.monotonic()
    tasks = [scheduler.submit(name, far(), key="A") for name in ("a1", "a2")]
    [result(t.future) for t in tasks]
    assert time.monotonic() - began < 2
    gate.release.set()


def test_a_bad_item_fails_alone_inside_a_batch() -> None:
    scheduler = batching(Recorder())
    tasks = [scheduler.submit(name, far(), key="A") for name in ("a1", "bad2", "a3")]
    assert result(tasks[0].future) == "done a1" and result(tasks[2].future) == "done a3"
    with pytest.raises(ValueError, match="bad2"):
        result(tasks[1].future)


def test_a_failing_batch_is_retried_item_by_item() -> None:
    runner = Recorder(fail_over=1)
    scheduler = batching(runner)
    tasks = [scheduler.submit(name, far(), key="A") for name in ("a1", "a2", "a3")]
    assert [result(t.future) for t in tasks] == ["done a1", "done a2", "done a3"]
    assert runner.batches == [["a1", "a2", "a3"], ["a1"], ["a2"], ["a3"]]
    assert scheduler.stats()["batch_retries_single"] == 1


def test_out_of_memory_splits_the_batch_before_failing_anything() -> None:
    runner = Recorder(oom_over=1)
    scheduler = batching(runner)
    tasks = [scheduler.submit(name, far(), key="A") for name in ("a1", "a2", "a3", "a4")]
    assert [result(t.future) for t in tasks] == ["done a1", "done a2", "done a3", "done a4"]
    assert runner.batches[0] == ["a1", "a2", "a3", "a4"]
    assert ["a1"] in runner.batches and ["a4"] in runner.batches
    assert scheduler.stats()["batch_splits_oom"] == 3  # 4 -> 2 + 2 -> 1 + 1 + 1 + 1


def test_a_batch_is_built_only_from_tasks_still_wanted() -> None:
    runner = Recorder()
    scheduler = batching(runner, wait_s=0.5)
    first = scheduler.submit("a1", far(), key="A")
    doomed = scheduler.submit("a2", time.monotonic() + 0.05, key="A")
    time.sleep(0.1)
    assert result(first.future) == "done a1"
    with pytest.raises(DeadlineExceeded):
        result(doomed.future)
    assert all("a2" not in batch for batch in runner.batches)


def test_no_waiting_for_company_when_none_is_on_its_way() -> None:
    coming = [0]
    scheduler: Scheduler[str] = Scheduler(
        ["r"], 8, runner=Recorder(), max_batch=4, batch_wait_s=1.0, company_hint=lambda: coming[0]
    )
    scheduler.start()
    began = time.monotonic()
    assert result(scheduler.submit("alone", far(), key="A").future) == "done alone"
    assert time.monotonic() - began < 0.5  # nobody coming: no batch wait
    coming[0] = 1
    began = time.monotonic()
    assert result(scheduler.submit("hopeful", far(), key="A").future) == "done hopeful"
    assert time.monotonic() - began >= 0.9  # someone is being prepared: wait for them


def test_a_fatal_device_error_ends_the_worker_fails_its_batch_and_the_queue_and_says_so() -> None:
    """A lost CUDA device is not retried item by item on the broken device: the batch and the
    queue fail at once and `on_failure` is told (the server then exits to be restarted)."""
    runner, failures = Recorder(), list[str]()

    def lose_the_device(replica: Any, items: list[Any]) -> list[Any]:
        if "lost" in items:
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return runner(replica, items)

    scheduler: Scheduler[str] = Scheduler(
        ["r"],
        8,
        runner=lose_the_device,
        max_batch=4,
        batch_wait_s=0.2,
        is_fatal=lambda exc: "CUDA error" in str(exc),
        on_failure=failures.append,
    )
    scheduler.start()
    assert result(scheduler.submit("ok", far()).future) == "done ok"
    batch = [scheduler.submit(item, far(), key="k") for item in ("a", "lost", "b")]
    queued = scheduler.submit("c", far(), key="other")  # waits for the next pass
    for task in [*batch, queued]:
        with pytest.raises(WorkerUnavailable):
            result(task.future)
    assert runner.batches == [["ok"]]  # the failing batch was not retried item by item
    wait_until(lambda: len(failures) == 1)
    assert not scheduler.healthy
    assert "CUDA error: an illegal memory access" in failures[0]


def test_a_worker_ending_at_shutdown_is_no_failure() -> None:
    failures: list[str] = []
    scheduler: Scheduler[str] = Scheduler(["r"], 8, on_failure=failures.append)
    scheduler.start()
    scheduler.begin_shutdown()
    assert scheduler.join(5) and failures == []


def wait_until(condition: Any, timeout_s: float = 5) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.01)


# -- affinity: requests naming one image go to the replica that holds its embedding --------------


def two_replicas() -> Scheduler[str]:
    scheduler: Scheduler[str] = Scheduler(["a", "b"], max_queue=64)
    scheduler.start()
    return scheduler


def test_tasks_with_one_affinity_run_on_one_replica_even_when_another_is_idle() -> None:
    scheduler = two_replicas()
    keys = [f"image-{i}" for i in range(16)]
    first = {key: result(scheduler.submit(lambda r: r, far(), affinity=key).future) for key in keys}
    # in another order: whichever worker happens to wake must not decide
    again = {key: result(scheduler.submit(lambda r: r, far(), affinity=key).future) for key in keys[::-1]}
    assert again == first
    assert set(first.values()) == {"a", "b"}  # the keys spread over both replicas
    assert scheduler.stats()["affinity_kept"] == 32


def test_a_task_pinned_to_a_busy_replica_moves_once_it_has_waited_and_its_key_follows() -> None:
    scheduler, gate = two_replicas(), Gate()
    home = scheduler.home_of("image")
    scheduler.submit(gate, far(), affinity="image")  # keeps its replica busy
    assert gate.entered.wait(5)
    began = time.monotonic()
    other = result(scheduler.submit(lambda r: r, far(), affinity="image").future)
    assert other == ["a", "b"][1 - (home or 0)] and time.monotonic() - began < 2
    assert scheduler.stats()["affinity_moved"] == 1
    gate.release.set()
    # the replica that ran it now holds the embedding: the image's next requests go there
    assert scheduler.home_of("image") == 1 - (home or 0)
    assert result(scheduler.submit(lambda r: r, far(), affinity="image").future) == other


def test_a_replica_runs_its_own_tasks_before_stealing_those_waiting_on_a_busy_one() -> None:
    scheduler, gate_a, gate_b, order = two_replicas(), Gate(), Gate(), []
    on_a, on_b = (
        next(f"image-{i}" for i in range(100) if scheduler.home_of(f"image-{i}") == n) for n in (0, 1)
    )
    scheduler.submit(gate_a, far(), affinity=on_a)
    scheduler.submit(gate_b, far(), affinity=on_b)
    assert gate_a.entered.wait(5) and gate_b.entered.wait(5)

    def record(name: str) -> Any:
        return lambda replica: order.append((name, replica))

    tasks = [scheduler.submit(record(f"for a {i}"), far(), affinity=on_a) for i in range(3)]
    tasks += [scheduler.submit(record(f"for b {i}"), far(), affinity=on_b) for i in range(3)]
    gate_b.release.set()  # b is free first; a stays busy
    for task in tasks:
        result(task.future)
    gate_a.release.set()
    assert order[:3] == [(f"for b {i}", "b") for i in range(3)]  # its own first, though queued later
    assert order[3:] == [(f"for a {i}", "b") for i in range(3)]  # then a's, which a kept waiting


def test_a_task_pinned_to_a_stopped_replica_runs_on_another() -> None:
    def runner(replica: str, items: list[Any]) -> list[Any]:
        if replica == "a" and "lose a" in items:
            raise RuntimeError("CUDA error: lost")
        return [replica for _ in items]

    scheduler: Scheduler[str] = Scheduler(
        ["a", "b"], 8, runner=runner, is_fatal=lambda exc: "CUDA error" in str(exc)
    )
    scheduler.start()
    pinned_to_a = next(f"image-{i}" for i in range(100) if scheduler.home_of(f"image-{i}") == 0)
    with pytest.raises(WorkerUnavailable):
        result(scheduler.submit("lose a", far(), affinity=pinned_to_a).future)
    wait_until(lambda: scheduler.stats()["workers_alive"] == 1)
    assert result(scheduler.submit("x", far(), affinity=pinned_to_a).future) == "b"


class Recording(SimulatedBackend):
    """A replica that notes what its passes saw: here each image's size names the image."""

    def __init__(self) -> None:
        super().__init__(batch_ms=1, item_ms=0)
        self.seen: list[Any] = []

    def run_batch(self, items: list[tuple[Any, DetectParams]]) -> list[Any]:
        self.seen += [prepared for prepared, _ in items]
        return super().run_batch(items)


def test_the_engine_sends_a_request_reusing_an_image_id_to_the_replica_that_ran_the_image() -> None:
    replicas = [Recording(), Recording()]

    async def scenario() -> None:
        async with Engine(replicas, EngineConfig(image_cache_bytes=2**24)) as engine:
            sizes = [(40 + i, 30) for i in range(12)]  # (width, height): one size per image
            ids = [
                (await engine.segment(image_bytes(w, h), SegmentParams(prompt="cat"))).image_id
                for w, h in sizes
            ]
            for image_id in ids[::-1]:
                await engine.segment(None, SegmentParams(prompt="cat", image_id=image_id))

    asyncio.run(scenario())
    for replica in replicas:  # each image ran twice, both times on one replica
        assert all(replica.seen.count(size) == 2 for size in replica.seen), replica.seen
    assert replicas[0].seen and replicas[1].seen
