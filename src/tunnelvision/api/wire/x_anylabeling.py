"""X-AnyLabeling's remote-server shapes (as its desktop client sends and reads them) <-> our
engine's parameters and answers. Pure translation: no HTTP, no engine calls.

The client lists models from `GET /v1/models` (a dict keyed by model id, each naming the
widgets its panel shows) and sends `POST /v1/predict` with `{"model", "image" (a data: URL),
"params": {"conf_threshold", "iou_threshold", "epsilon_factor", "text_prompt", "marks"}}`;
it reads back LabelMe shapes: rectangles as 4 corners, polygons closed by repeating the first point.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tunnelvision.engine.backend import PipelineSummary
from tunnelvision.errors import UnsupportedPrompt
from tunnelvision.masks import decode_rle, largest_outline
from tunnelvision.schemas import MAX_PROMPTS, RLE, Detection, Segmentation

MARK_LABEL = "AUTOLABEL_OBJECT"  # the label X-AnyLabeling gives objects cut from marks
DEFAULT_CONF = 0.35  # our box_threshold default, shown in the client's confidence box
DEFAULT_IOU = 0.5  # our nms_iou default
MAX_TEXT = 1000
PHRASE_SEPARATORS = re.compile(r"[,.]")  # X-AnyLabeling-Server splits prompts on ',' or '.'


# -- GET /v1/models ------------------------------------------------------------------------------


def widget(name: str, value: Any = None) -> dict[str, Any]:
    return {"name": name, "value": value}


def widgets(abilities: frozenset[str]) -> list[dict[str, Any]]:
    """The client's panel widgets (its `supported_remote_widgets` names) for what a pipeline takes."""
    shown: list[dict[str, Any]] = []
    if "text" in abilities:
        shown += [widget("edit_text"), widget("button_send")]
        shown += [widget("input_conf"), widget("edit_conf", DEFAULT_CONF)]
        shown += [widget("input_iou"), widget("edit_iou", DEFAULT_IOU)]
    if "points" in abilities:
        shown += [widget("button_add_point"), widget("button_remove_point")]
    if "boxes" in abilities:
        shown.append(widget("button_add_rect"))
    elif "exemplars" in abilities:  # rectangles as examples: more like this (+), not like this (-)
        shown += [widget("add_pos_rect"), widget("add_neg_rect"), widget("button_run_rect")]
    if abilities & {"points", "boxes", "exemplars"}:
        shown += [widget("button_clear"), widget("button_finish_object")]
    if "masks" in abilities:
        shown += [widget("mask_fineness_slider", 10), widget("mask_fineness_value_label")]
    shown.append(widget("toggle_preserve_existing_annotations", False))
    return shown


def model_entry(pipeline: PipelineSummary) -> dict[str, Any]:
    """One pipeline as the client's model list wants it."""
    families = "+".join(m.family for m in pipeline.models)
    abilities = sorted(pipeline.abilities)
    return {
        "display_name": f"{pipeline.name} ({families})",
        "widgets": widgets(pipeline.abilities),
        "params": {},
        "capabilities": {"abilities": abilities},
        # Batch runs over a folder need a prompt that holds for every image: text only.
        "batch_processing_mode": "text_prompt" if "text" in pipeline.abilities else None,
    }


def model_list(pipelines: Sequence[PipelineSummary]) -> dict[str, dict[str, Any]]:
    return {p.name: model_entry(p) for p in pipelines}


# -- POST /v1/predict ------------------------------------------------------------------------------


class Mark(BaseModel):
    """A click (`point`: [x, y]) or a dragged box (`rectangle`: [x1, y1, x2, y2]), in pixels;
    label 1 marks the object (or an example of it), 0 the background (or a counter-example)."""

    type: Literal["point", "rectangle"]
    data: list[float] = Field(..., min_length=2, max_length=4)
    label: Literal[0, 1] = 1

    @field_validator("data")
    @classmethod
    def _finite(cls, data: list[float]) -> list[float]:
        if not all(np.isfinite(data)):
            raise ValueError("coordinates must be finite numbers")
        return data

    def corners(self) -> list[float]:
        """A rectangle's [x1, y1, x2, y2] whichever corner the drag started from."""
        x1, y1, x2, y2 = self.data
        return [min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)]


class PredictParams(BaseModel):
    """What the client sends beside the image; the rest (current_task, filter_classes,
    reset_tracker) is for other servers' models and ignored."""

    model_config = ConfigDict(extra="ignore")

    conf_threshold: float = Field(0.0, ge=0.0, le=1.0, description="0: not set (ours default)")
    iou_threshold: float = Field(0.0, ge=0.0, le=1.0, description="0: not set (ours default)")
    epsilon_factor: float = Field(0.001, ge=0.0, le=0.1, description="polygon simplification")
    text_prompt: str | None = Field(None, max_length=MAX_TEXT, description="'cat, dog' or 'cat.dog'")
    marks: list[Mark] = Field(default_factory=list, max_length=MAX_PROMPTS)

    @field_validator("marks")
    @classmethod
    def _mark_sizes(cls, marks: list[Mark]) -> list[Mark]:
        for i, mark in enumerate(marks):
            wanted = 2 if mark.type == "point" else 4
            if len(mark.data) != wanted:
                raise ValueError(f"mark {i}: a {mark.type} has {wanted} numbers in data")
        return marks

    def phrases(self) -> list[str]:
        text = self.text_prompt or ""
        return [p.strip() for p in PHRASE_SEPARATORS.split(text) if p.strip()]


class PredictRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = Field(..., min_length=1, max_length=64, description="a model id from GET /v1/models")
    image: str = Field(..., min_length=1, description="the image file as base64, or a data: URL")
    params: PredictParams = Field(default_factory=PredictParams)


def engine_fields(request: PredictRequest, pipeline: PipelineSummary) -> dict[str, Any]:
    """Our request fields (DetectParams or SegmentParams) for the client's request. Marks, when
    sent, decide (as on X-AnyLabeling's own server); a text prompt goes with example boxes."""
    params = request.params
    fields: dict[str, Any] = {"model": pipeline.name, **_thresholds(params)}
    if params.marks:
        fields |= _marks(params, pipeline)
    elif params.phrases():
        fields["prompt"] = params.phrases()
    else:
        raise UnsupportedPrompt("nothing to do: type a text prompt, or place points or rectangles")
    if "masks" in pipeline.abilities:
        fields["mask_format"] = "rle"
    return fields


def _thresholds(params: PredictParams) -> dict[str, float]:
    """The client sends 0 for a box its panel does not show: then ours apply."""
    fields = {}
    if params.conf_threshold > 0:
        fields["box_threshold"] = fields["text_threshold"] = params.conf_threshold
    if params.iou_threshold > 0:
        fields["nms_iou"] = params.iou_threshold
    return fields


def _marks(params: PredictParams, pipeline: PipelineSummary) -> dict[str, Any]:
    points = [[*m.data, float(m.label)] for m in params.marks if m.type == "point"]
    rectangles = [m for m in params.marks if m.type == "rectangle"]
    if "boxes" in pipeline.abilities:  # a segmenter: cut what each box or the clicks point at
        if points and rectangles:
            raise UnsupportedPrompt("send either rectangles or points, not both at once")
        if any(m.label == 0 for m in rectangles):
            raise UnsupportedPrompt(f"model '{pipeline.name}' takes no negative rectangles")
        return {"boxes": [m.corners() for m in rectangles]} if rectangles else {"points": points}
    if "exemplars" in pipeline.abilities:  # a concept model: find everything like the examples
        if points:
            raise UnsupportedPrompt(f"model '{pipeline.name}' takes rectangles (examples), not points")
        exemplars = [[*m.corners(), float(m.label)] for m in rectangles]
        return {"exemplars": exemplars, "prompt": params.phrases() or None}
    raise UnsupportedPrompt(f"model '{pipeline.name}' takes no points or rectangles: type a text prompt")


# -- answers ---------------------------------------------------------------------------------------


def shape(
    label: str | None, shape_type: str, points: list[list[float]], score: float | None
) -> dict[str, Any]:
    """A LabelMe shape with every field the client reads."""
    return {
        "label": label or MARK_LABEL,
        "shape_type": shape_type,
        "points": points,
        "score": score,
        "attributes": {},
        "description": None,
        "difficult": False,
        "direction": 0,
        "flags": None,
        "group_id": None,
        "kie_linking": [],
    }


def rectangle(detection: Detection) -> dict[str, Any]:
    x1, y1, x2, y2 = detection.box
    corners = [[x1, y1], [x2, y1], [x2, y2], [x1, y2]]
    return shape(detection.label, "rectangle", corners, detection.score)


def polygon(found: Segmentation, epsilon_factor: float) -> dict[str, Any] | None:
    """The mask's largest outline, simplified by `epsilon_factor` of its length (the client's
    mask fineness), closed by repeating its first point; None for an empty mask."""
    assert isinstance(found.mask, RLE)
    points = largest_outline(decode_rle(found.mask), epsilon_factor)
    if len(points) < 3:
        return None
    score = found.score if found.score is not None else min(1.0, max(0.0, found.mask_score))
    return shape(found.label, "polygon", [*points, points[0]], score)


def shapes(found: Sequence[Detection], epsilon_factor: float) -> list[dict[str, Any]]:
    """Polygons for segmentations, rectangles for detections (a pipeline without masks)."""
    answer = []
    for item in found:
        made = polygon(item, epsilon_factor) if isinstance(item, Segmentation) else rectangle(item)
        if made is not None:
            answer.append(made)
    return answer


def predict_data(found: Sequence[Detection], epsilon_factor: float) -> dict[str, Any]:
    # replace: null lets the client's own "preserve existing annotations" toggle decide.
    return {"shapes": shapes(found, epsilon_factor), "description": "", "replace": None}
