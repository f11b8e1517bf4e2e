"""Video trackers: follow objects through a clip whose frames are pushed one at a time.

The contract between video families and the engine's video pipeline (engine/video.py). A session
is streaming: frames arrive in the order they are to be tracked (forward, or backward for a
correction), one `push` each, so no family ever holds the whole clip. A session is disposable: the
engine starts a new one, seeded with masks it committed earlier, to resume after a restart, to
re-propagate after a correction, or when a chunk lands on another device. Families answer in
arrays; ids, labels and mask encodings are the engine's business.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, Protocol

import numpy as np

from tunnelvision.models.roles import Model, Role

VideoAbility = Literal["video-text", "video-boxes", "video-points"]
VIDEO_TRACKER: Role = "video_tracker"


@dataclass
class ObjectPrompt:
    """What to follow from the frame it is pushed with. Object ids are the engine's: a box/point
    tracker answers with the same ids. `mask` seeds an object with a mask committed earlier."""

    object_id: int
    box: tuple[float, float, float, float] | None = None  # x1, y1, x2, y2 in frame pixels
    points: tuple[tuple[float, float], ...] = ()  # (x, y) in frame pixels
    point_labels: tuple[int, ...] = ()  # one per point: 1 object, 0 background
    mask: np.ndarray | None = None  # (height, width) bool


@dataclass
class TrackedFrame:
    """Every object the session follows on one frame. Text trackers choose their own ids (unique
    within the session) and say which phrase each object matched; box/point trackers answer with
    the prompts' ids and `phrase_ids` empty. An object the tracker lost is absent."""

    object_ids: list[int]
    scores: list[float]
    masks: np.ndarray  # (n, height, width) bool at the frame's size, on the CPU
    boxes: np.ndarray  # (n, 4) float32 xyxy in frame pixels (from the masks where the model gives none)
    phrase_ids: list[int] = field(default_factory=list)


class TrackingSession(Protocol):
    def push(
        self, frame: np.ndarray, prompts: Sequence[ObjectPrompt] = (), pixels: Any = None
    ) -> TrackedFrame:
        """Track into the next frame ((height, width, 3) uint8 RGB), after adding `prompts` on it.
        `pixels`: the frame as the tracker's `prepare` made it on the CPU (None: prepared here).
        Runs on the device worker; the state kept is bounded whatever the number of frames."""
        ...

    def close(self) -> None:
        """Free the session's device memory."""
        ...


class VideoTracker(Model, Protocol):
    """A checkpoint that follows objects through video (`role` is "video_tracker")."""

    role: ClassVar[Role]
    video_abilities: ClassVar[frozenset[VideoAbility]]

    def start(self, height: int, width: int, phrases: Sequence[str] = ()) -> TrackingSession:
        """A new session for frames of this size; `phrases` for text trackers (what to find)."""
        ...

    def prepare(self, frame: np.ndarray) -> Any:
        """CPU work for one frame (resize, normalise), done before the device step."""
        ...


def boxes_of(masks: np.ndarray) -> np.ndarray:
    """(n, h, w) bool -> (n, 4) float32 xyxy of each mask's extent (zeros for an empty mask)."""
    boxes = np.zeros((len(masks), 4), dtype=np.float32)
    for index, mask in enumerate(masks):
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        if rows.size:
            boxes[index] = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
    return boxes


def empty_frame(height: int, width: int) -> TrackedFrame:
    """A frame on which nothing is followed."""
    return TrackedFrame([], [], np.zeros((0, height, width), dtype=bool), np.zeros((0, 4), dtype=np.float32))


def nested_tensor_bytes(value: object) -> int:
    """Bytes of every tensor reachable through dicts, lists, tuples and sets (a session's state)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, dict):
        return sum(nested_tensor_bytes(v) for v in value.values())
    if isinstance(value, list | tuple | set):
        return sum(nested_tensor_bytes(v) for v in value)
    return 0
