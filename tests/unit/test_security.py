from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from support import JwksServer, make_settings, wait_for
from tunnelvision.exposure import UnsafeExposure, check_exposure, is_loopback, require_auth_for_publishing
from tunnelvision.security.access import AccessDenied, AccessVerifier
from tunnelvision.security.keys import KeyCommandError, KeyStore, parse_scopes
from tunnelvision.security.proxy import client_address, parse_networks
from tunnelvision.security.ratelimit import InflightLimiter, RateLimiter


def test_keys_are_shown_once_stored_hashed_and_revocable(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    store = KeyStore(path)
    key = store.add("alice")
    assert key.startswith("tv_") and len(key) > 40
    assert key not in path.read_text()  # only the hash is on disk
    assert path.stat().st_mode & 0o777 == 0o600
    assert store.verify(key) == "alice"
    assert store.verify(key + "x") is None and store.verify("") is None
    other_process = KeyStore(path)
    assert other_process.verify(key) == "alice"
    store.revoke("alice")
    assert other_process.verify(key) is None  # re-read on change: no restart needed
    with pytest.raises(KeyCommandError):
        store.revoke("alice")


def test_key_names_are_unique_and_plain(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    store.add("ci-bot")
    with pytest.raises(KeyCommandError, match="exists"):
        store.add("ci-bot")
    with pytest.raises(KeyCommandError, match="letters"):
        store.add("bad name!")
    assert [k.name for k in store.entries()] == ["ci-bot"]


def test_token_bucket_allows_a_burst_then_the_rate() -> None:
    now = [0.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0  # buckets are per client
    now[0] += 0.5
    assert limiter.acquire("a") == 0.0


def test_inflight_cap_counts_per_client() -> None:
    cap = InflightLimiter(2)
    assert cap.try_enter("a") and cap.try_enter("a") and not cap.try_enter("a")
    assert cap.try_enter("b")
    cap.leave("a")
    assert cap.try_enter("a")


@pytest.mark.parametrize(
    ("peer", "headers", "expected"),
    [
        ("127.0.0.1", {"cf-connecting-ip": "203.0.113.9"}, "203.0.113.9"),
        ("127.0.0.1", {"x-forwarded-for": "6.6.6.6, 198.51.100.7"}, "198.51.100.7"),
        ("::1", {"cf-connecting-ip": "2001:db8::1"}, "2001:db8::1"),
        ("127.0.0.1", {"cf-connecting-ip": "not an ip"}, "127.0.0.1"),
        ("192.0.2.50", {"cf-connecting-ip": "203.0.113.9"}, "192.0.2.50"),  # untrusted peer
        ("192.0.2.50", {"x-forwarded-for": "203.0.113.9"}, "192.0.2.50"),
    ],
)
def test_forwarded_addresses_are_believed_only_from_trusted_proxies(
    peer: str, headers: dict[str, str], expected: str
) -> None:
    trusted = parse_networks(["127.0.0.1/8", "::1/128"])
    assert client_address(peer, headers, trusted) == expected


def test_non_loopback_bind_without_auth_is_refused_unless_insecure(tmp_path: Path) -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    with pytest.raises(UnsafeExposure, match="--insecure-no-auth"):
        check_exposure(make_settings(host="0.0.0.0"))
    assert "INSECURE" in (check_exposure(make_settings(host="0.0.0.0", insecure_no_auth=True)) or "")
    keys = tmp_path / "keys.json"
    KeyStore(keys).add("a")
    assert check_exposure(make_settings(host="0.0.0.0", keys_file=keys)) is None
    assert check_exposure(make_settings(host="0.0.0.0", access_team_domain="t", access_aud="x")) is None


def verifier(jwks: JwksServer) -> AccessVerifier:
    return AccessVerifier("team", "aud-tag", jwks.url, refresh_cooldown_s=0)


def test_access_token_good_then_rotated_key_is_fetched(jwks: JwksServer) -> None:
    check = verifier(jwks)
    assert check.verify(jwks.token("kid-1")).subject == "ana@example.com"
    assert check.verify(jwks.token("kid-1")).subject == "ana@example.com"
    assert jwks.fetches == 1  # cached
    jwks.add_key("kid-2")  # rotation: a new kid appears
    assert check.verify(jwks.token("kid-2")).subject == "ana@example.com"
    assert jwks.fetches == 2


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda j: j.token("kid-1", aud="other-app"), "aud"),
        (lambda j: j.token("kid-1", team="other-team"), "iss"),
        (lambda j: j.token("kid-1", expires_in=-60), "expired"),
        (lambda j: j.token("kid-9", private=j.keys["kid-1"]), "unknown key"),
        (lambda j: "not.a.jwt", "invalid"),
    ],
    ids=["wrong-aud", "wrong-iss", "expired", "unknown-kid", "garbage"],
)
def test_access_tokens_that_must_be_refused(jwks: JwksServer, make: object, reason: str) -> None:
    with pytest.raises(AccessDenied, match=reason):
        verifier(jwks).verify(make(jwks))  # type: ignore[operator]


def _hand_made(alg: str, secret: bytes | None = None) -> str:
    """A token built by hand, as an attacker would (libraries refuse to make these)."""

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    claims = {"iss": "https://team.cloudflareaccess.com", "aud": ["aud-tag"], "exp": 9999999999}
    header = {"alg": alg, "kid": "kid-1", "typ": "JWT"}
    signing_input = f"{part(json.dumps(header).encode())}.{part(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest() if secret else b""
    return f"{signing_input}.{part(signature)}"


def test_alg_none_and_hs256_are_refused(jwks: JwksServer) -> None:
    from cryptography.hazmat.primitives import serialization

    check = verifier(jwks)
    with pytest.raises(AccessDenied, match="RS256"):
        check.verify(_hand_made("none"))
    public_pem = (
        jwks.keys["kid-1"]
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    # The classic confusion attack: HS256 "signed" with the public key as the HMAC secret.
    with pytest.raises(AccessDenied, match="RS256"):
        check.verify(_hand_made("HS256", public_pem))


# -- a keys file that breaks while serving -----------------------------------------------------


def _entry_with_scopes(scopes: str) -> bytes:
    return f'{{"keys": [{{"name": "a", "sha256": "{"0" * 64}", "scopes": {scopes}}}]}}'.encode()


def _good_store(tmp_path: Path) -> tuple[KeyStore, str]:
    store = KeyStore(tmp_path / "keys.json")
    return store, store.add("alice")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (b"", "is empty"),
        (b'{"keys": [', "not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 50_000, "not valid JSON"),
        (b"[]", 'no "keys" list'),
        (b'{"keys": [{"name": "a"}]}', 'entry 1 lacks a "name" or a valid "sha256"'),
        (b'{"keys": [{"name": "a", "sha256": "zz"}]}', "entry 1"),
        (_entry_with_scopes('["predict", "Admin"]'), "entry 1 ('a'): unknown scope 'Admin'"),
        (_entry_with_scopes('"predict,admin"'), '"scopes" that is not a list of names'),
        (_entry_with_scopes("[1]"), '"scopes" that is not a list of names'),
    ],
    ids=[
        "empty",
        "truncated",
        "binary",
        "deep",
        "not-an-object",
        "no-hash",
        "bad-hash",
        "unknown-scope",
        "scopes-a-string",
        "scopes-not-names",
    ],
)
def test_a_corrupt_keys_file_keeps_the_last_good_set_and_names_the_problem(
    tmp_path: Path, content: bytes, problem: str
) -> None:
    store, key = _good_store(tmp_path)
    assert store.verify(key) == "alice" and store.problem() is None
    store.path.write_bytes(content)
    assert store.verify(key) == "alice"  # serving: the last good set, no exception
    assert problem in (store.problem() or "") and str(store.path) in (store.problem() or "")
    with pytest.raises(KeyCommandError, match="fix or restore it"):
        store.entries()  # the `keys` commands: a clear error, not a traceback
    with pytest.raises(KeyCommandError):
        store.add("bob")


def test_a_keys_file_that_vanishes_or_becomes_a_folder_keeps_the_last_good_set(tmp_path: Path) -> None:
    store, key = _good_store(tmp_path)
    assert store.verify(key) == "alice"
    store.path.unlink()
    assert store.verify(key) == "alice" and "is missing" in (store.problem() or "")
    assert store.entries() == []  # for `keys add`: no file yet is fine
    store.path.mkdir()
    assert store.verify(key) == "alice" and "is a folder" in (store.problem() or "")
    store.path.rmdir()
    fresh = store.add("bob")  # fixed: picked up at once
    assert store.problem() is None and store.verify(fresh) == "bob" and store.verify(key) is None


def test_an_unreadable_keys_file_keeps_the_last_good_set(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store, key = _good_store(tmp_path)
    assert store.verify(key) == "alice"
    os.chmod(store.path, 0)  # enough for a normal user; root reads anyway, so deny it below too
    real_open = os.open

    def denied(path: Any, *args: Any, **kwargs: Any) -> int:
        if Path(path) == store.path:
            raise PermissionError(13, "Permission denied")
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    assert store.verify(key) == "alice"
    assert "permission denied" in (store.problem() or "")
    with pytest.raises(KeyCommandError, match="permission denied"):
        store.entries()
    monkeypatch.undo()
    os.chmod(store.path, 0o600)  # fixed: the change of mode alone makes it re-read
    assert store.problem() is None and store.verify(key) == "alice"


def test_a_keys_problem_is_logged_once_per_change(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tunnelvision.security.keys")
    store, key = _good_store(tmp_path)
    store.verify(key)
    store.path.write_text("{")
    for _ in range(50):
        store.verify(key)
    assert [r.levelno for r in caplog.records] == [logging.ERROR]
    store.path.unlink()
    store.verify(key)
    assert len(caplog.records) == 2 and "missing" in caplog.records[-1].getMessage()


def test_keys_commands_keep_the_files_mode_and_owner(tmp_path: Path) -> None:
    store, _ = _good_store(tmp_path)
    assert store.path.stat().st_mode & 0o777 == 0o600  # a new file: the caller's, owner only
    assert store.path.stat().st_uid == os.getuid()
    os.chmod(store.path, 0o640)  # e.g. root:tunnelvision, readable by the service's group
    owner = (1234, 4321) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    os.chown(store.path, *owner)
    store.add("bob")
    store.revoke("alice")
    after = store.path.stat()
    assert (after.st_mode & 0o777, after.st_uid, after.st_gid) == (0o640, *owner)
    assert [k.name for k in store.entries()] == ["bob"]
    assert list(tmp_path.iterdir()) == [store.path]  # no staging file left behind


def test_auth_is_settled_at_start_and_never_turns_off(tmp_path: Path) -> None:
    from tunnelvision.api.guard import Authenticator

    store, key = _good_store(tmp_path)
    auth = Authenticator(make_settings(keys_file=store.path))
    assert auth.effective_policy() == "keys"
    store.path.unlink()
    assert auth.effective_policy() == "keys"
    assert auth.keys.verify(key) == "alice"
    late = tmp_path / "late.json"
    open_at_start = Authenticator(make_settings(keys_file=late))
    assert open_at_start.effective_policy() == "none"
    KeyStore(late).add("x")
    assert open_at_start.effective_policy() == "keys"  # appearing turns keys on (fail closed)


def test_publishing_without_auth_is_refused_with_how_to_add_a_key(tmp_path: Path) -> None:
    with pytest.raises(UnsafeExposure) as refused:
        require_auth_for_publishing(make_settings())  # loopback is no excuse for a tunnel
    assert "tunnelvision keys add NAME" in str(refused.value)
    assert "--insecure-no-auth" in str(refused.value)
    assert "INSECURE" in (require_auth_for_publishing(make_settings(insecure_no_auth=True)) or "")
    keys = tmp_path / "keys.json"
    KeyStore(keys).add("a")
    assert require_auth_for_publishing(make_settings(keys_file=keys)) is None
    access = make_settings(access_team_domain="t", access_aud="x")
    assert require_auth_for_publishing(access) is None
    assert require_auth_for_publishing(make_settings(auth="keys")) is None  # closed: no key yet
    broken = tmp_path / "broken"
    broken.mkdir()  # something at the keys path: the server asks for keys (and accepts none)
    assert require_auth_for_publishing(make_settings(keys_file=broken)) is None


def test_a_key_removed_from_the_jwks_is_refused_once_the_set_expires(jwks: JwksServer) -> None:
    check = AccessVerifier("team", "aud-tag", jwks.url, refresh_cooldown_s=0, lifespan_s=0.2)
    token = jwks.token("kid-1")
    assert check.verify(token).subject == "ana@example.com"
    jwks.add_key("kid-2")
    del jwks.keys["kid-1"]
    wait_for(lambda: _refused(check, token), timeout_s=5)
    assert check.verify(jwks.token("kid-2")).subject == "ana@example.com"


def _refused(check: AccessVerifier, token: str) -> bool:
    try:
        check.verify(token)
    except AccessDenied:
        return True
    return False


def test_unknown_key_ids_refetch_at_most_once_per_cooldown(jwks: JwksServer) -> None:
    check = AccessVerifier("team", "aud-tag", jwks.url, refresh_cooldown_s=60, lifespan_s=300)
    assert check.verify(jwks.token("kid-1")).subject == "ana@example.com"
    before = jwks.fetches
    for n in range(10):
        forged = jwks.token(f"kid-x{n}", private=jwks.keys["kid-1"])
        with pytest.raises(AccessDenied, match="unknown key"):
            check.verify(forged)
    assert jwks.fetches - before <= 1


# -- scopes ------------------------------------------------------------------------------------


def test_keys_carry_scopes_default_predict_and_jobs_and_refuse_unknown_ones(tmp_path: Path) -> None:
    store = KeyStore(tmp_path / "keys.json")
    plain, ops = store.add("plain"), store.add("ops", ["admin", "predict"])
    assert [(k.name, k.scopes) for k in store.entries()] == [
        ("plain", ("predict", "jobs")),
        ("ops", ("predict", "admin")),  # canonical order, whatever order they were given in
    ]
    assert json.loads(store.path.read_text())["keys"][1]["scopes"] == ["predict", "admin"]
    matched = store.match(ops)
    assert matched is not None and matched.scopes == ("predict", "admin")
    assert store.match(plain + "x") is None
    for bad, words in ((["predict", "root"], "unknown scope 'root'"), ([], "at least one scope")):
        with pytest.raises(KeyCommandError, match=words):
            store.add("bad", bad)
    assert [k.name for k in store.entries()] == ["plain", "ops"]  # nothing written


def test_scope_lists_are_parsed_strictly() -> None:
    assert parse_scopes(" jobs , predict,jobs, ") == ("predict", "jobs")
    assert parse_scopes("admin") == ("admin",)
    for text, words in (("predict,Admin", "unknown scope 'Admin'"), (" , ", "at least one")):
        with pytest.raises(ValueError, match=words):
            parse_scopes(text)
    with pytest.raises(ValidationError, match="access_scopes"):
        make_settings(access_scopes="predict,everything")


@pytest.mark.parametrize(
    ("method", "path", "scope"),
    [
        ("POST", "/v1/detect", "predict"),
        ("POST", "/v1/segment", "predict"),
        ("POST", "/v1/annotate", "predict"),
        ("GET", "/v1/models", "predict"),
        ("GET", "/v1/models/grounded-sam", "predict"),
        ("POST", "/v1/models", "admin"),
        ("POST", "/v1/models/grounded-sam/reload", "admin"),
        ("GET", "/v1/models/grounded-sam/reload", "admin"),
        ("POST", "/v1/jobs", "jobs"),
        ("DELETE", "/v1/jobs/abc", "jobs"),
        ("GET", "/v1/jobs/abc/result", "jobs"),
        ("GET", "/metrics", "admin"),
        ("GET", "/openapi.json", None),  # under --no-public-docs: any valid credentials
        ("GET", "/v1/detectx", "admin"),
        ("GET", "/v1/jobs/../../metrics", "admin"),  # dot segments never borrow a prefix's scope
        ("GET", "/v1/jobs/./x", "admin"),
        ("GET", "/anything/else", "admin"),
    ],
)
def test_the_scope_table_fails_closed(method: str, path: str, scope: str | None) -> None:
    from tunnelvision.api.guard import required_scope

    assert required_scope(method, path) == scope


# Every protected route the app serves, with the scope it was meant to need. A route added
# without a decision fails here: give it a row in guard.SCOPE_RULES (or leave it admin) and here.
INTENDED_SCOPES = {
    ("POST", "/v1/detect"): "predict",
    ("POST", "/v1/segment"): "predict",
    ("POST", "/v1/annotate"): "predict",
    ("GET", "/v1/models"): "predict",
    ("POST", "/v1/models/{name}/reload"): "admin",
    ("POST", "/v1/jobs"): "jobs",
    ("GET", "/v1/jobs"): "jobs",
    ("GET", "/v1/jobs/{job_id}"): "jobs",
    ("GET", "/v1/jobs/{job_id}/result"): "jobs",
    ("DELETE", "/v1/jobs/{job_id}"): "jobs",
    ("POST", "/v1/videos"): "jobs",
    ("GET", "/v1/videos"): "jobs",
    ("GET", "/v1/videos/{video_id}"): "jobs",
    ("GET", "/v1/videos/{video_id}/result"): "jobs",
    ("GET", "/v1/videos/{video_id}/events"): "jobs",
    ("POST", "/v1/videos/{video_id}/prompts"): "jobs",
    ("DELETE", "/v1/videos/{video_id}"): "jobs",
    ("GET", "/metrics"): "admin",
    ("GET", "/label-studio/health"): "predict",
    ("POST", "/label-studio/setup"): "predict",
    ("POST", "/label-studio/predict"): "predict",
    ("GET", "/x-anylabeling/v1/models"): "predict",
    ("GET", "/x-anylabeling/v1/models/{model_id}/info"): "predict",
    ("POST", "/x-anylabeling/v1/predict"): "predict",
    ("POST", "/grounding_dino/infer"): "predict",
    ("POST", "/sam2/embed_image"): "predict",
    ("POST", "/sam2/segment_image"): "predict",
    ("POST", "/sam3/concept_segment"): "predict",
    ("POST", "/sam3/embed_image"): "predict",
    ("POST", "/sam3/visual_segment"): "predict",
}


def test_every_served_route_has_the_scope_it_was_meant_to_have() -> None:
    from support import FakeBackend
    from tunnelvision.api.app import create_app
    from tunnelvision.api.guard import ALWAYS_PUBLIC, DOCS, required_scope

    app = create_app(make_settings(), lambda _settings: [FakeBackend()])
    # The OpenAPI paths: FastAPI keeps included routers nested, so `app.routes` does not list them.
    served = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        if path not in ALWAYS_PUBLIC | DOCS
        for method in operations
    }
    assert len(served) >= len(INTENDED_SCOPES) // 2, "the routes were not found: the test would check nothing"
    undecided = served - INTENDED_SCOPES.keys()
    assert not undecided, f"give these routes a scope in api/guard.py SCOPE_RULES: {sorted(undecided)}"
    for method, path in served:
        concrete = re.sub(r"\{[^}]+\}", "x", path)
        assert required_scope(method, concrete) == INTENDED_SCOPES[method, path], (method, path)


def test_callers_get_their_keys_or_the_access_settings_scopes(tmp_path: Path, jwks: JwksServer) -> None:
    import asyncio

    from tunnelvision.api.guard import Authenticator, Credentials

    store = KeyStore(tmp_path / "keys.json")
    key = store.add("ops", ["admin"])
    settings = make_settings(
        keys_file=store.path,
        auth="either",
        access_team_domain="team",
        access_aud="aud-tag",
        access_certs_url=jwks.url,
        access_scopes="jobs",
    )
    auth = Authenticator(settings)
    by_key = asyncio.run(auth.authenticate(Credentials(key, None)))
    by_login = asyncio.run(auth.authenticate(Credentials(None, jwks.token("kid-1"))))
    assert by_key is not None and by_key.scopes == ("admin",)
    assert by_key.lacking("POST", "/v1/detect") == "predict" and by_key.lacking("GET", "/metrics") is None
    assert by_login is not None and by_login.scopes == ("jobs",)
    assert by_login.forbidden_message("admin") == (
        "this Cloudflare Access login lacks the 'admin' scope (its scopes: jobs)"
    )


def test_keys_add_takes_scopes_and_keys_list_shows_them(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from tunnelvision.cli import main

    keys = str(tmp_path / "keys.json")
    assert main(["keys", "add", "app", "--keys-file", keys]) == 0
    assert main(["keys", "add", "ops", "--scopes", "admin,predict", "--keys-file", keys]) == 0
    assert "(predict,admin)" in capsys.readouterr().err
    assert main(["keys", "list", "--keys-file", keys]) == 0
    rows = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [(row[0], row[-1]) for row in rows] == [("app", "predict,jobs"), ("ops", "predict,admin")]


@pytest.mark.parametrize("scopes", ["bogus", "", " , ", "predict,Admin"])
def test_keys_add_with_an_unknown_scope_fails_cleanly_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], scopes: str
) -> None:
    from tunnelvision.cli import main

    keys = tmp_path / "keys.json"
    with pytest.raises(SystemExit) as exited:
        main(["keys", "add", "x", "--scopes", scopes, "--keys-file", str(keys)])
    error = capsys.readouterr().err
    assert exited.value.code == 2
    assert "argument --scopes" in error and "Traceback" not in error
    assert "predict, jobs, admin" in error  # says what the scopes are
    assert not keys.exists()
