"""Reliability under faults, against real servers: poisoned jobs, a failing database, a full disk,
a lost device, deadlines in every stage, bounded work per request, and cached images that
belong to the key that sent them."""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from support import FakeBackend, ThreadServer, cli_server, image_bytes, make_settings, wait_for
from tunnelvision.jobs.store import JobStore, Upload
from tunnelvision.models.grounded_sam import GroundedSam
from tunnelvision.models.simulated import SIMULATED_DEVICE_LOSS
from tunnelvision.security.keys import KeyStore

PNG = image_bytes(64, 48)
UNLIMITED = {"rate_limit_per_minute": 0}  # the tests poll job status faster than a client would


def images(count: int, seed: int = 0) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [
        ("images", (f"img{i}.png", image_bytes(40 + i, 30, seed=seed + i), "image/png")) for i in range(count)
    ]


def submit(
    url: str, files: Any, prompt: str = "cat", headers: dict[str, str] | None = None
) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs", files=files, data={"prompt": prompt}, headers=headers)


def job(url: str, job_id: str, headers: dict[str, str] | None = None) -> dict[str, Any]:
    body: dict[str, Any] = httpx.get(f"{url}/v1/jobs/{job_id}", headers=headers).json()
    return body


def segment(url: str, headers: dict[str, str] | None = None, **fields: Any) -> httpx.Response:
    """Multipart with the picture; JSON when naming an earlier `image_id` instead."""
    if "image_id" in fields:
        return httpx.post(f"{url}/v1/segment", json=fields, headers=headers, timeout=30)
    files = {"image": ("i.png", PNG, "image/png")}
    return httpx.post(f"{url}/v1/segment", files=files, data=fields, headers=headers, timeout=30)


def job_folders(server: ThreadServer) -> list[Path]:
    return [p for p in server.state.jobs.folder.iterdir() if p.is_dir()]


@pytest.fixture
def two_keys(tmp_path: Path) -> tuple[Path, dict[str, str], dict[str, str]]:
    keys = tmp_path / "keys.json"
    store = KeyStore(keys)
    return keys, {"X-API-Key": store.add("alice")}, {"X-API-Key": store.add("bob")}


# -- the job runner ------------------------------------------------------------------------------


def test_a_job_queued_behind_a_poisoned_one_still_finishes(fake: FakeBackend) -> None:
    """Every image of the first job runs the device out of memory (a retryable error): it used to
    be retried forever at the head of the queue. Now jobs take turns and each image gets 3 tries."""
    with ThreadServer(make_settings(job_max_attempts=3, **UNLIMITED), fake) as srv:
        poisoned = submit(srv.url, images(2), prompt="oom").json()["id"]
        healthy = submit(srv.url, images(2, seed=5), prompt="cat").json()["id"]
        wait_for(lambda: job(srv.url, healthy)["status"] == "done", timeout_s=10)
        wait_for(lambda: job(srv.url, poisoned)["status"] == "failed", timeout_s=20)
        failed = job(srv.url, poisoned)
        assert (failed["done"], failed["failed"]) == (0, 2)
        assert [e["file_name"] for e in failed["errors"]] == ["img0.png", "img1.png"]
        assert all("failed 3 times: the GPU ran out of memory" in e["error"] for e in failed["errors"])
        assert srv.state.jobs.attempts(poisoned) == [3, 3]


def test_an_image_that_keeps_crashing_the_server_is_given_up(fake: FakeBackend) -> None:
    """Attempts count across restarts: an image the server died on 3 times is recorded failed,
    as is one whose stored file vanished; the rest of the job finishes."""
    settings = make_settings(job_max_attempts=3, **UNLIMITED)
    store = JobStore(settings.data_dir / "jobs")
    uploads = [Upload(f"img{i}.png", image_bytes(seed=i)) for i in range(3)]
    job_id = store.create("anonymous", uploads, {"prompt": "cat"}, ["cat"], 10**9)
    for _ in range(3):  # three starts on image 0, each ended by a crash
        store.start_item(job_id, 0)
    (store.folder / job_id / "00001").unlink()
    with ThreadServer(settings, fake) as srv:
        wait_for(lambda: job(srv.url, job_id)["status"] == "done")
        status = job(srv.url, job_id)
    assert (status["done"], status["failed"]) == (1, 2)
    assert status["errors"] == [
        {"file_name": "img0.png", "error": "failed 3 times: the server stopped while working on it"},
        {"file_name": "img1.png", "error": "the stored image is missing or unreadable"},
    ]
    assert fake.executed == 1  # image 0 never reached the device again


def test_the_runner_survives_database_errors(
    fake: FakeBackend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with ThreadServer(make_settings(**UNLIMITED), fake) as srv:
        store, failures = srv.state.jobs, list[int]()
        real_next_pending = store.next_pending

        def flaky(*args: Any) -> Any:
            if len(failures) < 2:
                failures.append(1)
                raise sqlite3.OperationalError("disk I/O error")
            return real_next_pending(*args)

        monkeypatch.setattr(store, "next_pending", flaky)
        with caplog.at_level(logging.ERROR, logger="tunnelvision.jobs.runner"):
            job_id = submit(srv.url, images(2)).json()["id"]
            wait_for(lambda: job(srv.url, job_id)["status"] == "done")
    lines = [r for r in caplog.records if r.name == "tunnelvision.jobs.runner"]
    assert len(lines) == 2 and "disk I/O error" in lines[0].getMessage()
    assert all(r.exc_info is None for r in lines)  # one line each, no traceback


# -- job results: retention, deletion, quotas, a full disk -----------------------------------------


def test_finished_jobs_expire_with_their_results(fake: FakeBackend) -> None:
    with ThreadServer(make_settings(jobs_retention_s=1.0, **UNLIMITED), fake) as srv:
        job_id = submit(srv.url, images(1)).json()["id"]
        wait_for(lambda: httpx.get(f"{srv.url}/v1/jobs/{job_id}").status_code == 404, timeout_s=10)
        assert httpx.get(f"{srv.url}/v1/jobs/{job_id}/result").status_code == 404
        assert srv.state.jobs.results(job_id) == [] and job_folders(srv) == []


def test_deleting_a_finished_job_removes_its_results(server: ThreadServer) -> None:
    job_id = submit(server.url, images(2)).json()["id"]
    wait_for(lambda: job(server.url, job_id)["status"] == "done")
    deleted = httpx.delete(f"{server.url}/v1/jobs/{job_id}")
    assert deleted.status_code == 200 and deleted.json()["status"] == "done"
    for path in (f"/v1/jobs/{job_id}", f"/v1/jobs/{job_id}/result"):
        gone = httpx.get(f"{server.url}{path}")
        assert gone.status_code == 404 and gone.json()["error"]["code"] == "not_found"
    assert server.state.jobs.results(job_id) == [] and job_folders(server) == []


def test_each_key_has_its_own_jobs_quota(two_keys: tuple[Path, dict[str, str], dict[str, str]]) -> None:
    keys, alice, bob = two_keys
    one_job = sum(len(data) for _, (_, data, _) in images(2))
    settings = make_settings(keys_file=keys, rate_limit_per_minute=0, jobs_owner_quota_bytes=one_job + 100)
    with ThreadServer(settings, FakeBackend(cost_s=1.0)) as srv:  # jobs stay unfinished meanwhile
        accepted = submit(srv.url, images(2), headers=alice)
        assert accepted.status_code == 202
        refused = submit(srv.url, images(2), headers=alice)
        assert refused.status_code == 507 and refused.json()["error"]["code"] == "quota_exceeded"
        assert submit(srv.url, images(2), headers=bob).status_code == 202
        alices_job = srv.state.jobs.get(accepted.json()["id"])
        assert alices_job is not None and alices_job.owner.startswith("key:alice#")
        assert srv.state.jobs.bytes_used(alices_job.owner) == one_job


def test_a_full_disk_mid_upload_leaves_nothing_behind(
    server: ThreadServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_write_bytes, written = Path.write_bytes, list[Path]()

    def disk_fills_up(path: Path, data: Any) -> int:
        if server.state.jobs.folder in path.parents:
            if written:
                raise OSError(errno.ENOSPC, "No space left on device")
            written.append(path)
        return real_write_bytes(path, data)

    monkeypatch.setattr(Path, "write_bytes", disk_fills_up)
    refused = submit(server.url, images(3))
    assert refused.status_code == 507, refused.text
    assert refused.json()["error"]["code"] == "insufficient_storage"
    assert written and not written[0].exists()  # the file that did fit was removed again
    assert job_folders(server) == [] and server.state.jobs.bytes_used() == 0


# -- a lost device ends the process (for systemd/Docker to restart it) ------------------------------


def metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics").text.splitlines():
        if line.startswith(f"{name} "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def test_a_lost_device_fails_its_waiters_and_exits_non_zero() -> None:
    unused = Path("/nonexistent/models")
    flags = ("--backend", "simulated", "--simulated-batch-ms", "700", "--no-warmup", "--public-metrics")
    with cli_server(unused, unused, *flags) as (url, process), ThreadPoolExecutor(3) as pool:
        first = pool.submit(segment, url, prompt="cat")
        wait_for(lambda: metric(url, "tunnelvision_running") == 1)
        lost = pool.submit(segment, url, prompt=SIMULATED_DEVICE_LOSS)
        wait_for(lambda: metric(url, "tunnelvision_queue_depth") == 1)
        waiter = pool.submit(segment, url, prompt="dog")
        wait_for(lambda: metric(url, "tunnelvision_queue_depth") == 2)
        assert first.result().status_code == 200
        for response in (lost.result(), waiter.result()):
            assert response.status_code == 503 and "retry-after" in response.headers
            assert response.json()["error"]["code"] == "worker_unavailable"
        assert process.wait(30) == 1


# -- deadlines and bounded work --------------------------------------------------------------------


@pytest.fixture
def sam_server(tiny_models: tuple[Path, Path]) -> Iterator[ThreadServer]:
    """Tiny random GroundedSAM on the CPU, one CPU thread, a 1.5 s deadline."""
    backend = GroundedSam(str(tiny_models[0]), str(tiny_models[1]), "cpu")
    with ThreadServer(make_settings(deadline_s=1.5, cpu_threads=1), backend) as srv:
        yield srv


def test_mask_encoding_stops_at_the_deadline(sam_server: ThreadServer) -> None:
    """256 full-size masks of a 6 MP image take the CPU ~15 s to upscale and encode: the answer
    is a 504 at the deadline, and the CPU thread is free again right after (it stopped)."""
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 2000), (90, 120, 150)).save(buffer, format="PNG")
    boxes = [[i, i, 2000 + i, 1500] for i in range(256)]
    began = time.monotonic()
    late = httpx.post(
        f"{sam_server.url}/v1/segment",
        files={"image": ("big.png", buffer.getvalue(), "image/png")},
        data={"boxes": json.dumps(boxes), "mask_format": "rle"},
        timeout=60,
    )
    assert late.status_code == 504 and late.json()["error"]["code"] == "deadline_exceeded"
    assert time.monotonic() - began < 4.0
    began = time.monotonic()
    assert segment(sam_server.url, boxes="[[0, 0, 20, 20]]").status_code == 200
    assert time.monotonic() - began < 4.0  # not queued behind ~15 s of abandoned mask encoding


def test_work_per_request_is_bounded_before_the_device(fake: FakeBackend) -> None:
    with ThreadServer(make_settings(max_mask_pixels=100_000), fake) as srv:
        refused = segment(srv.url, prompt="cat", max_detections="100")  # 100 masks x 64x48
        assert refused.status_code == 422, refused.text
        error = refused.json()["error"]
        assert error["code"] == "request_too_costly"
        assert all(n in error["message"] for n in ("100 masks", "64x48", "307200", "100000"))
        assert fake.executed == 0
        assert segment(srv.url, prompt="cat", max_detections="10").status_code == 200


# -- cached images belong to their sender ----------------------------------------------------------


def test_an_image_id_is_private_to_the_key_that_sent_the_image(
    two_keys: tuple[Path, dict[str, str], dict[str, str]],
) -> None:
    keys, alice, bob = two_keys
    with ThreadServer(make_settings(keys_file=keys, rate_limit_per_minute=0), FakeBackend()) as srv:
        image_id = segment(srv.url, alice, prompt="cat").json()["image_id"]
        assert segment(srv.url, alice, prompt="cat").json()["image_id"] == image_id  # a cache hit
        assert segment(srv.url, alice, image_id=image_id, prompt="dog").status_code == 200

        stolen = segment(srv.url, bob, image_id=image_id, prompt="cat")
        unknown_id = "0" * len(image_id)
        unknown = segment(srv.url, bob, image_id=unknown_id, prompt="cat")
        assert stolen.status_code == unknown.status_code == 404
        assert stolen.json()["error"]["code"] == unknown.json()["error"]["code"] == "not_found"
        assert (
            stolen.json()["error"]["message"].replace(image_id, unknown_id)
            == (unknown.json()["error"]["message"])
        )

        bobs_id = segment(srv.url, bob, prompt="cat").json()["image_id"]  # the same picture
        assert bobs_id != image_id
    assert hashlib.sha256(PNG).hexdigest()[:32] not in (image_id, bobs_id)  # not a bare content hash


def test_a_new_key_under_a_revoked_keys_name_sees_none_of_its_jobs_or_images(
    two_keys: tuple[Path, dict[str, str], dict[str, str]],
) -> None:
    keys, alice, _ = two_keys
    with ThreadServer(make_settings(keys_file=keys, rate_limit_per_minute=0), FakeBackend()) as srv:
        job_id = submit(srv.url, images(1), headers=alice).json()["id"]
        image_id = segment(srv.url, alice, prompt="cat").json()["image_id"]
        store = KeyStore(keys)
        store.revoke("alice")
        new_alice = {"X-API-Key": store.add("alice")}  # the same name, another key
        assert httpx.get(f"{srv.url}/v1/jobs/{job_id}", headers=new_alice).status_code == 404
        assert segment(srv.url, new_alice, image_id=image_id, prompt="cat").status_code == 404
        assert httpx.get(f"{srv.url}/v1/jobs/{job_id}", headers=alice).status_code == 401  # revoked
