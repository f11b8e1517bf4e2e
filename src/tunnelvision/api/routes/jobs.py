"""/v1/jobs: many images in, one COCO file out; stored on disk, resumed after restarts."""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import PurePosixPath
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from PIL import Image, UnidentifiedImageError
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from tunnelvision.api.deps import DOCUMENTED_AUTH, SettingsDep, StateDep
from tunnelvision.api.openapi import ERROR_RESPONSES
from tunnelvision.api.parsing import form_fields, validate_params
from tunnelvision.coco import Coco
from tunnelvision.config import Settings
from tunnelvision.errors import InvalidImage, InvalidInput, NotFound
from tunnelvision.jobs.store import JobRow, Upload
from tunnelvision.schemas import JobStatus, SegmentParams, SegmentResponse

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=DOCUMENTED_AUTH)
JOB_OPTIONS = ("prompt", "box_threshold", "text_threshold", "nms_iou", "max_detections", "multimask")


@router.post(
    "",
    status_code=202,
    response_model=JobStatus,
    responses=ERROR_RESPONSES,
    summary="Submit images (repeated `images` files, or an `archive` zip) with segment options",
)
async def create_job(request: Request, state: StateDep, settings: SettingsDep) -> JSONResponse:
    form = await request.form(max_files=settings.max_job_images + 1, max_fields=64)
    try:
        uploads = await _uploads(form.multi_items(), settings)
        fields = form_fields([(k, v) for k, v in form.multi_items() if k not in ("images", "archive")])
    finally:
        await form.close()
    params = validate_params(SegmentParams, fields)
    if not params.phrases:
        raise InvalidInput("a job needs a text prompt: its phrases become the COCO categories")
    options = params.model_dump(include=set(JOB_OPTIONS))
    owner = _owner(request)
    job_id = await run_in_threadpool(
        state.jobs.create, owner, uploads, options, params.phrases, settings.jobs_quota_bytes
    )
    state.job_runner.wake.set()
    job = await _job(state, job_id, owner)
    return JSONResponse(
        _status(job).model_dump(), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"}
    )


@router.get("/{job_id}", response_model=JobStatus, responses=ERROR_RESPONSES, summary="A job's status")
async def job_status(job_id: str, request: Request, state: StateDep) -> JobStatus:
    return _status(await _job(state, job_id, _owner(request)))


@router.get(
    "/{job_id}/result",
    responses=ERROR_RESPONSES,
    summary="COCO instances of the images finished so far (RLE segmentations)",
)
async def job_result(job_id: str, request: Request, state: StateDep) -> JSONResponse:
    job = await _job(state, job_id, _owner(request))
    coco = Coco(job.labels)
    for file_name, result in await run_in_threadpool(state.jobs.results, job_id):
        coco.add(
            file_name,
            SegmentResponse.model_validate(
                {**json.loads(result), "image_id": "", "mask_format": "rle", "timings_ms": {}}
            ),
        )
    return JSONResponse(coco.data, headers={"X-Job-Status": job.status})


@router.delete("/{job_id}", response_model=JobStatus, responses=ERROR_RESPONSES, summary="Cancel a job")
async def cancel_job(job_id: str, request: Request, state: StateDep) -> JobStatus:
    await _job(state, job_id, _owner(request))
    await run_in_threadpool(state.jobs.cancel, job_id)
    await run_in_threadpool(state.jobs.delete_files, job_id)
    return _status(await _job(state, job_id, _owner(request)))


def _owner(request: Request) -> str:
    return str(request.scope.get("state", {}).get("principal") or "anonymous")


async def _job(state: Any, job_id: str, owner: str) -> JobRow:
    """The job, read off the event loop (SQLite is file I/O)."""
    job: JobRow | None = await run_in_threadpool(state.jobs.get, job_id)
    if job is None or job.owner != owner:  # another key's job does not exist, as far as you know
        raise NotFound(f"no job '{job_id}'")
    return job


def _status(job: JobRow) -> JobStatus:
    progress = (job.done + job.failed) / job.total if job.total else 1.0
    return JobStatus(
        id=job.id,
        status=job.status,
        total=job.total,
        done=job.done,
        failed=job.failed,
        progress=round(progress, 4),
        created=job.created,
    )


async def _uploads(items: list[tuple[str, Any]], settings: Settings) -> list[Upload]:
    uploads: list[Upload] = []
    for name, value in items:
        if name not in ("images", "archive"):
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
