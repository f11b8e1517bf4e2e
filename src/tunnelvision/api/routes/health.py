"""Liveness, readiness and model info. None of these touches a model."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from tunnelvision.api.deps import DOCUMENTED_AUTH, PrincipalDep, StateDep
from tunnelvision.api.errors import request_id
from tunnelvision.api.openapi import error_responses
from tunnelvision.api.state import AppState
from tunnelvision.engine.backend import PipelineSummary
from tunnelvision.engine.engine import Engine
from tunnelvision.engine.reload import Loaded
from tunnelvision.schemas import (
    ErrorResponse,
    ModelInfo,
    ModelsResponse,
    PipelineInfo,
    PipelineModel,
)

router = APIRouter(tags=["health"])

# Why not ready, in one word for anyone: the phase's own text can name files and exceptions.
PHASE_WORDS = {
    "starting": "starting",
    "loading models": "loading",
    "warming up": "warming_up",
    "shutting down": "shutting_down",
    "failed": "failed",
    "ready": "worker_stopped",  # ready, yet not: the device worker has gone
}
READYZ_RETRY_AFTER_S = "5"


@router.get("/healthz", summary="Liveness: the process answers (instant, even during inference)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Readiness: models loaded, warmed up, worker alive",
    description=(
        "Anyone gets `status` and, when not ready, a one-word `reason` (`starting`, `loading`, "
        "`warming_up`, `shutting_down`, `failed`, `worker_stopped`; in Ray mode also "
        "`no_replicas` and `cluster_unreachable`). A caller who sends a valid key or Access "
        "token also gets `phase`, `detail` (the full reason), `queue` (the scheduler's "
        "counters), `auth` (the policy and any problem with the keys file) and, in Ray mode, "
        "`ray` (cluster reachable, replicas by state, GPUs; a snapshot at most seconds old)."
    ),
    responses={
        200: {"description": "ready"},
        503: {"model": ErrorResponse, "description": "not ready, with the reason; Retry-After"},
    },
)
async def readyz(request: Request, state: StateDep, principal: PrincipalDep) -> JSONResponse:
    reason = state.not_ready_reason()
    word = None if reason is None else reason_word(state)
    ray = cluster_status(state)
    if reason is None and ray is not None:
        word, reason = cluster_not_ready(ray)
    body: dict[str, Any] = {"status": "ready"} if word is None else {"status": "not_ready", "reason": word}
    if principal is not None:
        body.update(readiness_detail(request, state, reason))
        if ray is not None:
            body["ray"] = ray
    if reason is None:
        return JSONResponse(body)
    message = f"not ready: {reason if principal is not None else word}"
    error = {"code": "not_ready", "message": message, "request_id": request_id(request)}
    return JSONResponse(
        {"error": error, **body}, status_code=503, headers={"Retry-After": READYZ_RETRY_AFTER_S}
    )


def reason_word(state: AppState) -> str:
    return PHASE_WORDS.get(state.phase, "not_ready")


def cluster_status(state: AppState) -> dict[str, Any] | None:
    """Ray mode's cluster snapshot, through a hook its backends have (so no Ray import here);
    None for local backends. The hook answers from a cache: it never blocks the loop."""
    if state.engine is None:
        return None
    for backend in state.engine.backends:
        hook = getattr(backend, "cluster_status", None)
        if callable(hook):
            status: dict[str, Any] | None = hook()
            return status
    return None


def cluster_not_ready(ray: dict[str, Any]) -> tuple[str | None, str | None]:
    """(word, reason) when the cluster cannot serve: unreachable, or no replica alive (Ray is
    restarting one); (None, None) when it can, or before its first answer."""
    if ray.get("reachable") is False:
        return "cluster_unreachable", f"the Ray cluster is not reachable: {ray.get('error', '')}"
    deployment = ray.get("deployment") or {}
    if ray.get("reachable") and not deployment.get("alive"):
        states = ", ".join(f"{n} {s}" for s, n in deployment.get("replicas", {}).items()) or "none"
        return "no_replicas", f"no model replica is alive (replicas: {states}); Ray replaces a lost one"
    return None, None


def readiness_detail(request: Request, state: AppState, reason: str | None) -> dict[str, Any]:
    """For authenticated callers only: exception text, file paths and counters."""
    return {
        "phase": state.phase,
        "detail": reason,
        "queue": state.stats(),
        "auth": request.scope.get("state", {}).get("auth_report"),
    }


@router.get(
    "/v1/models",
    response_model=ModelsResponse,
    summary="The pipelines being served: their models, sources, devices, dtypes and abilities",
    description=(
        "Requests choose a pipeline by its name in `model`; the one marked `default` serves the "
        "others. `abilities` says what each takes (text, boxes, points, exemplars) and whether it "
        "makes masks. `source`, `generation` and `loaded_at` say which weights serve and since "
        "when (a reload adds one to `generation`). `detector` and `segmenter` repeat the default "
        "pipeline's, for older clients."
    ),
    dependencies=DOCUMENTED_AUTH,
    responses=error_responses(503),
)
async def models(state: StateDep) -> ModelsResponse:
    engine = state.ready_engine()
    pipelines = [served_pipeline_info(engine, pipeline.name) for pipeline in engine.info.pipelines]
    default = pipelines[0].models
    return ModelsResponse(
        pipelines=pipelines,
        detector=_legacy(default, "detector"),
        segmenter=_legacy(default, "segmenter"),
        demo=state.settings.demo,
    )


def served_pipeline_info(engine: Engine, name: str) -> PipelineInfo:
    """Pipeline `name` as it serves now (for /v1/models and a reload's answer)."""
    devices = ",".join(dict.fromkeys(engine.devices))  # one copy of every model on each device
    return pipeline_info(
        engine.served_pipeline(name),
        name == engine.info.default,
        devices if len(engine.devices) > 1 else None,
        engine.loaded[name],
    )


def pipeline_info(
    pipeline: PipelineSummary, default: bool, devices: str | None, loaded: Loaded
) -> PipelineInfo:
    models = [
        PipelineModel(
            role=part.role,
            id=part.source,
            family=part.family,
            device=devices or part.device,
            dtype=part.dtype,
        )
        for part in pipeline.models
    ]
    return PipelineInfo(
        name=pipeline.name,
        default=default,
        abilities=sorted(pipeline.abilities),
        models=models,
        source="+".join(part.source for part in pipeline.models),
        generation=loaded.generation,
        loaded_at=loaded.at.isoformat(timespec="seconds"),
    )


def _legacy(models: list[PipelineModel], role: str) -> ModelInfo | None:
    part = next((m for m in models if m.role == role), None)
    return None if part is None else ModelInfo(id=part.id, device=part.device, dtype=part.dtype)
