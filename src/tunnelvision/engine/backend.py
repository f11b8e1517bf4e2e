"""What the engine needs from a model backend: three steps, so device time is only device work."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol

from tunnelvision.imaging import RGBImage
from tunnelvision.schemas import Detection, DetectParams


@dataclass(frozen=True)
class BackendInfo:
    detector: str
    segmenter: str
    device: str
    dtype: str


class Backend(Protocol):
    """`prepare` and `finish` run in the CPU pool; `run_batch` on the device worker only.

    `params` is a DetectParams for /v1/detect and a SegmentParams for /v1/segment. `image_id`
    identifies the image's content (a hash), so device results may be cached by it.
    """

    info: BackendInfo

    def prepare(self, image: RGBImage, params: DetectParams, image_id: str) -> Any: ...

    def batch_key(self, prepared: Any, params: DetectParams) -> Hashable | None:
        """Items with equal keys may share one device pass; None: always alone."""
        ...

    def run_batch(self, items: list[tuple[Any, DetectParams]]) -> list[Any]:
        """One result per item, in order; an exception instance fails that item only."""
        ...

    def finish(self, raw: Any, params: DetectParams, prepared: Any) -> list[Detection]: ...

    def cache_stats(self) -> dict[str, int]: ...
