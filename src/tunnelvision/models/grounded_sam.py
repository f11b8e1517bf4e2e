"""Grounded-SAM on one device as one object: a detector (phrases -> boxes) and a segmenter
(boxes -> masks) as the single pipeline `grounded-sam`. For benchmarks and tests that want the
pair without Settings; the server builds its pipelines in models/factory.py."""

from __future__ import annotations

from tunnelvision.config import GROUNDED_SAM, PipelineSpec
from tunnelvision.engine.pipeline import DeviceBackend
from tunnelvision.models.factory import build_device_backend, check_roles, resolve_checkpoint
from tunnelvision.models.loading import LoadOptions


class GroundedSam(DeviceBackend):
    def __init__(
        self,
        detector: str,
        segmenter: str,
        device: str = "auto",
        dtype: str = "float32",
        sam_chunk_size: int = 64,
        cache_bytes: int = 0,
        attention: str = "sdpa",
        compile_encoder: bool = False,
    ) -> None:
        parts = [resolve_checkpoint(detector, "detector"), resolve_checkpoint(segmenter, "segmenter")]
        check_roles(GROUNDED_SAM, parts)
        options = LoadOptions(attention, compile_encoder, sam_chunk_size, cache_bytes)
        built = build_device_backend(
            [(PipelineSpec(GROUNDED_SAM, (detector, segmenter)), parts)], device, dtype, options
        )
        super().__init__(list(built.pipelines.values()), built.device, dtype)
