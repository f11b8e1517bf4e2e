"""Refuse to put an unauthenticated API on the network by accident."""

from __future__ import annotations

import ipaddress

from tunnelvision.config import Settings


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
    return settings.auth != "auto" or settings.keys_configured or settings.access_configured


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
