"""Where a key may travel: our headers everywhere; Basic auth (Label Studio) and a `Token` header
(X-AnyLabeling) everywhere; `?api_key=` and a JSON body's `api_key` (Roboflow's inference-sdk)
only on the Roboflow-shaped routes, where the body is read within the body limit to find it."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.requests import Request

from support import FakeBackend, ThreadServer, image_bytes, make_settings
from tunnelvision.security.keys import KeyStore

ROBOFLOW_PATH = "/sam2/segment_image"  # any path of that shape: the guard decides before routing
BODY_LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    store = KeyStore(tmp_path_factory.mktemp("keys") / "keys.json")
    key = store.add("alice", ["predict"])
    settings = make_settings(keys_file=store.path, rate_limit_per_minute=0, max_body_bytes=BODY_LIMIT)
    with ThreadServer(settings, FakeBackend()) as server:
        yield server.url, key


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.mark.parametrize(
    ("headers", "status"),
    [
        ({"Authorization": "basic:KEY"}, 200),  # Label Studio's connection dialog
        ({"Authorization": "basic-no-user:KEY"}, 200),
        ({"Authorization": "basic:wrong"}, 401),
        ({"Authorization": "Basic !!not-base64!!"}, 401),
        ({"Authorization": "basic:"}, 401),  # a user name and no password is no key
        ({"Token": "KEY"}, 200),  # X-AnyLabeling's header
        ({"Token": "wrong"}, 401),
        ({"Authorization": "Token KEY"}, 401),  # not a scheme we take: the key stays unread
    ],
)
def test_keys_in_the_headers_labeling_tools_can_send(
    keyed: tuple[str, str], headers: dict[str, str], status: int
) -> None:
    url, key = keyed
    resolved = {name: _fill(value, key) for name, value in headers.items()}
    response = httpx.get(f"{url}/v1/models", headers=resolved, timeout=10)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.json()["error"]["code"] == "unauthorized"


def _fill(value: str, key: str) -> str:
    if value.startswith("basic:"):
        return basic("label-studio", value.removeprefix("basic:").replace("KEY", key))
    if value.startswith("basic-no-user:"):
        return basic("", value.removeprefix("basic-no-user:").replace("KEY", key))
    return value.replace("KEY", key)


def test_a_key_in_the_query_or_body_counts_only_on_roboflow_routes(keyed: tuple[str, str]) -> None:
    url, key = keyed
    body = {"api_key": key, "image": {"type": "base64", "value": "AAAA"}}
    on_roboflow = [
        httpx.post(f"{url}{ROBOFLOW_PATH}", params={"api_key": key}, json={}, timeout=10),
        httpx.post(f"{url}{ROBOFLOW_PATH}", json=body, timeout=10),
    ]
    for response in on_roboflow:
        assert response.status_code not in (401, 403), response.text
    elsewhere = [
        httpx.post(f"{url}/v1/detect", params={"api_key": key}, json={"prompt": "cat"}, timeout=10),
        httpx.post(f"{url}/v1/detect", json={**body, "prompt": "cat"}, timeout=10),
        httpx.get(f"{url}/v1/models", params={"api_key": key}, timeout=10),
    ]
    for response in elsewhere:
        assert response.status_code == 401, response.text


@pytest.mark.parametrize(
    "body",
    [
        b'{"api_key": "wrong"}',
        b'{"api_key": 12345}',
        b'{"api_key": ["KEY"]}',  # a key only counts as a string
        b'{"api_key": "KEY"',  # not JSON: holds no key
        b"[" * 5_000 + b'"api_key"',  # too deep for the one JSON reader: holds no key
        b'"api_key"',
    ],
)
def test_a_body_without_a_usable_key_is_unauthenticated(keyed: tuple[str, str], body: bytes) -> None:
    url, key = keyed
    body = body.replace(b"KEY", key.encode())
    response = httpx.post(
        f"{url}{ROBOFLOW_PATH}", content=body, headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == 401, response.text
    assert response.json()["error"]["code"] == "unauthorized"


def test_the_body_read_for_a_key_stops_at_the_body_limit(keyed: tuple[str, str]) -> None:
    url, key = keyed
    padding = "x" * (BODY_LIMIT + 1)

    def chunks() -> Iterator[bytes]:  # streamed: no Content-Length to refuse it by
        yield json.dumps({"api_key": key, "pad": padding}).encode()

    response = httpx.post(
        f"{url}{ROBOFLOW_PATH}", content=chunks(), headers={"Content-Type": "application/json"}, timeout=10
    )
    assert response.status_code == 413, response.text
    assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200


def test_the_route_receives_the_body_the_guard_read(tmp_path: Path) -> None:
    """The body read for its key is replayed to the route whole, and the parse is kept."""
    store = KeyStore(tmp_path / "keys.json")
    key = store.add("alice", ["predict"])
    settings = make_settings(keys_file=store.path, rate_limit_per_minute=0)
    server = ThreadServer(settings, FakeBackend())
    seen: dict[str, object] = {}

    @server.app.post("/sam2/echo_for_test")
    async def echo(request: Request) -> dict[str, object]:
        seen["body"] = await request.body()
        seen["parsed"] = getattr(request.state, "json_body", None)
        return {}

    payload = {"api_key": key, "image": {"type": "base64", "value": "aGVsbG8="}, "png": image_bytes().hex()}
    with server:
        response = httpx.post(f"{server.url}/sam2/echo_for_test", json=payload, timeout=10)
    assert response.status_code == 200, response.text
    assert json.loads(seen["body"]) == payload  # type: ignore[arg-type]
    assert seen["parsed"] == payload


def test_an_authorization_header_without_a_scheme_says_how_to_send_the_key(keyed: tuple[str, str]) -> None:
    url, key = keyed
    response = httpx.get(f"{url}/v1/models", headers={"Authorization": key}, timeout=10)
    assert response.status_code == 401
    message = response.json()["error"]["message"]
    assert "holds no key" in message and "Bearer KEY" in message
    assert key not in response.text
