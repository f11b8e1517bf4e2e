"""Tracking through video, a chunk of frames at a time, on the device worker.

A video pipeline is a tracker (SAM 2.1 / SAM 3 tracker: boxes and points; SAM 3 video: text),
optionally behind a detector (Grounded-SAM-2 style: the detector runs on every K-th frame and what
it finds that nobody follows yet becomes a new object). `Track` holds what one clip's pass keeps
between chunks: the tracker's session, stable object ids and labels. Sessions are disposable: when
one is missing (a restart, a reload, another device) the next chunk starts a fresh one seeded with
the objects committed on the frame before it, so results continue with the same ids.

Nothing here knows about files, HTTP or the job store (video/runner.py does).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from tunnelvision.boxes import box_iou
from tunnelvision.engine.backend import Backend, Check, PipelineSummary, no_deadline
from tunnelvision.engine.pipeline import Cached, select_detections
from tunnelvision.errors import UnsupportedPrompt
from tunnelvision.imaging import RGBImage
from tunnelvision.models.roles import Detector
from tunnelvision.models.video_tracking import ObjectPrompt, TrackedFrame, TrackingSession, VideoTracker
from tunnelvision.schemas import Detection, DetectParams

MATCH_IOU = 0.3  # a text tracker's object on the seed frame is the committed one it overlaps this much
NEW_OBJECT_IOU = 0.5  # a keyframe detection overlapping a followed object this much is that object


class VideoPipeline:
    """A Pipeline the device backend holds like the image ones; image requests are refused."""

    def __init__(
        self, name: str, tracker: VideoTracker, detector: Detector | None, summary: PipelineSummary
    ) -> None:
        self.tracker, self.detector, self.summary = tracker, detector, summary

    @property
    def finds_text(self) -> bool:
        """Text prompts are answered: by the tracker itself, or by the detector on keyframes."""
        return "video-text" in self.summary.abilities

    def prepare(
        self, image: RGBImage, params: DetectParams, image_id: str = "", check: Check = no_deadline
    ) -> Any:
        raise self._images_refused()

    def batch_key(self, prepared: Any, params: DetectParams) -> Hashable | None:
        return None

    def run_batch(self, items: list[tuple[Any, DetectParams]]) -> list[Any]:
        return [self._images_refused() for _ in items]  # never reached: prepare refuses

    def _images_refused(self) -> UnsupportedPrompt:
        name = self.summary.name
        return UnsupportedPrompt(f"model '{name}' tracks objects through video: send clips to /v1/videos")

    def finish(self, raw: Any, params: DetectParams, prepared: Any, check: Check) -> list[Detection]:
        return []

    def caches(self) -> list[Cached]:
        return []

    def device_steps(self, prepared: Any) -> dict[str, float]:
        return {}


@dataclass
class TrackedObject:
    object_id: int
    label: str
    score: float
    box: tuple[float, float, float, float]
    mask: np.ndarray  # (height, width) bool


@dataclass
class FrameResult:
    frame: int
    objects: list[TrackedObject]


@dataclass
class Seed:
    """Objects committed on the frame a new session starts from."""

    objects: list[TrackedObject]


@dataclass
class UserPrompt:
    """A box or points for one object on one frame, from the request or a correction."""

    object_id: int
    label: str
    box: tuple[float, float, float, float] | None = None
    points: tuple[tuple[float, float], ...] = ()
    point_labels: tuple[int, ...] = ()


@dataclass
class TrackOptions:
    pipeline: str
    phrases: tuple[str, ...] = ()
    keyframe_every: int = 10  # detector+tracker pipelines: detect on every K-th frame of the pass
    box_threshold: float = 0.35
    text_threshold: float = 0.25
    max_objects: int = 50


@dataclass
class Chunk:
    """Frames to track, in the order to track them. `seed`: start a new session on the first
    frame with these objects; `replay_first`: that frame was committed already (a resume), so its
    result is not returned. `prompts` by frame index."""

    frames: list[tuple[int, np.ndarray]]
    prompts: dict[int, list[UserPrompt]] = field(default_factory=dict)
    seed: Seed | None = None
    replay_first: bool = False
    step: int = 0  # how many frames of this pass came before the chunk (for keyframes)
    # Each frame as the tracker prepares it (see `prepare_chunk`); used only by that tracker.
    pixels: list[Any] | None = None
    prepared_by: object = None


class SessionLost(Exception):
    """The chunk needs a session this device does not have: send it again with a seed."""


@dataclass
class Track:
    """One pass over a clip (the first, or a correction's), between its chunks."""

    options: TrackOptions
    next_id: int = 1  # the next stable object id to hand out
    labels: dict[int, str] = field(default_factory=dict)  # stable id -> label
    session: TrackingSession | None = None
    device: int = -1
    tracker: VideoTracker | None = None
    id_map: dict[int, int] = field(default_factory=dict)  # a text tracker's id -> stable id
    last: list[TrackedObject] = field(default_factory=list)  # the objects on the latest frame

    def close(self) -> None:
        if self.session is not None:
            self.session.close()
        self.session = None

    def run(self, chunk: Chunk, backend: Backend, device: int) -> list[FrameResult]:
        """The device step for one chunk (called on the device worker)."""
        pipeline = video_pipeline(backend, self.options.pipeline)
        with torch.inference_mode():
            if chunk.seed is not None or self._stale(pipeline, device):
                if chunk.seed is None:
                    raise SessionLost("the tracker session is on another device or was reloaded")
                self._restart(pipeline, device, chunk)
            pixels = chunk.pixels if chunk.prepared_by is pipeline.tracker else None
            results = [
                self._step(pipeline, chunk, index, frame, None if pixels is None else pixels[row])
                for row, (index, frame) in enumerate(chunk.frames)
            ]
        return results[1:] if chunk.replay_first else results

    def _stale(self, pipeline: VideoPipeline, device: int) -> bool:
        return self.session is None or self.device != device or self.tracker is not pipeline.tracker

    def _restart(self, pipeline: VideoPipeline, device: int, chunk: Chunk) -> None:
        self.close()
        height, width = chunk.frames[0][1].shape[:2]
        phrases = self.options.phrases if "video-text" in pipeline.tracker.video_abilities else ()
        self.session = pipeline.tracker.start(height, width, phrases)
        self.device, self.tracker, self.id_map = device, pipeline.tracker, {}
        self.last = list(chunk.seed.objects) if chunk.seed else []

    def _step(
        self, pipeline: VideoPipeline, chunk: Chunk, index: int, frame: np.ndarray, pixels: Any
    ) -> FrameResult:
        assert self.session is not None
        first = index == chunk.frames[0][0]
        prompts = self._prompts(pipeline, chunk, index, frame, first)
        tracked = self.session.push(frame, prompts, pixels)
        objects = self._stable(tracked, seeded=first and chunk.seed is not None)
        self.last = objects
        return FrameResult(index, objects)

    def _prompts(
        self, pipeline: VideoPipeline, chunk: Chunk, index: int, frame: np.ndarray, first: bool
    ) -> list[ObjectPrompt]:
        text_tracker = "video-text" in pipeline.tracker.video_abilities
        prompts: list[ObjectPrompt] = []
        if first and chunk.seed is not None and not text_tracker:
            prompts += [ObjectPrompt(o.object_id, mask=o.mask) for o in chunk.seed.objects]
        given = chunk.prompts.get(index, [])
        if given and text_tracker:
            raise UnsupportedPrompt(f"model '{self.options.pipeline}' follows text prompts only")
        for prompt in given:
            self.labels[prompt.object_id] = prompt.label
            self.next_id = max(self.next_id, prompt.object_id + 1)
        prompts += [ObjectPrompt(p.object_id, p.box, p.points, p.point_labels) for p in given]
        if pipeline.detector is not None and self._is_keyframe(chunk, index):
            prompts += self._new_detections(pipeline.detector, frame, prompts)
        return [p for p in prompts if p.mask is None or p.mask.any()]

    def _is_keyframe(self, chunk: Chunk, index: int) -> bool:
        position = chunk.step + [i for i, _ in chunk.frames].index(index)
        every = max(1, self.options.keyframe_every)
        return bool(self.options.phrases) and position % every == 0

    def _new_detections(
        self, detector: Detector, frame: np.ndarray, prompts: Sequence[ObjectPrompt]
    ) -> list[ObjectPrompt]:
        """What the detector finds on this frame that no followed or prompted object covers."""
        options = self.options
        params = DetectParams(
            prompt=list(options.phrases),
            box_threshold=options.box_threshold,
            text_threshold=options.text_threshold,
            max_detections=options.max_objects,
        )
        (candidates,) = detector.detect_batch([detector.prepare(frame, list(options.phrases))])
        found = select_detections(candidates, params)
        followed = [o.box for o in self.last] + [p.box for p in prompts if p.box is not None]
        covered = [iou >= NEW_OBJECT_IOU for iou in overlaps(found.boxes, followed)]
        phrase_ids = found.phrase_ids.tolist() if found.phrase_ids is not None else []
        new: list[ObjectPrompt] = []
        for row, (box, phrase) in enumerate(zip(found.boxes.tolist(), phrase_ids, strict=True)):
            if len(new) + len(self.last) >= options.max_objects:
                break
            if covered[row]:
                continue
            object_id = self._new_id(options.phrases[int(phrase)] if phrase >= 0 else "object")
            new.append(ObjectPrompt(object_id, box=(box[0], box[1], box[2], box[3])))
        return new

    def _new_id(self, label: str) -> int:
        object_id, self.next_id = self.next_id, self.next_id + 1
        self.labels[object_id] = label
        return object_id

    def _stable(self, tracked: TrackedFrame, seeded: bool) -> list[TrackedObject]:
        """The tracker's answer with stable ids and labels (a text tracker's own ids mapped)."""
        objects: list[TrackedObject] = []
        for row, session_id in enumerate(tracked.object_ids):
            if tracked.phrase_ids:  # a text tracker: its ids are its own
                object_id = self._map_text_id(session_id, tracked.masks[row], tracked.phrase_ids[row], seeded)
            else:
                object_id = session_id
            x1, y1, x2, y2 = (float(v) for v in tracked.boxes[row])
            label = self.labels.get(object_id, "object")
            objects.append(
                TrackedObject(
                    object_id, label, float(tracked.scores[row]), (x1, y1, x2, y2), tracked.masks[row]
                )
            )
        return objects

    def _map_text_id(self, session_id: int, mask: np.ndarray, phrase_id: int, seeded: bool) -> int:
        if session_id in self.id_map:
            return self.id_map[session_id]
        taken = set(self.id_map.values())
        match = None
        if seeded:  # a fresh session on a committed frame: keep the ids it committed
            match = best_overlap(mask, [o for o in self.last if o.object_id not in taken])
        phrases = self.options.phrases
        label = phrases[phrase_id] if 0 <= phrase_id < len(phrases) else "object"
        object_id = match.object_id if match is not None else self._new_id(label)
        self.labels.setdefault(object_id, label)
        self.id_map[session_id] = object_id
        return object_id


def prepare_chunk(chunk: Chunk, backend: Backend, name: str) -> Chunk:
    """The CPU work of the chunk's frames (the tracker's resize and normalisation), done before
    the device step so the device worker only tracks. A device step whose tracker is another
    (a reload since) prepares the frames itself."""
    if serves_video(backend, name):
        tracker = video_pipeline(backend, name).tracker
        chunk.pixels = [tracker.prepare(frame) for _, frame in chunk.frames]
        chunk.prepared_by = tracker
    return chunk


def serves_video(backend: Backend, name: str) -> bool:
    """Whether this backend holds pipeline `name`'s tracker itself (a Ray ingress's does not)."""
    return isinstance(getattr(backend, "pipelines", {}).get(name), VideoPipeline)


def video_pipeline(backend: Backend, name: str) -> VideoPipeline:
    pipeline = getattr(backend, "pipelines", {}).get(name)
    if not isinstance(pipeline, VideoPipeline):
        raise UnsupportedPrompt(f"model '{name}' does not track video on this server")
    return pipeline


def best_overlap(mask: np.ndarray, candidates: Sequence[TrackedObject]) -> TrackedObject | None:
    best, best_iou = None, MATCH_IOU
    for candidate in candidates:
        iou = mask_iou(mask, candidate.mask)
        if iou >= best_iou:
            best, best_iou = candidate, iou
    return best


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def overlaps(boxes: torch.Tensor, followed: Sequence[tuple[float, float, float, float]]) -> list[float]:
    """Per box: its best IoU with the followed boxes (0 when nothing is followed)."""
    if not followed or boxes.numel() == 0:
        return [0.0] * len(boxes)
    ious = box_iou(boxes.float(), torch.tensor(followed, dtype=torch.float32))
    best: list[float] = ious.max(dim=1).values.tolist()
    return best
