"""Small synthetic clips for tests and benchmarks: a white square (and optionally a grey disc)
moving over a dark background, written with PyAV; a truncated copy; a zip of frames."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path
from typing import Literal

import av
import numpy as np
from PIL import Image

from tunnelvision.imaging import RGBImage
from tunnelvision.video.export import add_video_stream

ClipFormat = Literal["mp4", "webm", "mov", "mkv", "avi"]
# Container -> (codec, pixel format); VP9 for WebM, H.264 where the wheel has libx264, else MPEG-4.
_CODECS: dict[str, tuple[str, str]] = {
    "mp4": ("libx264", "yuv420p"),
    "mov": ("libx264", "yuv420p"),
    "mkv": ("libx264", "yuv420p"),
    "webm": ("libvpx-vp9", "yuv420p"),
    "avi": ("mpeg4", "yuv420p"),
}
BACKGROUND = 24
SQUARE = 255
DISC = 150


def moving_square_frame(index: int, frames: int, width: int, height: int, second: bool = False) -> RGBImage:
    """Frame `index`: the square slides left to right; the disc (if any) top to bottom."""
    image = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
    side = max(4, min(width, height) // 5)
    x, y = square_origin(index, frames, width, height)
    image[y : y + side, x : x + side] = SQUARE
    if second:
        radius = side // 2
        progress = index / max(1, frames - 1)
        cx, cy = width // 4, radius + round(progress * (height - 2 * radius - 1))
        yy, xx = np.ogrid[:height, :width]
        image[(yy - cy) ** 2 + (xx - cx) ** 2 <= radius**2] = DISC
    return image


def square_origin(index: int, frames: int, width: int, height: int) -> tuple[int, int]:
    """Top-left corner of the square in frame `index` (what a tracker should find)."""
    side = max(4, min(width, height) // 5)
    progress = index / max(1, frames - 1)
    return round(progress * (width - side)), (height - side) // 2


def write_moving_square_clip(
    path: Path | str,
    frames: int,
    width: int = 320,
    height: int = 240,
    fps: int = 25,
    fmt: ClipFormat = "mp4",
    second: bool = False,
    gop: int = 12,
    faststart: bool = True,
) -> Path:
    """Encode the clip; `gop` frames between keyframes (seeking lands on those). `faststart` puts
    the MP4/MOV index first, so a truncated copy still opens (as a partial upload would)."""
    codec, pix_fmt = _CODECS[fmt]
    if width % 2 or height % 2:  # 4:2:0 needs even sides; 4:4:4 makes the odd clips exports must pad
        pix_fmt = "yuv444p"
    options = {"movflags": "faststart"} if faststart and fmt in ("mp4", "mov") else {}
    with av.open(str(path), mode="w", format=None if fmt != "mkv" else "matroska", options=options) as out:
        stream = add_video_stream(out, codec, fps, width, height, pix_fmt)
        stream.codec_context.gop_size = gop
        if codec == "libx264":
            stream.codec_context.options = {"preset": "ultrafast", "bf": "0"}
        for index in range(frames):
            image = moving_square_frame(index, frames, width, height, second)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")))
        out.mux(stream.encode(None))
    return Path(path)


def truncate_copy(source: Path | str, target: Path | str, fraction: float = 0.5) -> Path:
    """The first `fraction` of the file's bytes: an interrupted upload."""
    data = Path(source).read_bytes()
    Path(target).write_bytes(data[: int(len(data) * fraction)])
    return Path(target)


def write_frames_zip(
    path: Path | str, frames: int, width: int = 320, height: int = 240, fmt: Literal["png", "jpeg"] = "png"
) -> Path:
    """The same clip as numbered image files in a zip (frame_0000.png, ...)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive:
        for index in range(frames):
            buffer = io.BytesIO()
            Image.fromarray(moving_square_frame(index, frames, width, height)).save(
                buffer, format="PNG" if fmt == "png" else "JPEG", quality=95
            )
            archive.writestr(f"frame_{index:04d}.{'png' if fmt == 'png' else 'jpg'}", buffer.getvalue())
    return Path(path)
