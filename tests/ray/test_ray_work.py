"""The replica's side of the Ray hop without Ray (runs everywhere): each item on its own
deadline, one bad item one failure, batches grouped by the backend's key."""

from __future__ import annotations

import threading
import time
from typing import Any

import numpy as np
import pytest

from support import wait_for
from tunnelvision.distributed.work import Answer, Item, deadline_of, run_items
from tunnelvision.engine.backend import Deadline, no_deadline
from tunnelvision.errors import DeadlineExceeded
from tunnelvision.models.simulated import SimulatedBackend
from tunnelvision.schemas import DetectParams

IMAGE = np.zeros((48, 64, 3), dtype=np.uint8)


class CountingBackend(SimulatedBackend):
    """An instant simulated device that records each pass and fails any batch holding `bad`."""

    def __init__(self, bad: str = "") -> None:
        super().__init__(batch_ms=0, item_ms=0)
        self.bad = bad
        self.passes: list[int] = []

    def run_batch(self, items: list[tuple[Any, DetectParams]]) -> list[Any]:
        self.passes.append(len(items))
        if any(params.phrases == [self.bad] for _, params in items):
            raise RuntimeError("bad item")
        results: list[Any] = super().run_batch(items)
        return results


def item(prompt: str = "cat", budget_s: float = 10.0) -> Item:
    return Item(IMAGE, DetectParams(prompt=prompt), "", budget_s)


def test_items_that_share_a_key_share_one_device_pass() -> None:
    backend = CountingBackend()
    answers = run_items(backend, [item(), item(), item()])
    assert backend.passes == [3]
    assert all(isinstance(a.detections, list) for a in answers)


def test_an_item_past_its_deadline_never_reaches_the_device() -> None:
    backend = CountingBackend()
    late, on_time = run_items(backend, [item(budget_s=0.0), item()])
    assert isinstance(late.detections, DeadlineExceeded)
    assert isinstance(on_time.detections, list)
    assert backend.passes == [1]


def test_a_bad_item_fails_alone() -> None:
    backend = CountingBackend(bad="boom")
    answers: list[Answer] = run_items(backend, [item(), item("boom"), item()])
    assert [isinstance(a.detections, RuntimeError) for a in answers] == [False, True, False]
    assert backend.passes == [3, 1, 1, 1]  # the batch, then each item alone


def test_the_deadline_behind_a_check_crosses_the_hop() -> None:
    deadline = Deadline.after(7.0)
    assert deadline_of(deadline.check, 99.0) is deadline
    assert deadline_of(no_deadline, 99.0).budget_s == 99.0


def test_ray_is_told_to_stay_local_and_quiet_unless_joining() -> None:
    from support import make_settings
    from tunnelvision.distributed.cluster import ray_environment

    local = ray_environment(make_settings(ray=True), {})
    assert local["RAY_USAGE_STATS_ENABLED"] == "0"
    assert local["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    assert len(local["RAY_AUTH_TOKEN"]) == 64  # a one-off token: nothing written under ~/.ray
    joined = ray_environment(make_settings(ray=True, ray_address="10.0.0.5:6379"), {})
    assert joined == {"RAY_USAGE_STATS_ENABLED": "0"}  # the cluster's token comes from the caller
    assert ray_environment(make_settings(ray=True), {"RAY_AUTH_TOKEN": "t"}).get("RAY_AUTH_TOKEN") is None


def test_the_engine_models_and_web_layer_import_no_ray() -> None:
    import subprocess
    import sys

    check = (
        "import sys, tunnelvision.engine.engine, tunnelvision.models.factory, tunnelvision.api.app\n"
        "import tunnelvision.server, tunnelvision.cli\n"
        "import tunnelvision.distributed.work, tunnelvision.distributed.cluster\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray'))"
    )
    out = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


class FakeResponse:
    """A Serve call that answers when released, or raises as Serve's does once cancelled."""

    def __init__(self, items: list[Item]) -> None:
        self.items, self.cancelled, self.released = items, False, threading.Event()

    def cancel(self) -> None:
        self.cancelled = True
        self.released.set()

    def result(self, timeout_s: float) -> Any:
        from ray.exceptions import TaskCancelledError

        from tunnelvision.distributed.work import Reply

        self.released.wait(timeout_s)
        if self.cancelled:
            raise TaskCancelledError()
        answers = [Answer([], {}) for _ in self.items]
        return Reply(answers, {"id": "r1", "cache": {"hits": 2, "misses": 1}})


class FakeHandle:
    """A DeploymentHandle whose calls the test sees and releases (`handle.run.remote(items)`)."""

    def __init__(self) -> None:
        self.calls: list[FakeResponse] = []
        self.run = self
        self.affinity: list[str] = []

    def remote(self, items: list[Item]) -> FakeResponse:
        self.calls.append(FakeResponse(items))
        return self.calls[-1]

    def options(self, multiplexed_model_id: str) -> FakeHandle:
        self.affinity.append(multiplexed_model_id)
        return self


def remote_backend(handle: FakeHandle) -> Any:
    pytest.importorskip("ray")
    from tunnelvision.distributed.remote import ClusterStatus, RemoteBackend
    from tunnelvision.engine.backend import BackendInfo

    status = ClusterStatus("app", ["p"])
    info = BackendInfo("p", "ray:0", "remote", "float32")
    return RemoteBackend(handle, info, 30.0, status, reports_caches=True)  # type: ignore[arg-type]


def in_thread(work: Any) -> threading.Thread:
    """`work` on a thread, as the engine's device worker runs a batch."""
    thread = threading.Thread(target=work)
    thread.start()
    return thread


def test_a_call_whose_clients_all_left_is_cancelled_and_one_with_a_client_is_not() -> None:
    handle = FakeHandle()
    backend = remote_backend(handle)
    params = DetectParams(prompt="cat")
    gone, staying = backend.prepare(IMAGE, params), backend.prepare(IMAGE, params)
    outcome: list[Any] = []
    worker = in_thread(lambda: outcome.extend(backend.run_batch([(gone, params), (staying, params)])))
    wait_for(lambda: len(handle.calls) == 1, timeout_s=5)
    backend.abandon(gone)
    time.sleep(0.1)
    assert not handle.calls[0].cancelled, "one client of the batch is still waiting"
    backend.abandon(staying)
    wait_for(lambda: handle.calls[0].cancelled, timeout_s=5)  # no client left: cancelled
    worker.join(5)
    assert [type(o).__name__ for o in outcome] == ["Abandoned", "Abandoned"]


def test_abandoned_items_are_not_sent_and_a_finished_call_reports_its_replica() -> None:
    handle = FakeHandle()
    backend = remote_backend(handle)
    params = DetectParams(prompt="cat")
    gone, wanted = backend.prepare(IMAGE, params, "img-1"), backend.prepare(IMAGE, params, "img-1")
    backend.abandon(gone)  # its client left while the batch was queued
    outcome: list[Any] = []
    worker = in_thread(lambda: outcome.extend(backend.run_batch([(gone, params), (wanted, params)])))
    wait_for(lambda: len(handle.calls) == 1, timeout_s=5)
    assert len(handle.calls[0].items) == 1 and handle.affinity == ["img-1"]
    handle.calls[0].released.set()
    worker.join(5)
    assert type(outcome[0]).__name__ == "Abandoned" and outcome[1] == []
    assert backend.cache_stats() == {"hits": 2, "misses": 1}


def test_the_serve_app_is_named_by_machine_and_port() -> None:
    pytest.importorskip("ray")
    from support import make_settings
    from tunnelvision.distributed.remote import app_name

    settings = make_settings(port=8000)
    assert app_name(settings, "gpu-box-1") == "tunnelvision-gpu-box-1-8000"
    assert app_name(settings, "gpu-box-2") != app_name(settings, "gpu-box-1")
    assert app_name(make_settings(port=8001), "gpu-box-1") == "tunnelvision-gpu-box-1-8001"
    assert (
        app_name(settings, "odd name#1") == "tunnelvision-odd-name-1-8000"
    )  # '#' splits Serve's actor names
    assert app_name(settings).startswith("tunnelvision-") and app_name(settings).endswith("-8000")
    # `ray_app_name` (a setting) names it outright: a name that survives renaming the machine
    assert app_name(settings.model_copy(update={"ray_app_name": "shared-a"})) == "shared-a"
