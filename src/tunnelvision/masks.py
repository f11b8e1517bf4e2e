"""Mask encodings (COCO RLE, polygons, PNG) and box helpers (NMS). CPU only."""

from __future__ import annotations

import base64
import io
from typing import Any

import cv2
import numpy as np
import torch
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


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float) -> torch.Tensor:
    """Class-aware NMS; indices kept, best score first. torchvision's kernel when installed."""
    try:
        from torchvision.ops import batched_nms as tv_batched_nms

        return tv_batched_nms(boxes.float(), scores.float(), classes, iou)  # type: ignore[no-any-return]
    except (ImportError, RuntimeError):
        return _batched_nms_torch(boxes.float(), scores.float(), classes, iou)


def _batched_nms_torch(
    boxes: torch.Tensor, scores: torch.Tensor, classes: torch.Tensor, iou: float
) -> torch.Tensor:
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    # Offsetting boxes per class keeps classes apart: the trick torchvision uses too.
    offsets = classes.to(boxes) * (boxes.max() + 1)
    shifted = boxes + offsets[:, None]
    order = scores.argsort(descending=True)
    ious = box_iou(shifted[order], shifted[order])
    keep: list[int] = []
    suppressed = torch.zeros(order.numel(), dtype=torch.bool, device=boxes.device)
    for i in range(order.numel()):
        if suppressed[i]:
            continue
        keep.append(i)
        suppressed |= ious[i] > iou
    return order[torch.tensor(keep, dtype=torch.long, device=boxes.device)]


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    area_a = (a[:, 2] - a[:, 0]).clamp(min=0) * (a[:, 3] - a[:, 1]).clamp(min=0)
    area_b = (b[:, 2] - b[:, 0]).clamp(min=0) * (b[:, 3] - b[:, 1]).clamp(min=0)
    top_left = torch.max(a[:, None, :2], b[None, :, :2])
    bottom_right = torch.min(a[:, None, 2:], b[None, :, 2:])
    inter = (bottom_right - top_left).clamp(min=0).prod(dim=2)
    return inter / (area_a[:, None] + area_b[None, :] - inter).clamp(min=1e-9)
