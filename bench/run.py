"""tunnelvision vs the seed design, side by side in one run (ratios, since machines are noisy).

    python bench/run.py --quick      # under 3 minutes on 2 CPU cores
    python bench/run.py              # longer runs, 2,000 requests for the memory drift

Prints a table of measures against the targets of the throughput issue and ends with
`throughput_ratio_vs_seed=<x>` (simulated device, 16 clients). Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loadgen import LoadResult, run_load

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Measure:
    name: str
    value: float
    unit: str
    target: str
    ok: bool


def test_image(width: int = 640, height: int = 480) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def segment_request(png: bytes) -> dict[str, Any]:
    return {
        "path": "/v1/segment",
        "files": {"image": ("i.png", png, "image/png")},
        "data": {"prompt": "cat", "box_threshold": "0.3", "max_detections": "5"},
    }


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def process(command: list[str], ready_path: str) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    proc = subprocess.Popen(
        [*command, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
    )
    url = f"http://127.0.0.1:{port}"
    try:
        end = time.monotonic() + 120
        while True:
            if proc.poll() is not None or time.monotonic() > end:
                raise RuntimeError(f"{command} did not start")
            try:
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        yield url, proc
    finally:
        proc.terminate()
        proc.wait(30)


def ours(*args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "tunnelvision.cli",
        "serve",
        "--log-level",
        "warning",
        "--no-access-log",
        "--keys-file",
        "/nonexistent/keys.json",
        "--rate-limit-per-minute",
        "0",
        "--max-inflight-per-client",
        "0",
        "--max-queue",
        "256",
        *args,
    ]


def seed(*args: str) -> list[str]:
    return [sys.executable, str(ROOT / "bench" / "seed_server.py"), *args]


def load(url: str, request: dict[str, Any], clients: int, seconds: float, **kwargs: Any) -> LoadResult:
    return asyncio.run(run_load(url, request, clients, seconds, **kwargs))


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


# -- the measures ----------------------------------------------------------------------------


def simulated_vs_seed(png: bytes, seconds: float) -> tuple[Measure, Measure, dict[str, LoadResult]]:
    request = segment_request(png)
    with process(ours("--backend", "simulated"), "/readyz") as (url, _):
        mine = load(url, request, 16, seconds)
        busy = load(url, request, 32, seconds, probe_health=True)
    with process(seed("--backend", "simulated"), "/healthz") as (url, _):
        theirs = load(url, request, 16, seconds)
    ratio = mine.throughput / theirs.throughput
    health_ms = busy.health_p99 * 1000
    return (
        Measure("throughput vs seed, simulated device, 16 clients", ratio, "x", ">= 3", ratio >= 3),
        Measure(
            "/healthz p99 while 32 clients saturate the worker", health_ms, "ms", "<= 10", health_ms <= 10
        ),
        {"ours (simulated)": mine, "seed (simulated)": theirs, "ours, 32 clients": busy},
    )


def tiny_vs_seed(
    png: bytes, models: tuple[Path, Path], seconds: float
) -> tuple[Measure, dict[str, LoadResult]]:
    request = segment_request(png)
    flags = ("--detector", str(models[0]), "--segmenter", str(models[1]))
    with process(ours(*flags), "/readyz") as (url, _):
        load(url, request, 4, 2)  # warm
        mine = load(url, request, 16, seconds)
    with process(seed(*flags), "/healthz") as (url, _):
        load(url, request, 4, 2)
        theirs = load(url, request, 16, seconds)
    ratio = mine.throughput / theirs.throughput
    measure = Measure(
        "throughput vs seed, tiny real models on CPU, 16 clients", ratio, "x", ">= 1.2", ratio >= 1.2
    )
    return measure, {"ours (tiny models)": mine, "seed (tiny models)": theirs}


def http_overhead(png: bytes, models: tuple[Path, Path], requests: int) -> Measure:
    from tunnelvision.engine.engine import Engine, EngineConfig
    from tunnelvision.models.grounded_sam import GroundedSam
    from tunnelvision.schemas import SegmentParams

    request = segment_request(png)
    with process(ours("--detector", str(models[0]), "--segmenter", str(models[1])), "/readyz") as (url, _):
        load(url, request, 1, 60, max_requests=5)
        http_p50 = load(url, request, 1, 120, max_requests=requests).percentile(0.5)

    async def in_process() -> float:
        params = SegmentParams(prompt="cat", box_threshold=0.3, max_detections=5)
        backend = GroundedSam(str(models[0]), str(models[1]), device="cpu", cache_bytes=1024**3)
        async with Engine(
            [backend], EngineConfig(max_batch=8, batch_wait_ms=5, image_cache_bytes=1024**3)
        ) as engine:
            times = []
            for _ in range(requests + 5):
                began = time.monotonic()
                await engine.segment(png, params)
                times.append(time.monotonic() - began)
            return statistics.median(times[5:])

    ratio = http_p50 / asyncio.run(in_process())
    return Measure("HTTP p50 at concurrency 1 / in-process p50", ratio, "x", "<= 1.10", ratio <= 1.10)


def cache_speedup(png: bytes, detector: Path, repeats: int) -> Measure:
    from tunnelvision.models.grounded_sam import GroundedSam
    from tunnelvision.models.random import write_random_segmenter
    from tunnelvision.schemas import SegmentParams

    with tempfile.TemporaryDirectory() as folder:
        write_random_segmenter(Path(folder) / "sam-vit-b", "full")
        backend = GroundedSam(
            str(detector), str(Path(folder) / "sam-vit-b"), device="cpu", cache_bytes=1024**3
        )
    pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
    first, second = SegmentParams(boxes=[[10, 10, 300, 200]]), SegmentParams(points=[[320, 240, 1]])
    began = time.monotonic()
    backend.run(backend.prepare(pixels, first, image_id="bench"), first)
    cold = time.monotonic() - began
    warm = []
    for _ in range(repeats):
        began = time.monotonic()
        backend.run(backend.prepare(pixels, second, image_id="bench"), second)
        warm.append(time.monotonic() - began)
    ratio = cold / statistics.median(warm)
    return Measure(
        "second prompt on a cached image vs cold, SAM ViT-B, CPU", ratio, "x", ">= 10", ratio >= 10
    )


def memory_drift(png: bytes, models: tuple[Path, Path], requests: int) -> Measure:
    request = segment_request(png)
    with process(ours("--detector", str(models[0]), "--segmenter", str(models[1])), "/readyz") as (url, proc):
        load(url, request, 8, 120, max_requests=200)  # warm-up
        before = rss_bytes(proc.pid)
        result = load(url, request, 8, 600, max_requests=requests)
        after = rss_bytes(proc.pid)
    drift = 100 * (after - before) / before
    name = f"RSS drift over {result.ok} requests after warm-up"
    return Measure(name, drift, "%", "<= 5", drift <= 5 and result.errors == 0)


def batch_sweep(png: bytes, models: tuple[Path, Path], seconds: float) -> None:
    """How max_batch and batch_wait_ms trade throughput for latency (how the defaults were chosen)."""
    request = segment_request(png)
    print("\n| device | max_batch | batch_wait_ms | req/s | p50 ms | p99 ms |\n|---|---|---|---|---|---|")
    devices = {
        "simulated": ("--backend", "simulated"),
        "tiny models": ("--detector", str(models[0]), "--segmenter", str(models[1])),
    }
    for device, flags in devices.items():
        for max_batch, wait_ms in [(1, 0), (4, 5), (8, 5), (8, 20), (16, 5)]:
            knobs = ("--max-batch", str(max_batch), "--batch-wait-ms", str(wait_ms))
            with process(ours(*flags, *knobs), "/readyz") as (url, _):
                load(url, request, 4, 1)
                r = load(url, request, 16, seconds)
            p50, p99 = r.percentile(0.5) * 1000, r.percentile(0.99) * 1000
            print(f"| {device} | {max_batch} | {wait_ms} | {r.throughput:.1f} | {p50:.0f} | {p99:.0f} |")


# -- the run ---------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="short runs (under 3 minutes on 2 cores)")
    parser.add_argument("--sweep", action="store_true", help="only the max_batch / batch_wait_ms sweep")
    args = parser.parse_args()
    quick = args.quick
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    png = test_image()
    started = time.monotonic()
    with tempfile.TemporaryDirectory() as folder:
        from tunnelvision.models.random import write_random_models

        models = write_random_models(Path(folder), "tiny")
        if args.sweep:
            batch_sweep(png, models, 6)
            return
        sim_ratio, health, sim_runs = simulated_vs_seed(png, 5 if quick else 15)
        tiny_ratio, tiny_runs = tiny_vs_seed(png, models, 8 if quick else 20)
        overhead = http_overhead(png, models, 20 if quick else 100)
        cache = cache_speedup(png, models[0], 3)
        drift = memory_drift(png, models, 300 if quick else 2000)
    print_runs({**sim_runs, **tiny_runs})
    print_measures([sim_ratio, health, tiny_ratio, overhead, cache, drift])
    print(f"\n(total {time.monotonic() - started:.0f} s; {os.cpu_count()} CPUs)")
    print(f"throughput_ratio_vs_seed={sim_ratio.value:.2f}")


def print_runs(runs: dict[str, LoadResult]) -> None:
    print("\n| load run | req/s | p50 ms | p90 ms | p99 ms | errors | /healthz p99 ms |")
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        health = f"{r.health_p99 * 1000:.1f}" if r.health_latencies_s else "-"
        p50, p90, p99 = (r.percentile(q) * 1000 for q in (0.5, 0.9, 0.99))
        print(f"| {name} | {r.throughput:.1f} | {p50:.0f} | {p90:.0f} | {p99:.0f} | {r.errors} | {health} |")


def print_measures(measures: list[Measure]) -> None:
    print("\n| measure | value | target | met |")
    print("|---|---|---|---|")
    for m in measures:
        print(f"| {m.name} | {m.value:.2f} {m.unit} | {m.target} {m.unit} | {'yes' if m.ok else 'NO'} |")


if __name__ == "__main__":
    main()
