"""Replacing a pipeline's weights while serving (admin scope; the guard's SCOPE_RULES say so)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body

from tunnelvision.api.deps import DOCUMENTED_AUTH, StateDep
from tunnelvision.api.openapi import error_responses
from tunnelvision.api.routes.health import served_pipeline_info
from tunnelvision.schemas import ErrorResponse, ReloadRequest, ReloadResponse

router = APIRouter(tags=["models"])

RELOAD_ERRORS: dict[int | str, dict[str, Any]] = error_responses(400, 503) | {
    404: {"model": ErrorResponse, "description": "no pipeline of that name (the message lists them)"},
    409: {"model": ErrorResponse, "description": "another reload is under way (reload_in_progress)"},
    422: {
        "model": ErrorResponse,
        "description": "a body or SPEC that cannot be parsed (invalid_input), or new weights that "
        "failed to load or warm up (reload_failed, with the loader's reason): the old copy serves on",
    },
}


@router.post(
    "/v1/models/{name}/reload",
    response_model=ReloadResponse,
    summary="Load new weights for a pipeline and switch to them with no downtime",
    description=(
        "Loads the pipeline's models anew (from `source`, or from its current sources again) "
        "beside the old ones on every device, warms them up with one pass, then switches: new "
        "requests go to the new copy, requests already under way finish on the old one, which is "
        "then freed (models shared with other pipelines stay). Other requests, /healthz and "
        "/readyz are served throughout. One reload at a time. Needs the `admin` scope."
    ),
    dependencies=DOCUMENTED_AUTH,
    responses=RELOAD_ERRORS,
)
async def reload_model(
    name: str, state: StateDep, body: Annotated[ReloadRequest | None, Body()] = None
) -> ReloadResponse:
    reloaded = await state.reload(name, body.source if body is not None else None)
    return ReloadResponse(
        pipeline=served_pipeline_info(state.ready_engine(), name),
        load_s=round(reloaded.load_s, 3),
        warmup_s=round(reloaded.warmup_s, 3),
        drained=reloaded.drained,
    )
