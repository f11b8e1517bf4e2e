"""`tunnelvision serve --ray` without `--ray-address`: it starts a local cluster on 127.0.0.1,
serves through it, and on SIGTERM leaves nothing running."""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import time
from pathlib import Path

import httpx
import pytest

pytest.importorskip("ray", reason="Ray mode needs `pip install 'tunnelvision[ray]'`")

from bench.ray_serve import descendants
from support import cli_server, image_bytes


def alive(pids: set[int]) -> set[int]:
    return {pid for pid in pids if Path(f"/proc/{pid}").exists() and "Z" not in _state(pid)}


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def test_a_local_cluster_is_started_served_through_and_stopped(tiny_models: tuple[Path, Path]) -> None:
    temp = tempfile.mkdtemp(prefix="tvray-")
    env = {"RAY_TMPDIR": temp}
    spawned: set[int] = set()
    try:
        with cli_server(*tiny_models, "--no-warmup", "--ray", "--backend", "simulated", env=env) as (
            url,
            process,
        ):
            spawned = descendants(process.pid)
            assert spawned, "the local cluster runs below the server"
            png = image_bytes(64, 48)
            response = httpx.post(
                f"{url}/v1/detect",
                files={"image": ("i.png", png, "image/png")},
                data={"prompt": "cat"},
                timeout=30,
            )
            assert response.status_code == 200, response.text
            process.send_signal(signal.SIGTERM)
            process.wait(30)  # uvicorn re-raises the signal once done: Ray's handler exits with 15
        deadline = time.monotonic() + 10
        while alive(spawned) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not alive(spawned), f"left running: {alive(spawned)}"
    finally:
        for pid in alive(spawned):  # what a failed run left: end it by id
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)
