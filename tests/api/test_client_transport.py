"""The client when the network misbehaves: a server that is down, comes up late, hangs up or is busy.

Failures come from real sockets on 127.0.0.1: a free port with nothing listening, our real server
started after the call, and a tiny scripted HTTP server for answers our server never gives."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from support import FakeBackend, ThreadServer, free_port, image_bytes, make_settings
from tunnelvision import APIError, AsyncClient, Client, ConnectionFailed, Overloaded, TransportError
from tunnelvision.client import base_url

PNG = image_bytes(40, 30)
HANG_UP = None  # a script step: read the request, close the connection, answer nothing
Step = tuple[int, dict[str, Any], dict[str, str]] | float | None  # an answer, a stall (s), HANG_UP


class Scripted:
    """An HTTP server on 127.0.0.1 answering request n with step n of its script (the last step
    again once it runs out), and recording each request as 'METHOD /path'."""

    def __init__(self, *script: Step) -> None:
        self.script, self.seen = list(script), list[str]()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                outer.answer(self)

            do_POST = do_DELETE = do_GET

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def answer(self, handler: BaseHTTPRequestHandler) -> None:
        handler.rfile.read(int(handler.headers.get("content-length", 0)))
        self.seen.append(f"{handler.command} {handler.path}")
        step = self.script[min(len(self.seen), len(self.script)) - 1]
        if not isinstance(step, tuple):
            time.sleep(step or 0)
            handler.close_connection = True
            return
        status, body, headers = step
        payload = json.dumps(body).encode()
        handler.send_response(status)
        for name, value in {**headers, "Content-Type": "application/json"}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    def __enter__(self) -> Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(10)


BUSY: Step = (503, {"error": {"code": "queue_full", "message": "queue is full"}}, {"Retry-After": "0.2"})
COCO: Step = (200, {"images": [], "annotations": [], "categories": []}, {})


def down_url() -> str:
    return f"http://127.0.0.1:{free_port()}"  # nothing listens there: connections are refused


def test_a_server_that_is_down_gives_a_clear_error_after_a_few_quick_retries() -> None:
    url = down_url()
    with Client(url, retries=2, backoff_s=0.1) as client:
        assert client.ready() is False
        began = time.monotonic()
        with pytest.raises(ConnectionFailed) as caught:
            client.models()
        assert 0.3 <= time.monotonic() - began < 5  # waited 0.1 then 0.2 s, then gave up
        with pytest.raises(ConnectionFailed):
            client.detect(PNG, prompt="cat")  # never sent, so a POST is retried as well
    error = caught.value
    assert isinstance(error, TransportError) and isinstance(error, APIError)
    assert (error.status, error.code) == (0, "connection_failed")
    assert f"GET {url}/v1/models" in str(error) and "Is the server running" in str(error)
    assert "--url" in str(error) and "TUNNELVISION_URL" in str(error)


async def _against_a_down_server(url: str) -> bool:
    async with AsyncClient(url, retries=1, backoff_s=0.05) as client:
        with pytest.raises(ConnectionFailed, match="cannot reach GET"):
            await client.job("some-job")
        return await client.ready()


def test_the_async_client_says_the_same_about_a_down_server() -> None:
    assert asyncio.run(_against_a_down_server(down_url())) is False


@contextmanager
def started_later(delay_s: float) -> Iterator[ThreadServer]:
    """Our real server on a port chosen now, listening only after `delay_s`."""
    srv = ThreadServer(make_settings(), FakeBackend())
    starter = threading.Timer(delay_s, srv.__enter__)
    starter.start()
    try:
        yield srv
    finally:
        starter.join()
        srv.__exit__()


def test_a_call_made_before_the_server_listens_succeeds_once_it_does() -> None:
    with started_later(0.5) as srv, Client(srv.url, retries=10, backoff_s=0.1, max_wait_s=0.5) as client:
        assert client.ready() is False
        result = client.detect(PNG, prompt="cat")  # refused, refused, ..., then answered
        assert result.detections[0].label == "cat"
        assert client.ready() is True


def test_503_with_retry_after_then_200_gives_the_answer() -> None:
    with Scripted(BUSY, COCO) as server, Client(server.url, retries=2) as client:
        began = time.monotonic()
        assert client.job_result("j1") == COCO[1]  # type: ignore[index]
        assert time.monotonic() - began >= 0.2
    assert server.seen == ["GET /v1/jobs/j1/result"] * 2


def test_503_retries_are_bounded() -> None:
    with (
        Scripted(BUSY) as server,
        Client(server.url, retries=1) as client,
        pytest.raises(Overloaded) as caught,
    ):
        client.job_result("j1")
    assert (caught.value.code, caught.value.retry_after_s) == ("queue_full", 0.2)
    assert len(server.seen) == 2


async def _busy_then_done(url: str) -> dict[str, Any]:
    async with AsyncClient(url, retries=2) as client:
        return await client.job_result("j1")


def test_the_async_client_retries_a_503_too() -> None:
    with Scripted(BUSY, COCO) as server:
        assert asyncio.run(_busy_then_done(server.url)) == COCO[1]  # type: ignore[index]
    assert len(server.seen) == 2


def test_a_dropped_connection_is_retried_for_get_and_delete_but_never_for_post() -> None:
    with Scripted(HANG_UP) as server, Client(server.url, retries=2, backoff_s=0.01) as client:
        with pytest.raises(TransportError) as caught:
            client.job_result("j1")
        assert server.seen == ["GET /v1/jobs/j1/result"] * 3
        with pytest.raises(TransportError):
            client.cancel_job("j1")
        assert server.seen[3:] == ["DELETE /v1/jobs/j1"] * 3
        with pytest.raises(TransportError) as posted:
            client.detect(PNG, prompt="cat")  # it reached the server: sending it again could run it twice
        assert server.seen[6:] == ["POST /v1/detect"]
    for error in (caught.value, posted.value):
        assert not isinstance(error, ConnectionFailed) and error.code == "connection_lost"
        assert server.url in str(error) and "connection broke" in str(error)


def test_a_get_whose_connection_dropped_once_gets_its_answer_on_the_retry() -> None:
    with Scripted(HANG_UP, COCO) as server, Client(server.url, backoff_s=0.01) as client:
        assert client.job_result("j1") == COCO[1]  # type: ignore[index]
    assert len(server.seen) == 2


def test_a_timeout_is_a_transport_error_and_is_not_repeated() -> None:
    with (
        Scripted(1.0) as server,
        Client(server.url, timeout=0.2, backoff_s=0.01) as client,
        pytest.raises(TransportError) as caught,
    ):
        client.job("j1")
    assert caught.value.code == "timeout" and "timeout=" in str(caught.value)
    assert server.seen == ["GET /v1/jobs/j1"]  # it already waited the whole timeout once


def test_a_url_without_a_scheme_reaches_the_local_server(
    server: ThreadServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    for url in (f"127.0.0.1:{server.port}", f"localhost:{server.port}/"):
        with Client(url) as client:
            assert client.url == f"http://{url.rstrip('/')}"
            assert client.ready() and client.models().pipelines
    monkeypatch.setenv("TUNNELVISION_URL", f"127.0.0.1:{server.port}")
    with Client() as from_environment:
        assert from_environment.detect(PNG, prompt="cat").detections


@pytest.mark.parametrize(
    ("given", "used"),
    [
        ("localhost", "http://localhost"),
        ("[::1]:8000", "http://[::1]:8000"),
        ("10.0.0.5:8000", "http://10.0.0.5:8000"),
        ("api.example.com", "https://api.example.com"),  # a public hostname: a tunnel, so https
        ("api.example.com:443/", "https://api.example.com:443"),
        ("http://127.0.0.1:8000/", "http://127.0.0.1:8000"),
    ],
)
def test_base_url_fills_in_the_scheme(given: str, used: str) -> None:
    assert base_url(given) == used


@pytest.mark.parametrize("given", ["ftp://example.com", "127.0.0.1:port", "http://", "://x"])
def test_a_url_that_cannot_work_is_refused_at_once(given: str) -> None:
    with pytest.raises(ValueError, match="http://HOST:PORT"):
        Client(given)
