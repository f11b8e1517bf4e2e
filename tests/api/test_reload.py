"""Replacing a pipeline's weights while serving, over real HTTP: clients sending all along see no
failure and, after the switch, the new weights' answers; a load that fails leaves the old copy
serving; reloads need the admin scope and come one at a time; the old models are freed."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import FakeBackend, ThreadServer, cli_server, image_bytes, make_settings, wait_for
from tunnelvision.client import AsyncClient, Client, InvalidRequest
from tunnelvision.config import PipelineSpec, Settings
from tunnelvision.engine.backend import Backend
from tunnelvision.engine.reload import Swap
from tunnelvision.models.factory import build_backends, replace_pipeline
from tunnelvision.models.random import write_random_models
from tunnelvision.security.keys import KeyStore

PNG = image_bytes(64, 48)
BOX = [[4, 4, 40, 30]]
MAX_REQUESTS_PER_CLIENT = 400


@pytest.fixture(scope="module")
def reseeded(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """The same tiny architectures with other random weights (seed 1): other boxes and scores."""
    return write_random_models(tmp_path_factory.mktemp("seed1"), "tiny", seed=1)


@pytest.fixture
def served(tiny_models: tuple[Path, Path]) -> Iterator[ThreadServer]:
    """grounded-sam (detector + segmenter) and `sam`, the same segmenter object alone."""
    detector, segmenter = tiny_models
    settings = make_settings(
        detector=str(detector), segmenter=str(segmenter), pipeline=[f"sam={segmenter}"], max_batch=1
    )
    (backend,) = build_backends(settings)
    with ThreadServer(settings, backend) as server:
        # ThreadServer's factory closes over the backend it was handed; a real server's keeps
        # none, and that reference would keep replaced models alive.
        server.state.backend_factory = build_backends
        del backend
        yield server


def segment(url: str, **fields: Any) -> httpx.Response:
    data = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in fields.items()}
    return httpx.post(
        f"{url}/v1/segment", files={"image": ("i.png", PNG, "image/png")}, data=data, timeout=60
    )


def answer(url: str) -> Any:
    """What grounded-sam finds: its detector's boxes and scores and its segmenter's masks."""
    response = segment(url, prompt="cat . dog", box_threshold=0.0, max_detections=3)
    assert response.status_code == 200, response.text
    return response.json()["detections"]


def sam_answer(url: str) -> Any:
    response = segment(url, boxes=BOX, model="sam")
    assert response.status_code == 200, response.text
    return response.json()["detections"]


def reload(url: str, source: str | None = None, key: str | None = None) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    body = {} if source is None else {"source": source}
    return httpx.post(f"{url}/v1/models/grounded-sam/reload", json=body, headers=headers, timeout=60)


def pipelines(url: str) -> dict[str, Any]:
    return {p["name"]: p for p in httpx.get(f"{url}/v1/models", timeout=10).json()["pipelines"]}


class Traffic:
    """Clients that keep asking grounded-sam the same question, one request after another."""

    def __init__(self, url: str, clients: int = 2) -> None:
        self.url = url
        self.stop = threading.Event()
        self.answers: list[list[tuple[float, int, Any]]] = [[] for _ in range(clients)]
        self.threads = [threading.Thread(target=self._run, args=(a,)) for a in self.answers]

    def _run(self, answers: list[tuple[float, int, Any]]) -> None:
        while not self.stop.is_set() and len(answers) < MAX_REQUESTS_PER_CLIENT:
            response = segment(self.url, prompt="cat . dog", box_threshold=0.0, max_detections=3)
            ok = response.status_code == 200
            answers.append(
                (time.monotonic(), response.status_code, response.json()["detections"] if ok else None)
            )

    def __enter__(self) -> Traffic:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(60)

    def count_after(self, moment: float) -> int:
        return sum(1 for answers in self.answers for at, _, _ in answers if at > moment)


def gated(release: threading.Event, loaded: threading.Event) -> Any:
    """The real reloader, held once the new weights are loaded (beside the old) until `release`."""

    def reloader(settings: Settings, spec: PipelineSpec, current: Sequence[Backend]) -> Swap:
        swap = replace_pipeline(settings, spec, current)
        loaded.set()
        assert release.wait(60)
        return swap

    return reloader


def test_weights_swap_under_traffic_with_no_failure_and_the_old_copy_is_freed(
    served: ThreadServer, reseeded: tuple[Path, Path], tiny_models: tuple[Path, Path]
) -> None:
    url, engine = served.url, served.state.engine
    before, before_sam = answer(url), sam_answer(url)
    old_pipeline = engine.backends[0].pipelines["grounded-sam"]
    old_detector, shared_segmenter = weakref.ref(old_pipeline.detector), old_pipeline.segmenter
    del old_pipeline
    release, loaded = threading.Event(), threading.Event()
    served.state.reloader = gated(release, loaded)
    source = f"{reseeded[0]}+{reseeded[1]}"
    replies: list[httpx.Response] = []
    with Traffic(url) as traffic:
        reloading = threading.Thread(target=lambda: replies.append(reload(url, source)))
        reloading.start()
        wait_for(loaded.is_set, 60)
        # New weights in memory beside the old: everything is still served, by the old copy.
        held = time.monotonic()
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
        assert httpx.get(f"{url}/readyz", timeout=5).status_code == 200
        wait_for(lambda: traffic.count_after(held) >= 4, 60)
        release.set()
        reloading.join(60)
        switched = time.monotonic()
        wait_for(lambda: traffic.count_after(switched) >= 4, 60)
    (reply,) = replies
    assert reply.status_code == 200, reply.text
    after = answer(url)
    assert after != before  # other random weights: other boxes, scores and masks
    for answers in traffic.answers:
        statuses = {status for _, status, _ in answers}
        assert statuses == {200}, statuses  # zero failed requests
        seen = ["old" if a == before else "new" if a == after else "mixed" for _, _, a in answers]
        assert "mixed" not in seen  # each request ran wholly on one copy
        assert seen == sorted(seen, key=["old", "new"].index)  # once switched, never back
        assert seen[-1] == "new"
    assert all(a == before for answers in traffic.answers for at, _, a in answers if at <= held)

    body = reply.json()
    assert body["drained"] is True and body["load_s"] >= 0 and body["warmup_s"] >= 0
    assert body["pipeline"]["generation"] == 2 and body["pipeline"]["source"] == source
    listed = pipelines(url)
    assert listed["grounded-sam"] == body["pipeline"]
    assert [m["id"] for m in listed["grounded-sam"]["models"]] == [str(p) for p in reseeded]
    assert listed["sam"]["generation"] == 1 and listed["sam"]["source"] == str(tiny_models[1])
    assert listed["sam"]["loaded_at"] <= listed["grounded-sam"]["loaded_at"]

    # The segmenter `sam` shares stays, the same object; the old detector is gone from memory.
    assert engine.backends[0].pipelines["sam"].segmenter is shared_segmenter
    assert sam_answer(url) == before_sam
    wait_for(lambda: gc.collect() >= 0 and old_detector() is None, 10)


def test_a_failed_load_leaves_the_old_copy_serving_with_the_reason(
    served: ThreadServer, tmp_path: Path
) -> None:
    url = served.url
    before = answer(url)
    missing = reload(url, str(tmp_path / "no-such-detector"))
    assert missing.status_code == 422, missing.text
    error = missing.json()["error"]
    assert error["code"] == "reload_failed" and "no-such-detector" in error["message"]
    assert "does not exist" in error["message"]
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text('{"model_type": "sam"}')  # no weights
    broken = reload(url, str(tmp_path / "broken"))
    assert broken.status_code == 422 and broken.json()["error"]["code"] == "reload_failed", broken.text
    for spec in ("a+b+c", "detector+"):
        bad = reload(url, spec)
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_input", bad.text
        assert "must be DETECTOR+SEGMENTER or one model" in bad.json()["error"]["message"]
    unknown = httpx.post(f"{url}/v1/models/nope/reload", timeout=10)
    assert unknown.status_code == 404 and "grounded-sam, sam" in unknown.json()["error"]["message"]
    assert answer(url) == before
    assert pipelines(url)["grounded-sam"]["generation"] == 1


def test_reloading_the_same_sources_gives_the_same_answers_from_new_objects(served: ThreadServer) -> None:
    url, engine = served.url, served.state.engine
    before = answer(url)
    old_detector = weakref.ref(engine.backends[0].pipelines["grounded-sam"].detector)
    with Client(url) as client:
        reloaded = client.reload_model("grounded-sam")  # no body: the current sources again
    assert reloaded.pipeline.generation == 2 and reloaded.drained
    # Freed although the idle device worker still holds its last batch (run on the old copy).
    wait_for(lambda: gc.collect() >= 0 and old_detector() is None, 10)
    assert answer(url) == before


@pytest.fixture
def keyed() -> Iterator[tuple[ThreadServer, dict[str, str]]]:
    store = KeyStore(Path(make_settings().data_dir) / "keys.json")
    keys = {
        name: store.add(name, scopes)
        for name, scopes in {"user": ("predict", "jobs"), "ops": ("admin",)}.items()
    }
    settings = make_settings(keys_file=store.path, rate_limit_per_minute=0, max_inflight_per_client=0)
    with ThreadServer(settings, FakeBackend()) as server:
        yield server, keys


def held_reloader(release: threading.Event, entered: threading.Event) -> Any:
    def reloader(settings: Settings, spec: PipelineSpec, current: Sequence[Backend]) -> Swap:
        entered.set()
        assert release.wait(30)
        return Swap([FakeBackend()], lambda old: None)

    return reloader


def test_reload_needs_admin_and_a_second_one_waits_its_turn(
    keyed: tuple[ThreadServer, dict[str, str]],
) -> None:
    server, keys = keyed
    refused = reload(server.url, key=keys["user"])
    assert refused.status_code == 403 and "admin" in refused.json()["error"]["message"]
    release, entered = threading.Event(), threading.Event()
    server.state.reloader = held_reloader(release, entered)
    first: list[Any] = []

    async def admin_reload() -> Any:
        async with AsyncClient(server.url, keys["ops"]) as client:
            return await client.reload_model("grounded-sam")

    import asyncio

    thread = threading.Thread(target=lambda: first.append(asyncio.run(admin_reload())))
    thread.start()
    wait_for(entered.is_set)
    second = reload(server.url, key=keys["ops"])
    assert second.status_code == 409 and second.json()["error"]["code"] == "reload_in_progress"
    detect = httpx.post(
        f"{server.url}/v1/detect",
        files={"image": ("i.png", PNG)},
        data={"prompt": "cat"},
        headers={"X-API-Key": keys["user"]},
        timeout=10,
    )
    assert detect.status_code == 200  # served while the load runs
    release.set()
    thread.join(30)
    assert first[0].pipeline.generation == 2
    assert reload(server.url, key=keys["ops"]).status_code == 200  # the next one is welcome


def test_a_loader_crash_is_a_clear_422_and_a_simulated_device_cannot_reload(
    keyed: tuple[ThreadServer, dict[str, str]],
) -> None:
    server, keys = keyed
    simulated = reload(server.url, key=keys["ops"])
    assert simulated.status_code == 422 and "simulated" in simulated.json()["error"]["message"]

    def crash(settings: Settings, spec: PipelineSpec, current: Sequence[Backend]) -> Swap:
        raise RuntimeError("disk on fire\ntraceback details")

    server.state.reloader = crash
    with Client(server.url, keys["ops"]) as client, pytest.raises(InvalidRequest) as failed:
        client.reload_model("grounded-sam", "/models/new")
    assert failed.value.status == 422 and failed.value.code == "reload_failed"
    assert failed.value.message == "the new weights did not load: RuntimeError: disk on fire"


def test_models_reload_command(
    tiny_models: tuple[Path, Path], reseeded: tuple[Path, Path], tmp_path: Path
) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "tunnelvision.cli", "models", "reload", "grounded-sam", *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=120)

    with cli_server(*tiny_models) as (url, _):
        source = f"{reseeded[0]}+{reseeded[1]}"
        done = run("--url", url, "--source", source)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(f"reloaded grounded-sam: generation 2 from {source}")
        failed = run("--url", url, "--source", str(tmp_path / "gone"))
        assert failed.returncode == 1
        assert "422 reload_failed" in failed.stderr and str(tmp_path / "gone") in failed.stderr
        assert pipelines(url)["grounded-sam"]["generation"] == 2
