"""Is the server still alive for everyone else while one address floods it?

    python bench/flood.py                       # 200 connections for 30 s against a fresh server
    python bench/flood.py --seconds 10 --connections 100
    python bench/flood.py --log-kbps 200       # the server's stderr read at 200 KB/s

Starts `tunnelvision serve --backend simulated` on a free 127.0.0.1 port (the default per-client
rate limit: 600/min, burst 60), then opens `--connections` keep-alive connections from this
address that send requests back to back, so nearly all of them are answered 429. Meanwhile a
separate process probes `/healthz` every 50 ms on its own connection (10 s timeout). Prints a table
and ends with `healthz_max_ms=<x>`. Traffic goes to 127.0.0.1 only; the run is bounded in time and
requests, and the server is ended by its own pid.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loadgen import require_loopback

PROBE_INTERVAL_S = 0.05
PROBE_TIMEOUT_S = 10.0
READ_TIMEOUT_S = 10.0  # a server that stops answering ends the connection, not the run


@dataclass
class FloodResult:
    statuses: Counter[int] = field(default_factory=Counter)
    failures: int = 0  # connections that broke (reset, closed) before an answer
    elapsed_s: float = 0.0
    probes_s: list[float] = field(default_factory=list)  # /healthz latencies; PROBE_TIMEOUT_S = timed out

    @property
    def sent(self) -> int:
        return sum(self.statuses.values())

    def probe_percentile(self, q: float) -> float:
        data = sorted(self.probes_s)
        return data[min(len(data) - 1, int(q * len(data)))] if data else float("nan")

    @property
    def probes_over_1s(self) -> int:
        return sum(1 for latency in self.probes_s if latency > 1.0)


async def flood(
    host: str, port: int, request: bytes, connections: int, seconds: float, budget: int
) -> FloodResult:
    """`connections` raw HTTP/1.1 keep-alive loops (a minimal client, so this process is not the
    bottleneck), each sending `request` as soon as the last answer arrived."""
    result = FloodResult()
    remaining = [budget]
    end = time.monotonic() + seconds
    began = time.monotonic()
    await asyncio.gather(
        *(_connection_loop(host, port, request, end, remaining, result) for _ in range(connections))
    )
    result.elapsed_s = time.monotonic() - began
    return result


async def _connection_loop(
    host: str, port: int, request: bytes, end: float, remaining: list[int], result: FloodResult
) -> None:
    while time.monotonic() < end and remaining[0] > 0:
        try:
            reader, writer = await asyncio.open_connection(host, port)
        except OSError:
            result.failures += 1
            await asyncio.sleep(0.05)
            continue
        try:
            while time.monotonic() < end and remaining[0] > 0:
                remaining[0] -= 1
                writer.write(request)
                result.statuses[await asyncio.wait_for(_read_response(reader), READ_TIMEOUT_S)] += 1
        except (OSError, asyncio.IncompleteReadError, ValueError, TimeoutError):
            result.failures += 1
        finally:
            writer.close()


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next(
        (int(line.split(":", 1)[1]) for line in lines if line.lower().startswith("content-length:")), 0
    )
    await reader.readexactly(length)
    return status


def probe(url: str, seconds: float) -> list[float]:
    """/healthz every PROBE_INTERVAL_S, each on a new connection as an orchestrator's health check
    does; a timeout counts as PROBE_TIMEOUT_S."""
    import httpx

    latencies = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        began = time.monotonic()
        try:
            httpx.get(f"{url}/healthz", timeout=PROBE_TIMEOUT_S).raise_for_status()
            latencies.append(time.monotonic() - began)
        except httpx.HTTPError:
            latencies.append(PROBE_TIMEOUT_S)
        time.sleep(PROBE_INTERVAL_S)
    return latencies


def raw_request(host: str, port: str, path: str, body_bytes: int) -> bytes:
    """GET `path`, or a POST with a body of `body_bytes` (an upload the server should refuse unread)."""
    if not body_bytes:
        return f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    head = f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/octet-stream\r\n"
    return f"{head}Content-Length: {body_bytes}\r\n\r\n".encode() + b"x" * body_bytes


async def run(
    url: str, path: str, connections: int, seconds: float, budget: int, body_bytes: int = 0
) -> FloodResult:
    require_loopback(url)
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = raw_request(host, port, path, body_bytes)
    prober = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--probe", url, "--seconds", str(seconds), stdout=asyncio.subprocess.PIPE
    )
    result = await flood(host, int(port), request, connections, seconds, budget)
    output, _ = await prober.communicate()
    result.probes_s = json.loads(output)
    return result


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def serve_simulated(extra: list[str], log_kbps: float = 0) -> Iterator[str]:
    """`tunnelvision serve --backend simulated` as users start it; ended by its own pid."""
    import httpx

    port = _free_port()
    command = [
        sys.executable,
        "-m",
        "tunnelvision.cli",
        "serve",
        "--backend",
        "simulated",
        "--port",
        str(port),
    ]
    command += [
        "--keys-file",
        "/nonexistent/keys.json",
        "--data-dir",
        tempfile.mkdtemp(),
        "--log-level",
        "warning",
    ]
    sink = None
    if log_kbps:  # the server's log goes to a reader this slow, as a remote terminal or busy journal
        drain = [sys.executable, __file__, "--drain", str(log_kbps)]
        sink = subprocess.Popen(drain, stdin=subprocess.PIPE)
    out = sink.stdin if sink else subprocess.DEVNULL
    process = subprocess.Popen([*command, *extra], stdout=out, stderr=out)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        if sink is not None:
            sink.kill()
            sink.wait(15)


def drain(kbps: float) -> None:
    """Read stdin at `kbps` kilobytes a second, until it closes."""
    chunk = 4096
    while sys.stdin.buffer.read(chunk):
        time.sleep(chunk / (kbps * 1000))


def render(result: FloodResult, connections: int) -> str:
    others = {status: n for status, n in sorted(result.statuses.items()) if status != 429}
    rows = [
        ("connections", f"{connections}"),
        ("answers", f"{result.sent} in {result.elapsed_s:.1f} s ({result.sent / result.elapsed_s:.0f}/s)"),
        ("429 answers", f"{result.statuses.get(429, 0)}"),
        ("other answers", json.dumps(others)),
        ("broken connections", f"{result.failures}"),
        ("/healthz probes", f"{len(result.probes_s)}"),
        ("/healthz p50 ms", f"{result.probe_percentile(0.5) * 1000:.1f}"),
        ("/healthz p99 ms", f"{result.probe_percentile(0.99) * 1000:.1f}"),
        ("/healthz max ms", f"{max(result.probes_s, default=0) * 1000:.1f}"),
        ("/healthz over 1 s", f"{result.probes_over_1s}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"| {name:<{width}} | {value} |" for name, value in rows)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None, help="flood this running server instead of starting one")
    parser.add_argument("--path", default="/v1/models", help="what the flood asks for")
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--body-bytes", type=int, default=0, help="POST a body this large (0: GET)")
    parser.add_argument("--max-requests", type=int, default=500_000)
    parser.add_argument(
        "--log-kbps", type=float, default=0, help="the server's log sink reads this fast (0: /dev/null)"
    )
    parser.add_argument("--probe", default=None, help=argparse.SUPPRESS)  # the prober subprocess
    parser.add_argument("--drain", type=float, default=None, help=argparse.SUPPRESS)  # the slow sink
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.seconds)))
        return 0
    if args.drain:
        drain(args.drain)
        return 0
    if args.url:
        result = asyncio.run(
            run(args.url, args.path, args.connections, args.seconds, args.max_requests, args.body_bytes)
        )
    else:
        with serve_simulated([], args.log_kbps) as url:
            result = asyncio.run(
                run(url, args.path, args.connections, args.seconds, args.max_requests, args.body_bytes)
            )
    print(render(result, args.connections))
    print(f"healthz_max_ms={max(result.probes_s, default=0) * 1000:.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
