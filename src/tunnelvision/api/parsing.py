"""One request, two encodings: multipart/form-data (an `image` file) or JSON (`image` base64)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import Request

from tunnelvision.api.errors import describe_validation_errors
from tunnelvision.errors import InvalidImage, InvalidInput, MalformedInput, UnsupportedMediaType
from tunnelvision.imaging import decode_base64

P = TypeVar("P", bound=BaseModel)
JSON_TEXT_FIELDS = ("boxes", "points", "exemplars")  # multipart carries these as JSON text
MAX_FORM_FIELDS = 32
# Commas and brackets in a JSON body or field: 256 boxes take about 1,300. json.loads builds an
# object for each value, so far more (a 32 MB body of `0,0,0,...`) is refused before parsing.
MAX_JSON_VALUES = 8192


async def read_prediction_request(
    request: Request, params_model: type[P], max_bytes: int
) -> tuple[bytes | None, P]:
    """The image bytes (None when the request names an earlier `image_id`) and the options."""
    media_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if media_type == "application/json":
        image, fields = await _read_json(request, max_bytes)
    elif media_type == "multipart/form-data":
        image, fields = await _read_multipart(request)
    else:
        raise UnsupportedMediaType(
            f"Content-Type '{media_type or 'missing'}' is not supported: "
            "send multipart/form-data (an 'image' file) or application/json ('image' as base64)"
        )
    params = validate_params(params_model, fields)
    image_id = getattr(params, "image_id", None)
    if image is None and image_id is None:
        raise InvalidImage("'image' is required (or 'image_id' from an earlier answer)")
    if image is not None and image_id is not None:
        raise InvalidInput("give 'image' or 'image_id', not both")
    return image, params


def validate_params(params_model: type[P], fields: dict[str, Any]) -> P:
    try:
        return params_model.model_validate(fields)
    except ValidationError as exc:
        raise InvalidInput(describe_validation_errors(exc.errors())) from None


async def _read_json(request: Request, max_bytes: int) -> tuple[bytes | None, dict[str, Any]]:
    body = await request.body()
    data = await run_in_threadpool(load_json, body, "the JSON body", "body is not valid JSON")
    if not isinstance(data, dict):
        raise InvalidInput("JSON body must be an object")
    encoded = data.pop("image", None)
    if encoded is None:
        return None, data
    if not isinstance(encoded, str) or not encoded:
        raise InvalidImage("'image' must be the image file as a base64 string")
    return await run_in_threadpool(decode_base64, encoded, max_bytes), data


async def _read_multipart(request: Request) -> tuple[bytes | None, dict[str, Any]]:
    form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    try:
        upload = form.get("image")
        if upload is not None and not isinstance(upload, UploadFile):
            raise InvalidImage("'image' must be a file field named 'image'")
        image = await upload.read() if upload is not None else None
        return image, form_fields(form.multi_items())
    finally:
        await form.close()


def form_fields(items: list[tuple[str, Any]]) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name, value in items:
        if name == "image":
            continue
        if not isinstance(value, str):
            raise InvalidInput(_file_in_wrong_field(name))
        if name in JSON_TEXT_FIELDS:
            fields[name] = _json_field(name, value)
        elif name == "prompt":
            fields[name] = _with_prompt(fields.get(name), value)
        else:
            fields[name] = value
    return fields


def _file_in_wrong_field(name: str) -> str:
    return f"field '{name}' holds a file, but only 'image' takes one: send it as -F image=@photo.jpg"


def _with_prompt(previous: str | list[str] | None, value: str) -> str | list[str]:
    """Repeated `prompt` fields are a list of labels; so is one field holding a JSON list."""
    labels: str | list[str] = value
    if value.lstrip().startswith("["):
        parsed = load_json(value, "field 'prompt'", "field 'prompt' starts with '[' but is not a JSON list")
        if not isinstance(parsed, list) or not all(isinstance(label, str) for label in parsed):
            raise InvalidInput('field \'prompt\' as JSON must be a list of strings, e.g. ["cat", "dog"]')
        labels = parsed
    if previous is None:
        return labels
    before = previous if isinstance(previous, list) else [previous]
    return [*before, *(labels if isinstance(labels, list) else [labels])]


def _json_field(name: str, value: str) -> Any:
    return load_json(value, f"field '{name}'", f"field '{name}' must be JSON, e.g. [[10, 20, 200, 240]]")


def load_json(text: str | bytes, what: str, invalid: str) -> Any:
    """Parsed JSON, with its size bounded before parsing and its depth by the parser's own
    recursion guard (which raises RecursionError, not ValueError)."""
    if _json_values(text) > MAX_JSON_VALUES:
        raise InvalidInput(f"{what} holds more than {MAX_JSON_VALUES} values")
    try:
        return json.loads(text)
    except RecursionError:
        raise MalformedInput(f"{what} is nested too deeply") from None
    except ValueError:  # UnicodeDecodeError included
        raise InvalidInput(invalid) from None


def _json_values(text: str | bytes) -> int:
    """An upper bound on the values in a JSON text, counted at C speed."""
    if isinstance(text, bytes):
        return text.count(b",") + text.count(b"[") + text.count(b"{")
    return text.count(",") + text.count("[") + text.count("{")
