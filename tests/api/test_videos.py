"""/v1/videos end to end over real HTTP: tiny random SAM 2.1 video, SAM 3 tracker, SAM 3 video
and GroundingDINO + SAM 2.1 video checkpoints (as `tunnelvision models random --family` writes
them) on clips the test makes with PyAV: frame counts, ids on every frame, ranges and strides,
exports that parse, the live stream, corrections, deletion, and bad input."""

from __future__ import annotations

import csv
import io
import json
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import av
import httpx
import pytest

from support import cli_server, image_bytes, wait_for
from tunnelvision.models.random_families import write_random_family
from tunnelvision.security.keys import KeyStore
from tunnelvision.video.synthetic import truncate_copy, write_moving_square_clip

FRAMES, WIDTH, HEIGHT = 24, 96, 64
BOX = [8, 8, 40, 40]


@pytest.fixture(scope="session")
def video_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("video-models")
    families = ("sam2-video", "sam3-tracker-video", "sam3-video", "grounding-dino")
    return {family: write_random_family(out / family, family, "tiny", seed=1) for family in families}


@pytest.fixture(scope="session")
def clips(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("clips")
    clip = write_moving_square_clip(out / "square.mp4", FRAMES, WIDTH, HEIGHT, fps=12)
    return {
        "mp4": clip,
        "webm": write_moving_square_clip(out / "square.webm", 10, WIDTH, HEIGHT, fps=12, fmt="webm"),
        "truncated": truncate_copy(clip, out / "truncated.mp4", 0.5),
        "big": write_moving_square_clip(out / "big.mp4", 2, 256, 128, fps=12),
    }


def pipeline_flags(models: dict[str, Path]) -> list[str]:
    specs = {
        "track": models["sam2-video"],
        "tracker3": models["sam3-tracker-video"],
        "text": models["sam3-video"],
        "gsam2": f"{models['grounding-dino']}+{models['sam2-video']}",
    }
    return [flag for name, spec in specs.items() for flag in ("--pipeline", f"{name}={spec}")]


@pytest.fixture(scope="module")
def url(tiny_models: tuple[Path, Path], video_models: dict[str, Path]) -> Iterator[str]:
    flags = [*pipeline_flags(video_models), "--video-chunk-frames", "4", "--video-max-frames", "100"]
    flags += ["--video-max-width", "200", "--video-max-height", "200", "--video-keepalive-s", "1"]
    with cli_server(*tiny_models, *flags) as (server_url, _):
        yield server_url


def upload(url: str, clip: Path, **fields: Any) -> httpx.Response:
    data = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in fields.items()}
    with clip.open("rb") as file:
        return httpx.post(f"{url}/v1/videos", files={"video": (clip.name, file)}, data=data, timeout=60)


def finished(url: str, video_id: str, timeout_s: float = 120) -> dict[str, Any]:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        status: dict[str, Any] = httpx.get(f"{url}/v1/videos/{video_id}").json()
        if status["status"] in ("done", "failed") and not status["corrections_pending"]:
            return status
        time.sleep(0.1)
    raise AssertionError(f"video {video_id} not finished in {timeout_s} s")


def track(url: str, clip: Path, **fields: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """Upload, wait, and read the JSON result."""
    created = upload(url, clip, **fields)
    assert created.status_code == 202, created.text
    status = finished(url, created.json()["id"])
    result = httpx.get(f"{url}/v1/videos/{status['id']}/result").json()
    return status, result


def ids_by_frame(result: dict[str, Any]) -> dict[int, list[int]]:
    return {f["frame"]: sorted(o["id"] for o in f["objects"]) for f in result["frames"]}


def test_models_show_video_abilities(url: str) -> None:
    pipelines = {p["name"]: p for p in httpx.get(f"{url}/v1/models").json()["pipelines"]}
    assert pipelines["track"]["abilities"] == ["video-boxes", "video-points"]
    assert pipelines["tracker3"]["abilities"] == ["video-boxes", "video-points"]
    assert pipelines["text"]["abilities"] == ["video-text"]
    assert pipelines["gsam2"]["abilities"] == ["video-boxes", "video-points", "video-text"]
    assert pipelines["track"]["models"][0]["role"] == "video_tracker"


@pytest.mark.parametrize("model", ["track", "tracker3"])
def test_a_boxed_object_is_followed_on_every_frame(url: str, clips: dict[str, Path], model: str) -> None:
    status, result = track(url, clips["mp4"], model=model, boxes=[BOX])
    assert (status["status"], status["frames_done"], status["frames_total"]) == ("done", FRAMES, FRAMES)
    assert result["video"] == {"width": WIDTH, "height": HEIGHT, "frames": FRAMES, "fps": 12.0}
    assert ids_by_frame(result) == {frame: [1] for frame in range(FRAMES)}
    first = result["frames"][0]["objects"][0]
    assert first["mask"]["size"] == [HEIGHT, WIDTH] and len(first["box"]) == 4
    assert result["objects"] == [
        {
            "id": 1,
            "label": "object",
            "first_frame": 0,
            "last_frame": FRAMES - 1,
            "frames": FRAMES,
            "mean_score": pytest.approx(result["objects"][0]["mean_score"]),
        }
    ]


def test_range_and_stride_track_only_those_frames(url: str, clips: dict[str, Path]) -> None:
    status, result = track(url, clips["mp4"], model="track", points=[[20, 20, 1]], start=3, end=20, stride=4)
    assert [f["frame"] for f in result["frames"]] == [3, 7, 11, 15, 19]
    assert status["frames_total"] == status["frames_done"] == 5


def test_a_prompt_on_a_later_frame_is_followed_both_ways(url: str, clips: dict[str, Path]) -> None:
    status, result = track(url, clips["mp4"], model="track", boxes=[BOX, [50, 20, 90, 60]], frame=10)
    assert ids_by_frame(result) == {frame: [1, 2] for frame in range(FRAMES)}
    assert status["frames_done"] == status["frames_total"] == FRAMES


def test_text_trackers_find_and_label_what_the_prompt_names(url: str, clips: dict[str, Path]) -> None:
    status, result = track(url, clips["mp4"], model="text", prompt="square")
    assert status["status"] == "done" and len(result["frames"]) == FRAMES
    labels = {o["label"] for f in result["frames"] for o in f["objects"]}
    assert labels == {"square"}  # random weights find something; all of it is labelled by the prompt


def test_detector_plus_tracker_adds_objects_on_keyframes_only(url: str, clips: dict[str, Path]) -> None:
    fields = {
        "prompt": "square",
        "box_threshold": 0,
        "text_threshold": 0,
        "max_objects": 3,
        "keyframe_every": 5,
    }
    status, result = track(url, clips["mp4"], model="gsam2", **fields)
    assert status["status"] == "done"
    objects = result["objects"]
    assert 1 <= len(objects) <= 3 and {o["label"] for o in objects} == {"square"}
    assert all(o["first_frame"] % 5 == 0 for o in objects)  # new objects appear on keyframes


def test_exports_parse_mot_and_mp4(url: str, clips: dict[str, Path], tmp_path: Path) -> None:
    status, _ = track(url, clips["mp4"], model="track", boxes=[BOX, [50, 20, 90, 60]])
    mot = httpx.get(f"{url}/v1/videos/{status['id']}/result", params={"format": "mot"})
    assert mot.status_code == 200 and mot.headers["content-type"].startswith("text/plain")
    rows = list(csv.reader(io.StringIO(mot.text)))
    assert len(rows) == 2 * FRAMES and all(len(row) == 10 for row in rows)
    assert {int(row[0]) for row in rows} == set(range(1, FRAMES + 1))  # MOT frames count from 1
    assert {int(row[1]) for row in rows} == {1, 2}
    video = httpx.get(f"{url}/v1/videos/{status['id']}/result", params={"format": "mp4"}, timeout=60)
    assert video.status_code == 200 and video.headers["content-type"] == "video/mp4"
    path = tmp_path / "overlay.mp4"
    path.write_bytes(video.content)
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    assert len(frames) == FRAMES and (frames[0].width, frames[0].height) == (WIDTH, HEIGHT)
    bad = httpx.get(f"{url}/v1/videos/{status['id']}/result", params={"format": "gif"})
    assert bad.status_code == 422


def read_events(
    url: str, video_id: str, last_event_id: str | None = None, query: str = ""
) -> list[dict[str, Any]]:
    """Every event of the stream until it ends (the job has ended and all was sent)."""
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    stream_url = f"{url}/v1/videos/{video_id}/events{query}"
    with httpx.stream("GET", stream_url, headers=headers, timeout=120) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if not line:
                if "event" in current:
                    events.append(current)
                current = {}
            elif not line.startswith(":") and ":" in line:
                field, _, value = line.partition(":")
                current[field] = value.strip()
    return events


def test_the_live_stream_sends_every_frame_in_order_then_the_end(url: str, clips: dict[str, Path]) -> None:
    created = upload(url, clips["mp4"], model="track", boxes=[BOX]).json()
    events = read_events(url, created["id"])
    frames = [e for e in events if e["event"] == "frame"]
    assert [json.loads(e["data"])["frame"] for e in frames] == list(range(FRAMES))
    ids = [int(e["id"]) for e in frames]
    assert ids == sorted(ids) and len(set(ids)) == FRAMES
    assert events[-1]["event"] == "status" and json.loads(events[-1]["data"])["status"] == "done"
    again = read_events(url, created["id"], last_event_id=str(ids[9]))  # a reconnect resumes
    assert [json.loads(e["data"])["frame"] for e in again if e["event"] == "frame"] == list(range(10, FRAMES))
    assert (
        httpx.get(f"{url}/v1/videos/{created['id']}/events", headers={"Last-Event-ID": "x"}).status_code
        == 422
    )


def test_a_status_only_stream_reports_progress_without_masks(url: str, clips: dict[str, Path]) -> None:
    created = upload(url, clips["mp4"], model="track", boxes=[BOX]).json()
    events = read_events(url, created["id"], query="?frames=false")
    assert events and {e["event"] for e in events} == {"status"}
    progress = [json.loads(e["data"])["frames_done"] for e in events]
    assert progress == sorted(progress) and progress[-1] == FRAMES


def test_a_correction_replaces_only_the_frames_from_k(url: str, clips: dict[str, Path]) -> None:
    status, before = track(url, clips["mp4"], model="track", boxes=[BOX])
    correction = {"frame": 12, "box": [50, 20, 90, 60], "label": "crate"}
    answer = httpx.post(f"{url}/v1/videos/{status['id']}/prompts", json=correction)
    assert answer.status_code == 202, answer.text
    finished(url, status["id"])
    after = httpx.get(f"{url}/v1/videos/{status['id']}/result").json()
    assert after["frames"][:12] == before["frames"][:12]  # untouched, masks and all
    assert ids_by_frame(after) == {f: [1] if f < 12 else [1, 2] for f in range(FRAMES)}
    crate = next(o for o in after["objects"] if o["id"] == 2)
    assert (crate["label"], crate["first_frame"]) == ("crate", 12)
    back = {"frame": 6, "object_id": 2, "box": [50, 20, 90, 60], "direction": "backward"}
    assert httpx.post(f"{url}/v1/videos/{status['id']}/prompts", json=back).status_code == 202
    finished(url, status["id"])
    last = httpx.get(f"{url}/v1/videos/{status['id']}/result").json()
    assert last["frames"][7:] == after["frames"][7:]  # a backward pass from 6 keeps the frames after it
    assert all(2 in ids for f, ids in ids_by_frame(last).items() if f <= 6)


@pytest.mark.parametrize(
    ("correction", "message"),
    [
        ({"frame": 99, "box": BOX}, "does not track"),
        ({"frame": 2, "object_id": 9, "box": BOX}, "no object 9"),
        ({"frame": 2}, "'box' or as 'points'"),
        ({"frame": 2, "box": [10, 10, 5, 5]}, "box"),
        ({"frame": 2, "box": [10, 10, 500, 50]}, "outside the clip's 96x64 frames"),
    ],
)
def test_bad_corrections_are_422s_naming_the_problem(
    url: str, clips: dict[str, Path], correction: dict[str, Any], message: str
) -> None:
    status, _ = track(url, clips["webm"], model="track", boxes=[BOX])
    answer = httpx.post(f"{url}/v1/videos/{status['id']}/prompts", json=correction)
    assert answer.status_code == 422 and message in answer.json()["error"]["message"]


def test_corrections_wait_in_a_bounded_line(url: str, clips: dict[str, Path]) -> None:
    created = upload(url, clips["mp4"], model="track", boxes=[BOX]).json()
    both = {"frame": 4, "box": BOX, "direction": "both"}  # two passes each
    answers = [httpx.post(f"{url}/v1/videos/{created['id']}/prompts", json=both) for _ in range(12)]
    refused = [a for a in answers if a.status_code == 422]
    assert refused and "still waiting" in refused[0].json()["error"]["message"]
    assert all(a.status_code in (202, 422) for a in answers)
    finished(url, created["id"])  # and the accepted ones all ran


def test_delete_cancels_and_forgets(url: str, clips: dict[str, Path]) -> None:
    created = upload(url, clips["mp4"], model="track", boxes=[BOX]).json()
    assert httpx.delete(f"{url}/v1/videos/{created['id']}").status_code == 204
    for path in ("", "/result", "/events"):
        assert httpx.get(f"{url}/v1/videos/{created['id']}{path}").status_code == 404
    assert httpx.delete(f"{url}/v1/videos/{created['id']}").status_code == 404
    listed = [v["id"] for v in httpx.get(f"{url}/v1/videos").json()["videos"]]
    assert created["id"] not in listed


def zip_of(tmp_path: Path, members: dict[str, bytes]) -> Path:
    path = tmp_path / "frames.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def test_a_zip_of_frames_is_a_clip(url: str, tmp_path: Path) -> None:
    frames = {f"frame_{i}.png": image_bytes(WIDTH, HEIGHT, seed=i) for i in range(6)}
    status, result = track(url, zip_of(tmp_path, frames), model="track", boxes=[BOX])
    assert status["status"] == "done" and [f["frame"] for f in result["frames"]] == list(range(6))


@pytest.mark.parametrize(
    ("make", "fields", "status", "code"),
    [
        (lambda c, t: c["mp4"], {"model": "track"}, 422, "invalid_input"),  # nothing to follow
        (lambda c, t: c["mp4"], {"model": "text", "boxes": [BOX]}, 422, "unsupported_prompt"),
        (lambda c, t: c["mp4"], {"model": "track", "prompt": "cat"}, 422, "unsupported_prompt"),
        (lambda c, t: c["mp4"], {"model": "grounded-sam", "prompt": "cat"}, 422, "unsupported_prompt"),
        (lambda c, t: c["mp4"], {"model": "nope", "prompt": "cat"}, 422, "unknown_model"),
        (lambda c, t: c["mp4"], {"model": "track", "boxes": [BOX], "frame": 30}, 422, "invalid_input"),
        (lambda c, t: c["mp4"], {"model": "track", "boxes": [BOX], "start": 40}, 422, "invalid_input"),
        (lambda c, t: c["mp4"], {"model": "track", "points": [[200, 10, 1]]}, 422, "invalid_input"),
        (
            lambda c, t: c["mp4"],
            {"model": "track", "boxes": [BOX], "frame": 3, "stride": 2},
            422,
            "invalid_input",
        ),
        (lambda c, t: c["truncated"], {"model": "track", "boxes": [BOX]}, 400, "invalid_video"),
        (lambda c, t: c["big"], {"model": "track", "boxes": [BOX]}, 413, "frame_too_large"),
        (lambda c, t: write_png(t), {"model": "track", "boxes": [BOX]}, 415, "unsupported_video_format"),
        (lambda c, t: write_bytes(t, b""), {"model": "track", "boxes": [BOX]}, 400, "invalid_video"),
        (
            lambda c, t: write_bytes(t, b"\x00" * 64),
            {"model": "track", "boxes": [BOX]},
            415,
            "unsupported_video_format",
        ),
        (
            lambda c, t: zip_of(t, {"notes.txt": b"hi"}),
            {"model": "track", "boxes": [BOX]},
            400,
            "invalid_video",
        ),
        (lambda c, t: zip_of(t, {}), {"model": "track", "boxes": [BOX]}, 400, "invalid_video"),
        (
            lambda c, t: write_moving_square_clip(t / "long.mp4", 120, 32, 32, fps=30),
            {"model": "track", "boxes": [BOX]},
            413,
            "video_too_large",
        ),
    ],
)
def test_bad_uploads_are_clear_4xx(
    url: str,
    clips: dict[str, Path],
    tmp_path: Path,
    make: Any,
    fields: dict[str, Any],
    status: int,
    code: str,
) -> None:
    answer = upload(url, make(clips, tmp_path), **fields)
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
    assert httpx.get(f"{url}/readyz").status_code == 200


def write_png(folder: Path) -> Path:
    return write_bytes(folder, image_bytes(WIDTH, HEIGHT), "photo.png")


def write_bytes(folder: Path, data: bytes, name: str = "clip.mp4") -> Path:
    path = folder / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("fields", [{"boxes": "[[1, 1, 20, 20]]"}, {"prompt": "cat"}])
def test_image_requests_to_a_video_pipeline_are_refused(url: str, fields: dict[str, str]) -> None:
    files = {"image": ("photo.png", image_bytes(WIDTH, HEIGHT))}
    answer = httpx.post(f"{url}/v1/segment", files=files, data={"model": "track", **fields})
    assert answer.status_code == 422 and answer.json()["error"]["code"] == "unsupported_prompt"


def test_the_video_field_must_be_a_file(url: str) -> None:
    answer = httpx.post(
        f"{url}/v1/videos", data={"video": "clip.mp4", "model": "track", "boxes": "[[1,1,5,5]]"}
    )
    assert answer.status_code == 422 and "'video' must be a file" in answer.json()["error"]["message"]


def test_other_keys_videos_do_not_exist_and_expired_ones_are_gone(
    tiny_models: tuple[Path, Path], video_models: dict[str, Path], clips: dict[str, Path], tmp_path: Path
) -> None:
    keys = tmp_path / "keys.json"
    store = KeyStore(keys)
    alice, bob, carol = (store.add(name, scopes) for name, scopes in KEYS)
    flags = [
        *pipeline_flags(video_models)[:2],
        "--no-warmup",
        "--keys-file",
        str(keys),
        "--jobs-retention-s",
        "3",
    ]
    with cli_server(*tiny_models, *flags) as (url, _):
        with clips["webm"].open("rb") as file:
            denied = httpx.post(
                f"{url}/v1/videos", files={"video": file}, data=ONE_BOX, headers=bearer(alice)
            )
        assert denied.status_code == 403  # videos are jobs: a predict-only key may not
        with clips["webm"].open("rb") as file:
            created = httpx.post(f"{url}/v1/videos", files={"video": file}, data=ONE_BOX, headers=bearer(bob))
        assert created.status_code == 202, created.text
        video_id = created.json()["id"]
        assert httpx.get(f"{url}/v1/videos/{video_id}").status_code == 401
        for path in ("", "/result", "/events"):
            assert httpx.get(f"{url}/v1/videos/{video_id}{path}", headers=bearer(carol)).status_code == 404
        assert httpx.delete(f"{url}/v1/videos/{video_id}", headers=bearer(carol)).status_code == 404
        wait_for(
            lambda: httpx.get(f"{url}/v1/videos/{video_id}", headers=bearer(bob)).json()["status"] == "done"
        )
        # Finished more than the retention time ago: swept; a late correction is a 404 that says why.
        wait_for(lambda: httpx.get(f"{url}/v1/videos/{video_id}", headers=bearer(bob)).status_code == 404)
        late = httpx.post(
            f"{url}/v1/videos/{video_id}/prompts", json={"frame": 0, "box": BOX}, headers=bearer(bob)
        )
        assert late.status_code == 404 and "retention" in late.json()["error"]["message"]


KEYS = (("alice", ["predict"]), ("bob", ["jobs"]), ("carol", ["jobs"]))
ONE_BOX = {"boxes": "[[8, 8, 40, 40]]"}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_videos_and_image_jobs_share_one_quota(
    tiny_models: tuple[Path, Path], video_models: dict[str, Path], clips: dict[str, Path]
) -> None:
    """A clip is kept (for corrections and the overlay) until its job is deleted or expires, and
    counts against the jobs quota meanwhile: an image job that would not fit beside it is a 507."""
    clip_bytes = clips["mp4"].stat().st_size
    room = clip_bytes * 3 // 2  # one clip, not two
    flags = [*pipeline_flags(video_models)[:2], "--no-warmup", "--jobs-quota-bytes", str(room)]
    with cli_server(*tiny_models, *flags) as (url, _):
        created = upload(url, clips["mp4"], model="track", boxes=[BOX])
        assert created.status_code == 202, created.text
        photo = image_bytes(160, 120, seed=3)
        assert clip_bytes + len(photo) > room
        images = [("images", ("photo.png", photo, "image/png"))]
        job = httpx.post(f"{url}/v1/jobs", files=images, data={"prompt": "cat"}, timeout=60)
        assert job.status_code == 507 and job.json()["error"]["code"] == "quota_exceeded", job.text
        assert upload(url, clips["mp4"], model="track", boxes=[BOX]).status_code == 507
        assert httpx.delete(f"{url}/v1/videos/{created.json()['id']}").status_code == 204
        assert upload(url, clips["mp4"], model="track", boxes=[BOX]).status_code == 202  # room again
