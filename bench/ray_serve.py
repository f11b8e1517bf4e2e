"""Ray Serve mode (`tunnelvision serve --ray`): throughput with 1, 2 and 4 Ray replicas, and the
cost of the Ray hop (p50 at concurrency 1, Ray mode ÷ plain mode). Simulated device, no model.

    python bench/ray_serve.py            # about 2 minutes on 2 CPU cores
    python bench/ray_serve.py --smoke    # tiny sizes, only to show the script runs

One local Ray cluster (127.0.0.1, its own temp dir) serves the whole run; each row is a
`tunnelvision serve --ray --ray-address <it> --ray-min-replicas N --ray-max-replicas N` server
started as a subprocess, as a user starts it, and the plain `tunnelvision serve` beside it for
the hop. A replica reserves half a logical CPU (`remote.REPLICA_CPUS`); the cluster is declared
with 4 logical CPUs so 4 replicas fit on a 2-core box: replicas mostly sleep on the simulated
device, so the real cores are shared by the ingress, the Ray processes and the load generator.
One request per pass (`--max-batch 1`), so a replica's rate is 1000 / device-ms and the
ratios show how far replicas add up. Ends with `ray_scaling_4_vs_1=<x>` and `ray_hop_p50=<x>`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.loadgen import LoadResult
from bench.run import load, ours, process, segment_request, test_image


@dataclass
class Row:
    name: str
    replicas: int  # 0: the plain server, no Ray
    loaded: LoadResult  # many clients: throughput
    single: LoadResult  # one client: the hop's latency


def descendants(pid: int) -> set[int]:
    """Every process below `pid`, from /proc: Ray's agents may outlive `ray.shutdown`."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


@contextlib.contextmanager
def local_cluster(logical_cpus: int) -> Iterator[str]:
    """A one-node cluster on 127.0.0.1 in its own temp dir, stopped (every child pid) after;
    yields its GCS address for `--ray-address`."""
    # Before Ray is imported (the servers inherit these): no usage reporting, a one-off auth
    # token rather than one written under ~/.ray, a node that stays on 127.0.0.1.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray

    temp = tempfile.mkdtemp(prefix="tvray-")  # short: Ray's socket paths must stay under 108 bytes
    ray.init(
        num_cpus=logical_cpus,
        include_dashboard=False,
        _temp_dir=temp,
        log_to_driver=False,
        _node_ip_address="127.0.0.1",
    )
    started = descendants(os.getpid())
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()
        for pid in started | descendants(os.getpid()):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(temp, ignore_errors=True)


def measure(
    name: str,
    replicas: int,
    command: list[str],
    request: dict[str, Any],
    clients: int,
    seconds: float,
    single: int,
) -> Row:
    began = time.monotonic()
    with process(command, "/readyz") as (url, _):
        load(url, request, 2, 1.0)  # warm-up: connections, replicas' first calls
        loaded = load(url, request, clients, seconds)
        alone = load(url, request, 1, 600.0, max_requests=single)
    print(f"# {name}: {time.monotonic() - began:.1f} s", file=sys.stderr, flush=True)
    return Row(name, replicas, loaded, alone)


def print_rows(rows: list[Row], clients: int) -> None:
    base = next(r for r in rows if r.replicas == 1)
    plain = next(r for r in rows if r.replicas == 0)
    print(
        f"| server | req/s at {clients} clients | vs 1 Ray replica | p50 at {clients} clients | "
        "p50 at 1 client | vs plain | answers | errors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        p50 = row.single.percentile(0.5)
        print(
            f"| {row.name} | {row.loaded.throughput:.1f} | "
            f"{row.loaded.throughput / base.loaded.throughput:.2f} x | "
            f"{row.loaded.percentile(0.5) * 1000:.0f} ms | {p50 * 1000:.0f} ms | "
            f"{p50 / plain.single.percentile(0.5):.2f} x | {row.loaded.ok + row.single.ok} | "
            f"{row.loaded.errors + row.single.errors} |"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", default="1,2,4", help="Ray replica counts to compare")
    parser.add_argument("--seconds", type=float, default=10.0, help="each load run")
    parser.add_argument("--clients", type=int, default=16, help="concurrent requests for throughput")
    parser.add_argument("--single", type=int, default=40, help="requests sent one at a time for p50")
    parser.add_argument("--device-ms", type=float, default=100.0, help="simulated device time per pass")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, to check the script runs")
    args = parser.parse_args(argv)
    counts = [int(n) for n in args.replicas.split(",")]
    seconds, single, device_ms = args.seconds, args.single, args.device_ms
    if args.smoke:
        counts, seconds, single, device_ms = [1, 2], 1.0, 5, 20.0
    request = segment_request(test_image(64, 48))  # a small image: the device is the cost
    server = ours(
        "--backend", "simulated", "--simulated-batch-ms", f"{device_ms:g}", "--simulated-item-ms", "0",
        "--max-batch", "1", "--no-warmup", "--data-dir", tempfile.mkdtemp(prefix="tvbench-"),
    )  # fmt: skip
    cores = os.cpu_count() or 1
    print(f"machine: {cores} cores (simulated device: {device_ms:g} ms per pass, one request a pass)")
    print(f"load: {args.clients} clients for {seconds:g} s, then {single} requests one at a time\n")
    rows = [measure("plain (no Ray)", 0, server, request, args.clients, seconds, single)]
    with local_cluster(max(4, cores)) as address:
        for n in counts:
            ray = ["--ray", "--ray-address", address, "--ray-min-replicas", str(n)]
            ray += ["--ray-max-replicas", str(n)]
            label = f"Ray, {n} replica{'s' if n > 1 else ''}"
            rows.append(measure(label, n, [*server, *ray], request, args.clients, seconds, single))
    print_rows(rows, args.clients)
    base, last = rows[1], rows[-1]
    print(f"\nray_scaling_{last.replicas}_vs_1={last.loaded.throughput / base.loaded.throughput:.2f}")
    hop = base.single.percentile(0.5) / rows[0].single.percentile(0.5)
    extra_ms = (base.single.percentile(0.5) - rows[0].single.percentile(0.5)) * 1000
    print(f"ray_hop_p50={hop:.2f}  (+{extra_ms:.0f} ms at concurrency 1, 1 replica)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
