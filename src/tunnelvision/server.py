"""Run the app under uvicorn with the settings Cloudflare Tunnel needs, and a prompt shutdown."""

from __future__ import annotations

import asyncio
import logging
from types import FrameType

import uvicorn

from tunnelvision.api.app import create_app
from tunnelvision.api.state import AppState, BackendFactory
from tunnelvision.config import CLOUDFLARED_KEEPALIVE_S, Settings
from tunnelvision.exposure import UnsafeExposure, check_exposure
from tunnelvision.logs import configure_logging, stop_logging

log = logging.getLogger("tunnelvision")


class GracefulServer(uvicorn.Server):
    """On SIGTERM/SIGINT, fail queued requests at once (uvicorn alone would wait for them all
    before running the lifespan shutdown); the request on the device still finishes."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state
        self.exit_code = 0
        self._loop: asyncio.AbstractEventLoop | None = None

    async def serve(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)  # type: ignore[arg-type]

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self._loop is not None:  # a signal handler must not take locks: hop onto the loop
            self._loop.call_soon_threadsafe(self.state.begin_shutdown)
        super().handle_exit(sig, frame)

    def fail(self, reason: str) -> None:
        """Exit non-zero (after answering the requests in flight) so systemd or Docker restart us."""
        log.critical("exiting with status 1 for a restart: %s", reason)
        self.exit_code = 1
        self.should_exit = True


def serve(settings: Settings, backend_factory: BackendFactory | None = None) -> int:
    """`backend_factory`: None for the models on this machine's devices (Ray mode passes its own)."""
    configure_logging(settings.log_level)
    try:
        return _serve(settings, backend_factory)
    finally:
        stop_logging()  # writes the queued lines, the refusal or the last words included


def _serve(settings: Settings, backend_factory: BackendFactory | None) -> int:
    try:
        warning = check_exposure(settings)
    except UnsafeExposure as exc:
        log.error("%s", exc)
        return 2
    if warning:
        log.warning("%s", warning)
    if settings.keep_alive_s <= CLOUDFLARED_KEEPALIVE_S:
        log.warning(
            "keep_alive_s=%s is not above cloudflared's %s s pool: expect sporadic 502s",
            settings.keep_alive_s,
            CLOUDFLARED_KEEPALIVE_S,
        )
    app = create_app(settings, backend_factory)
    state: AppState = app.state.tunnelvision
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        workers=1,
        log_level=settings.log_level,
        timeout_keep_alive=settings.keep_alive_s,
        server_header=False,
        access_log=False,  # ours is structured and knows the key name: AccessLogMiddleware
        log_config=None,  # keep our non-blocking handlers (logs.py) for uvicorn's records too
        timeout_graceful_shutdown=int(settings.deadline_s) + 5,
    )
    try:  # before the app starts: a busy port must not start loading models first
        sock = config.bind_socket()
    except SystemExit:  # uvicorn has logged the OS's reason
        log.error(
            "cannot listen on %s:%s: is another server using it? choose another --port",
            settings.host,
            settings.port,
        )
        return 2
    server = GracefulServer(config, state)
    state.on_fatal = server.fail
    server.run(sockets=[sock])
    return server.exit_code
