"""Arrays -> wire objects, in one place for every pipeline: labels from phrase ids, rounded
numbers, encoded masks, and boxes drawn around masks where no box was given (point prompts)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from tunnelvision.engine.backend import Check, no_deadline
from tunnelvision.masks import encode_mask, mask_to_box
from tunnelvision.schemas import Detection, MaskFormat, Segmentation

if TYPE_CHECKING:
    from tunnelvision.models.roles import Instances

# One low-res mask (by its index) as a full-size bool mask of the original image.
Upscale = Callable[[int], Any]


def detections(found: Instances, phrases: Sequence[str]) -> list[Detection]:
    labels = _labels(found, phrases, len(found.boxes))
    return [
        Detection(label=labels[i], score=_score(found.scores, i), box=_box(box))
        for i, box in enumerate(found.boxes)
    ]


def segmentations(
    found: Instances,
    phrases: Sequence[str],
    mask_format: MaskFormat,
    upscale: Upscale,
    boxes_from_masks: bool = False,
    check: Check = no_deadline,
) -> list[Segmentation]:
    """`boxes_from_masks`: each box is the mask's extent (the prompt gave no box)."""
    if found.masks is None:
        return []
    count = len(found.masks.scores)
    labels = _labels(found, phrases, count)
    results: list[Segmentation] = []
    full = found.masks.full
    for i in range(count):
        check()  # each mask is encoded (and upscaled, unless the device did it): the costly part
        mask = full[i].numpy() if full is not None else upscale(i)
        results.append(
            Segmentation(
                label=labels[i],
                score=_score(found.scores, i),
                box=mask_to_box(mask) if boxes_from_masks else _box(found.boxes[i]),
                mask=encode_mask(mask, mask_format),
                mask_score=round(float(found.masks.scores[i]), 4),
            )
        )
    return results


def _labels(found: Instances, phrases: Sequence[str], count: int) -> list[str | None]:
    if found.phrase_ids is None:
        return [None] * count
    # A negative id (EXEMPLAR_PHRASE): found by exemplar boxes alone, so it has no label.
    return [phrases[int(i)] if i >= 0 else None for i in found.phrase_ids]


def _box(box: Any) -> list[float]:
    return [round(float(v), 2) for v in box]


def _score(scores: Any, i: int) -> float | None:
    return None if scores is None else round(float(scores[i]), 4)
