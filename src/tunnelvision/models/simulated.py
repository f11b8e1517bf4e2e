"""A simulated device for benchmarks: sleeps (the GIL released) a fixed cost per pass plus a small
cost per item, so the scheduler can be measured without model noise. Outputs are placeholders.

A prompt holding the word SIMULATED_DEVICE_LOSS makes the pass fail as a lost CUDA device does,
so the server's reaction (fail the waiters, exit for a restart) can be tried end to end."""

from __future__ import annotations

import time
from collections.abc import Hashable
from typing import Any

from tunnelvision.engine.backend import BackendInfo, Check, no_deadline
from tunnelvision.imaging import RGBImage
from tunnelvision.schemas import Detection, DetectParams, Segmentation, SegmentParams

SIMULATED_DEVICE_LOSS = "simulate-cuda-error"


class SimulatedBackend:
    def __init__(self, batch_ms: float = 40.0, item_ms: float = 5.0) -> None:
        self.batch_s, self.item_s = batch_ms / 1000, item_ms / 1000
        self.info = BackendInfo("simulated", "simulated", "simulated", "float32")

    def prepare(
        self, image: RGBImage, params: DetectParams, image_id: str = "", check: Check = no_deadline
    ) -> tuple[int, int]:
        return int(image.shape[0]), int(image.shape[1])

    def batch_key(self, prepared: Any, params: DetectParams) -> Hashable:
        return "simulated"

    def run_batch(self, items: list[tuple[Any, DetectParams]]) -> list[Any]:
        time.sleep(self.batch_s + self.item_s * len(items))
        if any(SIMULATED_DEVICE_LOSS in params.phrases for _, params in items):
            raise RuntimeError("CUDA error: an illegal memory access was encountered (simulated)")
        return [prepared for prepared, _ in items]

    def run(self, prepared: Any, params: DetectParams) -> Any:
        return self.run_batch([(prepared, params)])[0]

    def finish(
        self, raw: tuple[int, int], params: DetectParams, prepared: Any, check: Check = no_deadline
    ) -> list[Detection]:
        height, width = raw
        box = [0.0, 0.0, float(width), float(height)]
        label = params.phrases[0] if params.phrases else None
        if isinstance(params, SegmentParams):
            return [Segmentation(label=label, score=0.5, box=box, mask=None, mask_score=0.5)]
        return [Detection(label=label, score=0.5, box=box)]

    def cache_stats(self) -> dict[str, int]:
        return {}

    def device_steps(self, prepared: Any) -> dict[str, float]:
        return {}
