"""/v1/detect and /v1/segment: parse, hand to the engine, stop if the client leaves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from tunnelvision.api.deps import DOCUMENTED_AUTH, OwnerDep, SettingsDep, StateDep
from tunnelvision.api.errors import ClientDisconnected
from tunnelvision.api.openapi import PREDICT_ERRORS, request_body
from tunnelvision.api.parsing import read_prediction_request
from tunnelvision.engine.engine import Annotation, Engine
from tunnelvision.schemas import (
    AnnotateJSONRequest,
    AnnotateParams,
    DetectJSONRequest,
    DetectParams,
    DetectRequestParams,
    DetectResponse,
    SegmentJSONRequest,
    SegmentParams,
    SegmentResponse,
)

router = APIRouter(prefix="/v1", tags=["predict"], dependencies=DOCUMENTED_AUTH)
T = TypeVar("T")


def add_prediction_route(
    path: str,
    summary: str,
    params_model: type[DetectParams],
    json_model: type[BaseModel],
    response_model: type[BaseModel] | None,
    run: Callable[[Engine, bytes | None, Any, str], Coroutine[Any, Any, Any]],
    respond: Callable[[Any], Awaitable[Response]],
    responses: dict[int | str, dict[str, Any]] | None = None,
) -> None:
    async def predict(request: Request, state: StateDep, settings: SettingsDep, owner: OwnerDep) -> Response:
        engine = state.ready_engine()
        image, params = await read_prediction_request(request, params_model, settings.max_body_bytes)
        # The owner scopes `image_id`: one key never reaches another's cached images.
        result = await until_disconnected(request, run(engine, image, params, owner))
        request.state.timings_ms = getattr(result, "timings_ms", {})  # for the access log
        return await respond(result)

    router.add_api_route(
        path,
        predict,
        methods=["POST"],
        name=path.strip("/"),
        summary=summary,
        response_model=response_model,
        responses={**PREDICT_ERRORS, **(responses or {})},
        openapi_extra=request_body(params_model, json_model),
    )


async def image_response(annotation: Annotation) -> Response:
    headers = {"X-Image-Id": annotation.image_id, "X-Detections": str(annotation.detections)}
    return Response(annotation.content, media_type=annotation.media_type, headers=headers)


async def until_disconnected(request: Request, work: Coroutine[Any, Any, T]) -> T:
    """Starlette does not cancel a handler whose client left: watch for it and cancel the work,
    so a request still queued never reaches the device."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        raise ClientDisconnected("client disconnected")
    return task.result()


async def _wait_for_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def json_response(model: BaseModel) -> Response:
    """Serialise off the event loop: mask payloads can be megabytes."""
    body = await run_in_threadpool(model.model_dump_json)
    return Response(body, media_type="application/json")


add_prediction_route(
    "/detect",
    "Boxes for a text prompt and/or exemplar boxes (the pipeline's detector or concept model)",
    DetectRequestParams,
    DetectJSONRequest,
    DetectResponse,
    Engine.detect,
    json_response,
)
add_prediction_route(
    "/segment",
    "Masks from a text prompt and/or exemplars (detector + segmenter, or a concept model like SAM 3), "
    "from boxes or from points (segmenter)",
    SegmentParams,
    SegmentJSONRequest,
    SegmentResponse,
    Engine.segment,
    json_response,
)
add_prediction_route(
    "/annotate",
    "The image with masks, boxes, labels and scores drawn on it (the inputs of /v1/segment)",
    AnnotateParams,
    AnnotateJSONRequest,
    None,
    Engine.annotate,
    image_response,
    {200: {"content": {"image/png": {}, "image/jpeg": {}}, "description": "the annotated image"}},
)
