"""OpenAPI request bodies for routes that take multipart or JSON (parsed by hand)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from tunnelvision.api.parsing import JSON_TEXT_FIELDS
from tunnelvision.schemas import ErrorResponse

ERROR_DESCRIPTIONS = {
    400: "malformed input: a body that is not valid JSON, an image that cannot be decoded, JSON nested "
    "too deeply, a damaged zip member",
    401: "no valid API key or Cloudflare Access login (WWW-Authenticate says how)",
    403: "the key (or Access login) lacks this route's scope: predict, jobs or admin",
    404: "no such job or video, or an image_id not in the cache (evicted, never sent, or another key's)",
    413: "body, image, frame, clip (bytes, duration, frames, resolution) or archive member over the limits",
    415: "unsupported Content-Type, an image format other than JPEG, PNG, WebP, GIF, BMP, TIFF, or a "
    "clip other than MP4/MOV, WebM/MKV, AVI or a zip of frames",
    422: "invalid parameters (the message names the field), an unknown `model`, a prompt the pipeline "
    "cannot take, or more mask work than max_mask_pixels",
    429: "rate limit or in-flight cap for this client; see Retry-After",
    503: "queue full, out of memory, not ready or shutting down; see Retry-After",
    504: "deadline passed",
    507: "the jobs quota (all keys, or this key) is used up, or the disk is full",
}
GUARDED = (401, 403, 429)  # what GuardMiddleware may answer on any protected route


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the error statuses a route really returns (all in ErrorResponse's shape)."""
    return {
        status: {"model": ErrorResponse, "description": ERROR_DESCRIPTIONS[status]}
        for status in sorted({*GUARDED, *statuses})
    }


PREDICT_ERRORS = error_responses(400, 404, 413, 415, 422, 503, 504)
JOB_CREATE_ERRORS = error_responses(400, 413, 415, 422, 507)
JOB_ERRORS = error_responses(404)


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


def job_request_body(params_model: type[BaseModel], options: tuple[str, ...]) -> dict[str, Any]:
    """POST /v1/jobs: image files and/or one zip, with the segment options jobs take."""
    option_properties = _inline(params_model).get("properties", {})
    properties: dict[str, Any] = {
        "images": {
            "type": "array",
            "items": {"type": "string", "format": "binary"},
            "description": "image files (repeat the field)",
        },
        "archive": {"type": "string", "format": "binary", "description": "a zip of images"},
        **{name: option_properties[name] for name in options if name in option_properties},
    }
    schema = {"type": "object", "required": ["prompt"], "properties": properties}
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def video_request_body(params_model: type[BaseModel]) -> dict[str, Any]:
    """POST /v1/videos: the clip and what to follow (JSON-valued fields as JSON text)."""
    schema = _multipart_schema(params_model, "video", "the clip: MP4/MOV, WebM/MKV, AVI, or a zip of frames")
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}}


def _multipart_schema(
    params_model: type[BaseModel], file_field: str = "image", file_description: str = "the image file"
) -> dict[str, Any]:
    schema = _inline(params_model)
    properties = {file_field: {"type": "string", "format": "binary", "description": file_description}}
    for name, prop in schema.get("properties", {}).items():
        if name in JSON_TEXT_FIELDS:
            prop = {"type": "string", "description": f"JSON text, e.g. {prop.get('examples', [''])[0]}"}
        properties[name] = prop
    return {"type": "object", "required": [file_field], "properties": properties}


def _inline(model: type[BaseModel]) -> dict[str, Any]:
    schema = model.model_json_schema()
    schema.pop("$defs", None)
    return schema
