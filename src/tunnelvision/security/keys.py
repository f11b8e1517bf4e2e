"""API keys: shown once at creation, stored only as hashes, checked in constant time.

Keys are 256 random bits, so a plain SHA-256 is enough (a slow password hash protects guessable
secrets, not random ones). The file is re-read when it changes: revoking needs no restart.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

KEY_PREFIX = "tv_"


@dataclass(frozen=True)
class StoredKey:
    name: str
    sha256: str
    hint: str  # the first characters, to tell keys apart in `keys list`
    created: str


class KeyCommandError(Exception):
    """A `keys` command that cannot be done (unknown name, duplicate name)."""


class KeyStore:
    def __init__(self, path: Path) -> None:
        self.path = path.expanduser()
        self._lock = threading.Lock()
        self._loaded_stamp: tuple[int, int] | None = None
        self._keys: list[StoredKey] = []

    # -- managing ---------------------------------------------------------------------------

    def add(self, name: str) -> str:
        """Create a key named `name`; return it (the only time it is ever seen)."""
        if not name or not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            raise KeyCommandError("a key name uses letters, digits, '-', '_' and '.'")
        keys = self.entries()
        if any(k.name == name for k in keys):
            raise KeyCommandError(f"a key named '{name}' exists; revoke it first")
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        created = datetime.now(UTC).isoformat(timespec="seconds")
        self._write([*keys, StoredKey(name, _digest(key), key[:7], created)])
        return key

    def revoke(self, name: str) -> None:
        keys = self.entries()
        if not any(k.name == name for k in keys):
            raise KeyCommandError(f"no key named '{name}'")
        self._write([k for k in keys if k.name != name])

    def entries(self) -> list[StoredKey]:
        self._reload_if_changed()
        return list(self._keys)

    # -- checking ---------------------------------------------------------------------------

    def verify(self, presented: str) -> str | None:
        """The key's name, or None. Every stored hash is compared, in constant time."""
        digest = _digest(presented)
        match = None
        for stored in self.entries():
            if hmac.compare_digest(stored.sha256, digest):
                match = stored.name
        return match

    # -- the file ---------------------------------------------------------------------------

    def _reload_if_changed(self) -> None:
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            self._keys, self._loaded_stamp = [], None
            return
        stamp = (stat.st_mtime_ns, stat.st_size)
        with self._lock:
            if stamp != self._loaded_stamp:
                data = json.loads(self.path.read_text() or "{}")
                self._keys = [StoredKey(**entry) for entry in data.get("keys", [])]
                self._loaded_stamp = stamp

    def _write(self, keys: list[StoredKey]) -> None:
        """Atomic replace, readable by the owner only."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        staging = self.path.with_suffix(".tmp")
        fd = os.open(staging, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump({"keys": [asdict(k) for k in keys]}, handle, indent=2)
        os.replace(staging, self.path)
        self._loaded_stamp = None


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
