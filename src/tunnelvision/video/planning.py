"""A video request as passes over the clip (no HTTP, no models): which frames, in which direction,
starting from which prompts. Errors name what is wrong in the caller's terms."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from tunnelvision.engine.backend import PipelineSummary
from tunnelvision.errors import InvalidInput, UnknownModel, UnsupportedPrompt
from tunnelvision.video.schemas import VideoCorrection, VideoParams

VIDEO_ABILITY_WORDS = {"video-text": "text prompts", "video-boxes": "boxes", "video-points": "points"}
Pass = tuple[range, dict[str, Any]]


def video_pipeline_for(pipelines: Sequence[PipelineSummary], name: str | None) -> PipelineSummary:
    """The video pipeline a request names (None: the first one served)."""
    video = [p for p in pipelines if any(a.startswith("video-") for a in p.abilities)]
    if not video:
        raise UnknownModel(
            "this server serves no video pipeline; start it with one, e.g. --pipeline track=FOLDER "
            "(a sam2-video, sam3-video or sam3-tracker-video checkpoint)"
        )
    for pipeline in video:
        if name is None or pipeline.name == name:
            return pipeline
    served = [p.name for p in pipelines]
    if name in served:
        raise UnsupportedPrompt(f"model '{name}' works on images; video models here: {names(video)}")
    raise UnknownModel(f"no model '{name}' here; video models here: {names(video)}")


def names(pipelines: Sequence[PipelineSummary]) -> str:
    return ", ".join(p.name for p in pipelines)


def check_abilities(pipeline: PipelineSummary, text: bool, boxes: bool, points: bool) -> None:
    wanted = [
        a for a, asked in (("video-text", text), ("video-boxes", boxes), ("video-points", points)) if asked
    ]
    missing = [a for a in wanted if a not in pipeline.abilities]
    if missing:
        can = ", ".join(
            VIDEO_ABILITY_WORDS[a] for a in sorted(pipeline.abilities) if a in VIDEO_ABILITY_WORDS
        )
        raise UnsupportedPrompt(
            f"model '{pipeline.name}' cannot follow {' or '.join(VIDEO_ABILITY_WORDS[a] for a in missing)}; "
            f"it takes: {can}"
        )


def tracked_frames(params: VideoParams, clip_frames: int) -> range:
    """The frames the job tracks: start..end by stride, inside the clip."""
    if params.start >= clip_frames:
        raise InvalidInput(
            f"'start' is frame {params.start} but the clip has {clip_frames} frames (0..{clip_frames - 1})"
        )
    end = clip_frames if params.end is None else min(params.end, clip_frames)
    return range(params.start, end, params.stride)


def check_on_grid(frames: range, frame: int, what: str) -> None:
    if frame not in frames:
        last = frames[-1]
        raise InvalidInput(
            f"{what} is frame {frame}, which this job does not track: frames {frames.start}..{last} "
            f"every {frames.step} (e.g. {closest(frames, frame)})"
        )


def closest(frames: range, frame: int) -> int:
    """The tracked frame nearest to `frame`."""
    position = round((frame - frames.start) / frames.step)
    return frames[min(max(position, 0), len(frames) - 1)]


def check_inside(
    boxes: Sequence[Sequence[float]], points: Sequence[Sequence[float]], size: tuple[int, int]
) -> None:
    """Boxes and points must lie on the clip's frames (width, height)."""
    width, height = size
    for i, (_, _, x2, y2) in enumerate(boxes):
        if x2 > width or y2 > height:
            raise InvalidInput(f"box {i} reaches outside the clip's {width}x{height} frames")
    for i, (x, y, *_) in enumerate(points):
        if x > width or y > height:
            raise InvalidInput(f"point {i} lies outside the clip's {width}x{height} frames")


def first_passes(
    params: VideoParams, frames: range, labels: Sequence[str], size: tuple[int, int]
) -> list[Pass]:
    """Forward from the prompt's frame to the end; and back to `start` when the prompt is later."""
    frame = frames.start if params.frame is None else params.frame
    check_on_grid(frames, frame, "the prompt's 'frame'")
    check_inside(params.boxes or [], params.points or [], size)
    prompts = {"objects": initial_objects(params, labels)}
    passes: list[Pass] = [(range(frame, frames.stop, frames.step), prompts)]
    if frame > frames.start:
        passes.append((range(frame, frames.start - 1, -frames.step), prompts))
    return passes


def initial_objects(params: VideoParams, labels: Sequence[str]) -> list[dict[str, Any]]:
    """Boxes are objects 1..n; points are one object. Labels: the one phrase given, else 'object'."""
    label = labels[0] if len(labels) == 1 else "object"
    if params.boxes:
        return [{"object_id": i, "label": label, "box": box} for i, box in enumerate(params.boxes, start=1)]
    if params.points:
        points = [p[:2] for p in params.points]
        point_labels = [int(p[2]) for p in params.points]
        return [{"object_id": 1, "label": label, "points": points, "point_labels": point_labels}]
    return []


def correction_passes(
    correction: VideoCorrection, frames: range, next_id: int, labels: dict[int, str], size: tuple[int, int]
) -> list[Pass]:
    check_on_grid(frames, correction.frame, "the correction's 'frame'")
    check_inside([correction.box] if correction.box else [], correction.points or [], size)
    object_id = correction.object_id if correction.object_id is not None else next_id
    if correction.object_id is not None and correction.object_id not in labels:
        raise InvalidInput(f"no object {correction.object_id} in this job; leave 'object_id' out to add one")
    label = correction.label or labels.get(object_id, "object")
    prompt: dict[str, Any] = {"object_id": object_id, "label": label}
    if correction.box is not None:
        prompt["box"] = correction.box
    else:
        prompt["points"] = [p[:2] for p in correction.points or []]
        prompt["point_labels"] = [int(p[2]) for p in correction.points or []]
    prompts = {"objects": [prompt]}
    passes: list[Pass] = []
    if correction.direction in ("forward", "both"):
        passes.append((range(correction.frame, frames.stop, frames.step), prompts))
    if correction.direction in ("backward", "both"):
        passes.append((range(correction.frame, frames.start - 1, -frames.step), prompts))
    return passes
