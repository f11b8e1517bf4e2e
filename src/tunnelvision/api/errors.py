"""The one table: domain error -> HTTP status, JSON body `{"error": {...}}` and headers."""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from tunnelvision.errors import (
    DeadlineExceeded,
    Forbidden,
    ImageTooLarge,
    InvalidImage,
    InvalidInput,
    MalformedInput,
    ModelUnavailable,
    NotFound,
    PayloadTooLarge,
    QuotaExceeded,
    RateLimited,
    ReloadFailed,
    ReloadInProgress,
    Retryable,
    StorageFull,
    TunnelvisionError,
    Unauthorized,
    UnsupportedMediaType,
)

log = logging.getLogger(__name__)


class ClientDisconnected(TunnelvisionError):
    """The client went away; nobody reads the response (nginx's 499)."""

    code = "client_closed_request"


STATUS_BY_ERROR: dict[type[TunnelvisionError], int] = {
    InvalidImage: 400,
    InvalidInput: 422,
    MalformedInput: 400,
    NotFound: 404,
    PayloadTooLarge: 413,
    ImageTooLarge: 413,
    UnsupportedMediaType: 415,
    ClientDisconnected: 499,
    Retryable: 503,
    ModelUnavailable: 503,
    DeadlineExceeded: 504,
    QuotaExceeded: 507,
    StorageFull: 507,
    ReloadFailed: 422,  # the new source cannot serve; the old copy still does
    ReloadInProgress: 409,
    Unauthorized: 401,
    Forbidden: 403,
    RateLimited: 429,  # a Retryable, found before Retryable's 503 in the class's MRO
}

_CODE_BY_STATUS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def status_for(exc: TunnelvisionError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    return 500


def request_id(request: Request) -> str | None:
    rid = request.scope.get("state", {}).get("request_id")
    return str(rid) if rid is not None else None


def error_response(
    request: Request, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    body = {"error": {"code": code, "message": message, "request_id": request_id(request)}}
    return JSONResponse(body, status_code=status, headers=headers)


def headers_for(exc: TunnelvisionError) -> dict[str, str]:
    """Retry-After on every retryable error (503s and 429s), in whole seconds."""
    if isinstance(exc, Retryable):
        return {"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))}
    return {}


async def handle_domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, TunnelvisionError)
    return error_response(request, status_for(exc), exc.code, exc.message, headers_for(exc) or None)


async def handle_http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _CODE_BY_STATUS.get(exc.status_code, "http_error")
    headers = dict(exc.headers or {})
    if exc.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request))
    return error_response(request, exc.status_code, code, str(exc.detail), headers)


HTTP_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this path: Starlette's 405 names only the first route's
    (GET and POST /v1/jobs are two routes)."""
    routes = request.app.router.routes
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**request.scope, "method": method})[0] == Match.FULL for route in routes)
    ]


async def handle_validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(request, 422, InvalidInput.code, describe_validation_errors(exc.errors()))


async def handle_unexpected(request: Request, exc: Exception) -> JSONResponse:
    """A bug, not the client's fault: log the traceback, send only the request id."""
    log.exception("unhandled error in request %s", request_id(request), exc_info=exc)
    return error_response(
        request, 500, "internal_error", "internal server error; quote the request_id when reporting it"
    )


def describe_validation_errors(errors: object) -> str:
    parts = []
    for error in errors if isinstance(errors, list | tuple) else []:
        location = ".".join(str(p) for p in error.get("loc", ()) if p not in ("body",))
        message = str(error.get("msg", "invalid")).removeprefix("Value error, ")
        parts.append(f"{location}: {message}" if location else message)
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(TunnelvisionError, handle_domain_error)
    app.add_exception_handler(StarletteHTTPException, handle_http_error)
    app.add_exception_handler(RequestValidationError, handle_validation_error)
    app.add_exception_handler(Exception, handle_unexpected)
