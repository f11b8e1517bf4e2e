"""Video jobs in the jobs database (so both kinds share the disk quota), the clip beside it.

A video job is worked through in passes: the first over the requested frame range, then one per
correction direction (forward from frame k, or backward). A pass's `position` is the next frame to
track; each chunk's frames are committed with the new position in one transaction, so after a
crash the pass resumes at the first frame not committed. Every committed frame gets a new
`revision` (per video, increasing): the live stream's event ids, so a client that reconnects
with Last-Event-ID gets exactly what it missed.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnelvision.errors import StorageFull
from tunnelvision.jobs.store import ACTIVE, DISK_FULL, JobStore, check_quota

SELECT_VIDEOS = (
    "SELECT id, owner, status, created, finished, options, info, file, bytes, error, next_id, labels"
    " FROM videos"
)
INSERT_VIDEO = (
    "INSERT INTO videos (id, owner, status, created, options, info, file, bytes)"
    " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)"
)
DELETE_VIDEO = (
    "DELETE FROM video_frames WHERE video_id = ?",
    "DELETE FROM video_passes WHERE video_id = ?",
    "DELETE FROM videos WHERE id = ?",
)


@dataclass(frozen=True)
class VideoRow:
    id: str
    owner: str
    status: str
    created: float
    finished: float | None
    options: dict[str, Any]
    info: dict[str, Any]
    file: str
    bytes: int
    error: str | None
    next_id: int
    labels: dict[int, str]


@dataclass(frozen=True)
class PassRow:
    video_id: str
    seq: int
    start: int
    stop: int  # exclusive, in the pass's direction
    step: int  # the stride, negative going backward
    prompts: dict[str, Any]  # what the pass starts with (see video/runner.py)
    position: int  # the next frame to track
    status: str  # pending | done

    @property
    def frames(self) -> range:
        return range(self.start, self.stop, self.step)

    @property
    def remaining(self) -> range:
        return range(self.position, self.stop, self.step)


@dataclass(frozen=True)
class CommittedFrame:
    frame: int
    revision: int
    objects: list[dict[str, Any]]


class VideoStore:
    def __init__(self, jobs: JobStore) -> None:
        self.jobs = jobs
        self.folder = jobs.folder.parent / "videos"  # beside the jobs folder: DATA_DIR/videos/ID/
        self.folder.mkdir(parents=True, exist_ok=True)

    # -- writing -------------------------------------------------------------------------------

    def create(
        self,
        owner: str,
        clip: Path,
        suffix: str,
        options: dict[str, Any],
        info: dict[str, Any],
        first_pass: tuple[range, dict[str, Any]],
        quotas: tuple[int, int],
    ) -> str:
        """Move the uploaded clip in and store the job with its first pass, quotas checked in the
        insert's transaction. Any failure leaves nothing behind."""
        video_id = uuid.uuid4().hex
        folder = self.folder / video_id
        size = clip.stat().st_size
        try:
            folder.mkdir()
            target = folder / f"clip{suffix}"
            shutil.move(clip, target)
            with self.jobs.transaction() as db:
                check_quota(db, size, quotas[0], None)
                check_quota(db, size, quotas[1], owner)
                db.execute(
                    INSERT_VIDEO,
                    (video_id, owner, time.time(), json.dumps(options), json.dumps(info), str(target), size),
                )
                insert_pass(db, video_id, 0, *first_pass)
        except OSError as exc:
            shutil.rmtree(folder, ignore_errors=True)
            if exc.errno in DISK_FULL:
                raise StorageFull("the server's disk is full; the video was not kept") from exc
            raise
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return video_id

    def add_passes(self, video_id: str, passes: list[tuple[range, dict[str, Any]]]) -> bool:
        """A correction's passes, after those pending; the job runs again. False if it has gone."""
        with self.jobs.transaction() as db:
            if (
                db.execute(
                    "SELECT 1 FROM videos WHERE id = ? AND status != 'cancelled'", (video_id,)
                ).fetchone()
                is None
            ):
                return False
            (last,) = db.execute(
                "SELECT COALESCE(MAX(seq), -1) FROM video_passes WHERE video_id = ?", (video_id,)
            ).fetchone()
            for offset, (frames, prompts) in enumerate(passes):
                insert_pass(db, video_id, last + 1 + offset, frames, prompts)
            db.execute(
                "UPDATE videos SET status = 'queued', finished = NULL, error = NULL WHERE id = ?", (video_id,)
            )
        return True

    def commit(
        self,
        video_id: str,
        seq: int,
        frames: list[tuple[int, list[dict[str, Any]]]],
        position: int,
        next_id: int,
        labels: dict[int, str],
    ) -> list[CommittedFrame]:
        """One chunk's frames and the pass's new position, at once. The job is done when its last
        pass is. Nothing is written for a job cancelled meanwhile."""
        with self.jobs.transaction() as db:
            row = db.execute("SELECT status, revision FROM videos WHERE id = ?", (video_id,)).fetchone()
            if row is None or row[0] not in ACTIVE:
                return []
            revision = row[1]
            committed = []
            for offset, (frame, objects) in enumerate(frames, start=1):
                db.execute(
                    "INSERT OR REPLACE INTO video_frames (video_id, frame, revision, objects)"
                    " VALUES (?, ?, ?, ?)",
                    (video_id, frame, revision + offset, json.dumps(objects)),
                )
                committed.append(CommittedFrame(frame, revision + offset, objects))
            pass_row = db.execute(
                "SELECT stop, step FROM video_passes WHERE video_id = ? AND seq = ?", (video_id, seq)
            ).fetchone()
            finished = not range(position, pass_row[0], pass_row[1])
            db.execute(
                "UPDATE video_passes SET position = ?, status = ? WHERE video_id = ? AND seq = ?",
                (position, "done" if finished else "pending", video_id, seq),
            )
            db.execute(
                "UPDATE videos SET status = 'running', revision = ?, next_id = ?, labels = ? WHERE id = ?",
                (revision + len(frames), next_id, json.dumps(labels), video_id),
            )
            pending = db.execute(
                "SELECT 1 FROM video_passes WHERE video_id = ? AND status = 'pending'", (video_id,)
            ).fetchone()
            if pending is None:
                db.execute(
                    "UPDATE videos SET status = 'done', finished = ? WHERE id = ?", (time.time(), video_id)
                )
        return committed

    def fail(self, video_id: str, error: str) -> None:
        """Stop the job with a reason; what was committed stays readable."""
        with self.jobs.transaction() as db:
            db.execute(
                "UPDATE videos SET status = 'failed', error = ?, finished = ?"
                " WHERE id = ? AND status IN ('queued', 'running')",
                (error, time.time(), video_id),
            )
            db.execute("UPDATE video_passes SET status = 'done' WHERE video_id = ?", (video_id,))

    def cancel_and_delete(self, video_id: str) -> None:
        """Gone at once for its owner; the runner, seeing no row, frees its session."""
        with self.jobs.transaction() as db:
            for statement in DELETE_VIDEO:
                db.execute(statement, (video_id,))
        shutil.rmtree(self.folder / video_id, ignore_errors=True)

    def expire(self, finished_before: float) -> list[str]:
        with self.jobs.reading() as db:
            ids = [
                row[0]
                for row in db.execute(
                    "SELECT id FROM videos WHERE status NOT IN ('queued', 'running')"
                    " AND COALESCE(finished, created) < ?",
                    (finished_before,),
                )
            ]
        for video_id in ids:
            self.cancel_and_delete(video_id)
        return ids

    # -- reading -------------------------------------------------------------------------------

    def get(self, video_id: str) -> VideoRow | None:
        with self.jobs.reading() as db:
            row = db.execute(f"{SELECT_VIDEOS} WHERE id = ?", (video_id,)).fetchone()
        return None if row is None else _video_row(row)

    def passes(self, video_id: str) -> list[PassRow]:
        with self.jobs.reading() as db:
            rows = db.execute(
                "SELECT video_id, seq, start, stop, step, prompts, position, status FROM video_passes"
                " WHERE video_id = ? ORDER BY seq",
                (video_id,),
            ).fetchall()
        return [PassRow(r[0], r[1], r[2], r[3], r[4], json.loads(r[5]), r[6], r[7]) for r in rows]

    def next_active(self, after: str | None) -> tuple[VideoRow, PassRow] | None:
        """An active video's first pending pass, taking the videos in turns (oldest first,
        starting after `after`)."""
        with self.jobs.reading() as db:
            row = db.execute(
                f"{SELECT_VIDEOS} WHERE status IN ('queued', 'running') ORDER BY"  # noqa: S608 (constants)
                " (created, id) <= (SELECT created, id FROM videos WHERE id = ?), created, id LIMIT 1",
                (after or "",),
            ).fetchone()
        if row is None:
            return None
        video = _video_row(row)
        pending = [p for p in self.passes(video.id) if p.status == "pending"]
        return (video, pending[0]) if pending else None

    def frames(
        self, video_id: str, after_revision: int = 0, limit: int | None = None
    ) -> list[CommittedFrame]:
        """Committed frames with a revision above `after_revision`, oldest revision first."""
        with self.jobs.reading() as db:
            rows = db.execute(
                "SELECT frame, revision, objects FROM video_frames WHERE video_id = ? AND revision > ?"
                " ORDER BY revision LIMIT ?",
                (video_id, after_revision, -1 if limit is None else limit),
            ).fetchall()
        return [CommittedFrame(f, r, json.loads(o)) for f, r, o in rows]

    def results(self, video_id: str) -> list[CommittedFrame]:
        """Every committed frame, in frame order."""
        with self.jobs.reading() as db:
            rows = db.execute(
                "SELECT frame, revision, objects FROM video_frames WHERE video_id = ? ORDER BY frame",
                (video_id,),
            ).fetchall()
        return [CommittedFrame(f, r, json.loads(o)) for f, r, o in rows]

    def frame(self, video_id: str, frame: int) -> CommittedFrame | None:
        with self.jobs.reading() as db:
            row = db.execute(
                "SELECT frame, revision, objects FROM video_frames WHERE video_id = ? AND frame = ?",
                (video_id, frame),
            ).fetchone()
        return None if row is None else CommittedFrame(row[0], row[1], json.loads(row[2]))

    def owned(self, owner: str, limit: int) -> list[VideoRow]:
        with self.jobs.reading() as db:
            rows = db.execute(
                f"{SELECT_VIDEOS} WHERE owner = ? ORDER BY created DESC, id DESC LIMIT ?",
                (owner, limit),
            ).fetchall()
        return [_video_row(r) for r in rows]


def insert_pass(db: Any, video_id: str, seq: int, frames: range, prompts: dict[str, Any]) -> None:
    db.execute(
        "INSERT INTO video_passes (video_id, seq, start, stop, step, prompts, position, status)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, 'pending')",
        (video_id, seq, frames.start, frames.stop, frames.step, json.dumps(prompts), frames.start),
    )


def _video_row(row: tuple[Any, ...]) -> VideoRow:
    labels = {int(k): v for k, v in json.loads(row[11]).items()}
    return VideoRow(
        row[0],
        row[1],
        row[2],
        row[3],
        row[4],
        json.loads(row[5]),
        json.loads(row[6]),
        row[7],
        row[8],
        row[9],
        row[10],
        labels,
    )
