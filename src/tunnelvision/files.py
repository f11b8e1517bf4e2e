"""Writing a file so that readers see the old bytes or the new, never a part."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path


def staging_path(path: Path) -> Path:
    """A new name beside `path` to write to first (not mkstemp's: its mode 0600 would stay)."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def write_atomic(path: Path, data: bytes) -> None:
    """`path` holds the old bytes or the new, never a part; no staging file outlives a failure."""
    staging = staging_path(path)
    try:
        with open(staging, "xb") as handle:
            handle.write(data)
        os.replace(staging, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(staging)
        raise
