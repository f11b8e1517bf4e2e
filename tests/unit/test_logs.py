"""Logging never waits for a slow sink: records past the queue's room are dropped and counted."""

from __future__ import annotations

import logging
import queue
import threading
import time

from tunnelvision.logs import DroppingQueueHandler


def record(message: str) -> logging.LogRecord:
    return logging.LogRecord("tunnelvision.access", logging.INFO, __file__, 0, message, None, None)


def test_a_full_queue_drops_and_counts_instead_of_blocking() -> None:
    records: queue.Queue[logging.LogRecord] = queue.Queue(3)
    handler = DroppingQueueHandler(records)
    began = time.monotonic()
    for i in range(1000):  # nothing drains the queue: a blocking handler would hang on the 4th
        handler.handle(record(f"line {i}"))
    assert time.monotonic() - began < 1.0
    assert records.qsize() == 3
    assert handler.dropped == 997
    assert records.get_nowait().getMessage() == "line 0"


def test_records_reach_the_sink_in_order_when_it_keeps_up() -> None:
    records: queue.Queue[logging.LogRecord] = queue.Queue(100)
    handler = DroppingQueueHandler(records)
    seen: list[str] = []

    def drain() -> None:
        for _ in range(50):
            seen.append(records.get(timeout=5).getMessage())

    reader = threading.Thread(target=drain)
    reader.start()
    for i in range(50):
        handler.handle(record(f"line {i}"))
    reader.join(10)
    assert seen == [f"line {i}" for i in range(50)]
    assert handler.dropped == 0
