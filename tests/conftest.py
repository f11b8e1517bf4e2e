from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import FakeBackend, JwksServer, ThreadServer, make_settings


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Written by the CLI users run: `tunnelvision models random OUT --size tiny`."""
    out = tmp_path_factory.mktemp("models")
    subprocess.run(
        [sys.executable, "-m", "tunnelvision.cli", "models", "random", str(out)],
        check=True,
        capture_output=True,
    )
    return out / "detector", out / "segmenter"


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()


@pytest.fixture
def server(fake: FakeBackend) -> Iterator[ThreadServer]:
    with ThreadServer(make_settings(max_body_bytes=200_000, max_image_pixels=1_000_000), fake) as srv:
        yield srv


@pytest.fixture
def jwks() -> Iterator[JwksServer]:
    """A Cloudflare Access certs endpoint on 127.0.0.1 with one key, 'kid-1'."""
    server = JwksServer()
    server.add_key("kid-1")
    yield server
    server.close()
