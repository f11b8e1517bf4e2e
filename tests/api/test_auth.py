"""Authentication, limits, proxy trust, CORS and the access log, over real HTTP."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import FakeBackend, JwksServer, ThreadServer, image_bytes, make_settings
from tunnelvision.security.keys import KeyStore

PNG = image_bytes(32, 24)
PROTECTED = [
    ("GET", "/v1/models"),
    ("POST", "/v1/detect"),
    ("POST", "/v1/segment"),
]
PUBLIC = [("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/docs"), ("GET", "/openapi.json")]


def call(url: str, method: str, path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    if method == "POST":
        return httpx.post(
            url + path, files={"image": ("i.png", PNG)}, data={"prompt": "cat"}, headers=headers, timeout=10
        )
    return httpx.get(url + path, headers=headers, timeout=10)


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, str, str]:
    store = KeyStore(tmp_path / "keys.json")
    good = store.add("alice")
    revoked = store.add("mallory")
    store.revoke("mallory")
    return store.path, good, revoked


@pytest.fixture
def keyed(keys: tuple[Path, str, str]) -> Iterator[ThreadServer]:
    with ThreadServer(make_settings(keys_file=keys[0], rate_limit_per_minute=0), FakeBackend()) as srv:
        yield srv


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    ("credentials", "status"),
    [
        ("none", 401),
        ("wrong", 401),
        ("revoked", 401),
        ("bearer", 200),
        ("x-api-key", 200),
        ("lowercase-bearer", 200),
    ],
)
def test_auth_matrix_on_protected_routes(
    keyed: ThreadServer, keys: tuple[Path, str, str], method: str, path: str, credentials: str, status: int
) -> None:
    _, good, revoked = keys
    headers = {
        "none": {},
        "wrong": {"Authorization": "Bearer tv_wrong"},
        "revoked": {"X-API-Key": revoked},
        "bearer": {"Authorization": f"Bearer {good}"},
        "x-api-key": {"X-API-Key": good},
        "lowercase-bearer": {"authorization": f"bearer {good}"},
    }[credentials]
    response = call(keyed.url, method, path, headers)
    assert response.status_code == status, response.text
    if status == 401:
        assert response.headers["www-authenticate"] == 'Bearer realm="tunnelvision"'
        assert response.json()["error"]["code"] == "unauthorized"
        assert good not in response.text


@pytest.mark.parametrize(("method", "path"), PUBLIC)
def test_health_and_docs_stay_public(keyed: ThreadServer, method: str, path: str) -> None:
    assert call(keyed.url, method, path).status_code == 200


def test_docs_can_be_protected(keys: tuple[Path, str, str]) -> None:
    settings = make_settings(keys_file=keys[0], public_docs=False)
    with ThreadServer(settings, FakeBackend()) as srv:
        assert call(srv.url, "GET", "/openapi.json").status_code == 401
        assert call(srv.url, "GET", "/docs", {"X-API-Key": keys[1]}).status_code == 200
        assert call(srv.url, "GET", "/healthz").status_code == 200


def test_a_key_revoked_while_serving_stops_working_at_once(
    keyed: ThreadServer, keys: tuple[Path, str, str]
) -> None:
    path, good, _ = keys
    assert call(keyed.url, "GET", "/v1/models", {"X-API-Key": good}).status_code == 200
    KeyStore(path).revoke("alice")
    assert call(keyed.url, "GET", "/v1/models", {"X-API-Key": good}).status_code == 401


def test_openapi_offers_both_key_headers(keyed: ThreadServer) -> None:
    schemes = httpx.get(keyed.url + "/openapi.json").json()["components"]["securitySchemes"]
    assert {s["type"] for s in schemes.values()} == {"http", "apiKey"}


def access_settings(jwks: JwksServer, **extra: Any) -> Any:
    return make_settings(
        access_team_domain="team",
        access_aud="aud-tag",
        access_certs_url=jwks.url,
        access_jwks_cooldown_s=0,
        **extra,
    )


def test_cloudflare_access_jwt_matrix(jwks: JwksServer) -> None:
    with ThreadServer(access_settings(jwks), FakeBackend()) as srv:

        def status(token: str | None) -> int:
            headers = {"Cf-Access-Jwt-Assertion": token} if token else {}
            return call(srv.url, "POST", "/v1/detect", headers).status_code

        assert status(jwks.token("kid-1")) == 200
        assert status(None) == 401
        assert status(jwks.token("kid-1", aud="other")) == 401
        assert status(jwks.token("kid-1", team="evil")) == 401
        assert status(jwks.token("kid-1", expires_in=-10)) == 401
        assert status(jwks.token("kid-2", private=jwks.keys["kid-1"])) == 401  # unknown kid
        jwks.add_key("kid-2")  # the team's keys rotate
        assert status(jwks.token("kid-2")) == 200


def test_an_access_login_gets_the_access_scopes_and_admin_only_when_granted(jwks: JwksServer) -> None:
    login = {"Cf-Access-Jwt-Assertion": jwks.token("kid-1")}
    with ThreadServer(access_settings(jwks), FakeBackend()) as srv:  # default: predict,jobs
        assert call(srv.url, "POST", "/v1/detect", login).status_code == 200
        assert call(srv.url, "GET", "/v1/jobs/x", login).status_code == 404
        refused = call(srv.url, "GET", "/metrics", login)
        assert refused.status_code == 403
        assert refused.json()["error"]["message"] == (
            "this Cloudflare Access login lacks the 'admin' scope (its scopes: predict, jobs)"
        )
    with ThreadServer(access_settings(jwks, access_scopes="admin"), FakeBackend()) as srv:
        assert call(srv.url, "GET", "/metrics", login).status_code == 200  # e.g. a scraper's token
        assert call(srv.url, "POST", "/v1/detect", login).status_code == 403


def test_with_both_credentials_the_keys_scopes_apply(jwks: JwksServer, tmp_path: Path) -> None:
    ops = KeyStore(tmp_path / "keys.json").add("ops", ["admin"])
    both = {"X-API-Key": ops, "Cf-Access-Jwt-Assertion": jwks.token("kid-1")}
    settings = access_settings(jwks, auth="both", keys_file=tmp_path / "keys.json")
    with ThreadServer(settings, FakeBackend()) as srv:
        assert call(srv.url, "GET", "/metrics", both).status_code == 200
        assert call(srv.url, "POST", "/v1/detect", both).status_code == 403


@pytest.mark.parametrize(
    ("policy", "key", "jwt", "status"),
    [
        ("either", True, False, 200),
        ("either", False, True, 200),
        ("either", False, False, 401),
        ("both", True, False, 401),
        ("both", False, True, 401),
        ("both", True, True, 200),
        ("keys", False, True, 401),
        ("access", True, False, 401),
    ],
)
def test_auth_policies(
    jwks: JwksServer, keys: tuple[Path, str, str], policy: str, key: bool, jwt: bool, status: int
) -> None:
    settings = access_settings(jwks, auth=policy, keys_file=keys[0])
    headers = {}
    if key:
        headers["X-API-Key"] = keys[1]
    if jwt:
        headers["Cf-Access-Jwt-Assertion"] = jwks.token("kid-1")
    with ThreadServer(settings, FakeBackend()) as srv:
        assert call(srv.url, "GET", "/v1/models", headers).status_code == status


def test_rate_limit_answers_429_with_retry_after_per_client(keys: tuple[Path, str, str]) -> None:
    store = KeyStore(keys[0])
    bob = store.add("bob")
    settings = make_settings(keys_file=keys[0], rate_limit_per_minute=6, rate_limit_burst=3)
    with ThreadServer(settings, FakeBackend()) as srv:
        codes = [call(srv.url, "GET", "/v1/models", {"X-API-Key": keys[1]}).status_code for _ in range(5)]
        assert codes == [200, 200, 200, 429, 429]
        limited = call(srv.url, "GET", "/v1/models", {"X-API-Key": keys[1]})
        assert limited.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(limited.headers["retry-after"]) <= 10
        assert call(srv.url, "GET", "/v1/models", {"X-API-Key": bob}).status_code == 200  # own bucket
        assert call(srv.url, "GET", "/healthz").status_code == 200  # health is never limited


def test_anonymous_clients_are_limited_by_address_trusting_only_loopback_proxies() -> None:
    settings = make_settings(rate_limit_per_minute=60, rate_limit_burst=1)
    with ThreadServer(settings, FakeBackend()) as srv:

        def via(ip: str) -> int:
            return call(srv.url, "GET", "/v1/models", {"CF-Connecting-IP": ip}).status_code

        assert [via("203.0.113.1"), via("203.0.113.1"), via("203.0.113.2")] == [200, 429, 200]
    untrusting = make_settings(rate_limit_per_minute=60, rate_limit_burst=1, trusted_proxies="10.0.0.0/8")
    with ThreadServer(untrusting, FakeBackend()) as srv:
        first = call(srv.url, "GET", "/v1/models", {"CF-Connecting-IP": "203.0.113.1"})
        second = call(srv.url, "GET", "/v1/models", {"CF-Connecting-IP": "203.0.113.2"})
        assert (first.status_code, second.status_code) == (200, 429)  # header ignored: same peer


def test_one_client_cannot_fill_the_queue() -> None:
    fake = FakeBackend()
    fake.slow_s = 1.0
    settings = make_settings(max_inflight_per_client=2, rate_limit_per_minute=0)
    with ThreadServer(settings, fake) as srv, ThreadPoolExecutor(3) as pool:

        def slow() -> httpx.Response:
            return httpx.post(
                srv.url + "/v1/segment",
                files={"image": ("i.png", PNG)},
                data={"prompt": "slow cat"},
                timeout=10,
            )

        busy = [pool.submit(slow) for _ in range(2)]
        time.sleep(0.3)
        third = slow()
        assert third.status_code == 429 and third.json()["error"]["code"] == "too_many_inflight"
        other = call(srv.url, "GET", "/v1/models", {"CF-Connecting-IP": "198.51.100.3"})
        assert other.status_code == 200
        assert [f.result().status_code for f in busy] == [200, 200]


def test_cors_is_off_by_default_and_follows_the_allowlist() -> None:
    preflight = {"Origin": "https://app.example.com", "Access-Control-Request-Method": "POST"}
    with ThreadServer(make_settings(), FakeBackend()) as srv:
        response = httpx.options(srv.url + "/v1/detect", headers=preflight)
        assert "access-control-allow-origin" not in response.headers
    with ThreadServer(make_settings(cors_origins="https://app.example.com"), FakeBackend()) as srv:
        allowed = httpx.options(srv.url + "/v1/detect", headers=preflight)
        assert allowed.headers["access-control-allow-origin"] == "https://app.example.com"
        other = httpx.options(srv.url + "/v1/detect", headers={**preflight, "Origin": "https://evil.example"})
        assert "access-control-allow-origin" not in other.headers


def test_access_log_is_json_with_key_name_never_the_key(
    keyed: ThreadServer, keys: tuple[Path, str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tunnelvision.access")
    headers = {"X-API-Key": keys[1], "CF-Connecting-IP": "203.0.113.77", "CF-Ray": "abc123-LHR"}
    assert call(keyed.url, "POST", "/v1/segment", headers).status_code == 200
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "tunnelvision.access"]
    (record,) = [r for r in records if r["path"] == "/v1/segment"]
    assert record["principal"] == "key:alice" and record["client"] == "203.0.113.77"
    assert record["request_id"] == "abc123-LHR" and record["status"] == 200
    assert record["queue_ms"] is not None and record["device_ms"] is not None
    assert keys[1] not in caplog.text
