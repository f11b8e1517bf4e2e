"""`tunnelvision serve --ray`: join a cluster (or start a local one), deploy, serve HTTP here."""

from __future__ import annotations

import importlib.util
import logging
import os
import secrets
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from tunnelvision.config import Settings
from tunnelvision.engine.backend import Backend

log = logging.getLogger("tunnelvision")
RAY_INSTALL = "pip install 'tunnelvision[ray]'"


def ray_environment(settings: Settings, environ: dict[str, str]) -> dict[str, str]:
    """What Ray must find in the environment before it is imported: no usage reporting; for a
    local cluster, a one-off auth token (else Ray writes one under ~/.ray) and a node that stays
    on 127.0.0.1. Joining a cluster, its token comes from the caller's RAY_AUTH_TOKEN."""
    wanted = {"RAY_USAGE_STATS_ENABLED": "0"}
    if not settings.ray_address:
        wanted["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
        if "RAY_AUTH_TOKEN" not in environ and "RAY_AUTH_MODE" not in environ:
            wanted["RAY_AUTH_TOKEN"] = secrets.token_hex(32)
    return {name: value for name, value in wanted.items() if name not in environ}


@contextmanager
def connected(settings: Settings) -> Iterator[Any]:
    """Ray connected (the local cluster started when no address is given), and left after."""
    os.environ.update(ray_environment(settings, dict(os.environ)))
    import ray
    from ray import serve

    if settings.ray_address:
        ray.init(address=settings.ray_address, log_to_driver=False)
    else:
        ray.init(include_dashboard=False, log_to_driver=False, _node_ip_address="127.0.0.1")
    try:
        # No Serve HTTP proxy: our own server (this process) is the ingress; replicas are called
        # through handles only.
        serve.start(proxy_location="Disabled", logging_config={"enable_access_log": False})
        yield ray
    finally:
        leave(settings)


def leave(settings: Settings) -> None:
    """Our replicas go; on a shared cluster, the others' stay. A local cluster stops with us."""
    import ray
    from ray import serve

    from tunnelvision.distributed.remote import app_name

    if settings.ray_address:
        try:
            serve.delete(app_name(settings))
        except Exception as exc:  # the cluster may be gone already: nothing left to delete
            log.warning("could not delete the Ray Serve app: %s", exc)
    ray.shutdown()


def serve_on_ray(settings: Settings) -> int:
    """Run the usual HTTP server, whose backends come from deploying the device deployment."""
    from tunnelvision.server import serve

    if importlib.util.find_spec("ray") is None:
        print(f"tunnelvision serve --ray: Ray is not installed: {RAY_INSTALL}", file=sys.stderr)
        return 2
    with connected(settings) as ray:
        from tunnelvision.distributed.remote import deploy, remote_backends

        def factory(_settings: Settings) -> Sequence[Backend]:
            # The server's loading phase (/readyz: 503 `loading`): serve.run returns once every
            # replica has loaded and warmed up its models, so ready means every replica is warm.
            handle = deploy(settings, float(ray.cluster_resources().get("GPU", 0)))
            return remote_backends(handle, settings)

        return serve(settings, backend_factory=factory)
