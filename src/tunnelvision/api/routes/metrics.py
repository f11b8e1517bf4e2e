"""/metrics in the Prometheus text format (protected unless --public-metrics)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tunnelvision.api.deps import DOCUMENTED_AUTH, StateDep
from tunnelvision.api.openapi import error_responses

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    dependencies=DOCUMENTED_AUTH,
    responses={200: {"content": {"text/plain": {}}}, **error_responses()},
)
async def metrics(state: StateDep) -> Response:
    return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)
