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
TAG_PAD = 2  # pixels of colour around a tag's text


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
            origin = tag_origin(draw, tag, font, (x1, y1), picture.width, width)
            left, top, right, bottom = draw.textbbox(origin, tag, font=font)
            draw.rectangle([left - TAG_PAD, top - TAG_PAD, right + TAG_PAD, bottom + TAG_PAD], fill=color)
            draw.text(origin, tag, fill=(0, 0, 0), font=font)


def tag_origin(
    draw: ImageDraw.ImageDraw,
    tag: str,
    font: ImageFont.FreeTypeFont | ImageFont.ImageFont,
    corner: tuple[float, float],
    image_width: int,
    line: int,
) -> tuple[float, float]:
    """Where a box's tag is written: just above its top-left corner, or just inside the box when
    there is no room above (a box at the image's top edge); shifted left to stay in the image."""
    x, y = corner
    left, top, right, bottom = draw.textbbox((0, 0), tag, font=font)  # ink offsets from the origin
    above = y - TAG_PAD - bottom
    y = above if above + top - TAG_PAD >= 0 else y + line + TAG_PAD - top
    x = max(TAG_PAD - left, min(x, image_width - 1 - TAG_PAD - right))
    return x, y


def _score(score: float | None) -> str:
    return "" if score is None else f"{score:.2f}"
