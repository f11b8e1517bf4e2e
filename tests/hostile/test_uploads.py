"""Uploads that cost more than they look: image bombs, odd sizes, hostile zips and deep JSON.
Each is refused with a clear 4xx JSON error before the work it would cause, and the server's
peak memory (read from /proc) stays where it was."""

from __future__ import annotations

import io
import struct
import zipfile
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from support import FakeBackend, ThreadServer, cli_server, image_bytes, make_settings

MB = 1024 * 1024
PNG = image_bytes(64, 48)


# -- hostile files ---------------------------------------------------------------------------


def encoded(image: Image.Image, fmt: str, **save: Any) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **save)
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size; its data is a few bytes (a bomb's first move)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(bytes(4096)))
        + chunk(b"IEND", b"")
    )


def gif_with_huge_second_frame(width: int = 60000, height: int = 60000) -> bytes:
    """A 10x10 GIF whose second frame's descriptor reaches past the screen to width x height."""
    small = encoded(Image.new("P", (10, 10), 0), "GIF")
    descriptor = b"," + struct.pack("<HHHH", 0, 0, 10, 10)
    frame = small[small.index(descriptor) : -1]  # descriptor and image data, without the ';' trailer
    huge = b"," + struct.pack("<HHHH", 0, 0, width, height) + frame[len(descriptor) :]
    return small[:-1] + huge + b";"


def tiff_with_huge_second_page(width: int = 60000, height: int = 60000) -> bytes:
    pages = [Image.new("L", (10, 10)), Image.new("L", (10, 11))]
    data = bytearray(encoded(pages[0], "TIFF", save_all=True, append_images=pages[1:]))
    for tag, value in ((256, width), (257, height)):  # ImageWidth, ImageLength of the last page
        position = data.rfind(struct.pack("<HHI", tag, 4, 1))  # LONG, one value (as Pillow writes)
        assert position > 0
        struct.pack_into("<I", data, position + 8, value)
    return bytes(data)


def ico_holding_png(side: int) -> bytes:
    """An icon whose one entry is a PNG of side x side: Pillow's ICO plugin decodes it on open."""
    png = encoded(Image.new("1", (side, side)), "PNG")
    directory = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22)
    return directory + png


def webp_claiming(width: int, height: int) -> bytes:
    """An animated WebP of 16x16 frames on a canvas of width x height."""
    frames = [Image.new("RGB", (16, 16), (255, 0, 0)), Image.new("RGB", (16, 16), (0, 0, 255))]
    data = bytearray(encoded(frames[0], "WEBP", save_all=True, append_images=frames[1:], lossless=True))
    assert data[12:16] == b"VP8X"
    data[24:27] = (width - 1).to_bytes(3, "little")
    data[27:30] = (height - 1).to_bytes(3, "little")
    return bytes(data)


def zipped(members: dict[str, bytes], method: int = zipfile.ZIP_DEFLATED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def zip_of_zeros(name: str, size: int) -> bytes:
    """`size` zero bytes deflated (300 MB -> 300 KB), written without holding them in memory."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive, archive.open(name, "w") as member:
        for _ in range(size // MB):
            member.write(bytes(MB))
    return buffer.getvalue()


# Offsets of a member's fields in the local header (first member, at 0) and its directory record.
LOCAL_FIELDS = {"flags": (6, "<H"), "method": (8, "<H"), "crc": (14, "<I"), "size": (22, "<I")}
CENTRAL_FIELDS = {"flags": (8, "<H"), "method": (10, "<H"), "crc": (16, "<I"), "size": (24, "<I")}


def patched(archive: bytes, field: str, value: int) -> bytes:
    """A one-member zip with one field changed in both the local header and the directory."""
    data = bytearray(archive)
    for start, fields in ((0, LOCAL_FIELDS), (data.rfind(b"PK\x01\x02"), CENTRAL_FIELDS)):
        offset, fmt = fields[field]
        struct.pack_into(fmt, data, start + offset, value)
    return bytes(data)


# -- helpers ---------------------------------------------------------------------------------


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM in /proc")


def segment(url: str, image: bytes, **fields: Any) -> httpx.Response:
    data = {"prompt": "cat", **fields}
    return httpx.post(f"{url}/v1/segment", files={"image": ("i", image)}, data=data, timeout=60)


def submit_job(url: str, files: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/jobs", files=files, data={"prompt": "cat"}, timeout=60)


def archive_job(url: str, archive: bytes) -> httpx.Response:
    return submit_job(url, {"archive": ("a.zip", archive, "application/zip")})


def assert_error(response: httpx.Response, status: int, code: str, words: str = "") -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code, error
    assert words in error["message"], error
    assert error["request_id"] == response.headers["x-request-id"]


# -- image bombs against `tunnelvision serve` --------------------------------------------------

# Built when the test runs (the zips take a second): name, builder, status, code, words.
BOMBS: list[tuple[str, Callable[[], bytes], int, str, str]] = [
    ("png-claims-30000x30000", lambda: png_claiming(30000, 30000), 413, "image_too_large", "pixel limit"),
    ("gif-huge-second-frame", gif_with_huge_second_frame, 413, "image_too_large", "60000x60000"),
    ("tiff-huge-second-page", tiff_with_huge_second_page, 413, "image_too_large", "60000x60000"),
    ("ico-144-megapixels", lambda: ico_holding_png(12000), 415, "unsupported_image_format", "ICO"),
    (
        "webp-canvas-160-megapixels",
        lambda: webp_claiming(16000, 10000),
        413,
        "image_too_large",
        "16000x10000",
    ),
]
ZIP_BOMBS: list[tuple[str, Callable[[], bytes], int, str, str]] = [
    ("zip-300MB-member", lambda: zip_of_zeros("zeros.png", 300 * MB), 413, "payload_too_large", "zeros.png"),
    (
        "zip-member-lies-about-its-size",
        lambda: patched(zip_of_zeros("liar.png", 300 * MB), "size", 1000),
        400,
        "malformed_input",
        "liar.png",
    ),
]


def test_bombs_are_refused_before_they_cost_memory(tiny_models: tuple[Path, Path], tmp_path: Path) -> None:
    with cli_server(*tiny_models, log=tmp_path / "serve.log") as (url, process):
        # Every code path once with honest files, so what is measured next is the bombs alone.
        for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"):
            assert segment(url, image_bytes(160, 120, fmt=fmt)).status_code == 200
        assert segment(url, encoded(Image.new("RGB", (16, 16)), "ICO")).status_code == 415
        assert archive_job(url, zipped({"a.png": PNG})).status_code == 202
        before = peak_rss_mb(process.pid)
        for name, build, status, code, words in BOMBS:
            bomb = build()
            assert len(bomb) < 400_000, name
            assert_error(segment(url, bomb), status, code, words)
            job = submit_job(url, {"images": (name, bomb, "application/octet-stream")})
            assert_error(job, status, code, words)
        for name, build, status, code, words in ZIP_BOMBS:
            archive = build()
            assert len(archive) < 400_000, name
            assert_error(archive_job(url, archive), status, code, words)
        after = peak_rss_mb(process.pid)
        print(f"server peak RSS: {before:.1f} MB before the bombs, {after:.1f} MB after")
        assert after - before < 50, f"peak memory grew by {after - before:.1f} MB"
        assert httpx.get(f"{url}/healthz").status_code == 200


# -- odd sizes through the real models ---------------------------------------------------------


@pytest.fixture(scope="module")
def model_url(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with cli_server(*tiny_models, log=tmp_path_factory.mktemp("logs") / "serve.log") as (url, _):
        yield url


@pytest.mark.parametrize("route", ["/v1/detect", "/v1/segment"])
@pytest.mark.parametrize(("width", "height"), [(1, 1), (2, 1), (1, 2), (1, 500), (500, 1), (40, 20000)])
def test_tiny_and_thin_images_work_through_the_models(
    model_url: str, route: str, width: int, height: int
) -> None:
    files = {"image": ("i.png", image_bytes(width, height), "image/png")}
    response = httpx.post(
        f"{model_url}{route}", files=files, data={"prompt": "cat", "box_threshold": "0"}, timeout=60
    )
    assert response.status_code == 200, response.text
    assert response.json()["image"] == {"width": width, "height": height}


@pytest.mark.parametrize("route", ["/v1/detect", "/v1/segment"])
@pytest.mark.parametrize(("width", "height"), [(1, 20000), (20000, 1), (2, 1001)])
def test_images_too_thin_for_the_models_get_a_4xx_naming_the_size(
    model_url: str, route: str, width: int, height: int
) -> None:
    files = {"image": ("i.png", image_bytes(width, height, mode="L"), "image/png")}
    response = httpx.post(f"{model_url}{route}", files=files, data={"prompt": "cat"}, timeout=60)
    assert_error(response, 400, "invalid_image", f"{width}x{height}")


# -- job archives and job images ------------------------------------------------------------------

ARCHIVES: list[tuple[str, bytes, int, str, str]] = [
    (
        "encrypted",
        patched(zipped({"a.png": PNG}), "flags", 0x1),
        400,
        "malformed_input",
        "'a.png' is encrypted",
    ),
    ("bzip2", zipped({"a.png": PNG}, zipfile.ZIP_BZIP2), 400, "malformed_input", "compression method 12"),
    ("lzma", zipped({"a.png": PNG}, zipfile.ZIP_LZMA), 400, "malformed_input", "compression method 14"),
    ("unknown-method", patched(zipped({"a.png": PNG}), "method", 99), 400, "malformed_input", "method 99"),
    ("bad-crc", patched(zipped({"a.png": PNG}), "crc", 1234), 400, "malformed_input", "'a.png' is damaged"),
    ("traversal", zipped({"../evil.png": PNG}), 400, "malformed_input", "unsafe name"),
    ("absolute", zipped({"/etc/evil.png": PNG}), 400, "malformed_input", "unsafe name"),
    ("backslash-traversal", zipped({"..\\evil.png": PNG}), 400, "malformed_input", "unsafe name"),
    (
        "member-over-image-cap",
        zip_of_zeros("big.png", 1 * MB),
        413,
        "payload_too_large",
        "'big.png' is 1048576",
    ),
    ("not-an-image", zipped({"notes.txt": b"hello"}), 400, "invalid_image", "'notes.txt' is not an image"),
    (
        "ico-inside",
        zipped({"x.ico": encoded(Image.new("RGB", (16, 16)), "ICO")}),
        415,
        "unsupported_image_format",
        "ICO",
    ),
]


@pytest.mark.parametrize(
    ("archive", "status", "code", "words"), [a[1:] for a in ARCHIVES], ids=[a[0] for a in ARCHIVES]
)
def test_hostile_archives_get_a_clear_4xx(
    server: ThreadServer, archive: bytes, status: int, code: str, words: str
) -> None:
    assert_error(archive_job(server.url, archive), status, code, words)
    assert [p for p in server.state.jobs.folder.iterdir() if p.is_dir()] == []  # nothing stored
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_folders_and_os_metadata_in_an_archive_are_skipped(server: ThreadServer) -> None:
    archive = zipped(
        {
            "photos/": b"",
            "photos/a.png": PNG,
            "__MACOSX/photos/._a.png": b"\x00\x05\x16\x07 AppleDouble",
            "photos/._b.png": b"\x00\x05\x16\x07 AppleDouble",
            "photos/.DS_Store": b"Bud1",
        }
    )
    created = archive_job(server.url, archive)
    assert created.status_code == 202, created.text
    assert created.json()["total"] == 1


@pytest.mark.parametrize(
    ("image", "status", "code", "words"),
    [
        (encoded(Image.new("RGB", (16, 16)), "ICO"), 415, "unsupported_image_format", "ICO"),
        (gif_with_huge_second_frame(), 413, "image_too_large", "frame 1"),
        (encoded(Image.new("1", (1200, 1000)), "PNG"), 413, "image_too_large", "1200x1000"),
        (image_bytes(1, 20000, mode="L"), 400, "invalid_image", "1x20000"),
    ],
    ids=["ico", "gif-frame", "over-pixel-limit", "too-thin"],
)
def test_job_images_are_checked_like_predict_images(
    server: ThreadServer, image: bytes, status: int, code: str, words: str
) -> None:
    response = submit_job(server.url, {"images": ("pic", image, "application/octet-stream")})
    assert_error(response, status, code, words)
    assert "'pic'" in response.json()["error"]["message"]


def test_archive_limits_come_from_its_directory(fake: FakeBackend) -> None:
    settings = make_settings(max_job_images=3, jobs_quota_bytes=100_000, max_body_bytes=200_000)
    with ThreadServer(settings, fake) as srv:
        four = zipped({f"{i}.png": image_bytes(seed=i) for i in range(4)})
        assert_error(archive_job(srv.url, four), 422, "invalid_input", "holds 4 images")
        many = zipped({f"{i}": b"" for i in range(200)})  # a directory far larger than 3 images need
        assert_error(archive_job(srv.url, many), 422, "invalid_input", "lists 200 entries")
        over_quota = zipped({"a.png": bytes(60_000), "b.png": bytes(60_000)})  # 120 KB unpacked
        assert_error(archive_job(srv.url, over_quota), 507, "quota_exceeded", "120000 bytes")
        assert [p for p in srv.state.jobs.folder.iterdir() if p.is_dir()] == []


def test_an_archive_may_unpack_to_a_few_bodies_at_most(fake: FakeBackend) -> None:
    """Images barely compress: 5 members of 140 KB zeros (each under the 150 KB per-image cap)
    unpack to 700 KB from a ~3 KB upload, over 4 x the body limit, and are refused unread."""
    settings = make_settings(max_job_images=10, jobs_quota_bytes=10**9, max_body_bytes=150_000)
    with ThreadServer(settings, fake) as srv:
        bomb = zipped({f"{i}.png": bytes(140_000) for i in range(5)})
        assert len(bomb) < 5_000
        assert_error(archive_job(srv.url, bomb), 413, "payload_too_large", "700000 bytes once unpacked")


# -- JSON depth and size ---------------------------------------------------------------------------


def nested(depth: int) -> str:
    return "[" * depth + "]" * depth


@pytest.mark.parametrize(
    "request_kwargs",
    [
        {"content": nested(5000), "headers": {"content-type": "application/json"}},
        {
            "content": '{"prompt": "cat", "boxes": ' + nested(5000) + "}",
            "headers": {"content-type": "application/json"},
        },
        {"files": {"image": ("i.png", PNG, "image/png")}, "data": {"boxes": nested(5000)}},
        {"files": {"image": ("i.png", PNG, "image/png")}, "data": {"points": nested(5000)}},
    ],
    ids=["body", "body-boxes", "form-boxes", "form-points"],
)
def test_deeply_nested_json_is_a_400(server: ThreadServer, request_kwargs: dict[str, Any]) -> None:
    response = httpx.post(f"{server.url}/v1/segment", timeout=10, **request_kwargs)
    assert_error(response, 400, "malformed_input", "nested too deeply")
    assert httpx.get(f"{server.url}/healthz").status_code == 200


def test_huge_json_lists_are_refused_before_parsing(server: ThreadServer) -> None:
    body = '{"prompt": "cat", "boxes": [' + "0," * 60_000 + "0]}"  # 120 KB, under the body limit
    response = httpx.post(
        f"{server.url}/v1/segment", content=body, headers={"content-type": "application/json"}, timeout=10
    )
    assert_error(response, 422, "invalid_input", "more than 8192 values")


# -- video bombs -------------------------------------------------------------------------------


SMALL_PNG = encoded(Image.new("RGB", (8, 8)), "PNG")


def zip_of_frames(frames: dict[str, bytes]) -> bytes:
    return zipped(frames)


def test_video_bombs_are_refused_before_they_cost_memory(
    tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    """Clips over the frame-size limit (a real 4000x2250 H.264 stream of a few kB; a zip whose
    frame claims 30000x30000) and over the frame count are refused from their headers: nothing is
    decoded, and the server's peak memory does not move."""
    from tunnelvision.models.random_families import write_random_family
    from tunnelvision.video.synthetic import write_moving_square_clip

    tracker = write_random_family(tmp_path / "tracker", "sam2-video", "tiny", seed=1)
    honest = write_moving_square_clip(tmp_path / "honest.mp4", 4, 64, 48).read_bytes()
    huge = write_moving_square_clip(tmp_path / "huge.mp4", 1, 4000, 2250).read_bytes()
    bombs = [
        ("huge.mp4", huge, 413, "frame_too_large", "4000x2250"),
        ("claims.zip", zip_of_frames({"0.png": PNG, "1.png": png_claiming(30000, 30000)}), 413, "", ""),
        (
            "many.zip",
            zip_of_frames({f"{i}.png": SMALL_PNG for i in range(200)}),
            413,
            "video_too_large",
            "100",
        ),
    ]
    flags = ("--pipeline", f"track={tracker}", "--video-max-frames", "100", "--no-warmup")
    with cli_server(*tiny_models, *flags, log=tmp_path / "serve.log") as (url, process):
        assert track_clip(url, "honest.mp4", honest).status_code == 202  # every path once, honestly
        assert track_clip(url, "photo.png", PNG).status_code == 415
        before = peak_rss_mb(process.pid)
        for name, bomb, status, code, words in bombs:
            assert len(bomb) < 400_000, name
            answer = track_clip(url, name, bomb)
            assert answer.status_code == status, answer.text
            assert code in answer.json()["error"]["code"] and words in answer.json()["error"]["message"]
        after = peak_rss_mb(process.pid)
        print(f"server peak RSS: {before:.1f} MB before the video bombs, {after:.1f} MB after")
        assert after - before < 50, f"peak memory grew by {after - before:.1f} MB"
        assert httpx.get(f"{url}/healthz").status_code == 200


def track_clip(url: str, name: str, clip: bytes) -> httpx.Response:
    fields = {"model": "track", "boxes": "[[1, 1, 20, 20]]"}
    return httpx.post(f"{url}/v1/videos", files={"video": (name, clip)}, data=fields, timeout=60)
