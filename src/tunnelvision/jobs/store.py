"""Jobs and their images in SQLite (WAL) with the uploaded files beside it. Each image's result is
committed as soon as it is known, so a crash loses at most the images in flight."""

from __future__ import annotations

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

from tunnelvision.errors import QuotaExceeded

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY, owner TEXT NOT NULL, status TEXT NOT NULL, created REAL NOT NULL,
    options TEXT NOT NULL, labels TEXT NOT NULL, total INTEGER NOT NULL, bytes INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS items (
    job_id TEXT NOT NULL, idx INTEGER NOT NULL, file_name TEXT NOT NULL, path TEXT NOT NULL,
    status TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, result TEXT, error TEXT,
    PRIMARY KEY (job_id, idx)
);
"""
ACTIVE = ("queued", "running")


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

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
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
        self, owner: str, uploads: list[Upload], options: dict[str, Any], labels: list[str], quota_bytes: int
    ) -> str:
        """Store the job and its images; QuotaExceeded (checked in the same transaction as the
        insert, so two uploads at once cannot both squeeze in) or any failure leaves nothing behind."""
        job_id = uuid.uuid4().hex
        folder = self.folder / job_id
        folder.mkdir()
        rows = []
        for index, upload in enumerate(uploads):
            path = folder / f"{index:05d}"
            path.write_bytes(upload.data)
            rows.append((job_id, index, upload.file_name, str(path), "pending"))
        size = sum(len(u.data) for u in uploads)
        try:
            self._insert(job_id, owner, rows, options, labels, size, quota_bytes)
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        return job_id

    def _insert(
        self,
        job_id: str,
        owner: str,
        rows: list[tuple[Any, ...]],
        options: dict[str, Any],
        labels: list[str],
        size: int,
        quota_bytes: int,
    ) -> None:
        with self._transaction() as db:
            used = int(db.execute("SELECT COALESCE(SUM(bytes), 0) FROM jobs").fetchone()[0])
            if used + size > quota_bytes:
                raise QuotaExceeded(
                    f"jobs may keep {quota_bytes} bytes of images; {used} are in use and this job brings "
                    f"{size}: wait for running jobs, or cancel some"
                )
            db.execute(
                "INSERT INTO jobs VALUES (?, ?, 'queued', ?, ?, ?, ?, ?)",
                (job_id, owner, time.time(), json.dumps(options), json.dumps(labels), len(rows), size),
            )
            db.executemany(
                "INSERT INTO items (job_id, idx, file_name, path, status) VALUES (?, ?, ?, ?, ?)", rows
            )

    def start_item(self, job_id: str, index: int) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE items SET attempts = attempts + 1 WHERE job_id = ? AND idx = ?", (job_id, index)
            )
            db.execute("UPDATE jobs SET status = 'running' WHERE id = ? AND status = 'queued'", (job_id,))

    def finish_item(self, job_id: str, index: int, result: str | None, error: str | None) -> None:
        status = "done" if error is None else "failed"
        with self._transaction() as db:
            db.execute(
                "UPDATE items SET status = ?, result = ?, error = ? WHERE job_id = ? AND idx = ?",
                (status, result, error, job_id, index),
            )
            pending, done = db.execute(
                "SELECT SUM(status = 'pending'), SUM(status = 'done') FROM items WHERE job_id = ?", (job_id,)
            ).fetchone()
            if not pending:  # finished: 'failed' only when no image succeeded
                db.execute(
                    "UPDATE jobs SET status = ? WHERE id = ? AND status IN ('queued', 'running')",
                    ("done" if done else "failed", job_id),
                )

    def cancel(self, job_id: str) -> None:
        with self._transaction() as db:
            db.execute(
                "UPDATE jobs SET status = 'cancelled' WHERE id = ? AND status IN ('queued', 'running')",
                (job_id,),
            )

    def delete_files(self, job_id: str) -> None:
        shutil.rmtree(self.folder / job_id, ignore_errors=True)
        with self._transaction() as db:
            db.execute("UPDATE jobs SET bytes = 0 WHERE id = ?", (job_id,))

    # -- reading -------------------------------------------------------------------------------

    def get(self, job_id: str) -> JobRow | None:
        with self._lock:
            row = self._db.execute(
                "SELECT j.id, j.owner, j.status, j.created, j.options, j.labels, j.total,"
                " SUM(i.status = 'done'), SUM(i.status = 'failed')"
                " FROM jobs j JOIN items i ON i.job_id = j.id WHERE j.id = ? GROUP BY j.id",
                (job_id,),
            ).fetchone()
        if row is None:
            return None
        return JobRow(
            row[0],
            row[1],
            row[2],
            row[3],
            json.loads(row[4]),
            json.loads(row[5]),
            row[6],
            int(row[7] or 0),
            int(row[8] or 0),
        )

    def next_pending(self) -> tuple[str, int, str] | None:
        """The oldest active job's next pending image: (job id, index, file path)."""
        with self._lock:
            row = self._db.execute(
                "SELECT i.job_id, i.idx, i.path FROM items i JOIN jobs j ON j.id = i.job_id"
                " WHERE j.status IN ('queued', 'running') AND i.status = 'pending'"
                " ORDER BY j.created, i.idx LIMIT 1"
            ).fetchone()
        return None if row is None else (row[0], int(row[1]), row[2])

    def results(self, job_id: str) -> list[tuple[str, str]]:
        """(file name, result JSON) of each finished image, in upload order."""
        with self._lock:
            rows = self._db.execute(
                "SELECT file_name, result FROM items WHERE job_id = ? AND status = 'done' ORDER BY idx",
                (job_id,),
            ).fetchall()
        return [(name, result) for name, result in rows]

    def attempts(self, job_id: str) -> list[int]:
        with self._lock:
            rows = self._db.execute("SELECT attempts FROM items WHERE job_id = ? ORDER BY idx", (job_id,))
            return [int(r[0]) for r in rows.fetchall()]

    def bytes_used(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM jobs").fetchone()[0])
