"""Video jobs under stress, with the real server: `kill -9` mid-clip resumes from the last
committed frame (never from the start), a delete frees the device within one chunk, and an image
request sent during a video job waits for one chunk, not for the clip."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import cli_server, image_bytes, stats, wait_for
from tunnelvision.jobs.store import JobStore
from tunnelvision.models.random_families import write_random_family
from tunnelvision.video.store import VideoStore
from tunnelvision.video.synthetic import write_moving_square_clip

FRAMES, WIDTH, HEIGHT, CHUNK = 300, 96, 64, 4
BOX = "[[8, 8, 40, 40]]"


@pytest.fixture(scope="module")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_family(
        tmp_path_factory.mktemp("tracker") / "sam2-video", "sam2-video", "tiny", seed=1
    )


@pytest.fixture(scope="module")
def long_clip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_moving_square_clip(
        tmp_path_factory.mktemp("clip") / "long.mp4", FRAMES, WIDTH, HEIGHT, fps=25
    )


def flags(tracker: Path, data: Path) -> list[str]:
    return ["--pipeline", f"track={tracker}", "--video-chunk-frames", str(CHUNK), "--data-dir", str(data)]


def start_job(url: str, clip: Path) -> str:
    with clip.open("rb") as file:
        answer = httpx.post(f"{url}/v1/videos", files={"video": file}, data={"model": "track", "boxes": BOX})
    assert answer.status_code == 202, answer.text
    return str(answer.json()["id"])


def status(url: str, video_id: str) -> dict[str, Any]:
    answer: dict[str, Any] = httpx.get(f"{url}/v1/videos/{video_id}").json()
    return answer


def committed(data: Path, video_id: str) -> dict[int, int]:
    """frame -> revision, read from the store on disk."""
    return {f.frame: f.revision for f in VideoStore(JobStore(data / "jobs")).results(video_id)}


def test_kill_9_mid_clip_resumes_at_the_last_committed_frame(
    tiny_models: tuple[Path, Path], tracker: Path, long_clip: Path, tmp_path: Path
) -> None:
    with cli_server(*tiny_models, *flags(tracker, tmp_path)) as (url, process):
        video_id = start_job(url, long_clip)
        wait_for(lambda: status(url, video_id)["frames_done"] >= 40, timeout_s=120)
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    before = committed(tmp_path, video_id)
    assert 40 <= len(before) < FRAMES
    assert sorted(before) == list(range(len(before)))  # committed in order, chunk by chunk

    with cli_server(*tiny_models, *flags(tracker, tmp_path)) as (url, _):
        wait_for(lambda: status(url, video_id)["status"] == "done", timeout_s=180)
        result = httpx.get(f"{url}/v1/videos/{video_id}/result").json()
    after = committed(tmp_path, video_id)
    assert {frame: after[frame] for frame in before} == before  # nothing committed was tracked again
    assert max(after.values()) == FRAMES  # one commit per frame: the clip was not started over
    assert [f["frame"] for f in result["frames"]] == list(range(FRAMES))
    assert all([o["id"] for o in f["objects"]] == [1] for f in result["frames"])  # the same object


def test_delete_frees_the_device_within_one_chunk(
    tiny_models: tuple[Path, Path], tracker: Path, long_clip: Path, tmp_path: Path
) -> None:
    with cli_server(*tiny_models, *flags(tracker, tmp_path)) as (url, _):
        video_id = start_job(url, long_clip)
        wait_for(lambda: status(url, video_id)["frames_done"] >= 2 * CHUNK, timeout_s=120)
        assert httpx.delete(f"{url}/v1/videos/{video_id}").status_code == 204
        ran_at_delete = stats(url).get("executed", 0)
        time.sleep(2.0)  # many chunks' time on this clip
        assert stats(url).get("executed", 0) - ran_at_delete <= 1  # at most the chunk already running
        assert not (tmp_path / "videos" / video_id).exists()


def test_an_image_request_waits_for_one_chunk_not_for_the_clip(
    tiny_models: tuple[Path, Path], tracker: Path, long_clip: Path, tmp_path: Path
) -> None:
    with cli_server(*tiny_models, *flags(tracker, tmp_path)) as (url, _):
        began = time.monotonic()
        video_id = start_job(url, long_clip)
        wait_for(lambda: status(url, video_id)["frames_done"] >= 5 * CHUNK, timeout_s=120)
        done = status(url, video_id)["frames_done"]
        chunk_s = (time.monotonic() - began) / (done / CHUNK)  # an upper bound: upload and polls included
        waits = []
        for seed in range(5):
            answer = httpx.post(
                f"{url}/v1/segment",
                files={"image": ("photo.png", image_bytes(64, 48, seed=seed))},
                data={"boxes": json.dumps([[4, 4, 40, 30]])},
                timeout=60,
            )
            assert answer.status_code == 200, answer.text
            waits.append(answer.json()["timings_ms"]["queue"] / 1000)
        still = status(url, video_id)
    assert still["status"] == "running" and still["frames_done"] < FRAMES  # answered mid-clip
    assert max(waits) <= 2 * chunk_s + 0.5, (waits, chunk_s)
