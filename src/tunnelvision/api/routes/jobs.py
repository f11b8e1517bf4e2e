"""/v1/jobs: many images in, one COCO file out; stored on disk, resumed after restarts."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from tunnelvision.api.deps import DOCUMENTED_AUTH, OwnerDep, SettingsDep, StateDep
from tunnelvision.api.job_uploads import UPLOAD_FIELDS, read_job_uploads
from tunnelvision.api.openapi import JOB_CREATE_ERRORS, JOB_ERRORS, error_responses, job_request_body
from tunnelvision.api.parsing import form_fields, validate_params
from tunnelvision.coco import Coco
from tunnelvision.errors import InvalidInput, NotFound
from tunnelvision.jobs.store import ACTIVE, JobRow, JobStore
from tunnelvision.schemas import JobImageError, JobList, JobStatus, SegmentParams, SegmentResponse

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=DOCUMENTED_AUTH)
JOB_OPTIONS = ("prompt", "box_threshold", "text_threshold", "nms_iou", "max_detections", "multimask", "model")
LISTED_ERRORS = 100  # failed images named in a job's status


@router.post(
    "",
    status_code=202,
    response_model=JobStatus,
    responses=JOB_CREATE_ERRORS,
    summary="Submit images (repeated `images` files, or an `archive` zip) with segment options",
    openapi_extra=job_request_body(SegmentParams, JOB_OPTIONS),
)
async def create_job(
    request: Request, state: StateDep, settings: SettingsDep, owner: OwnerDep
) -> JSONResponse:
    room = await run_in_threadpool(
        state.jobs.room, owner, settings.jobs_quota_bytes, settings.jobs_owner_quota_bytes
    )
    form = await request.form(max_files=settings.max_job_images + 1, max_fields=64)
    try:
        uploads = await read_job_uploads(form.multi_items(), settings, room)
        fields = form_fields([(k, v) for k, v in form.multi_items() if k not in UPLOAD_FIELDS])
    finally:
        await form.close()
    params = validate_params(SegmentParams, fields)
    if not params.phrases:
        raise InvalidInput("a job needs a text prompt: its phrases become the COCO categories")
    state.check_request(params)  # an unknown model, or one that cannot segment text, fails now
    options = params.model_dump(include=set(JOB_OPTIONS))
    job_id = await run_in_threadpool(
        state.jobs.create,
        owner,
        uploads,
        options,
        params.phrases,
        settings.jobs_quota_bytes,
        settings.jobs_owner_quota_bytes,
    )
    state.job_runner.wake.set()
    status = await _status(state, await _job(state, job_id, owner))
    return JSONResponse(status.model_dump(), status_code=202, headers={"Location": f"/v1/jobs/{job_id}"})


@router.get(
    "",
    response_model=JobList,
    responses=error_responses(422),
    summary="Your jobs, newest first, a page at a time",
)
async def list_jobs(
    state: StateDep,
    owner: OwnerDep,
    limit: int = Query(20, ge=1, le=100, description="jobs in one page"),
    after: str | None = Query(None, max_length=128, description="`next` from the previous page"),
) -> JobList:
    rows = await run_in_threadpool(state.jobs.owned, owner, limit + 1, _page_position(after))
    page = rows[:limit]
    more = len(rows) > limit
    return JobList(
        jobs=[await _status(state, job, with_errors=False) for job in page],
        next=f"{page[-1].created!r}:{page[-1].id}" if more else None,
    )


def _page_position(after: str | None) -> tuple[float, str] | None:
    """`next` of a page is the last job's creation time and id: the page after starts below it."""
    if after is None:
        return None
    created, _, job_id = after.partition(":")
    try:
        return float(created), job_id
    except ValueError:
        raise InvalidInput("'after' must be the `next` value of a previous page") from None


@router.get("/{job_id}", response_model=JobStatus, responses=JOB_ERRORS, summary="A job's status")
async def job_status(job_id: str, state: StateDep, owner: OwnerDep) -> JobStatus:
    return await _status(state, await _job(state, job_id, owner))


@router.get(
    "/{job_id}/result",
    responses=JOB_ERRORS,
    summary="COCO instances of the images finished so far (RLE segmentations)",
)
async def job_result(job_id: str, state: StateDep, owner: OwnerDep) -> Response:
    job = await _job(state, job_id, owner)
    body = await run_in_threadpool(coco_json, state.jobs, job)  # megabytes of masks: off the loop
    return Response(body, media_type="application/json", headers={"X-Job-Status": job.status})


@router.delete(
    "/{job_id}",
    response_model=JobStatus,
    responses=JOB_ERRORS,
    summary="Cancel a queued or running job; delete a finished one with its results",
)
async def cancel_job(job_id: str, state: StateDep, owner: OwnerDep) -> JobStatus:
    job = await _job(state, job_id, owner)
    if job.status in ACTIVE:
        await run_in_threadpool(state.jobs.cancel, job_id)
        await run_in_threadpool(state.jobs.delete_files, job_id)
        return await _status(state, await _job(state, job_id, owner))
    status = await _status(state, job)  # its last status, for the answer
    await run_in_threadpool(state.jobs.delete, job_id)
    return status


def coco_json(store: JobStore, job: JobRow) -> bytes:
    """The job's finished images as one COCO file, serialised."""
    coco = Coco(job.labels)
    for file_name, result in store.results(job.id):
        coco.add(
            file_name,
            SegmentResponse.model_validate(
                {**json.loads(result), "image_id": "", "mask_format": "rle", "timings_ms": {}}
            ),
        )
    return json.dumps(coco.data, ensure_ascii=False, separators=(",", ":")).encode()


async def _job(state: Any, job_id: str, owner: str) -> JobRow:
    """The job, read off the event loop (SQLite is file I/O)."""
    job: JobRow | None = await run_in_threadpool(state.jobs.get, job_id)
    if job is None or job.owner != owner:  # another key's job does not exist, as far as you know
        raise NotFound(f"no job '{job_id}'")
    return job


async def _status(state: Any, job: JobRow, with_errors: bool = True) -> JobStatus:
    progress = (job.done + job.failed) / job.total if job.total else 1.0
    listed = job.failed and with_errors
    failures = await run_in_threadpool(state.jobs.failures, job.id, LISTED_ERRORS) if listed else []
    return JobStatus(
        id=job.id,
        status=job.status,
        total=job.total,
        done=job.done,
        failed=job.failed,
        progress=round(progress, 4),
        created=job.created,
        errors=[JobImageError(file_name=name, error=error) for name, error in failures],
    )
