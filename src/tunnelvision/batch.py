"""`tunnelvision predict`: segment files, folders and globs through a server; overlays, masks and
a COCO file that survives reruns (images already answered for every phrase are skipped).

Every image gets a name relative to the inputs' common root (a folder given, a glob's fixed
leading folders, a file's folder): `photos/` names `photos/nested/b.jpg` `nested/b.jpg`. That name
is its COCO `file_name` and its place under `--out`, extension kept, so nothing is written
outside `--out` and `x.jpg` and `x.png` stay apart:

    OUT/nested/b.jpg.overlay.png    masks, boxes and labels drawn on the image
    OUT/nested/b.jpg.masks/000.png  one PNG per detection (255 inside), numbered as in the JSON
    OUT/nested/b.jpg.json           the server's answer (RLE masks)

Clips (.mp4 .mov .m4v .webm .mkv .avi) go up as video jobs, followed to the end, and their
exports come down beside them (a rerun skips clips whose exports are all there):

    OUT/clip.mp4.video.json         every tracked frame's objects (RLE masks) and per-object summaries
    OUT/clip.mp4.mot.txt            MOT Challenge lines: frame,id,left,top,width,height,score,-1,-1,-1
    OUT/clip.mp4.overlay.mp4        the clip with the masks, boxes and ids drawn
"""

from __future__ import annotations

import base64
import contextlib
import glob
import itertools
import json
import os
import shutil
from collections.abc import Callable, Iterable
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
VIDEO_SUFFIXES = {".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi"}
# A clip's exports under --out, by the result format they are: NAME (extension kept) + this.
VIDEO_EXPORTS = {"json": ".video.json", "mot": ".mot.txt", "mp4": ".overlay.mp4"}
# Failures that say no later image can succeed either: stop instead of failing each one.
UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout, httpx.UnsupportedProtocol)


class PredictError(Exception):
    """A reason to stop, worded for the person at the terminal."""


class VideoFailed(Exception):
    """A clip's job ended without its results (failed on the server, or still running at the
    time limit)."""


# Failures of one image or clip: reported, and the run goes on.
IMAGE_FAILURES = (APIError, OSError, ValueError, httpx.HTTPError, VideoFailed)


@dataclass
class Job:
    path: Path
    name: str  # relative to the inputs' common root: the COCO file_name and the place under --out

    @property
    def is_video(self) -> bool:
        return self.path.suffix.lower() in VIDEO_SUFFIXES


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    not_tried: int = 0
    stopped: str | None = None  # why the run stopped early

    def plus(self, other: Summary) -> Summary:
        """Both runs' counts (images, then clips), and the first reason to stop."""
        return Summary(
            self.done + other.done,
            self.skipped + other.skipped,
            {**self.failed, **other.failed},
            self.not_tried + other.not_tried,
            self.stopped or other.stopped,
        )


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
        wanted = IMAGE_SUFFIXES | VIDEO_SUFFIXES
        images = (f for f in sorted(path.rglob("*")) if f.suffix.lower() in wanted)
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


@dataclass
class VideoPredictor:
    """One clip: uploaded as a video job, followed to its end with a progress bar of its frames,
    its exports downloaded under `out` (`VIDEO_EXPORTS`), then the job deleted from the server."""

    client: Client
    fields: dict[str, Any]  # `Client.track_video` keyword arguments: model, prompt, boxes, stride...
    out: Path
    formats: tuple[str, ...] = tuple(VIDEO_EXPORTS)
    timeout_s: float = 3600.0

    def exports(self, job: Job) -> dict[str, Path]:
        target = self.out / job.name
        if not _inside(target, self.out):  # names are relative by construction; never trust it
            raise ValueError(f"{job.name} would be written outside {self.out}")
        return {fmt: Path(f"{target}{VIDEO_EXPORTS[fmt]}") for fmt in self.formats}

    def answered(self, job: Job) -> bool:
        return all(path.is_file() for path in self.exports(job).values())

    def run_one(self, job: Job, progress: Any = None) -> None:
        status = self.client.track_video(job.path, **self.fields)
        try:
            status = self.client.wait_video(status["id"], self.timeout_s, frames_bar(progress, job.name))
        except BaseException:  # Ctrl-C, a lost server: the job would go on tracking for nobody
            forget(self.client, status["id"])
            raise
        if status["status"] != "done":
            raise VideoFailed(unfinished(status, self.timeout_s))
        for fmt, path in self.exports(job).items():
            result = self.client.video_result(status["id"], fmt)
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, json.dumps(result).encode() if isinstance(result, dict) else _bytes(result))
        forget(self.client, status["id"])  # the exports are here now; free the server's disk


def frames_bar(progress: Any, name: str) -> Callable[[dict[str, Any]], None] | None:
    """A progress callback that shows one clip's tracked frames (done / total) in `progress`."""
    if progress is None:
        return None
    task = progress.add_task(f"tracking {name}", total=None)

    def show(status: dict[str, Any]) -> None:
        progress.update(task, total=status["frames_total"] or None, completed=status["frames_done"])

    return show


def unfinished(status: dict[str, Any], timeout_s: float) -> str:
    if status["status"] == "failed":
        return f"the job failed on the server: {status.get('error') or 'no reason given'}"
    return f"still {status['status']} after {timeout_s:g} s (video job {status['id']} goes on on the server)"


def forget(client: Client, video_id: str) -> None:
    """Delete a video job, as far as the server can still be told."""
    # Gone already, or unreachable: the server's retention time deletes it.
    with contextlib.suppress(APIError, httpx.HTTPError):
        client.delete_video(video_id)


def _bytes(result: str | bytes) -> bytes:
    return result.encode() if isinstance(result, str) else result


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


def predict_videos(
    jobs: list[Job], predictor: VideoPredictor, progress: Any = None, force: bool = False
) -> Summary:
    """Run the clips whose exports are not all there yet (all with `force`), one at a time and in
    this thread: Ctrl-C reaches the wait, and the job it interrupts is deleted on the server."""
    todo = jobs if force else [job for job in jobs if not predictor.answered(job)]
    summary = Summary(skipped=len(jobs) - len(todo))
    for index, job in enumerate(todo):
        try:
            predictor.run_one(job, progress)
        except Exception as exc:
            if not _tally(summary, job.name, exc, predictor.client.url):
                summary.not_tried += len(todo) - index - 1
                break
        else:
            summary.done += 1
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
    elif not _tally(summary, name, exc, url):
        _cancel(futures)


def _tally(summary: Summary, name: str, exc: BaseException, url: str) -> bool:
    """Counts a failure of `name`; False when it says that no later input can succeed."""
    if (reason := stop_reason(exc, url)) is not None:
        summary.not_tried += 1
        summary.stopped = summary.stopped or reason
        return False
    if isinstance(exc, IMAGE_FAILURES):
        summary.failed[name] = str(exc) or type(exc).__name__
        return True
    raise exc


def _cancel(futures: Iterable[Future[None]]) -> None:
    for future in futures:
        future.cancel()
