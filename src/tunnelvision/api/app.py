"""create_app(settings): the FastAPI application, models loaded in its lifespan."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from tunnelvision import __version__
from tunnelvision.api.errors import handle_unexpected, install_error_handlers
from tunnelvision.api.guard import GuardMiddleware
from tunnelvision.api.middleware import (
    BodyLimitMiddleware,
    RecordSink,
    RequestIdMiddleware,
    RequestRecordMiddleware,
    SecurityHeadersMiddleware,
    UnexpectedErrorMiddleware,
    access_log_sink,
)
from tunnelvision.api.routes import (
    admin,
    health,
    jobs,
    label_studio,
    metrics,
    playground,
    predict,
    roboflow,
    videos,
    x_anylabeling,
)
from tunnelvision.api.state import AppState, BackendFactory
from tunnelvision.config import Settings
from tunnelvision.metrics import Metrics

DESCRIPTION = """Zero-shot detection (GroundingDINO) and segmentation (SAM).

Send an image as multipart/form-data (`image` file) or JSON (`image` base64) with a text
`prompt` such as `"forklift . person"`, or with `boxes` / `points` for /v1/segment.
Errors are `{"error": {"code", "message", "request_id"}}`; 503s carry `Retry-After`.
"""


def create_app(settings: Settings, backend_factory: BackendFactory | None = None) -> FastAPI:
    if backend_factory is None:
        from tunnelvision.models.factory import build_backends

        backend_factory = build_backends
    state = AppState(settings, backend_factory)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Load in the background: /healthz answers at once, /readyz says what is happening.
        loading = asyncio.create_task(state.load())
        jobs = asyncio.create_task(state.job_runner.run_forever())  # resumes unfinished jobs
        videos = asyncio.create_task(state.video_runner.run_forever())  # and unfinished videos
        try:
            yield
        finally:
            state.begin_shutdown()
            for task in (loading, jobs, videos):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await state.close()

    app = FastAPI(
        title="tunnelvision",
        version=__version__,
        description=DESCRIPTION,
        lifespan=lifespan,
        docs_url=None,  # served by routes/playground.py, each page with its Content-Security-Policy
        redoc_url=None,
    )
    app.state.tunnelvision = state
    install_error_handlers(app)
    app.include_router(health.router)
    app.include_router(admin.router)
    app.include_router(predict.router)
    app.include_router(metrics.router)
    app.include_router(jobs.router)
    app.include_router(videos.router)
    app.include_router(playground.router)
    app.include_router(roboflow.router)
    app.include_router(label_studio.router)
    app.include_router(x_anylabeling.router)
    add_middleware(app, settings, state)
    return app


def metrics_sink(app: FastAPI, metrics: Metrics) -> RecordSink:
    static_paths: set[str] = set()

    def observe(scope: Any, status: int, started: float) -> None:
        if not static_paths:  # routes without parameters, read once the app is complete
            documented = app.openapi()["paths"]
            static_paths.update({p for p in documented if "{" not in p}, {"/docs", "/openapi.json"})
        label = route_label(scope, static_paths)
        metrics.on_request(label, status, scope.get("state", {}).get("timings_ms", {}))

    return observe


def route_label(scope: Any, static_paths: set[str]) -> str:
    """The matched route's template (`/v1/jobs/{job_id}`), so label values stay bounded. A request
    refused before routing (401, 429, 413) keeps its path when that is a route's; else `other`."""
    path = getattr(scope.get("route"), "path", None)
    if isinstance(path, str):
        return path
    return scope["path"] if scope["path"] in static_paths else "other"


def add_middleware(app: FastAPI, settings: Settings, state: AppState) -> None:
    """Added innermost first: the request passes them in the reverse order."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_body_bytes)
    app.add_middleware(GuardMiddleware, settings=settings)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "X-API-Key", "Token", "Content-Type"],
            expose_headers=["X-Request-ID", "Retry-After"],
        )
    sinks = [metrics_sink(app, state.metrics)]
    if settings.access_log:
        sinks.append(access_log_sink(logging.getLogger("tunnelvision.access")))
    app.add_middleware(RequestRecordMiddleware, sinks=sinks)
    app.add_middleware(UnexpectedErrorMiddleware, handler=handle_unexpected)  # a bug's 500, in here
    app.add_middleware(SecurityHeadersMiddleware)  # on 401/413/429 from the middleware above too
    app.add_middleware(RequestIdMiddleware)  # outermost: every response, even a 413, has an id


def app_from_env() -> FastAPI:
    """For `uvicorn --factory tunnelvision.api.app:app_from_env` (settings from TUNNELVISION_*)."""
    return create_app(Settings())
