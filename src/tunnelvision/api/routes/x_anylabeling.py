"""X-AnyLabeling's remote-server protocol under /x-anylabeling: its desktop client's
"Remote-Server" model points at `https://HOST/x-anylabeling` with our key (sent as `Token`).

Errors are answered with their real status (4xx/5xx) and `{"success": false, "error": {...}}`:
the client raises on any status >= 400 and shows "Remote server error: 422 Client Error ..."
in its status bar, whereas X-AnyLabeling-Server's `200 + success: false` shows nothing at all.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from tunnelvision.api.deps import OwnerDep, SettingsDep, StateDep
from tunnelvision.api.errors import headers_for, request_id, status_for
from tunnelvision.api.guard import X_ANYLABELING_PREFIX
from tunnelvision.api.openapi import PREDICT_ERRORS, error_responses
from tunnelvision.api.parsing import validate_params
from tunnelvision.api.routes.predict import until_disconnected
from tunnelvision.api.routes.roboflow import read_body
from tunnelvision.api.wire import json_body
from tunnelvision.api.wire import x_anylabeling as wire
from tunnelvision.engine.engine import Engine
from tunnelvision.errors import TunnelvisionError
from tunnelvision.imaging import decode_base64
from tunnelvision.schemas import DetectParams, SegmentParams

router = APIRouter(prefix=X_ANYLABELING_PREFIX, tags=["x-anylabeling"])


def failure(request: Request, exc: TunnelvisionError) -> JSONResponse:
    error = {"code": exc.code, "message": exc.message, "request_id": request_id(request)}
    body = {"success": False, "error": error}
    return JSONResponse(body, status_code=status_for(exc), headers=headers_for(exc) or None)


def success(data: Any) -> dict[str, Any]:
    return {"success": True, "data": data}


@router.get(
    "/health",
    summary="X-AnyLabeling: is the server up (no key needed)",
    responses={503: {"description": "models loading, failed or shutting down; Retry-After"}},
)
async def health(state: StateDep) -> JSONResponse:
    ready = state.not_ready_reason() is None and state.engine is not None
    body = {
        "status": "healthy" if ready else "unavailable",
        "models_loaded": len(state.engine.info.pipelines) if ready and state.engine else 0,
        "timestamp": datetime.now(timezone.utc).isoformat().replace("+00:00", "Z"),
    }
    return JSONResponse(
        body, status_code=200 if ready else 503, headers=None if ready else {"Retry-After": "5"}
    )


@router.get(
    "/v1/models",
    summary="X-AnyLabeling: the models (our pipelines) and their panel widgets",
    responses=error_responses(503),
)
async def models(request: Request, state: StateDep) -> JSONResponse:
    try:
        engine = state.ready_engine()
    except TunnelvisionError as exc:
        return failure(request, exc)
    return JSONResponse(success(wire.model_list(engine.info.pipelines)))


@router.get(
    "/v1/models/{model_id}/info",
    summary="X-AnyLabeling: one model",
    responses=error_responses(404, 503),
)
async def model_info(request: Request, model_id: str, state: StateDep) -> JSONResponse:
    try:
        pipeline = state.ready_engine().served_pipeline(model_id)
    except TunnelvisionError as exc:
        return failure(request, exc)
    return JSONResponse(success({"model_id": pipeline.name, **wire.model_entry(pipeline)}))


@router.post(
    "/v1/predict",
    summary="X-AnyLabeling: shapes for a text prompt or for point/rectangle marks",
    responses=PREDICT_ERRORS,
    openapi_extra=json_body(wire.PredictRequest),
)
async def predict(request: Request, state: StateDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    started = time.monotonic()
    try:
        engine = state.ready_engine()
        # The body first: the watcher for the client leaving reads from the same stream.
        body = await read_body(request, wire.PredictRequest)
        data = await until_disconnected(request, _predict(body, engine, settings.max_body_bytes, owner))
    except TunnelvisionError as exc:
        return failure(request, exc)
    request.state.timings_ms = {"total": round((time.monotonic() - started) * 1000, 2)}
    return JSONResponse(success(data))


async def _predict(body: wire.PredictRequest, engine: Engine, max_bytes: int, owner: str) -> dict[str, Any]:
    pipeline = engine.info.pipeline(body.model)  # UnknownModel (422) names those served
    fields = wire.engine_fields(body, pipeline)
    image = await run_in_threadpool(decode_base64, body.image, max_bytes)
    detections: list[Any]
    if "masks" in pipeline.abilities:
        detections = (await engine.segment(image, validate_params(SegmentParams, fields), owner)).detections
    else:
        detections = (await engine.detect(image, validate_params(DetectParams, fields), owner)).detections
    return await run_in_threadpool(wire.predict_data, detections, body.params.epsilon_factor)
