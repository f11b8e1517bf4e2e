"""In-process replicas (one device worker per listed device): throughput with 1, 2 and 4 of them.

    python bench/replicas.py            # about 2 minutes on 2 CPU cores
    python bench/replicas.py --smoke    # seconds: tiny sizes, only to show the script runs

The engine runs in this process as `tunnelvision serve --device cuda:0,cuda:1,...` runs it, with
a simulated device per replica: a pass is a sleep that releases the GIL, as a GPU kernel does.
Around it the CPU stages are the real ones: `imaging.decode_image` of a 1920x1080 JPEG, the SAM
image processor's resize + normalise + pad to 1024 (the sam family's `prepare`), and `masks.py`
encoding of full-size masks (RLE, as /v1/segment answers by default). A second workload with
trivial CPU stages (a 64x64 image, one small mask) shows the device-side scaling alone.

For each run: req/s, the ratio to one replica, and how many cores the process kept busy (CPU
seconds / wall seconds): near the box's core count means the cores cap it; well under it while
requests queue means something in the process serialises the CPU stages (the GIL). The CPU stages
alone say it directly: on 1 thread, on one thread per core in this process, and in one process
per core (no GIL shared). Last, how often a request reusing an `image_id` ran on the replica that
holds its embedding. Ends with `scaling_4_vs_1=<x>` (realistic CPU stages).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable, Hashable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache, partial
from typing import Any

import numpy as np
from PIL import Image

from tunnelvision.engine.backend import Check, no_deadline
from tunnelvision.engine.engine import Engine, EngineConfig
from tunnelvision.errors import TunnelvisionError
from tunnelvision.imaging import RGBImage, decode_image
from tunnelvision.masks import BoolMask, encode_mask, mask_to_box
from tunnelvision.models.simulated import SimulatedBackend
from tunnelvision.schemas import Detection, DetectParams, Segmentation, SegmentParams


@dataclass(frozen=True)
class Workload:
    name: str
    width: int
    height: int
    masks: int  # full-size masks encoded per answer
    resize: bool  # run the SAM image processor in `prepare`


@dataclass
class Run:
    workload: str
    replicas: int
    requests: int
    errors: int
    seconds: float
    cpu_seconds: float

    @property
    def throughput(self) -> float:
        return self.requests / self.seconds

    @property
    def cores_busy(self) -> float:
        return self.cpu_seconds / self.seconds


# -- the CPU stages: real code, real sizes ----------------------------------------------------


def photo_jpeg(width: int, height: int, seed: int) -> bytes:
    """A photo-like JPEG (smooth gradients and sensor-like noise, quality 90): decodes like a
    camera picture of that size, unlike pure noise (far bigger) or a flat colour (far smaller)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    phase = rng.uniform(0, 255)
    base = np.stack([x / width * 255, y / height * 255, (x + y + phase) % 256], axis=-1)
    base += rng.normal(0, 12, (height, width, 3)).astype(np.float32)
    buffer = io.BytesIO()
    Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


@cache
def full_size_masks(height: int, width: int, count: int) -> tuple[BoolMask, ...]:
    """Ellipses across the image, as a segmenter's upscaled masks (upscaling is a device step)."""
    yy, xx = np.ogrid[:height, :width]
    ry, rx = max(1, height // 4), max(1, width // (2 * count + 2))
    centres = [(width * (i + 1)) // (count + 1) for i in range(count)]
    return tuple(((xx - cx) ** 2 / rx**2 + (yy - height // 2) ** 2 / ry**2) < 1 for cx in centres)


@cache
def sam_processor() -> Any:
    from transformers import SamImageProcessor

    return SamImageProcessor()


class CpuStagesBackend:
    """The simulated device, with the real CPU work of a Grounded-SAM request around it. Each
    instance is one replica; it remembers the image_ids its passes saw (its embedding cache)."""

    def __init__(self, workload: Workload, device_ms: float) -> None:
        self.device = SimulatedBackend(batch_ms=0.0, item_ms=device_ms)
        self.info = self.device.info
        self.workload = workload
        self.seen: set[str] = set()
        self.reuse_hits = self.reuse_misses = 0
        self._lock = threading.Lock()

    def prepare(
        self, image: RGBImage, params: DetectParams, image_id: str = "", check: Check = no_deadline
    ) -> tuple[int, int, str]:
        if self.workload.resize:
            sam_processor()(images=image, return_tensors="np", input_data_format="channels_last")
        return int(image.shape[0]), int(image.shape[1]), image_id

    def run_batch(self, items: list[tuple[Any, DetectParams]]) -> list[Any]:
        with self._lock:
            for (_, _, image_id), params in items:
                if params.image_id:  # a request that reuses an image: was its embedding here?
                    hit = image_id in self.seen
                    self.reuse_hits += hit
                    self.reuse_misses += not hit
            self.seen.update(image_id for (_, _, image_id), _ in items)
        return self.device.run_batch(items)

    def batch_key(self, prepared: Any, params: DetectParams) -> Hashable:
        return "simulated"

    def finish(
        self, raw: tuple[int, int, str], params: DetectParams, prepared: Any, check: Check = no_deadline
    ) -> list[Detection]:
        height, width, _ = raw
        fmt = params.mask_format if isinstance(params, SegmentParams) else "rle"
        return [
            Segmentation(
                label="cat", score=0.5, box=mask_to_box(mask), mask=encode_mask(mask, fmt), mask_score=0.5
            )
            for mask in full_size_masks(height, width, self.workload.masks)
        ]

    def cache_stats(self) -> dict[str, int]:
        return {}

    def device_steps(self, prepared: Any) -> dict[str, float]:
        return {}


# -- the measures ------------------------------------------------------------------------------


def engine_for(workload: Workload, replicas: int, device_ms: float, cpu_threads: int) -> Engine:
    if workload.resize:
        sam_processor()  # loaded here: transformers' lazy imports are not safe from many threads
    backends = [CpuStagesBackend(workload, device_ms) for _ in range(replicas)]
    # One request per pass: the simulated cost is per item, so batching would not change it.
    config = EngineConfig(max_queue=512, cpu_threads=cpu_threads, max_batch=1, image_cache_bytes=2**31)
    return Engine(backends, config)


async def drive(engine: Engine, images: list[bytes], clients: int, seconds: float) -> tuple[int, int]:
    """`clients` loops sending the images in turn (distinct files: distinct image_ids, spread
    over the replicas) until `seconds` have passed; (answers, errors)."""
    params = SegmentParams(prompt="cat", max_detections=5)
    end = time.monotonic() + seconds
    counts = [0, 0]

    async def client(index: int) -> None:
        turn = index
        while time.monotonic() < end:
            try:
                await engine.segment(images[turn % len(images)], params)
                counts[0] += 1
            except TunnelvisionError:
                counts[1] += 1
            turn += clients

    await asyncio.gather(*(client(i) for i in range(clients)))
    return counts[0], counts[1]


async def measure(
    workload: Workload, images: list[bytes], replicas: int, clients: int, seconds: float, device_ms: float
) -> Run:
    async with engine_for(workload, replicas, device_ms, os.cpu_count() or 1) as engine:
        await drive(engine, images[:4], 4, min(1.0, seconds))  # warm-up: processor, caches, threads
        cpu_before, began = time.process_time(), time.monotonic()
        done, errors = await drive(engine, images, clients, seconds)
        elapsed, cpu = time.monotonic() - began, time.process_time() - cpu_before
    return Run(workload.name, replicas, done, errors, elapsed, cpu)


async def reuse_on_home(workload: Workload, images: list[bytes], replicas: int, device_ms: float) -> float:
    """Send each image once, then ask again by image_id, all concurrently: the share of the
    second requests that ran on the replica whose pass saw the image (held its embedding)."""
    async with engine_for(workload, replicas, device_ms, os.cpu_count() or 1) as engine:
        first = await asyncio.gather(*(engine.segment(data, SegmentParams(prompt="cat")) for data in images))
        again = [SegmentParams(prompt="cat", image_id=answer.image_id) for answer in first]
        await asyncio.gather(*(engine.segment(None, params) for params in again))
        backends = [b for b in engine.backends if isinstance(b, CpuStagesBackend)]
        hits = sum(b.reuse_hits for b in backends)
        return hits / max(1, hits + sum(b.reuse_misses for b in backends))


def run_stages(backend: CpuStagesBackend, data: bytes) -> None:
    """One request's CPU stages, as the engine runs them: decode, prepare, finish."""
    params = SegmentParams(prompt="cat", max_detections=5)
    image = decode_image(data, 40_000_000)
    prepared = backend.prepare(image, params)
    backend.finish(prepared, params, prepared)


def stages_on_threads(
    workload: Workload, images: list[bytes], threads: int, count: int
) -> tuple[float, float]:
    """The CPU stages alone on `threads` threads of this process: (req/s, cores busy)."""
    engine_for(workload, 1, 0.0, 1)  # loads the processor
    backend = CpuStagesBackend(workload, 0.0)
    run_stages(backend, images[0])  # warm-up
    cpu_before, began = time.process_time(), time.monotonic()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: run_stages(backend, images[i % len(images)]), range(count)))
    elapsed = time.monotonic() - began
    return count / elapsed, (time.process_time() - cpu_before) / elapsed


_in_process: list[Any] = []  # in a worker process: its backend and images


def _start_worker(workload: Workload, images: list[bytes]) -> None:
    import torch

    torch.set_num_threads(1)  # one process per core: no intra-op threads on top
    _in_process[:] = [CpuStagesBackend(workload, 0.0), images]
    run_stages(_in_process[0], images[0])


def _hold(seconds: float) -> None:
    time.sleep(seconds)


def _stages_chunk(indices: range) -> int:
    backend, images = _in_process
    for index in indices:
        run_stages(backend, images[index % len(images)])
    return len(indices)


def stages_on_processes(workload: Workload, images: list[bytes], processes: int, count: int) -> float:
    """The CPU stages alone on `processes` processes (no shared GIL): req/s, started processes
    warmed up before the clock starts."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, context, _start_worker, (workload, images)) as pool:
        list(pool.map(_hold, [1.0] * processes))  # busy at once: every process is started and warm
        chunks = [range(i, count, processes) for i in range(processes)]
        began = time.monotonic()
        done = sum(pool.map(_stages_chunk, chunks))
        return done / (time.monotonic() - began)


# -- the report --------------------------------------------------------------------------------


def print_runs(runs: list[Run]) -> None:
    print("| workload | replicas | req/s | vs 1 replica | cores busy | answers | errors |")
    print("|---|---|---|---|---|---|---|")
    for run in runs:
        base = next(r for r in runs if r.workload == run.workload and r.replicas == 1)
        print(
            f"| {run.workload} | {run.replicas} | {run.throughput:.1f} | "
            f"{run.throughput / base.throughput:.2f} x | {run.cores_busy:.2f} | "
            f"{run.requests} | {run.errors} |"
        )


def timed(label: str, fn: Callable[[], Any]) -> Any:
    began = time.monotonic()
    value = fn()
    print(f"# {label}: {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", default="1,2,4", help="replica counts to compare")
    parser.add_argument("--seconds", type=float, default=10.0, help="each load run")
    parser.add_argument("--clients", type=int, default=32, help="concurrent requests in each run")
    parser.add_argument("--device-ms", type=float, default=100.0, help="simulated device time per request")
    parser.add_argument("--images", type=int, default=32, help="distinct images sent in turn")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.replicas.split(",")]
    width, height, seconds, device_ms = (1920, 1080, args.seconds, args.device_ms)
    if args.smoke:
        width, height, seconds, device_ms = 320, 240, 0.5, 5.0
    workloads = [
        Workload("trivial CPU", 64, 64, 1, resize=False),
        Workload("realistic CPU", width, height, 5, resize=True),
    ]
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores, no GPU (simulated device: {device_ms:g} ms per request, GIL released)")
    print(f"load: {args.clients} concurrent requests, {seconds:g} s per run, {args.images} distinct images\n")
    runs: list[Run] = []
    for workload in workloads:
        images = [photo_jpeg(workload.width, workload.height, seed) for seed in range(args.images)]
        for n in counts:
            run = measure(workload, images, n, args.clients, seconds, device_ms)
            runs.append(timed(f"{workload.name}, {n} replica(s)", partial(asyncio.run, run)))
    realistic = workloads[-1]  # `images` are its images now
    reuse = {n: asyncio.run(reuse_on_home(realistic, images, n, device_ms)) for n in counts}
    count = 4 if args.smoke else 10 * cores
    alone = {t: stages_on_threads(realistic, images, t, count) for t in (1, cores)}
    apart = stages_on_processes(realistic, images, cores, count)
    print_runs(runs)
    print("\n| CPU stages alone (decode + SAM resize + mask encoding), realistic | req/s | cores busy |")
    print("|---|---|---|")
    for threads, (rate, busy) in alone.items():
        print(f"| {threads} thread{'s' if threads > 1 else ''}, one process | {rate:.1f} | {busy:.2f} |")
    print(f"| {cores} processes, one torch thread each (no shared GIL) | {apart:.1f} | - |")
    print(
        f"\nstages_threads_vs_processes={alone[cores][0] / apart:.2f}"
        "  (under 1: one process is capped below its cores)"
    )
    print("\n| replicas | requests reusing an image_id that ran on its embedding's replica |")
    print("|---|---|")
    for n, share in reuse.items():
        print(f"| {n} | {share * 100:.0f} % |")
    last = [r for r in runs if r.workload == realistic.name]
    ratio = last[-1].throughput / last[0].throughput
    print(f"\nscaling_{last[-1].replicas}_vs_{last[0].replicas}={ratio:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
