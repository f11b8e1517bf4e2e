"""Roboflow Inference's request and answer shapes (as inference-sdk sends and reads them) <->
our engine's parameters and answers. Pure translation: no HTTP, no engine calls.

Box conventions differ per route, as in Roboflow's own server: SAM 2 prompt boxes and
GroundingDINO predictions give x, y as the box CENTRE; SAM 3 exemplar boxes `{x, y, width,
height}` give x, y as the TOP-LEFT corner (or `{x0, y0, x1, y1}` corners).
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pycocotools import mask as coco_mask
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tunnelvision.engine.backend import Ability, PipelineSummary
from tunnelvision.errors import InvalidImage, InvalidInput, UnsupportedPrompt
from tunnelvision.imaging import decode_base64
from tunnelvision.masks import decode_rle, encode_polygons
from tunnelvision.schemas import MAX_EXEMPLARS, MAX_PHRASES, MAX_PROMPTS, RLE, Detection, Segmentation

MAX_CONCEPT_PROMPTS = 16  # Roboflow's SAM3_MAX_PROMPT_BATCH_SIZE default
MAX_POINT_PROMPTS = 16  # each point prompt is one decoder pass of its own here
MAX_TEXT = 200
MAX_DETECTIONS = 100  # instances kept per concept prompt (our default max_detections)

# Roboflow's image types we refuse, and why (the message is what the SDK's exception carries).
REFUSED_IMAGE_TYPES = {
    "numpy": "image type 'numpy' is refused: it is pickled data, which this server never loads; "
    "send {'type': 'base64', 'value': ...}",
    "url": "image type 'url' is refused: this server fetches no URLs (a server-side fetch could "
    "reach private addresses); send {'type': 'base64', 'value': ...}",
}


class Lenient(BaseModel):
    """The SDK adds fields of its own (api_key, source, source_info...): ignored, not refused."""

    model_config = ConfigDict(extra="ignore")


class RoboflowImage(Lenient):
    type: str = Field(..., max_length=16, description="only 'base64' is accepted here")
    value: Any = Field(None, description="the image file as base64 (a data: URL prefix is allowed)")


class Pipelined(Lenient):
    """Which of our pipelines answers: `model` (ours), or Roboflow's id when it names one of ours."""

    model: str | None = Field(None, max_length=64, description="one of our pipelines (GET /v1/models)")
    model_id: str | None = Field(None, max_length=128, description="Roboflow's id, e.g. sam3/sam3_final")

    def named(self, extra: str | None = None) -> list[str]:
        """Names a client may have meant as one of our pipelines, most explicit first."""
        names = [self.model, self.model_id, extra]
        return [n for name in names if name for n in (name, name.rpartition("/")[2])]


class WithImage(Pipelined):
    image: RoboflowImage | None = None
    image_id: str | None = Field(None, max_length=64, description="from /sam2|sam3/embed_image")

    def image_bytes(self, max_bytes: int) -> bytes | None:
        return None if self.image is None else image_bytes(self.image, max_bytes)


def image_bytes(image: RoboflowImage, max_bytes: int) -> bytes:
    """The encoded image file; 4xx naming why for the types we refuse."""
    if image.type in REFUSED_IMAGE_TYPES:
        raise InvalidImage(REFUSED_IMAGE_TYPES[image.type])
    if image.type != "base64":
        raise InvalidImage(f"image type '{image.type[:16]}' is not supported: send 'base64'")
    if not isinstance(image.value, str) or not image.value:
        raise InvalidImage("image.value must be the image file as a base64 string")
    return decode_base64(image.value, max_bytes)


# -- SAM 2 / SAM 3 visual prompts (/sam2/segment_image, /sam3/visual_segment) ----------------


class CentreBox(BaseModel):
    x: float = Field(..., description="box centre")
    y: float = Field(..., description="box centre")
    width: float = Field(..., gt=0)
    height: float = Field(..., gt=0)

    def corners(self) -> list[float]:
        """[x1, y1, x2, y2]; a box poking past the top-left edge is cut there (rounding)."""
        x1, y1 = self.x - self.width / 2, self.y - self.height / 2
        return [max(0.0, x1), max(0.0, y1), self.x + self.width / 2, self.y + self.height / 2]


class PromptPoint(BaseModel):
    x: float
    y: float
    positive: bool = True


class Sam2Prompt(BaseModel):
    box: CentreBox | None = None
    points: list[PromptPoint] | None = Field(None, max_length=MAX_PROMPTS)


class Sam2PromptSet(BaseModel):
    prompts: list[Sam2Prompt] | None = Field(None, max_length=MAX_PROMPTS)


class Sam2SegmentRequest(WithImage):
    """/sam2/segment_image and /sam3/visual_segment: one mask per prompt."""

    sam2_version_id: str | None = Field(None, max_length=64, description="Roboflow's, e.g. hiera_tiny")
    prompts: Sam2PromptSet = Field(default_factory=Sam2PromptSet)
    multimask_output: bool = True
    format: Literal["json", "polygon", "rle"] = Field("json", description="json (polygons) or rle")

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompt_set(cls, value: Any) -> Any:
        """Roboflow takes `{"prompts": [...]}`, a flat list or one prompt."""
        if value is None:
            return {}
        if isinstance(value, list):
            return {"prompts": value}
        if isinstance(value, dict) and "prompts" not in value:
            return {"prompts": [value]}
        return value

    @field_validator("format", mode="before")
    @classmethod
    def _no_binary(cls, value: Any) -> Any:
        if value == "binary":
            raise ValueError("format 'binary' (numpy arrays) is not served here: use 'json' or 'rle'")
        return value


class Call(BaseModel):
    """One engine request that answers some of the prompts (their indexes, in order)."""

    prompts: list[int]
    boxes: list[list[float]] | None = None
    points: list[list[float]] | None = None


def visual_calls(request: Sam2SegmentRequest) -> list[Call]:
    """Box prompts all go in one request (one mask each); each point prompt is its own request
    (our point prompts make one mask from all the points sent)."""
    prompts = request.prompts.prompts or []
    if not prompts:
        raise InvalidInput("prompts: give at least one prompt, a box or points")
    box_prompts, calls = [], []
    for i, prompt in enumerate(prompts):
        if prompt.box is not None and prompt.points:
            raise UnsupportedPrompt(
                f"prompts.{i}: a box together with points is not supported here; send them as two prompts"
            )
        if prompt.box is not None:
            box_prompts.append(i)
        elif prompt.points:
            points = [[p.x, p.y, 1.0 if p.positive else 0.0] for p in prompt.points]
            calls.append(Call(prompts=[i], points=points))
        else:
            raise InvalidInput(f"prompts.{i}: give a box or points")
    if len(calls) > MAX_POINT_PROMPTS:
        raise InvalidInput(f"prompts: at most {MAX_POINT_PROMPTS} point prompts in one request")
    if box_prompts:
        boxes = [_box(prompts[i]).corners() for i in box_prompts]
        calls.insert(0, Call(prompts=box_prompts, boxes=boxes))
    return calls


def visual_needs(calls: list[Call]) -> set[Ability]:
    """What a pipeline must take to answer these calls."""
    needs: set[Ability] = {"masks"}
    needs |= {"boxes"} if any(c.boxes for c in calls) else set()
    needs |= {"points"} if any(c.points for c in calls) else set()
    return needs


def _box(prompt: Sam2Prompt) -> CentreBox:
    assert prompt.box is not None
    return prompt.box


class Sam2Prediction(BaseModel):
    masks: list[list[list[int]]] | RLE = Field(
        ..., description="polygon: a list of polygons, each a list of [x, y]; rle: {size, counts}"
    )
    confidence: float = Field(..., description="for box/point prompts: SAM's predicted IoU, in [0, 1]")
    format: Literal["polygon", "rle"]


class Sam2SegmentResponse(BaseModel):
    predictions: list[Sam2Prediction]
    time: float = Field(..., description="seconds")


# -- SAM 3 concept prompts (/sam3/concept_segment) ------------------------------------------


class CornerBox(BaseModel):
    """Roboflow's XYWH exemplar box: x, y are the TOP-LEFT corner."""

    x: float = Field(..., ge=0)
    y: float = Field(..., ge=0)
    width: float = Field(..., gt=0)
    height: float = Field(..., gt=0)

    def corners(self) -> list[float]:
        return [self.x, self.y, self.x + self.width, self.y + self.height]


class XYXYBox(BaseModel):
    x0: float
    y0: float
    x1: float
    y1: float

    def corners(self) -> list[float]:
        return [self.x0, self.y0, self.x1, self.y1]


class ConceptPrompt(BaseModel):
    type: Literal["text", "visual"] | None = None
    text: str | None = Field(None, min_length=1, max_length=MAX_TEXT)
    output_prob_thresh: float | None = Field(None, ge=0.0, le=1.0)
    boxes: list[CornerBox | XYXYBox] | None = Field(None, max_length=MAX_EXEMPLARS)
    box_labels: list[bool | int] | None = Field(None, max_length=MAX_EXEMPLARS)

    @model_validator(mode="after")
    def _consistent(self) -> ConceptPrompt:
        if self.type == "visual" and not self.boxes:
            raise ValueError("a visual prompt needs at least one box")
        if self.box_labels is not None and len(self.box_labels) != len(self.boxes or []):
            raise ValueError("box_labels must have one label per box")
        if any(int(label) not in (0, 1) for label in self.box_labels or []):
            raise ValueError("box_labels are 1 (like this) or 0 (not like this)")
        if not self.text and not self.boxes:
            raise ValueError("give text, boxes or both")
        return self

    def exemplars(self) -> list[list[float]] | None:
        if not self.boxes:
            return None
        labels = self.box_labels if self.box_labels is not None else [1] * len(self.boxes)
        return [[*box.corners(), float(int(label))] for box, label in zip(self.boxes, labels, strict=True)]


class ConceptSegmentRequest(WithImage):
    model_id: str | None = Field("sam3/sam3_final", max_length=128)
    prompts: list[ConceptPrompt] = Field(..., min_length=1, max_length=MAX_CONCEPT_PROMPTS)
    output_prob_thresh: float | None = Field(0.5, ge=0.0, le=1.0)
    format: Literal["polygon", "json", "rle"] = "polygon"
    nms_iou_threshold: float | None = Field(None, ge=0.0, le=1.0, description="cross-prompt NMS; null: off")

    def threshold(self, prompt: ConceptPrompt) -> float:
        for value in (prompt.output_prob_thresh, self.output_prob_thresh):
            if value is not None:
                return value
        return 0.5


class PromptEcho(BaseModel):
    prompt_index: int
    type: Literal["text", "visual"]
    text: str | None
    num_boxes: int


def echo(index: int, prompt: ConceptPrompt) -> PromptEcho:
    visual = bool(prompt.boxes)
    return PromptEcho(
        prompt_index=index,
        type="visual" if visual else "text",
        text=prompt.text,
        num_boxes=len(prompt.boxes or []),
    )


class PromptResult(BaseModel):
    prompt_index: int
    echo: PromptEcho
    predictions: list[Sam2Prediction]


class ConceptSegmentResponse(BaseModel):
    prompt_results: list[PromptResult]
    time: float = Field(..., description="seconds")


def concept_params(request: ConceptSegmentRequest, prompt: ConceptPrompt, model: str) -> dict[str, Any]:
    """SegmentParams fields for one prompt: all instances above its threshold, no NMS within
    it (as Roboflow's SAM 3); RLE, so that cross-prompt NMS can compare masks."""
    threshold = request.threshold(prompt)
    return {
        "model": model,
        "prompt": [prompt.text] if prompt.text else None,
        "exemplars": prompt.exemplars(),
        "box_threshold": threshold,
        "text_threshold": threshold,
        "nms_iou": 1.0,
        "max_detections": MAX_DETECTIONS,
        "mask_format": "rle",
    }


# -- embeddings (/sam2/embed_image, /sam3/embed_image) -----------------------------------------


class EmbedRequest(WithImage):
    sam2_version_id: str | None = Field(None, max_length=64)


class EmbedResponse(BaseModel):
    image_id: str = Field(..., description="send it as image_id with later requests")
    time: float = Field(..., description="seconds")


# -- GroundingDINO (/grounding_dino/infer) -----------------------------------------------------


class GroundingDinoRequest(Pipelined):
    image: RoboflowImage
    text: list[str] = Field(..., min_length=1, max_length=MAX_PHRASES, description="class names")
    box_threshold: float = Field(0.5, ge=0.0, le=1.0)
    text_threshold: float = Field(0.5, ge=0.0, le=1.0)
    class_agnostic_nms: bool = False
    iou_threshold: float = Field(0.5, ge=0.0, le=1.0, description="NMS IoU")
    max_detections: int = Field(300, ge=1, le=900)

    @field_validator("image", mode="before")
    @classmethod
    def _one_image(cls, value: Any) -> Any:
        if isinstance(value, list):
            raise ValueError("one image per request here")
        return value

    @field_validator("text")
    @classmethod
    def _class_names(cls, names: list[str]) -> list[str]:
        if any(not name.strip() or len(name) > MAX_TEXT or "." in name for name in names):
            raise ValueError(f"class names must be non-empty, without '.', at most {MAX_TEXT} characters")
        return names

    def detect_fields(self, model: str) -> dict[str, Any]:
        return {
            "model": model,
            "prompt": self.text,
            "box_threshold": self.box_threshold,
            "text_threshold": self.text_threshold,
            "nms_iou": self.iou_threshold,
            "max_detections": self.max_detections,
        }


class ObjectPrediction(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    x: float = Field(..., description="box centre")
    y: float = Field(..., description="box centre")
    width: float
    height: float
    confidence: float
    class_name: str = Field(..., alias="class")
    class_id: int = Field(..., description="index of the class in the request's `text`")
    detection_id: str


class ImageSize(BaseModel):
    width: int
    height: int


class ObjectDetectionResponse(BaseModel):
    image: ImageSize
    predictions: list[ObjectPrediction]
    time: float = Field(..., description="seconds")


def object_predictions(
    detections: Sequence[Detection], names: list[str], class_agnostic_iou: float | None
) -> list[ObjectPrediction]:
    """Our detections as Roboflow's (centre boxes), each with the index of its class name."""
    ids = {" ".join(name.lower().split()): i for i, name in enumerate(names)}
    found = [d for d in detections if d.label in ids]
    if class_agnostic_iou is not None and found:
        xywh = [[x1, y1, x2 - x1, y2 - y1] for x1, y1, x2, y2 in (d.box for d in found)]
        ious = coco_mask.iou(xywh, xywh, [0] * len(xywh))
        found = [
            found[i]
            for i in greedy_nms(np.asarray(ious), [d.score or 0.0 for d in found], class_agnostic_iou)
        ]
    return [_object(d, names[ids[str(d.label)]], ids[str(d.label)]) for d in found]


def _object(detection: Detection, name: str, class_id: int) -> ObjectPrediction:
    x1, y1, x2, y2 = detection.box
    return ObjectPrediction(
        x=round((x1 + x2) / 2, 2),
        y=round((y1 + y2) / 2, 2),
        width=round(x2 - x1, 2),
        height=round(y2 - y1, 2),
        confidence=detection.score or 0.0,
        class_name=name,
        class_id=class_id,
        detection_id=str(uuid.uuid4()),
    )


# -- answers ---------------------------------------------------------------------------------


def predictions(found: Sequence[Segmentation], fmt: str) -> list[Sam2Prediction]:
    """Our segmentations (RLE masks) in Roboflow's format: polygons of [x, y] points, or RLE."""
    return [prediction(s, fmt) for s in found]


def prediction(found: Segmentation, fmt: str) -> Sam2Prediction:
    rle = found.mask
    assert isinstance(rle, RLE)
    confidence = found.score if found.score is not None else min(1.0, max(0.0, found.mask_score))
    if fmt == "rle":
        return Sam2Prediction(masks=rle, confidence=confidence, format="rle")
    polygons = encode_polygons(decode_rle(rle))
    points = [[[int(p[i]), int(p[i + 1])] for i in range(0, len(p), 2)] for p in polygons]
    return Sam2Prediction(masks=points, confidence=confidence, format="polygon")


def cross_prompt_nms(per_prompt: list[list[Segmentation]], iou: float) -> list[list[Segmentation]]:
    """Roboflow's cross-prompt NMS: greedy over every prompt's masks (mask IoU), best first."""
    flat = [(i, s) for i, found in enumerate(per_prompt) for s in found]
    if not flat:
        return per_prompt
    rles = [_coco(s.mask) for _, s in flat]
    ious = np.asarray(coco_mask.iou(rles, rles, [0] * len(rles)))
    kept = set(greedy_nms(ious, [s.score or 0.0 for _, s in flat], iou))
    return [
        [s for j, (i, s) in enumerate(flat) if i == prompt and j in kept] for prompt in range(len(per_prompt))
    ]


def _coco(rle: Any) -> dict[str, Any]:
    assert isinstance(rle, RLE)
    return {"size": rle.size, "counts": rle.counts.encode("ascii")}


def greedy_nms(ious: np.ndarray, scores: Sequence[float], threshold: float) -> list[int]:
    """Indexes kept (in their original order): each drops the later ones it overlaps by more."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    kept: list[int] = []
    for i in order:
        if all(ious[i, j] <= threshold for j in kept):
            kept.append(i)
    return sorted(kept)


# -- which pipeline answers ------------------------------------------------------------------


def choose_pipeline(
    pipelines: Sequence[PipelineSummary], named: list[str], needs: set[Ability], family: str
) -> str:
    """The pipeline a request named (if it is one of ours), else the first that can answer,
    preferring one with a model of `family` (sam2, sam3, grounding-dino)."""
    by_name = {p.name: p for p in pipelines}
    for name in named:
        if name in by_name:
            return name
    able = [p for p in pipelines if needs <= p.abilities]
    if not able:
        words = ", ".join(sorted(needs))
        raise UnsupportedPrompt(f"this server serves no model that takes {words} (GET /v1/models lists them)")
    for pipeline in able:
        if any(m.family == family for m in pipeline.models):
            return pipeline.name
    return able[0].name
