"""`tunnelvision predict` on a clip and an image together, as a user runs it (a subprocess), against
`tunnelvision serve` with a tiny random SAM 2 video tracker: the clip's exports under --out (the
MP4 decodes to every frame), the job deleted from the server afterwards, a rerun that skips the
clip, and one-line messages for what cannot work."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import av
import httpx
import pytest

from support import image_bytes, video_cli_server
from tunnelvision.video.synthetic import write_moving_square_clip

FRAMES, WIDTH, HEIGHT = 10, 96, 64
TRACK = ("--video-model", "track", "--video-boxes", "[[0,20,20,40]]")


@pytest.fixture(scope="module")
def server(
    tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, str]]:
    """(url, a key that may run jobs, a key that may not)."""
    folder = tmp_path_factory.mktemp("video")
    with video_cli_server(tiny_models, folder, ["predict", "jobs"], ["predict"]) as (
        url,
        (jobs, images_only),
    ):
        yield url, jobs, images_only


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    root = tmp_path / "inputs"
    (root / "street").mkdir(parents=True)
    write_moving_square_clip(root / "street" / "square.mp4", FRAMES, WIDTH, HEIGHT, fps=10)
    (root / "photo.png").write_bytes(image_bytes(64, 48, seed=3))
    return root


def predict(url: str, key: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELVISION_")}
    return subprocess.run(
        [sys.executable, "-m", "tunnelvision.cli", "predict", "--url", url, "--key", key, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**env, "COLUMNS": "120"},
    )


def test_a_clip_and_an_image_together(server: tuple[str, str, str], inputs: Path, tmp_path: Path) -> None:
    url, key, _ = server
    out = tmp_path / "out"
    first = (str(inputs), "--prompt", "square", "--box-threshold", "0", *TRACK, "--out", str(out))
    done = predict(url, key, *first)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().endswith("2 done, 0 skipped (already done), 0 failed"), done.stdout
    written = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    clip = "street/square.mp4"
    assert {f"{clip}.video.json", f"{clip}.mot.txt", f"{clip}.overlay.mp4", "photo.png.json"} <= set(written)

    result = json.loads((out / f"{clip}.video.json").read_text())
    assert result["status"] == "done" and [f["frame"] for f in result["frames"]] == list(range(FRAMES))
    assert result["objects"][0]["first_frame"] == 0 and result["objects"][0]["last_frame"] == FRAMES - 1
    assert len((out / f"{clip}.mot.txt").read_text().splitlines()) == FRAMES
    with av.open(str(out / f"{clip}.overlay.mp4"), "r") as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (WIDTH, HEIGHT)
        assert len(list(container.decode(stream))) == FRAMES
    listed = httpx.get(f"{url}/v1/videos", headers={"Authorization": f"Bearer {key}"}, timeout=10).json()
    assert listed["videos"] == []  # downloaded, so deleted from the server

    again = predict(url, key, *first)  # the clip's exports are there: skipped (the image: no --coco)
    assert again.returncode == 0 and "1 done, 1 skipped" in again.stdout, again.stdout + again.stderr


def test_only_some_exports_and_a_frame_range(
    server: tuple[str, str, str], inputs: Path, tmp_path: Path
) -> None:
    url, key, _ = server
    out = tmp_path / "out"
    clip = inputs / "street" / "square.mp4"
    flags = ("--video-formats", "json,mot", "--start", "2", "--stride", "3")
    done = predict(url, key, str(clip), *TRACK, "--video-frame", "2", *flags, "--out", str(out))
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in out.iterdir()) == ["square.mp4.mot.txt", "square.mp4.video.json"]
    result = json.loads((out / "square.mp4.video.json").read_text())
    assert [f["frame"] for f in result["frames"]] == [2, 5, 8]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((*TRACK,), "clips need --out"),
        (("--video-model", "track", "--out", "x"), "clips need something to follow"),
        (("--video-boxes", "[1, 2]", "--out", "x"), "--video-boxes: '[1, 2]' is not a JSON list of lists"),
        (("--video-formats", "gif", *TRACK, "--out", "x"), "choose from json, mot, mp4"),
    ],
)
def test_flags_that_cannot_work_are_one_clear_line(
    server: tuple[str, str, str], inputs: Path, args: tuple[str, ...], message: str
) -> None:
    url, key, _ = server
    done = predict(url, key, str(inputs / "street"), *args)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_server_refusals_are_named(server: tuple[str, str, str], inputs: Path, tmp_path: Path) -> None:
    url, key, images_only = server
    clip, out = str(inputs / "street"), str(tmp_path / "out")
    wrong = predict(url, key, clip, "--video-model", "track", "--prompt", "square", "--out", out)
    assert wrong.returncode == 1, wrong.stderr
    assert "failed: square.mp4: 422 unsupported_prompt" in wrong.stderr and "1 failed" in wrong.stdout
    refused = predict(url, images_only, clip, *TRACK, "--out", out)
    assert refused.returncode == 1 and "stopped: the server refused access" in refused.stderr
    assert "'jobs' scope" in refused.stderr and "Traceback" not in refused.stderr
