"""`tunnelvision predict`: segment files, folders and globs through a server; overlays, masks and
a COCO file that survives reruns (images already in it are skipped)."""

from __future__ import annotations

import glob
import json
import os
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask

from tunnelvision.client import APIError, Client
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
    """COCO instances built as results arrive; saved atomically, so a rerun can resume from it."""

    def __init__(self, path: Path | None, labels: list[str]) -> None:
        self.path = path
        self.lock = threading.Lock()
        existing = json.loads(path.read_text()) if path is not None and path.is_file() else {}
        self.data: dict[str, Any] = {
            "images": existing.get("images", []),
            "annotations": existing.get("annotations", []),
            "categories": existing.get("categories")
            or [{"id": i, "name": label, "supercategory": "object"} for i, label in enumerate(labels, 1)],
        }
        self.category_ids = {c["name"]: c["id"] for c in self.data["categories"]}

    def done(self) -> set[str]:
        return {image["file_name"] for image in self.data["images"]}

    def add(self, name: str, result: SegmentResponse) -> None:
        with self.lock:
            image_id = 1 + max((i["id"] for i in self.data["images"]), default=0)
            self.data["images"].append(
                {
                    "id": image_id,
                    "file_name": name,
                    "width": result.image.width,
                    "height": result.image.height,
                }
            )
            for detection in result.detections:
                if isinstance(detection.mask, RLE) and detection.label in self.category_ids:
                    self.data["annotations"].append(self._annotation(image_id, detection))
            self.save()

    def _annotation(self, image_id: int, detection: Any) -> dict[str, Any]:
        rle = {"size": detection.mask.size, "counts": detection.mask.counts}
        x1, y1, x2, y2 = detection.box
        return {
            "id": 1 + len(self.data["annotations"]),
            "image_id": image_id,
            "category_id": self.category_ids[detection.label],
            "segmentation": rle,
            "area": float(coco_mask.area({"size": rle["size"], "counts": rle["counts"].encode()})),
            "bbox": [x1, y1, x2 - x1, y2 - y1],
            "iscrowd": 0,
            "score": detection.score,
        }

    def save(self) -> None:
        if self.path is None:
            return
        staging = self.path.with_suffix(".tmp")
        staging.write_text(json.dumps(self.data))
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
