"""The device deployment on Ray Serve, and the engine backend that calls it (imports Ray).

Each replica loads the models once (`models.factory.build_backends`, one device) and answers
batches of `work.Item`s. The ingress engine holds `RemoteBackend`s: one per request a replica
may run at once, times the most replicas, so its device workers keep every replica busy.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import threading
import time
from collections.abc import Hashable, Sequence
from typing import Any, cast

from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from tunnelvision.config import Settings
from tunnelvision.distributed.work import Answer, DeviceLock, Item, deadline_of, run_items
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


class DeviceReplica:
    """One copy of the models on one device (a GPU where the replica got one)."""

    def __init__(self, settings: Settings, device: str) -> None:
        from tunnelvision.models.factory import build_backends

        self.backend: Backend = build_backends(settings.model_copy(update={"device": device}))[0]
        self.device = DeviceLock()

    def info(self) -> BackendInfo:
        return self.backend.info

    def pid(self) -> int:
        """For tests and `doctor`: Ray's state API needs the dashboard, this does not."""
        return os.getpid()

    async def run(self, items: list[Item]) -> list[Answer]:
        for item in items:  # Ray hands arrays over read-only (zero-copy); the processors may write
            if not item.image.flags.writeable:
                item.image = item.image.copy()
        # A thread, so the replica's event loop keeps taking (and cancelling) requests meanwhile.
        return await asyncio.to_thread(run_items, self.backend, items, self.device)


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


def app_name(settings: Settings) -> str:
    """One Serve application per server (its port), so two servers can share a cluster."""
    return f"{APP_NAME}-{settings.port}"


@dataclasses.dataclass
class Pending:
    """What prepare hands the ingress scheduler: the item to send, and its deadline."""

    item: Item
    deadline_at: float


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
    ) -> None:
        self.handle = handle
        self.info = info
        self.deadline_s = deadline_s
        self.status = status

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

    def run_batch(self, items: list[tuple[Pending, DetectParams]]) -> list[Any]:
        pending = [p for p, _ in items]
        for p in pending:  # what is left of each deadline now, not at prepare
            p.item.budget_s = max(0.0, p.deadline_at - time.monotonic())
        answers = self._call([p.item for p in pending], max(p.deadline_at for p in pending))
        if isinstance(answers, BaseException):
            return [answers] * len(pending)
        for p, answer in zip(pending, answers, strict=True):
            p.item.steps = answer.steps
        return [answer.detections for answer in answers]

    def _call(self, items: list[Item], deadline_at: float) -> list[Answer] | BaseException:
        for attempt in (1, 2):
            response = cast("DeploymentResponse[list[Answer]]", self.handle.run.remote(items))
            try:
                answers: list[Answer] = response.result(timeout_s=max(0.0, deadline_at - time.monotonic()))
                return answers
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
        return WorkerUnavailable("a model replica was lost twice; retry shortly", RETRY_AFTER_S)

    def finish(
        self, raw: list[Detection], params: DetectParams, prepared: Pending, check: Check = no_deadline
    ) -> list[Detection]:
        return raw

    def cache_stats(self) -> dict[str, int]:
        return {}  # each replica keeps its own embedding cache (not yet reported across the hop)

    def device_steps(self, prepared: Pending) -> dict[str, float]:
        return prepared.item.steps


def remote_backends(handle: DeploymentHandle[Any], settings: Settings) -> Sequence[Backend]:
    """The ingress engine's backends: a device worker per batch the replicas can hold at once."""
    info: BackendInfo = handle.info.remote().result(timeout_s=settings.deadline_s)
    workers = settings.ray_max_replicas * IN_FLIGHT_PER_REPLICA
    status = ClusterStatus(app_name(settings), [p.name for p in info.pipelines])
    status.refresh()  # the first snapshot now, so /readyz never answers without one
    return [
        RemoteBackend(handle, dataclasses.replace(info, device=f"ray:{i}"), settings.deadline_s, status)
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
    }


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

    def snapshot(self) -> dict[str, Any]:
        with self.lock:
            stale = time.monotonic() - self.at > self.ttl_s and not self.refreshing
            if stale:
                self.refreshing = True
            age = time.monotonic() - self.at
            latest = dict(self.latest, age_s=round(age, 1) if age != float("inf") else None)
        if stale:
            threading.Thread(target=self.refresh, name="ray-status", daemon=True).start()
        return latest

    def refresh(self) -> None:
        try:
            latest = read_cluster(self.app, self.pipelines)
        finally:
            with self.lock:
                self.refreshing = False
        with self.lock:
            self.latest, self.at = latest, time.monotonic()
