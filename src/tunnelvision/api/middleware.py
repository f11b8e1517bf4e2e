"""Pure ASGI middleware (no BaseHTTPMiddleware: it would break streaming and disconnect events)."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunnelvision.api.errors import headers_for, status_for
from tunnelvision.errors import PayloadTooLarge, TunnelvisionError

_SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class HttpMiddleware:
    """Runs `handle` for HTTP requests; lifespan and other scopes pass straight through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.handle(scope, receive, send)

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class RequestIdMiddleware(HttpMiddleware):
    """Use Cloudflare's CF-Ray (or X-Request-ID) when sane, else a new id; echo it back."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        rid = _incoming_id(scope) or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", rid.encode())]
            await send(message)

        await self.app(scope, receive, send_with_id)


# A JSON API needs no sources at all. HTML pages (api/routes/playground.py) send their own policy,
# which this middleware leaves alone; every policy forbids framing (clickjacking).
DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
SECURITY_HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", DEFAULT_CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
)


class SecurityHeadersMiddleware(HttpMiddleware):
    """The headers above on every response, errors from other middleware included, unless the
    response already set its own."""

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                message["headers"] = headers + [h for h in SECURITY_HEADERS if h[0] not in present]
            await send(message)

        await self.app(scope, receive, send_with_headers)


ErrorHandler = Callable[[Request, Exception], Awaitable[Response]]


class UnexpectedErrorMiddleware(HttpMiddleware):
    """Answers an exception that escapes the app with `handler`'s 500 here, inside the middleware
    that adds request ids and security headers: Starlette would answer it outside all of them."""

    def __init__(self, app: ASGIApp, handler: ErrorHandler) -> None:
        super().__init__(app)
        self.handler = handler

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watching_send)
        except Exception as exc:
            if started:  # too late for an answer: the server closes the connection
                raise
            response = await self.handler(Request(scope), exc)
            await response(scope, receive, send)


def _incoming_id(scope: Scope) -> str | None:
    headers: dict[bytes, bytes] = dict(scope.get("headers", []))
    for name in (b"cf-ray", b"x-request-id"):
        value = headers.get(name, b"").decode("latin-1")
        if _SAFE_ID.match(value):
            return value
    return None


class BodyLimitMiddleware(HttpMiddleware):
    """413 as soon as the body is known to be too big: from Content-Length, or while it streams."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        super().__init__(app)
        self.max_bytes = max_bytes

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope.get("headers", [])).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            too_large = PayloadTooLarge(f"request body is over the {self.max_bytes} byte limit")
            await send_error(scope, send, too_large, {"Connection": "close"})
            return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise PayloadTooLarge(f"request body is over the {self.max_bytes} byte limit")
            return message

        await self.app(scope, counting_receive, send)


async def send_error(
    scope: Scope, send: Send, exc: TunnelvisionError, headers: dict[str, str] | None = None
) -> None:
    """A domain error from middleware, with the status, code and headers of the one table."""
    all_headers = {**headers_for(exc), **(headers or {})}
    await send_json_error(scope, send, status_for(exc), exc.code, exc.message, all_headers)


async def send_json_error(
    scope: Scope, send: Send, status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> None:
    """An error in our JSON shape, from middleware (outside FastAPI's exception handlers)."""
    state = scope.get("state", {})
    error = {"code": code, "message": message, "request_id": state.get("request_id")}
    body: dict[str, Any] = {"error": error}
    if state.get("message_on_top"):  # a client that reads Roboflow's `{"message": ...}` errors
        body["message"] = message
    payload = json.dumps(body).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
    raw_headers += [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": payload})


RecordSink = Callable[[Scope, int, float], None]  # scope, status, start time


class RequestRecordMiddleware(HttpMiddleware):
    """After each request, hands (scope, status, start) to the sinks: the access log, metrics."""

    def __init__(self, app: ASGIApp, sinks: list[RecordSink]) -> None:
        super().__init__(app)
        self.sinks = sinks

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        status = 500

        async def recording_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            for sink in self.sinks:
                sink(scope, status, started)


def access_log_sink(logger: logging.Logger) -> RecordSink:
    """One JSON line per request: who (key name, never the key), from where, what, how long."""

    def write(scope: Scope, status: int, started: float) -> None:
        logger.info(json.dumps(access_record(scope, status, started)))

    return write


def access_record(scope: Scope, status: int, started: float) -> dict[str, Any]:
    state = scope.get("state", {})
    timings = state.get("timings_ms", {})
    return {
        "request_id": state.get("request_id"),
        "method": scope.get("method"),
        "path": scope.get("path"),
        "status": status,
        "duration_ms": round((time.monotonic() - started) * 1000, 2),
        "client": state.get("client"),
        "principal": state.get("principal"),
        "queue_ms": timings.get("queue"),
        "device_ms": timings.get("device"),
    }
