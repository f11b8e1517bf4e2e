"""What /v1/videos takes and answers (wire models; no torch, no av)."""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunnelvision.schemas import MAX_PROMPTS, Box, Point, check_box, normalize_prompt

VideoState = Literal["queued", "running", "done", "failed"]
Direction = Literal["forward", "backward", "both"]


def _check_points(points: list[list[float]] | None) -> list[list[float]] | None:
    for i, (x, y, label) in enumerate(points or []):
        if label not in (0, 1):
            raise ValueError(f"point {i} has label {label}: use 1 (object) or 0 (background)")
        if min(x, y) < 0:
            raise ValueError(f"point {i} has a negative coordinate")
    return points


def _check_boxes(boxes: list[list[float]] | None) -> list[list[float]] | None:
    for i, box in enumerate(boxes or []):
        check_box(box, f"box {i}")
    return boxes


class VideoParams(BaseModel):
    """The fields of POST /v1/videos beside the `video` file."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        max_length=64,
        description="the video pipeline (GET /v1/models: video abilities); default: the first",
    )
    prompt: str | list[str] | None = Field(
        None,
        description="what to find and follow: phrases separated by '.' (text trackers, detector+tracker)",
    )
    boxes: list[Box] | None = Field(
        None, max_length=MAX_PROMPTS, description="objects to follow, one box each, on `frame`"
    )
    points: list[Point] | None = Field(
        None, max_length=MAX_PROMPTS, description="one object to follow, by points on `frame`"
    )
    frame: int | None = Field(None, ge=0, description="the frame the boxes/points are on; default `start`")
    start: int = Field(0, ge=0, description="first frame to track")
    end: int | None = Field(None, ge=1, description="track up to this frame (exclusive); default: the last")
    stride: int = Field(1, ge=1, le=1000, description="track every Nth frame")
    box_threshold: float = Field(0.35, ge=0.0, le=1.0, description="detector+tracker: minimum box score")
    text_threshold: float = Field(0.25, ge=0.0, le=1.0, description="detector+tracker: minimum phrase score")
    max_objects: int = Field(50, ge=1, le=200, description="objects followed at most")
    keyframe_every: int = Field(
        10, ge=1, le=10_000, description="detector+tracker: look for new objects every K tracked frames"
    )

    @field_validator("boxes")
    @classmethod
    def _boxes_valid(cls, boxes: list[list[float]] | None) -> list[list[float]] | None:
        return _check_boxes(boxes)

    @field_validator("points")
    @classmethod
    def _points_valid(cls, points: list[list[float]] | None) -> list[list[float]] | None:
        return _check_points(points)

    @field_validator("prompt")
    @classmethod
    def _prompt_has_phrases(cls, value: str | list[str] | None) -> str | list[str] | None:
        normalize_prompt(value)
        return value

    @cached_property
    def phrases(self) -> list[str]:
        return normalize_prompt(self.prompt)

    @model_validator(mode="after")
    def _something_to_follow(self) -> VideoParams:
        if not (self.phrases or self.boxes or self.points):
            raise ValueError("nothing to follow: give a text 'prompt', or 'boxes' or 'points' with 'frame'")
        if self.boxes and self.points:
            raise ValueError("give 'boxes' or 'points', not both (points make one object)")
        if self.end is not None and self.end <= self.start:
            raise ValueError(f"'end' ({self.end}) must be after 'start' ({self.start})")
        return self


class VideoCorrection(BaseModel):
    """POST /v1/videos/{id}/prompts: fix or add one object on a tracked frame."""

    model_config = ConfigDict(extra="forbid")

    frame: int = Field(..., ge=0, description="a frame the job tracks (start + n * stride)")
    object_id: int | None = Field(
        None,
        ge=1,
        description="the object to fix (its masks from `frame` on are replaced); none: a new object",
    )
    label: str | None = Field(None, max_length=200, description="the object's label (a new object: 'object')")
    box: Box | None = Field(None, description="the object's box on `frame`")
    points: list[Point] | None = Field(None, max_length=MAX_PROMPTS, description="or points on the object")
    direction: Direction = Field("forward", description="re-track from `frame` forward, backward or both")

    @field_validator("points")
    @classmethod
    def _points_valid(cls, points: list[list[float]] | None) -> list[list[float]] | None:
        return _check_points(points)

    @field_validator("box")
    @classmethod
    def _box_valid(cls, box: list[float] | None) -> list[float] | None:
        if box is not None:
            check_box(box, "box")
        return box

    @model_validator(mode="after")
    def _one_prompt(self) -> VideoCorrection:
        if (self.box is None) == (not self.points):
            raise ValueError("give the object as a 'box' or as 'points' (one of them)")
        return self


class VideoInfo(BaseModel):
    width: int
    height: int
    frames: int = Field(..., description="frames in the clip")
    fps: float


class VideoStatus(BaseModel):
    id: str
    status: VideoState
    model: str
    video: VideoInfo
    frames_total: int = Field(..., description="frames the first pass tracks (range and stride applied)")
    frames_done: int = Field(..., description="of those, tracked and committed")
    progress: float = Field(..., description="frames_done / frames_total")
    corrections_pending: int = Field(..., description="correction passes not finished yet")
    objects: int = Field(..., description="objects given an id so far")
    created: float = Field(..., description="Unix time")
    finished: float | None = Field(None, description="Unix time, once done or failed")
    error: str | None = Field(None, description="why the job failed (frames committed before stay readable)")


class VideoList(BaseModel):
    videos: list[VideoStatus]


class TrackedObjectOut(BaseModel):
    id: int
    label: str
    score: float
    box: list[float] = Field(..., description="[x1, y1, x2, y2] pixels")
    mask: dict[str, Any] = Field(..., description="COCO RLE: {'size': [h, w], 'counts': str}")


class VideoFrameOut(BaseModel):
    frame: int = Field(..., description="the frame's index in the clip (0-based)")
    objects: list[TrackedObjectOut]


class ObjectSummary(BaseModel):
    id: int
    label: str
    first_frame: int
    last_frame: int
    frames: int = Field(..., description="frames the object is present on")
    mean_score: float


class VideoResult(BaseModel):
    id: str
    status: VideoState
    video: VideoInfo
    frames: list[VideoFrameOut]
    objects: list[ObjectSummary]
