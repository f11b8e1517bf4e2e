"""API keys: shown once at creation, stored only as hashes, checked in constant time.

Keys are 256 random bits, so a plain SHA-256 is enough (a slow password hash protects guessable
secrets, not random ones). The file is re-read when it changes: revoking needs no restart.

A keys file that goes missing, unreadable or corrupt while serving never opens the server nor
turns requests into errors: the last key set read from it stays in force, the problem is logged
once and `problem()` names it, and a repaired file is picked up again.

Each key carries scopes (`predict`, `jobs`, `admin`): what it may call. A key written before
scopes existed (no `scopes` field) keeps what every key could do then: predict and jobs.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import os
import secrets
import stat
import tempfile
import threading
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

KEY_PREFIX = "tv_"
MAX_KEYS_FILE_BYTES = 4 * 1024 * 1024  # about 20,000 keys; anything larger is not a keys file
_HEX = frozenset("0123456789abcdef")

SCOPES = ("predict", "jobs", "admin")  # in the order they are written and listed
# What a new key gets unless told otherwise, and what a key from before scopes keeps.
DEFAULT_SCOPES = ("predict", "jobs")


@dataclass(frozen=True)
class StoredKey:
    name: str
    sha256: str
    hint: str  # the first characters, to tell keys apart in `keys list`
    created: str
    scopes: tuple[str, ...] = DEFAULT_SCOPES


def parse_scopes(text: str) -> tuple[str, ...]:
    """'predict, admin' -> ('predict', 'admin'); ValueError naming an unknown or missing scope."""
    return checked_scopes(part.strip() for part in text.split(",") if part.strip())


def checked_scopes(names: Iterable[str]) -> tuple[str, ...]:
    """The scopes named, in canonical order; ValueError for an unknown one or for none at all."""
    chosen = set(names)
    unknown = sorted(chosen - set(SCOPES))
    if unknown:
        raise ValueError(f"unknown scope '{unknown[0]}': the scopes are {', '.join(SCOPES)}")
    if not chosen:
        raise ValueError(f"name at least one scope: {', '.join(SCOPES)}")
    return tuple(scope for scope in SCOPES if scope in chosen)


class KeyCommandError(Exception):
    """A `keys` command that cannot be done (unknown name, duplicate name, unusable file)."""


class KeysFileProblem(Exception):
    """The keys file cannot be used; the message is one sentence naming the file and why."""


class KeysFileMissing(KeysFileProblem):
    pass


class KeyStore:
    def __init__(self, path: Path) -> None:
        self.path = path.expanduser()
        self._lock = threading.Lock()
        self._stamp: object = None  # what the file looked like at the last read
        self._keys: tuple[StoredKey, ...] = ()  # the last good set
        self._problem: str | None = None

    # -- managing (the `keys` commands: a file that cannot be used is an error) --------------

    def add(self, name: str, scopes: Iterable[str] = DEFAULT_SCOPES) -> str:
        """Create a key named `name` allowed `scopes`; return it (the only time it is ever seen)."""
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise KeyCommandError("a key name uses letters, digits, '-', '_' and '.'")
        try:
            allowed = checked_scopes(scopes)
        except ValueError as exc:
            raise KeyCommandError(str(exc)) from None
        keys = self.entries()
        if any(k.name == name for k in keys):
            raise KeyCommandError(f"a key named '{name}' exists; revoke it first")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self._write([*keys, StoredKey(name, _digest(key), key[:7], created, allowed)])
        return key

    def revoke(self, name: str) -> None:
        keys = self.entries()
        if not any(k.name == name for k in keys):
            raise KeyCommandError(f"no key named '{name}'")
        self._write([k for k in keys if k.name != name])

    def entries(self) -> list[StoredKey]:
        """The keys in the file now (none when it does not exist)."""
        try:
            return read_keys_file(self.path)
        except KeysFileMissing:
            return []
        except KeysFileProblem as exc:
            raise KeyCommandError(f"{exc}; fix or restore it first") from None

    def present(self) -> bool:
        """Something is at the path (a file, even a broken one): keys are meant to be on."""
        return os.path.lexists(self.path)

    # -- checking (serving: never fails, keeps the last good set) ----------------------------

    def verify(self, presented: str) -> str | None:
        """The key's name, or None."""
        stored = self.match(presented)
        return stored.name if stored is not None else None

    def match(self, presented: str) -> StoredKey | None:
        """The stored key (name, scopes) or None. Every stored hash is compared, in constant time."""
        digest = _digest(presented)
        match = None
        for stored in self._current():
            if hmac.compare_digest(stored.sha256, digest):
                match = stored
        return match

    def problem(self) -> str | None:
        """What is wrong with the keys file at its last read, in one sentence; None when fine."""
        self._refresh()
        return self._problem

    def _current(self) -> tuple[StoredKey, ...]:
        self._refresh()
        return self._keys

    def _refresh(self) -> None:
        """Re-read when the file changed; on failure keep the last good set and log once."""
        stamp = _stamp(self.path)
        with self._lock:
            if stamp == self._stamp:
                return
            self._stamp = stamp
            try:
                keys = read_keys_file(self.path)
            except KeysFileProblem as exc:
                self._report(str(exc))
                return
            if self._problem is not None:
                log.warning("API keys: %s is usable again (%d keys)", self.path, len(keys))
            self._keys, self._problem = tuple(keys), None

    def _report(self, problem: str) -> None:
        if problem != self._problem:  # once per change, not per request
            kept = len(self._keys)
            if kept:
                log.error(
                    "API keys: %s; the %d keys read before stay in force until it is fixed", problem, kept
                )
            else:
                log.error("API keys: %s; no key is accepted until it is fixed", problem)
        self._problem = problem

    # -- the file ---------------------------------------------------------------------------

    def _write(self, keys: list[StoredKey]) -> None:
        """Atomic replace. A new file is the caller's, mode 0600; an existing one keeps its owner,
        group and mode (so `sudo tunnelvision keys add` leaves the service user able to read it)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            before = _stat_or_none(self.path)
            fd, staging = tempfile.mkstemp(dir=self.path.parent, prefix=".keys-", suffix=".tmp")
            try:
                with os.fdopen(fd, "w") as handle:
                    json.dump({"keys": [asdict(k) for k in keys]}, handle, indent=2)
                    handle.flush()
                    os.fsync(handle.fileno())
                if before is not None:
                    _copy_ownership(before, staging)
                os.replace(staging, self.path)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(staging)
                raise
        except OSError as exc:
            raise KeyCommandError(f"cannot write {self.path}: {exc.strerror or exc}") from None
        self._stamp = None


def read_keys_file(path: Path) -> list[StoredKey]:
    """The keys in `path`, or KeysFileProblem saying in one sentence why it cannot be used."""
    text = _read_text(path)
    if not text.strip():
        raise KeysFileProblem(f"the keys file {path} is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeysFileProblem(
            f"the keys file {path} is not valid JSON ({exc.msg}: line {exc.lineno} column {exc.colno})"
        ) from None
    except RecursionError:
        raise KeysFileProblem(f"the keys file {path} is not valid JSON (nested too deeply)") from None
    except ValueError:  # JSON, but with a number of thousands of digits (Python refuses to read it)
        raise KeysFileProblem(f"the keys file {path} holds a number too long to read") from None
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise KeysFileProblem(
            f'the keys file {path} has no "keys" list ({_keys_fault(data)}; `tunnelvision keys add` '
            'writes {"keys": [...]})'
        )
    return [_stored_key(path, number, entry) for number, entry in enumerate(entries, 1)]


def _read_text(path: Path) -> str:
    # O_NONBLOCK: a FIFO at the path must not hang the server; only a regular file is read.
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise KeysFileMissing(f"the keys file {path} is missing") from None
    except PermissionError:
        raise KeysFileProblem(
            f"the keys file {path} cannot be read by this user (permission denied)"
        ) from None
    except OSError as exc:
        raise KeysFileProblem(f"the keys file {path} cannot be read ({exc.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = "a folder, not a file" if stat.S_ISDIR(mode) else "not a regular file"
        raise KeysFileProblem(f"the keys file {path} is {kind}")
    with os.fdopen(fd, "rb") as handle:
        try:
            data = handle.read(MAX_KEYS_FILE_BYTES + 1)
        except OSError as exc:
            raise KeysFileProblem(f"the keys file {path} cannot be read ({exc.strerror})") from None
    if len(data) > MAX_KEYS_FILE_BYTES:
        raise KeysFileProblem(f"the keys file {path} is larger than {MAX_KEYS_FILE_BYTES} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeysFileProblem(f"the keys file {path} is not UTF-8 text") from None


def _stored_key(path: Path, number: int, entry: Any) -> StoredKey:
    fields = entry if isinstance(entry, dict) else {}
    name, sha256 = fields.get("name"), fields.get("sha256")
    if not isinstance(name, str) or not name or not isinstance(sha256, str) or not _is_sha256(sha256):
        raise KeysFileProblem(
            f'the keys file {path}: entry {number} lacks a "name" or a valid "sha256" '
            f"({_entry_fault(entry, name, sha256)})"
        )
    hint, created = str(fields.get("hint", "")), str(fields.get("created", ""))
    return StoredKey(name, sha256, hint, created, _stored_scopes(path, number, fields))


def _keys_fault(data: Any) -> str:
    if not isinstance(data, dict):
        return f"it holds {_json_kind(data)}"
    return f'its "keys" is {_json_kind(data["keys"])}' if "keys" in data else "the object lacks it"


def _entry_fault(entry: Any, name: object, sha256: object) -> str:
    if not isinstance(entry, dict):
        return f"it is {_json_kind(entry)}, not an object"
    if not isinstance(name, str) or not name:
        return 'no "name"' if name is None else '"name" is not a text'
    if sha256 is None:
        return 'no "sha256"'
    return '"sha256" is not 64 lowercase hex digits'


def _json_kind(value: Any) -> str:
    kinds = {dict: "an object", list: "an array", str: "a string", bool: "true or false", int: "a number"}
    return "null" if value is None else kinds.get(type(value), "a number")


def _stored_scopes(path: Path, number: int, fields: dict[str, Any]) -> tuple[str, ...]:
    """No field: a key from before scopes, which keeps predict and jobs. Anything unclear makes
    the whole file unusable (the last good set stays in force) rather than guess at a right."""
    if "scopes" not in fields:
        return DEFAULT_SCOPES
    scopes = fields["scopes"]
    where = f"the keys file {path}: entry {number} ({fields['name']!r})"
    if not isinstance(scopes, list) or not all(isinstance(scope, str) for scope in scopes):
        raise KeysFileProblem(f'{where} has "scopes" that is not a list of names')
    if not scopes:
        return ()  # a key that may call nothing
    try:
        return checked_scopes(scopes)
    except ValueError as exc:
        raise KeysFileProblem(f"{where}: {exc}") from None


def _is_sha256(value: str) -> bool:
    return len(value) == 64 and set(value) <= _HEX


def _stamp(path: Path) -> object:
    """Changes whenever the file is rewritten, replaced, chmod-ed or chown-ed."""
    try:
        st = os.stat(path)
    except OSError as exc:
        return ("unreadable", exc.errno)
    return (st.st_ino, st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_mode, st.st_uid)


def _stat_or_none(path: Path) -> os.stat_result | None:
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None


def _copy_ownership(before: os.stat_result, staging: str) -> None:
    """Owner and group first (chown may clear mode bits), then the mode."""
    if (before.st_uid, before.st_gid) != (os.getuid(), os.getgid()):
        try:
            os.chown(staging, before.st_uid, before.st_gid)
        except PermissionError:
            log.warning(
                "cannot give the rewritten keys file back to uid %d / gid %d (not permitted); "
                "run the keys command as the file's owner or with sudo",
                before.st_uid,
                before.st_gid,
            )
    os.chmod(staging, stat.S_IMODE(before.st_mode))


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
