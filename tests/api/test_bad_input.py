"""Every kind of bad input gets a clear 4xx JSON error, and the server stays healthy."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from PIL import Image

from support import ThreadServer, image_bytes

PNG = image_bytes(64, 48)
B64 = base64.b64encode(PNG).decode()


def bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (2000, 2000)).save(buffer, format="PNG")  # 4 MP in a few KB; the limit is 1 MP
    return buffer.getvalue()


def chunks(total: int) -> Iterator[bytes]:
    for _ in range(total // 10_000):
        yield b"x" * 10_000


def multipart(image: bytes = PNG, **fields: Any) -> dict[str, Any]:
    return {"files": {"image": ("image.png", image, "image/png")}, "data": fields}


def as_json(payload: Any) -> dict[str, Any]:
    return {"content": json.dumps(payload), "headers": {"content-type": "application/json"}}


CASES: list[tuple[str, str, dict[str, Any], int, str, str]] = [
    (
        "not-an-image",
        "/v1/detect",
        multipart(b"hello world", prompt="cat"),
        400,
        "invalid_image",
        "not an image",
    ),
    (
        "truncated",
        "/v1/detect",
        multipart(PNG[:120], prompt="cat"),
        400,
        "invalid_image",
        "corrupt or truncated",
    ),
    ("empty-file", "/v1/detect", multipart(b"", prompt="cat"), 400, "invalid_image", "empty"),
    ("bad-base64", "/v1/detect", as_json({"image": "%%%", "prompt": "cat"}), 400, "invalid_image", "base64"),
    ("json-no-image", "/v1/segment", as_json({"prompt": "cat"}), 400, "invalid_image", "'image' is required"),
    (
        "json-image-number",
        "/v1/segment",
        as_json({"image": 5, "prompt": "cat"}),
        400,
        "invalid_image",
        "base64",
    ),
    (
        "unknown-image-id",
        "/v1/segment",
        as_json({"image_id": "0" * 32, "prompt": "cat"}),
        404,
        "not_found",
        "send the image again",
    ),
    (
        "image-and-image-id",
        "/v1/detect",
        multipart(prompt="cat", image_id="abc"),
        422,
        "invalid_input",
        "not both",
    ),
    (
        "form-image-as-text",
        "/v1/detect",
        {"data": {"image": "abc", "prompt": "cat"}, "files": {"x": ("x", b"1")}},
        400,
        "invalid_image",
        "file field",
    ),
    ("json-not-object", "/v1/detect", as_json([1, 2]), 422, "invalid_input", "object"),
    (
        "json-syntax",
        "/v1/detect",
        {"content": b"{nope", "headers": {"content-type": "application/json"}},
        422,
        "invalid_input",
        "not valid JSON",
    ),
    (
        "declared-too-big",
        "/v1/detect",
        {"content": b"x" * 300_000, "headers": {"content-type": "application/json"}},
        413,
        "payload_too_large",
        "byte limit",
    ),
    (
        "streamed-too-big",
        "/v1/detect",
        {"content": chunks(400_000), "headers": {"content-type": "application/json"}},
        413,
        "payload_too_large",
        "byte limit",
    ),
    ("pixel-bomb", "/v1/segment", multipart(bomb(), prompt="cat"), 413, "image_too_large", "2000x2000"),
    ("empty-prompt", "/v1/segment", multipart(prompt=" . "), 422, "invalid_input", "nothing to segment"),
    ("detect-empty-prompt", "/v1/detect", multipart(prompt=""), 422, "invalid_input", "prompt is empty"),
    (
        "threshold-high",
        "/v1/detect",
        multipart(prompt="cat", box_threshold="1.5"),
        422,
        "invalid_input",
        "box_threshold",
    ),
    (
        "threshold-negative",
        "/v1/segment",
        as_json({"image": B64, "prompt": "cat", "text_threshold": -1}),
        422,
        "invalid_input",
        "text_threshold",
    ),
    (
        "threshold-not-number",
        "/v1/detect",
        multipart(prompt="cat", box_threshold="high"),
        422,
        "invalid_input",
        "box_threshold",
    ),
    (
        "degenerate-box",
        "/v1/segment",
        multipart(boxes="[[10, 10, 10, 20]]"),
        422,
        "invalid_input",
        "degenerate",
    ),
    ("box-outside", "/v1/segment", multipart(boxes="[[10, 10, 65, 20]]"), 422, "invalid_input", "outside"),
    (
        "box-three-numbers",
        "/v1/segment",
        as_json({"image": B64, "boxes": [[1, 2, 3]]}),
        422,
        "invalid_input",
        "boxes",
    ),
    ("boxes-not-json", "/v1/segment", multipart(boxes="10,10,20,20"), 422, "invalid_input", "must be JSON"),
    ("point-label", "/v1/segment", multipart(points="[[5, 5, 2]]"), 422, "invalid_input", "label"),
    ("point-outside", "/v1/segment", multipart(points="[[5, 48, 1]]"), 422, "invalid_input", "outside"),
    (
        "prompt-and-boxes",
        "/v1/segment",
        multipart(prompt="cat", boxes="[[1, 1, 5, 5]]"),
        422,
        "invalid_input",
        "only one",
    ),
    (
        "annotate-format",
        "/v1/annotate",
        multipart(prompt="cat", format="gif"),
        422,
        "invalid_input",
        "format",
    ),
    ("annotate-no-prompt", "/v1/annotate", multipart(), 422, "invalid_input", "nothing to segment"),
    (
        "mask-format",
        "/v1/segment",
        multipart(prompt="cat", mask_format="bmp"),
        422,
        "invalid_input",
        "mask_format",
    ),
    ("unknown-field", "/v1/detect", multipart(prompt="cat", colour="red"), 422, "invalid_input", "colour"),
    (
        "boxes-on-detect",
        "/v1/detect",
        multipart(prompt="cat", boxes="[[1, 1, 5, 5]]"),
        422,
        "invalid_input",
        "boxes",
    ),
    (
        "text-plain",
        "/v1/detect",
        {"content": b"cat", "headers": {"content-type": "text/plain"}},
        415,
        "unsupported_media_type",
        "text/plain",
    ),
    ("no-content-type", "/v1/segment", {"content": b"cat"}, 415, "unsupported_media_type", "missing"),
]


@pytest.mark.parametrize(
    ("route", "request_kwargs", "status", "code", "words"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_input_gets_a_clear_json_error(
    server: ThreadServer, route: str, request_kwargs: dict[str, Any], status: int, code: str, words: str
) -> None:
    response = httpx.post(server.url + route, timeout=10, **request_kwargs)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code
    assert words in error["message"]
    assert error["request_id"] == response.headers["x-request-id"]
    assert "Traceback" not in response.text
    assert httpx.get(server.url + "/healthz").status_code == 200


def test_wrong_method_and_unknown_route_are_json_errors(server: ThreadServer) -> None:
    wrong = httpx.get(server.url + "/v1/detect")
    assert (wrong.status_code, wrong.json()["error"]["code"]) == (405, "method_not_allowed")
    missing = httpx.get(server.url + "/v1/nothing")
    assert (missing.status_code, missing.json()["error"]["code"]) == (404, "not_found")


def test_after_all_that_a_good_request_still_works(server: ThreadServer) -> None:
    for _, route, request_kwargs, *_ in CASES:
        httpx.post(server.url + route, timeout=10, **request_kwargs)
    good = httpx.post(server.url + "/v1/detect", timeout=10, **multipart(prompt="cat"))
    assert good.status_code == 200
    assert good.json()["image"] == {"width": 64, "height": 48}
