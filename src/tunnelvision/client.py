"""Python client: `Client(url, api_key)` and `AsyncClient`, on the server's own schemas.

    from tunnelvision import Client
    with Client("https://api.example.com", api_key="tv_...") as client:
        result = client.segment("cat.jpg", prompt="a cat")
        masks = decode_masks(result)          # numpy bool arrays, one per detection

Images may be a path, bytes, a PIL image or a numpy array. 429 and 503 answers are retried after
their Retry-After (bounded); other errors raise `APIError` subclasses carrying the JSON error.
A call that gets no answer raises `TransportError` (`ConnectionFailed` when the server could not be
reached at all). Calls that cannot do harm twice are retried with exponential backoff first:
GET and DELETE after any broken connection, every call (POST included) when the connection was
never made, so the request cannot have reached the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import httpx
import numpy as np
from PIL import Image
from pydantic import BaseModel

from tunnelvision.masks import BoolMask, decode_png, decode_polygons, decode_rle
from tunnelvision.schemas import (
    RLE,
    DetectResponse,
    JobStatus,
    ModelsResponse,
    ReloadResponse,
    SegmentResponse,
    normalize_prompt,
)

ImageInput = str | os.PathLike[str] | bytes | Image.Image | np.ndarray
VideoInput = str | os.PathLike[str] | bytes  # a clip file (MP4, MOV, WebM, MKV, AVI, a zip of frames)
Event = dict[str, Any]  # one Server-Sent Event: {"event", "id", "data"}
Progress = Callable[[dict[str, Any]], object]  # called with each video status seen
M = TypeVar("M", bound=BaseModel)
DEFAULT_URL = "http://127.0.0.1:8000"
RETRYABLE = (429, 503)
RELOAD_TIMEOUT_S = 600.0  # loading real weights can take minutes
UNFINISHED = ("queued", "running")  # job states `wait_job` waits through
IDEMPOTENT = frozenset({"GET", "HEAD", "DELETE", "OPTIONS", "PUT"})
# No connection was made, so the request never left: safe to send again, whatever the method.
NOT_SENT = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
# The request may have reached the server: only an idempotent call may be sent again. A read
# timeout is not retried: it already spent the whole timeout waiting.
MAYBE_SENT = (httpx.NetworkError, httpx.RemoteProtocolError, httpx.WriteTimeout)
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
URL_HINT = "give the server's URL as http://HOST:PORT or https://HOSTNAME (--url or TUNNELVISION_URL)"


class APIError(Exception):
    """Base of every error the client raises. For an error answer: its status, and the server's
    `{"error": {code, message, request_id}}`; status 0 when no answer came (`TransportError`)."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}" if status else message)
        self.status, self.code, self.message = status, code, message
        self.request_id, self.retry_after_s = request_id, retry_after_s


class InvalidRequest(APIError):
    """400, 404, 413, 415, 422: the request must change."""


class AuthenticationError(APIError):
    """401/403: missing or wrong key, or Cloudflare Access refused."""


class Overloaded(APIError):
    """429/503 after the retries ran out."""


class ServerError(APIError):
    """500 and other failures on the server's side (quote request_id when reporting)."""


class TransportError(APIError):
    """No answer came (status 0): the connection broke or timed out, after the retries that were
    safe. `code`: connection_lost, timeout or connection_failed."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(0, code, message)


class ConnectionFailed(TransportError):
    """The server could not be reached at all (refused, unknown host, connect timeout): it is not
    running, or the URL is wrong. The request never left this machine."""


def base_url(url: str) -> str:
    """`url` without a trailing '/', and with a scheme: one given is kept (http or https); without
    one, a loopback name (localhost, 127.0.0.1, ::1) or a HOST:PORT gets http:// (a server on this
    machine or network, as `tunnelvision serve` listens), a bare hostname https:// (a tunnel)."""
    url = url.strip()
    if "://" not in url:  # urlsplit would read 'localhost:8000' as scheme 'localhost'
        parts = urlsplit(f"//{url}")
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{url!r} has an invalid port: {URL_HINT}") from None
        local = parts.hostname in LOOPBACK_NAMES or (port is not None and port != 443)
        url = f"{'http' if local else 'https'}://{url}"
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{url!r} is not an http(s) URL: {URL_HINT}")
    return url.rstrip("/")


def may_resend(method: str, exc: httpx.RequestError) -> bool:
    """Whether sending this call again after `exc` can do no harm."""
    return isinstance(exc, NOT_SENT) or (method in IDEMPOTENT and isinstance(exc, MAYBE_SENT))


def transport_error(exc: httpx.RequestError, method: str, url: str) -> TransportError:
    """What failed, where, and what to do about it, in the client's own error types."""
    where, reason = f"{method} {url}", str(exc) or type(exc).__name__
    if isinstance(exc, NOT_SENT):
        return ConnectionFailed(
            "connection_failed",
            f"cannot reach {where}: {reason}. Is the server running, and is this its URL? "
            "Check --url or TUNNELVISION_URL",
        )
    if isinstance(exc, httpx.TimeoutException):
        return TransportError(
            "timeout",
            f"{where} got no answer in time ({reason}): the server is busy or the work is long; "
            "retry later or pass a larger timeout=",
        )
    return TransportError(
        "connection_lost",
        f"{where} failed: {reason}. The connection broke before the answer (the server restarted, "
        "or a proxy or tunnel in between dropped it); check the server's log",
    )


def raise_for_error(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    try:
        error = response.json()["error"]
    except (ValueError, KeyError, TypeError):
        error = {"code": "http_error", "message": response.text[:500]}
    kind = (
        AuthenticationError
        if response.status_code in (401, 403)
        else Overloaded
        if response.status_code in RETRYABLE
        else ServerError
        if response.status_code >= 500
        else InvalidRequest
    )
    raise kind(
        response.status_code,
        error.get("code", "http_error"),
        error.get("message", ""),
        error.get("request_id"),
        retry_after(response),
    )


def retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def image_bytes(image: ImageInput) -> bytes:
    """Any of the accepted image kinds as an encoded file (PNG for in-memory pixels)."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()


def decode_masks(result: SegmentResponse) -> list[BoolMask]:
    """Each detection's mask as a (height, width) bool array, whatever the mask_format was."""
    height, width = result.image.height, result.image.width
    masks = []
    for detection in result.detections:
        mask = detection.mask
        if isinstance(mask, RLE):
            masks.append(decode_rle(mask))
        elif isinstance(mask, str):
            masks.append(decode_png(mask))
        elif isinstance(mask, list):
            masks.append(decode_polygons(mask, height, width))
        else:
            raise ValueError("no masks in this result: ask for mask_format rle, png or polygon")
    return masks


@dataclass(frozen=True)
class Call:
    """One API call, built the same way for both clients. `fields` keep their Python types until
    the encoding is chosen: a JSON body sends them as they are (the prompt "1984" stays a string),
    a form sends text."""

    method: str
    path: str
    files: dict[str, Any] | list[tuple[str, Any]] | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    timeout: float | None = None  # None: the client's
    retry_busy: bool = True  # retry 429/503 after their Retry-After

    @classmethod
    def build(cls, path: str, image: ImageInput | None, fields: dict[str, Any]) -> Call:
        files = (
            {"image": ("image", image_bytes(image), "application/octet-stream")}
            if image is not None
            else None
        )
        return cls("POST", path, files, _given(fields))

    def send_kwargs(self) -> dict[str, Any]:
        options: dict[str, Any] = {} if self.timeout is None else {"timeout": self.timeout}
        if self.method != "POST":
            return options
        if self.files is None:  # image_id only, or a reload: no file to upload, so JSON
            body = json.dumps(self.fields, default=_plain)
            return {**options, "content": body, "headers": {"Content-Type": "application/json"}}
        return {**options, "files": self.files, "data": {k: _form_value(v) for k, v in self.fields.items()}}


def with_phrases(result: M, call: Call) -> M:
    """A detect/segment answer that remembers its request's phrases: `to_supervision()` numbers
    class ids in them."""
    if isinstance(result, DetectResponse | SegmentResponse):
        result._phrases = normalize_prompt(call.fields.get("prompt"))
    return result


def job_call(images: list[ImageInput], prompt: str | list[str], options: dict[str, Any]) -> Call:
    files = [
        ("images", (_name_of(image, i), image_bytes(image), "application/octet-stream"))
        for i, image in enumerate(images)
    ]
    return Call("POST", "/v1/jobs", files, _given(_fields(prompt, **options)))


def reload_call(name: str, source: str | None, timeout: float) -> Call:
    """The reload of pipeline `name` (no source: the same sources again). Not retried when busy:
    a second reload while one runs is a 409, a failed load an InvalidRequest saying why."""
    body = {} if source is None else {"source": source}
    return Call("POST", f"/v1/models/{name}/reload", None, body, timeout, retry_busy=False)


def video_call(video: VideoInput, fields: dict[str, Any]) -> Call:
    """The upload of a clip (read whole: a retry sends it again) with what to follow in it."""
    if isinstance(video, bytes):
        name, data = "clip", video  # the server finds the container from the bytes
    else:
        name, data = Path(video).name, Path(video).read_bytes()
    files = {"video": (name, data, "application/octet-stream")}
    return Call("POST", "/v1/videos", files, _given(_fields(**fields)))


def correction_call(video_id: str, fields: dict[str, Any]) -> Call:
    return Call("POST", f"/v1/videos/{video_id}/prompts", None, _given(fields))


def video_answer(response: httpx.Response, format: str) -> dict[str, Any] | str | bytes:
    """A result in the format asked for: json as a dict, mot as text, mp4 as the file's bytes."""
    if format == "json":
        result: dict[str, Any] = response.json()
        return result
    return response.text if format == "mot" else response.content


class EventReader:
    """Server-Sent Events from lines of a stream (the WHATWG rules: `field: value` lines, a blank
    line ends an event, lines starting with ':' are comments). Remembers the last event id, which
    a reconnection sends as Last-Event-ID to resume after it."""

    def __init__(self, last_event_id: str | None = None) -> None:
        self.last_event_id = last_event_id
        self.retry_s: float | None = None  # the server's advice on when to reconnect
        self._event, self._id, self._data = "", None, []  # type: tuple[str, str | None, list[str]]

    def connect(self) -> dict[str, str]:
        """A new connection's headers, resuming after the last whole event; an event half
        received on the connection before is dropped (it comes again whole)."""
        self._event, self._id, self._data = "", None, []
        return {"Accept": "text/event-stream", "Cache-Control": "no-cache"} | (
            {"Last-Event-ID": self.last_event_id} if self.last_event_id is not None else {}
        )

    def feed(self, line: str) -> Event | None:
        """The event that `line` completes, if any (`{"event", "id", "data"}`, data parsed as JSON
        when it is JSON); {"event": ""} for a comment (a keep-alive: the stream is alive)."""
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return {"event": "", "id": None, "data": line[1:].strip()}
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._event = value
        elif name == "data":
            self._data.append(value)
        elif name == "id" and "\0" not in value:
            self._id = value
        elif name == "retry" and value.isdigit():
            self.retry_s = int(value) / 1000
        return None

    def _dispatch(self) -> Event | None:
        event, event_id, data = self._event or "message", self._id, "\n".join(self._data)
        self._event, self._id, self._data = "", None, []
        if event_id is not None:
            self.last_event_id = event_id
        if not data:  # an event without data is not dispatched (`retry:` alone, say)
            return None
        try:
            parsed: Any = json.loads(data)
        except ValueError:
            parsed = data
        return {"event": event, "id": event_id, "data": parsed}


def _name_of(image: ImageInput, index: int) -> str:
    return Path(image).name if isinstance(image, str | os.PathLike) else f"image-{index:05d}.png"


def _given(fields: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in fields.items() if v is not None}


def _plain(value: Any) -> Any:
    """numpy values (boxes from an array, a numpy float threshold) as the JSON they stand for."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} cannot be sent as JSON")


def _form_value(value: Any) -> str:
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, list | tuple | dict | np.ndarray):
        return json.dumps(value, default=_plain)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _fields(prompt: Any = None, **options: Any) -> dict[str, Any]:
    if isinstance(prompt, list):  # form fields are flat: labels become one '.'-separated prompt
        prompt = ". ".join(prompt)
    return {"prompt": prompt, **options}


def _jobs(job_id: str, tail: str = "", method: str = "GET") -> Call:
    return Call(method, f"/v1/jobs/{job_id}{tail}")


def _videos(video_id: str, tail: str = "", method: str = "GET") -> Call:
    return Call(method, f"/v1/videos/{video_id}{tail}")


def _event_stream(video_id: str, frames: bool) -> Call:
    return _videos(video_id, "/events" if frames else "/events?frames=false")


def _finished(status: dict[str, Any]) -> bool:
    return status.get("status") not in UNFINISHED


def _ignore(status: dict[str, Any]) -> None:
    """No progress callback given."""


Outcome = httpx.Response | httpx.RequestError  # what one attempt got: an answer, or none


class _Base:
    """What both clients share: where, who, how patiently. Only the sending differs (sync/async)."""

    def __init__(
        self,
        url: str | None,
        api_key: str | None,
        timeout: float,
        retries: int,
        max_wait_s: float,
        backoff_s: float,
    ) -> None:
        self.url = base_url(url or os.environ.get("TUNNELVISION_URL") or DEFAULT_URL)
        key = api_key or os.environ.get("TUNNELVISION_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.retries, self.max_wait_s, self.backoff_s = retries, max_wait_s, backoff_s
        self.http_options: dict[str, Any] = {
            "base_url": self.url,
            "headers": self.headers,
            "timeout": timeout,
        }

    def _wait_s(self, call: Call, outcome: Outcome, attempt: int) -> float | None:
        """Seconds to wait before sending `call` again; None when this outcome is final."""
        if attempt >= self.retries:
            return None
        backoff_s = min(self.max_wait_s, self.backoff_s * 2.0**attempt)
        if isinstance(outcome, httpx.RequestError):
            return backoff_s if may_resend(call.method, outcome) else None
        if outcome.status_code not in RETRYABLE or not call.retry_busy:
            return None
        return min(self.max_wait_s, retry_after(outcome) or backoff_s)

    def _result(self, call: Call, outcome: Outcome) -> httpx.Response:
        """The answer of a final attempt, or the client's error for it."""
        if isinstance(outcome, httpx.RequestError):
            raise transport_error(outcome, call.method, f"{self.url}{call.path}") from outcome
        raise_for_error(outcome)
        return outcome


class Client(_Base):
    """The API from synchronous code. `url`: the server (default TUNNELVISION_URL, else
    http://127.0.0.1:8000; without a scheme, see `base_url`). `retries`: how often a 429/503, or a
    call that got no answer and is safe to resend, is tried again, waiting Retry-After or
    `backoff_s` doubling each time, at most `max_wait_s` each."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        max_wait_s: float = 30.0,
        backoff_s: float = 0.5,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout, retries, max_wait_s, backoff_s)
        self._http = httpx.Client(**self.http_options, transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def detect(
        self,
        image: ImageInput | None = None,
        prompt: str | list[str] | None = None,
        model: str | None = None,
        exemplars: list[list[float]] | None = None,
        **options: Any,
    ) -> DetectResponse:
        return self._model(
            DetectResponse,
            Call.build("/v1/detect", image, _fields(prompt, model=model, exemplars=exemplars, **options)),
        )

    def segment(
        self,
        image: ImageInput | None = None,
        prompt: str | list[str] | None = None,
        model: str | None = None,
        exemplars: list[list[float]] | None = None,
        **options: Any,
    ) -> SegmentResponse:
        """`model`: a pipeline name (`models()`); `exemplars`: [[x1, y1, x2, y2, label], ...]
        (label 1 more like this, 0 not this) for pipelines that take them; options: boxes, points,
        image_id, box_threshold, text_threshold, multimask, mask_format..."""
        return self._model(
            SegmentResponse,
            Call.build("/v1/segment", image, _fields(prompt, model=model, exemplars=exemplars, **options)),
        )

    def annotate(
        self,
        image: ImageInput | None = None,
        prompt: str | list[str] | None = None,
        model: str | None = None,
        **options: Any,
    ) -> bytes:
        """The annotated image file (PNG, or JPEG with format='jpeg')."""
        return self._send(Call.build("/v1/annotate", image, _fields(prompt, model=model, **options))).content

    def models(self) -> ModelsResponse:
        """The pipelines served (names for `model`), their models and abilities."""
        return ModelsResponse.model_validate(self._send(Call("GET", "/v1/models")).json())

    def reload_model(
        self, name: str, source: str | None = None, timeout: float = RELOAD_TIMEOUT_S
    ) -> ReloadResponse:
        """Load new weights for pipeline `name` beside the old, warm them up and switch with no
        downtime. `source`: a SPEC (DETECTOR+SEGMENTER or one model; hub ids or folders on the
        server); default: its current sources again. Needs an admin key. Not retried: a second
        reload while one runs is a 409, a failed load an InvalidRequest saying why."""
        return ReloadResponse.model_validate(self._send(reload_call(name, source, timeout)).json())

    def create_job(
        self, images: list[ImageInput], prompt: str | list[str], model: str | None = None, **options: Any
    ) -> JobStatus:
        """Many images at background priority; follow with `job`, `wait_job`, `job_result`."""
        call = job_call(images, prompt, {"model": model, **options})
        return JobStatus.model_validate(self._send(call).json())

    def job(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._send(_jobs(job_id)).json())

    def wait_job(self, job_id: str, poll_s: float = 2.0, timeout_s: float = 3600.0) -> JobStatus:
        """The job's status once it is no longer queued or running, or after `timeout_s`."""
        end = time.monotonic() + timeout_s
        while (status := self.job(job_id)).status in UNFINISHED and time.monotonic() < end:
            time.sleep(poll_s)
        return status

    def job_result(self, job_id: str) -> dict[str, Any]:
        """COCO instances of the images finished so far."""
        result: dict[str, Any] = self._send(_jobs(job_id, "/result")).json()
        return result

    def cancel_job(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._send(_jobs(job_id, method="DELETE")).json())

    def track_video(
        self,
        video: VideoInput,
        *,
        model: str | None = None,
        prompt: str | list[str] | None = None,
        boxes: list[list[float]] | None = None,
        points: list[list[float]] | None = None,
        frame: int | None = None,
        start: int = 0,
        end: int | None = None,
        stride: int = 1,
        **options: Any,
    ) -> dict[str, Any]:
        """Upload a clip (a path or its bytes) as a video job and return its status at once (queued):
        follow it with `wait_video` or `video_events`, read it with `video_result`. What to follow:
        a text `prompt`, or `boxes` ([[x1, y1, x2, y2], ...], one object each) or `points`
        ([[x, y, label], ...], one object) on `frame`. `start`/`end`/`stride`: the frames tracked;
        options: box_threshold, text_threshold, max_objects, keyframe_every."""
        fields = {"model": model, "prompt": prompt, "boxes": boxes, "points": points, "frame": frame}
        call = video_call(video, {**fields, "start": start, "end": end, "stride": stride, **options})
        return self._json(call)

    def video(self, video_id: str) -> dict[str, Any]:
        """A video job's status: status, frames_done, frames_total, progress, objects, error..."""
        return self._json(_videos(video_id))

    def videos(self, limit: int = 20) -> list[dict[str, Any]]:
        """Your video jobs' statuses, newest first."""
        listed: list[dict[str, Any]] = self._json(Call("GET", f"/v1/videos?limit={limit}"))["videos"]
        return listed

    def video_result(self, video_id: str, format: str = "json") -> dict[str, Any] | str | bytes:
        """The results committed so far: "json" (a dict: each tracked frame's objects with RLE
        masks, and per-object summaries), "mot" (MOT Challenge text) or "mp4" (the clip with the
        masks drawn, as bytes)."""
        return video_answer(self._send(_videos(video_id, f"/result?format={format}")), format)

    def video_events(self, video_id: str, last_event_id: str | None = None) -> Iterator[Event]:
        """The job's live results as {"event", "id", "data"}: a `frame` event per committed frame
        (data: {"frame", "objects"}), `status` events (data: the status), until the job ends.
        A broken connection is resumed after the last event received (Last-Event-ID)."""
        for event in self._events(video_id, last_event_id):
            if event["event"]:  # not a keep-alive
                yield event

    def correct_video(
        self,
        video_id: str,
        frame: int,
        box: list[float] | None = None,
        points: list[list[float]] | None = None,
        object_id: int | None = None,
        label: str | None = None,
        direction: str = "forward",
    ) -> dict[str, Any]:
        """Fix object `object_id` (or add a new one) by a `box` or `points` on `frame`; the frames
        from there (`direction`: forward, backward or both) are tracked again. The job's status."""
        fields = {"frame": frame, "box": box, "points": points, "object_id": object_id}
        return self._json(correction_call(video_id, {**fields, "label": label, "direction": direction}))

    def delete_video(self, video_id: str) -> None:
        """Cancel the job if it runs, and delete it and its files."""
        self._send(_videos(video_id, method="DELETE"))

    def wait_video(
        self,
        video_id: str,
        timeout_s: float = 3600.0,
        on_progress: Progress | None = None,
        poll_s: float = 2.0,
    ) -> dict[str, Any]:
        """The job's status once it is done or failed (corrections included), or after `timeout_s`
        (checked at each event; the server sends one at least every keep-alive interval).
        Follows the event stream, calling `on_progress(status)` at each status; where the stream
        cannot be followed (a proxy that cuts or refuses it), polls every `poll_s`."""
        end, report = time.monotonic() + timeout_s, on_progress or _ignore
        with (
            contextlib.suppress(TransportError, ServerError),
            contextlib.closing(self._events(video_id, None, frames=False)) as events,
        ):
            for event in events:
                if event["event"] == "status":
                    report(event["data"])
                if time.monotonic() >= end:
                    break
        while not _finished(status := self.video(video_id)) and time.monotonic() < end:
            report(status)
            time.sleep(poll_s)
        report(status)
        return status

    def ready(self) -> bool:
        """Whether the server is ready for work now: False while it starts, loads or is
        unreachable (no retries: it answers for this moment)."""
        try:
            return self._http.get("/readyz").status_code == 200
        except httpx.RequestError:
            return False

    def _model(self, model: type[M], call: Call) -> M:
        return with_phrases(model.model_validate(self._send(call).json()), call)

    def _json(self, call: Call) -> dict[str, Any]:
        body: dict[str, Any] = self._send(call).json()
        return body

    def _events(
        self, video_id: str, last_event_id: str | None, frames: bool = True
    ) -> Generator[Event, None, None]:
        """Every event of the stream, keep-alives included; reconnects (resuming after the last
        event) when the connection breaks, as often as the client's retries allow in a row.
        `frames=False`: status events only (progress without masks)."""
        reader, attempt, call = EventReader(last_event_id), 0, _event_stream(video_id, frames)
        while True:
            outcome: Outcome
            try:
                with self._http.stream("GET", call.path, headers=reader.connect()) as response:
                    if response.status_code < 400:
                        for line in response.iter_lines():
                            if (event := reader.feed(line)) is not None:
                                attempt = 0  # it made progress: a later break starts afresh
                                yield event
                        return
                    response.read()
                    outcome = response
            except httpx.RequestError as exc:
                outcome = exc
            wait_s = self._wait_s(call, outcome, attempt)
            if wait_s is None:
                self._result(call, outcome)  # raises: an error answer, or no answer
                return
            time.sleep(max(wait_s, reader.retry_s or 0.0))
            attempt += 1

    def _send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            outcome = self._attempt(call)
            wait_s = self._wait_s(call, outcome, attempt)
            if wait_s is None:
                return self._result(call, outcome)
            time.sleep(wait_s)
            attempt += 1

    def _attempt(self, call: Call) -> Outcome:
        try:
            return self._http.request(call.method, call.path, **call.send_kwargs())
        except httpx.RequestError as exc:
            return exc


class AsyncClient(_Base):
    """`Client` for asyncio code: the same methods and arguments, awaited."""

    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        max_wait_s: float = 30.0,
        backoff_s: float = 0.5,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout, retries, max_wait_s, backoff_s)
        self._http = httpx.AsyncClient(**self.http_options, transport=transport)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._http.aclose()

    async def detect(
        self,
        image: ImageInput | None = None,
        prompt: str | list[str] | None = None,
        model: str | None = None,
        exemplars: list[list[float]] | None = None,
        **options: Any,
    ) -> DetectResponse:
        return await self._model(
            DetectResponse,
            Call.build("/v1/detect", image, _fields(prompt, model=model, exemplars=exemplars, **options)),
        )

    async def segment(
        self,
        image: ImageInput | None = None,
        prompt: str | list[str] | None = None,
        model: str | None = None,
        exemplars: list[list[float]] | None = None,
        **options: Any,
    ) -> SegmentResponse:
        return await self._model(
            SegmentResponse,
            Call.build("/v1/segment", image, _fields(prompt, model=model, exemplars=exemplars, **options)),
        )

    async def annotate(
        self,
        image: ImageInput | None = None,
        prompt: str | list[str] | None = None,
        model: str | None = None,
        **options: Any,
    ) -> bytes:
        call = Call.build("/v1/annotate", image, _fields(prompt, model=model, **options))
        return (await self._send(call)).content

    async def models(self) -> ModelsResponse:
        return ModelsResponse.model_validate((await self._send(Call("GET", "/v1/models"))).json())

    async def reload_model(
        self, name: str, source: str | None = None, timeout: float = RELOAD_TIMEOUT_S
    ) -> ReloadResponse:
        response = await self._send(reload_call(name, source, timeout))
        return ReloadResponse.model_validate(response.json())

    async def create_job(
        self, images: list[ImageInput], prompt: str | list[str], model: str | None = None, **options: Any
    ) -> JobStatus:
        call = job_call(images, prompt, {"model": model, **options})
        return JobStatus.model_validate((await self._send(call)).json())

    async def job(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate((await self._send(_jobs(job_id))).json())

    async def wait_job(self, job_id: str, poll_s: float = 2.0, timeout_s: float = 3600.0) -> JobStatus:
        end = time.monotonic() + timeout_s
        while (status := await self.job(job_id)).status in UNFINISHED and time.monotonic() < end:
            await asyncio.sleep(poll_s)
        return status

    async def job_result(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = (await self._send(_jobs(job_id, "/result"))).json()
        return result

    async def cancel_job(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate((await self._send(_jobs(job_id, method="DELETE"))).json())

    async def track_video(
        self,
        video: VideoInput,
        *,
        model: str | None = None,
        prompt: str | list[str] | None = None,
        boxes: list[list[float]] | None = None,
        points: list[list[float]] | None = None,
        frame: int | None = None,
        start: int = 0,
        end: int | None = None,
        stride: int = 1,
        **options: Any,
    ) -> dict[str, Any]:
        fields = {"model": model, "prompt": prompt, "boxes": boxes, "points": points, "frame": frame}
        call = video_call(video, {**fields, "start": start, "end": end, "stride": stride, **options})
        return await self._json(call)

    async def video(self, video_id: str) -> dict[str, Any]:
        return await self._json(_videos(video_id))

    async def videos(self, limit: int = 20) -> list[dict[str, Any]]:
        listed: list[dict[str, Any]] = (await self._json(Call("GET", f"/v1/videos?limit={limit}")))["videos"]
        return listed

    async def video_result(self, video_id: str, format: str = "json") -> dict[str, Any] | str | bytes:
        return video_answer(await self._send(_videos(video_id, f"/result?format={format}")), format)

    async def video_events(self, video_id: str, last_event_id: str | None = None) -> AsyncIterator[Event]:
        async for event in self._events(video_id, last_event_id):
            if event["event"]:
                yield event

    async def correct_video(
        self,
        video_id: str,
        frame: int,
        box: list[float] | None = None,
        points: list[list[float]] | None = None,
        object_id: int | None = None,
        label: str | None = None,
        direction: str = "forward",
    ) -> dict[str, Any]:
        fields = {"frame": frame, "box": box, "points": points, "object_id": object_id}
        return await self._json(correction_call(video_id, {**fields, "label": label, "direction": direction}))

    async def delete_video(self, video_id: str) -> None:
        await self._send(_videos(video_id, method="DELETE"))

    async def wait_video(
        self,
        video_id: str,
        timeout_s: float = 3600.0,
        on_progress: Progress | None = None,
        poll_s: float = 2.0,
    ) -> dict[str, Any]:
        end, report = time.monotonic() + timeout_s, on_progress or _ignore
        with contextlib.suppress(TransportError, ServerError):
            async with contextlib.aclosing(self._events(video_id, None, frames=False)) as events:
                async for event in events:
                    if event["event"] == "status":
                        report(event["data"])
                    if time.monotonic() >= end:
                        break
        while not _finished(status := await self.video(video_id)) and time.monotonic() < end:
            report(status)
            await asyncio.sleep(poll_s)
        report(status)
        return status

    async def ready(self) -> bool:
        try:
            return (await self._http.get("/readyz")).status_code == 200
        except httpx.RequestError:
            return False

    async def _model(self, model: type[M], call: Call) -> M:
        return with_phrases(model.model_validate((await self._send(call)).json()), call)

    async def _json(self, call: Call) -> dict[str, Any]:
        body: dict[str, Any] = (await self._send(call)).json()
        return body

    async def _events(
        self, video_id: str, last_event_id: str | None, frames: bool = True
    ) -> AsyncGenerator[Event, None]:
        reader, attempt, call = EventReader(last_event_id), 0, _event_stream(video_id, frames)
        while True:
            outcome: Outcome
            try:
                async with self._http.stream("GET", call.path, headers=reader.connect()) as response:
                    if response.status_code < 400:
                        async for line in response.aiter_lines():
                            if (event := reader.feed(line)) is not None:
                                attempt = 0
                                yield event
                        return
                    await response.aread()
                    outcome = response
            except httpx.RequestError as exc:
                outcome = exc
            wait_s = self._wait_s(call, outcome, attempt)
            if wait_s is None:
                self._result(call, outcome)
                return
            await asyncio.sleep(max(wait_s, reader.retry_s or 0.0))
            attempt += 1

    async def _send(self, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            outcome = await self._attempt(call)
            wait_s = self._wait_s(call, outcome, attempt)
            if wait_s is None:
                return self._result(call, outcome)
            await asyncio.sleep(wait_s)
            attempt += 1

    async def _attempt(self, call: Call) -> Outcome:
        try:
            return await self._http.request(call.method, call.path, **call.send_kwargs())
        except httpx.RequestError as exc:
            return exc
