from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from support import image_bytes
from tunnelvision.errors import ImageTooLarge, InvalidImage, PayloadTooLarge
from tunnelvision.imaging import decode_base64, decode_image

LIMIT = 10_000_000


def encoded(image: Image.Image, fmt: str = "PNG", **save: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("RGB", "JPEG"),
        ("L", "PNG"),
        ("RGBA", "PNG"),
        ("CMYK", "JPEG"),
        ("P", "PNG"),
        ("LA", "PNG"),
        ("1", "PNG"),
    ],
)
def test_every_common_mode_becomes_rgb_uint8(mode: str, fmt: str) -> None:
    array = decode_image(image_bytes(40, 30, fmt=fmt, mode=mode), LIMIT)
    assert array.shape == (30, 40, 3)
    assert array.dtype == np.uint8


def test_sixteen_bit_grayscale_keeps_its_range() -> None:
    ramp = np.linspace(0, 65535, 64 * 8, dtype=np.uint16).reshape(8, 64)
    array = decode_image(encoded(Image.fromarray(ramp)), LIMIT)
    assert array.shape == (8, 64, 3)
    assert array.min() == 0 and array.max() == 255  # scaled, not clipped to white


def test_transparent_pixels_are_composited_on_white() -> None:
    array = decode_image(encoded(Image.new("RGBA", (4, 4), (0, 0, 0, 0))), LIMIT)
    assert (array == 255).all()


def test_exif_orientation_is_applied() -> None:
    image = Image.new("RGB", (60, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise when displayed
    array = decode_image(encoded(image, "JPEG", exif=exif.tobytes()), LIMIT)
    assert array.shape == (60, 20, 3)


def test_animated_images_give_their_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), color) for color in [(255, 0, 0), (0, 0, 255)]]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:])
    array = decode_image(data, LIMIT)
    assert array[0, 0, 0] > 200 and array[0, 0, 2] < 50


def test_pixel_limit_is_checked_before_decoding() -> None:
    bomb = encoded(Image.new("1", (5000, 5000)))  # a few KB that decode to 25 megapixels
    assert len(bomb) < 100_000
    with pytest.raises(ImageTooLarge, match="5000x5000"):
        decode_image(bomb, 1_000_000)


@pytest.mark.parametrize(
    "data", [b"", b"not an image at all", image_bytes(fmt="PNG")[:200], image_bytes(fmt="JPEG")[:300]]
)
def test_garbage_empty_and_truncated_data_are_invalid_images(data: bytes) -> None:
    with pytest.raises(InvalidImage):
        decode_image(data, LIMIT)


def test_base64_strict_with_data_url_and_size_limit() -> None:
    raw = image_bytes()
    text = base64.b64encode(raw).decode()
    assert decode_base64(text, LIMIT) == raw
    assert decode_base64("data:image/png;base64," + text, LIMIT) == raw
    with pytest.raises(InvalidImage, match="base64"):
        decode_base64("@@not base64@@", LIMIT)
    with pytest.raises(PayloadTooLarge):
        decode_base64(text, 100)
