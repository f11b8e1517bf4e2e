"""Job uploads: repeated `images` files or `archive` zips -> checked images, before anything is stored.

Each limit is checked before the work it guards: an upload's size before it is read, a zip's
directory before anything is inflated, and each image's format and frame sizes (headers only)
before the job is accepted. The job runner later decodes through the same imaging module."""

from __future__ import annotations

from typing import Any

from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from tunnelvision.archives import ArchiveLimits, read_archive
from tunnelvision.config import Settings
from tunnelvision.errors import InvalidImage, InvalidInput, PayloadTooLarge, QuotaExceeded, TunnelvisionError
from tunnelvision.imaging import probe_image
from tunnelvision.jobs.store import Upload

UPLOAD_FIELDS = ("images", "archive")
# Images barely compress, so a zip that unpacks to more than a few times the largest body is a bomb;
# the bound also caps what one upload holds in memory before it is stored.
ARCHIVE_INFLATION = 4


async def read_job_uploads(
    items: list[tuple[str, Any]], settings: Settings, quota_left: int | None = None
) -> list[Upload]:
    """The uploads in the form's `images` and `archive` fields, every one checked. `quota_left`:
    bytes the jobs quota still has room for (the whole quota when not given)."""
    room = settings.jobs_quota_bytes if quota_left is None else quota_left
    uploads: list[Upload] = []
    for name, value in items:
        if name not in UPLOAD_FIELDS:
            continue
        if not isinstance(value, UploadFile):
            raise InvalidImage(f"'{name}' must be a file")
        limits = ArchiveLimits(
            max_members=settings.max_job_images - len(uploads),
            max_member_bytes=image_byte_limit(settings),
            max_total_bytes=room - sum(len(u.data) for u in uploads),
            max_unpacked_bytes=ARCHIVE_INFLATION * settings.max_body_bytes,
        )
        uploads += await (_read_archive(value, limits) if name == "archive" else _read_image(value, limits))
        if len(uploads) > settings.max_job_images:
            raise InvalidInput(f"more than {settings.max_job_images} images; a job takes at most that many")
    if not uploads:
        raise InvalidInput("no images: send files in repeated 'images' fields, or a zip in 'archive'")
    for index, upload in enumerate(uploads):
        await run_in_threadpool(check_image, upload, index, settings.max_image_pixels)
    return [Upload(u.file_name or f"image-{i:05d}", u.data) for i, u in enumerate(uploads)]


def image_byte_limit(settings: Settings) -> int:
    """One job image, as stored: no larger than an image /v1/segment would take."""
    return settings.max_body_bytes


async def _read_archive(upload: UploadFile, limits: ArchiveLimits) -> list[Upload]:
    # The spooled file itself, not a copy of it in memory: zipfile seeks to what it needs.
    members = await run_in_threadpool(read_archive, upload.file, limits)
    return [Upload(name, data) for name, data in members]


async def _read_image(upload: UploadFile, limits: ArchiveLimits) -> list[Upload]:
    """One `images` part, read through the per-image cap (its size is known before reading)."""
    name = upload.filename or ""
    _check_size(name, upload.size, limits)
    data = await upload.read(limits.max_member_bytes + 1)
    _check_size(name, len(data), limits)
    return [Upload(name, data)]


def _check_size(name: str, size: int | None, limits: ArchiveLimits) -> None:
    if size is None:
        return
    if size > limits.max_member_bytes:
        raise PayloadTooLarge(f"'{name}' is {size} bytes; an image may be {limits.max_member_bytes}")
    if size > limits.max_total_bytes:
        raise QuotaExceeded(
            f"jobs have {max(0, limits.max_total_bytes)} bytes of room left for images and '{name}' "
            f"brings {size}: wait for running jobs, or cancel some"
        )


def check_image(upload: Upload, index: int, max_pixels: int) -> None:
    """The checks a predict upload gets before decoding (format, every frame's pixels), from the
    headers alone: the runner decodes it later through the same path."""
    label = upload.file_name or f"image {index}"
    try:
        probe_image(upload.data, max_pixels)
    except InvalidImage as exc:
        raise InvalidImage(f"'{label}' is not an image: {exc.message}") from None
    except TunnelvisionError as exc:
        raise type(exc)(f"'{label}': {exc.message}") from None
