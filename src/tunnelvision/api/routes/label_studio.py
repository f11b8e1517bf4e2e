"""Label Studio's ML backend protocol under /label-studio: paste `https://HOST/label-studio`
into a project's "Connect model" dialog (Basic auth, the key as the password).

- /setup remembers, per key and project, where task images come from and which pipeline serves
  (`extra_params`), and answers the model version (pipeline@generation: a reload makes a new one,
  so Label Studio asks for predictions again).
- /predict without a context pre-annotates each task: the labeling config's label names are the
  text prompt; RectangleLabels get boxes, BrushLabels brush masks, PolygonLabels polygons. A task
  that fails gets an `error` instead of a `result`, and the others go on.
- /predict with `params.context.result` (a smart keypoint or rectangle) answers one SAM mask; the
  task image's `image_id` is remembered, so later clicks skip the download and the image encoder.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, Request, Response
from pydantic import BaseModel
from starlette.concurrency import run_in_threadpool

from tunnelvision.api.deps import DOCUMENTED_AUTH, OwnerDep, SettingsDep, StateDep
from tunnelvision.api.guard import LABEL_STUDIO_PREFIX
from tunnelvision.api.openapi import error_responses
from tunnelvision.api.parsing import load_json, validate_params
from tunnelvision.api.routes.predict import json_response, until_disconnected
from tunnelvision.config import Settings
from tunnelvision.engine.engine import Engine
from tunnelvision.errors import InvalidInput, MalformedInput, NotFound, TunnelvisionError
from tunnelvision.integrations.label_studio import results
from tunnelvision.integrations.label_studio.config import Control, LabelConfig, parse_label_config, prompt_for
from tunnelvision.integrations.label_studio.images import ImageSource, data_url_image, fetch_image, resolve
from tunnelvision.integrations.label_studio.protocol import (
    MAX_JSON_VALUES,
    HealthResponse,
    Memory,
    ModelOptions,
    PredictRequest,
    PredictResponse,
    ProjectSetup,
    SetupRequest,
    SetupResponse,
    WebhookResponse,
)
from tunnelvision.schemas import MAX_PHRASES, DetectParams, DetectResponse, SegmentParams, SegmentResponse

router = APIRouter(prefix=LABEL_STUDIO_PREFIX, tags=["label-studio"])
log = logging.getLogger(__name__)

PARALLEL_TASKS = 4  # tasks of one /predict in flight at once (the scheduler batches them)
FETCH_TIMEOUT_S = 30.0  # for one task image from Label Studio
Answer = DetectResponse | SegmentResponse


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema(by_alias=True)
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


@dataclass(frozen=True)
class Call:
    """One /predict: who asks, with what config, images from where, on which pipeline."""

    engine: Engine
    settings: Settings
    owner: str
    memory: Memory
    config: LabelConfig
    source: ImageSource | None
    options: ModelOptions
    pipeline: str

    @property
    def model_version(self) -> str:
        return model_version(self.engine, self.pipeline)

    def fields(self, **prompt: Any) -> dict[str, Any]:
        return {**self.options.detect_fields(), "model": self.pipeline, **prompt}

    async def run(self, image: bytes | None, params: DetectParams) -> Answer:
        if isinstance(params, SegmentParams):
            return await self.engine.segment(image, params, self.owner)
        return await self.engine.detect(image, params, self.owner)


def model_version(engine: Engine, pipeline: str) -> str:
    """Stable while the same weights serve; a reload (a new generation) makes a new version."""
    return f"{pipeline}@{engine.loaded[pipeline].generation}"


def memory_of(request: Request) -> Memory:
    """This app's Label Studio memory (made at the first call)."""
    memory: Memory | None = getattr(request.app.state, "label_studio", None)
    if memory is None:
        memory = request.app.state.label_studio = Memory()
    return memory


# -- routes ----------------------------------------------------------------------------------


@router.get(
    "/health",
    response_model=HealthResponse,
    summary="Label Studio's health check: UP once the models are ready",
    dependencies=DOCUMENTED_AUTH,
    responses=error_responses(503),
)
async def health(state: StateDep) -> HealthResponse:
    state.ready_engine()
    return HealthResponse(status="UP", model_class="tunnelvision")


@router.post(
    "/setup",
    response_model=SetupResponse,
    summary="Label Studio connects a project: its labeling config, URL, token and extra_params",
    description=(
        "`extra_params` (the ML backend's extra params in Label Studio, JSON) may name the pipeline "
        '(`{"model": "NAME"}`) and thresholds (`box_threshold`, `text_threshold`, `nms_iou`, '
        "`max_detections`). Task images are fetched only from the server's label_studio_url "
        "(TUNNELVISION_LABEL_STUDIO_URL), with `access_token` unless the server has its own token."
    ),
    dependencies=DOCUMENTED_AUTH,
    responses=error_responses(400, 413, 422, 503),
    openapi_extra=_json_body(SetupRequest),
)
async def setup(request: Request, state: StateDep, settings: SettingsDep, owner: OwnerDep) -> SetupResponse:
    engine = state.ready_engine()
    data = await run_in_threadpool(load_json, await request.body(), "the body", "the body is not valid JSON")
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object")
    body = validate_params(SetupRequest, data)
    options = parse_options(body.extra_params)
    pipeline = engine.info.pipeline(options.model).name
    config = await run_in_threadpool(parse_label_config, body.schema_) if body.schema_ else None
    source = image_source(settings, body.hostname, body.access_token)
    memory_of(request).setups.put((owner, body.project), ProjectSetup(config, source, options))
    return SetupResponse(model_version=model_version(engine, pipeline))


@router.post(
    "/predict",
    response_model=PredictResponse,
    summary="Pre-annotations for tasks, or one mask for a smart tool's click (params.context)",
    dependencies=DOCUMENTED_AUTH,
    responses=error_responses(400, 413, 415, 422, 503, 504),
    openapi_extra=_json_body(PredictRequest),
)
async def predict(request: Request, state: StateDep, settings: SettingsDep, owner: OwnerDep) -> Response:
    engine = state.ready_engine()
    body = await run_in_threadpool(parse_predict_body, await request.body())
    call = await make_call(request, engine, settings, owner, body)
    if body.context:
        if not body.tasks:
            raise InvalidInput("a smart tool's call needs its task in 'tasks'")
        answer = await until_disconnected(request, interactive(call, body.tasks[0], body.context))
        return await json_response(PredictResponse(results=[answer]))
    predictions = await until_disconnected(request, pre_annotate_all(call, body.tasks))
    return await json_response(PredictResponse(results=predictions))


@router.post(
    "/webhook",
    response_model=WebhookResponse,
    summary="Label Studio's events (sent without auth): acknowledged, nothing else is done",
)
async def webhook() -> WebhookResponse:
    # The body is not read: nothing here learns from events, and an open route reads nothing big.
    return WebhookResponse(status="ok")


# -- setup -----------------------------------------------------------------------------------


def parse_options(extra_params: dict[str, Any] | str | None) -> ModelOptions:
    """`extra_params` (an object, or JSON text of one) as ModelOptions; InvalidInput naming the field."""
    if isinstance(extra_params, str):
        extra_params = load_json(
            extra_params, "extra_params", 'extra_params must be JSON, e.g. {"model": "NAME"}'
        )
    if extra_params is None:
        return ModelOptions()
    if not isinstance(extra_params, dict):
        raise InvalidInput('extra_params must be a JSON object, e.g. {"model": "grounded-sam"}')
    return validate_params(ModelOptions, extra_params)


def image_source(settings: Settings, hostname: str | None, token: str | None) -> ImageSource | None:
    """Where task images come from: only the server's label_studio_url. Not the `hostname` that
    /setup sends: any caller with a predict key could send one, and make this server fetch from
    hosts it can reach and the internet cannot (server-side request forgery). The token may come
    from /setup: it is only ever sent to that configured host."""
    if not settings.label_studio_url:
        return None
    return ImageSource.parse(settings.label_studio_url, settings.label_studio_api_key or token or "")


def parse_predict_body(body: bytes) -> PredictRequest:
    """The body as a PredictRequest: its size is capped already; its values and depth here."""
    if body.count(b",") + body.count(b"[") + body.count(b"{") > MAX_JSON_VALUES:
        raise InvalidInput(f"the body holds more than {MAX_JSON_VALUES} JSON values: select fewer tasks")
    try:  # not load_json: its cap on values is far below what interactive calls carry
        data = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise MalformedInput("the body is nested too deeply") from None
    except ValueError:
        raise MalformedInput("the body is not valid JSON") from None
    if not isinstance(data, dict):
        raise InvalidInput("the body must be a JSON object with 'tasks'")
    return validate_params(PredictRequest, data)


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # Python's reader would take NaN and Infinity


async def make_call(
    request: Request, engine: Engine, settings: Settings, owner: str, body: PredictRequest
) -> Call:
    memory = memory_of(request)
    setup = memory.setups.get((owner, body.project))
    if body.label_config:
        config = await run_in_threadpool(parse_label_config, body.label_config)
    elif setup is not None and setup.config is not None:
        config = setup.config
    else:
        raise InvalidInput("no label_config: send the project's labeling config")
    options = setup.options if setup is not None else ModelOptions()
    source = setup.source if setup is not None else image_source(settings, None, None)
    pipeline = engine.info.pipeline(options.model).name
    return Call(engine, settings, owner, memory, config, source, options, pipeline)


# -- pre-annotation --------------------------------------------------------------------------


async def pre_annotate_all(call: Call, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    gate = asyncio.Semaphore(PARALLEL_TASKS)

    async def one(task: dict[str, Any]) -> dict[str, Any]:
        async with gate:
            return await task_prediction(call, task)

    return list(await asyncio.gather(*(one(task) for task in tasks)))


async def task_prediction(call: Call, task: dict[str, Any]) -> dict[str, Any]:
    """The task's prediction, or its error: one task failing never fails the others."""
    try:
        return results.prediction(await pre_annotate(call, task), call.model_version)
    except TunnelvisionError as exc:
        return failed(call, exc.code, exc.message)
    except Exception:
        log.exception("Label Studio task %s failed", str(task.get("id"))[:32])
        return failed(call, "internal_error", "this task failed on the server; see its log")


def failed(call: Call, code: str, message: str) -> dict[str, Any]:
    """No `result`: Label Studio stores no prediction (and logs the error), so it asks again."""
    return {"model_version": call.model_version, "score": 0.0, "error": {"code": code, "message": message}}


async def pre_annotate(call: Call, task: dict[str, Any]) -> list[results.Item]:
    by_image: dict[str, list[Control]] = {}
    for control in call.config.pre_annotated:
        by_image.setdefault(control.image_key, []).append(control)
    items: list[results.Item] = []
    for key, controls in by_image.items():
        items += await annotate_image(call, task_data(task).get(key), controls)
    return items


async def annotate_image(call: Call, reference: Any, controls: list[Control]) -> list[results.Item]:
    """One engine call per chunk of labels the engine takes at once (the image is sent once)."""
    phrases = prompt_for([label for control in controls for label in control.labels])
    abilities = call.engine.info.pipeline(call.pipeline).abilities
    masks = "masks" in abilities and any(control.tool != "rectangle" for control in controls)
    model: type[DetectParams] = SegmentParams if masks else DetectParams
    extra = {"mask_format": "rle"} if masks else {}
    ordered = list(phrases)
    items: list[results.Item] = []
    for start in range(0, len(ordered), MAX_PHRASES):
        params = validate_params(model, call.fields(prompt=ordered[start : start + MAX_PHRASES], **extra))
        answer = await run_on_image(call, reference, params)
        width, height = answer.image.width, answer.image.height
        detections = answer.detections
        items += await run_in_threadpool(
            results.pre_annotations, controls, detections, phrases, width, height
        )
    return items


def task_data(task: dict[str, Any]) -> dict[str, Any]:
    data = task.get("data")
    return data if isinstance(data, dict) else {}


async def run_on_image(call: Call, reference: Any, params: DetectParams) -> Answer:
    """The engine's answer on a task's image: by its image_id when this key's Label Studio image
    was seen before (no download, no decode, the cached embedding), else fetched from Label Studio."""
    inline = data_url_image(reference, call.settings.max_body_bytes) if isinstance(reference, str) else None
    if inline is not None:
        return await call.run(inline, params)
    url = resolve(reference, call.source)
    key = (call.owner, url)
    image_id = call.memory.images.get(key)
    if image_id is not None:
        try:
            return await call.run(None, params.model_copy(update={"image_id": image_id}))
        except NotFound:  # evicted from the image cache meanwhile: fetch it again
            call.memory.images.pop(key)
    assert call.source is not None  # resolve() refused otherwise
    image = await fetch_image(url, call.source, call.settings.max_body_bytes, FETCH_TIMEOUT_S)
    answer = await call.run(image, params)
    call.memory.images.put(key, answer.image_id)
    return answer


# -- smart tools -----------------------------------------------------------------------------


async def interactive(call: Call, task: dict[str, Any], context: list[dict[str, Any]]) -> dict[str, Any]:
    """A mask for the keypoints (positive or negative) or rectangles the annotator just placed."""
    to_name = str(context[0].get("to_name", ""))
    control = call.config.mask_tool(to_name)
    if control is None:
        raise InvalidInput(
            f"smart tools need BrushLabels or PolygonLabels on the image '{to_name[:64]}' for their mask"
        )
    width, height = original_size(context[0])
    params = validate_params(
        SegmentParams, call.fields(mask_format="rle", **smart_prompt(context, width, height))
    )
    answer = await run_on_image(call, task_data(task).get(control.image_key), params)
    label = context_label(context[0], control)
    items = await run_in_threadpool(smart_items, control, label, answer)
    return results.prediction(items, call.model_version)


def smart_items(control: Control, label: str, answer: Answer) -> list[results.Item]:
    width, height = answer.image.width, answer.image.height
    items: list[results.Item] = []
    for detection in answer.detections:
        items += results.items_for(control, label, detection, results.mask_of(detection), width, height)
    return items


def original_size(item: dict[str, Any]) -> tuple[int, int]:
    width, height = item.get("original_width"), item.get("original_height")
    if not (
        isinstance(width, int | float) and isinstance(height, int | float) and width >= 1 and height >= 1
    ):
        raise InvalidInput("the smart tool's region needs original_width and original_height")
    return int(width), int(height)


def smart_prompt(context: Sequence[dict[str, Any]], width: int, height: int) -> dict[str, Any]:
    """Rectangles as boxes, else keypoints as points (1: object, 0: background), in pixels."""
    boxes, points = [], []
    for item in context:
        value = item.get("value") if isinstance(item.get("value"), dict) else {}
        assert isinstance(value, dict)
        if item.get("type") == "rectanglelabels":
            x, y = _pixel(value, "x", width), _pixel(value, "y", height)
            boxes.append(
                [
                    x,
                    y,
                    min(x + _pixel(value, "width", width), width),
                    min(y + _pixel(value, "height", height), height),
                ]
            )
        elif item.get("type") == "keypointlabels":
            positive = item.get("is_positive", True) is not False
            x, y = _pixel(value, "x", width), _pixel(value, "y", height)
            points.append([min(x, width - 0.5), min(y, height - 0.5), 1 if positive else 0])
    if boxes:
        return {"boxes": boxes}
    if points:
        return {"points": points}
    raise InvalidInput("the smart tool's context holds no keypoint or rectangle")


def _pixel(value: dict[str, Any], name: str, total: int) -> float:
    number = value.get(name)
    if not isinstance(number, int | float) or isinstance(number, bool) or not 0 <= number <= 100:
        raise InvalidInput(f"the smart tool's region needs '{name}' in percent (0 to 100)")
    return float(number) * total / 100


def context_label(item: dict[str, Any], control: Control) -> str:
    """The label the annotator chose for the click; the mask tool's first label otherwise."""
    value = item.get("value") if isinstance(item.get("value"), dict) else {}
    assert isinstance(value, dict)
    for key in ("keypointlabels", "rectanglelabels"):
        labels = value.get(key)
        if isinstance(labels, list) and labels and isinstance(labels[0], str):
            return labels[0]
    return control.labels[0]
