"""Answers as supervision's `sv.Detections`: `result.to_supervision()` on a detect or segment answer.

Needs the optional extra: `pip install 'tunnelvision[supervision]'`. supervision is imported here
only, when a conversion is asked for, so the client stays light without it.

class_id is the index of a detection's label in the request's phrases (the prompt's order, after
the server's normalising: lowercase, duplicates dropped), as supervision's own converters number
prompts. What has no label (box or point prompts, or what exemplars alone found) gets class_id -1,
the server's own id for "no phrase": every detection keeps an integer id, so supervision's
annotators, which colour by class by default, accept every answer.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import supervision as sv

from tunnelvision.client import decode_masks
from tunnelvision.schemas import DetectResponse, SegmentResponse, normalize_prompt

NO_CLASS = -1  # the class_id of a detection without a label


def to_detections(
    result: DetectResponse | SegmentResponse, classes: str | Sequence[str] | None = None
) -> sv.Detections:
    """`classes`: the prompt the ids count in (a '.'-separated string or labels); default: the
    request's phrases where the client sent it, else the labels in the order they first appear."""
    names = _class_names(result, classes)
    labels = [detection.label for detection in result.detections]
    scores = [detection.score for detection in result.detections]
    data: dict[str, npt.NDArray[Any] | list[Any]] = {
        "class_name": np.array([label or "" for label in labels], dtype=str)
    }
    if isinstance(result, SegmentResponse):
        data["mask_score"] = np.array([d.mask_score for d in result.detections], dtype=np.float32)
    return sv.Detections(
        xyxy=np.array([d.box for d in result.detections], dtype=np.float32).reshape(-1, 4),
        mask=_masks(result),
        # Box and point prompts have no detector score: no confidence then (mask_score is in data).
        confidence=None if None in scores else np.array(scores, dtype=np.float32),
        class_id=np.array([_class_id(label, names) for label in labels], dtype=int),
        data=data,
    )


def _class_names(result: DetectResponse | SegmentResponse, classes: str | Sequence[str] | None) -> list[str]:
    if classes is not None:
        return normalize_prompt(classes if isinstance(classes, str) else list(classes))
    if result._phrases is not None:
        return result._phrases
    return list(dict.fromkeys(d.label for d in result.detections if d.label is not None))


def _class_id(label: str | None, names: list[str]) -> int:
    """Labels match class names regardless of case, as the server tells phrases apart."""
    folded = [name.casefold() for name in names]
    return folded.index(label.casefold()) if label is not None and label.casefold() in folded else NO_CLASS


def _masks(result: DetectResponse | SegmentResponse) -> npt.NDArray[np.bool_] | None:
    """(n, height, width) bool, or None where the answer has no masks (detect, mask_format none)."""
    if not isinstance(result, SegmentResponse) or result.mask_format == "none":
        return None
    if not result.detections:
        return np.zeros((0, result.image.height, result.image.width), dtype=bool)
    return np.stack(decode_masks(result))
