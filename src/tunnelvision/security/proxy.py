"""Who is the client? Believe CF-Connecting-IP / X-Forwarded-For only from trusted proxies."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_networks(specs: Iterable[str]) -> list[Network]:
    return [ipaddress.ip_network(spec, strict=False) for spec in specs]


def is_trusted(peer: str | None, trusted: list[Network]) -> bool:
    try:
        address = _unmapped(ipaddress.ip_address(peer or ""))
    except ValueError:
        return False
    return any(address in network for network in trusted)


def _unmapped(address: Address) -> Address:
    """`::ffff:127.0.0.1` (an IPv4 peer on a socket bound to `::`) is the IPv4 address it wraps."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def client_address(peer: str | None, headers: Mapping[str, str], trusted: list[Network]) -> str:
    """The socket peer, unless it is a trusted proxy (cloudflared on loopback) that says who."""
    if not is_trusted(peer, trusted):
        return peer or "unknown"
    for candidate in _forwarded_candidates(headers):
        try:
            return str(ipaddress.ip_address(candidate))
        except ValueError:
            continue
    return peer or "unknown"


def _forwarded_candidates(headers: Mapping[str, str]) -> list[str]:
    candidates = [headers.get("cf-connecting-ip", "").strip()]
    # X-Forwarded-For: anything the client sent, then what each proxy saw. Only the right-most
    # entry was written by the trusted proxy; entries to its left can be forged.
    forwarded = headers.get("x-forwarded-for", "")
    candidates += [part.strip() for part in forwarded.split(",")[-1:]]
    return [c for c in candidates if c]
