from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from PIL import Image

from support import image_bytes
from tunnelvision.errors import ImageTooLarge, InvalidImage, PayloadTooLarge, UnsupportedImageFormat
from tunnelvision.imaging import MAX_ASPECT_RATIO, MAX_FRAMES, decode_base64, decode_image, probe_image

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


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"])
def test_every_accepted_format_decodes(fmt: str) -> None:
    assert decode_image(image_bytes(40, 30, fmt=fmt), LIMIT).shape == (30, 40, 3)


@pytest.mark.parametrize(("fmt", "mode"), [("ICO", "RGB"), ("ICNS", "RGB"), ("PPM", "RGB"), ("PCX", "RGB")])
def test_other_formats_are_refused_before_their_plugin_runs(fmt: str, mode: str) -> None:
    data = encoded(Image.new(mode, (32, 32)), fmt)
    with pytest.raises(UnsupportedImageFormat, match=f"looks like {fmt}.*JPEG, PNG, WebP, GIF, BMP or TIFF"):
        decode_image(data, LIMIT)


def test_tiff_pages_are_all_checked_against_the_pixel_limit() -> None:
    pages = [Image.new("L", (10, 10)), Image.new("L", (2000, 1000))]
    data = encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:])
    with pytest.raises(ImageTooLarge, match="frame 1 of the image is 2000x1000"):
        decode_image(data, 1_000_000)  # page 0 alone is tiny: the old decoder answered with it


def test_files_with_more_frames_than_are_looked_at_are_refused() -> None:
    pages = [Image.new("L", (2, 2), i % 256) for i in range(MAX_FRAMES + 1)]
    for fmt in ("TIFF", "GIF"):
        data = encoded(pages[0], fmt, save_all=True, append_images=pages[1:])
        with pytest.raises(ImageTooLarge, match=f"more than {MAX_FRAMES} frames"):
            decode_image(data, LIMIT)


def test_probe_reads_headers_only() -> None:
    truncated = image_bytes(64, 48)[:200]  # header intact, pixel data cut short
    assert probe_image(truncated, LIMIT) == (64, 48)
    with pytest.raises(InvalidImage, match="corrupt or truncated"):
        decode_image(truncated, LIMIT)


@pytest.mark.parametrize(
    ("width", "height"), [(1, 1), (2, 1), (1, 2), (1, MAX_ASPECT_RATIO), (MAX_ASPECT_RATIO, 1)]
)
def test_tiny_and_thin_images_decode(width: int, height: int) -> None:
    assert decode_image(image_bytes(width, height), LIMIT).shape == (height, width, 3)


@pytest.mark.parametrize(("width", "height"), [(1, 20000), (20000, 1), (3, 3 * MAX_ASPECT_RATIO + 1)])
def test_sides_too_unequal_for_the_models_are_refused_with_the_size(width: int, height: int) -> None:
    with pytest.raises(InvalidImage, match=f"{width}x{height}.*{MAX_ASPECT_RATIO} to 1"):
        probe_image(image_bytes(width, height, mode="L"), LIMIT)
