"""/v1/videos: a clip in, objects followed through it out, as a durable background job.

The upload is spooled to disk by the form parser and moved into the job's folder; its headers are
checked against every clip limit before the job exists (nothing is decoded here). Results are
committed a chunk at a time and can be read, streamed live (Server-Sent Events) or exported while
the job runs."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from tunnelvision.api.deps import DOCUMENTED_AUTH, OwnerDep, SettingsDep, StateDep
from tunnelvision.api.openapi import error_responses, video_request_body
from tunnelvision.api.parsing import MAX_FORM_FIELDS, form_fields, validate_params
from tunnelvision.api.state import video_limits
from tunnelvision.engine.video import serves_video
from tunnelvision.errors import InvalidInput, NotFound, QuotaExceeded, UnsupportedPrompt
from tunnelvision.video import export
from tunnelvision.video.decode import VideoLimits, probe
from tunnelvision.video.planning import (
    check_abilities,
    correction_passes,
    first_passes,
    tracked_frames,
    video_pipeline_for,
)
from tunnelvision.video.schemas import (
    VideoCorrection,
    VideoInfo,
    VideoList,
    VideoParams,
    VideoResult,
    VideoStatus,
)
from tunnelvision.video.store import CommittedFrame, VideoRow, VideoStore

router = APIRouter(prefix="/v1/videos", tags=["videos"], dependencies=DOCUMENTED_AUTH)
CLIP_SUFFIXES = (".mp4", ".mov", ".m4v", ".webm", ".mkv", ".avi", ".zip")
COPY_BLOCK = 1024 * 1024
EVENT_BATCH = 64  # committed frames read per store query while a stream catches up
NO_FRAMES = -1  # a stream of `status` events only
MAX_PENDING_PASSES = 16  # corrections queue passes over the clip; more must wait for these
VIDEO_ERRORS = error_responses(404)
READ_ERRORS = error_responses(404, 422)  # a bad `format` or Last-Event-ID


@router.post(
    "",
    status_code=202,
    response_model=VideoStatus,
    responses=error_responses(400, 413, 415, 422, 503, 507),
    summary="Upload a clip (`video`) with what to follow: a text `prompt`, or `boxes`/`points` on `frame`",
    openapi_extra=video_request_body(VideoParams),
)
async def create_video(
    request: Request, state: StateDep, settings: SettingsDep, owner: OwnerDep
) -> JSONResponse:
    engine = state.ready_engine()
    form = await request.form(max_files=1, max_fields=MAX_FORM_FIELDS)
    try:
        upload = form.get("video")
        if not isinstance(upload, UploadFile):
            raise InvalidInput("'video' must be a file field: send the clip as -F video=@clip.mp4")
        fields = form_fields([(k, v) for k, v in form.multi_items() if k != "video"])
        params = validate_params(VideoParams, fields)
        pipeline = video_pipeline_for(engine.info.pipelines, params.model)
        check_abilities(pipeline, bool(params.phrases), bool(params.boxes), bool(params.points))
        if not serves_video(engine.backends[0], pipeline.name):
            raise UnsupportedPrompt(
                "video jobs do not run in Ray mode yet: serve video pipelines without --ray"
            )
        room = await run_in_threadpool(
            state.jobs.room, owner, settings.jobs_quota_bytes, settings.jobs_owner_quota_bytes
        )
        clip = await run_in_threadpool(spool_clip, upload, state.videos.folder, room)
    finally:
        await form.close()
    try:
        info = await run_in_threadpool(probe, clip, video_limits(settings))
        frames = tracked_frames(params, info.frames)
        passes = first_passes(params, frames, params.phrases, (info.width, info.height))
        options = job_options(params, pipeline.name, len(passes))
        wire_info = {"width": info.width, "height": info.height, "frames": info.frames, "fps": info.fps}
        quotas = (settings.jobs_quota_bytes, settings.jobs_owner_quota_bytes)
        video_id = await run_in_threadpool(
            state.videos.create, owner, clip, clip_suffix(upload), options, wire_info, passes[0], quotas
        )
        if len(passes) > 1:
            await run_in_threadpool(state.videos.add_passes, video_id, passes[1:])
    finally:
        clip.unlink(missing_ok=True)  # moved into the job when it was created
    state.video_runner.wake.set()
    status = await _status(state.videos, await _video(state.videos, video_id, owner))
    return JSONResponse(status.model_dump(), status_code=202, headers={"Location": f"/v1/videos/{video_id}"})


def spool_clip(upload: UploadFile, folder: Path, room: int) -> Path:
    """The upload, copied to a file beside the jobs (same disk: the job takes it by a rename)."""
    size = upload.size
    if size is not None and size > room:
        raise QuotaExceeded(
            f"jobs have {room} bytes of room left and this clip has {size}: wait, or cancel some"
        )
    handle, name = tempfile.mkstemp(prefix=".upload-", dir=folder)
    with open(handle, "wb") as out:
        upload.file.seek(0)
        shutil.copyfileobj(upload.file, out, COPY_BLOCK)
    return Path(name)


def clip_suffix(upload: UploadFile) -> str:
    suffix = Path(upload.filename or "").suffix.lower()
    return suffix if suffix in CLIP_SUFFIXES else ".bin"


def job_options(params: VideoParams, pipeline: str, initial_passes: int) -> dict[str, Any]:
    track = {
        "pipeline": pipeline,
        "phrases": params.phrases,
        "keyframe_every": params.keyframe_every,
        "box_threshold": params.box_threshold,
        "text_threshold": params.text_threshold,
        "max_objects": params.max_objects,
    }
    frames = {"start": params.start, "end": params.end, "stride": params.stride}
    return {"track": track, "frames": frames, "initial_passes": initial_passes}


@router.get(
    "", response_model=VideoList, responses=error_responses(422), summary="Your video jobs, newest first"
)
async def list_videos(
    state: StateDep, owner: OwnerDep, limit: int = Query(20, ge=1, le=100, description="jobs listed")
) -> VideoList:
    rows = await run_in_threadpool(state.videos.owned, owner, limit)
    return VideoList(videos=[await _status(state.videos, row) for row in rows])


@router.get("/{video_id}", response_model=VideoStatus, responses=VIDEO_ERRORS, summary="A video job's status")
async def video_status(video_id: str, state: StateDep, owner: OwnerDep) -> VideoStatus:
    return await _status(state.videos, await _video(state.videos, video_id, owner))


@router.get(
    "/{video_id}/result",
    responses={
        **READ_ERRORS,
        200: {
            "model": VideoResult,
            "content": {
                "text/plain": {"schema": {"type": "string", "description": "MOT Challenge lines"}},
                "video/mp4": {"schema": {"type": "string", "format": "binary"}},
            },
            "description": "json: each tracked frame's objects, per-object summaries; mot: lines "
            "frame,id,left,top,width,height,score,-1,-1,-1 (from 1); mp4: the clip with masks drawn",
        },
    },
    summary="Results so far: json, MOT Challenge text or an annotated MP4",
)
async def video_result(
    video_id: str,
    state: StateDep,
    owner: OwnerDep,
    format: str = Query("json", pattern="^(json|mot|mp4)$", description="json, mot or mp4"),
) -> Response:
    video = await _video(state.videos, video_id, owner)
    frames = await run_in_threadpool(state.videos.results, video.id)
    headers = {"X-Video-Status": video.status}
    if format == "mot":
        text = await run_in_threadpool(lambda: "".join(export.mot_lines(export_frames(frames))))
        return Response(text, media_type="text/plain; charset=utf-8", headers=headers)
    if format == "mp4":
        limits = video_limits(state.settings)
        path = await run_in_threadpool(overlay_file, state.videos, video, frames, limits)
        return FileResponse(path, media_type="video/mp4", headers=headers, filename=f"{video.id}.mp4")
    body = await run_in_threadpool(result_json, video, frames)
    return Response(body, media_type="application/json", headers=headers)


def result_json(video: VideoRow, frames: list[CommittedFrame]) -> bytes:
    summaries = [
        {
            "id": s.object_id,
            "label": s.label or "object",
            "first_frame": s.first_frame,
            "last_frame": s.last_frame,
            "frames": s.frames,
            "mean_score": round(s.mean_score or 0.0, 4),
        }
        for s in export.summarize(export_frames(frames))
    ]
    result = {
        "id": video.id,
        "status": video.status,
        "video": video.info,
        "frames": [{"frame": f.frame, "objects": f.objects} for f in frames],
        "objects": summaries,
    }
    return json.dumps(result, separators=(",", ":")).encode()


def export_frames(frames: list[CommittedFrame]) -> list[export.FrameResult]:
    """Committed frames (frame order) as the exporters take them."""
    return [export.FrameResult(f.frame, [export.TrackedObject.of(o) for o in f.objects]) for f in frames]


def overlay_file(
    store: VideoStore, video: VideoRow, frames: list[CommittedFrame], limits: VideoLimits
) -> Path:
    """The annotated clip for the results as committed now; made once per revision."""
    revision = max((f.revision for f in frames), default=0)
    path = store.folder / video.id / f"overlay-{revision}.mp4"
    if not path.is_file():
        for old in path.parent.glob("overlay-*.mp4"):
            old.unlink(missing_ok=True)
        staging = path.with_name(f".{path.name}")
        export.write_overlay(video.file, export_frames(frames), staging, limits, fps=video.info["fps"])
        staging.rename(path)
    return path


@router.get(
    "/{video_id}/events",
    responses={
        **VIDEO_ERRORS,
        200: {"content": {"text/event-stream": {}}, "description": "Server-Sent Events"},
    },
    summary="Live results: one `frame` event per committed frame, then `status` when the job ends",
)
async def video_events(
    video_id: str,
    request: Request,
    state: StateDep,
    settings: SettingsDep,
    owner: OwnerDep,
    last_event_id: str | None = Header(None, description="resume after this event id (set by EventSource)"),
    frames: bool = Query(True, description="false: `status` events only (progress, without the masks)"),
) -> StreamingResponse:
    video = await _video(state.videos, video_id, owner)
    after = parse_event_id(last_event_id) if frames else NO_FRAMES
    stream = event_stream(state, video.id, after, settings.video_keepalive_s, request)
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(stream, media_type="text/event-stream", headers=headers)


def parse_event_id(value: str | None) -> int:
    if value is None or not value.strip():
        return 0
    if not value.strip().isdigit():
        raise InvalidInput("Last-Event-ID must be an event id this stream sent (a number)")
    return int(value)


async def event_stream(
    state: Any, video_id: str, after: int, keepalive_s: float, request: Request
) -> AsyncIterator[str]:
    """Committed frames in commit order (a correction's frames come again, replaced), a status
    event whenever the job's state changes, and comment lines while nothing happens (so proxies
    keep the connection). Ends after the job has ended and every frame was sent."""
    store: VideoStore = state.videos
    yield "retry: 2000\n\n"
    last_status = None
    while not await request.is_disconnected():
        frames = (
            [] if after == NO_FRAMES else await run_in_threadpool(store.frames, video_id, after, EVENT_BATCH)
        )
        for frame in frames:
            after = frame.revision
            data = json.dumps({"frame": frame.frame, "objects": frame.objects}, separators=(",", ":"))
            yield f"id: {frame.revision}\nevent: frame\ndata: {data}\n\n"
        video = await run_in_threadpool(store.get, video_id)
        if video is None:
            yield "event: deleted\ndata: {}\n\n"
            return
        status = await _status(store, video)
        if status.model_dump() != last_status:
            last_status = status.model_dump()
            yield f"event: status\ndata: {status.model_dump_json()}\n\n"
        if frames:
            continue
        if video.status not in ("queued", "running"):
            return
        if not await state.video_events.wait(video_id, keepalive_s):
            yield ": keep-alive\n\n"


@router.post(
    "/{video_id}/prompts",
    status_code=202,
    response_model=VideoStatus,
    responses=error_responses(400, 404, 422),  # 400: a body that is not JSON
    summary="Correct: add or fix one object on a frame; frames from there are tracked again",
)
async def correct_video(
    video_id: str, correction: VideoCorrection, state: StateDep, owner: OwnerDep
) -> JSONResponse:
    video = await _video(state.videos, video_id, owner)
    engine = state.ready_engine()
    pipeline = video_pipeline_for(engine.info.pipelines, video.options["track"]["pipeline"])
    check_abilities(pipeline, False, correction.box is not None, bool(correction.points))
    await _check_room_for_corrections(state.videos, video.id)
    frames = range(*first_range(video))
    size = (video.info["width"], video.info["height"])
    passes = correction_passes(correction, frames, video.next_id, video.labels, size)
    if not await run_in_threadpool(state.videos.add_passes, video.id, passes):
        raise NotFound(f"no video '{video_id}'")
    state.video_runner.wake.set()
    status = await _status(state.videos, await _video(state.videos, video_id, owner))
    return JSONResponse(status.model_dump(), status_code=202)


async def _check_room_for_corrections(store: VideoStore, video_id: str) -> None:
    """Each correction queues passes over the clip: a bounded number may wait at once."""
    pending = [p for p in await run_in_threadpool(store.passes, video_id) if p.status == "pending"]
    if len(pending) >= MAX_PENDING_PASSES:
        raise InvalidInput(
            f"{len(pending)} passes of this video are still waiting; send more corrections once they have run"
        )


def first_range(video: VideoRow) -> tuple[int, int, int]:
    """The frames the job tracks, as stored when it was created."""
    frames = video.options["frames"]
    end = video.info["frames"] if frames["end"] is None else min(frames["end"], video.info["frames"])
    return frames["start"], end, frames["stride"]


@router.delete(
    "/{video_id}", status_code=204, responses=VIDEO_ERRORS, summary="Cancel and delete a video job"
)
async def delete_video(video_id: str, state: StateDep, owner: OwnerDep) -> Response:
    video = await _video(state.videos, video_id, owner)
    await run_in_threadpool(state.videos.cancel_and_delete, video.id)
    state.video_events.publish_status(video.id)
    state.video_runner.wake.set()  # its session is freed before another chunk runs
    return Response(status_code=204)


async def _video(store: VideoStore, video_id: str, owner: str) -> VideoRow:
    video = await run_in_threadpool(store.get, video_id)
    if video is None or video.owner != owner:  # another key's video does not exist, as far as you know
        raise NotFound(f"no video '{video_id}' (finished videos are deleted after the retention time)")
    return video


async def _status(store: VideoStore, video: VideoRow) -> VideoStatus:
    passes = await run_in_threadpool(store.passes, video.id)
    first = passes[: video.options["initial_passes"]]
    total = len(range(*first_range(video)))
    # Forward from the prompt's frame, then back from it: that frame is in both passes.
    done = min(total, sum(len(p.frames) - len(p.remaining) for p in first))
    pending = sum(1 for p in passes[len(first) :] if p.status == "pending")
    return VideoStatus(
        id=video.id,
        status=video.status,
        model=video.options["track"]["pipeline"],
        video=VideoInfo(**video.info),
        frames_total=max(total, 0),
        frames_done=max(done, 0),
        progress=round(done / total, 4) if total > 0 else 1.0,
        corrections_pending=pending,
        objects=video.next_id - 1,
        created=video.created,
        finished=video.finished,
        error=video.error,
    )
