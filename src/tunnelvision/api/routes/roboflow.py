"""Roboflow Inference's routes (`/sam2/...`, `/sam3/...`, `/grounding_dino/infer`), so
inference-sdk's InferenceHTTPClient works against this server unchanged.

Each route picks one of our pipelines (api/wire/roboflow.py `choose_pipeline`), turns the
request into engine calls and the answers into Roboflow's shapes. Errors are Roboflow's
`{"message": ...}` (what inference-sdk puts in its exception) beside our `{"error": {...}}`.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from tunnelvision.api.deps import DOCUMENTED_AUTH, OwnerDep, SettingsDep, StateDep
from tunnelvision.api.errors import headers_for, request_id, status_for
from tunnelvision.api.openapi import PREDICT_ERRORS
from tunnelvision.api.parsing import load_json, validate_params
from tunnelvision.api.routes.predict import until_disconnected
from tunnelvision.api.state import AppState
from tunnelvision.api.wire import json_body
from tunnelvision.api.wire import roboflow as wire
from tunnelvision.config import Settings
from tunnelvision.engine.backend import Ability
from tunnelvision.engine.engine import Engine
from tunnelvision.errors import InvalidImage, InvalidInput, NotFound, TunnelvisionError
from tunnelvision.schemas import DetectParams, Segmentation, SegmentParams, SegmentResponse

router = APIRouter(tags=["roboflow"], dependencies=DOCUMENTED_AUTH)
M = TypeVar("M", bound=BaseModel)
MAX_ALIASES = 4096  # image ids named by clients at /embed_image, per server


# -- plumbing shared by the routes -------------------------------------------------------------


async def read_body(request: Request, model: type[M]) -> M:
    """The JSON body as `model`. GuardMiddleware may have parsed it already (the key was in it)."""
    data = request.scope.get("state", {}).get("json_body")
    if data is None:
        body = await request.body()
        data = await run_in_threadpool(load_json, body, "the JSON body", "body is not valid JSON")
    if not isinstance(data, dict):
        raise InvalidInput("JSON body must be an object")
    return validate_params(model, data)


def roboflow_error(request: Request, exc: TunnelvisionError) -> JSONResponse:
    """Roboflow's `message` (read by inference-sdk) and our `error` object, with our status."""
    error = {"code": exc.code, "message": exc.message, "request_id": request_id(request)}
    body = {"message": exc.message, "error": error}
    return JSONResponse(body, status_code=status_for(exc), headers=headers_for(exc) or None)


async def answer(
    request: Request, model: type[M], work: Callable[[M], Coroutine[Any, Any, BaseModel]]
) -> Response:
    """Read the body as `model`, then run the route's work on it (cancelled if the client leaves:
    the body is read first, as the watcher for the client leaving reads from the same stream);
    domain errors in Roboflow's shape."""
    started = time.monotonic()
    try:
        body = await read_body(request, model)
        result = await until_disconnected(request, work(body))
    except TunnelvisionError as exc:
        return roboflow_error(request, exc)
    request.state.timings_ms = {"total": round((time.monotonic() - started) * 1000, 2)}
    payload = await run_in_threadpool(result.model_dump_json, by_alias=True)  # masks: megabytes
    return Response(payload, media_type="application/json")


def pipeline_for(engine: Engine, named: list[str], needs: set[Ability], family: str) -> str:
    return wire.choose_pipeline(engine.info.pipelines, named, needs, family)


def elapsed(started: float) -> float:
    return round(time.monotonic() - started, 4)


class Aliases:
    """Image ids clients chose at /embed_image -> the engine's, per owner (bounded, LRU)."""

    def __init__(self) -> None:
        self.ids: OrderedDict[tuple[str, str], str] = OrderedDict()

    def put(self, owner: str, name: str, image_id: str) -> None:
        self.ids[owner, name] = image_id
        self.ids.move_to_end((owner, name))
        while len(self.ids) > MAX_ALIASES:
            self.ids.popitem(last=False)

    def get(self, owner: str, name: str) -> str:
        return self.ids.get((owner, name), name)  # not a chosen name: maybe the engine's own id


def aliases(request: Request) -> Aliases:
    state = request.app.state
    if not hasattr(state, "roboflow_aliases"):
        state.roboflow_aliases = Aliases()
    found: Aliases = state.roboflow_aliases
    return found


async def image_source(
    request: Request, body: wire.WithImage, owner: str, max_bytes: int
) -> tuple[bytes | None, str | None]:
    """The image bytes, or (without an image) the engine's id for the `image_id` sent."""
    data = await run_in_threadpool(body.image_bytes, max_bytes)  # base64 of up to max_bytes
    if data is not None:
        return data, None  # the content names the cached embedding: a client's id adds nothing
    if body.image_id is None:
        raise InvalidImage("'image' is required (or 'image_id' from /embed_image)")
    return None, aliases(request).get(owner, body.image_id)


async def segment(
    engine: Engine, data: bytes | None, image_id: str | None, fields: dict[str, Any], owner: str
) -> SegmentResponse:
    params = validate_params(SegmentParams, {**fields, "image_id": image_id if data is None else None})
    return await engine.segment(data, params, owner)


async def segment_all(
    engine: Engine, data: bytes | None, image_id: str | None, calls: list[dict[str, Any]], owner: str
) -> list[SegmentResponse]:
    """Several requests on one image: the first decodes it (and caches it and its embedding),
    the others name it by image_id; sent again should the cache have dropped it meanwhile."""
    first = await segment(engine, data, image_id, calls[0], owner)

    async def again(fields: dict[str, Any]) -> SegmentResponse:
        try:
            return await segment(engine, None, first.image_id, fields, owner)
        except NotFound:
            if data is None:
                raise
            return await segment(engine, data, None, fields, owner)

    rest = await asyncio.gather(*(again(fields) for fields in calls[1:]))
    return [first, *rest]


# -- /sam2/segment_image, /sam3/visual_segment --------------------------------------------------


async def visual_segment(
    request: Request, state: AppState, settings: Settings, owner: str, family: str
) -> Response:
    async def work(body: wire.Sam2SegmentRequest) -> BaseModel:
        started = time.monotonic()
        engine = state.ready_engine()
        calls = wire.visual_calls(body)
        needs = wire.visual_needs(calls)
        model = pipeline_for(engine, body.named(body.sam2_version_id), needs, family)
        data, image_id = await image_source(request, body, owner, settings.max_body_bytes)
        fields = [
            {
                "model": model,
                "boxes": c.boxes,
                "points": c.points,
                "multimask": body.multimask_output,
                "mask_format": "rle",
            }
            for c in calls
        ]
        answers = await segment_all(engine, data, image_id, fields, owner)
        by_prompt: dict[int, Segmentation] = {}
        for call, found in zip(calls, answers, strict=True):
            by_prompt.update(zip(call.prompts, found.detections, strict=False))
        ordered = [by_prompt[i] for i in sorted(by_prompt)]
        fmt = "rle" if body.format == "rle" else "polygon"
        return wire.Sam2SegmentResponse(predictions=wire.predictions(ordered, fmt), time=elapsed(started))

    return await answer(request, wire.Sam2SegmentRequest, work)


VISUAL_DOC = (
    "Roboflow's SAM 2 request: prompts with a `box` ({x, y, width, height}, x and y the CENTRE) or `points`"
)


@router.post(
    "/sam2/segment_image",
    summary="Roboflow-compatible SAM 2: one mask per box or point prompt",
    description=VISUAL_DOC,
    response_model=wire.Sam2SegmentResponse,
    responses=PREDICT_ERRORS,
    openapi_extra=json_body(wire.Sam2SegmentRequest),
)
async def sam2_segment_image(
    request: Request, state: StateDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    return await visual_segment(request, state, settings, owner, "sam2")


@router.post(
    "/sam3/visual_segment",
    summary="Roboflow-compatible SAM 3 visual prompts (answered by a segmenter: SAM 2 or SAM)",
    description=VISUAL_DOC,
    response_model=wire.Sam2SegmentResponse,
    responses=PREDICT_ERRORS,
    openapi_extra=json_body(wire.Sam2SegmentRequest),
)
async def sam3_visual_segment(
    request: Request, state: StateDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    return await visual_segment(request, state, settings, owner, "sam3")


# -- /sam3/concept_segment -----------------------------------------------------------------------


@router.post(
    "/sam3/concept_segment",
    summary="Roboflow-compatible SAM 3 concept prompts: every instance of each text and/or exemplar prompt",
    description="Exemplar `boxes` are {x, y, width, height} with x and y the TOP-LEFT corner, or "
    "{x0, y0, x1, y1}; 1 to 16 prompts",
    response_model=wire.ConceptSegmentResponse,
    responses=PREDICT_ERRORS,
    openapi_extra=json_body(wire.ConceptSegmentRequest),
)
async def sam3_concept_segment(
    request: Request, state: StateDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    async def work(body: wire.ConceptSegmentRequest) -> BaseModel:
        started = time.monotonic()
        engine = state.ready_engine()
        needs: set[Ability] = {"text", "masks"} if any(p.text for p in body.prompts) else {"masks"}
        if any(p.boxes for p in body.prompts):
            needs.add("exemplars")
        model = pipeline_for(engine, body.named(), needs, "sam3")
        data, image_id = await image_source(request, body, owner, settings.max_body_bytes)
        calls = [wire.concept_params(body, prompt, model) for prompt in body.prompts]
        found = [answer.detections for answer in await segment_all(engine, data, image_id, calls, owner)]
        if body.nms_iou_threshold is not None:
            found = await run_in_threadpool(wire.cross_prompt_nms, found, body.nms_iou_threshold)
        fmt = "rle" if body.format == "rle" else "polygon"
        results = await run_in_threadpool(_prompt_results, body, found, fmt)
        return wire.ConceptSegmentResponse(prompt_results=results, time=elapsed(started))

    return await answer(request, wire.ConceptSegmentRequest, work)


def _prompt_results(
    body: wire.ConceptSegmentRequest, found: list[list[Segmentation]], fmt: str
) -> list[wire.PromptResult]:
    return [
        wire.PromptResult(prompt_index=i, echo=wire.echo(i, prompt), predictions=wire.predictions(masks, fmt))
        for i, (prompt, masks) in enumerate(zip(body.prompts, found, strict=True))
    ]


# -- /sam2/embed_image, /sam3/embed_image ----------------------------------------------------------


async def embed(request: Request, state: AppState, settings: Settings, owner: str, family: str) -> Response:
    """Decode the image and compute its embedding now (one cheap prompt through the pipeline a
    later segment request would use), so later requests for it skip the image encoder."""

    async def work(body: wire.EmbedRequest) -> BaseModel:
        started = time.monotonic()
        engine = state.ready_engine()
        data = await run_in_threadpool(body.image_bytes, settings.max_body_bytes)
        if data is None:
            raise InvalidImage("'image' is required")
        model, fields = _embedding_prompt(engine, body, family)
        done = await engine.segment(data, validate_params(SegmentParams, {"model": model, **fields}), owner)
        if body.image_id is not None:
            aliases(request).put(owner, body.image_id, done.image_id)
        return wire.EmbedResponse(image_id=body.image_id or done.image_id, time=elapsed(started))

    return await answer(request, wire.EmbedRequest, work)


def _embedding_prompt(engine: Engine, body: wire.EmbedRequest, family: str) -> tuple[str, dict[str, Any]]:
    """The pipeline a later request would use, and a prompt that costs it almost nothing."""
    named = body.named(body.sam2_version_id)
    try:
        model = pipeline_for(engine, named, {"points", "masks"}, family)
    except TunnelvisionError:  # no point-taking segmenter: a concept model's embedding, then
        model = pipeline_for(engine, named, {"text", "masks"}, family)
    if "points" in engine.info.pipeline(model).abilities:
        return model, {"points": [[0, 0, 1]], "mask_format": "none"}
    return model, {"prompt": ["object"], "max_detections": 1, "mask_format": "none"}


@router.post(
    "/sam2/embed_image",
    summary="Roboflow-compatible: compute and cache an image's embedding",
    response_model=wire.EmbedResponse,
    responses=PREDICT_ERRORS,
    openapi_extra=json_body(wire.EmbedRequest),
)
async def sam2_embed_image(
    request: Request, state: StateDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    return await embed(request, state, settings, owner, "sam2")


@router.post(
    "/sam3/embed_image",
    summary="Roboflow-compatible: compute and cache an image's embedding",
    response_model=wire.EmbedResponse,
    responses=PREDICT_ERRORS,
    openapi_extra=json_body(wire.EmbedRequest),
)
async def sam3_embed_image(
    request: Request, state: StateDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    return await embed(request, state, settings, owner, "sam3")


# -- /grounding_dino/infer ---------------------------------------------------------------------------


@router.post(
    "/grounding_dino/infer",
    summary="Roboflow-compatible GroundingDINO: boxes for class names (x, y the box CENTRE)",
    response_model=wire.ObjectDetectionResponse,
    response_model_by_alias=True,
    responses=PREDICT_ERRORS,
    openapi_extra=json_body(wire.GroundingDinoRequest),
)
async def grounding_dino_infer(
    request: Request, state: StateDep, settings: SettingsDep, owner: OwnerDep
) -> Response:
    async def work(body: wire.GroundingDinoRequest) -> BaseModel:
        started = time.monotonic()
        engine = state.ready_engine()
        model = pipeline_for(engine, body.named(), {"text"}, "grounding-dino")
        params = validate_params(DetectParams, body.detect_fields(model))
        image = await run_in_threadpool(wire.image_bytes, body.image, settings.max_body_bytes)
        found = await engine.detect(image, params, owner)
        agnostic = body.iou_threshold if body.class_agnostic_nms else None
        predictions = wire.object_predictions(found.detections, body.text, agnostic)
        size = wire.ImageSize(width=found.image.width, height=found.image.height)
        return wire.ObjectDetectionResponse(image=size, predictions=predictions, time=elapsed(started))

    return await answer(request, wire.GroundingDinoRequest, work)
