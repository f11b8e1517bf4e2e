"""Untrusted clips -> RGB frames, with limits checked before a frame is decoded.

A clip is a video file (MP4/MOV, WebM/Matroska or AVI, judged by its first bytes, never by what
FFmpeg guesses) or a zip of PNG/JPEG frames. `probe` reads headers and the packet list (no
decoding) and refuses what is over the limits; `FrameReader` then decodes only the frames asked
for, one at a time, so memory stays flat whatever the clip's length.

Frame indices are positions in the clip (0-based, in the order the decoder outputs frames), not
timestamps: a demux pass (packets only, no pixels) maps each frame's timestamp to its position.
"""

from __future__ import annotations

import re
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import IO, Literal

import av
import av.container
import av.stream
import av.video.stream
import numpy as np

from tunnelvision.archives import (
    READ_ERRORS,
    ArchiveLimits,
    check_total,
    checked_name,
    is_skipped,
    open_archive,
    read_member,
)
from tunnelvision.errors import (
    FrameTooLarge,
    InvalidInput,
    InvalidVideo,
    MalformedInput,
    TunnelvisionError,
    UnsupportedVideoFormat,
    VideoTooLarge,
)
from tunnelvision.imaging import RGBImage, decode_image, probe_image, sniff_format

UnsupportedVideo = UnsupportedVideoFormat  # the name this module grew up with

ClipKind = Literal["video", "frames-zip"]
ACCEPTED_NAMES = "MP4/MOV, WebM/MKV, AVI, or a zip of PNG/JPEG frames"
FRAME_SUFFIXES = (".png", ".jpg", ".jpeg")
ZIP_FPS = 25.0  # a zip of frames has no rate; exports use this one unless told otherwise
MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip", b"pnot")
# FFmpeg's demuxers are named explicitly: its guessing would let a hostile file pick e.g. the HLS
# or concat demuxer, which open other files or URLs. Only the `file` protocol is allowed too.
MAX_STREAMS = 16  # streams whose probe decoders get the pixel cap (a clip has one or two)
SAFE_OPEN_OPTIONS = {"protocol_whitelist": "file", "probesize": str(5_000_000)}
# What PyAV raises on damaged data; never let one escape as a 500.
AV_ERRORS = (av.FFmpegError, EOFError, OSError, ValueError, IndexError, MemoryError, OverflowError)


@dataclass(frozen=True)
class VideoLimits:
    """Defaults fit a server behind Cloudflare (100 MB bodies) and one GPU's afternoon."""

    max_bytes: int = 100 * 1000 * 1000
    max_duration_s: float = 600.0
    max_frames: int = 18_000
    max_width: int = 3840  # a frame may be this big either way round (portrait phone clips)
    max_height: int = 2160
    max_frame_bytes: int = 32 * 1024 * 1024  # one image in a zip of frames
    max_unpacked_bytes: int = 4 * 1024 * 1024 * 1024  # all of a zip's images, read one at a time

    @property
    def max_pixels(self) -> int:
        return self.max_width * self.max_height


DEFAULT_LIMITS = VideoLimits()


@dataclass(frozen=True)
class VideoInfo:
    width: int
    height: int
    frames: int
    fps: float
    duration_s: float
    codec: str  # FFmpeg's decoder name ("h264", "vp9"), or "png"/"jpeg" for a zip
    kind: ClipKind
    frames_estimated: bool = False  # True: duration x rate, the container did not say


def probe(path: Path | str, limits: VideoLimits = DEFAULT_LIMITS, count: bool = True) -> VideoInfo:
    """What the clip is, once every limit has been checked against its headers. `count` also
    walks the packet list (reads the file, decodes nothing) for an exact frame count and finds a
    truncated tail; without it a count the container does not declare is an estimate."""
    path = Path(path)
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise VideoTooLarge(f"the video is {size} bytes; the limit is {limits.max_bytes}")
    kind = sniff_clip(path)
    if kind == "frames-zip":
        with _ZipFrames(path, limits) as frames:
            return frames.probe(count)
    with _VideoFile(path, limits) as video:
        return video.probe(count) if count else video.info


def sniff_clip(path: Path) -> ClipKind:
    """The clip's kind from its first bytes; what it is not, named, when it is neither."""
    with path.open("rb") as file:
        head = file.read(16)
    if _container_format(head) is not None:
        return "video"
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "frames-zip"
    if not head:
        raise InvalidVideo("the video is empty")
    image = sniff_format(head)
    if image is not None:
        raise UnsupportedVideo(f"the file is a single {image} image, not a video: send {ACCEPTED_NAMES}")
    raise UnsupportedVideo(f"the file is not a video this server reads: send {ACCEPTED_NAMES}")


def _container_format(head: bytes) -> str | None:
    """FFmpeg's demuxer name for the accepted containers, from their signatures."""
    if head[4:8] in MP4_BOXES:
        return "mov"
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return "matroska"
    if head.startswith(b"RIFF") and head[8:12] == b"AVI ":
        return "avi"
    return None


def check_limits(info: VideoInfo, limits: VideoLimits) -> None:
    """Refuse a clip over a limit; called with header values, before a frame is decoded."""
    check_frame_size(info.width, info.height, limits)
    if info.frames < 1:
        raise InvalidVideo("the video has no frames")
    if info.frames > limits.max_frames:
        about = "about " if info.frames_estimated else ""
        raise VideoTooLarge(f"the video has {about}{info.frames} frames; the limit is {limits.max_frames}")
    if info.kind == "video" and info.duration_s > limits.max_duration_s:
        raise VideoTooLarge(
            f"the video lasts {info.duration_s:.1f} s; the limit is {limits.max_duration_s:.0f} s"
        )


def check_frame_size(width: int, height: int, limits: VideoLimits) -> None:
    if width < 1 or height < 1:
        raise InvalidVideo(f"the video's frames are {width}x{height}: it is damaged")
    small, large = sorted((width, height))
    if large > max(limits.max_width, limits.max_height) or small > min(limits.max_width, limits.max_height):
        raise FrameTooLarge(
            f"the video's frames are {width}x{height}; the limit is {limits.max_width}x"
            f"{limits.max_height} (either way round): scale it down first"
        )


class FrameReader:
    """(frame index, HxWx3 uint8 RGB) for frames start, start + stride, ... before `end` (None:
    to the end). Decodes as it goes: one frame in memory at a time. Starting past 0 seeks to the
    keyframe before `start` and decodes forward; frames before `start` are decoded (inter-frame
    codecs need them) but never converted to RGB. Use as a context manager, or call `close`.

    A frame that cannot be decoded (a truncated or damaged file) raises InvalidVideo naming it;
    every frame yielded before it is good, and `last_index` says which was last."""

    def __init__(
        self,
        path: Path | str,
        limits: VideoLimits = DEFAULT_LIMITS,
        start: int = 0,
        end: int | None = None,
        stride: int = 1,
    ) -> None:
        path = Path(path)
        self._source: _VideoFile | _ZipFrames = (
            _ZipFrames(path, limits) if sniff_clip(path) == "frames-zip" else _VideoFile(path, limits)
        )
        self.info = self._source.probe(count=False)
        self.start, self.end, self.stride = start, end, stride
        self.last_index = -1

    def __iter__(self) -> Iterator[tuple[int, RGBImage]]:
        return self.read(self.start, self.end, self.stride)

    def read(self, start: int = 0, end: int | None = None, stride: int = 1) -> Iterator[tuple[int, RGBImage]]:
        """Frames start, start + stride, ... before `end` (clipped to the clip's length)."""
        if start < 0 or stride < 1 or (end is not None and end < start):
            raise InvalidInput(f"bad frame range: start={start}, end={end}, stride={stride}")
        stop = self.info.frames if end is None else min(end, self.info.frames)
        for index, image in self._source.frames(start, stop, stride):
            self.last_index = index
            yield index, image

    def backward(self, start: int, stop: int = 0, window: int = 16) -> Iterator[tuple[int, RGBImage]]:
        """Frames start, start - 1, ... down to `stop` (inclusive), for propagating backward.
        Decodes forward windows of `window` frames, last window first, and yields each reversed:
        memory is `window` frames; each window costs a seek and the decoding from its keyframe,
        so with keyframes every G frames the clip is decoded about 1 + G / (2 * window) times."""
        if stop < 0 or start < stop or window < 1:
            raise InvalidInput(f"bad backward range: from {start} down to {stop} (window {window})")
        high = min(start, self.info.frames - 1) + 1
        while high > stop:
            low = max(stop, high - window)
            chunk = list(self.read(low, high))
            yield from reversed(chunk)
            high = low

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class _DecodeFailed(Exception):
    """The decoder broke; the caller knows which frame that was."""


def _damaged(index: int) -> InvalidVideo:
    return InvalidVideo(
        f"the video is damaged or truncated at frame {index}: "
        + (f"frames 0 to {index - 1} could be read" if index > 0 else "no frame could be read")
    )


class _VideoFile:
    """One container opened with a named demuxer, its first video stream, and the map from
    frame timestamps to positions (built lazily by a demux pass)."""

    def __init__(self, path: Path, limits: VideoLimits) -> None:
        self.limits = limits
        with path.open("rb") as file:
            demuxer = _container_format(file.read(16))
        # The decoder's own pixel cap: a stream whose later headers claim a bigger size than the
        # container said is refused by FFmpeg before it allocates the frame.
        options = {**SAFE_OPEN_OPTIONS, "max_pixels": str(limits.max_pixels)}
        if demuxer == "mov":  # never follow a track's reference to another file (off by default)
            options["enable_drefs"] = "0"
        # Opening decodes a frame or two to learn the codec's parameters: the decoders it opens
        # for that take the pixel cap too (as format options it would reach none of them).
        per_stream = [{"max_pixels": str(limits.max_pixels)}] * MAX_STREAMS
        try:
            self.container = av.open(
                str(path),
                format=demuxer,
                options=options,
                stream_options=per_stream,  # type: ignore[arg-type]  # PyAV's stub says list[str]; it takes dicts
            )
        except AV_ERRORS:
            raise InvalidVideo("the video is damaged or truncated (its headers cannot be read)") from None
        self._positions: dict[int, int] | None = None
        self._keyframes: list[tuple[int, int]] = []  # (position, timestamp)
        self.broken_at: int | None = None  # the first frame the packet scan could not find
        try:
            self.stream = self._video_stream()
            self.info = self._header_info()
            check_limits(self.info, limits)
        except BaseException:
            self.close()
            raise

    def _video_stream(self) -> av.video.stream.VideoStream:
        streams = self.container.streams.video
        if not streams:
            raise InvalidVideo("the file holds no video stream (audio only, or its headers are damaged)")
        stream = streams[0]
        if stream.codec_context is None or not stream.codec_context.name:
            raise UnsupportedVideo("the video's codec is not one this server decodes")
        stream.thread_type = "AUTO"
        return stream

    def _header_info(self) -> VideoInfo:
        stream = self.stream
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate and float(rate) > 0 else ZIP_FPS
        duration = _duration_s(self.container, stream)
        declared = stream.frames
        estimated = declared <= 0
        frames = round(duration * fps) if estimated else declared
        return VideoInfo(
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            frames=frames,
            fps=fps,
            duration_s=duration if duration > 0 else frames / fps,
            codec=stream.codec_context.name,
            kind="video",
            frames_estimated=estimated,
        )

    def probe(self, count: bool) -> VideoInfo:
        """Strict (`count`): the packet scan must find every frame. Otherwise the frames a scan
        finds (where the header gave no count), and reading a missing one raises."""
        try:
            self._index()
        except BaseException:
            self.close()
            raise
        if count and self.broken_at is not None:
            raise _damaged(self.broken_at)
        return self.info

    def _index(self) -> dict[int, int]:
        """Timestamp -> position for every frame, from one pass over the packets (no decoding).
        The count found replaces the header's. Packets that run out or break before the header's
        count set `broken_at`: the frames before it stay readable, reading it raises."""
        if self._positions is not None:
            return self._positions
        stamps, keys = self._scan_packets()
        declared = None if self.info.frames_estimated else self.info.frames
        if declared is not None and len(stamps) < declared and self.broken_at is None:
            self.broken_at = len(stamps)
        if not stamps and self.broken_at is None:
            raise InvalidVideo("the video has no frames")
        order = sorted(stamps)
        self._positions = {stamp: position for position, stamp in enumerate(order)}
        self._keyframes = sorted((self._positions[stamp], stamp) for stamp in keys)
        frames = self.info.frames if self.broken_at is not None else len(order)
        self.info = VideoInfo(**{**self.info.__dict__, "frames": frames, "frames_estimated": False})
        return self._positions

    def _scan_packets(self) -> tuple[list[int], list[int]]:
        stamps: list[int] = []
        keys: list[int] = []
        try:
            self.container.seek(0)
            for packet in self.container.demux(self.stream):
                if packet.size == 0 or packet.is_discard:
                    continue
                stamp = packet.pts if packet.pts is not None else packet.dts
                if packet.is_corrupt or stamp is None:
                    self.broken_at = len(stamps)
                    break
                if len(stamps) >= self.limits.max_frames:
                    raise VideoTooLarge(f"the video has more than {self.limits.max_frames} frames")
                if packet.is_keyframe:
                    keys.append(stamp)
                stamps.append(stamp)
        except AV_ERRORS:
            self.broken_at = len(stamps)
        return stamps, keys

    def frames(self, start: int, stop: int, stride: int) -> Iterator[tuple[int, RGBImage]]:
        positions = self._index()
        if self.broken_at is not None and start >= self.broken_at:
            raise _damaged(self.broken_at)
        keyframe = self._seek(start)
        previous, first = keyframe - 1, True
        try:
            for frame in self._decoded():
                position = positions.get(frame.pts, previous + 1) if frame.pts is not None else previous + 1
                if first and position > start:  # the demuxer's seek overshot: decode from the top
                    yield from self._from_beginning(start, stop, stride)
                    return
                first, previous = False, position
                if position >= stop:
                    return
                if self.broken_at is not None and position >= self.broken_at:
                    raise _damaged(self.broken_at)
                if position >= start and (position - start) % stride == 0:
                    yield position, self._rgb(frame, position)
        except _DecodeFailed:
            raise _damaged(previous + 1) from None
        if previous + 1 < stop:  # the packets ran out before the frames the header promised
            raise _damaged(previous + 1)

    def _from_beginning(self, start: int, stop: int, stride: int) -> Iterator[tuple[int, RGBImage]]:
        position = -1
        try:
            self.container.seek(0)
            for position, frame in enumerate(self._decoded()):
                if position >= stop:
                    return
                if position >= start and (position - start) % stride == 0:
                    yield position, self._rgb(frame, position)
        except (_DecodeFailed, *AV_ERRORS):
            raise _damaged(position + 1) from None

    def _seek(self, start: int) -> int:
        """Seek to the last keyframe at or before `start`; its position."""
        position, stamp = max(((p, s) for p, s in self._keyframes if p <= start), default=(0, None))
        try:
            if stamp is None or position == 0:
                self.container.seek(0)
                return 0
            self.container.seek(stamp, stream=self.stream, backward=True, any_frame=False)
        except AV_ERRORS:
            raise _damaged(position) from None
        return position

    def _decoded(self) -> Iterator[av.VideoFrame]:
        """Decoded frames from the current position, then the decoder's delayed ones."""
        packets = self.container.demux(self.stream)
        while True:
            try:
                packet = next(packets)
                frames = packet.decode()
            except StopIteration:
                return
            except AV_ERRORS:
                raise _DecodeFailed from None
            yield from frames

    def _rgb(self, frame: av.VideoFrame, position: int) -> RGBImage:
        """RGB at the clip's size (a stream that changes size mid-way is scaled back to it)."""
        width, height = self.info.width, self.info.height
        try:
            check_frame_size(frame.width, frame.height, self.limits)
            return np.asarray(frame.to_ndarray(format="rgb24", width=width, height=height), dtype=np.uint8)
        except AV_ERRORS:
            raise _damaged(position) from None

    def close(self) -> None:
        self.container.close()

    def __enter__(self) -> _VideoFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _duration_s(container: av.container.InputContainer, stream: av.stream.Stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / av.time_base
    return 0.0


class _ZipFrames:
    """A zip of PNG/JPEG frames in name order (natural: frame_2 before frame_10). Judged from the
    zip's directory and the first frame's header; each frame is inflated when read."""

    def __init__(self, path: Path, limits: VideoLimits) -> None:
        self.limits = limits
        self.file: IO[bytes] = path.open("rb")
        try:
            self.archive = self._open(limits)
            self.members = self._members()
            self.info = self._info()
        except BaseException:
            self.close()
            raise

    def _open(self, limits: VideoLimits) -> zipfile.ZipFile:
        try:
            return open_archive(self.file, _archive_limits(limits))
        except InvalidInput as exc:
            if isinstance(exc, MalformedInput):
                raise
            raise InvalidVideo(f"the zip of frames cannot be read: {exc.message}") from None

    def _members(self) -> list[zipfile.ZipInfo]:
        members = [info for info in self.archive.infolist() if not is_skipped(info)]
        if len(members) > self.limits.max_frames:
            raise VideoTooLarge(
                f"the archive holds {len(members)} frames; the limit is {self.limits.max_frames}"
            )
        for info in members:
            name = checked_name(info, self.limits.max_frame_bytes)
            if not name.lower().endswith(FRAME_SUFFIXES):
                raise InvalidVideo(f"archive member '{name}' is not a PNG or JPEG frame")
        check_total(members, _archive_limits(self.limits))
        return sorted(members, key=lambda info: _natural_key(info.filename))

    def _info(self) -> VideoInfo:
        if not self.members:
            raise InvalidVideo("the archive holds no frames")
        first = self.members[0]
        try:
            width, height = probe_image(self._bytes(first), self.limits.max_pixels)
        except TunnelvisionError as exc:  # the same kind of error, naming the frame
            raise type(exc)(f"frame '{first.filename}': {exc.message}") from None
        info = VideoInfo(
            width=width,
            height=height,
            frames=len(self.members),
            fps=ZIP_FPS,
            duration_s=len(self.members) / ZIP_FPS,
            codec=PurePosixPath(first.filename).suffix.lstrip(".").lower().replace("jpg", "jpeg"),
            kind="frames-zip",
        )
        check_limits(info, self.limits)
        return info

    def probe(self, count: bool) -> VideoInfo:
        """With `count`, every frame's header is read too (one member inflated at a time), so a
        frame over the limits or of another size is refused now, not when the job reaches it."""
        if count:
            for index, info in enumerate(self.members[1:], start=1):
                self._check_header(index, info)
        return self.info

    def _check_header(self, index: int, info: zipfile.ZipInfo) -> None:
        try:
            size = probe_image(self._bytes(info), self.limits.max_pixels)
        except TunnelvisionError as exc:
            raise type(exc)(f"frame {index} ('{info.filename}'): {exc.message}") from None
        if size != (self.info.width, self.info.height):
            raise InvalidVideo(
                f"frame {index} ('{info.filename}') is {size[0]}x{size[1]}; the first frame is "
                f"{self.info.width}x{self.info.height}: all frames must match"
            )

    def _bytes(self, info: zipfile.ZipInfo) -> bytes:
        return read_member(self.archive, info, self.limits.max_frame_bytes)

    def frames(self, start: int, stop: int, stride: int) -> Iterator[tuple[int, RGBImage]]:
        for index in range(start, stop, stride):
            yield index, self.frame(index)

    def frame(self, index: int) -> RGBImage:
        info = self.members[index]
        try:
            image = decode_image(self._bytes(info), self.limits.max_pixels)
        except (TunnelvisionError, *READ_ERRORS) as exc:
            why = exc.message if isinstance(exc, TunnelvisionError) else "damaged"
            raise InvalidVideo(f"frame {index} ('{info.filename}') cannot be read: {why}") from None
        if image.shape[:2] != (self.info.height, self.info.width):
            raise InvalidVideo(
                f"frame {index} ('{info.filename}') is {image.shape[1]}x{image.shape[0]}; "
                f"the first frame is {self.info.width}x{self.info.height}: all frames must match"
            )
        return image

    def close(self) -> None:
        if hasattr(self, "archive"):
            self.archive.close()
        self.file.close()

    def __enter__(self) -> _ZipFrames:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _archive_limits(limits: VideoLimits) -> ArchiveLimits:
    return ArchiveLimits(
        max_members=limits.max_frames,
        max_member_bytes=limits.max_frame_bytes,
        max_total_bytes=limits.max_unpacked_bytes,
        max_unpacked_bytes=limits.max_unpacked_bytes,
    )


def _natural_key(name: str) -> list[tuple[int, int | str]]:
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", name)]
