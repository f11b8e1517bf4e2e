"""`tunnelvision doctor`: why does the public URL fail? Each check says ✓ or ✗ and what to do."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import yaml

from tunnelvision.config import CLOUDFLARED_KEEPALIVE_S, Settings
from tunnelvision.exposure import auth_configured, is_loopback
from tunnelvision.security.keys import KeyStore
from tunnelvision.tunnel.config import ingress_problems, is_remote_origin
from tunnelvision.tunnel.quick import INSTALL_HINT
from tunnelvision.tunnel.systemd import ENV_FILE
from tunnelvision.tunnel.up import UpState, pid_alive

METRICS_PORTS = range(20241, 20246)  # where cloudflared puts its metrics server by default
CONFIG_PATHS = [
    Path("~/.cloudflared/config.yml"),
    Path("/etc/cloudflared/config.yml"),
    Path("/usr/local/etc/cloudflared/config.yml"),
]


@dataclass
class Check:
    name: str
    ok: bool | None  # None: not applicable here (skipped)
    detail: str
    remedy: str = ""


@dataclass
class DoctorOptions:
    port: int | None  # None: the settings' (or `tunnelvision up`'s) port
    public_url: str | None = None
    metrics: str | None = None  # host:port of cloudflared's metrics server
    config: Path | None = None
    settings: Settings = field(default_factory=Settings)
    up: UpState | None = None  # what `tunnelvision up` runs, from its state file
    service_env: Path | None = Path(ENV_FILE)  # the systemd unit's settings, when installed
    key: str | None = None  # for the live probes (--key; else TUNNELVISION_API_KEY)


def resolve(options: DoctorOptions) -> DoctorOptions:
    """Fill what was not given: from `tunnelvision up`'s state when it runs here, else settings."""
    up, settings = options.up, options.settings
    if up is None or not pid_alive(up.pid):
        settings = service_settings(settings, options.service_env)
        return replace(options, port=options.port or settings.port, settings=settings)
    return DoctorOptions(
        options.port or up.port,
        options.public_url or up.public_url,
        options.metrics or up.metrics,
        options.config,
        settings.model_copy(update={"keys_file": Path(up.keys_file), "port": up.port}),
        up,
        options.service_env,
        options.key,
    )


def probe_key(options: DoctorOptions, environ: dict[str, str] | None = None) -> str | None:
    """The key the live probes send: --key, else TUNNELVISION_API_KEY; None for neither."""
    found = options.key or (os.environ if environ is None else environ).get("TUNNELVISION_API_KEY")
    return found or None


def service_settings(settings: Settings, env_file: Path | None) -> Settings:
    """The settings the systemd service runs with: its environment file's values over ours (a
    doctor run from a login shell does not see the service's environment)."""
    values = read_env_file(env_file) if env_file is not None else {}
    prefix = "TUNNELVISION_"
    named = {name.removeprefix(prefix).lower(): v for name, v in values.items() if name.startswith(prefix)}
    fields = {name: value for name, value in named.items() if name in Settings.model_fields}
    if not fields:
        return settings
    try:
        return Settings(**{**settings.model_dump(exclude_unset=True), **fields})
    except ValueError:  # a bad value there is the service's own start-up error; judge ours
        return settings


def read_env_file(path: Path) -> dict[str, str]:
    """NAME=value lines as systemd's EnvironmentFile= reads them (quotes removed); {} if unreadable."""
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError):
        return {}
    values = {}
    for line in text.splitlines():
        name, equals, value = line.strip().partition("=")
        if equals and name and not name.startswith(("#", ";")):
            try:
                words = shlex.split(value)
            except ValueError:
                continue
            values[name.strip()] = " ".join(words)
    return values


def run_checks(options: DoctorOptions) -> list[Check]:
    options = resolve(options)
    port = options.port or options.settings.port
    quick = options.up is not None and pid_alive(options.up.pid)  # no service, no config.yml
    checks = [check_up(options.up)] if options.up else []
    key = probe_key(options)
    checks += check_local_server(port, key)
    ray = check_ray(port, key)
    checks += [ray] if ray is not None else []
    settings = options.settings
    checks += [
        check_keep_alive(settings),
        check_bind(settings),
        check_auth(settings, port),
        check_keys_file(settings),
    ]
    checks.append(check_cloudflared_installed())
    if not quick:
        checks.append(check_cloudflared_service())
    checks.append(check_cloudflared_ready(options.metrics))
    if not quick:
        checks.append(check_config(options.config, port))
    if options.public_url:
        checks.append(check_public_url(options.public_url, port))
    return checks


# -- `tunnelvision up` -------------------------------------------------------------------------


def check_up(up: UpState) -> Check:
    if not pid_alive(up.pid):
        return Check(
            "up",
            False,
            f"`tunnelvision up` (pid {up.pid}) is gone but left its state file behind",
            "start it again with `tunnelvision up` (that replaces the file; a quick tunnel's URL "
            "changes at every start)",
        )
    where = up.public_url or "a quick tunnel still starting"
    return Check(
        "up",
        True,
        f"`tunnelvision up` (pid {up.pid}) publishes {up.origin} at {where} "
        f"(API pid {up.api_pid}, cloudflared pid {up.tunnel_pid})",
    )


# -- the local API ---------------------------------------------------------------------------


def check_local_server(port: int, key: str | None = None) -> list[Check]:
    """/healthz, then /readyz (with the key, the reason it gives is the full one)."""
    base = f"http://127.0.0.1:{port}"
    try:
        health = httpx.get(f"{base}/healthz", timeout=3)
    except httpx.HTTPError:
        return [
            Check(
                "api",
                False,
                f"nothing answers on {base}: through the tunnel, visitors get Cloudflare's 502 Bad Gateway",
                "start it: `tunnelvision serve` (or `sudo systemctl start tunnelvision`); check --port",
            )
        ]
    if health.status_code != 200:
        return [Check("api", False, f"{base}/healthz answered {health.status_code}", "is this tunnelvision?")]
    ready = httpx.get(f"{base}/readyz", headers=_bearer(key), timeout=3)
    if ready.status_code == 200:
        return [Check("api", True, f"{base} is up and ready")]
    reason = _error_message(ready)
    return [
        Check(
            "api",
            False,
            f"{base} is up but not ready: {reason}",
            "wait for the models to load, or read the server log for the load error",
        )
    ]


def check_ray(port: int, key: str | None) -> Check | None:
    """Ray mode (`serve --ray`), from the server's /readyz: its `ray` section reaches callers
    with a key (--key or TUNNELVISION_API_KEY), its one-word reason anyone. None when nothing
    answers (the api check says so already)."""
    try:
        response = httpx.get(f"http://127.0.0.1:{port}/readyz", headers=_bearer(key), timeout=3)
        body = response.json()
    except (httpx.HTTPError, ValueError):
        return None
    return ray_check(body if isinstance(body, dict) else {}, keyed=bool(key))


def _bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def ray_check(readyz: dict[str, Any], keyed: bool) -> Check:
    """Judge /readyz's answer: cluster reachable, replicas alive (they hold every pipeline), GPUs."""
    ray = readyz.get("ray")
    if not isinstance(ray, dict):
        return _ray_by_reason(readyz.get("reason"), keyed and "phase" in readyz)
    if ray.get("reachable") is False:
        return Check(
            "ray",
            False,
            f"the server cannot reach its Ray cluster: {ray.get('error', 'no answer')}",
            "is the cluster up (`ray status --address ...` on its head node)? the server's "
            "--ray-address must name it",
        )
    if ray.get("reachable") is None:
        return Check("ray", None, "the server has not heard from its Ray cluster yet")
    deployment = ray.get("deployment") or {}
    replicas = deployment.get("replicas") or {}
    states = ", ".join(f"{count} {state.lower()}" for state, count in replicas.items()) or "none"
    pipelines = ", ".join(deployment.get("pipelines") or []) or "?"
    gpus = ray.get("gpus") or {}
    seen = f"{gpus.get('total', 0):g} GPU(s) in the cluster, {gpus.get('free', 0):g} free"
    if not deployment.get("alive"):
        return Check(
            "ray",
            False,
            f"cluster reachable, but no replica of {ray.get('app', '?')} is alive (replicas: {states}; "
            f"pipelines {pipelines}); {seen}",
            "Ray restarts a lost replica within seconds; if none comes up, the replicas fail to "
            "start or to find a GPU: read the Serve logs (session_latest/logs/serve in Ray's temp dir)",
        )
    return Check(
        "ray",
        True,
        f"cluster reachable; {deployment['alive']} replica(s) alive ({states}) serving {pipelines}; {seen}",
    )


def _ray_by_reason(reason: Any, detailed: bool) -> Check:
    """No `ray` section: not Ray mode (a keyed answer would have one), or no key to ask with."""
    if reason == "no_replicas":
        return Check(
            "ray",
            False,
            "the server runs on Ray and no model replica is alive",
            "Ray restarts a lost replica within seconds; pass --key (or set TUNNELVISION_API_KEY) "
            "to see their states",
        )
    if reason == "cluster_unreachable":
        return Check(
            "ray",
            False,
            "the server cannot reach its Ray cluster",
            "is the cluster up? pass --key (or set TUNNELVISION_API_KEY) to see the error",
        )
    if detailed:
        return Check("ray", None, "not in Ray mode (the server runs its models itself)")
    return Check(
        "ray",
        None,
        "no replica problem reported; pass --key (or set TUNNELVISION_API_KEY) to see Ray's state "
        "(--ray only)",
    )


def check_keep_alive(settings: Settings) -> Check:
    if settings.keep_alive_s > CLOUDFLARED_KEEPALIVE_S:
        return Check(
            "keep-alive", True, f"{settings.keep_alive_s} s, above cloudflared's {CLOUDFLARED_KEEPALIVE_S} s"
        )
    return Check(
        "keep-alive",
        False,
        f"{settings.keep_alive_s} s is not above cloudflared's "
        f"{CLOUDFLARED_KEEPALIVE_S} s pool: expect sporadic 502s",
        "set --keep-alive-s 120",
    )


def check_bind(settings: Settings) -> Check:
    if is_loopback(settings.host):
        return Check("bind", True, f"{settings.host}: reachable only through the tunnel")
    return Check(
        "bind",
        auth_configured(settings),
        f"{settings.host}: reachable from the network too",
        "bind to 127.0.0.1 unless other hosts must call it directly",
    )


def check_auth(settings: Settings, port: int) -> Check:
    """Judged by the running server when one answers: an anonymous call refused with 401 proves
    it checks callers, whatever this shell's settings say; else by the settings."""
    try:
        anonymous = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=3).status_code
    except httpx.HTTPError:
        anonymous = None
    if anonymous == 401:
        return Check("auth", True, f"the server on port {port} refuses calls without credentials (401)")
    if anonymous == 200:
        return Check(
            "auth",
            False,
            f"the server on port {port} answers calls without any key: through the tunnel anyone "
            "can use your GPU",
            f"`tunnelvision keys add NAME --keys-file {settings.keys_file}` (the file the server reads), "
            "or start it with --auth keys; or put the hostname behind Cloudflare Access",
        )
    return _auth_by_settings(settings)


def _auth_by_settings(settings: Settings) -> Check:
    kinds = [
        k
        for k, on in (
            ("API keys", settings.keys_configured),
            ("Cloudflare Access", settings.access_configured),
        )
        if on
    ]
    if kinds:
        return Check("auth", True, " and ".join(kinds))
    return Check(
        "auth",
        False,
        "no authentication: through the tunnel anyone can use your GPU",
        "`tunnelvision keys add NAME`, or put the hostname behind Cloudflare Access",
    )


def check_keys_file(settings: Settings) -> Check:
    store = KeyStore(settings.keys_file)
    keys_required = settings.auth in ("keys", "both")
    if not store.present():
        if keys_required:
            return Check(
                "keys file",
                False,
                f"{store.path} does not exist and auth={settings.auth}: every request gets 401",
                "`tunnelvision keys add NAME`",
            )
        return Check("keys file", None, f"none at {store.path} (API keys are off)")
    problem = store.problem()
    if problem is not None:
        return Check(
            "keys file",
            False,
            problem,
            "fix or restore it (`tunnelvision keys list` reads it); until then a running server keeps "
            "the keys it read last, and a new one accepts none",
        )
    count = len(store.entries())
    if count == 0:
        return Check(
            "keys file",
            False,
            f"{store.path} holds no keys: every request gets 401",
            "`tunnelvision keys add NAME`",
        )
    return Check("keys file", True, f"{store.path}: {count} key(s)")


# -- cloudflared -----------------------------------------------------------------------------


def check_cloudflared_installed() -> Check:
    binary = shutil.which("cloudflared")
    if binary is None:  # not a failure by itself: it may run in Docker (deploy/compose.yaml)
        return Check("cloudflared", None, "not installed on this host (fine if it runs in a container)")
    result = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=10, check=False)
    return Check("cloudflared", True, (result.stdout or result.stderr).strip().splitlines()[0])


def check_cloudflared_service(run: Callable[..., Any] = subprocess.run) -> Check:
    if shutil.which("systemctl") is None or shutil.which("cloudflared") is None:
        return Check("cloudflared service", None, "no systemd-managed cloudflared on this host")
    result = run(
        ["systemctl", "is-active", "cloudflared"], capture_output=True, text=True, timeout=10, check=False
    )
    state = result.stdout.strip() or "unknown"
    if "not been booted with systemd" in result.stderr:
        return Check("cloudflared service", None, "systemd is not running here")
    if state == "active":
        return Check("cloudflared service", True, "active")
    return Check(
        "cloudflared service",
        False,
        f"cloudflared.service is {state}",
        "`sudo cloudflared service install <TOKEN>` (dashboard tunnels) or "
        "`sudo systemctl start cloudflared`; `journalctl -u cloudflared` says why it stopped",
    )


def check_cloudflared_ready(metrics: str | None) -> Check:
    candidates = [metrics] if metrics else [f"127.0.0.1:{port}" for port in METRICS_PORTS]
    for address in candidates:
        try:
            response = httpx.get(f"http://{address}/ready", timeout=2)
        except httpx.HTTPError:
            continue
        return _readiness(address, response)
    remedy = (
        "cloudflared is not running, or runs without --metrics (add `metrics: 127.0.0.1:20241` "
        "to config.yml, or pass --metrics to doctor)"
    )
    if shutil.which("cloudflared") is None:
        remedy += f"; to run it on this host, {INSTALL_HINT}"
    return Check("tunnel connection", False, f"no cloudflared metrics at {', '.join(candidates)}", remedy)


def _readiness(address: str, response: httpx.Response) -> Check:
    try:
        connections = int(response.json().get("readyConnections", 0))
    except (ValueError, AttributeError):
        connections = 0
    if response.status_code == 200 and connections > 0:
        return Check("tunnel connection", True, f"{connections} connection(s) to Cloudflare's edge")
    return Check(
        "tunnel connection",
        False,
        f"cloudflared ({address}) has no connection to Cloudflare's edge: visitors get error 1033",
        "check outbound access to port 7844; `journalctl -u cloudflared`; if it says "
        "'failed to dial to edge with quic', run cloudflared with --protocol http2",
    )


def check_config(path: Path | None, port: int) -> Check:
    found = path or next((p.expanduser() for p in CONFIG_PATHS if p.expanduser().is_file()), None)
    if found is None:
        return Check(
            "config.yml", None, "none found (a dashboard/token tunnel keeps its routes at Cloudflare)"
        )
    try:
        config = yaml.safe_load(found.read_text())
    except (OSError, yaml.YAMLError) as exc:
        return Check("config.yml", False, f"{found}: cannot be read: {exc}", "fix the YAML")
    problems, remote = config_problems(config, port)
    if problems:
        return Check(
            "config.yml",
            False,
            f"{found}: " + "; ".join(problems),
            f"regenerate it: `tunnelvision tunnel config --port {port} ...` (or --origin URL)",
        )
    if remote:
        where = ", ".join(remote)
        return Check(
            "config.yml",
            True,
            f"{found}: routes to {where} (another machine: run doctor there for its API), catch-all last",
        )
    return Check("config.yml", True, f"{found}: routes to port {port}, catch-all last")


def config_problems(config: Any, port: int) -> tuple[list[str], list[str]]:
    """(problems, remote origins): `ingress_problems`, where a rule to an API on another machine
    (`tunnel config --origin URL`) counts as routing to the API, as a rule to this port does."""
    return ingress_problems(config, port, remote_ok=True), remote_origins(config)


def remote_origins(config: Any) -> list[str]:
    """The ingress services that are an http(s)://HOST:PORT origin on another machine."""
    rules = config.get("ingress") if isinstance(config, dict) else None
    services = [str(r.get("service", "")) for r in rules or [] if isinstance(r, dict)]
    return [s for s in services if is_remote_origin(s)]


# -- the public URL --------------------------------------------------------------------------


def check_public_url(url: str, port: int) -> Check:
    if not url.startswith(("https://", "http://")):
        return Check(
            "public URL",
            False,
            f"'{url}' has no scheme, so it cannot be fetched",
            f"give the whole URL: --public-url https://{url.split('://')[-1]}",
        )
    target = url.rstrip("/") + "/healthz"
    try:
        response = httpx.get(target, timeout=20, follow_redirects=False)
    except httpx.HTTPError as exc:
        return Check(
            "public URL",
            False,
            f"{target}: {type(exc).__name__}: {exc}",
            "check the hostname's DNS record (a CNAME to <UUID>.cfargotunnel.com) and spelling",
        )
    return classify_public_answer(target, response, port)


def classify_public_answer(target: str, response: httpx.Response, port: int) -> Check:
    status, body = response.status_code, response.text[:2000]
    if status == 200:
        return Check("public URL", True, f"{target} answers 200")
    if status == 530 or "1033" in body:
        return Check(
            "public URL",
            False,
            f"{target}: {status} / error 1033: Cloudflare cannot reach the tunnel",
            "cloudflared is not running or not connected: see the cloudflared checks above",
        )
    if status == 502:
        return Check(
            "public URL",
            False,
            f"{target}: 502: the tunnel is up but the API did not answer",
            f"is tunnelvision running on 127.0.0.1:{port}, and does the ingress service point there?",
        )
    if status == 524:
        return Check(
            "public URL",
            False,
            f"{target}: 524: the API took longer than Cloudflare's 125 s",
            "keep --deadline-s under 125; look for a stuck device in the server log",
        )
    if status in (401, 403):
        return Check(
            "public URL",
            False,
            f"{target}: {status}: refused before reaching the API "
            "(tunnelvision's /healthz is public, so this is Cloudflare Access or a WAF rule)",
            "add an Access bypass policy for /healthz, or test with a service token",
        )
    if status == 404:
        return Check(
            "public URL",
            False,
            f"{target}: 404: the hostname is not routed to the API",
            "the ingress rule's hostname must match the URL exactly",
        )
    return Check("public URL", False, f"{target}: unexpected {status}", "see the server and cloudflared logs")


# -- output ----------------------------------------------------------------------------------


def render(checks: list[Check], as_json: bool) -> str:
    if as_json:
        return json.dumps({"ok": all_ok(checks), "checks": [asdict(c) for c in checks]}, indent=2)
    lines = []
    for check in checks:
        mark = {True: "✓", False: "✗", None: "-"}[check.ok]
        lines.append(f"{mark} {check.name}: {check.detail}")
        if check.ok is False and check.remedy:
            lines.append(f"    → {check.remedy}")
    return "\n".join(lines)


def all_ok(checks: list[Check]) -> bool:
    return all(check.ok is not False for check in checks)


def _error_message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return f"status {response.status_code}"
