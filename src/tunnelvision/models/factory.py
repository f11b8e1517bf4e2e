"""Settings -> model replicas. `--demo` swaps in tiny random checkpoints written once."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from tunnelvision import __version__
from tunnelvision.config import Settings
from tunnelvision.engine.backend import Backend
from tunnelvision.models.grounded_sam import GroundedSam
from tunnelvision.models.simulated import SimulatedBackend

log = logging.getLogger(__name__)

DEMO_WARNING = (
    "DEMO MODE: serving tiny RANDOM-WEIGHT models. Detections and masks are meaningless; "
    "use --detector/--segmenter with real weights for real results."
)


def build_backends(settings: Settings) -> list[Backend]:
    if settings.backend == "simulated":
        log.warning("SIMULATED device: sleeps instead of models; for benchmarks only")
        return [SimulatedBackend(settings.simulated_batch_ms, settings.simulated_item_ms)]
    _quiet_transformers()
    detector, segmenter = settings.detector, settings.segmenter
    if settings.demo:
        log.warning(DEMO_WARNING)
        folder = demo_models_folder()
        detector, segmenter = str(folder / "detector"), str(folder / "segmenter")
    # One model copy and one device worker per device; the scheduler feeds whichever is free.
    return [
        GroundedSam(
            detector,
            segmenter,
            device,
            settings.dtype,
            settings.sam_chunk_size,
            settings.cache_bytes,
            settings.attention,
            settings.compile,
        )
        for device in settings.device_list
    ]


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
