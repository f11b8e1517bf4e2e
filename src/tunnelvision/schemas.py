"""Wire models shared by the API, the engine's results and (later) the client."""

from __future__ import annotations

from functools import cached_property
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MaskFormat = Literal["rle", "polygon", "png", "none"]
MAX_PHRASES = 32
MAX_PROMPTS = 256  # boxes or points in one request
MAX_EXEMPLARS = 64  # exemplar boxes in one request

Box = Annotated[list[float], Field(min_length=4, max_length=4, description="[x1, y1, x2, y2] pixels")]
Point = Annotated[
    list[float], Field(min_length=3, max_length=3, description="[x, y, label]: 1 object, 0 background")
]
Exemplar = Annotated[
    list[float],
    Field(min_length=5, max_length=5, description="[x1, y1, x2, y2, label]: 1 more like this, 0 not this"),
]


def normalize_prompt(prompt: str | list[str] | None) -> list[str]:
    """'A Cat . dog.' or ['A Cat', 'dog'] -> ['A Cat', 'dog']: the user's phrases, spaces tidied,
    repeats dropped regardless of case (families lower-case what their models need)."""
    if prompt is None:
        return []
    if isinstance(prompt, str):
        phrases = prompt.split(".")
    else:
        if any("." in label for label in prompt):
            raise ValueError("a label in a list must not contain '.'")
        phrases = prompt
    cleaned = [" ".join(p.split()) for p in phrases]
    first_spelling: dict[str, str] = {}
    for phrase in filter(None, cleaned):
        first_spelling.setdefault(phrase.casefold(), phrase)
    unique = list(first_spelling.values())
    if len(unique) > MAX_PHRASES:
        raise ValueError(f"at most {MAX_PHRASES} phrases in a prompt")
    return unique


def check_box(box: list[float], name: str) -> None:
    """ValueError unless [x1, y1, x2, y2] has x2 > x1, y2 > y1 and no negative coordinate."""
    x1, y1, x2, y2 = box
    if not (x2 > x1 and y2 > y1):
        raise ValueError(f"{name} is degenerate: need x2 > x1 and y2 > y1")
    if min(x1, y1) < 0:
        raise ValueError(f"{name} has a negative coordinate")


class DetectParams(BaseModel):
    """Options of /v1/detect, the same in JSON bodies and multipart fields."""

    model_config = ConfigDict(extra="forbid")

    prompt: str | list[str] | None = Field(
        None, description="phrases separated by '.' or a list of labels", examples=["forklift . person"]
    )
    box_threshold: float = Field(0.35, ge=0.0, le=1.0, description="minimum box score")
    text_threshold: float = Field(0.25, ge=0.0, le=1.0, description="minimum score of the label phrase")
    nms_iou: float = Field(0.5, ge=0.0, le=1.0, description="class-aware NMS IoU; 1 disables NMS")
    max_detections: int = Field(100, ge=1, le=900, description="keep the best N boxes")
    image_id: str | None = Field(
        None, max_length=64, description="instead of the image: the image_id an earlier answer gave"
    )
    model: str | None = Field(
        None,
        max_length=64,
        description="the pipeline to use (GET /v1/models lists them); default: the server's first",
        examples=["grounded-sam"],
    )
    exemplars: list[Exemplar] | None = Field(
        None,
        max_length=MAX_EXEMPLARS,
        description="example boxes in this image, alone or with a prompt, for pipelines that take them "
        "(GET /v1/models: 'exemplars'): label 1 finds more like it, 0 excludes things like it",
        examples=[[[10, 20, 200, 240, 1]]],
    )

    @field_validator("prompt")
    @classmethod
    def _prompt_has_phrases(cls, value: str | list[str] | None) -> str | list[str] | None:
        normalize_prompt(value)  # raises ValueError with the reason
        return value

    @field_validator("exemplars")
    @classmethod
    def _exemplars_valid(cls, exemplars: list[list[float]] | None) -> list[list[float]] | None:
        for i, (*box, label) in enumerate(exemplars or []):
            check_box(box, f"exemplar {i}")
            if label not in (0, 1):
                raise ValueError(f"exemplar {i} has label {label}: use 1 (more like this) or 0 (not this)")
        return exemplars

    @cached_property
    def phrases(self) -> list[str]:
        """The prompt's phrases, parsed once per request."""
        return normalize_prompt(self.prompt)


class DetectRequestParams(DetectParams):
    @model_validator(mode="after")
    def _needs_prompt(self) -> DetectRequestParams:
        if not self.phrases and not self.exemplars:
            raise ValueError("prompt is empty: give one or more phrases, e.g. 'forklift . person'")
        return self


class SegmentParams(DetectParams):
    """Options of /v1/segment: a text prompt and/or exemplars, or boxes, or points."""

    boxes: list[Box] | None = Field(None, max_length=MAX_PROMPTS, examples=[[[10, 20, 200, 240]]])
    points: list[Point] | None = Field(None, max_length=MAX_PROMPTS, examples=[[[120, 80, 1]]])
    multimask: bool = Field(False, description="predict 3 masks per prompt, keep the best by IoU")
    mask_format: MaskFormat = Field("rle", description="rle (COCO), polygon, png (base64) or none")

    @field_validator("boxes")
    @classmethod
    def _boxes_not_degenerate(cls, boxes: list[list[float]] | None) -> list[list[float]] | None:
        for i, box in enumerate(boxes or []):
            check_box(box, f"box {i}")
        return boxes

    @field_validator("points")
    @classmethod
    def _point_labels_binary(cls, points: list[list[float]] | None) -> list[list[float]] | None:
        for i, (x, y, label) in enumerate(points or []):
            if label not in (0, 1):
                raise ValueError(f"point {i} has label {label}: use 1 (object) or 0 (background)")
            if min(x, y) < 0:
                raise ValueError(f"point {i} has a negative coordinate")
        return points

    @model_validator(mode="after")
    def _exactly_one_prompt_kind(self) -> SegmentParams:
        # Exemplars refine or replace a text prompt; boxes and points each stand alone.
        given = [bool(self.phrases or self.exemplars), bool(self.boxes), bool(self.points)]
        if sum(given) == 0:
            raise ValueError("nothing to segment: give a prompt, exemplars, boxes or points")
        if sum(given) > 1:
            raise ValueError("give only one of prompt (with or without exemplars), boxes or points")
        return self


class AnnotateParams(SegmentParams):
    """Options of /v1/annotate: those of /v1/segment, plus the picture's format."""

    format: Literal["png", "jpeg"] = Field("png", description="the annotated image's format")


class ImageField(BaseModel):
    image: str | None = Field(
        None, description="the image file (JPEG, PNG, WebP, ...) as base64; a data: URL is accepted"
    )


class DetectJSONRequest(DetectRequestParams, ImageField):
    """application/json body of /v1/detect."""


class SegmentJSONRequest(SegmentParams, ImageField):
    """application/json body of /v1/segment."""


class AnnotateJSONRequest(AnnotateParams, ImageField):
    """application/json body of /v1/annotate."""


class ImageInfo(BaseModel):
    width: int
    height: int


class RLE(BaseModel):
    size: list[int] = Field(..., description="[height, width]")
    counts: str = Field(..., description="COCO compressed RLE (pycocotools)")


class Detection(BaseModel):
    label: str | None = Field(..., description="the prompt phrase; null for box/point prompts")
    score: float | None = Field(..., description="detector score; null for box/point prompts")
    box: list[float] = Field(..., description="[x1, y1, x2, y2] pixels in the original image")


class Segmentation(Detection):
    mask: RLE | list[list[float]] | str | None = Field(
        None, description="per mask_format: RLE object, polygons [[x, y, x, y, ...]], base64 PNG"
    )
    mask_score: float = Field(..., description="SAM's predicted IoU of the mask")


_TIMINGS_EXAMPLE: dict[str, Any] = {
    "decode": 6.1,
    "prepare": 9.8,
    "queue": 0.2,
    "device": 41.0,
    "finish": 3.4,
    "total": 61.2,
}


class Answer(BaseModel):
    """What detect and segment answers share beyond their fields: conversion for supervision."""

    _phrases: list[str] | None = None  # the request's phrases, where the client knows them

    def to_supervision(self, classes: str | list[str] | None = None) -> Any:
        """This answer as an `sv.Detections` (`pip install 'tunnelvision[supervision]'`); class_id
        counts in `classes` (default: the request's phrases), -1 for detections without a label."""
        from tunnelvision.integrations.supervision import to_detections

        assert isinstance(self, DetectResponse | SegmentResponse)
        return to_detections(self, classes)


class DetectResponse(Answer):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "image": {"width": 1280, "height": 720},
                    "image_id": "9f2c4e0d1b7a8c3e5f6a7b8c9d0e1f2a",
                    "detections": [{"label": "forklift", "score": 0.71, "box": [412.3, 188.0, 790.5, 601.2]}],
                    "timings_ms": _TIMINGS_EXAMPLE,
                }
            ]
        }
    )

    image: ImageInfo
    image_id: str = Field(..., description="send it as `image_id` to reuse this image (while cached)")
    detections: list[Detection]
    timings_ms: dict[str, float]


class SegmentResponse(Answer):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "image": {"width": 1280, "height": 720},
                    "image_id": "9f2c4e0d1b7a8c3e5f6a7b8c9d0e1f2a",
                    "mask_format": "rle",
                    "detections": [
                        {
                            "label": "forklift",
                            "score": 0.71,
                            "box": [412.3, 188.0, 790.5, 601.2],
                            "mask": {"size": [720, 1280], "counts": "Xk`81k0N2O1N3M..."},
                            "mask_score": 0.93,
                        }
                    ],
                    "timings_ms": _TIMINGS_EXAMPLE,
                }
            ]
        }
    )

    image: ImageInfo
    image_id: str = Field(..., description="send it as `image_id` to reuse this image (while cached)")
    mask_format: MaskFormat
    detections: list[Segmentation]
    timings_ms: dict[str, float]


Ability = Literal[
    "text", "boxes", "points", "exemplars", "masks", "video-text", "video-boxes", "video-points"
]


class ModelInfo(BaseModel):
    id: str = Field(..., description="the hub id or folder the weights came from")
    device: str
    dtype: str


class PipelineModel(ModelInfo):
    role: Literal["detector", "segmenter", "concept_segmenter", "video_tracker"]
    family: str = Field(..., description="the checkpoint's model_type family, e.g. grounding-dino, sam")


class PipelineInfo(BaseModel):
    name: str = Field(..., description="what requests send as `model`")
    default: bool = Field(..., description="used when a request names no model")
    abilities: list[Ability] = Field(
        ...,
        description="text, boxes, points, exemplars (prompt kinds it takes) and masks (it segments); "
        "video-text, video-boxes, video-points: what it follows through clips (/v1/videos)",
    )
    models: list[PipelineModel]
    source: str = Field(
        ..., description="the SPEC it was loaded from: DETECTOR+SEGMENTER or one model (hub ids or folders)"
    )
    generation: int = Field(..., description="1 as the server started, one more after each reload")
    loaded_at: str = Field(..., description="when this generation was loaded (UTC, ISO 8601)")


class ModelsResponse(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "pipelines": [
                        {
                            "name": "grounded-sam",
                            "default": True,
                            "abilities": ["boxes", "masks", "points", "text"],
                            "models": [
                                {
                                    "role": "detector",
                                    "id": "IDEA-Research/grounding-dino-tiny",
                                    "family": "grounding-dino",
                                    "device": "cuda",
                                    "dtype": "float32",
                                },
                                {
                                    "role": "segmenter",
                                    "id": "facebook/sam-vit-base",
                                    "family": "sam",
                                    "device": "cuda",
                                    "dtype": "float32",
                                },
                            ],
                            "source": "IDEA-Research/grounding-dino-tiny+facebook/sam-vit-base",
                            "generation": 1,
                            "loaded_at": "2026-11-25T09:30:00+00:00",
                        }
                    ],
                    "detector": {
                        "id": "IDEA-Research/grounding-dino-tiny",
                        "device": "cuda",
                        "dtype": "float32",
                    },
                    "segmenter": {"id": "facebook/sam-vit-base", "device": "cuda", "dtype": "float32"},
                    "demo": False,
                }
            ]
        }
    )

    pipelines: list[PipelineInfo] = Field(..., description="every pipeline served; the default first")
    detector: ModelInfo | None = Field(None, description="the default pipeline's detector (older clients)")
    segmenter: ModelInfo | None = Field(None, description="the default pipeline's segmenter (older clients)")
    demo: bool


class ErrorDetail(BaseModel):
    code: str
    message: str
    request_id: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class JobImageError(BaseModel):
    file_name: str
    error: str = Field(..., description="why this image failed (after its tries, where retryable)")


class JobStatus(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "failed", "cancelled"]
    total: int = Field(..., description="images in the job")
    done: int
    failed: int
    progress: float = Field(..., description="(done + failed) / total")
    created: float = Field(..., description="Unix time")
    errors: list[JobImageError] = Field(
        default_factory=list, description="the failed images (the first 100) and why each failed"
    )


class JobList(BaseModel):
    jobs: list[JobStatus] = Field(..., description="the caller's jobs, newest first (without `errors`)")
    next: str | None = Field(..., description="pass as `after` for the next page; null on the last")


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    source: str | None = Field(
        None,
        min_length=1,
        max_length=4096,
        description="new weights, as `--pipeline NAME=SPEC` takes SPEC: DETECTOR+SEGMENTER or one "
        "model, each a hub id or a folder on the server; default: the pipeline's current sources "
        "again (after writing new weights into the same folder)",
        examples=["/models/detector-finetuned+/models/segmenter"],
    )


class ReloadResponse(BaseModel):
    pipeline: PipelineInfo = Field(..., description="the pipeline as it serves now")
    load_s: float = Field(..., description="seconds spent loading the new weights (beside the old)")
    warmup_s: float = Field(..., description="seconds of the warm-up pass on every device")
    drained: bool = Field(
        ...,
        description="every request that was already on the old copy finished before this answer, "
        "and the old copy's memory was released",
    )
