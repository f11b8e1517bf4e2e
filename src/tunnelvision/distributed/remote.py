"""The device deployment on Ray Serve, and the engine backend that calls it (imports Ray).

Each replica loads the models once (`models.factory.build_backends`, one device), warms them up
in its constructor, and answers batches of `work.Item`s with a `work.Reply` that carries its own
numbers. The ingress engine holds `RemoteBackend`s: one per request a replica may run at once,
times the most replicas, so its device workers keep every replica busy.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any, cast

from ray import serve
from ray.exceptions import RayActorError, RayTaskError, TaskCancelledError
from ray.serve.exceptions import (
    BackPressureError,
    DeploymentUnavailableError,
    ReplicaUnavailableError,
    RequestCancelledError,
)
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from tunnelvision.config import Settings
from tunnelvision.distributed.work import (
    Answer,
    DeviceLock,
    Item,
    ReplicaStats,
    Reply,
    abandoned,
    affinity_id,
    deadline_of,
    run_items,
    warm_up_all,
)
from tunnelvision.engine.backend import Backend, BackendInfo, Check, no_deadline
from tunnelvision.errors import DeadlineExceeded, QueueFull, TunnelvisionError, WorkerUnavailable
from tunnelvision.imaging import RGBImage
from tunnelvision.schemas import Detection, DetectParams, SegmentParams

log = logging.getLogger(__name__)

APP_NAME = "tunnelvision"
DEPLOYMENT = "device"
# Batches a replica holds at once: one on the device while the next is prepared or finished.
IN_FLIGHT_PER_REPLICA = 2
# Serve's router queue is left unbounded (-1): what waits there is at most one call per ingress
# device worker, and our own queue in front of them is the admission control.
ROUTER_QUEUE = -1
REPLICA_CPUS = 0.5  # the default (1) would reserve a core per replica for a process that mostly waits
RETRY_AFTER_S = 2.0
STATUS_TTL_S = 2.0  # /readyz reads a snapshot at most this old; the cluster is asked in the background
# The image_ids a replica announces to Serve's router (its most recent): a call reusing one goes
# to the replica that holds its embedding. A hint: a miss only recomputes the embedding.
AFFINITY_IDS = 64
_CANCEL = threading.Lock()  # guards Pending.abandoned and Call (the loop abandons, workers send)
_CANCELLED = (
    concurrent.futures.CancelledError,
    asyncio.CancelledError,
    TaskCancelledError,
    RequestCancelledError,
)


class DeviceReplica:
    """One copy of the models on one device (a GPU where the replica got one)."""

    def __init__(self, settings: Settings, device: str) -> None:
        from tunnelvision.models.factory import build_backends

        self.backend: Backend = build_backends(settings.model_copy(update={"device": device}))[0]
        self.device = DeviceLock()
        self.counters = ReplicaStats()
        self.id = serve.get_replica_context().replica_tag
        # Serve routes nothing to a replica before its constructor returns (and serve.run waits
        # for the first replicas): warming up here covers the first ones and autoscaled ones.
        if settings.warmup:
            warm_up_all(self.backend, self.counters)

    def info(self) -> BackendInfo:
        return self.backend.info

    def pid(self) -> int:
        """For tests and `doctor`: Ray's state API needs the dashboard, this does not."""
        return os.getpid()

    def stats(self) -> dict[str, Any]:
        """This replica's numbers: id, pid, counters, warm-up and embedding cache."""
        cache = self.backend.cache_stats()
        return {"id": self.id, "pid": os.getpid(), **self.counters.snapshot(), "cache": cache}

    @serve.multiplexed(max_num_models_per_replica=AFFINITY_IDS)  # type: ignore[untyped-decorator]
    async def hold(self, image_id: str) -> str:
        """Announce `image_id` to Serve's router (nothing to load: the embedding is computed by
        the device pass and kept in the backend's cache)."""
        return image_id

    async def run(self, items: list[Item]) -> Reply:
        affinity = serve.get_multiplexed_model_id()
        if affinity:
            await self.hold(affinity)
        for item in items:  # Ray hands arrays over read-only (zero-copy); the processors may write
            if not item.image.flags.writeable:
                item.image = item.image.copy()
        cancelled = threading.Event()
        try:
            # A thread, so the replica's event loop keeps taking (and cancelling) requests.
            answers = await asyncio.to_thread(
                run_items, self.backend, items, self.device, cancelled, self.counters
            )
        except asyncio.CancelledError:  # the ingress cancelled the call: its clients have gone
            cancelled.set()  # the thread skips what has not reached the device yet
            raise
        return Reply(answers, self.stats())


def replica_gpus(settings: Settings, cluster_gpus: float) -> float:
    """`ray_num_gpus` if given; else one GPU per replica where the cluster has any, none otherwise."""
    if settings.ray_num_gpus is not None:
        return settings.ray_num_gpus
    return 1.0 if cluster_gpus > 0 else 0.0


def deployment_options(settings: Settings, gpus: float) -> dict[str, Any]:
    """Replica count between min and max, scaled on requests in flight per replica."""
    options: dict[str, Any] = {
        "name": DEPLOYMENT,
        "ray_actor_options": {"num_cpus": REPLICA_CPUS, "num_gpus": gpus},
        "max_ongoing_requests": IN_FLIGHT_PER_REPLICA,
        "max_queued_requests": ROUTER_QUEUE,
        "health_check_period_s": 2,  # a dead replica is replaced in seconds, not ~10
        "graceful_shutdown_timeout_s": settings.deadline_s,
    }
    if settings.ray_min_replicas == settings.ray_max_replicas:
        options["num_replicas"] = settings.ray_min_replicas
    else:
        options["num_replicas"] = "auto"
        options["autoscaling_config"] = {
            "min_replicas": settings.ray_min_replicas,
            "max_replicas": settings.ray_max_replicas,
            "target_ongoing_requests": IN_FLIGHT_PER_REPLICA,
            "upscale_delay_s": settings.ray_upscale_delay_s,
            "downscale_delay_s": settings.ray_downscale_delay_s,
            # Load averaged over a window twice the upscale delay (Ray's 30 s at most), so a
            # short delay is not spent waiting for a long average to catch up.
            "look_back_period_s": min(30.0, max(2.0, 2 * settings.ray_upscale_delay_s)),
        }
    return options


def deploy(settings: Settings, cluster_gpus: float) -> DeploymentHandle[Any]:
    """Deploy (or update) the device deployment; returns once its replicas are up."""
    gpus = replica_gpus(settings, cluster_gpus)
    device = "cuda" if gpus > 0 else "cpu"  # Ray sets CUDA_VISIBLE_DEVICES to the replica's GPU
    deployment = serve.deployment(DeviceReplica).options(**deployment_options(settings, gpus))  # type: ignore[attr-defined]
    handle: DeploymentHandle[Any] = serve.run(
        deployment.bind(settings, device), name=app_name(settings), route_prefix=None
    )
    return handle


def app_name(settings: Settings, host: str | None = None) -> str:
    """One Serve application per server, named by its machine and port, so servers on several
    machines (or ports) share a cluster without sharing replicas; `ray_app_name` overrides."""
    if settings.ray_app_name:
        return settings.ray_app_name
    machine = re.sub(r"[^A-Za-z0-9.-]+", "-", host or socket.gethostname()).strip("-") or "host"
    return f"{APP_NAME}-{machine}-{settings.port}"


@dataclasses.dataclass
class Pending:
    """What prepare hands the ingress scheduler: the item to send, and its deadline; then
    whether its client has gone, and the call it is part of once sent."""

    item: Item
    deadline_at: float
    abandoned: bool = False
    call: Call | None = None


@dataclasses.dataclass
class Call:
    """One batch sent to a replica; cancelled once every item in it is abandoned."""

    pending: list[Pending]
    response: DeploymentResponse[Reply] | None = None
    cancelled: bool = False

    def sent(self, response: DeploymentResponse[Reply]) -> bool:
        """Record the call's response; False if it was abandoned meanwhile (then cancelled)."""
        with _CANCEL:
            self.response = response
            wanted = not self.cancelled
        if not wanted:
            response.cancel()  # type: ignore[no-untyped-call]
        return wanted

    def abandon(self) -> DeploymentResponse[Reply] | None:
        """Mark the call cancelled if no item is wanted any more (under _CANCEL); the response
        to cancel, if it was sent."""
        if self.cancelled or not all(p.abandoned for p in self.pending):
            return None
        self.cancelled = True
        return self.response


class RemoteBackend:
    """The engine's Backend, its device step a call to the device deployment.

    prepare and finish are trivial here (the replica does both, beside its device): the ingress
    only decodes, queues and answers. A replica that dies mid-call is retried once (the work is
    pure), then answered 503; Serve's router queue overflowing is our 503 with Retry-After.
    """

    def __init__(
        self,
        handle: DeploymentHandle[Any],
        info: BackendInfo,
        deadline_s: float,
        status: ClusterStatus | None = None,
        reports_caches: bool = False,
    ) -> None:
        self.handle = handle
        self.info = info
        self.deadline_s = deadline_s
        self.status = status
        self.reports_caches = reports_caches  # one backend of a set answers for every replica

    def cluster_status(self) -> dict[str, Any] | None:
        """For /readyz and `doctor` (duck-typed: the api layer knows no Ray); never blocks."""
        return None if self.status is None else self.status.snapshot()

    def prepare(
        self, image: RGBImage, params: DetectParams, image_id: str = "", check: Check = no_deadline
    ) -> Pending:
        deadline = deadline_of(check, self.deadline_s)
        return Pending(Item(image, params, image_id, deadline.remaining()), deadline.at)

    def batch_key(self, prepared: Pending, params: DetectParams) -> Hashable:
        """The replica regroups by its models' own keys; here, by pipeline and task."""
        return (params.model, isinstance(params, SegmentParams))

    def abandon(self, prepared: Pending) -> None:
        """Every client of `prepared` has gone (the engine calls this from the event loop): it is
        not sent if its batch has not left yet, and its batch's call is cancelled once no item
        in it is wanted. Any backend of the set may be told: the state lives on the item."""
        with _CANCEL:
            prepared.abandoned = True
            sent = None if prepared.call is None else prepared.call.abandon()
        if sent is not None:  # cancel() may wait on Serve's router a moment: not on the event loop
            threading.Thread(target=sent.cancel, name="ray-cancel", daemon=True).start()

    def run_batch(self, items: list[tuple[Pending, DetectParams]]) -> list[Any]:
        pending = [p for p, _ in items]
        call = self._start(pending)
        if not call.pending:
            return [abandoned() for _ in pending]
        for p in call.pending:  # what is left of each deadline now, not at prepare
            p.item.budget_s = max(0.0, p.deadline_at - time.monotonic())
        answers = self._call(call, max(p.deadline_at for p in call.pending))
        outcomes: dict[int, Any] = {id(p): abandoned() for p in pending}
        for i, p in enumerate(call.pending):
            if isinstance(answers, BaseException):
                outcomes[id(p)] = answers
            else:
                p.item.steps = answers[i].steps
                outcomes[id(p)] = answers[i].detections
        return [outcomes[id(p)] for p in pending]

    def _start(self, pending: list[Pending]) -> Call:
        """The call for the items still wanted (the abandoned ones are not sent)."""
        with _CANCEL:
            call = Call([p for p in pending if not p.abandoned])
            for p in call.pending:
                p.call = call
        return call

    def _call(self, call: Call, deadline_at: float) -> list[Answer] | BaseException:
        items = [p.item for p in call.pending]
        handle = self.handle
        affinity = affinity_id(items)
        if affinity:  # to the replica that announced it holds this image's embedding, if any
            handle = handle.options(multiplexed_model_id=affinity)
        for attempt in (1, 2):
            response = cast("DeploymentResponse[Reply]", handle.run.remote(items))
            if not call.sent(response):
                return abandoned()
            try:
                reply: Reply = response.result(timeout_s=max(0.0, deadline_at - time.monotonic()))
            except _CANCELLED:
                return abandoned()
            except BackPressureError:
                return QueueFull(
                    "every replica is busy and Serve's queue is full; retry later", RETRY_AFTER_S
                )
            except TimeoutError:
                response.cancel()  # type: ignore[no-untyped-call]
                return DeadlineExceeded(f"no result within the {self.deadline_s:g} s deadline")
            except (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError) as exc:
                log.warning("replica lost mid-request (try %d of 2): %s", attempt, type(exc).__name__)
            except RayTaskError as exc:  # our code raised in the replica: its own error, unwrapped
                cause = exc.cause
                if isinstance(cause, TunnelvisionError):
                    return cause
                raise
            else:
                if self.status is not None:
                    self.status.record(reply.replica)
                return reply.answers
        return WorkerUnavailable("a model replica was lost twice; retry shortly", RETRY_AFTER_S)

    def finish(
        self, raw: list[Detection], params: DetectParams, prepared: Pending, check: Check = no_deadline
    ) -> list[Detection]:
        return raw

    def cache_stats(self) -> dict[str, int]:
        """The replicas' embedding caches added up, as last reported (the engine adds up its
        backends' answers, so only one backend of the set gives them)."""
        if not self.reports_caches or self.status is None:
            return {}
        return self.status.cache_totals()

    def device_steps(self, prepared: Pending) -> dict[str, float]:
        return prepared.item.steps


def remote_backends(handle: DeploymentHandle[Any], settings: Settings) -> Sequence[Backend]:
    """The ingress engine's backends: a device worker per batch the replicas can hold at once."""
    info: BackendInfo = handle.info.remote().result(timeout_s=settings.deadline_s)
    workers = settings.ray_max_replicas * IN_FLIGHT_PER_REPLICA
    status = ClusterStatus(app_name(settings), [p.name for p in info.pipelines])
    status.refresh()  # the first snapshot now, so /readyz never answers without one
    return [
        RemoteBackend(
            handle, dataclasses.replace(info, device=f"ray:{i}"), settings.deadline_s, status, i == 0
        )
        for i in range(workers)
    ]


def read_cluster(app: str, pipelines: list[str]) -> dict[str, Any]:
    """What the cluster says now: our replicas by state, and its GPUs (total and free)."""
    import ray

    try:
        application = serve.status().applications.get(app)
        resources = ray.cluster_resources()  # type: ignore[no-untyped-call]
        free = ray.available_resources()  # type: ignore[no-untyped-call]
    except Exception as exc:  # any failure to ask is the answer: the cluster is not reachable
        return {"reachable": False, "error": f"{type(exc).__name__}: {exc}"[:300]}
    deployment = None if application is None else application.deployments.get(DEPLOYMENT)
    states = {} if deployment is None else {str(k): int(v) for k, v in deployment.replica_states.items()}
    return {
        "reachable": True,
        "app": app,
        "deployment": {
            "name": DEPLOYMENT,
            "status": "missing" if deployment is None else str(deployment.status),
            "pipelines": pipelines,  # each replica holds every pipeline
            "replicas": states,
            "alive": states.get("RUNNING", 0),
        },
        "gpus": {"total": float(resources.get("GPU", 0)), "free": float(free.get("GPU", 0))},
        "replica_ids": replica_ids(app),
    }


def replica_ids(app: str) -> list[str] | None:
    """The ids of our replicas that exist now (Serve names each replica's actor after its app,
    deployment and id); None if the cluster would not say."""
    import ray

    prefix = f"SERVE_REPLICA::{app}#{DEPLOYMENT}#"
    try:
        actors = ray.util.list_named_actors(all_namespaces=True)
    except Exception:  # a GCS hiccup: keep every replica's last report rather than none
        return None
    names = [str(a.get("name", "")) if isinstance(a, dict) else str(a) for a in actors]
    return sorted(name.removeprefix(prefix) for name in names if name.startswith(prefix))


class ClusterStatus:
    """A cached `read_cluster`, shared by an ingress's remote backends. A stale snapshot is
    answered at once and refreshed on a thread: asking the cluster takes a GCS round trip, or
    seconds when it is gone, and /readyz must stay instant."""

    def __init__(self, app: str, pipelines: list[str], ttl_s: float = STATUS_TTL_S) -> None:
        self.app, self.pipelines, self.ttl_s = app, pipelines, ttl_s
        self.lock = threading.Lock()
        self.latest: dict[str, Any] = {"reachable": None}
        self.at = float("-inf")
        self.refreshing = False
        self.reports: dict[str, dict[str, Any]] = {}  # replica id -> its last Reply's numbers
        self.reported_at: dict[str, float] = {}

    def record(self, report: dict[str, Any]) -> None:
        """A replica's numbers, as its reply carried them (device worker threads call this)."""
        with self.lock:
            self.reports[str(report.get("id"))] = report
            self.reported_at[str(report.get("id"))] = time.monotonic()

    def replicas(self) -> dict[str, dict[str, Any]]:
        """Each live replica's last report (those Ray no longer lists are dropped), with its age."""
        with self.lock:
            live = self.latest.get("replica_ids")
            for gone in set(self.reports) - set(live if live is not None else self.reports):
                del self.reports[gone], self.reported_at[gone]
            now = time.monotonic()
            return {
                rid: {**report, "age_s": round(now - self.reported_at[rid], 1)}
                for rid, report in sorted(self.reports.items())
            }

    def cache_totals(self) -> dict[str, int]:
        """The live replicas' embedding cache counters, added up."""
        totals: dict[str, int] = {}
        for report in self.replicas().values():
            for name, value in (report.get("cache") or {}).items():
                totals[name] = totals.get(name, 0) + int(value)
        return totals

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            stale = time.monotonic() - self.at > self.ttl_s and not self.refreshing
            if stale:
                self.refreshing = True
            age = time.monotonic() - self.at
            latest = dict(self.latest, age_s=round(age, 1) if age != float("inf") else None)
        if stale:
            threading.Thread(target=self.refresh, name="ray-status", daemon=True).start()
        latest.pop("replica_ids", None)
        latest["replica_stats"] = self.replicas()  # as last reported by each replica's replies
        return latest

    def refresh(self) -> None:
        try:
            latest = read_cluster(self.app, self.pipelines)
        finally:
            with self.lock:
                self.refreshing = False
        with self.lock:
            self.latest, self.at = latest, time.monotonic()
