"""Scopes over real HTTP: a key calls only what its scopes allow, whatever path it tries, and the
refusal costs the server nothing (no body read, no routing)."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import FakeBackend, ThreadServer, image_bytes, make_settings
from tunnelvision.security.keys import KeyStore

PNG = image_bytes(32, 24)
PASSES = 0  # the guard lets it through; the route's own answer is another test's business
KEYS = {  # name -> scopes
    "seer": ("predict",),
    "batcher": ("jobs",),
    "ops": ("predict", "jobs", "admin"),
}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadServer, dict[str, str]]]:
    store = KeyStore(tmp_path_factory.mktemp("keys") / "keys.json")
    keys = {name: store.add(name, scopes) for name, scopes in KEYS.items()}
    with ThreadServer(make_settings(keys_file=store.path, rate_limit_per_minute=0), FakeBackend()) as srv:
        yield srv, keys


def send(url: str, method: str, path: str, key: str | None) -> httpx.Response:
    headers = {"X-API-Key": key} if key else {}
    if method == "POST":
        return httpx.post(
            url + path, files={"image": ("i.png", PNG)}, data={"prompt": "cat"}, headers=headers, timeout=10
        )
    return httpx.request(method, url + path, headers=headers, timeout=10)


@pytest.mark.parametrize(
    ("key", "method", "path", "status"),
    [
        ("seer", "POST", "/v1/detect", 200),
        ("seer", "POST", "/v1/segment", 200),
        ("seer", "GET", "/v1/models", PASSES),
        ("seer", "GET", "/v1/jobs/some-job", 403),
        ("seer", "DELETE", "/v1/jobs/some-job", 403),
        ("seer", "GET", "/metrics", 403),
        ("batcher", "POST", "/v1/segment", 403),
        ("batcher", "POST", "/v1/annotate", 403),
        ("batcher", "GET", "/v1/models", 403),
        ("batcher", "GET", "/v1/jobs/some-job", 404),  # allowed in: the job does not exist
        ("batcher", "GET", "/metrics", 403),
        ("ops", "GET", "/metrics", 200),
        ("ops", "POST", "/v1/annotate", 200),
        ("ops", "GET", "/v1/jobs/some-job", 404),
        # Not built yet, but declared: only an admin key gets as far as the router.
        ("seer", "POST", "/v1/models/default/reload", 403),
        ("batcher", "POST", "/v1/models/default/reload", 403),
        # Fail closed: a path no rule names needs admin; the check comes before routing.
        ("seer", "GET", "/v1/secret-admin-thing", 403),
        ("batcher", "POST", "/v2/detect", 403),
        ("ops", "GET", "/v1/secret-admin-thing", 404),
        ("seer", "PUT", "/v1/models", 403),  # only reading the models is predict
        ("ops", "PUT", "/v1/models", 405),
    ],
)
def test_each_key_reaches_only_its_scopes(
    served: tuple[ThreadServer, dict[str, str]], key: str, method: str, path: str, status: int
) -> None:
    server, keys = served
    response = send(server.url, method, path, keys[key])
    if status == PASSES:
        assert response.status_code not in (401, 403), response.text
        return
    assert response.status_code == status, response.text
    if status == 403:
        error = response.json()["error"]
        assert error["code"] == "forbidden" and error["request_id"] == response.headers["x-request-id"]
        assert "scope" in error["message"] and keys[key] not in response.text


def test_the_refusal_names_the_missing_scope_and_what_the_key_has(
    served: tuple[ThreadServer, dict[str, str]],
) -> None:
    server, keys = served
    jobs = send(server.url, "GET", "/v1/jobs/x", keys["seer"]).json()["error"]["message"]
    assert jobs == "this key lacks the 'jobs' scope (its scopes: predict)"
    admin = send(server.url, "GET", "/metrics", keys["batcher"]).json()["error"]["message"]
    assert admin == "this key lacks the 'admin' scope (its scopes: jobs)"


def test_without_credentials_it_is_still_401_not_403(served: tuple[ThreadServer, dict[str, str]]) -> None:
    server, _ = served
    for path in ("/metrics", "/v1/jobs/x", "/v1/secret-admin-thing"):
        assert send(server.url, "GET", path, None).status_code == 401
        assert send(server.url, "GET", path, "tv_guess").status_code == 401


def test_a_forbidden_upload_is_refused_before_its_body_is_read(
    served: tuple[ThreadServer, dict[str, str]],
) -> None:
    """A predict-only key announcing a 30 MB job upload gets 403 at once, with no byte sent."""
    server, keys = served
    head = (
        f"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {keys['seer']}\r\n"
        "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 30000000\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
        sock.sendall(head.encode())
        answer = sock.recv(4096).decode("latin-1")
    assert answer.startswith("HTTP/1.1 403"), answer
    assert '"forbidden"' in answer


def test_keys_from_before_scopes_keep_predict_and_jobs(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    old = store.add("legacy")
    document = json.loads(store.path.read_text())
    for entry in document["keys"]:
        del entry["scopes"]  # the file as the previous release wrote it
    store.path.write_text(json.dumps(document))
    with ThreadServer(make_settings(keys_file=store.path, rate_limit_per_minute=0), FakeBackend()) as srv:
        assert send(srv.url, "POST", "/v1/detect", old).status_code == 200
        assert send(srv.url, "GET", "/v1/jobs/x", old).status_code == 404  # jobs: let in
        assert send(srv.url, "GET", "/metrics", old).status_code == 403  # never admin by default
    assert [entry.scopes for entry in KeyStore(store.path).entries()] == [("predict", "jobs")]


def test_scopes_edited_while_serving_apply_at_once_and_a_bad_edit_never_widens_them(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    key = store.add("ops", ["predict", "jobs", "admin"])
    with ThreadServer(make_settings(keys_file=store.path, rate_limit_per_minute=0), FakeBackend()) as srv:
        assert send(srv.url, "GET", "/metrics", key).status_code == 200
        document = json.loads(store.path.read_text())
        document["keys"][0]["scopes"] = ["predict"]  # the operator narrows the key by hand
        store.path.write_text(json.dumps(document))
        assert send(srv.url, "GET", "/metrics", key).status_code == 403
        assert send(srv.url, "GET", "/v1/jobs/x", key).status_code == 403
        document["keys"][0]["scopes"] = ["predict", "Admin"]  # a typo: the file is unusable
        store.path.write_text(json.dumps(document))
        assert send(srv.url, "GET", "/metrics", key).status_code == 403  # the last good set holds
        assert send(srv.url, "POST", "/v1/detect", key).status_code == 200
        ready = httpx.get(srv.url + "/readyz", headers={"X-API-Key": key}, timeout=10).json()
        assert "unknown scope 'Admin'" in ready["auth"]["keys_file"]["problem"]


def test_with_no_authentication_configured_every_scope_is_allowed() -> None:
    with ThreadServer(make_settings(rate_limit_per_minute=0), FakeBackend()) as srv:  # loopback, no keys
        assert send(srv.url, "GET", "/metrics", None).status_code == 200
        assert send(srv.url, "GET", "/v1/jobs/x", None).status_code == 404
        assert send(srv.url, "GET", "/v1/secret-admin-thing", None).status_code == 404
