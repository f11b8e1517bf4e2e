"""What the engine needs from a model backend: three steps, so device time is only device work."""

from __future__ import annotations

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
    """`prepare` and `finish` run in the CPU pool, `run` on the device worker only.

    `params` is a DetectParams for /v1/detect and a SegmentParams for /v1/segment.
    """

    info: BackendInfo

    def prepare(self, image: RGBImage, params: DetectParams) -> Any: ...

    def run(self, prepared: Any, params: DetectParams) -> Any: ...

    def finish(self, raw: Any, params: DetectParams, prepared: Any) -> list[Detection]: ...
