"""An async load generator for 127.0.0.1 only: bounded in requests and seconds, stops by itself."""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlparse

import httpx


@dataclass
class LoadResult:
    latencies_s: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    health_latencies_s: list[float] = field(default_factory=list)
    elapsed_s: float = 0.0

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def errors(self) -> int:
        return sum(count for status, count in self.statuses.items() if status != 200)

    @property
    def throughput(self) -> float:
        return self.ok / self.elapsed_s if self.elapsed_s else 0.0

    def percentile(self, q: float, values: list[float] | None = None) -> float:
        data = sorted(self.latencies_s if values is None else values)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q * len(data)))]

    @property
    def health_p99(self) -> float:
        return self.percentile(0.99, self.health_latencies_s)


def require_loopback(url: str) -> None:
    host = urlparse(url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"refusing to send load to {host}: benchmarks target 127.0.0.1 only")


async def run_load(
    url: str,
    request: dict[str, Any],
    clients: int,
    duration_s: float,
    max_requests: int = 100_000,
    probe_health: bool = False,
) -> LoadResult:
    """`clients` concurrent loops POSTing `request` (httpx kwargs with a 'path') until the time or
    request budget is spent; optionally /healthz every 20 ms alongside, from another process (so
    the load generator's own busy event loop is not what gets measured)."""
    require_loopback(url)
    result = LoadResult()
    budget = [max_requests]
    end = time.monotonic() + duration_s
    limits = httpx.Limits(max_connections=clients + 2)
    prober = await _start_prober(url, duration_s) if probe_health else None
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        began = time.monotonic()
        await asyncio.gather(*(_client_loop(client, request, end, budget, result) for _ in range(clients)))
        result.elapsed_s = time.monotonic() - began
    if prober is not None:
        output, _ = await prober.communicate()
        result.health_latencies_s = json.loads(output)
    return result


async def _start_prober(url: str, duration_s: float) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--probe", url, "--seconds", str(duration_s), stdout=asyncio.subprocess.PIPE
    )


async def _client_loop(
    client: httpx.AsyncClient, request: dict[str, Any], end: float, budget: list[int], result: LoadResult
) -> None:
    kwargs = {k: v for k, v in request.items() if k != "path"}
    while time.monotonic() < end and budget[0] > 0:
        budget[0] -= 1
        began = time.monotonic()
        response = await client.post(request["path"], **kwargs)
        result.latencies_s.append(time.monotonic() - began)
        result.statuses[response.status_code] = result.statuses.get(response.status_code, 0) + 1


def probe_health(url: str, seconds: float) -> list[float]:
    """GET /healthz every 20 ms on one kept-alive connection; the latencies in seconds."""
    require_loopback(url)
    latencies = []
    end = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=10) as client:
        while time.monotonic() < end:
            began = time.monotonic()
            client.get("/healthz")
            latencies.append(time.monotonic() - began)
            time.sleep(0.02)
    return latencies


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description="the /healthz prober run_load starts")
    parser.add_argument("--probe", required=True, help="base URL (127.0.0.1 only)")
    parser.add_argument("--seconds", type=float, required=True)
    arguments = parser.parse_args()
    print(json.dumps(probe_health(arguments.probe, arguments.seconds)))


def summary(result: LoadResult) -> str:
    return (
        f"{result.throughput:.1f} req/s, p50 {result.percentile(0.5) * 1000:.0f} ms, "
        f"p99 {result.percentile(0.99) * 1000:.0f} ms, errors {result.errors}, "
        f"median {statistics.median(result.latencies_s) * 1000 if result.latencies_s else 0:.0f} ms"
    )
