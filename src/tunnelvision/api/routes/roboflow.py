"""Roboflow Inference's routes (`/sam2/...`, `/sam3/...`, `/grounding_dino/infer`), so
inference-sdk's InferenceHTTPClient works against this server unchanged."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(tags=["roboflow"])
