"""Logging that never blocks the event loop.

A log line is written to stderr, and stderr can be slow: a remote terminal, a busy journal, a
container log driver. Written from the event loop, every line of a flood of 429s would wait for
that sink, and /healthz with it (measured: 10 s probe time-outs with a 200 KB/s sink). So records
go into a bounded queue that one thread drains; when the sink cannot keep up, lines are dropped
and counted (`dropped_lines()`, exported in /metrics), and the next line that gets through says
how many were lost.
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import threading

QUEUE_LINES = 10_000
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS_LOGGER = "tunnelvision.access"  # JSON lines, nothing around them


class DroppingQueueHandler(logging.handlers.QueueHandler):
    """Puts records on a bounded queue without waiting; counts the ones that did not fit."""

    def __init__(self, records: queue.Queue[logging.LogRecord]) -> None:
        super().__init__(records)
        self.dropped = 0
        self._lock = threading.Lock()

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        """As it is: the writing thread formats it (the base class formats here, on the event loop,
        to make records picklable, which a queue between threads does not need)."""
        return record

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            self.queue.put_nowait(record)
        except queue.Full:
            with self._lock:
                self.dropped += 1


class _Pipeline:
    """The one queue, its handler and the thread writing to the real handlers."""

    def __init__(self) -> None:
        self.records: queue.Queue[logging.LogRecord] = queue.Queue(QUEUE_LINES)
        self.handler = DroppingQueueHandler(self.records)
        self.listener: logging.handlers.QueueListener | None = None
        self.reported = 0

    def start(self, level: int) -> None:
        self.stop()
        self.listener = logging.handlers.QueueListener(
            self.records, _DropNotice(self, _stderr(LOG_FORMAT)), respect_handler_level=False
        )
        self.listener.start()
        self.handler.setLevel(level)

    def stop(self) -> None:
        if self.listener is not None:
            self.listener.stop()  # writes what is queued, then ends its thread
            self.listener = None


class _DropNotice(logging.Handler):
    """Formats each record for its logger (access lines bare) and says when lines were lost."""

    def __init__(self, pipeline: _Pipeline, plain: logging.Handler) -> None:
        super().__init__()
        self.pipeline = pipeline
        self.plain = plain
        self.bare = _stderr("%(message)s")

    def emit(self, record: logging.LogRecord) -> None:
        dropped = self.pipeline.handler.dropped
        if dropped > self.pipeline.reported:
            lost = dropped - self.pipeline.reported
            self.pipeline.reported = dropped
            self.plain.handle(_notice(f"log sink too slow: {lost} log lines dropped"))
        (self.bare if record.name == ACCESS_LOGGER else self.plain).handle(record)


_pipeline = _Pipeline()


def configure_logging(level: str) -> None:
    """Every tunnelvision, uvicorn and library record goes through the non-blocking queue."""
    numeric = logging.getLevelName(level.upper())
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(_pipeline.handler)
    root.setLevel(numeric)
    access = logging.getLogger(ACCESS_LOGGER)
    access.setLevel(logging.INFO)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):  # uvicorn adds its own stderr handlers
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    _pipeline.start(logging.NOTSET)


def stop_logging() -> None:
    """Flush what is queued (at exit)."""
    _pipeline.stop()


def dropped_lines() -> int:
    return _pipeline.handler.dropped


def _stderr(fmt: str) -> logging.Handler:
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter(fmt))
    return handler


def _notice(message: str) -> logging.LogRecord:
    return logging.LogRecord("tunnelvision", logging.WARNING, __file__, 0, message, None, None)
