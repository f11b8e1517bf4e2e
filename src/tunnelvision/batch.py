"""`tunnelvision predict`: segment files, folders and globs through a server; overlays, masks and
a COCO file that survives reruns (images already in it are skipped)."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tunnelvision.client import APIError, Client
from tunnelvision.coco import Coco
from tunnelvision.drawing import annotate
from tunnelvision.imaging import decode_image
from tunnelvision.masks import decode_rle
from tunnelvision.schemas import RLE, SegmentResponse

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass
class Job:
    path: Path
    name: str  # the file name recorded in COCO: relative to the folder it was found in


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)


def find_images(inputs: Iterable[str]) -> list[Job]:
    """Files as given, folders searched recursively, globs expanded; sorted, without repeats."""
    jobs: dict[Path, Job] = {}
    for spec in inputs:
        path = Path(spec)
        if path.is_dir():
            for found in sorted(path.rglob("*")):
                if found.suffix.lower() in IMAGE_SUFFIXES and found.is_file():
                    jobs.setdefault(found.resolve(), Job(found, found.relative_to(path).as_posix()))
        elif glob.has_magic(spec):
            for match in sorted(glob.glob(spec, recursive=True)):
                found = Path(match)
                if found.is_file():
                    jobs.setdefault(found.resolve(), Job(found, found.as_posix()))
        else:
            jobs.setdefault(path.resolve(), Job(path, path.as_posix()))
    return list(jobs.values())


class CocoWriter:
    """COCO built as results arrive, saved atomically after each image, so a rerun can resume."""

    def __init__(self, path: Path | None, labels: list[str]) -> None:
        self.path = path
        existing = json.loads(path.read_text()) if path is not None and path.is_file() else None
        self.coco = Coco(labels, existing)

    def done(self) -> set[str]:
        return self.coco.file_names()

    def add(self, name: str, result: SegmentResponse) -> None:
        self.coco.add(name, result)
        if self.path is not None:
            with self.coco.lock:
                staging = self.path.with_suffix(".tmp")
                staging.write_text(json.dumps(self.coco.data))
                os.replace(staging, self.path)


@dataclass
class Predictor:
    client: Client
    prompt: str
    options: dict[str, Any]
    out: Path | None
    coco: CocoWriter

    def run_one(self, job: Job) -> None:
        data = job.path.read_bytes()
        result = self.client.segment(data, prompt=self.prompt, mask_format="rle", **self.options)
        if self.out is not None:
            self._write_outputs(job, data, result)
        self.coco.add(job.name, result)

    def _write_outputs(self, job: Job, data: bytes, result: SegmentResponse) -> None:
        target = self.out / Path(job.name).with_suffix("")  # type: ignore[operator]
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = decode_image(data, max_pixels=10**9)
        Path(f"{target}.overlay.png").write_bytes(annotate(pixels, list(result.detections)))
        index = np.zeros((result.image.height, result.image.width), dtype=np.uint16)
        for number, detection in enumerate(result.detections, start=1):
            if isinstance(detection.mask, RLE):
                index[decode_rle(detection.mask)] = number
        Image.fromarray(index).save(f"{target}.masks.png")  # 0: background, n: detection n
        Path(f"{target}.json").write_text(result.model_dump_json(indent=1))


def predict(jobs: list[Job], predictor: Predictor, concurrency: int, progress: Any = None) -> Summary:
    summary = Summary()
    done = predictor.coco.done()
    todo = [job for job in jobs if job.name not in done]
    summary.skipped = len(jobs) - len(todo)
    task = progress.add_task("segmenting", total=len(todo)) if progress is not None else None
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        futures = {pool.submit(predictor.run_one, job): job for job in todo}
        for future in as_completed(futures):
            job = futures[future]
            try:
                future.result()
                summary.done += 1
            except (APIError, OSError, ValueError) as exc:
                summary.failed[job.name] = str(exc)
            if progress is not None:
                progress.advance(task)
    return summary
