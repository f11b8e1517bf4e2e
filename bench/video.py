"""Video tracking benchmark: frames per second per tracker family, memory against clip length, and
what a video job costs the interactive image requests served beside it, in one run.

    python bench/video.py                                     # CPU, tiny models (a few minutes)
    python bench/video.py --device cuda --size full --dtype bfloat16   # a GPU, full-size models
    python bench/video.py --torch-threads 1 2                 # the fps table once per thread count
    python bench/video.py --smoke                             # seconds: checks this script only

Clips are synthetic (a white square sliding over a dark background, H.264) and are tracked by the
code the server's video runner runs, chunk after chunk: the frames read through `FrameSource`
(PyAV decode) and prepared for the tracker (its resize and normalisation), in a thread ->
`Track.run` on the device worker through `engine.on_device` at
background priority -> the masks encoded as RLE (in a thread). Only the job store's commit is left
out. Pipelines are built by the same `--pipeline NAME=SPEC` code users run, on random weights
(compute does not depend on weight values; what random weights find does, hence the objects column).

1. Frames per second per family: box-prompted SAM 2.1 and SAM 3 tracker, text-prompted SAM 3
   video, and GroundingDINO + SAM 2.1 (the detector on every 10th frame). `device busy` is the share
   of the wall time spent in the device step: the runner decodes, tracks and encodes one chunk after
   the other, so the rest is CPU work the device waits for.
2. Memory against clip length: peak RSS (VmRSS sampled every 5 ms) while tracking clips of
   growing length on tiny models: tracker state is bounded and frames are decoded as needed, so
   it should stay flat.
3. Interactive latency during a video job: one engine serving a tiny Grounded-SAM image pipeline
   and a video pipeline; image segment requests at jittered intervals, alone and while a video job
   runs with chunks of several sizes. A request waits for at most the chunk on the device, so its
   extra queue wait should stay under one chunk's device time.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import io
import random
import statistics
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch

from tunnelvision.config import Settings
from tunnelvision.engine.backend import Backend
from tunnelvision.engine.engine import Engine, EngineConfig
from tunnelvision.engine.scheduler import BACKGROUND
from tunnelvision.engine.video import Chunk, FrameResult, Seed, Track, TrackOptions, UserPrompt, prepare_chunk
from tunnelvision.models.factory import build_backends
from tunnelvision.models.random import Size, write_random_models
from tunnelvision.models.random_families import write_random_family
from tunnelvision.schemas import SegmentParams
from tunnelvision.video.decode import VideoLimits
from tunnelvision.video.frames import FrameSource
from tunnelvision.video.runner import encode_frames
from tunnelvision.video.synthetic import square_origin, write_moving_square_clip

PIPELINE = "track"  # the video pipeline's name in every engine built here
PHRASES = ("square",)


@dataclass(frozen=True)
class Family:
    name: str
    parts: tuple[str, ...]  # families, detector first
    prompt: str  # "box" on the first frame, or "text"


FAMILIES = (
    Family("sam2-video", ("sam2-video",), "box"),
    Family("sam3-tracker-video", ("sam3-tracker-video",), "box"),
    Family("sam3-video", ("sam3-video",), "text"),
    Family("grounding-dino + sam2-video", ("grounding-dino", "sam2-video"), "text"),
)


@dataclass(frozen=True)
class Clip:
    path: Path
    frames: int
    width: int
    height: int


@dataclass
class Pass:
    """What tracking (part of) a clip took: wall time and its three stages, per chunk."""

    frames: int = 0
    seconds: float = 0.0
    decode_s: float = 0.0
    encode_s: float = 0.0
    chunk_device_s: list[float] = field(default_factory=list)
    objects: int = 0  # summed over frames

    @property
    def device_s(self) -> float:
        return sum(self.chunk_device_s)


# -- tracking a clip as the video runner does ---------------------------------------------------


def first_prompts(family: Family, clip: Clip) -> dict[int, list[UserPrompt]]:
    """A box around the square on frame 0 for box trackers; text trackers get the phrases."""
    if family.prompt != "box":
        return {}
    x, y = square_origin(0, clip.frames, clip.width, clip.height)
    side = max(4, min(clip.width, clip.height) // 5)  # as the synthetic clip draws it
    return {0: [UserPrompt(1, "square", (float(x), float(y), float(x + side), float(y + side)))]}


def track_options(family: Family, max_objects: int) -> TrackOptions:
    """The server's defaults (thresholds included), keyframes every 10th frame."""
    phrases = PHRASES if family.prompt == "text" else ()
    return TrackOptions(PIPELINE, phrases=phrases, keyframe_every=10, max_objects=max_objects)


def timed_run(track: Track, chunk: Chunk, backend: Backend, device: int) -> tuple[list[FrameResult], float]:
    """Track.run on the device worker, with the seconds it took there (masks come back on the CPU,
    so the GPU has finished when it returns)."""
    began = time.perf_counter()
    results = track.run(chunk, backend, device)
    return results, time.perf_counter() - began


async def track_clip(
    engine: Engine,
    family: Family,
    clip: Clip,
    frames: int,
    chunk_frames: int,
    max_objects: int,
    stop: asyncio.Event | None = None,
) -> Pass:
    """The first `frames` frames of one pass, chunk by chunk (VideoRunner._chunk without the
    store): read -> track at background priority -> encode. Ends early once `stop` is set."""
    track = Track(track_options(family, max_objects))
    source = FrameSource(clip.path, VideoLimits())
    measured = Pass()
    began = time.perf_counter()
    try:
        for start in range(0, frames, chunk_frames):
            if stop is not None and stop.is_set():
                break
            await one_chunk(
                engine, track, source, family, clip, range(start, min(frames, start + chunk_frames)), measured
            )
    finally:
        track.close()
        source.close()
    measured.seconds = time.perf_counter() - began
    return measured


async def one_chunk(
    engine: Engine, track: Track, source: FrameSource, family: Family, clip: Clip, indices: range, into: Pass
) -> None:
    began = time.perf_counter()
    read = await asyncio.to_thread(source.read, list(indices))
    first = indices.start == 0  # a pass begins: a new session, seeded with nothing kept
    chunk = Chunk(
        read, first_prompts(family, clip) if first else {}, Seed([]) if first else None, step=indices.start
    )
    # The tracker's resize and normalisation, on the CPU as the runner does it (counted as decode).
    await asyncio.to_thread(prepare_chunk, chunk, engine.backends[0], track.options.pipeline)
    into.decode_s += time.perf_counter() - began
    results, device_s = await engine.on_device(partial(timed_run, track, chunk), 600.0, BACKGROUND)
    began = time.perf_counter()
    await asyncio.to_thread(encode_frames, results)
    into.encode_s += time.perf_counter() - began
    into.chunk_device_s.append(device_s)
    into.frames += len(results)
    into.objects += sum(len(result.objects) for result in results)


# -- 1. frames per second per family -------------------------------------------------------------


def write_parts(folder: Path, family: Family, size: Size) -> list[Path]:
    """One random checkpoint per part, written once per run."""
    parts = []
    for name in family.parts:
        target = folder / f"{name}-{size}"
        if not (target / "config.json").is_file():
            write_random_family(target, name, size, 0)
        parts.append(target)
    return parts


def settings_for(specs: list[str], device: str, dtype: str) -> Settings:
    return Settings(pipeline=specs, device=device, dtype=dtype, cache_bytes=0, warmup=False)


def video_backend(parts: list[Path], device: str, dtype: str) -> Backend:
    """The device backend users get from `--pipeline track=[DETECTOR+]TRACKER`."""
    spec = f"{PIPELINE}={'+'.join(str(p) for p in parts)}"
    return build_backends(settings_for([spec], device, dtype))[0]


async def measure_family(
    backend: Backend, family: Family, clip: Clip, args: argparse.Namespace
) -> tuple[Pass, float]:
    """A warm-up pass of one chunk, then the timed pass; (the pass, peak device MiB)."""
    async with Engine([backend], EngineConfig(max_queue=16)) as engine:
        await track_clip(engine, family, clip, args.chunk, args.chunk, args.max_objects)
        reset_device_peak(args.device)
        measured = await track_clip(engine, family, clip, args.frames, args.chunk, args.max_objects)
    return measured, device_peak_mib(args.device)


def fps_table(folder: Path, clip: Clip, args: argparse.Namespace) -> int:
    """Prints the table; returns how many families failed."""
    print(
        f"\n### Frames per second per family ({clip.frames} frames of {clip.width}x{clip.height}, "
        f"chunks of {args.chunk}, {args.size} models, {args.dtype})\n"
    )
    print(
        "| family | prompt | torch threads | frames | ms/frame | frames/s | device ms/frame | decode+prepare "
        "ms/frame | encode ms/frame | device busy | objects/frame | peak device MiB | vs sam2-video |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    baseline: dict[int, float] = {}
    failed = 0
    for family in FAMILIES:
        if args.families and family.name not in args.families:
            continue
        try:
            measure_rows(folder, family, clip, args, baseline)
        except Exception as exc:  # one family's failure costs its row, not the device time of the rest
            print(f"| {family.name} | failed: {failure(exc)} |", flush=True)
            traceback.print_exc()
            failed += 1
        gc.collect()
        empty_device_cache(args.device)
    return failed


def measure_rows(
    folder: Path, family: Family, clip: Clip, args: argparse.Namespace, baseline: dict[int, float]
) -> None:
    """The family's rows, one per torch thread count, each printed as soon as it is measured."""
    backend = video_backend(write_parts(folder, family, args.size), args.device, args.dtype)
    for threads in args.torch_threads:
        set_threads(threads)
        measured, peak = asyncio.run(measure_family(backend, family, clip, args))
        rate = measured.frames / measured.seconds
        baseline.setdefault(threads, rate)
        per = 1000 / max(1, measured.frames)
        prompt = "box on frame 0" if family.prompt == "box" else "text"
        if len(family.parts) == 2:
            prompt += ", detector every 10th frame"
        print(
            f"| {family.name} | {prompt} | {torch.get_num_threads()} | {measured.frames} "
            f"| {measured.seconds * per:.1f} | {rate:.2f} | {measured.device_s * per:.1f} "
            f"| {measured.decode_s * per:.1f} | {measured.encode_s * per:.1f} "
            f"| {measured.device_s / measured.seconds:.0%} | {measured.objects * per / 1000:.1f} "
            f"| {peak_text(peak)} | {rate / baseline[threads]:.2f}x |",
            flush=True,
        )


def failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {str(exc)[:160]}".replace("|", "/").replace("\n", " ")


# -- 2. memory against clip length ---------------------------------------------------------------


def rss_mib() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@contextmanager
def peak_rss() -> Iterator[list[float]]:
    """Samples VmRSS every 5 ms while the block runs; yields [peak MiB], filled in at the end.
    (VmHWM would do, but it only grows over the process's life: no per-run peak.)"""
    peak = [rss_mib()]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.005):
            peak[0] = max(peak[0], rss_mib())

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        yield peak
    finally:
        done.set()
        sampler.join()
        peak[0] = max(peak[0], rss_mib())


def memory_table(folder: Path, args: argparse.Namespace) -> int:
    family = FAMILIES[0]  # SAM 2.1, box-prompted: bounded memory bank, one object
    width, height = args.memory_size
    print(
        f"\n### Memory against clip length ({family.name}, tiny, {width}x{height}, chunks of "
        f"{args.chunk}, on {args.device})\n"
    )
    print(
        "| frames | seconds | frames/s | RSS before MiB | peak RSS MiB | peak - before MiB "
        "| peak device MiB |"
    )
    print("|---|---|---|---|---|---|---|")
    set_threads(args.torch_threads[0])
    backend = video_backend(write_parts(folder, family, "tiny"), args.device, args.dtype)
    clips = {n: write_clip(folder / f"memory-{n}.mp4", n, width, height) for n in args.lengths}

    async def measure() -> None:
        async with Engine([backend], EngineConfig(max_queue=16)) as engine:
            await track_clip(engine, family, clips[min(clips)], args.chunk * 2, args.chunk, args.max_objects)
            for frames, clip in clips.items():
                gc.collect()
                reset_device_peak(args.device)
                before = rss_mib()
                with peak_rss() as peak:
                    measured = await track_clip(engine, family, clip, frames, args.chunk, args.max_objects)
                print(
                    f"| {measured.frames} | {measured.seconds:.1f} | {measured.frames / measured.seconds:.1f}"
                    f" | {before:.0f} | {peak[0]:.0f} | {peak[0] - before:.0f} "
                    f"| {peak_text(device_peak_mib(args.device))} |",
                    flush=True,
                )

    asyncio.run(measure())
    return 0


# -- 3. interactive latency during a video job -------------------------------------------------------


def photo_png(width: int, height: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def image_requests(engine: Engine, count: int, gap_s: float, seed: int) -> list[tuple[float, float]]:
    """`count` segment requests one after another, each after a random pause (so they land at
    every point of a chunk); (latency s, queue wait s) of each."""
    rng = random.Random(seed)
    params = SegmentParams(model="grounded-sam", prompt="cat . dog", max_detections=5)
    image = photo_png(320, 240, seed)
    measured = []
    for index in range(count):
        await asyncio.sleep(rng.uniform(0.0, gap_s))
        began = time.perf_counter()
        answer = await engine.segment(image + index.to_bytes(4, "little"), params)  # no cache hits
        measured.append((time.perf_counter() - began, answer.timings_ms["queue"] / 1000))
    return measured


async def video_job(
    engine: Engine, family: Family, clip: Clip, chunk: int, max_objects: int, stop: asyncio.Event
) -> Pass:
    """Passes over the clip until `stop`, as one long job; everything measured in one Pass."""
    total = Pass()
    while not stop.is_set():
        done = await track_clip(engine, family, clip, clip.frames, chunk, max_objects, stop)
        total.frames += done.frames
        total.chunk_device_s += done.chunk_device_s
    return total


def latency_table(folder: Path, args: argparse.Namespace) -> int:
    family = FAMILIES[0]
    detector, segmenter = write_random_models(folder / "grounded-sam-tiny", "tiny")
    tracker = write_parts(folder, family, "tiny")[0]
    width, height = args.memory_size
    clip = write_clip(folder / "latency.mp4", 200, width, height)
    set_threads(args.torch_threads[0])
    specs = [f"grounded-sam={detector}+{segmenter}", f"{PIPELINE}={tracker}"]
    backends = build_backends(settings_for(specs, args.device, args.dtype))
    print(
        f"\n### Image requests during a video job (tiny grounded-sam 320x240 images, {args.requests} "
        f"requests, pauses of 0-{args.gap * 1000:.0f} ms; tiny {family.name} on {width}x{height})\n"
    )
    print(
        "| video job | chunk frames | chunk device ms (mean / max) | image p50 ms | image max ms "
        "| queue wait p50 ms | queue wait max ms | max wait <= one chunk |"
    )
    print("|---|---|---|---|---|---|---|---|")

    async def measure() -> None:
        async with Engine(backends, EngineConfig(max_queue=64)) as engine:
            await image_requests(engine, 2, 0.0, 99)  # warm-up
            alone = await image_requests(engine, args.requests, args.gap, 1)
            print(latency_row("none", "-", [], alone), flush=True)
            for chunk in args.chunks:
                stop = asyncio.Event()
                job = asyncio.create_task(video_job(engine, family, clip, chunk, args.max_objects, stop))
                await asyncio.sleep(0.5)  # the job under way
                during = await image_requests(engine, args.requests, args.gap, 1)
                stop.set()
                done = await job
                print(latency_row("running", str(chunk), done.chunk_device_s, during), flush=True)

    asyncio.run(measure())
    return 0


def latency_row(job: str, chunk: str, chunk_s: list[float], measured: list[tuple[float, float]]) -> str:
    latency = [m[0] * 1000 for m in measured]
    waits = [m[1] * 1000 for m in measured]
    chunks = [s * 1000 for s in chunk_s]
    shown = f"{statistics.mean(chunks):.0f} / {max(chunks):.0f}" if chunks else "-"
    bounded = ("yes" if max(waits) <= max(chunks) else "no") if chunks else "-"
    return (
        f"| {job} | {chunk} | {shown} | {statistics.median(latency):.0f} | {max(latency):.0f} "
        f"| {statistics.median(waits):.0f} | {max(waits):.0f} | {bounded} |"
    )


# -- the machine ---------------------------------------------------------------------------------


def write_clip(path: Path, frames: int, width: int, height: int) -> Clip:
    if not path.is_file():
        write_moving_square_clip(path, frames, width, height, fps=25)
    return Clip(path, frames, width, height)


def set_threads(threads: int) -> None:
    """0: torch's own default (what the server runs with)."""
    torch.set_num_threads(threads or DEFAULT_THREADS)


DEFAULT_THREADS = torch.get_num_threads()


def reset_device_peak(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)


def device_peak_mib(device: str) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.startswith("cuda") else -1.0


def empty_device_cache(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def peak_text(mib: float) -> str:
    return f"{mib:.0f}" if mib >= 0 else "-"


def describe(device: str) -> str:
    import os

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{device} ({os.cpu_count()} cores), torch {torch.__version__}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny everything, a few frames (checks the script)"
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=["tiny", "full"], default="tiny", help="models of the fps table")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    parser.add_argument("--frames", type=int, default=0, help="frames per family (default 48 tiny, 300 full)")
    parser.add_argument(
        "--resolution",
        type=int,
        nargs=2,
        default=None,
        metavar=("W", "H"),
        help="clip of the fps table (default 320 240 tiny, 1024 576 full)",
    )
    parser.add_argument("--chunk", type=int, default=8, help="frames per chunk (the server's default)")
    parser.add_argument(
        "--max-objects", type=int, default=5, help="what a detector may add (random weights find much)"
    )
    parser.add_argument("--families", nargs="+", choices=[f.name for f in FAMILIES], help="default: all")
    parser.add_argument("--torch-threads", type=int, nargs="+", default=[0], help="0: torch's default")
    parser.add_argument("--lengths", type=int, nargs="+", default=[100, 400, 1600], help="memory table")
    parser.add_argument("--memory-size", type=int, nargs=2, default=[320, 240], metavar=("W", "H"))
    parser.add_argument("--requests", type=int, default=20, help="image requests per latency row")
    parser.add_argument("--gap", type=float, default=0.3, help="longest pause before an image request (s)")
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8, 16], help="latency table chunk sizes")
    parser.add_argument("--skip", nargs="+", default=[], choices=["fps", "memory", "latency"])
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.size, args.dtype = "cpu", "tiny", "float32"
        args.frames, args.resolution, args.chunk = 4, [96, 72], 2
        args.lengths, args.memory_size, args.requests, args.gap, args.chunks = [8, 16], [96, 72], 3, 0.05, [2]
        if args.torch_threads == [0]:  # one thread: steady on a busy shared machine
            args.torch_threads = [1]
    full = args.size == "full"
    args.frames = args.frames or (300 if full else 48)
    args.resolution = args.resolution or ([1024, 576] if full else [320, 240])
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    print(
        f"device: {describe(args.device)}, dtype {args.dtype}, torch threads by default {DEFAULT_THREADS}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        width, height = args.resolution
        sections: dict[str, Callable[[], int]] = {
            "fps": lambda: fps_table(
                folder, write_clip(folder / "fps.mp4", args.frames, width, height), args
            ),
            "memory": lambda: memory_table(folder, args),
            "latency": lambda: latency_table(folder, args),
        }
        failed = 0
        for name, section in sections.items():
            if name in args.skip:
                continue
            try:
                failed += section()
            except Exception as exc:  # the next table still runs (device time is scarce)
                failed += 1
                print(f"\n{name} table failed: {failure(exc)}", flush=True)
                traceback.print_exc()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
