"""The benchmark scripts stay runnable (their numbers come from runs on purpose, not from tests)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_benchmark_runs_in_smoke_mode() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--smoke", "--requests", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    measured = [line for line in result.stdout.splitlines() if line.endswith("x |")]
    # two paths (eager baseline, ours) for each pipeline of every family
    pipelines = {line.split("|")[1].strip() for line in measured}
    assert pipelines == {"grounded-sam", "mm-grounding-dino-sam", "owlv2-sam2.1", "sam3"}, result.stdout
    assert len(measured) == 8 and "device: cpu" in result.stdout


@pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="the SAM 2/3 video processors need torchvision"
)
def test_video_benchmark_runs_in_smoke_mode() -> None:
    """Every tracker family, the memory and the latency tables, on tiny models (about 30 s on 2 cores)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "video.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = [[cell.strip() for cell in line.split("|")[1:-1]] for line in result.stdout.splitlines()]
    families = [row for row in rows if row and row[-1].endswith("x")]
    assert [row[0] for row in families] == [
        "sam2-video",
        "sam3-tracker-video",
        "sam3-video",
        "grounding-dino + sam2-video",
    ], result.stdout
    assert all(row[3] == "4" and float(row[5]) > 0 for row in families), result.stdout  # frames, frames/s
    memory = [row for row in rows if row and row[0] in ("8", "16")]
    assert [row[0] for row in memory] == ["8", "16"], result.stdout  # every frame of each clip tracked
    latency = [row for row in rows if row and row[0] in ("none", "running")]
    assert [row[:2] for row in latency] == [["none", "-"], ["running", "2"]], result.stdout
    assert latency[1][2] != "-" and "device: cpu" in result.stdout  # chunks ran during the requests


def test_load_generator_refuses_other_hosts() -> None:
    sys.path.insert(0, str(ROOT))
    from bench.loadgen import require_loopback

    require_loopback("http://127.0.0.1:8000")
    with pytest.raises(SystemExit):
        require_loopback("http://10.0.0.5:8000")


def test_replica_benchmark_runs_in_smoke_mode() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "replicas.py"), "--smoke", "--images", "4", "--clients", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| trivial", "| realistic"))]
    assert len(rows) == 6, result.stdout  # 1, 2 and 4 replicas for each workload
    cells = [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows]
    assert all(int(row[5]) > 0 and row[6] == "0" for row in cells), result.stdout  # answers, no errors
    assert "scaling_4_vs_1=" in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="needs `pip install 'tunnelvision[ray]'`")
def test_ray_benchmark_runs_in_smoke_mode() -> None:
    """A local Ray cluster, a plain and two Ray servers (about 35 s on 2 cores)."""
    result = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "ray_serve.py"), "--smoke"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = [line for line in result.stdout.splitlines() if line.startswith(("| plain", "| Ray"))]
    assert len(rows) == 3, result.stdout  # plain, 1 and 2 Ray replicas
    cells = [[cell.strip() for cell in row.split("|")[1:-1]] for row in rows]
    assert all(int(row[6]) > 0 and row[7] == "0" for row in cells), result.stdout  # answers, no errors
    assert "ray_scaling_2_vs_1=" in result.stdout and "ray_hop_p50=" in result.stdout
