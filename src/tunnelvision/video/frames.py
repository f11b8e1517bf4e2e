"""The frames a video job asks for, chunk after chunk, without decoding the clip again each time."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from tunnelvision.errors import TunnelvisionError
from tunnelvision.imaging import RGBImage
from tunnelvision.video.decode import FrameReader, VideoLimits

Frames = list[tuple[int, RGBImage]]
REOPEN_AFTER = 64  # frames to skip forward before seeking beats decoding on


class FrameSource:
    """Keeps one forward decode open while requests go forward (the usual pass); anything else
    (a resumed pass, a backward pass) seeks. A damaged frame ends the clip there: the frames read
    before it are returned, and the next read raises the error."""

    def __init__(self, path: Path | str, limits: VideoLimits) -> None:
        self._path, self._limits = Path(path), limits
        self._reader: FrameReader | None = None
        self._frames: Iterator[tuple[int, RGBImage]] | None = None
        self._position = 0  # the index the open decode yields next
        self._failed: TunnelvisionError | None = None
        self._partial: Frames = []  # what the current read has got so far

    @property
    def failure(self) -> TunnelvisionError | None:
        """Why the clip ended early (a damaged frame), once a read has met it."""
        return self._failed

    def read(self, indices: list[int]) -> Frames:
        if self._failed is not None:
            raise self._failed
        if not indices:
            return []
        wanted = sorted(indices)
        try:
            got = self._forward(wanted)
        except TunnelvisionError as exc:  # a damaged frame: keep what came before it
            self._failed, got = exc, list(self._partial)
            if not got:
                raise
        by_index = dict(got)
        return [(i, by_index[i]) for i in indices if i in by_index]

    def _forward(self, wanted: list[int]) -> Frames:
        first, last = wanted[0], wanted[-1]
        if self._frames is None or not self._position <= first <= self._position + REOPEN_AFTER:
            self._open(first)
        self._partial = []
        want = set(wanted)
        assert self._frames is not None
        for index, image in self._frames:
            self._position = index + 1
            if index in want:
                self._partial.append((index, image))
            if index >= last:
                break
        return self._partial

    def _open(self, start: int) -> None:
        reader = self._reader or FrameReader(self._path, self._limits)
        self._reader = reader
        self._frames, self._position = reader.read(start), start

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._reader = self._frames = None
