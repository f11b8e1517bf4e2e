"""model_type (from the checkpoint's own config) -> the family that serves it.

A new family is one module with a class following a role in models/roles.py, plus one line in
FAMILIES. Modules are imported only when a checkpoint of theirs is loaded.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnelvision.errors import ModelUnavailable
from tunnelvision.models.loading import ModelSource


@dataclass(frozen=True)
class FamilyRef:
    module: str  # under tunnelvision.models
    cls: str


FAMILIES: dict[str, FamilyRef] = {
    "grounding-dino": FamilyRef("grounding_dino", "GroundingDino"),
    "mm-grounding-dino": FamilyRef("grounding_dino", "GroundingDino"),  # MM-Grounding-DINO, LLMDet
    "sam": FamilyRef("sam", "Sam"),
    "sam2": FamilyRef("sam2", "Sam2"),  # SAM 2 and SAM 2.1 checkpoints both say sam2
    "owlv2": FamilyRef("owlv2", "Owlv2"),
    "sam3": FamilyRef("sam3", "Sam3"),
    # video trackers (/v1/videos)
    "sam2_video": FamilyRef("sam2_video", "Sam2Video"),  # SAM 2 / 2.1 video: boxes, points
    "sam3_tracker_video": FamilyRef("sam2_video", "Sam3TrackerVideo"),  # SAM 3 tracker: boxes, points
    "sam3_video": FamilyRef("sam3_video", "Sam3Video"),  # SAM 3 video: text
}


def family_class(model_type: str, source: str) -> Any:
    """The class serving checkpoints of this model_type; ModelUnavailable naming the known ones."""
    ref = FAMILIES.get(model_type)
    if ref is None:
        known = ", ".join(sorted(FAMILIES))
        raise ModelUnavailable(
            f"'{source}' is a '{model_type}' checkpoint, which this server cannot serve; "
            f"known model types: {known}"
        )
    return getattr(importlib.import_module(f"tunnelvision.models.{ref.module}"), ref.cls)


def model_type_of(source: ModelSource) -> str:
    """`model_type` from config.json of a local folder, else through transformers (hub id or cache)."""
    config_file = Path(source.location) / "config.json"
    if config_file.is_file():
        return _model_type_in_file(config_file, source.source)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source.location, local_files_only=source.local_files_only)
    except (OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelUnavailable(f"cannot read the config of '{source.source}': {reason}") from exc
    return str(config.model_type)


def _model_type_in_file(path: Path, source: str) -> str:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelUnavailable(f"'{source}': config.json cannot be read as JSON ({exc})") from exc
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if not isinstance(model_type, str) or not model_type:
        raise ModelUnavailable(f"'{source}': config.json names no model_type; not a transformers checkpoint")
    return model_type
