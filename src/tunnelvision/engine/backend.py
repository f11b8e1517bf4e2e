"""What the engine needs from a model backend: three steps, so device time is only device work."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from tunnelvision.errors import DeadlineExceeded, UnknownModel, UnsupportedPrompt
from tunnelvision.imaging import RGBImage
from tunnelvision.schemas import Detection, DetectParams, SegmentParams

# What a pipeline can be asked: text prompts, box or point prompts, exemplar boxes, and masks
# (a detector alone answers boxes only).
# Video pipelines (/v1/videos) follow objects given by text, boxes or points through a clip.
Ability = Literal[
    "text", "boxes", "points", "exemplars", "masks", "video-text", "video-boxes", "video-points"
]
ABILITY_WORDS: dict[str, str] = {
    "text": "text prompts",
    "boxes": "box prompts",
    "points": "point prompts",
    "exemplars": "exemplar boxes",
    "masks": "masks (/v1/segment, /v1/annotate, jobs)",
    "video-text": "text prompts through video (/v1/videos)",
    "video-boxes": "box prompts through video (/v1/videos)",
    "video-points": "point prompts through video (/v1/videos)",
}
DEFAULT_PIPELINE = "grounded-sam"

# Called by `prepare` and `finish` between units of work: raises DeadlineExceeded once the
# request's deadline has passed, so CPU work for an answer nobody will get stops early.
Check = Callable[[], None]


def no_deadline() -> None:
    """The Check for callers without a deadline (tests, benchmarks)."""


@dataclass(frozen=True)
class Deadline:
    """When a request must be answered (time.monotonic()), and the budget it was given."""

    at: float
    budget_s: float

    @classmethod
    def after(cls, budget_s: float, start: float | None = None) -> Deadline:
        return cls((time.monotonic() if start is None else start) + budget_s, budget_s)

    @property
    def started(self) -> float:
        return self.at - self.budget_s

    def remaining(self) -> float:
        return max(0.0, self.at - time.monotonic())

    def check(self) -> None:
        if time.monotonic() >= self.at:
            raise self.exceeded()

    def exceeded(self) -> DeadlineExceeded:
        return DeadlineExceeded(f"no result within the {self.budget_s:g} s deadline")


@dataclass(frozen=True)
class ModelPart:
    """One model of a pipeline, as /v1/models shows it."""

    role: str  # detector, segmenter, concept_segmenter
    source: str  # the hub id or folder it was loaded from
    family: str  # the model_type family serving it
    device: str
    dtype: str


@dataclass(frozen=True)
class PipelineSummary:
    name: str
    abilities: frozenset[Ability]
    models: tuple[ModelPart, ...]

    def check(self, params: DetectParams) -> None:
        """UnsupportedPrompt naming what this pipeline can do, if it cannot answer `params`."""
        missing = [a for a in needed_abilities(params) if a not in self.abilities]
        if missing:
            can = ", ".join(ABILITY_WORDS[a] for a in sorted(self.abilities)) or "nothing"
            raise UnsupportedPrompt(
                f"model '{self.name}' cannot take {' or '.join(ABILITY_WORDS[a] for a in missing)}; "
                f"it takes: {can}"
            )


def needed_abilities(params: DetectParams) -> list[Ability]:
    needs: list[Ability] = []
    if params.phrases:
        needs.append("text")
    if params.exemplars:
        needs.append("exemplars")
    if isinstance(params, SegmentParams):
        needs += ["boxes"] if params.boxes else []
        needs += ["points"] if params.points else []
        needs.append("masks")
    return needs


@dataclass(frozen=True)
class BackendInfo:
    """What one device serves. `pipelines` empty: one Grounded-SAM pipeline named after
    `detector` and `segmenter` (test and simulated backends describe themselves that way)."""

    detector: str
    segmenter: str
    device: str
    dtype: str
    pipelines: tuple[PipelineSummary, ...] = ()

    def __post_init__(self) -> None:
        if not self.pipelines:
            parts = (
                ModelPart("detector", self.detector, self.detector, self.device, self.dtype),
                ModelPart("segmenter", self.segmenter, self.segmenter, self.device, self.dtype),
            )
            abilities: frozenset[Ability] = frozenset({"text", "boxes", "points", "masks"})
            object.__setattr__(self, "pipelines", (PipelineSummary(DEFAULT_PIPELINE, abilities, parts),))

    @property
    def default(self) -> str:
        return self.pipelines[0].name

    def pipeline(self, name: str | None) -> PipelineSummary:
        """The pipeline a request names (`model`; None: the default), or UnknownModel."""
        for pipeline in self.pipelines:
            if name is None or pipeline.name == name:
                return pipeline
        known = ", ".join(p.name for p in self.pipelines)
        raise UnknownModel(f"no model '{name}' here; this server serves: {known}")


class Backend(Protocol):
    """`prepare` and `finish` run in the CPU pool; `run_batch` on the device worker only.

    `params` is a DetectParams for /v1/detect and a SegmentParams for /v1/segment. `image_id`
    names the image for its sender (see Engine), so device results may be cached by it.
    `check` is called between units of CPU work (a Check).
    """

    info: BackendInfo

    def prepare(
        self, image: RGBImage, params: DetectParams, image_id: str = "", check: Check = no_deadline
    ) -> Any: ...

    def batch_key(self, prepared: Any, params: DetectParams) -> Hashable | None:
        """Items with equal keys may share one device pass; None: always alone."""
        ...

    def run_batch(self, items: list[tuple[Any, DetectParams]]) -> list[Any]:
        """One result per item, in order; an exception instance fails that item only."""
        ...

    def finish(
        self, raw: Any, params: DetectParams, prepared: Any, check: Check = no_deadline
    ) -> list[Detection]: ...

    def cache_stats(self) -> dict[str, int]: ...

    def device_steps(self, prepared: Any) -> dict[str, float]:
        """Extra timings of this item's device pass, e.g. `encode` when the image encoder ran for
        it (absent when its embedding came from the cache)."""
        ...


# After these CUDA errors the device's context is broken until the process restarts (unlike
# running out of memory, which the backend reports as DeviceOutOfMemory and recovers from).
DEVICE_LOST_MARKERS = (
    "cuda error",
    "device-side assert",
    "cudaerrorillegaladdress",
    "illegal memory access",
    "unspecified launch failure",
    "cublas_status_execution_failed",
    "cudnn_status_execution_failed",
)


def is_device_lost(exc: BaseException) -> bool:
    """A RuntimeError naming one of the errors above (torch raises them as RuntimeError)."""
    if not isinstance(exc, RuntimeError):
        return False
    text = str(exc).lower()
    return "out of memory" not in text and any(marker in text for marker in DEVICE_LOST_MARKERS)
