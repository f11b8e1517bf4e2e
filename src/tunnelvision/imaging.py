"""Untrusted bytes -> RGB uint8 array, with limits checked before pixels are decoded."""

from __future__ import annotations

import base64
import binascii
import io
import warnings

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from tunnelvision.errors import ImageTooLarge, InvalidImage, PayloadTooLarge

RGBImage = NDArray[np.uint8]  # (height, width, 3)

# We enforce our own pixel limit before decoding; PIL's global one would raise a different error.
Image.MAX_IMAGE_PIXELS = None


def decode_base64(text: str, max_bytes: int) -> bytes:
    """Strict base64 (a `data:image/...;base64,` prefix is allowed)."""
    if text.startswith("data:"):
        _, _, text = text.partition(",")
    if len(text) * 3 // 4 > max_bytes:
        raise PayloadTooLarge(f"image is over the {max_bytes} byte limit")
    try:
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidImage("image is not valid base64") from exc


def decode_image(data: bytes, max_pixels: int) -> RGBImage:
    """Decode any PIL format; EXIF orientation applied; first frame of animations."""
    if not data:
        raise InvalidImage("image is empty")
    image = _open(data)
    width, height = image.size
    if width * height > max_pixels:
        raise ImageTooLarge(f"image is {width}x{height}, over the {max_pixels} pixel limit")
    try:
        image.seek(0)
        image.load()
        return _to_rgb(ImageOps.exif_transpose(image))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise InvalidImage("image data is corrupt or truncated") from exc


def _open(data: bytes) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise InvalidImage("not an image, or a format this server cannot read") from exc


def _to_rgb(image: Image.Image) -> RGBImage:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _high_bit_depth_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _high_bit_depth_to_rgb(image: Image.Image) -> RGBImage:
    """16/32-bit grayscale: scale the used range to 8 bits (PIL's convert would clip)."""
    values = np.asarray(image, dtype=np.float64)
    peak = values.max() if values.size else 0.0
    scale = 255.0 / (65535.0 if peak > 255 else 255.0)
    gray = np.clip(values * scale, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
