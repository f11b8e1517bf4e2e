"""Tracking results -> files: MOT Challenge text, an annotated MP4, a per-object summary.

Results come in as `FrameResult`s in ascending frame order and are consumed as they come, so an
export holds one frame (and its objects) in memory whatever the clip's length.
"""

from __future__ import annotations

import colorsys
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import IO, Any

import av
import av.container
import av.video.stream
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from tunnelvision.drawing import MASK_ALPHA, TAG_PAD, tag_origin
from tunnelvision.imaging import RGBImage
from tunnelvision.masks import decode_rle
from tunnelvision.schemas import RLE
from tunnelvision.video.decode import DEFAULT_LIMITS, FrameReader, VideoLimits

# H.264 plays everywhere (browsers, phones); MPEG-4 Part 2 is the fallback every FFmpeg build has.
PREFERRED_ENCODERS = ("libx264", "mpeg4")


@dataclass(frozen=True)
class TrackedObject:
    object_id: int
    label: str | None
    score: float | None
    box: tuple[float, float, float, float]  # x1, y1, x2, y2 in pixels of the clip's frames
    mask: RLE | None = None  # as `masks.encode_rle` makes it; a {"size", "counts"} dict is accepted

    @classmethod
    def of(cls, data: Mapping[str, Any]) -> TrackedObject:
        """From the stored/wire shape: {"object_id" or "id", "label", "score", "box", "mask"?}."""
        mask = data.get("mask")
        return cls(
            object_id=int(data["object_id"] if "object_id" in data else data["id"]),
            label=data.get("label"),
            score=None if data.get("score") is None else float(data["score"]),
            box=_box(data["box"]),
            mask=RLE.model_validate(mask) if isinstance(mask, Mapping) else mask,
        )


@dataclass(frozen=True)
class FrameResult:
    frame_index: int  # 0-based position in the clip, as FrameReader numbers frames
    objects: list[TrackedObject] = field(default_factory=list)


@dataclass(frozen=True)
class ObjectSummary:
    object_id: int
    label: str | None  # the label it carried most often
    first_frame: int
    last_frame: int
    frames: int  # frames it is present in
    mean_score: float | None


def _box(values: Iterable[float]) -> tuple[float, float, float, float]:
    x1, y1, x2, y2 = (float(v) for v in values)
    return x1, y1, x2, y2


def ascending(results: Iterable[FrameResult]) -> Iterator[FrameResult]:
    """The results, checked to come in strictly ascending frame order (exports stream them)."""
    previous = -1
    for result in results:
        if result.frame_index <= previous:
            raise ValueError(
                f"results must be in ascending frame order: {result.frame_index} after {previous}"
            )
        previous = result.frame_index
        yield result


# --- MOT Challenge -----------------------------------------------------------------------------


def mot_lines(results: Iterable[FrameResult], id_offset: int = 0) -> Iterator[str]:
    """One line per object and frame: `frame,id,bb_left,bb_top,bb_width,bb_height,conf,-1,-1,-1`.
    MOT Challenge numbers frames, ids and pixel coordinates from 1: frame = index + 1, the box's
    left/top are shifted by one pixel, id = object_id + id_offset (must come out >= 1). `conf` is
    the score (1 when there is none: MOT's "consider this line")."""
    for result in ascending(results):
        for obj in result.objects:
            track = obj.object_id + id_offset
            if track < 1:
                raise ValueError(f"MOT ids start at 1: object {obj.object_id} + offset {id_offset}")
            x1, y1, x2, y2 = obj.box
            conf = 1.0 if obj.score is None else obj.score
            yield (
                f"{result.frame_index + 1},{track},{x1 + 1:.2f},{y1 + 1:.2f},"
                f"{x2 - x1:.2f},{y2 - y1:.2f},{conf:.4f},-1,-1,-1\n"
            )


def write_mot(results: Iterable[FrameResult], out: IO[str] | Path | str, id_offset: int = 0) -> int:
    """Write the MOT text to a file or open text stream; the number of lines written."""
    if isinstance(out, (str, Path)):
        with Path(out).open("w", encoding="ascii") as stream:
            return write_mot(results, stream, id_offset)
    count = 0
    for line in mot_lines(results, id_offset):
        out.write(line)
        count += 1
    return count


# --- Per-object summary ------------------------------------------------------------------------


def summarize(results: Iterable[FrameResult]) -> list[ObjectSummary]:
    """First and last frame, frames present, most frequent label and mean score of each object,
    by object id."""
    seen: dict[int, _Tally] = {}
    for result in results:
        for obj in result.objects:
            seen.setdefault(obj.object_id, _Tally(result.frame_index)).add(result.frame_index, obj)
    return [tally.summary(object_id) for object_id, tally in sorted(seen.items())]


class _Tally:
    def __init__(self, frame: int) -> None:
        self.first = self.last = frame
        self.frames: set[int] = set()
        self.labels: dict[str | None, int] = {}
        self.score_sum, self.scores = 0.0, 0

    def add(self, frame: int, obj: TrackedObject) -> None:
        self.first, self.last = min(self.first, frame), max(self.last, frame)
        self.frames.add(frame)
        self.labels[obj.label] = self.labels.get(obj.label, 0) + 1
        if obj.score is not None:
            self.score_sum, self.scores = self.score_sum + obj.score, self.scores + 1

    def summary(self, object_id: int) -> ObjectSummary:
        label = max(self.labels.items(), key=lambda item: (item[0] is not None, item[1]))[0]
        mean = self.score_sum / self.scores if self.scores else None
        return ObjectSummary(object_id, label, self.first, self.last, len(self.frames), mean)


# --- Annotated MP4 -----------------------------------------------------------------------------


def color_for_id(object_id: int) -> tuple[int, int, int]:
    """A stable colour per object id, neighbours far apart (golden-ratio hues)."""
    r, g, b = colorsys.hsv_to_rgb((object_id * 0.618034 + 0.1) % 1.0, 0.85, 0.95)
    return int(r * 255), int(g * 255), int(b * 255)


def video_encoder() -> str:
    """The first of PREFERRED_ENCODERS this PyAV build has."""
    for name in PREFERRED_ENCODERS:
        if name in av.codecs_available:
            return name
    raise RuntimeError(f"this PyAV build has none of the encoders {PREFERRED_ENCODERS}")


def write_overlay(
    clip: Path | str,
    results: Iterable[FrameResult],
    out: Path | str,
    limits: VideoLimits = DEFAULT_LIMITS,
    fps: float | None = None,
) -> int:
    """Re-decode `clip` and write an MP4 (H.264, yuv420p) with each object's mask, box and
    "id label" tag drawn; same frame rate as the source (or `fps` for a zip of frames).
    A clip odd in width or height is padded by one pixel (yuv420p needs even sides). Streams:
    one decoded frame and one frame's results in memory. The number of frames written."""
    pending = ascending(results)
    current = next(pending, None)
    written = 0
    with (
        FrameReader(clip, limits) as reader,
        _Mp4Writer(Path(out), reader.info.width, reader.info.height, fps or reader.info.fps) as writer,
    ):
        for index, image in reader:
            while current is not None and current.frame_index < index:
                current = next(pending, None)
            objects = current.objects if current is not None and current.frame_index == index else []
            writer.write(draw_objects(image, objects))
            written += 1
    return written


def draw_objects(image: RGBImage, objects: list[TrackedObject]) -> RGBImage:
    """Translucent masks, then boxes and "id label" tags, in each object's colour."""
    canvas = image.copy()
    for obj in objects:
        mask = _mask_for(obj, image.shape[0], image.shape[1])
        if mask is not None:
            color = np.array(color_for_id(obj.object_id), dtype=np.float32)
            canvas[mask] = (canvas[mask] * (1 - MASK_ALPHA) + color * MASK_ALPHA).astype(np.uint8)
    picture = Image.fromarray(canvas)
    _draw_boxes(picture, objects)
    return np.asarray(picture)


def _mask_for(obj: TrackedObject, height: int, width: int) -> np.ndarray[Any, np.dtype[np.bool_]] | None:
    """The object's mask when it fits the frame (one made for another size is not drawn)."""
    if obj.mask is None or list(obj.mask.size) != [height, width]:
        return None
    return decode_rle(obj.mask)


def _draw_boxes(picture: Image.Image, objects: list[TrackedObject]) -> None:
    draw = ImageDraw.Draw(picture)
    line = max(2, round(max(picture.size) / 400))
    font = ImageFont.load_default(size=max(12, round(max(picture.size) / 60)))
    for obj in objects:
        color = color_for_id(obj.object_id)
        x1, y1, x2, y2 = obj.box
        draw.rectangle([x1, y1, max(x1, x2), max(y1, y2)], outline=color, width=line)
        tag = " ".join(part for part in (str(obj.object_id), obj.label) if part)
        origin = tag_origin(draw, tag, font, (x1, y1), picture.width, line)
        left, top, right, bottom = draw.textbbox(origin, tag, font=font)
        draw.rectangle([left - TAG_PAD, top - TAG_PAD, right + TAG_PAD, bottom + TAG_PAD], fill=color)
        draw.text(origin, tag, fill=(0, 0, 0), font=font)


def add_video_stream(
    container: av.container.OutputContainer,
    codec: str,
    rate: Fraction | int,
    width: int,
    height: int,
    pix_fmt: str = "yuv420p",
) -> av.video.stream.VideoStream:
    stream = container.add_stream(codec, rate=rate)
    if not isinstance(stream, av.video.stream.VideoStream):
        raise ValueError(f"{codec} is not a video encoder")
    stream.width, stream.height, stream.pix_fmt = width, height, pix_fmt
    return stream


class _Mp4Writer:
    """Frames in, an MP4 out, encoded as they come (the muxer writes as it goes)."""

    def __init__(self, path: Path, width: int, height: int, fps: float) -> None:
        self.width, self.height = width + width % 2, height + height % 2
        rate = Fraction(fps).limit_denominator(1001)
        self.container = av.open(str(path), mode="w", format="mp4")
        codec = video_encoder()
        self.stream = add_video_stream(self.container, codec, rate, self.width, self.height)
        if codec == "libx264":
            self.stream.codec_context.options = {"preset": "veryfast", "crf": "23"}

    def write(self, image: RGBImage) -> None:
        pad = ((0, self.height - image.shape[0]), (0, self.width - image.shape[1]), (0, 0))
        if any(after for _, after in pad):
            image = np.pad(image, pad, mode="edge")
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(image), format="rgb24")
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        try:
            self.container.mux(self.stream.encode(None))
        finally:
            self.container.close()

    def __enter__(self) -> _Mp4Writer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
