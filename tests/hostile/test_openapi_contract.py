"""Schemathesis over the whole OpenAPI document, against the real server on 127.0.0.1.

Every generated request (valid and invalid bodies, fields, paths, headers) must get an answer
that matches the route's documented statuses and schemas, and no 5xx except a 503 that says when
to retry. Per-client limits are off so the requests reach the handlers; they carry a real key.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import positive_data_acceptance

from support import FakeBackend, ThreadServer, make_settings
from tunnelvision.api.app import create_app
from tunnelvision.security.keys import KeyStore

EXAMPLES_PER_ROUTE = 40


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ThreadServer, str]]:
    keys_file: Path = tmp_path_factory.mktemp("keys") / "keys.json"
    key = KeyStore(keys_file).add("fuzz", ["predict", "jobs", "admin"])
    config = make_settings(
        keys_file=keys_file,
        rate_limit_per_minute=0,
        max_inflight_per_client=0,
        max_body_bytes=300_000,
        max_image_pixels=1_000_000,
    )
    with ThreadServer(config, FakeBackend()) as server:
        yield server, key


def served_document() -> dict[str, Any]:
    """The document the server publishes at /openapi.json (built by the same create_app)."""
    document: dict[str, Any] = create_app(make_settings(), lambda _settings: [FakeBackend()]).openapi()
    return document


schema = schemathesis.openapi.from_dict(served_document())


@schemathesis.check
def no_5xx_but_a_503_with_retry_after(ctx: Any, response: Any, case: Any) -> bool | None:
    status = response.status_code
    if status >= 500 and not (status == 503 and "retry-after" in response.headers):
        raise AssertionError(f"{status} from {case.method} {case.path}: {response.text[:300]}")
    return None


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_ROUTE,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_every_route_keeps_its_documented_contract(case: Any, served: tuple[ThreadServer, str]) -> None:
    server, key = served
    assert httpx.get(f"{server.url}/openapi.json").json() == served_document()  # the one fuzzed
    response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    case.validate_response(
        response,
        # A schema cannot say "image or image_id, not both" or "boxes inside the image": such
        # schema-valid requests rightly get 4xx, so acceptance of valid data is not checked.
        excluded_checks=[not_a_server_error, positive_data_acceptance],
        additional_checks=[no_5xx_but_a_503_with_retry_after],
    )
