"""Python client: `Client(url, api_key)` and `AsyncClient`, on the server's own schemas.

    from tunnelvision import Client
    with Client("https://api.example.com", api_key="tv_...") as client:
        result = client.segment("cat.jpg", prompt="a cat")
        masks = decode_masks(result)          # numpy bool arrays, one per detection

Images may be a path, bytes, a PIL image or a numpy array. 429 and 503 answers are retried after
their Retry-After (bounded); other errors raise `APIError` subclasses carrying the JSON error.
"""

from __future__ import annotations

import asyncio
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

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
M = TypeVar("M", bound=BaseModel)
DEFAULT_URL = "http://127.0.0.1:8000"
RETRYABLE = (429, 503)
RELOAD_TIMEOUT_S = 600.0  # loading real weights can take minutes


class APIError(Exception):
    """An error answer: its status, and the server's `{"error": {code, message, request_id}}`."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        request_id: str | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}")
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
    """One API call, built the same way for both clients."""

    path: str
    files: dict[str, Any] | list[tuple[str, Any]] | None
    data: dict[str, str]

    @classmethod
    def build(cls, path: str, image: ImageInput | None, fields: dict[str, Any]) -> Call:
        data = {k: _form_value(v) for k, v in fields.items() if v is not None}
        files = (
            {"image": ("image", image_bytes(image), "application/octet-stream")}
            if image is not None
            else None
        )
        return cls(path, files, data)

    def send_kwargs(self, method: str) -> dict[str, Any]:
        if method != "POST":
            return {}
        if self.files is None:  # image_id only: no file to upload, so JSON
            return {"json": {k: _json_value(v) for k, v in self.data.items()}}
        return {"files": self.files, "data": self.data}


def with_phrases(result: M, call: Call) -> M:
    """A detect/segment answer that remembers its request's phrases: `to_supervision()` numbers
    class ids in them."""
    if isinstance(result, DetectResponse | SegmentResponse):
        result._phrases = normalize_prompt(call.data.get("prompt"))
    return result


def job_call(images: list[ImageInput], prompt: str | list[str], options: dict[str, Any]) -> Call:
    files = [
        ("images", (_name_of(image, i), image_bytes(image), "application/octet-stream"))
        for i, image in enumerate(images)
    ]
    data = {k: _form_value(v) for k, v in _fields(prompt, **options).items() if v is not None}
    return Call("/v1/jobs", files, data)


def reload_call(name: str, source: str | None) -> tuple[str, dict[str, str]]:
    """The reload route of pipeline `name` and its JSON body (empty: the same sources again)."""
    return f"/v1/models/{name}/reload", {} if source is None else {"source": source}


def _name_of(image: ImageInput, index: int) -> str:
    return Path(image).name if isinstance(image, str | os.PathLike) else f"image-{index:05d}.png"


def _form_value(value: Any) -> str:
    if isinstance(value, list | tuple | dict):
        return json.dumps(value)
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _json_value(value: str) -> Any:
    try:
        return json.loads(value)
    except ValueError:
        return value


def _fields(prompt: Any = None, **options: Any) -> dict[str, Any]:
    if isinstance(prompt, list):  # form fields are flat: labels become one '.'-separated prompt
        prompt = ". ".join(prompt)
    return {"prompt": prompt, **options}


class _Base:
    """What both clients share: where, who, how patiently. Only the sending differs (sync/async)."""

    def __init__(
        self, url: str | None, api_key: str | None, timeout: float, retries: int, max_wait_s: float
    ) -> None:
        self.url = (url or os.environ.get("TUNNELVISION_URL") or DEFAULT_URL).rstrip("/")
        key = api_key or os.environ.get("TUNNELVISION_API_KEY")
        self.headers = {"Authorization": f"Bearer {key}"} if key else {}
        self.retries, self.max_wait_s = retries, max_wait_s
        self.http_options: dict[str, Any] = {
            "base_url": self.url,
            "headers": self.headers,
            "timeout": timeout,
        }

    def _wait_s(self, response: httpx.Response, attempt: int) -> float | None:
        """Seconds to wait before retrying this answer; None when it is final."""
        if response.status_code not in RETRYABLE or attempt >= self.retries:
            return None
        return min(self.max_wait_s, retry_after(response) or 2.0**attempt)


class Client(_Base):
    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        max_wait_s: float = 30.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout, retries, max_wait_s)
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
        return self._send(
            "POST", Call.build("/v1/annotate", image, _fields(prompt, model=model, **options))
        ).content

    def models(self) -> ModelsResponse:
        """The pipelines served (names for `model`), their models and abilities."""
        return ModelsResponse.model_validate(self._send("GET", Call("/v1/models", None, {})).json())

    def reload_model(
        self, name: str, source: str | None = None, timeout: float = RELOAD_TIMEOUT_S
    ) -> ReloadResponse:
        """Load new weights for pipeline `name` beside the old, warm them up and switch with no
        downtime. `source`: a SPEC (DETECTOR+SEGMENTER or one model; hub ids or folders on the
        server); default: its current sources again. Needs an admin key. Not retried: a second
        reload while one runs is a 409, a failed load an InvalidRequest saying why."""
        path, body = reload_call(name, source)
        response = self._http.post(path, json=body, timeout=timeout)
        raise_for_error(response)
        return ReloadResponse.model_validate(response.json())

    def create_job(
        self, images: list[ImageInput], prompt: str | list[str], model: str | None = None, **options: Any
    ) -> JobStatus:
        """Many images at background priority; follow with `job`, `wait_job`, `job_result`."""
        call = job_call(images, prompt, {"model": model, **options})
        return JobStatus.model_validate(self._send("POST", call).json())

    def job(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._send("GET", Call(f"/v1/jobs/{job_id}", None, {})).json())

    def wait_job(self, job_id: str, poll_s: float = 2.0, timeout_s: float = 3600.0) -> JobStatus:
        end = time.monotonic() + timeout_s
        while (status := self.job(job_id)).status in ("queued", "running") and time.monotonic() < end:
            time.sleep(poll_s)
        return status

    def job_result(self, job_id: str) -> dict[str, Any]:
        """COCO instances of the images finished so far."""
        result: dict[str, Any] = self._send("GET", Call(f"/v1/jobs/{job_id}/result", None, {})).json()
        return result

    def cancel_job(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(self._send("DELETE", Call(f"/v1/jobs/{job_id}", None, {})).json())

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def _model(self, model: type[M], call: Call) -> M:
        return with_phrases(model.model_validate(self._send("POST", call).json()), call)

    def _send(self, method: str, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            response = self._http.request(method, call.path, **call.send_kwargs(method))
            wait_s = self._wait_s(response, attempt)
            if wait_s is None:
                raise_for_error(response)
                return response
            time.sleep(wait_s)
            attempt += 1


class AsyncClient(_Base):
    def __init__(
        self,
        url: str | None = None,
        api_key: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        max_wait_s: float = 30.0,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        super().__init__(url, api_key, timeout, retries, max_wait_s)
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
        return (await self._send("POST", call)).content

    async def models(self) -> ModelsResponse:
        return ModelsResponse.model_validate((await self._send("GET", Call("/v1/models", None, {}))).json())

    async def reload_model(
        self, name: str, source: str | None = None, timeout: float = RELOAD_TIMEOUT_S
    ) -> ReloadResponse:
        path, body = reload_call(name, source)
        response = await self._http.post(path, json=body, timeout=timeout)
        raise_for_error(response)
        return ReloadResponse.model_validate(response.json())

    async def create_job(
        self, images: list[ImageInput], prompt: str | list[str], model: str | None = None, **options: Any
    ) -> JobStatus:
        call = job_call(images, prompt, {"model": model, **options})
        return JobStatus.model_validate((await self._send("POST", call)).json())

    async def job(self, job_id: str) -> JobStatus:
        return JobStatus.model_validate(
            (await self._send("GET", Call(f"/v1/jobs/{job_id}", None, {}))).json()
        )

    async def job_result(self, job_id: str) -> dict[str, Any]:
        result: dict[str, Any] = (await self._send("GET", Call(f"/v1/jobs/{job_id}/result", None, {}))).json()
        return result

    async def cancel_job(self, job_id: str) -> JobStatus:
        response = await self._send("DELETE", Call(f"/v1/jobs/{job_id}", None, {}))
        return JobStatus.model_validate(response.json())

    async def _model(self, model: type[M], call: Call) -> M:
        return with_phrases(model.model_validate((await self._send("POST", call)).json()), call)

    async def _send(self, method: str, call: Call) -> httpx.Response:
        attempt = 0
        while True:
            response = await self._http.request(method, call.path, **call.send_kwargs(method))
            wait_s = self._wait_s(response, attempt)
            if wait_s is None:
                raise_for_error(response)
                return response
            await asyncio.sleep(wait_s)
            attempt += 1
