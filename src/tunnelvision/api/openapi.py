"""OpenAPI request bodies for routes that take multipart or JSON (parsed by hand)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tunnelvision.api.parsing import JSON_TEXT_FIELDS
from tunnelvision.schemas import ErrorResponse

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": description}
    for status, description in {
        400: "the image could not be decoded",
        413: "body or image over the size limits",
        415: "unsupported Content-Type",
        422: "invalid parameters (the message names the field)",
        503: "queue full, out of memory, not ready or shutting down; see Retry-After",
        504: "deadline passed",
    }.items()
}


def request_body(params_model: type[BaseModel], json_model: type[BaseModel]) -> dict[str, Any]:
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {"schema": _multipart_schema(params_model)},
                "application/json": {
                    "schema": _inline(json_model),
                    "example": {"image": "<base64 of a JPEG or PNG>", "prompt": "forklift . person"},
                },
            },
        }
    }


def _multipart_schema(params_model: type[BaseModel]) -> dict[str, Any]:
    schema = _inline(params_model)
    properties = {"image": {"type": "string", "format": "binary", "description": "the image file"}}
    for name, prop in schema.get("properties", {}).items():
        if name in JSON_TEXT_FIELDS:
            prop = {"type": "string", "description": f"JSON text, e.g. {prop.get('examples', [''])[0]}"}
        properties[name] = prop
    return {"type": "object", "required": ["image"], "properties": properties}


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("$defs", None)
    return schema
