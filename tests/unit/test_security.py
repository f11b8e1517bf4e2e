from __future__ import annotations

import base64
import hashlib
import hmac
import json
from pathlib import Path

import pytest

from support import JwksServer, make_settings
from tunnelvision.exposure import UnsafeExposure, check_exposure, is_loopback
from tunnelvision.security.access import AccessDenied, AccessVerifier
from tunnelvision.security.keys import KeyCommandError, KeyStore
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
