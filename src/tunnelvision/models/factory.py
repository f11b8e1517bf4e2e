"""Settings -> one DeviceBackend per device, holding every configured pipeline.

Each model's family is read from its checkpoint's config before any weights load, so a wrong
spec fails in seconds. A model used by several pipelines of one device is loaded once.
`--demo` swaps in tiny random checkpoints (written once) for the grounded-sam pipeline.
`replace_pipeline` loads one pipeline afresh beside the served ones, for a reload.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tunnelvision import __version__
from tunnelvision.config import GROUNDED_SAM, PipelineSpec, Settings
from tunnelvision.engine.backend import Ability, Backend, ModelPart, PipelineSummary
from tunnelvision.engine.pipeline import Cached, ComposedPipeline, ConceptPipeline, DeviceBackend, Pipeline
from tunnelvision.engine.reload import Swap
from tunnelvision.engine.video import VideoPipeline
from tunnelvision.errors import ModelUnavailable, ReloadFailed
from tunnelvision.models.loading import (
    LoadOptions,
    ModelSource,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from tunnelvision.models.registry import family_class, model_type_of
from tunnelvision.models.simulated import SimulatedBackend

log = logging.getLogger(__name__)

DEMO_WARNING = (
    "DEMO MODE: serving tiny RANDOM-WEIGHT models. Detections and masks are meaningless; "
    "use --detector/--segmenter with real weights for real results."
)


@dataclass(frozen=True)
class Checkpoint:
    """A pipeline part, resolved: where from, its model_type and the class serving it."""

    source: ModelSource
    model_type: str
    cls: Any

    @property
    def role(self) -> str:
        return str(self.cls.role)


def build_backends(settings: Settings) -> list[Backend]:
    if settings.backend == "simulated":
        log.warning("SIMULATED device: sleeps instead of models; for benchmarks only")
        return [SimulatedBackend(settings.simulated_batch_ms, settings.simulated_item_ms)]
    _quiet_transformers()
    specs = served_pipelines(settings)
    resolved = [
        (spec, [resolve_checkpoint(part, flag_for(spec, i)) for i, part in enumerate(spec.parts)])
        for spec in specs
    ]
    for spec, parts in resolved:
        check_roles(spec.name, parts)
    options = load_options(settings)
    # One copy of each model per device, and one device worker each; the scheduler feeds whichever is free.
    return [
        build_device_backend(resolved, device, settings.dtype, options) for device in settings.device_list
    ]


def load_options(settings: Settings) -> LoadOptions:
    return LoadOptions(settings.attention, settings.compile, settings.sam_chunk_size, settings.cache_bytes)


def replace_pipeline(settings: Settings, spec: PipelineSpec, current: Sequence[Backend]) -> Swap:
    """For a reload: pipeline `spec.name` loaded afresh on each device of `current` (every part,
    even a source that did not change: its files may have), in new backends where the other
    pipelines keep their very model objects."""
    served = [backend for backend in current if isinstance(backend, DeviceBackend)]
    if len(served) != len(current):
        raise ReloadFailed("this server runs a simulated device: it has no weights to reload")
    _quiet_transformers()
    parts = [resolve_checkpoint(part, "pipeline") for part in spec.parts]
    check_roles(spec.name, parts)
    options = load_options(settings)
    fresh = [build_device_backend([(spec, parts)], b.device, b.info.dtype, options) for b in served]
    backends = [with_pipeline(old, new.pipelines[spec.name]) for old, new in zip(served, fresh, strict=True)]
    return Swap(backends, partial(clear_retired_caches, backends))


def with_pipeline(backend: DeviceBackend, pipeline: Pipeline) -> DeviceBackend:
    """The device's pipelines, `pipeline` in place of its namesake and the others unchanged."""
    name = pipeline.summary.name
    pipelines = [pipeline if p.summary.name == name else p for p in backend.pipelines.values()]
    return DeviceBackend(pipelines, backend.device, backend.info.dtype)


def clear_retired_caches(kept: Sequence[DeviceBackend], retired: Sequence[Backend]) -> None:
    """Empty the embedding caches of retired models; a model the kept backends still use (shared
    with another pipeline) keeps its cache."""
    in_use = {id(cache) for backend in kept for cache in caches_of(backend)}
    for backend in retired:
        if isinstance(backend, DeviceBackend):
            for cache in caches_of(backend):
                if id(cache) not in in_use:
                    cache.clear_cache()


def caches_of(backend: DeviceBackend) -> list[Cached]:
    return [cache for pipeline in backend.pipelines.values() for cache in pipeline.caches()]


def served_pipelines(settings: Settings) -> list[PipelineSpec]:
    specs = settings.pipelines
    if not settings.demo:
        return specs
    log.warning(DEMO_WARNING)
    folder = demo_models_folder()
    demo = PipelineSpec(GROUNDED_SAM, (str(folder / "detector"), str(folder / "segmenter")))
    return [demo if spec.name == GROUNDED_SAM else spec for spec in specs]


def flag_for(spec: PipelineSpec, index: int) -> str:
    """The flag that gave this part, for messages: --detector/--segmenter, or --pipeline."""
    return ("detector", "segmenter")[index] if spec.name == GROUNDED_SAM else "pipeline"


def resolve_checkpoint(part: str, flag: str) -> Checkpoint:
    source = resolve_source(part, flag)
    model_type = model_type_of(source)
    return Checkpoint(source, model_type, family_class(model_type, part))


def check_roles(name: str, parts: list[Checkpoint]) -> None:
    """DETECTOR+SEGMENTER or DETECTOR+VIDEO_TRACKER in that order, or one model alone."""
    roles = [p.role for p in parts]
    if len(parts) == 2 and roles not in (["detector", "segmenter"], ["detector", "video_tracker"]):
        described = " + ".join(f"'{p.source.source}' ({p.model_type}, a {p.role})" for p in parts)
        raise ModelUnavailable(
            f"pipeline '{name}': {described}; a pair must be DETECTOR+SEGMENTER or DETECTOR+VIDEO_TRACKER"
        )
    if len(parts) == 1 and roles[0] not in ("detector", "segmenter", "concept_segmenter", "video_tracker"):
        raise ModelUnavailable(f"pipeline '{name}': no pipeline runs a {roles[0]} yet")


def build_device_backend(
    resolved: list[tuple[PipelineSpec, list[Checkpoint]]],
    device_name: str,
    dtype_name: str,
    options: LoadOptions,
) -> DeviceBackend:
    device = resolve_device(device_name)
    dtype = resolve_dtype(dtype_name, device)
    loaded: dict[str, Any] = {}  # location -> the model on this device

    def load(part: Checkpoint) -> Any:
        if part.source.location not in loaded:
            log.info("loading %s '%s' (%s) on %s", part.role, part.source.source, part.model_type, device)
            loaded[part.source.location] = part.cls(part.source, device, dtype, options)
        return loaded[part.source.location]

    pipelines: list[Pipeline] = []
    for spec, parts in resolved:
        models = {part.role: load(part) for part in parts}
        cards = tuple(
            ModelPart(part.role, part.source.source, part.model_type, str(device), dtype_name)
            for part in parts
        )
        if "concept_segmenter" in models:  # one model that finds and cuts: SAM 3
            pipelines.append(ConceptPipeline(spec.name, models["concept_segmenter"], cards))
            continue
        if "video_tracker" in models:  # /v1/videos; with a detector: Grounded-SAM-2 style
            pipelines.append(
                video_pipeline(spec.name, models["video_tracker"], models.get("detector"), cards)
            )
            continue
        pipelines.append(ComposedPipeline(spec.name, models.get("detector"), models.get("segmenter"), cards))
    return DeviceBackend(pipelines, str(device), dtype_name)


def video_pipeline(name: str, tracker: Any, detector: Any, cards: tuple[ModelPart, ...]) -> VideoPipeline:
    """A tracker follows what it is given; a detector before it lets it follow text prompts."""
    abilities: set[Ability] = set(tracker.video_abilities)
    if detector is not None:
        abilities.add("video-text")
    return VideoPipeline(name, tracker, detector, PipelineSummary(name, frozenset(abilities), cards))


def demo_models_folder() -> Path:
    """Tiny random models under the user's cache, written once (atomically) per version."""
    from tunnelvision.models.random import write_random_models

    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunnelvision"
    target = cache / f"demo-models-{__version__}"
    if (target / "segmenter" / "config.json").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix="demo-", dir=cache))
    write_random_models(staging, "tiny")
    try:
        staging.rename(target)
    except OSError:  # another process won the race; use theirs
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _quiet_transformers() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
