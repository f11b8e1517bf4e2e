"""Wake-ups for the live event streams of video jobs.

The stream itself reads committed frames from the store by revision (so a slow reader never
makes the runner wait or memory grow, and a reconnecting one resumes exactly); this only tells
the streams of one video that there is something new to read.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any


class VideoEvents:
    """Per video, an event that is set (and replaced) whenever frames or its status change.
    Used from the event loop only."""

    def __init__(self) -> None:
        self._changed: dict[str, asyncio.Event] = {}
        self._listeners: dict[str, int] = {}

    def publish(self, video_id: str, committed: Sequence[Any]) -> None:
        if committed:
            self.publish_status(video_id)

    def publish_status(self, video_id: str) -> None:
        event = self._changed.pop(video_id, None)
        if event is not None:
            event.set()

    async def wait(self, video_id: str, timeout_s: float) -> bool:
        """True when something changed within `timeout_s`, False on timeout."""
        event = self._changed.setdefault(video_id, asyncio.Event())
        self._listeners[video_id] = self._listeners.get(video_id, 0) + 1
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), timeout=timeout_s)
            return event.is_set()
        finally:
            self._listeners[video_id] -= 1
            if not self._listeners[video_id]:
                del self._listeners[video_id]
                if not event.is_set():
                    self._changed.pop(video_id, None)
