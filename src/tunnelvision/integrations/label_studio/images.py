"""Task images from Label Studio: only from its own host, size-capped, with a deadline.

A task names its image by a path on Label Studio (`/data/upload/1/cat.png`), or by an absolute
URL. Only Label Studio's own scheme, host and port are fetched (redirects included): whoever
imports tasks must not make this server fetch from elsewhere. Its API token goes only there.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

import httpx

from tunnelvision.errors import InvalidInput, PayloadTooLarge
from tunnelvision.imaging import decode_base64

MAX_REDIRECTS = 3
DEFAULT_PORTS = {"http": 80, "https": 443}


class ImageRefused(InvalidInput):
    """A task image this server will not fetch: another host, another scheme, no Label Studio URL."""

    code = "image_url_refused"


class ImageFetchFailed(InvalidInput):
    """Label Studio did not hand over the task image (unreachable, an error status, too slow)."""

    code = "image_fetch_failed"


@dataclass(frozen=True)
class ImageSource:
    """Label Studio's base URL (as /setup's `hostname` or the settings give it) and API token."""

    base_url: str
    token: str

    @classmethod
    def parse(cls, url: str, token: str) -> ImageSource:
        """InvalidInput unless `url` is http(s)://host[:port][/path], without credentials."""
        if origin_of(url) is None or "@" in urlsplit(url).netloc:
            raise InvalidInput(f"Label Studio's URL '{url[:200]}' is not http(s)://HOST[:PORT]")
        return cls(url.rstrip("/"), token)

    @property
    def origin(self) -> str:
        return origin_of(self.base_url) or ""


def origin_of(url: str) -> str | None:
    """'scheme://host:port' (default port filled in, lowercased), None unless http(s) with a host."""
    try:
        parts = urlsplit(url.strip())
        port = parts.port or DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:  # a port that is not a number
        return None
    if parts.scheme.lower() not in DEFAULT_PORTS or not parts.hostname:
        return None
    return f"{parts.scheme.lower()}://{parts.hostname.lower()}:{port}"


def data_url_image(reference: str, max_bytes: int) -> bytes | None:
    """The bytes of a `data:image/...;base64,` task image; None for anything else."""
    return decode_base64(reference, max_bytes) if reference.startswith("data:") else None


def resolve(reference: str, source: ImageSource | None) -> str:
    """The URL to fetch for a task's image reference, or ImageRefused saying why not."""
    if not isinstance(reference, str) or not reference.strip():
        raise ImageRefused("the task has no image URL in the field the labeling config names")
    reference = reference.strip()
    if source is None:
        raise ImageRefused(
            "this server fetches task images only from the Label Studio named in its settings: set "
            "TUNNELVISION_LABEL_STUDIO_URL (and _API_KEY) on the server to Label Studio's address"
        )
    if reference.startswith("/") and not reference.startswith("//"):
        return source.base_url + reference
    if origin_of(reference) is None:
        scheme = urlsplit(reference).scheme or "no scheme"
        raise ImageRefused(
            f"task image URLs must be Label Studio paths or http(s) URLs on {source.origin}, not "
            f"'{scheme}' (let Label Studio serve cloud storage images, or import them)"
        )
    check_same_origin(reference, source)
    return reference


def check_same_origin(url: str, source: ImageSource) -> None:
    if origin_of(url) != source.origin or "@" in urlsplit(url).netloc:
        host = urlsplit(url).hostname or "?"
        raise ImageRefused(
            f"task image on host '{host}' refused: images are fetched only from Label Studio "
            f"at {source.origin}"
        )


async def fetch_image(
    url: str,
    source: ImageSource,
    max_bytes: int,
    timeout_s: float,
    transport: httpx.AsyncBaseTransport | None = None,
) -> bytes:
    """The image's bytes; ImageFetchFailed, ImageRefused (a redirect elsewhere) or PayloadTooLarge."""
    try:
        return await asyncio.wait_for(_fetch(url, source, max_bytes, timeout_s, transport), timeout_s)
    except TimeoutError:
        raise ImageFetchFailed(f"Label Studio did not send the task image within {timeout_s:.0f} s") from None
    except httpx.HTTPError as exc:
        raise ImageFetchFailed(
            f"could not fetch the task image from Label Studio at {source.origin} ({type(exc).__name__})"
        ) from None


async def _fetch(
    url: str,
    source: ImageSource,
    max_bytes: int,
    timeout_s: float,
    transport: httpx.AsyncBaseTransport | None,
) -> bytes:
    headers = {"Authorization": f"Token {source.token}"} if source.token else {}
    # trust_env=False: no proxy from the environment gets the token or the image.
    async with httpx.AsyncClient(
        follow_redirects=False, trust_env=False, timeout=timeout_s, transport=transport
    ) as client:
        for _ in range(MAX_REDIRECTS + 1):
            async with client.stream("GET", url, headers=headers) as response:
                if response.is_redirect and "location" in response.headers:
                    url = urljoin(url, response.headers["location"])
                    check_same_origin(url, source)  # the token never follows a redirect away
                    continue
                if response.status_code != 200:
                    raise ImageFetchFailed(
                        f"Label Studio answered {response.status_code} for the task image "
                        f"{urlsplit(url).path[:200]}" + _hint(response.status_code)
                    )
                return await _read_capped(response, max_bytes)
    raise ImageFetchFailed(f"more than {MAX_REDIRECTS} redirects for the task image")


def _hint(status: int) -> str:
    if status in (401, 403):
        return " (is the API token right? a legacy token is needed: TUNNELVISION_LABEL_STUDIO_API_KEY)"
    return ""


async def _read_capped(response: httpx.Response, max_bytes: int) -> bytes:
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise PayloadTooLarge(f"the task image is over the {max_bytes} byte limit")
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"the task image is over the {max_bytes} byte limit")
        chunks.append(chunk)
    return b"".join(chunks)
