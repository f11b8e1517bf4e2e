"""Our detections -> Label Studio result items (coordinates in percent of the image)."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import Any

from tunnelvision.integrations.label_studio.brush import encode_brush
from tunnelvision.integrations.label_studio.config import Control, label_of
from tunnelvision.masks import BoolMask, decode_rle, encode_polygons
from tunnelvision.schemas import RLE, Detection, Segmentation

Item = dict[str, Any]
DIGITS = 4  # a hundredth of a percent of a 10,000-pixel side is a pixel: more says nothing


def percent(value: float, total: int) -> float:
    return round(min(max(100.0 * value / total, 0.0), 100.0), DIGITS)


def region(control: Control, width: int, height: int, value: dict[str, Any], score: float | None) -> Item:
    label = value.pop("label")
    item: Item = {
        "id": secrets.token_hex(5),  # Label Studio's region id; any unique string
        "from_name": control.from_name,
        "to_name": control.to_name,
        "type": control.result_type,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {**value, control.result_type: [label]},
    }
    if score is not None:
        item["score"] = round(score, DIGITS)
    return item


def rectangle(
    control: Control, label: str, box: Sequence[float], score: float | None, width: int, height: int
) -> Item:
    x1, y1, x2, y2 = box
    x, y = percent(x1, width), percent(y1, height)
    value = {
        "x": x,
        "y": y,
        "width": round(min(percent(x2, width) - x, 100.0 - x), DIGITS),
        "height": round(min(percent(y2, height) - y, 100.0 - y), DIGITS),
        "rotation": 0,
        "label": label,
    }
    return region(control, width, height, value, score)


def brush(control: Control, label: str, mask: BoolMask, score: float | None) -> Item:
    height, width = mask.shape
    value = {"format": "rle", "rle": encode_brush(mask), "label": label}
    return region(control, width, height, value, score)


def polygons(control: Control, label: str, mask: BoolMask, score: float | None) -> list[Item]:
    """One polygon region per outer contour of the mask (holes are not kept)."""
    height, width = mask.shape
    items = []
    for flat in encode_polygons(mask):
        points = [[percent(x, width), percent(y, height)] for x, y in zip(flat[::2], flat[1::2], strict=True)]
        items.append(
            region(control, width, height, {"points": points, "closed": True, "label": label}, score)
        )
    return items


def mask_of(detection: Detection) -> BoolMask | None:
    if isinstance(detection, Segmentation) and isinstance(detection.mask, RLE):
        return decode_rle(detection.mask)
    return None


def items_for(
    control: Control, label: str, detection: Detection, mask: BoolMask | None, width: int, height: int
) -> list[Item]:
    """What `control` shows of one detection: its box, or its mask as a brush stroke or polygons."""
    score = detection.score if detection.score is not None else getattr(detection, "mask_score", None)
    if control.tool == "rectangle":
        return [rectangle(control, label, detection.box, score, width, height)]
    if mask is None or not mask.any():
        return []
    if control.tool == "brush":
        return [brush(control, label, mask, score)]
    if control.tool == "polygon":
        return polygons(control, label, mask, score)
    return []


def pre_annotations(
    controls: Sequence[Control],
    detections: Sequence[Detection],
    phrases: dict[str, str],
    width: int,
    height: int,
) -> list[Item]:
    """Each detection on each tool whose labels hold its label (`phrases`: engine phrase -> label)."""
    items: list[Item] = []
    for detection in detections:
        label = label_of(detection.label, phrases)
        if label is None:
            continue
        mask = mask_of(detection)
        for control in controls:
            if label in control.labels:
                items += items_for(control, label, detection, mask, width, height)
    return items


def prediction(items: list[Item], model_version: str) -> dict[str, Any]:
    """One task's answer: its regions, their mean score, the model version."""
    scores = [item["score"] for item in items if "score" in item]
    score = round(sum(scores) / len(scores), DIGITS) if scores else 0.0
    return {"result": items, "score": score, "model_version": model_version}
