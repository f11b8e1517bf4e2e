"""Overlays: translucent masks, boxes and "label score" tags drawn with Pillow.

Pillow, not supervision: it is already a dependency, draws all we need, and keeps the install
small (supervision brings matplotlib and more for the same few primitives).
"""

from __future__ import annotations

import colorsys
import io
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tunnelvision.imaging import RGBImage
from tunnelvision.masks import decode_rle
from tunnelvision.schemas import RLE, Detection, Segmentation

ImageFormat = Literal["png", "jpeg"]
MASK_ALPHA = 0.45


def color_for(label: str | None) -> tuple[int, int, int]:
    """A stable, distinct colour per label (golden-ratio hues)."""
    index = sum(ord(c) for c in label or "") % 97
    r, g, b = colorsys.hsv_to_rgb((index * 0.618034) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def annotate(image: RGBImage, detections: list[Detection], fmt: ImageFormat = "png") -> bytes:
    canvas = image.astype(np.float32)
    for detection in detections:
        if isinstance(detection, Segmentation) and isinstance(detection.mask, RLE):
            mask = decode_rle(detection.mask)
            color = np.array(color_for(detection.label), dtype=np.float32)
            canvas[mask] = canvas[mask] * (1 - MASK_ALPHA) + color * MASK_ALPHA
    picture = Image.fromarray(canvas.clip(0, 255).astype(np.uint8))
    draw_boxes(picture, detections)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG" if fmt == "png" else "JPEG", quality=90)
    return buffer.getvalue()


def draw_boxes(picture: Image.Image, detections: list[Detection]) -> None:
    draw = ImageDraw.Draw(picture)
    width = max(2, round(max(picture.size) / 400))
    font = ImageFont.load_default(size=max(12, round(max(picture.size) / 60)))
    for detection in detections:
        color = color_for(detection.label)
        x1, y1, x2, y2 = detection.box
        draw.rectangle([x1, y1, x2, y2], outline=color, width=width)
        tag = " ".join(p for p in (detection.label, _score(detection.score)) if p)
        if tag:
            left, top, right, bottom = draw.textbbox((x1, y1), tag, font=font)
            lift = bottom - top + 4
            draw.rectangle([left - 2, top - lift, right + 2, bottom - lift + 2], fill=color)
            draw.text((x1, y1 - lift), tag, fill=(0, 0, 0), font=font)


def _score(score: float | None) -> str:
    return "" if score is None else f"{score:.2f}"
