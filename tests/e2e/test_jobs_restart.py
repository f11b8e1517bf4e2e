"""A job survives `kill -9` of the server and resumes on restart without redoing finished images."""

from __future__ import annotations

import signal
from pathlib import Path

import httpx

from support import cli_server, image_bytes, stats, wait_for
from tunnelvision.jobs.store import JobStore

IMAGES = 12


def test_kill_9_then_restart_finishes_the_job_without_redoing_images(
    tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    # A simulated device at 250 ms an image: slow enough to kill the server in the middle.
    flags = (
        "--backend",
        "simulated",
        "--simulated-batch-ms",
        "250",
        "--data-dir",
        str(tmp_path),
        "--no-warmup",
    )
    files = [
        ("images", (f"photo{i:02d}.png", image_bytes(32, 24, seed=i), "image/png")) for i in range(IMAGES)
    ]
    with cli_server(*tiny_models, *flags) as (url, process):
        job_id = httpx.post(f"{url}/v1/jobs", files=files, data={"prompt": "cat"}).json()["id"]
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job_id}").json()["done"] >= 3)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    store = JobStore(tmp_path / "jobs")
    row = store.get(job_id)
    assert row is not None and row.status == "running"
    done_before = row.done
    assert 3 <= done_before < IMAGES

    with cli_server(*tiny_models, *flags) as (url, _):
        wait_for(lambda: httpx.get(f"{url}/v1/jobs/{job_id}").json()["status"] == "done", timeout_s=60)
        status = httpx.get(f"{url}/v1/jobs/{job_id}").json()
        executed_after_restart = stats(url)["executed"]
        coco = httpx.get(f"{url}/v1/jobs/{job_id}/result").json()
    assert (status["done"], status["failed"]) == (IMAGES, 0)
    assert sorted(i["file_name"] for i in coco["images"]) == [f"photo{i:02d}.png" for i in range(IMAGES)]
    attempts = store.attempts(job_id)
    assert all(a == 1 for a in attempts[:done_before])  # finished before the kill: never redone
    assert sum(attempts) <= IMAGES + 1  # only the image on the device at the kill ran twice
    assert executed_after_restart in (IMAGES - done_before, IMAGES - done_before + 1)
    assert not (tmp_path / "jobs" / job_id).exists()  # uploads removed once the job is done
