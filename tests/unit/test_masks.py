from __future__ import annotations

import base64
import io

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as coco_mask

from tunnelvision.boxes import _batched_nms_torch, batched_nms
from tunnelvision.masks import (
    encode_mask,
    encode_png,
    encode_polygons,
    encode_rle,
    mask_to_box,
)


def square_mask() -> np.ndarray:
    mask = np.zeros((30, 40), dtype=bool)
    mask[5:15, 10:30] = True
    return mask


def test_rle_round_trips_through_pycocotools() -> None:
    mask = square_mask()
    rle = encode_rle(mask)
    assert rle.size == [30, 40]
    decoded = coco_mask.decode({"size": rle.size, "counts": rle.counts.encode()})
    assert np.array_equal(decoded.astype(bool), mask)


def test_polygon_traces_the_outline() -> None:
    polygons = encode_polygons(square_mask())
    assert len(polygons) == 1
    xs, ys = polygons[0][0::2], polygons[0][1::2]
    assert (min(xs), max(xs), min(ys), max(ys)) == (10, 29, 5, 14)


def test_png_decodes_to_the_same_mask() -> None:
    png = Image.open(io.BytesIO(base64.b64decode(encode_png(square_mask()))))
    assert np.array_equal(np.asarray(png) > 0, square_mask())


def test_none_format_and_box_of_mask() -> None:
    assert encode_mask(square_mask(), "none") is None
    assert mask_to_box(square_mask()) == [10.0, 5.0, 30.0, 15.0]
    assert mask_to_box(np.zeros((3, 3), dtype=bool)) == [0.0, 0.0, 0.0, 0.0]


def test_nms_is_class_aware() -> None:
    boxes = torch.tensor(
        [[0, 0, 10, 10], [1, 1, 10, 10], [0, 0, 10, 10], [50, 50, 60, 60]], dtype=torch.float
    )
    scores = torch.tensor([0.9, 0.8, 0.7, 0.6])
    classes = torch.tensor([0, 0, 1, 0])
    kept = batched_nms(boxes, scores, classes, 0.5).tolist()
    assert kept == [0, 2, 3]  # box 1 overlaps box 0 of its class; box 2 is another class
    assert _batched_nms_torch(boxes, scores, classes, 0.5).tolist() == kept
    assert _batched_nms_torch(boxes[:0], scores[:0], classes[:0], 0.5).numel() == 0
