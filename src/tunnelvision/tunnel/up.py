"""`tunnelvision up`: the API, its first key and a quick tunnel from one command; Ctrl-C stops both.

Both run as child processes in sessions of their own, so the terminal's Ctrl-C reaches only this
supervisor, which then ends the tunnel first (no new public traffic) and the API second, each by its
own pid. On Linux the children also get SIGTERM if the supervisor itself dies. While it runs, a
state file in the data folder tells `tunnelvision doctor` the URL, the pids and the ports.
"""

from __future__ import annotations

import collections
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any, TextIO

import httpx

from tunnelvision.config import Settings
from tunnelvision.exposure import UnsafeExposure, require_auth_for_publishing
from tunnelvision.files import write_atomic
from tunnelvision.security.keys import KeyCommandError, KeyStore
from tunnelvision.tunnel.quick import INSTALL_HINT, LIMITS, URL_PATTERN, config_file_warning

STATE_FILE = "up.json"
FIRST_KEY_NAME = "first"
TUNNEL_GRACE_S = 10.0
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class Stop(BaseException):
    """Ctrl-C or SIGTERM reached the supervisor (a BaseException, like KeyboardInterrupt, so no
    `except Exception` on the way swallows it)."""


@dataclass(frozen=True)
class UpState:
    """What `up` is running, for `doctor`."""

    pid: int  # the supervisor
    api_pid: int
    tunnel_pid: int
    port: int
    origin: str  # where cloudflared sends requests
    metrics: str  # cloudflared's metrics server, host:port
    keys_file: str
    public_url: str | None = None
    started: str = ""


def state_path(data_dir: Path) -> Path:
    return data_dir.expanduser() / STATE_FILE


def read_state(data_dir: Path) -> UpState | None:
    """The state `up` left in `data_dir`, if any (even a stale one: doctor says so)."""
    try:
        data = json.loads(state_path(data_dir).read_text())
        return UpState(**data)
    except (OSError, ValueError, TypeError):
        return None


def write_state(data_dir: Path, state: UpState) -> None:
    path = state_path(data_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(asdict(state), indent=2).encode())


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


# -- before anything starts --------------------------------------------------------------------


def ensure_first_key(settings: Settings) -> str | None:
    """Create a key when none is stored and keys can be used; return it (its only showing)."""
    if settings.auth == "access":
        return None
    store = KeyStore(settings.keys_file)
    if store.entries():
        return None
    return store.add(FIRST_KEY_NAME)


ANY_ADDRESS = frozenset({"0.0.0.0", "::", "", "localhost"})  # noqa: S104 (names, not a bind)


def local_origin(settings: Settings) -> str:
    """Where cloudflared reaches the API: loopback when it listens everywhere."""
    host = "127.0.0.1" if settings.host in ANY_ADDRESS else settings.host
    return f"http://[{host}]:{settings.port}" if ":" in host else f"http://{host}:{settings.port}"


def serve_command(overrides: Mapping[str, Any]) -> list[str]:
    """`tunnelvision serve` with the flags `up` was given (the same parser reads them)."""
    command = [sys.executable, "-m", "tunnelvision.cli", "serve"]
    for name, value in overrides.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            command.append(flag if value else "--no-" + flag[2:])
        else:
            command.append(f"{flag}={value}")  # one word: a value starting with "-" stays a value
    return command


def tunnel_command(binary: str, origin: str, metrics: str) -> list[str]:
    return [binary, "tunnel", "--no-autoupdate", "--metrics", metrics, "--url", origin]


def free_local_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- the children ------------------------------------------------------------------------------


def _parent_death_signal() -> Callable[[], None] | None:
    """A preexec_fn that asks Linux to SIGTERM the child when this process dies (no orphans
    even after a SIGKILL). Resolved here, in the parent: the forked child only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_death_signal() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    return set_death_signal


def start_child(command: list[str], **options: Any) -> subprocess.Popen[str]:
    return subprocess.Popen(
        command,
        start_new_session=True,  # the terminal's Ctrl-C is the supervisor's to hand on
        preexec_fn=_parent_death_signal(),  # safe: no other thread runs yet
        text=True,
        **options,
    )


def stop_child(process: subprocess.Popen[str], grace_s: float, hurry: threading.Event) -> None:
    """SIGTERM by pid, up to `grace_s` to finish (less once `hurry` is set), then SIGKILL."""
    if process.poll() is None:
        process.terminate()
    deadline = time.monotonic() + grace_s
    while process.poll() is None and time.monotonic() < deadline and not hurry.is_set():
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
    process.wait()


class TunnelOutput:
    """Drains cloudflared's output (so it never blocks on a full pipe), finds the public URL,
    and keeps the last lines to show if cloudflared gives up."""

    def __init__(self, stream: IO[str]) -> None:
        self.url: str | None = None
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self.thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self.thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            self.tail.append(line.rstrip())
            match = URL_PATTERN.search(line)
            if match and self.url is None:
                self.url = match.group(0)


# -- the supervisor --------------------------------------------------------------------------


def banner(url: str, origin: str, key: str | None, keys_file: Path) -> str:
    token = key or "$TUNNELVISION_API_KEY"
    lines = [
        f"\ntunnelvision is public at {url}  ->  {origin}",
        f"Try it:\n  curl -H 'Authorization: Bearer {token}' -F image=@photo.jpg -F prompt='cat . dog' "
        f"{url}/v1/detect",
        f"Playground: {url}/   API docs: {url}/docs",
    ]
    if key is None:
        lines.insert(1, f"Use one of the keys in {keys_file} (`tunnelvision keys add NAME` makes another).")
    lines.append(f"{LIMITS}\nCtrl-C stops the API and the tunnel.")
    return "\n".join(lines)


def api_ready(origin: str) -> bool:
    try:
        return httpx.get(f"{origin}/readyz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


class Supervisor:
    def __init__(self, settings: Settings, serve: list[str], cloudflared: str, key: str | None, out: TextIO):
        self.settings = settings
        self.serve = serve  # the `tunnelvision serve` command line
        self.cloudflared = cloudflared
        self.key = key  # the key just created, for the curl line; None when keys existed
        self.out = out
        self.origin = local_origin(settings)
        self.children: list[subprocess.Popen[str]] = []  # stopped in this order
        self.hurry = threading.Event()

    def run(self) -> int:
        previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        for sig in previous:
            signal.signal(sig, _raise_stop)
        try:
            return self._start_and_watch()
        except Stop:
            print("\nstopping the tunnel and the API…", file=self.out, flush=True)
            return 0
        finally:
            for sig in previous:  # a second Ctrl-C only hurries the shutdown, never cuts it short
                signal.signal(sig, lambda *_: self.hurry.set())
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _start_and_watch(self) -> int:
        api = start_child(self.serve)
        self.children.append(api)
        metrics = f"127.0.0.1:{free_local_port()}"
        try:
            tunnel = start_child(
                tunnel_command(self.cloudflared, self.origin, metrics),
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        except OSError as exc:
            print(f"tunnelvision: cannot start {self.cloudflared}: {exc}", file=sys.stderr)
            return 1
        self.children.insert(0, tunnel)  # stopped first: no new public traffic
        assert tunnel.stdout is not None
        output = TunnelOutput(tunnel.stdout)
        state = UpState(
            pid=os.getpid(),
            api_pid=api.pid,
            tunnel_pid=tunnel.pid,
            port=self.settings.port,
            origin=self.origin,
            metrics=metrics,
            keys_file=str(self.settings.keys_file.expanduser()),
            started=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        write_state(self.settings.data_dir, state)
        return self._watch(api, tunnel, output, state)

    def _watch(
        self, api: subprocess.Popen[str], tunnel: subprocess.Popen[str], output: TunnelOutput, state: UpState
    ) -> int:
        announced = waiting_said = False
        while True:
            if api.poll() is not None:
                print(
                    f"tunnelvision: the API exited with {api.returncode} (its log is above)", file=sys.stderr
                )
                return 1
            if tunnel.poll() is not None:
                output.thread.join(2)
                tail = "\n".join(f"  {line}" for line in output.tail)
                print(f"tunnelvision: cloudflared exited with {tunnel.returncode}:\n{tail}", file=sys.stderr)
                return 1
            if not announced and output.url:
                if api_ready(self.origin):
                    write_state(self.settings.data_dir, replace(state, public_url=output.url))
                    print(banner(output.url, self.origin, self.key, self.settings.keys_file), file=self.out)
                    announced = True
                elif not waiting_said:
                    print(f"tunnel open at {output.url}; waiting for the API to be ready…", file=self.out)
                    waiting_said = True
                self.out.flush()
            time.sleep(0.2)

    def _stop_all(self) -> None:
        for child in self.children:  # the tunnel, then the API (its running request may finish)
            grace = TUNNEL_GRACE_S if child is not self.children[-1] else self.settings.deadline_s + 10
            stop_child(child, grace, self.hurry)
        state_path(self.settings.data_dir).unlink(missing_ok=True)


def _raise_stop(signum: int, frame: object) -> None:
    raise Stop()


def run_up(settings: Settings, serve: list[str], out: TextIO = sys.stdout) -> int:
    """Check everything that can be checked, then start; nothing is left running on any exit."""
    binary = shutil.which("cloudflared")
    if binary is None:
        print(f"tunnelvision: cloudflared is not installed: {INSTALL_HINT}", file=sys.stderr)
        return 1
    running = read_state(settings.data_dir)
    if running is not None and pid_alive(running.pid):
        where = running.public_url or "a quick tunnel"
        print(f"tunnelvision: `tunnelvision up` already runs (pid {running.pid}) at {where}", file=sys.stderr)
        return 1
    warning = config_file_warning()
    if warning:
        print(warning, file=sys.stderr)
    try:
        key = ensure_first_key(settings)
        require_auth_for_publishing(settings.model_copy(update={"insecure_no_auth": False}))
    except (KeyCommandError, UnsafeExposure) as exc:
        print(f"tunnelvision: {exc}", file=sys.stderr)
        return 2
    if key is not None:
        print(
            f"Created API key '{FIRST_KEY_NAME}' in {settings.keys_file} "
            f"(shown only now, store it):\n  {key}",
            file=out,
            flush=True,
        )
    return Supervisor(settings, serve, binary, key, out).run()
