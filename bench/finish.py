"""The finish stage: turning SAM's low-resolution masks into full-size encoded masks.

    python bench/finish.py                   # 20 boxes on a 1920x1080 image, SAM ViT-B (random)
    python bench/finish.py --masks 50 --repeats 10
    python bench/finish.py --device cuda     # masks upscaled on the GPU

Serves a tiny detector with a full-size random-weight SAM ViT-B through `tunnelvision serve`
(the path users run), sends one image once, then asks for `--masks` box prompts on it by
`image_id` `--repeats` times, so the image encoder runs once (embedding cache) and each answer's
`timings_ms` shows what upscaling and encoding cost. Prints a table per mask format and ends with
`finish_ms_per_image=<median, rle>`. Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.run import ours, process

FORMATS = ("rle", "polygon", "png", "none")


def photo(width: int, height: int) -> bytes:
    pixels = np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def boxes(count: int, width: int, height: int) -> list[list[float]]:
    """`count` boxes spread over the image, each a sixth of it on a side."""
    rng = np.random.default_rng(1)
    w, h = width / 6, height / 6
    corners = rng.uniform([0, 0], [width - w, height - h], size=(count, 2))
    return [[float(x), float(y), float(x + w), float(y + h)] for x, y in corners]


def write_models(folder: Path) -> tuple[Path, Path]:
    """Tiny detector (unused here: box prompts) and a full-size random SAM ViT-B."""
    from tunnelvision.models.random import write_random_models

    write_random_models(folder / "tiny", "tiny", 0)
    write_random_models(folder / "full", "full", 0)
    return folder / "tiny" / "detector", folder / "full" / "segmenter"


def stage_times(url: str, image_id: str, prompt: dict[str, Any], repeats: int) -> list[dict[str, float]]:
    timings = []
    for _ in range(repeats):
        answer = httpx.post(f"{url}/v1/segment", json={"image_id": image_id, **prompt}, timeout=600)
        answer.raise_for_status()
        timings.append(answer.json()["timings_ms"])
    return timings


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--masks", type=int, default=20)
    parser.add_argument("--width", type=int, default=1920)
    parser.add_argument("--height", type=int, default=1080)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--cpu-threads", type=int, default=1, help="the server's CPU pool (finish runs there)"
    )
    args = parser.parse_args()
    detector, segmenter = write_models(Path(tempfile.mkdtemp(prefix="bench-finish-")))
    command = ours("--detector", str(detector), "--segmenter", str(segmenter), "--device", args.device)
    command += ["--no-warmup", "--cpu-threads", str(args.cpu_threads), "--deadline-s", "120"]
    image = photo(args.width, args.height)
    prompt_boxes = boxes(args.masks, args.width, args.height)
    rows = []
    with process(command, "/readyz") as (url, _):
        first = httpx.post(
            f"{url}/v1/segment",
            files={"image": ("photo.jpg", image, "image/jpeg")},
            data={"boxes": str(prompt_boxes[:1]), "mask_format": "none"},
            timeout=600,
        )
        first.raise_for_status()
        image_id = first.json()["image_id"]
        for fmt in FORMATS:
            times = stage_times(url, image_id, {"boxes": prompt_boxes, "mask_format": fmt}, args.repeats)
            rows.append((fmt, times))
    print(
        f"{args.masks} masks on a {args.width}x{args.height} image, "
        f"SAM ViT-B (random weights), {args.device},"
    )
    print(
        f"cpu_threads={args.cpu_threads}; median of {args.repeats} requests by image_id (embedding cached)\n"
    )
    print("| mask_format | device ms | finish ms | total ms |")
    print("|---|---|---|---|")
    for fmt, times in rows:
        device, finish, total = (
            statistics.median(t[k] for t in times) for k in ("device", "finish", "total")
        )
        print(f"| {fmt} | {device:.0f} | {finish:.0f} | {total:.0f} |")
    rle = next(times for fmt, times in rows if fmt == "rle")
    print(f"\nfinish_ms_per_image={statistics.median(t['finish'] for t in rle):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
