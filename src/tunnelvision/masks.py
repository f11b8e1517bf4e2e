"""Mask encodings (COCO RLE, polygons, PNG) and box helpers (NMS). CPU only."""

from __future__ import annotations

import base64
import io
from typing import Any

import cv2
import numpy as np
from numpy.typing import NDArray
from PIL import Image
from pycocotools import mask as coco_mask

from tunnelvision.schemas import RLE, MaskFormat

BoolMask = NDArray[np.bool_]  # (height, width)


def encode_rle(mask: BoolMask) -> RLE:
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return RLE(size=[int(v) for v in rle["size"]], counts=rle["counts"].decode("ascii"))


def decode_rle(rle: RLE) -> BoolMask:
    return np.asarray(coco_mask.decode({"size": rle.size, "counts": rle.counts.encode()}), dtype=bool)


def decode_png(data: str) -> BoolMask:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(data))).convert("L")) > 0


def decode_polygons(polygons: list[list[float]], height: int, width: int) -> BoolMask:
    """Filled outer contours (holes are not represented in polygon output)."""
    canvas = np.zeros((height, width), dtype=np.uint8)
    shapes = [np.asarray(p, dtype=np.int32).reshape(-1, 2) for p in polygons if len(p) >= 6]
    cv2.fillPoly(canvas, shapes, 1)
    return canvas.astype(bool)


def encode_polygons(mask: BoolMask) -> list[list[float]]:
    """Outer contours as flat [x1, y1, x2, y2, ...] lists (COCO polygon style), >= 3 points."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return [c.reshape(-1).astype(float).tolist() for c in contours if len(c) >= 3]


def largest_outline(mask: BoolMask, epsilon_factor: float = 0.0) -> list[list[float]]:
    """The largest outer contour as [[x, y], ...], simplified to within `epsilon_factor` of its
    length (Douglas-Peucker); [] for an empty mask."""
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    if not contours:
        return []
    largest = max(contours, key=cv2.contourArea)
    if epsilon_factor > 0:
        largest = cv2.approxPolyDP(largest, epsilon_factor * cv2.arcLength(largest, True), True)
    return [[float(x), float(y)] for x, y in largest.reshape(-1, 2)]


def encode_png(mask: BoolMask) -> str:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG", optimize=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def encode_mask(mask: BoolMask, fmt: MaskFormat) -> Any:
    if fmt == "rle":
        return encode_rle(mask)
    if fmt == "polygon":
        return encode_polygons(mask)
    if fmt == "png":
        return encode_png(mask)
    return None


def mask_to_box(mask: BoolMask) -> list[float]:
    """Tight [x1, y1, x2, y2] around the mask (x2/y2 exclusive); zeros for an empty mask."""
    ys, xs = np.nonzero(mask)
    if xs.size == 0:
        return [0.0, 0.0, 0.0, 0.0]
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
