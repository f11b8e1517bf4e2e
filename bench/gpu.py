"""GPU benchmark: transformers eager float32, one image at a time, vs tunnelvision's path (half
precision, SDPA, batching across requests, optionally torch.compile), for every model family's
pipeline on full-size random weights at 1024 px, in one run: GroundingDINO-T + SAM (ViT-B and
ViT-H), MM-Grounding-DINO + SAM, OWLv2 + SAM 2.1, SAM 3. Pipelines are built by the same
`--pipeline NAME=SPEC` code users run.

    python bench/gpu.py                          # on the GPU (cuda)
    python bench/gpu.py --compile                # also torch.compile SAM's image encoder
    python bench/gpu.py --dtype bfloat16 --pipelines sam3
    python bench/gpu.py --cpu-threads 2 8        # the optimised path with 2 and with 8 CPU threads
    python bench/gpu.py --smoke                  # tiny models on the CPU: checks this script only

`device busy` is the share of the run's wall time the device worker spent in model passes: well
under 100 % means the CPU stages (decode, prepare, finish) or the queue keep it waiting.

Compute does not depend on weight values, so random weights cost what real ones cost.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tunnelvision.config import Settings
from tunnelvision.engine.engine import Engine, EngineConfig
from tunnelvision.models.factory import build_backends
from tunnelvision.models.random import Size, write_random_segmenter
from tunnelvision.models.random_families import write_random_family
from tunnelvision.models.registry import FAMILIES
from tunnelvision.schemas import SegmentParams

# What is measured: each a pipeline of random-weight checkpoints (families as `models random --family`
# writes them), asked for text-prompted masks. SAM's encoder size is chosen with --encoders.
PIPELINES: dict[str, tuple[str, ...]] = {
    "grounded-sam": ("grounding-dino", "sam"),
    "mm-grounding-dino-sam": ("mm-grounding-dino", "sam"),
    "owlv2-sam2.1": ("owlv2", "sam2"),
    "sam3": ("sam3",),
}


@dataclass(frozen=True)
class Path_:
    name: str
    dtype: str
    attention: str
    compile_encoder: bool
    max_batch: int
    concurrency: int
    cpu_threads: int = 2


def image_bytes(side: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (side, side, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


async def measure(backend: Any, path: Path_, image: bytes, requests: int) -> tuple[float, float, float]:
    """Images per second, p50 latency (s) and the device's busy share for `requests` segment
    calls, `concurrency` at a time."""
    params = SegmentParams(prompt="cat . dog", box_threshold=0.3, max_detections=10, mask_format="none")
    config = EngineConfig(
        max_queue=256,
        max_batch=path.max_batch,
        batch_wait_ms=5,
        image_cache_bytes=0,
        cpu_threads=path.cpu_threads,
    )
    device_s = [0.0]

    def on_batch(size: int, seconds: float, waits: list[float]) -> None:
        device_s[0] += seconds

    async with Engine([backend], config, on_batch=on_batch) as engine:
        for _ in range(3):
            await engine.segment(image, params)  # warm-up (and compilation)
        latencies: list[float] = []
        gate = asyncio.Semaphore(path.concurrency)

        async def one(index: int) -> None:
            # A different image id per request, so the embedding cache does not flatter the result.
            varied = image + index.to_bytes(4, "little")
            async with gate:
                began = time.monotonic()
                await engine.segment(varied, params)
                latencies.append(time.monotonic() - began)

        device_s[0] = 0.0
        began = time.monotonic()
        await asyncio.gather(*(one(i) for i in range(requests)))
        elapsed = time.monotonic() - began
    return requests / elapsed, statistics.median(latencies), device_s[0] / elapsed


def write_parts(folder: Path, families: tuple[str, ...], size: Size, encoder: str) -> list[Path]:
    """One random checkpoint per family; SAM with the chosen encoder."""
    parts = []
    for family in families:
        target = folder / (f"sam-{encoder}" if family == "sam" else family)
        if not (target / "config.json").is_file():
            if family == "sam":
                write_random_segmenter(target, size, encoder)
            else:
                write_random_family(target, family, size, 0)
        parts.append(target)
    return parts


def backend_for(name: str, parts: list[Path], device: str, path: Path_) -> Any:
    """The device backend users get from `--pipeline NAME=A+B` with these settings."""
    settings = Settings(
        pipeline=[f"{name}={'+'.join(str(p) for p in parts)}"],
        device=device,
        dtype=path.dtype,
        attention=path.attention,
        compile=path.compile_encoder,
        cache_bytes=0,
        warmup=False,
    )
    return build_backends(settings)[0]


def run(args: argparse.Namespace) -> None:
    device = "cpu" if args.smoke else args.device
    size: Size = "tiny" if args.smoke else "full"
    half = "float32" if args.smoke else args.dtype
    paths = [Path_("transformers eager float32, one at a time", "float32", "eager", False, 1, 1)] + [
        Path_(
            f"tunnelvision {half} sdpa batch 8{' compiled' if args.compile else ''}, {threads} CPU threads",
            half,
            "sdpa",
            args.compile,
            8,
            16,
            threads,
        )
        for threads in args.cpu_threads
    ]
    image = image_bytes(128 if args.smoke else 1024)
    print(
        "| pipeline | SAM encoder | path | images/s | p50 ms | device busy | speed-up |\n"
        "|---|---|---|---|---|---|---|"
    )
    with tempfile.TemporaryDirectory() as folder:
        for name in args.pipelines:
            families = PIPELINES[name]
            missing = [f for f in families if f not in FAMILIES]
            if missing:
                print(f"| {name} | - | not served by this build ({', '.join(missing)}) | - | - | - | - |")
                continue
            encoders = ["vit-b"] if args.smoke or "sam" not in families else args.encoders
            for encoder in encoders:
                parts = write_parts(Path(folder), families, size, encoder)
                baseline = 0.0
                for path in paths:
                    backend = backend_for(name, parts, device, path)
                    rate, p50, busy = asyncio.run(measure(backend, path, image, args.requests))
                    baseline = baseline or rate
                    shown = encoder if "sam" in families else "-"
                    print(
                        f"| {name} | {shown} | {path.name} | {rate:.2f} | {p50 * 1000:.0f} "
                        f"| {busy:.0%} | {rate / baseline:.2f}x |",
                        flush=True,
                    )
                    del backend
    print(f"\ndevice: {describe(device)}")


def describe(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return f"{device}, torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny models on the CPU (checks the script)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=["float16", "bfloat16"], default="float16")
    parser.add_argument("--compile", action="store_true", help="torch.compile SAM's image encoder")
    parser.add_argument(
        "--encoders", nargs="+", default=["vit-b", "vit-h"], choices=["vit-b", "vit-l", "vit-h"]
    )
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument(
        "--cpu-threads", type=int, nargs="+", default=[2], help="the optimised path once per value"
    )
    parser.add_argument(
        "--pipelines", nargs="+", default=list(PIPELINES), choices=list(PIPELINES), help="what to measure"
    )
    run(parser.parse_args())


if __name__ == "__main__":
    main()
