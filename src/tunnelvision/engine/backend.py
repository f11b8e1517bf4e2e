"""What the engine needs from a model backend: three steps, so device time is only device work."""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from tunnelvision.errors import DeadlineExceeded
from tunnelvision.imaging import RGBImage
from tunnelvision.schemas import Detection, DetectParams

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
class BackendInfo:
    detector: str
    segmenter: str
    device: str
    dtype: str


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
