"""Job uploads: repeated `images` files or one `archive` zip -> checked images, before anything is stored."""

from __future__ import annotations

import io
import zipfile
from pathlib import PurePosixPath
from typing import Any

from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from tunnelvision.config import Settings
from tunnelvision.errors import InvalidImage, InvalidInput
from tunnelvision.jobs.store import Upload

UPLOAD_FIELDS = ("images", "archive")


async def read_job_uploads(items: list[tuple[str, Any]], settings: Settings) -> list[Upload]:
    uploads: list[Upload] = []
    for name, value in items:
        if name not in UPLOAD_FIELDS:
            continue
        if not isinstance(value, UploadFile):
            raise InvalidImage(f"'{name}' must be a file")
        data = await value.read()
        found = (
            await run_in_threadpool(_unzip, data)
            if name == "archive"
            else [Upload(value.filename or "", data)]
        )
        uploads += found
    if not uploads:
        raise InvalidInput("no images: send files in repeated 'images' fields, or a zip in 'archive'")
    if len(uploads) > settings.max_job_images:
        raise InvalidInput(f"{len(uploads)} images; a job takes at most {settings.max_job_images}")
    for index, upload in enumerate(uploads):
        await run_in_threadpool(_check_image, upload, index)
    return [Upload(u.file_name or f"image-{i:05d}", u.data) for i, u in enumerate(uploads)]


def _unzip(data: bytes) -> list[Upload]:
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
    except zipfile.BadZipFile:
        raise InvalidInput("'archive' is not a zip file") from None
    members = [m for m in archive.infolist() if not m.is_dir() and not m.filename.startswith("__MACOSX/")]
    return [Upload(PurePosixPath(m.filename).as_posix(), archive.read(m)) for m in members]


def _check_image(upload: Upload, index: int) -> None:
    try:
        with Image.open(io.BytesIO(upload.data)) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise InvalidImage(f"'{upload.file_name or index}' is not an image") from None
