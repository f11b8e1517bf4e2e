"""Token buckets per client, and a cap on each client's requests in flight."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable


class RateLimiter:
    """`rate_per_s` tokens a second up to `burst`; one request takes one token."""

    def __init__(
        self,
        rate_per_s: float,
        burst: int,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.rate = rate_per_s
        self.burst = burst
        self.max_clients = max_clients
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, last time
        self._lock = threading.Lock()

    def acquire(self, client: str) -> float:
        """0 when allowed; otherwise the seconds until a token is available."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.pop(client, (float(self.burst), now))
            tokens = min(float(self.burst), tokens + (now - last) * self.rate)
            allowed = tokens >= 1.0
            self._buckets[client] = (tokens - 1.0 if allowed else tokens, now)
            while len(self._buckets) > self.max_clients:  # forget the least recently seen
                self._buckets.popitem(last=False)
        return 0.0 if allowed else (1.0 - tokens) / self.rate


class InflightLimiter:
    """At most `cap` requests of one client queued or running at once."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._counts: dict[str, int] = {}
        self._lock = threading.Lock()

    def try_enter(self, client: str) -> bool:
        with self._lock:
            count = self._counts.get(client, 0)
            if count >= self.cap:
                return False
            self._counts[client] = count + 1
            return True

    def leave(self, client: str) -> None:
        with self._lock:
            remaining = self._counts.get(client, 1) - 1
            if remaining > 0:
                self._counts[client] = remaining
            else:
                self._counts.pop(client, None)
