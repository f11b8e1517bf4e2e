"""A flood of requests that the rate limiter turns away must not take liveness down with it.

The server logs one JSON line per request. When nothing reads its stderr fast enough (here:
nothing at all until the end), writing those lines from the event loop would stall every request,
/healthz included. Bounded: a few seconds, 127.0.0.1 only, the server ended by its own pid.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from bench.flood import flood, raw_request
from support import free_port, wait_until_ready

FLOOD_SECONDS = 4.0


def test_healthz_answers_while_a_flood_is_refused_and_the_log_sink_is_stalled() -> None:
    port = free_port()
    command = [sys.executable, "-m", "tunnelvision.cli", "serve", "--backend", "simulated"]
    command += ["--port", str(port), "--keys-file", "/nonexistent/keys.json", "--no-warmup"]
    command += ["--data-dir", tempfile.mkdtemp(), "--rate-limit-per-minute", "60", "--rate-limit-burst", "5"]
    command += ["--public-metrics"]
    # stderr is a pipe nobody reads during the flood: its 64 KiB fill within a few hundred lines
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process=process)
        probes: list[float] = []
        prober = threading.Thread(target=probe_healthz, args=(url, probes), daemon=True)
        prober.start()
        request = raw_request("127.0.0.1", str(port), "/v1/models", 0)
        result = asyncio.run(flood("127.0.0.1", port, request, 50, FLOOD_SECONDS, 200_000))
        prober.join(30)
        assert result.statuses[429] > 1000, result.statuses  # the flood really was refused
        assert probes and max(probes) < 5.0, probes  # stalled logging would time these out
        assert dropped_log_lines(url) > 0  # the sink was stalled: lines were dropped, not waited for
    finally:
        process.kill()
        process.communicate(timeout=30)  # drains the pipe


def dropped_log_lines(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=10).text
    line = next(
        line for line in metrics.splitlines() if line.startswith("tunnelvision_log_lines_dropped_total")
    )
    return float(line.split()[-1])


def probe_healthz(url: str, latencies: list[float]) -> None:
    """/healthz on a new connection every 100 ms during the flood; a timeout counts as 10 s."""
    end = time.monotonic() + FLOOD_SECONDS
    time.sleep(1.0)  # let the pipe fill first
    while time.monotonic() < end:
        began = time.monotonic()
        try:
            httpx.get(f"{url}/healthz", timeout=10).raise_for_status()
            latencies.append(time.monotonic() - began)
        except httpx.HTTPError:
            latencies.append(10.0)
        time.sleep(0.1)
