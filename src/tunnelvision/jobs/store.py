"""Jobs and their images in SQLite (WAL) with the uploaded files beside it. Each image's result is
committed as soon as it is known, so a crash loses at most the images in flight."""

from __future__ import annotations

import contextlib
import errno
import json
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunnelvision.errors import QuotaExceeded, StorageFull

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL,
    options TEXT NOT NULL, labels TEXT NOT NULL, total INTEGER NOT NULL, bytes INTEGER NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, file_name TEXT NOT NULL, path TEXT NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, result TEXT, error TEXT,
    PRIMARY KEY (job_id, idx)
);
CREATE INDEX IF NOT EXISTS jobs_by_owner ON jobs (owner, created);
CREATE TABLE IF NOT EXISTS videos (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL,
    finished REAL, options TEXT NOT NULL, info TEXT NOT NULL, file TEXT NOT NULL,
    bytes INTEGER NOT NULL, error TEXT, next_id INTEGER NOT NULL DEFAULT 1,
    labels TEXT NOT NULL DEFAULT '{}', revision INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS video_passes (
    video_id TEXT NOT NULL, seq INTEGER NOT NULL, start INTEGER NOT NULL, stop INTEGER NOT NULL,
    step INTEGER NOT NULL, prompts TEXT NOT NULL, position INTEGER NOT NULL,
    status TEXT NOT NULL, PRIMARY KEY (video_id, seq)
);
CREATE TABLE IF NOT EXISTS video_frames (
    video_id TEXT NOT NULL, frame INTEGER NOT NULL, revision INTEGER NOT NULL, objects TEXT NOT NULL,
    PRIMARY KEY (video_id, frame)
);
CREATE INDEX IF NOT EXISTS videos_by_owner ON videos (owner, created);
"""
ACTIVE = ("queued", "running")
STAGING_PREFIX = ".staging-"  # a job's files while it is being created; never read from
STAGING_MAX_AGE_S = 3600.0  # older staging folders are leftovers of a crash mid-upload
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
FINISHED_JOB = "SELECT id FROM jobs WHERE status NOT IN ('queued', 'running') AND id = ?"
FINISHED_BEFORE = (
    "SELECT id FROM jobs WHERE status NOT IN ('queued', 'running') AND COALESCE(finished, created) < ?"
)


@dataclass(frozen=True)
class JobRow:
    id: str
    owner: str
    status: str
    created: float
    options: dict[str, Any]
    labels: list[str]
    total: int
    done: int
    failed: int


@dataclass(frozen=True)
class Upload:
    file_name: str
    data: bytes


@dataclass(frozen=True)
class PendingItem:
    """An image still to do; `attempts` started so far, `error` the last retryable failure."""

    job_id: str
    index: int
    path: str
    attempts: int
    error: str | None


class JobStore:
    def __init__(self, folder: Path) -> None:
        self.folder = folder.expanduser()
        self.folder.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(
            self.folder / "jobs.sqlite3", check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._add_missing_columns()

    def _add_missing_columns(self) -> None:
        """Databases written before `finished` existed: their finished jobs expire by `created`."""
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(jobs)")}
        if "finished" not in columns:
            self._db.execute("ALTER TABLE jobs ADD COLUMN finished REAL")

    @contextmanager
    def reading(self) -> Iterator[sqlite3.Connection]:
        """The database for reads (the video store shares it, and with it the quotas)."""
        with self._lock:
            yield self._db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # -- writing -------------------------------------------------------------------------------

    def create(
        self,
        owner: str,
        uploads: list[Upload],
        options: dict[str, Any],
        labels: list[str],
        quota_bytes: int,
        owner_quota_bytes: int | None = None,
    ) -> str:
        """Store the job and its images. The files are written into a staging folder that
        becomes the job's folder inside the insert's transaction, where the quotas are checked
        (so two uploads at once cannot both squeeze in). Any failure, a full disk included,
        leaves nothing behind: no folder, no file, no row."""
        job_id = uuid.uuid4().hex
        staging, folder = self.folder / f"{STAGING_PREFIX}{job_id}", self.folder / job_id
        try:
            rows = self._write_files(staging, folder, job_id, uploads)
            size = sum(len(u.data) for u in uploads)
            with self.transaction() as db:
                check_quota(db, size, quota_bytes, None)
                if owner_quota_bytes is not None:
                    check_quota(db, size, owner_quota_bytes, owner)
                insert_job(db, job_id, owner, rows, options, labels, size)
                staging.rename(folder)  # before COMMIT: a failed rename rolls the rows back
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return job_id

    def _write_files(
        self, staging: Path, folder: Path, job_id: str, uploads: list[Upload]
    ) -> list[tuple[Any, ...]]:
        """Each upload into `staging`; the rows name the paths they will have in `folder`."""
        rows = []
        try:
            staging.mkdir()
            for index, upload in enumerate(uploads):
                (staging / f"{index:05d}").write_bytes(upload.data)
                rows.append((job_id, index, upload.file_name, str(folder / f"{index:05d}"), "pending"))
        except OSError as exc:
            if exc.errno in DISK_FULL:
                raise StorageFull("the server's disk is full; nothing of this job was kept") from exc
            raise
        return rows

    def start_item(self, job_id: str, index: int) -> None:
        """Counted before the work, so an image that crashes the server is not tried forever."""
        with self.transaction() as db:
            db.execute(
                "UPDATE items SET attempts = attempts + 1 WHERE job_id = ? AND idx = ?", (job_id, index)
            )
            db.execute("UPDATE jobs SET status = 'running' WHERE id = ? AND status = 'queued'", (job_id,))

    def release_item(self, job_id: str, index: int) -> None:
        """The attempt never happened (the server was busy or stopping): take it back."""
        with self.transaction() as db:
            db.execute(
                "UPDATE items SET attempts = MAX(0, attempts - 1) WHERE job_id = ? AND idx = ?",
                (job_id, index),
            )

    def retry_item(self, job_id: str, index: int, error: str) -> None:
        """The attempt failed in a way a later one may not: keep the image pending, and why."""
        with self.transaction() as db:
            db.execute(
                "UPDATE items SET error = ? WHERE job_id = ? AND idx = ? AND status = 'pending'",
                (error, job_id, index),
            )

    def finish_item(self, job_id: str, index: int, result: str | None, error: str | None) -> None:
        status = "done" if error is None else "failed"
        with self.transaction() as db:
            db.execute(
                "UPDATE items SET status = ?, result = ?, error = ? WHERE job_id = ? AND idx = ?",
                (status, result, error, job_id, index),
            )
            pending, done = db.execute(
                "SELECT SUM(status = 'pending'), SUM(status = 'done') FROM items WHERE job_id = ?", (job_id,)
            ).fetchone()
            if not pending:  # finished: 'failed' only when no image succeeded
                db.execute(
                    "UPDATE jobs SET status = ?, finished = ?"
                    " WHERE id = ? AND status IN ('queued', 'running')",
                    ("done" if done else "failed", time.time(), job_id),
                )

    def cancel(self, job_id: str) -> None:
        with self.transaction() as db:
            db.execute(
                "UPDATE jobs SET status = 'cancelled', finished = ?"
                " WHERE id = ? AND status IN ('queued', 'running')",
                (time.time(), job_id),
            )

    def delete_files(self, job_id: str) -> None:
        shutil.rmtree(self.folder / job_id, ignore_errors=True)
        with self.transaction() as db:
            db.execute("UPDATE jobs SET bytes = 0 WHERE id = ?", (job_id,))

    def delete(self, job_id: str) -> bool:
        """Remove a finished job with its results and files; False (nothing done) while active."""
        return bool(self._delete_finished(FINISHED_JOB, (job_id,)))

    def expire(self, finished_before: float) -> list[str]:
        """Remove every job that finished before this Unix time; also leftovers of crashed uploads."""
        self._remove_stale_staging()
        return self._delete_finished(FINISHED_BEFORE, (finished_before,))

    def _delete_finished(self, select_ids: str, args: tuple[Any, ...]) -> list[str]:
        with self.transaction() as db:
            ids = [row[0] for row in db.execute(select_ids, args)]
            db.executemany("DELETE FROM items WHERE job_id = ?", [(i,) for i in ids])
            db.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in ids])
        for job_id in ids:
            shutil.rmtree(self.folder / job_id, ignore_errors=True)
        return ids

    def _remove_stale_staging(self) -> None:
        cutoff = time.time() - STAGING_MAX_AGE_S
        for path in self.folder.glob(f"{STAGING_PREFIX}*"):
            with contextlib.suppress(FileNotFoundError):  # an upload that just finished or failed
                if path.stat().st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)

    # -- reading -------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute(f"{JOB_ROWS} WHERE j.id = ? GROUP BY j.id", (job_id,)).fetchone()
        return None if row is None else _job_row(row)

    def owned(self, owner: str, limit: int, before: tuple[float, str] | None = None) -> list[JobRow]:
        """One owner's jobs, newest first, from just after `before` (created, id) when given."""
        after = "AND (j.created, j.id) < (?, ?)" if before else ""
        with self._lock:
            rows = self._db.execute(
                f"{JOB_ROWS} WHERE j.owner = ? {after} GROUP BY j.id"
                " ORDER BY j.created DESC, j.id DESC LIMIT ?",
                (owner, *(before or ()), limit),
            ).fetchall()
        return [_job_row(row) for row in rows]

    def next_pending(self, after_job: str | None = None) -> PendingItem | None:
        """The next pending image, taking the active jobs in turns (oldest first, beginning with
        the one after `after_job`), so a job of slow or failing images never holds up the rest."""
        with self._lock:
            job = self._db.execute(
                "SELECT j.id FROM jobs j WHERE j.status IN ('queued', 'running') AND EXISTS"
                " (SELECT 1 FROM items i WHERE i.job_id = j.id AND i.status = 'pending')"
                " ORDER BY (j.created, j.id) <= (SELECT created, id FROM jobs WHERE id = ?),"
                " j.created, j.id LIMIT 1",
                (after_job or "",),
            ).fetchone()
            if job is None:
                return None
            row = self._db.execute(
                "SELECT idx, path, attempts, error FROM items"
                " WHERE job_id = ? AND status = 'pending' ORDER BY idx LIMIT 1",
                (job[0],),
            ).fetchone()
        return None if row is None else PendingItem(job[0], int(row[0]), row[1], int(row[2]), row[3])

    def results(self, job_id: str) -> list[tuple[str, str]]:
        """(file name, result JSON) of each finished image, in upload order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT file_name, result FROM items WHERE job_id = ? AND status = 'done' ORDER BY idx",
                (job_id,),
            ).fetchall()
        return [(name, result) for name, result in rows]

    def failures(self, job_id: str, limit: int) -> list[tuple[str, str]]:
        """(file name, reason) of the first `limit` failed images, in upload order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT file_name, error FROM items WHERE job_id = ? AND status = 'failed'"
                " ORDER BY idx LIMIT ?",
                (job_id, limit),
            ).fetchall()
        return [(name, error or "") for name, error in rows]

    def attempts(self, job_id: str) -> list[int]:
        with self._lock:
            rows = self._db.execute("SELECT attempts FROM items WHERE job_id = ? ORDER BY idx", (job_id,))
            return [int(r[0]) for r in rows.fetchall()]

    def bytes_used(self, owner: str | None = None) -> int:
        """Bytes of images kept for unfinished jobs: everyone's (owner None) or one owner's."""
        with self._lock:
            return used_bytes(self._db, owner)

    def room(self, owner: str, quota_bytes: int, owner_quota_bytes: int) -> int:
        """Bytes a new job of this owner may bring now (checked again at the insert)."""
        with self._lock:
            return max(
                0,
                min(
                    quota_bytes - used_bytes(self._db, None), owner_quota_bytes - used_bytes(self._db, owner)
                ),
            )


JOB_ROWS = (
    "SELECT j.id, j.owner, j.status, j.created, j.options, j.labels, j.total,"
    " SUM(i.status = 'done'), SUM(i.status = 'failed') FROM jobs j JOIN items i ON i.job_id = j.id"
)


def _job_row(row: tuple[Any, ...]) -> JobRow:
    done, failed = int(row[7] or 0), int(row[8] or 0)
    return JobRow(
        row[0], row[1], row[2], row[3], json.loads(row[4]), json.loads(row[5]), row[6], done, failed
    )


def check_quota(db: sqlite3.Connection, size: int, quota_bytes: int, owner: str | None) -> None:
    """Images of unfinished jobs, all of them (owner None) or one owner's, must fit the quota."""
    used = used_bytes(db, owner)
    if used + size <= quota_bytes:
        return
    whose = "this server's jobs" if owner is None else "your jobs"
    raise QuotaExceeded(
        f"{whose} may keep {quota_bytes} bytes of images; {used} are in use and this job brings "
        f"{size}: wait for running jobs, or cancel some"
    )


def used_bytes(db: sqlite3.Connection, owner: str | None) -> int:
    """Image jobs and video jobs share one quota."""
    row = db.execute(
        "SELECT (SELECT COALESCE(SUM(bytes), 0) FROM jobs WHERE ? IS NULL OR owner = ?)"
        " + (SELECT COALESCE(SUM(bytes), 0) FROM videos WHERE ? IS NULL OR owner = ?)",
        (owner, owner, owner, owner),
    )
    return int(row.fetchone()[0])


def insert_job(
    db: sqlite3.Connection,
    job_id: str,
    owner: str,
    rows: list[tuple[Any, ...]],
    options: dict[str, Any],
    labels: list[str],
    size: int,
) -> None:
    db.execute(
        "INSERT INTO jobs (id, owner, status, created, options, labels, total, bytes)"
        " VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
        (job_id, owner, time.time(), json.dumps(options), json.dumps(labels), len(rows), size),
    )
    db.executemany("INSERT INTO items (job_id, idx, file_name, path, status) VALUES (?, ?, ?, ?, ?)", rows)
