"""Auth that never fails open: a careless operator breaks the keys file or the JWKS changes while
the real server (uvicorn on 127.0.0.1) is answering."""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import FakeBackend, JwksServer, ThreadServer, make_settings, wait_for
from tunnelvision.errors import ModelUnavailable
from tunnelvision.security.keys import KeyStore

ROUTES = {"/v1/models": 200, "/metrics": 200, "/v1/jobs/unknown-job": 404}  # status with a key


def status(url: str, path: str = "/v1/models", key: str | None = None) -> int:
    headers = {"X-API-Key": key} if key else {}
    return httpx.get(url + path, headers=headers, timeout=10).status_code


@pytest.fixture
def alice(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "keys.json"
    return path, KeyStore(path).add("alice", ["predict", "jobs", "admin"])


@pytest.fixture
def keyed(alice: tuple[Path, str]) -> Iterator[ThreadServer]:
    with ThreadServer(make_settings(keys_file=alice[0], rate_limit_per_minute=0), FakeBackend()) as srv:
        yield srv


def _delete(path: Path) -> None:
    path.unlink()


def _truncate(path: Path) -> None:
    text = path.read_text()
    path.write_text(text[: len(text) // 2])


def _empty(path: Path) -> None:
    path.write_text("")


def _not_json(path: Path) -> None:
    path.write_bytes(b"\xff\xfe garbage \x00")


def _lacks_fields(path: Path) -> None:
    path.write_text('{"keys": [{"name": "alice"}]}')


def _deeply_nested(path: Path) -> None:
    path.write_text("[" * 100_000)


def _folder(path: Path) -> None:  # unreadable as a file; chmod 000 means nothing to root
    path.unlink()
    path.mkdir()


def _fifo(path: Path) -> None:  # reading it would block the server forever
    path.unlink()
    os.mkfifo(path)


BREAKAGES: dict[str, Callable[[Path], None]] = {
    "deleted": _delete,
    "truncated": _truncate,
    "empty": _empty,
    "not-json": _not_json,
    "lacks-fields": _lacks_fields,
    "deeply-nested": _deeply_nested,
    "folder": _folder,
    "fifo": _fifo,
}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_a_broken_keys_file_keeps_the_last_good_keys_until_fixed(
    keyed: ThreadServer, alice: tuple[Path, str], breakage: str
) -> None:
    path, key = alice
    assert status(keyed.url) == 401 and status(keyed.url, key=key) == 200
    BREAKAGES[breakage](path)
    for route, with_key in ROUTES.items():
        assert status(keyed.url, route) == 401, route  # never open
        assert status(keyed.url, route, key) == with_key, route  # never a 500: the last good set
        assert status(keyed.url, route, "tv_guess") == 401, route
    assert status(keyed.url, "/healthz") == 200
    # Fixed: the new file is read again (no restart), and only its keys count.
    _remove(path)
    carol = KeyStore(path).add("carol")
    assert status(keyed.url, key=carol) == 200
    assert status(keyed.url, key=key) == 401
    assert status(keyed.url) == 401


def test_the_problem_is_logged_once_not_per_request(
    keyed: ThreadServer, alice: tuple[Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tunnelvision.security.keys")
    path, key = alice
    _truncate(path)
    codes = {status(keyed.url, key=key) for _ in range(20)}
    assert codes == {200}
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "not valid JSON" in errors[0].getMessage()
    assert key not in caplog.text
    _remove(path)
    KeyStore(path).add("alice2")
    status(keyed.url, key="tv_any")  # any request with a key picks the fixed file up
    assert any("usable again" in r.getMessage() for r in caplog.records)


def test_a_keys_file_created_while_serving_turns_keys_on(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    with ThreadServer(make_settings(keys_file=path), FakeBackend()) as srv:
        assert status(srv.url) == 200  # no keys at start: open (loopback development)
        key = KeyStore(path).add("late")
        assert status(srv.url) == 401
        assert status(srv.url, key=key) == 200
        path.unlink()
        assert status(srv.url) == 401  # and never off again


# -- /readyz: a word for anyone, details for callers with a key ------------------------------


def test_readyz_tells_anonymous_callers_only_ready_or_not(
    keyed: ThreadServer, alice: tuple[Path, str]
) -> None:
    path, key = alice
    anonymous = httpx.get(keyed.url + "/readyz")
    assert anonymous.status_code == 200 and anonymous.json() == {"status": "ready"}
    wrong = httpx.get(keyed.url + "/readyz", headers={"X-API-Key": "tv_wrong"})
    assert wrong.status_code == 200 and wrong.json() == {"status": "ready"}  # not a 401
    known = httpx.get(keyed.url + "/readyz", headers={"Authorization": f"Bearer {key}"}).json()
    assert known["status"] == "ready" and known["phase"] == "ready"
    assert {"queued", "running", "executed"} <= set(known["queue"])
    assert known["auth"] == {"policy": "keys", "keys_file": {"path": str(path), "problem": None}}
    _truncate(path)
    broken = httpx.get(keyed.url + "/readyz", headers={"X-API-Key": key}).json()
    assert "not valid JSON" in broken["auth"]["keys_file"]["problem"]
    assert httpx.get(keyed.url + "/readyz").json() == {"status": "ready"}


def _starting_server(settings: Any, factory: Callable[[Any], list[Any]]) -> ThreadServer:
    srv = ThreadServer(settings, FakeBackend())
    srv.app.state.tunnelvision.backend_factory = factory
    srv.thread.start()
    wait_for(lambda: _answers(srv.url))
    return srv


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz").status_code == 200
    except httpx.HTTPError:
        return False


def test_readyz_hides_the_failure_text_from_anonymous_callers(alice: tuple[Path, str]) -> None:
    def broken(settings: Any) -> list[Any]:
        raise ModelUnavailable("cannot load the detector '/srv/secret/models/x': unreachable")

    failures: list[str] = []
    srv = ThreadServer(make_settings(keys_file=alice[0]), FakeBackend())
    srv.app.state.tunnelvision.on_fatal = failures.append
    srv.app.state.tunnelvision.backend_factory = broken
    srv.thread.start()
    try:
        wait_for(lambda: bool(failures))
        anonymous = httpx.get(srv.url + "/readyz")
        assert anonymous.status_code == 503 and anonymous.headers["retry-after"] == "5"
        body = anonymous.json()
        assert body["status"] == "not_ready" and body["reason"] == "failed"
        assert body["error"]["code"] == "not_ready"
        assert "/srv/secret" not in anonymous.text and "queue" not in body and "phase" not in body
        known = httpx.get(srv.url + "/readyz", headers={"X-API-Key": alice[1]})
        assert known.status_code == 503 and "/srv/secret/models/x" in known.json()["detail"]
        assert "/srv/secret/models/x" in known.json()["error"]["message"]
    finally:
        srv.__exit__()


def test_readyz_while_loading_says_loading_in_a_word() -> None:
    release = threading.Event()

    def slow(settings: Any) -> list[Any]:
        assert release.wait(10)
        return [FakeBackend()]

    srv = _starting_server(make_settings(), slow)
    try:
        loading = httpx.get(srv.url + "/readyz")
        assert loading.status_code == 503 and loading.headers["retry-after"] == "5"
        assert loading.json()["reason"] == "loading" and "phase" not in loading.json()
        release.set()
        wait_for(lambda: httpx.get(srv.url + "/readyz").status_code == 200)
    finally:
        release.set()
        srv.__exit__()


# -- Cloudflare Access: the team's key set changes -------------------------------------------


def test_a_key_removed_from_the_jwks_stops_working_after_the_next_refresh(jwks: JwksServer) -> None:
    settings = make_settings(
        access_team_domain="team",
        access_aud="aud-tag",
        access_certs_url=jwks.url,
        access_jwks_cooldown_s=0,
        access_jwks_lifespan_s=0.5,
        rate_limit_per_minute=0,
    )
    with ThreadServer(settings, FakeBackend()) as srv:

        def status_with(token: str) -> int:
            headers = {"Cf-Access-Jwt-Assertion": token}
            return httpx.get(srv.url + "/v1/models", headers=headers, timeout=10).status_code

        old = jwks.token("kid-1")
        assert status_with(old) == 200
        jwks.add_key("kid-2")
        del jwks.keys["kid-1"]  # the team removed a key (rotated, or leaked)
        wait_for(lambda: status_with(old) == 401, timeout_s=10)
        assert status_with(jwks.token("kid-2")) == 200
        readyz = httpx.get(srv.url + "/readyz", headers={"Cf-Access-Jwt-Assertion": jwks.token("kid-2")})
        assert readyz.json()["auth"] == {"policy": "access", "keys_file": None}
