"""Refuse to put an unauthenticated API on the network by accident."""

from __future__ import annotations

import ipaddress

from tunnelvision.config import Settings
from tunnelvision.security.keys import KeyStore


class UnsafeExposure(Exception):
    pass


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def auth_configured(settings: Settings) -> bool:
    """The server will ask for credentials (the same test the server's guard makes at start)."""
    keys_on = KeyStore(settings.keys_file).present()
    return settings.auth != "auto" or keys_on or settings.access_configured


def check_exposure(settings: Settings) -> str | None:
    """Raise for a non-loopback bind without authentication; a warning when explicitly allowed."""
    if is_loopback(settings.host) or auth_configured(settings):
        return None
    if not settings.insecure_no_auth:
        raise UnsafeExposure(
            f"refusing to listen on {settings.host} without authentication: anyone who can reach it "
            "could use your GPU. Add a key (`tunnelvision keys add NAME`), configure Cloudflare "
            "Access (--access-team-domain, --access-aud), bind to 127.0.0.1 behind cloudflared, "
            "or pass --insecure-no-auth if this network is trusted."
        )
    return (
        f"INSECURE: listening on {settings.host} with no authentication (--insecure-no-auth); "
        "anyone who can reach this port can use the API"
    )


def require_auth_for_publishing(settings: Settings) -> str | None:
    """For commands that publish the API (a tunnel): refuse when no authentication is configured.

    Unlike a bind, loopback is no excuse here: the tunnel carries everyone's requests to it.
    Returns a warning when `insecure_no_auth` allows it anyway; None when authentication is on.
    """
    if auth_configured(settings):
        return None
    if not settings.insecure_no_auth:
        raise UnsafeExposure(
            "refusing to publish the API without authentication: anyone with the URL could use "
            "your GPU. Add a key with `tunnelvision keys add NAME` (clients send it as "
            "'Authorization: Bearer KEY'), or configure Cloudflare Access (--access-team-domain, "
            "--access-aud); pass --insecure-no-auth only to publish it open on purpose."
        )
    return (
        "INSECURE: publishing the API with no authentication (--insecure-no-auth); "
        "anyone with the URL can use it"
    )
