"""Shared test helpers: free ports, servers on 127.0.0.1, images, a controllable fake backend."""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import uvicorn
from PIL import Image

from tunnelvision.api.app import create_app
from tunnelvision.config import Settings
from tunnelvision.engine.backend import BackendInfo
from tunnelvision.errors import DeviceOutOfMemory
from tunnelvision.models.simulated import SimulatedBackend
from tunnelvision.schemas import DetectParams


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def make_settings(**overrides: Any) -> Settings:
    """Test settings: a free port, no warm-up; anything else as given."""
    values: dict[str, Any] = {
        "port": free_port(),
        "warmup": False,
        "deadline_s": 30.0,
        "keys_file": "/nonexistent/tunnelvision-keys.json",
        "data_dir": tempfile.mkdtemp(prefix="tunnelvision-data-"),
    }
    values.update(overrides)
    return Settings(**values)


def image_bytes(
    width: int = 64, height: int = 48, fmt: str = "PNG", mode: str = "RGB", seed: int = 0
) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 255, (height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


class WorkerKilled(BaseException):
    """Not an Exception: escapes the worker's per-task handler, ending the worker thread."""


class FakeBackend(SimulatedBackend):
    """The simulated device with failures chosen by the test through prompt words:
    'explode' raises a bug, 'oom' runs out of memory, 'die' kills the worker, 'slow' sleeps."""

    def __init__(self, cost_s: float = 0.0, slow_s: float = 1.0) -> None:
        super().__init__()
        self.info = BackendInfo("fake-detector", "fake-segmenter", "cpu", "float32")
        self.cost_s = cost_s
        self.slow_s = slow_s
        self.executed = 0
        self.started = threading.Event()

    def batch_key(self, prepared: Any, params: DetectParams) -> None:
        return None  # one at a time: the tests count executions

    def run_batch(self, items: list[tuple[Any, DetectParams]]) -> list[Any]:
        return [self.run(prepared, params) for prepared, params in items]

    def run(self, prepared: Any, params: DetectParams) -> Any:
        self.executed += 1
        self.started.set()
        words = set(" ".join(params.phrases).split())
        if "explode" in words:
            raise RuntimeError("secret internal detail /etc/passwd")
        if "oom" in words:
            raise DeviceOutOfMemory("the GPU ran out of memory", 7.0)
        if "die" in words:
            raise WorkerKilled()
        time.sleep(self.slow_s if "slow" in words else self.cost_s)  # releases the GIL
        return prepared


_IN_PROCESS: dict[str, Any] = {}  # url -> AppState of the ThreadServers running now


class ThreadServer:
    """The real app under a real uvicorn on a free 127.0.0.1 port, in a thread of this process."""

    def __init__(self, settings: Settings, backend: Any) -> None:
        self.app = create_app(settings, lambda _settings: [backend])
        self.state = self.app.state.tunnelvision
        self.port = settings.port
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            timeout_keep_alive=settings.keep_alive_s,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        _IN_PROCESS[self.url] = self.state
        wait_until_ready(self.url)
        return self

    def __exit__(self, *exc: object) -> None:
        _IN_PROCESS.pop(self.url, None)
        self.server.should_exit = True
        self.thread.join(30)


def stats(url: str) -> dict[str, Any]:
    """The scheduler's counters: read in-process from a ThreadServer, else from /metrics (open on
    `cli_server`s, which have no keys and no rate limit; /readyz shows them only with a key)."""
    if url in _IN_PROCESS:
        counters: dict[str, Any] = _IN_PROCESS[url].stats()
        return counters
    from prometheus_client.parser import text_string_to_metric_families

    names = {
        "tunnelvision_queue_depth": "queued",
        "tunnelvision_running": "running",
        "tunnelvision_batch_size_count": "batches",  # one observation per device pass
        "tunnelvision_batch_size_sum": "batched_items",
    }
    counters = {}
    text = httpx.get(f"{url}/metrics", timeout=10).raise_for_status().text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tunnelvision_tasks_total":
                counters[sample.labels["outcome"]] = int(sample.value)
            elif sample.name in names:
                counters[names[sample.name]] = int(sample.value)
    return counters


def wait_for(condition: Any, timeout_s: float = 20) -> None:
    end = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < end, "condition not met in time"
        time.sleep(0.02)


def wait_until_ready(
    url: str, timeout_s: float = 60.0, process: subprocess.Popen[bytes] | None = None
) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"{url} not ready after {timeout_s} s")


def send_and_hang_up(url: str, image: bytes) -> None:
    """A client that sends a whole request, then goes away before the answer."""
    host, port = url.removeprefix("http://").split(":")
    boundary = "tvboundary"
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="prompt"\r\n\r\ncat\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="i.png"\r\n'
            f"Content-Type: image/png\r\n\r\n"
        ).encode()
        + image
        + f"\r\n--{boundary}--\r\n".encode()
    )
    head = (
        f"POST /v1/segment HTTP/1.1\r\nHost: {host}\r\nContent-Length: {len(body)}\r\n"
        f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n"
    ).encode()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head + body)
        time.sleep(0.3)  # let the server parse it and queue it


@contextmanager
def cli_server(
    detector: Path, segmenter: Path, *extra: str, env: dict[str, str] | None = None, log: Path | None = None
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """`tunnelvision serve` as a subprocess, exactly as a user starts it."""
    import os
    import sys

    port = free_port()
    command = [
        sys.executable,
        "-m",
        "tunnelvision.cli",
        "serve",
        "--detector",
        str(detector),
        "--segmenter",
        str(segmenter),
        "--port",
        str(port),
        "--keys-file",
        "/nonexistent/tunnelvision-keys.json",
        "--rate-limit-per-minute",  # limits have their own tests; here they would only interfere
        "0",
        "--max-inflight-per-client",
        "0",
        "--data-dir",
        tempfile.mkdtemp(prefix="tunnelvision-data-"),
        "--max-batch",  # queue tests count requests one by one; batching tests pass their own
        "1",
        "--log-level",
        "warning",
        *extra,
    ]
    output = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115
    process = subprocess.Popen(
        command, stdout=output, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})}
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_ready(url, process=process)
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(10)


class JwksServer:
    """A Cloudflare Access certs endpoint on 127.0.0.1 whose keys the test can rotate."""

    def __init__(self) -> None:
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.keys: dict[str, Any] = {}  # kid -> private key
        self.fetches = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.fetches += 1
                body = json.dumps(outer.jwks()).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/cdn-cgi/access/certs"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def add_key(self, kid: str) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.keys[kid] = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwks(self) -> dict[str, Any]:
        import json

        from jwt.algorithms import RSAAlgorithm

        keys = []
        for kid, private in self.keys.items():
            jwk = json.loads(RSAAlgorithm.to_jwk(private.public_key()))
            keys.append({**jwk, "kid": kid, "alg": "RS256", "use": "sig"})
        return {"keys": keys}

    def token(
        self,
        kid: str,
        team: str = "team",
        aud: str = "aud-tag",
        expires_in: float = 300,
        email: str = "ana@example.com",
        private: Any = None,
    ) -> str:
        import jwt

        now = int(time.time())
        claims = {
            "iss": f"https://{team}.cloudflareaccess.com",
            "aud": [aud],
            "email": email,
            "sub": "user-id",
            "iat": now,
            "exp": now + int(expires_in),
        }
        return jwt.encode(claims, private or self.keys[kid], algorithm="RS256", headers={"kid": kid})

    def close(self) -> None:
        self.httpd.shutdown()


REPO = Path(__file__).resolve().parent.parent
VENV_CACHE = Path(os.environ.get("TUNNELVISION_TEST_VENVS", Path.home() / ".cache" / "tunnelvision-tests"))


def client_venv(
    name: str, requirements: list[str], *, with_project: bool = False, interpreter: str | None = None
) -> Path:
    """The python of a venv of its own, for a real client whose pins are not ours (Label Studio,
    inference-sdk) or for our base install. Made once per requirement set and kept in
    VENV_CACHE; with `with_project`, this checkout is installed into it (without extras) on
    every call, so the test sees today's code as a user's `pip install` would. `interpreter`:
    another Python to build it with (e.g. the oldest one we claim), instead of this one."""
    import fcntl
    import hashlib
    import sys

    pyproject = (REPO / "pyproject.toml").read_text() if with_project else ""
    base = interpreter or sys.executable
    inputs = "\n".join([*([interpreter] if interpreter else []), sys.version, *requirements, pyproject])
    folder = VENV_CACHE / f"{name}-{hashlib.sha256(inputs.encode()).hexdigest()[:12]}"
    python = folder / "bin" / "python"
    VENV_CACHE.mkdir(parents=True, exist_ok=True)
    with open(VENV_CACHE / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others then reuse it
        if not (folder / "ready").exists():
            shutil.rmtree(folder, ignore_errors=True)
            made = subprocess.run([base, "-m", "venv", folder], capture_output=True, text=True, timeout=300)
            assert made.returncode == 0, f"{base} -m venv failed: {made.stderr[-2000:]}"
            project = [str(REPO)] if with_project else []
            _pip(python, "install", "--quiet", *requirements, *project)
            (folder / "ready").touch()
        elif with_project:
            _pip(python, "install", "--quiet", "--no-deps", "--force-reinstall", str(REPO))
    return python


def _pip(python: Path, *args: str) -> None:
    done = subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"pip {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"


def run_tunnelvision(
    *args: str,
    env: dict[str, str] | None = None,
    inherit_settings: bool = True,
    timeout: float = 60,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """The `tunnelvision` CLI as a user runs it. Its keys file and data folder point nowhere unless
    `env` says otherwise; `inherit_settings=False` also drops the shell's TUNNELVISION_* variables."""
    import sys

    inherited = {k: v for k, v in os.environ.items() if inherit_settings or not k.startswith("TUNNELVISION_")}
    environment = {
        **inherited,
        "TUNNELVISION_KEYS_FILE": "/nonexistent/keys.json",
        "TUNNELVISION_DATA_DIR": "/nonexistent/data",  # no `up` state but the test's own
        **(env or {}),
    }
    return subprocess.run(
        [sys.executable, "-m", "tunnelvision.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd,
        env=environment,
    )


@contextmanager
def keyed_cli_server(
    models: tuple[Path, Path], folder: Path, key_name: str, *extra: str
) -> Iterator[tuple[str, str]]:
    """`cli_server` with a keys file holding one `predict` key: (url, key)."""
    from tunnelvision.security.keys import KeyStore

    keys = folder / "keys.json"
    key = KeyStore(keys).add(key_name, ["predict"])
    with cli_server(*models, "--no-warmup", "--keys-file", str(keys), *extra) as (url, _):
        yield url, key


@contextmanager
def video_cli_server(
    models: tuple[Path, Path], folder: Path, *scopes: list[str]
) -> Iterator[tuple[str, list[str]]]:
    """`cli_server` with a `track` pipeline (a tiny random sam2-video checkpoint) and a keys file
    holding one key per `scopes` list: (url, keys in that order)."""
    from tunnelvision.models.random_families import write_random_family
    from tunnelvision.security.keys import KeyStore

    tracker = write_random_family(folder / "sam2-video", "sam2-video", "tiny", seed=1)
    store = KeyStore(folder / "keys.json")
    keys = [store.add(f"key{i}", list(key_scopes)) for i, key_scopes in enumerate(scopes)]
    flags = ("--no-warmup", "--keys-file", str(store.path), "--pipeline", f"track={tracker}")
    with cli_server(*models, *flags) as (url, _):
        yield url, keys
