"""Untrusted bytes -> RGB uint8 array, with limits checked before pixels are decoded.

Every entry point (predict routes, annotate, job uploads, the job runner) goes through
`open_image`: only the formats below are opened, and the size of every frame or page a file
holds is checked against the pixel limit from headers alone, before anything is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import itertools
import struct
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
from numpy.typing import NDArray
from PIL import Image, ImageOps, UnidentifiedImageError

from tunnelvision.errors import ImageTooLarge, InvalidImage, PayloadTooLarge, UnsupportedImageFormat

RGBImage = NDArray[np.uint8]  # (height, width, 3)

# Pillow names; anything else (ICO, ICNS, PSD, EPS, ...) is refused before its plugin runs.
ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
ACCEPTED_NAMES = "JPEG, PNG, WebP, GIF, BMP or TIFF"
MAX_FRAMES = 1000  # frames or pages whose headers are read; a file holding more is refused
# The detector scales the shorter side to about longest_edge / ratio pixels, which rounds to zero
# past 2 x longest_edge (512 for the tiny demo models, 2666 for GroundingDINO): refused with the size.
MAX_ASPECT_RATIO = 500

# What Pillow raises on damaged data (its plugins are not consistent about it).
CORRUPT_DATA_ERRORS = (
    OSError,
    EOFError,
    ValueError,
    SyntaxError,
    IndexError,
    KeyError,  # a TIFF tag naming an unknown compression, for one
    TypeError,
    ArithmeticError,
    struct.error,
)
# Pillow's own bomb check stays on (its default limit) as a second net behind ours.
BOMB_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)


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
    """The first frame as RGB; EXIF orientation applied; transparency composited on white."""
    with open_image(data, max_pixels) as image:
        try:
            image.load()
            return _to_rgb(ImageOps.exif_transpose(image))
        except BOMB_ERRORS:
            raise ImageTooLarge(f"image is over the {max_pixels} pixel limit") from None
        except CORRUPT_DATA_ERRORS as exc:
            raise InvalidImage("image data is corrupt or truncated") from exc


def probe_image(data: bytes, max_pixels: int) -> tuple[int, int]:
    """Width and height, after the checks `decode_image` makes before decoding; decodes nothing."""
    with open_image(data, max_pixels) as image:
        return image.size


@contextmanager
def open_image(data: bytes, max_pixels: int) -> Iterator[Image.Image]:
    """The image opened at its first frame, headers read and nothing decoded: an accepted
    format, and every frame or page within the pixel limit."""
    if not data:
        raise InvalidImage("image is empty")
    with _open_accepted(data, max_pixels) as image:
        try:
            for index, (width, height) in enumerate(_frame_sizes(image, data)):
                _check_pixels(width, height, max_pixels, index)
            image.seek(0)
            _check_shape(*image.size)
        except BOMB_ERRORS:
            raise ImageTooLarge(f"a frame of the image is over the {max_pixels} pixel limit") from None
        except CORRUPT_DATA_ERRORS as exc:
            raise InvalidImage("image data is corrupt or truncated") from exc
        yield image


def _open_accepted(data: bytes, max_pixels: int) -> Image.Image:
    try:
        return Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
    except UnidentifiedImageError:
        raise _unidentified(data) from None
    except BOMB_ERRORS:
        raise ImageTooLarge(f"image is over the {max_pixels} pixel limit") from None
    except CORRUPT_DATA_ERRORS as exc:
        raise InvalidImage("image data is corrupt or truncated") from exc


def _unidentified(data: bytes) -> InvalidImage | UnsupportedImageFormat:
    """Why an image did not open: a format we refuse (415), a damaged file of one we accept, or
    not an image at all. Found from the plugins' signature checks, which decode nothing."""
    found = sniff_format(data[:16])
    if found is None:
        return InvalidImage(f"not an image, or a format this server cannot read (send {ACCEPTED_NAMES})")
    if found in ACCEPTED_FORMATS:
        return InvalidImage("image data is corrupt or truncated")
    return UnsupportedImageFormat(
        f"the image looks like {found}, a format not accepted here: send {ACCEPTED_NAMES}"
    )


def sniff_format(prefix: bytes) -> str | None:
    """The Pillow format whose signature matches the file's first bytes, if any."""
    Image.init()
    for name in Image.ID:
        accept = Image.OPEN[name][1]
        try:
            matched = accept is not None and accept(prefix)
        except CORRUPT_DATA_ERRORS:
            continue
        if matched and not isinstance(matched, str):  # a str is a plugin's 'maybe, but...'
            return name
    return None


def _frame_sizes(image: Image.Image, data: bytes) -> Iterator[tuple[int, int]]:
    """The size of each frame or page, read from headers only."""
    if image.format == "GIF":
        yield from gif_canvas_sizes(data)
    elif image.format in ("TIFF", "MPO"):  # seeking reads the next page's header, no pixels
        yield from _seek_sizes(image)
    else:  # one frame, or frames that must lie inside the canvas (APNG and WebP check it)
        yield image.size


def _seek_sizes(image: Image.Image) -> Iterator[tuple[int, int]]:
    for index in itertools.count():
        try:
            image.seek(index)
        except EOFError:
            return
        _check_frame_count(index)
        yield image.size


def gif_canvas_sizes(data: bytes) -> Iterator[tuple[int, int]]:
    """The canvas each GIF frame needs (a frame may reach past the logical screen, and Pillow
    then grows the canvas). Pillow learns a frame's extent only by decoding the frame before it,
    so the frame descriptors are read here; a truncated tail ends the walk, as it ends Pillow's."""
    try:
        width, height = struct.unpack_from("<HH", data, 6)
        position = 13 + _color_table_bytes(data[10])
        for index in itertools.count():
            position = _next_gif_frame(data, position)
            if position < 0:
                return
            _check_frame_count(index)
            left, top, frame_width, frame_height, flags = struct.unpack_from("<HHHHB", data, position)
            width, height = max(width, left + frame_width), max(height, top + frame_height)
            yield width, height
            position = _skip_sub_blocks(data, position + 9 + _color_table_bytes(flags) + 1)
    except (struct.error, IndexError):
        return


def _next_gif_frame(data: bytes, position: int) -> int:
    """The offset of the next image descriptor (after its ',' byte), or -1 at the end."""
    while position < len(data):
        block = data[position]
        if block == 0x2C:  # ',' image descriptor
            return position + 1
        if block == 0x3B:  # ';' trailer
            return -1
        if block == 0x21:  # '!' extension: a label, then sub-blocks
            position = _skip_sub_blocks(data, position + 2)
        else:  # stray byte: Pillow skips it too
            position += 1
    return -1


def _skip_sub_blocks(data: bytes, position: int) -> int:
    while position < len(data):
        length = data[position]
        position += 1 + length
        if length == 0:
            break
    return position


def _color_table_bytes(flags: int) -> int:
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _check_frame_count(index: int) -> None:
    if index >= MAX_FRAMES:
        raise ImageTooLarge(f"image has more than {MAX_FRAMES} frames or pages")


def _check_pixels(width: int, height: int, max_pixels: int, frame: int) -> None:
    if width * height > max_pixels:
        what = "image" if frame == 0 else f"frame {frame} of the image"
        raise ImageTooLarge(f"{what} is {width}x{height}, over the {max_pixels} pixel limit")


def _check_shape(width: int, height: int) -> None:
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidImage(
            f"image is {width}x{height}: its sides may differ at most {MAX_ASPECT_RATIO} to 1 "
            "(crop or pad it)"
        )


def _to_rgb(image: Image.Image) -> RGBImage:
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        return _high_bit_depth_to_rgb(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        image = image.convert("RGBA")
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def _high_bit_depth_to_rgb(image: Image.Image) -> RGBImage:
    """16/32-bit grayscale: scale the used range to 8 bits (PIL's convert would clip). Integer
    arithmetic: a float64 copy would cost 8 bytes a pixel."""
    values = np.clip(np.asarray(image), 0, 65535).astype(np.uint32)
    peak = int(values.max()) if values.size else 0
    gray = (values * 255 // 65535 if peak > 255 else values).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)
