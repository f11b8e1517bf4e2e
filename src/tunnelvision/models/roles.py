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

Role = Literal["detector", "segmenter", "concept_segmenter", "video_tracker"]
BoolMask = np.ndarray  # (height, width) bool, full size
Exemplar = tuple[list[float], int]  # ([x1, y1, x2, y2] in original pixels, 1 more like this / 0 not this)
EXEMPLAR_PHRASE = -1  # the phrase id of what exemplars alone found (it has no label)


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
        exemplars: list[Exemplar],
        image_id: str = "",
        check: Check = no_deadline,
    ) -> Any: ...

    def batch_key(self, prepared: Any) -> Hashable: ...

    # On a GPU the pipeline has the chosen masks upscaled there (`full_masks`), many at once.
    upscale_on_device: bool

    def find_batch(self, prepared: list[Any]) -> list[Instances]:
        """Every candidate instance (thresholds and NMS are the pipeline's), masks as low-res
        logits with the instance's score as mask score."""
        ...

    def full_masks(self, low_res: torch.Tensor, prepared: Any) -> torch.Tensor:
        """(n, h, w) logits -> (n, height, width) bool masks of the original image, on the CPU."""
        ...

    def upscale(self, low_res: torch.Tensor, prepared: Any) -> BoolMask: ...

    def cache_stats(self) -> dict[str, int]: ...

    def clear_cache(self) -> None: ...


class ExemplarDetector(Detector, Protocol):
    """A detector that also finds things like example boxes of the same image (OWLv2's
    image-guided mode). What exemplars alone find has the phrase id EXEMPLAR_PHRASE."""

    takes_exemplars: ClassVar[bool]

    def prepare_with_exemplars(
        self, image: RGBImage, phrases: list[str], exemplars: list[Exemplar], check: Check = no_deadline
    ) -> Any: ...
