"""What each model role does, in arrays: the contract between families and the engine.

Every role has three steps: `prepare` (CPU: resize, normalise, tokenize), a device step that takes
a batch of prepared items with equal `batch_key`s, and, for segmenters, a step that turns low-res
masks into full-size ones. Families answer in tensors; labels, rounding and mask encoding are the
engine's business (engine/results.py), so no family imports the wire schemas.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, Protocol

import numpy as np
import torch

from tunnelvision.engine.backend import Check, no_deadline
from tunnelvision.imaging import RGBImage

Role = Literal["detector", "segmenter", "concept_segmenter"]
BoolMask = np.ndarray  # (height, width) bool, full size


@dataclass
class Boxes:
    """Candidate boxes for a text prompt, before thresholds and NMS (the engine applies those)."""

    boxes: torch.Tensor  # (n, 4) xyxy in original pixels
    scores: torch.Tensor  # (n,)
    phrase_ids: torch.Tensor  # (n,) index into the request's phrases


@dataclass
class Masks:
    """One mask per prompt (a box, or the whole point set), before upscaling."""

    low_res: torch.Tensor  # (n, h, w) logits in the segmenter's own frame
    scores: torch.Tensor  # (n,) the segmenter's predicted IoU
    # (n, height, width) bool at the original size, when the segmenter upscaled on the device
    # (then the CPU only encodes); None: the engine calls `upscale` per mask in the finish step.
    full: torch.Tensor | None = None


@dataclass
class SegmentPrompt:
    """Boxes (n, 4) in original pixels, or points (n, 2) with labels (n,) (1 object, 0 background)."""

    boxes: torch.Tensor | None = None
    points: torch.Tensor | None = None
    point_labels: torch.Tensor | None = None
    multimask: bool = False


@dataclass
class Instances:
    """What a pipeline found: boxes with their scores and phrase, and masks where it makes them.
    `scores`/`phrase_ids` are None for box/point prompts (nothing was detected)."""

    boxes: torch.Tensor
    scores: torch.Tensor | None = None
    phrase_ids: torch.Tensor | None = None
    masks: Masks | None = None


class Model(Protocol):
    """What every family has: where it came from and where it runs (for /v1/models)."""

    role: ClassVar[Role]
    family: ClassVar[str]
    source: str
    device: torch.device
    dtype: torch.dtype

    def memory_allocated(self) -> int | None: ...


class Detector(Model, Protocol):
    """Image + phrases -> candidate boxes, scores and phrase ids."""

    def prepare(self, image: RGBImage, phrases: list[str], check: Check = no_deadline) -> Any: ...

    def batch_key(self, prepared: Any) -> Hashable:
        """Prepared items with equal keys give the same answers batched as one by one."""
        ...

    def detect_batch(self, prepared: list[Any]) -> list[Boxes]: ...


class Segmenter(Model, Protocol):
    """Image + boxes/points -> masks and mask scores; the image embedding is cached by image_id."""

    def prepare(self, image: RGBImage, image_id: str = "", check: Check = no_deadline) -> Any: ...

    def batch_key(self, prepared: Any) -> Hashable: ...

    def segment_batch(self, items: list[tuple[Any, SegmentPrompt]]) -> list[Masks]: ...

    def upscale(self, low_res: torch.Tensor, prepared: Any) -> BoolMask:
        """One low-res mask as a full-size bool mask of the original image."""
        ...

    def cache_stats(self) -> dict[str, int]: ...

    def clear_cache(self) -> None: ...


class ConceptSegmenter(Model, Protocol):
    """Image + phrases and/or exemplar boxes -> every instance with its box, score and mask."""

    def prepare(
        self,
        image: RGBImage,
        phrases: list[str],
        exemplars: list[tuple[list[float], int]],
        image_id: str = "",
        check: Check = no_deadline,
    ) -> Any: ...

    def batch_key(self, prepared: Any) -> Hashable: ...

    def find_batch(self, prepared: list[Any]) -> list[Instances]: ...

    def upscale(self, low_res: torch.Tensor, prepared: Any) -> BoolMask: ...

    def cache_stats(self) -> dict[str, int]: ...

    def clear_cache(self) -> None: ...
