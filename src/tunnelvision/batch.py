"""`tunnelvision predict`: segment files, folders and globs through a server; overlays, masks and
a COCO file that survives reruns (images already answered for every phrase are skipped).

Every image gets a name relative to the inputs' common root (a folder given, a glob's fixed
leading folders, a file's folder): `photos/` names `photos/nested/b.jpg` `nested/b.jpg`. That name
is its COCO `file_name` and its place under `--out`, extension kept, so nothing is written
outside `--out` and `x.jpg` and `x.png` stay apart:

    OUT/nested/b.jpg.overlay.png    masks, boxes and labels drawn on the image
    OUT/nested/b.jpg.masks/000.png  one PNG per detection (255 inside), numbered as in the JSON
    OUT/nested/b.jpg.json           the server's answer (RLE masks)
"""

from __future__ import annotations

import base64
import glob
import itertools
import json
import os
import shutil
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tunnelvision.client import APIError, AuthenticationError, Client
from tunnelvision.coco import Coco, coco_problem
from tunnelvision.drawing import annotate
from tunnelvision.files import staging_path, write_atomic
from tunnelvision.imaging import decode_image
from tunnelvision.masks import decode_rle, encode_png
from tunnelvision.schemas import RLE, SegmentResponse

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
# Failures that say no later image can succeed either: stop instead of failing each one.
UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)
# Failures of one image: reported, and the run goes on.
IMAGE_FAILURES = (APIError, OSError, ValueError, httpx.HTTPError)


class PredictError(Exception):
    """A reason to stop, worded for the person at the terminal."""


@dataclass
class Job:
    path: Path
    name: str  # relative to the inputs' common root: the COCO file_name and the place under --out


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    not_tried: int = 0
    stopped: str | None = None  # why the run stopped early


def find_images(inputs: Iterable[str], exclude: Path | None = None) -> list[Job]:
    """Files as given, folders searched recursively, globs expanded; without repeats, and
    without anything under `exclude` (the output folder: earlier overlays are not inputs)."""
    found: dict[Path, Path] = {}  # resolved -> absolute, as found (symlinks kept)
    roots: list[str] = []
    for spec in inputs:
        root, files = _expand(spec)
        kept = [f for f in files if exclude is None or not _inside(f, exclude)]
        roots += [root] if kept else []
        for path in kept:
            found.setdefault(path.resolve(), Path(os.path.abspath(path)))
    if not found:
        return []
    base = os.path.commonpath(roots)
    return [Job(path, Path(os.path.relpath(path, base)).as_posix()) for path in found.values()]


def _expand(spec: str) -> tuple[str, list[Path]]:
    """The files `spec` names, and the folder their names are relative to."""
    path = Path(spec)
    if path.is_dir():
        images = (f for f in sorted(path.rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES)
        return os.path.abspath(path), [f for f in images if f.is_file()]
    if glob.has_magic(spec):
        fixed = itertools.takewhile(lambda part: not glob.has_magic(part), path.parts[:-1])
        matches = [Path(m) for m in sorted(glob.glob(spec, recursive=True))]
        return os.path.abspath(Path(*fixed)), [m for m in matches if m.is_file()]
    return os.path.dirname(os.path.abspath(path)), [path]  # a missing file fails as its image


def _inside(path: Path, folder: Path) -> bool:
    return Path(os.path.abspath(path)).is_relative_to(os.path.abspath(folder))


def read_coco(path: Path) -> dict[str, Any] | None:
    """The COCO file a rerun adds to (None: none yet); PredictError when it cannot be used."""
    if not path.exists():
        return None
    advice = "move it away or name another --coco file"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except IsADirectoryError:
        raise PredictError(f"--coco {path} is a folder: name a file") from None
    except OSError as exc:
        raise PredictError(f"cannot read --coco {path}: {exc.strerror or exc}") from None
    except ValueError as exc:  # bad JSON, bad UTF-8
        raise PredictError(f"--coco {path} is not JSON ({exc}): {advice}") from None
    problem = coco_problem(data)
    if problem is not None:
        raise PredictError(f"--coco {path} is not a COCO instances file ({problem}): {advice}")
    return dict(data)


class CocoWriter:
    """COCO built as results arrive, saved atomically after each image, so a rerun can resume.
    A rerun with new phrases adds their categories and redoes the images not asked for them."""

    def __init__(self, path: Path | None, labels: list[str]) -> None:
        self.path, self.labels = path, labels
        existing = read_coco(path) if path is not None else None
        known = {str(c["name"]).casefold() for c in (existing or {}).get("categories", [])}
        # Phrases the file has no category for yet (only when there is a file to add to).
        self.new_labels = [label for label in labels if existing and label.casefold() not in known]
        self.coco = Coco(labels, existing)

    def answered(self, name: str) -> bool:
        """Whether `name` is here with an answer for every phrase of this run."""
        asked = self.coco.asked(name)
        return asked is not None and {label.casefold() for label in self.labels} <= asked

    def add(self, name: str, result: SegmentResponse) -> None:
        self.coco.add(name, result, self.labels)
        if self.path is not None:
            with self.coco.lock:
                write_atomic(self.path, json.dumps(self.coco.data).encode())


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
        assert self.out is not None
        target = self.out / job.name
        if not _inside(target, self.out):  # names are relative by construction; never trust it
            raise ValueError(f"{job.name} would be written outside {self.out}")
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = decode_image(data, max_pixels=10**9)
        write_atomic(Path(f"{target}.overlay.png"), annotate(pixels, list(result.detections)))
        write_masks(Path(f"{target}.masks"), result)
        write_atomic(Path(f"{target}.json"), result.model_dump_json(indent=1).encode())


def write_masks(folder: Path, result: SegmentResponse) -> None:
    """One PNG per detection (0 outside, 255 inside; overlaps kept), named by its index in the
    answer's `detections`. Written beside `folder`, then swapped in: no file of an older answer
    with more detections stays behind."""
    staging = staging_path(folder)
    staging.mkdir()
    try:
        digits = max(3, len(str(len(result.detections) - 1)))
        for index, detection in enumerate(result.detections):
            if isinstance(detection.mask, RLE):
                png = base64.b64decode(encode_png(decode_rle(detection.mask)))
                (staging / f"{index:0{digits}d}.png").write_bytes(png)
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(staging, folder)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def stop_reason(exc: BaseException, url: str) -> str | None:
    """Why no image can succeed after `exc` (a message), or None when it is this image's own."""
    if isinstance(exc, AuthenticationError):
        return f"the server refused access ({exc}): pass a key it accepts with --key or TUNNELVISION_API_KEY"
    if isinstance(exc, APIError) and exc.code == "connection_failed":  # the client's own words
        return exc.message
    cause: BaseException | None = exc
    while cause is not None:  # a transport error, raw or wrapped: the cause tells
        if isinstance(cause, UNREACHABLE):
            return f"nothing answers at {url} ({cause}): is the server running, and is --url right?"
        cause = cause.__cause__ or cause.__context__
    return None


def predict(
    jobs: list[Job], predictor: Predictor, concurrency: int, progress: Any = None, force: bool = False
) -> Summary:
    """Run `jobs` not already answered (all with `force`); stop at the first failure that every
    image would share (a refused key, no server)."""
    todo = jobs if force else [job for job in jobs if not predictor.coco.answered(job.name)]
    summary = Summary(skipped=len(jobs) - len(todo))
    task = progress.add_task("segmenting", total=len(todo)) if progress is not None else None
    with ThreadPoolExecutor(max(1, concurrency)) as pool:
        futures = {pool.submit(predictor.run_one, job): job for job in todo}
        try:
            for future in as_completed(futures):
                _count(summary, futures[future].name, future, predictor.client.url, futures)
                if progress is not None:
                    progress.advance(task)
        except BaseException:  # Ctrl-C: what has not started never starts
            _cancel(futures)
            raise
    return summary


def _count(
    summary: Summary, name: str, future: Future[None], url: str, futures: dict[Future[None], Job]
) -> None:
    if future.cancelled():
        summary.not_tried += 1
        return
    exc = future.exception()
    if exc is None:
        summary.done += 1
    elif (reason := stop_reason(exc, url)) is not None:
        summary.not_tried += 1
        if summary.stopped is None:
            summary.stopped = reason
            _cancel(futures)
    elif isinstance(exc, IMAGE_FAILURES):
        summary.failed[name] = str(exc) or type(exc).__name__
    else:
        raise exc


def _cancel(futures: Iterable[Future[None]]) -> None:
    for future in futures:
        future.cancel()
