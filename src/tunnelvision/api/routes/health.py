"""Liveness, readiness and model info. None of these touches a model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from tunnelvision.api.deps import DOCUMENTED_AUTH, StateDep
from tunnelvision.schemas import ErrorResponse, ModelInfo, ModelsResponse

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers (instant, even during inference)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: models loaded, warmed up, worker alive",
    responses={503: {"model": ErrorResponse, "description": "not ready, with the reason"}},
)
async def readyz(state: StateDep) -> JSONResponse:
    reason = state.not_ready_reason()
    body: dict[str, Any] = {"phase": state.phase, "queue": state.stats()}
    if reason is None:
        return JSONResponse({"status": "ready", **body})
    error = {"code": "not_ready", "message": f"not ready: {reason}"}
    return JSONResponse({"error": error, **body}, status_code=503, headers={"Retry-After": "5"})


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    summary="The models being served",
    dependencies=DOCUMENTED_AUTH,
)
async def models(state: StateDep) -> ModelsResponse:
    info = state.ready_engine().info
    return ModelsResponse(
        detector=ModelInfo(id=info.detector, device=info.device, dtype=info.dtype),
        segmenter=ModelInfo(id=info.segmenter, device=info.device, dtype=info.dtype),
        demo=state.settings.demo,
    )
