"""The replica's side of the Ray hop without Ray (runs everywhere): each item on its own
deadline, one bad item one failure, batches grouped by the backend's key."""

from __future__ import annotations

from typing import Any

import numpy as np

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
