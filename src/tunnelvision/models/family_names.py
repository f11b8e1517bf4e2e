"""Names of the model families `tunnelvision models random --family` writes. Torch-free, so the
CLI can list them on a base install (the code that writes them needs the server's packages)."""

from __future__ import annotations

RANDOM_FAMILIES = (
    "grounding-dino",
    "mm-grounding-dino",
    "owlv2",
    "sam",
    "sam2",
    "sam3",
    "sam2-video",
    "sam3-tracker-video",
    "sam3-video",
)
