"""Properties of the code that reads untrusted uploads: whatever the bytes or text, it answers
with the image (or value) or with one of our errors, never with anything else (a 500)."""

from __future__ import annotations

import io
import json
import zipfile
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from support import image_bytes
from tunnelvision.api.parsing import form_fields, load_json, validate_params
from tunnelvision.archives import ArchiveLimits, read_archive
from tunnelvision.errors import InvalidInput, PayloadTooLarge, TunnelvisionError
from tunnelvision.imaging import ACCEPTED_FORMATS, decode_base64, decode_image, probe_image
from tunnelvision.schemas import SegmentParams

LIMIT = 1_000_000
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SAMPLES = [image_bytes(24, 16, fmt=fmt, seed=i) for i, fmt in enumerate(ACCEPTED_FORMATS)]


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (12, 10), (80 * i, 0, 0)) for i in range(3)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:])
    return buffer.getvalue()


DAMAGEABLE = [
    *SAMPLES,
    *(animated(fmt) for fmt in ("GIF", "WEBP", "PNG", "TIFF")),
    *(
        image_bytes(9, 7, fmt=fmt, mode=mode)
        for fmt, mode in [("PNG", "RGBA"), ("PNG", "P"), ("TIFF", "CMYK")]
    ),
]
SIGNATURES = [sample[:8] for sample in SAMPLES] + [b"\x00\x00\x01\x00", b"icns", b"8BPS", b"%!PS"]


@st.composite
def mutated(draw: st.DrawFn, samples: list[bytes]) -> bytes:
    """A valid file with a few bytes changed, inserted or cut off."""
    data = bytearray(draw(st.sampled_from(samples)))
    for _ in range(draw(st.integers(1, 4))):
        position = draw(st.integers(0, len(data) - 1))
        action = draw(st.sampled_from(["flip", "insert", "truncate"]))
        if action == "flip":
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[max(1, position) :]
    return bytes(data)


def decodes_or_refuses(data: bytes) -> None:
    try:
        array = decode_image(data, LIMIT)
    except TunnelvisionError:
        return
    assert array.dtype == np.uint8 and array.ndim == 3 and array.shape[2] == 3
    assert array.shape[0] * array.shape[1] <= LIMIT


@FAST
@given(st.one_of(st.binary(max_size=512), st.tuples(st.sampled_from(SIGNATURES), st.binary(max_size=512))))
def test_any_bytes_decode_or_get_one_of_our_errors(data: bytes | tuple[bytes, bytes]) -> None:
    decodes_or_refuses(b"".join(data) if isinstance(data, tuple) else data)


@FAST
@given(mutated(DAMAGEABLE))
def test_damaged_images_decode_or_get_one_of_our_errors(data: bytes) -> None:
    decodes_or_refuses(data)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 48),
    st.integers(1, 48),
    st.sampled_from(ACCEPTED_FORMATS),
    st.sampled_from(["RGB", "L"]),
)
def test_valid_images_keep_their_size(width: int, height: int, fmt: str, mode: str) -> None:
    data = image_bytes(width, height, fmt=fmt, mode=mode)
    assert probe_image(data, LIMIT) == (width, height)
    assert decode_image(data, LIMIT).shape == (height, width, 3)


@FAST
@given(st.text(max_size=300))
def test_base64_text_decodes_or_gets_one_of_our_errors(text: str) -> None:
    try:
        data = decode_base64(text, 100)
    except (InvalidInput, PayloadTooLarge) as exc:
        assert exc.message
        return
    assert len(data) <= 100


JSONISH = st.one_of(
    st.text(max_size=200),
    st.text(alphabet='[]{},:"0123456789.-e truefalsn\\', max_size=300),
    st.tuples(st.integers(1, 20_000), st.sampled_from("[{")).map(lambda t: t[1] * t[0]),
    st.integers(0, 20_000).map(lambda n: "[" * n + "1" + "]" * n),
)


@FAST
@given(JSONISH, st.booleans())
def test_json_text_parses_or_gets_an_input_error(text: str, as_bytes: bool) -> None:
    try:
        value = load_json(text.encode() if as_bytes else text, "the JSON body", "body is not valid JSON")
    except InvalidInput as exc:
        assert exc.message.startswith(("the JSON body", "body is not valid JSON"))
        return
    assert value == json.loads(text)


@FAST
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["boxes", "points", "prompt", "box_threshold", "mask_format", "multimask", "x"]),
            JSONISH,
        ),
        max_size=6,
    )
)
def test_form_fields_parse_or_get_an_input_error(items: list[tuple[str, Any]]) -> None:
    try:
        params = validate_params(SegmentParams, form_fields(items))
    except InvalidInput as exc:
        assert exc.message
        return
    assert len(params.boxes or []) <= 256 and len(params.points or []) <= 256


ZIPS = []
for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        archive.writestr("a/one.png", SAMPLES[1])
        archive.writestr("two.jpg", SAMPLES[0])
    ZIPS.append(buffer.getvalue())


ARCHIVE_LIMITS = ArchiveLimits(
    max_members=10, max_member_bytes=100_000, max_total_bytes=1_000_000, max_unpacked_bytes=1_000_000
)


@FAST
@given(st.one_of(st.binary(max_size=512), mutated(ZIPS)))
def test_any_archive_unpacks_or_gets_one_of_our_errors(data: bytes) -> None:
    limits = ARCHIVE_LIMITS
    try:
        members = read_archive(io.BytesIO(data), limits)
    except TunnelvisionError:
        return
    assert len(members) <= 10 and all(len(body) <= 100_000 for _, body in members)


@pytest.mark.parametrize("data", ZIPS)
def test_valid_archives_unpack_to_their_members(data: bytes) -> None:
    limits = ARCHIVE_LIMITS
    assert read_archive(io.BytesIO(data), limits) == [("a/one.png", SAMPLES[1]), ("two.jpg", SAMPLES[0])]
