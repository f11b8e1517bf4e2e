"""Named pipelines over real HTTP: `model` chooses one, the first is the default, unknown names and
requests a pipeline cannot answer get a 422 that says what there is, /v1/models lists them all."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from support import ThreadServer, cli_server, image_bytes, make_settings
from tunnelvision.client import Client
from tunnelvision.models.factory import build_backends

PNG = image_bytes(64, 48)
BOX = [[4, 4, 40, 30]]


@pytest.fixture(scope="module")
def url(tiny_models: tuple[Path, Path]) -> Iterator[str]:
    """grounded-sam (from --detector/--segmenter), a segmenter alone and a detector alone."""
    detector, segmenter = tiny_models
    pipelines = ["--pipeline", f"sam={segmenter}", "--pipeline", f"boxes={detector}"]
    with cli_server(detector, segmenter, *pipelines) as (server_url, _):
        yield server_url


def post(url: str, route: str, timeout: float = 60, **fields: Any) -> httpx.Response:
    data = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in fields.items()}
    return httpx.post(
        f"{url}{route}", files={"image": ("i.png", PNG, "image/png")}, data=data, timeout=timeout
    )


def error(response: httpx.Response, status: int = 422) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()["error"]
    return body


def test_models_lists_every_pipeline_with_its_models_and_abilities(
    url: str, tiny_models: tuple[Path, Path]
) -> None:
    body = httpx.get(f"{url}/v1/models").json()
    pipelines = {p["name"]: p for p in body["pipelines"]}
    assert [p["name"] for p in body["pipelines"]] == ["grounded-sam", "sam", "boxes"]
    assert [p["default"] for p in body["pipelines"]] == [True, False, False]
    assert pipelines["grounded-sam"]["abilities"] == ["boxes", "masks", "points", "text"]
    assert pipelines["sam"]["abilities"] == ["boxes", "masks", "points"]
    assert pipelines["boxes"]["abilities"] == ["text"]
    detector, segmenter = (str(p) for p in tiny_models)
    assert pipelines["grounded-sam"]["models"] == [
        {"role": "detector", "id": detector, "family": "grounding-dino", "device": "cpu", "dtype": "float32"},
        {"role": "segmenter", "id": segmenter, "family": "sam", "device": "cpu", "dtype": "float32"},
    ]
    assert [m["role"] for m in pipelines["sam"]["models"]] == ["segmenter"]
    assert body["demo"] is False and body["detector"]["id"] == detector  # older clients still read these


def test_model_chooses_the_pipeline_and_the_default_is_the_first(url: str) -> None:
    default = post(url, "/v1/segment", prompt="cat", box_threshold=0.0, max_detections=2)
    assert default.status_code == 200 and default.json()["detections"][0]["label"] == "cat"
    by_boxes = {name: post(url, "/v1/segment", boxes=BOX, model=name) for name in ("grounded-sam", "sam")}
    assert all(r.status_code == 200 for r in by_boxes.values())
    # One SAM checkpoint behind both: the same mask whichever pipeline cut it.
    assert by_boxes["sam"].json()["detections"] == by_boxes["grounded-sam"].json()["detections"]
    detected = post(url, "/v1/detect", prompt="cat . dog", box_threshold=0.0, model="boxes")
    assert detected.status_code == 200
    assert {d["label"] for d in detected.json()["detections"]} <= {"cat", "dog"}
    as_json = {"image": base64.b64encode(PNG).decode(), "points": [[10, 10, 1]], "model": "sam"}
    assert httpx.post(f"{url}/v1/segment", json=as_json, timeout=60).status_code == 200
    picture = post(url, "/v1/annotate", boxes=BOX, model="sam")
    assert picture.status_code == 200 and picture.headers["content-type"] == "image/png"


def test_an_unknown_model_gets_422_listing_the_known_ones(url: str) -> None:
    for response in (
        post(url, "/v1/segment", prompt="cat", model="sam3"),
        post(url, "/v1/detect", prompt="cat", model="sam3"),
        httpx.post(f"{url}/v1/segment", json={"image_id": "x", "boxes": BOX, "model": "sam3"}),
    ):
        body = error(response)
        assert body["code"] == "unknown_model"
        assert "sam3" in body["message"] and "grounded-sam, sam, boxes" in body["message"]


@pytest.mark.parametrize(
    ("route", "fields", "cannot", "can"),
    [
        ("/v1/segment", {"prompt": "cat", "model": "sam"}, "text prompts", "box prompts, masks"),
        ("/v1/detect", {"prompt": "cat", "model": "sam"}, "text prompts", "point prompts"),
        ("/v1/segment", {"prompt": "cat", "model": "boxes"}, "masks", "text prompts"),
        ("/v1/segment", {"points": [[5, 5, 1]], "model": "boxes"}, "point prompts", "text prompts"),
        ("/v1/annotate", {"boxes": BOX, "model": "boxes"}, "box prompts", "text prompts"),
    ],
)
def test_asking_a_pipeline_for_what_it_cannot_do_names_what_it_can(
    url: str, route: str, fields: dict[str, Any], cannot: str, can: str
) -> None:
    body = error(post(url, route, **fields))
    assert body["code"] == "unsupported_prompt"
    assert f"'{fields['model']}' cannot take" in body["message"]
    assert cannot in body["message"] and can in body["message"].split("it takes:")[1]


def test_jobs_take_a_model_and_refuse_one_that_cannot_answer(url: str) -> None:
    images = [("images", ("a.png", PNG, "image/png"))]
    wrong = httpx.post(f"{url}/v1/jobs", files=images, data={"prompt": "cat", "model": "sam"})
    assert error(wrong)["code"] == "unsupported_prompt"
    unknown = httpx.post(f"{url}/v1/jobs", files=images, data={"prompt": "cat", "model": "nope"})
    assert error(unknown)["code"] == "unknown_model"
    created = httpx.post(f"{url}/v1/jobs", files=images, data={"prompt": "cat", "model": "grounded-sam"})
    assert created.status_code == 202, created.text


def test_the_client_lists_pipelines_and_sends_model(url: str) -> None:
    with Client(url) as client:
        listed = client.models()
        assert [p.name for p in listed.pipelines] == ["grounded-sam", "sam", "boxes"]
        result = client.segment(PNG, boxes=BOX, model="sam")
        assert len(result.detections) == 1 and result.detections[0].label is None
        assert client.detect(PNG, "cat", model="boxes", box_threshold=0.0).detections


def test_a_model_shared_by_pipelines_is_loaded_once_and_shares_its_cache(
    tiny_models: tuple[Path, Path],
) -> None:
    detector, segmenter = (str(p) for p in tiny_models)
    settings = make_settings(
        detector=detector, segmenter=segmenter, pipeline=[f"sam={segmenter}"], device="cpu", cache_bytes=2**24
    )
    (backend,) = build_backends(settings)
    pipelines = backend.pipelines  # type: ignore[attr-defined]
    assert pipelines["sam"].segmenter is pipelines["grounded-sam"].segmenter
    with ThreadServer(settings, backend) as server:
        first = post(server.url, "/v1/segment", boxes=BOX, model="grounded-sam")
        image_id = first.json()["image_id"]
        again = httpx.post(
            f"{server.url}/v1/segment", json={"image_id": image_id, "boxes": BOX, "model": "sam"}, timeout=60
        )
        assert again.status_code == 200
        assert again.json()["detections"] == first.json()["detections"]
        assert server.state.engine.cache_stats()["embeddings"]["hits"] == 1  # the other pipeline's embedding


def test_without_the_pair_flags_the_first_pipeline_is_the_default(tiny_models: tuple[Path, Path]) -> None:
    detector, segmenter = (str(p) for p in tiny_models)
    settings = make_settings(pipeline=[f"sam={segmenter}", f"boxes={detector}"], device="cpu")
    assert [spec.name for spec in settings.pipelines] == ["sam", "boxes"]
    (backend,) = build_backends(settings)
    with ThreadServer(settings, backend) as server:
        listed = httpx.get(f"{server.url}/v1/models").json()
        assert [(p["name"], p["default"]) for p in listed["pipelines"]] == [("sam", True), ("boxes", False)]
        assert listed["detector"] is None and listed["segmenter"]["id"] == segmenter
        assert post(server.url, "/v1/segment", boxes=BOX).status_code == 200  # no model: sam
        assert error(post(server.url, "/v1/segment", prompt="cat"))["code"] == "unsupported_prompt"


@pytest.mark.parametrize(
    ("pipeline", "message"),
    [
        ("no-equals-sign", "is not NAME=SPEC"),
        ("bad name=x/y", "use 1-64 letters"),
        ("a=x+y+z", "must be DETECTOR+SEGMENTER or one model"),
        ("a=x+", "must be DETECTOR+SEGMENTER or one model"),
        ("grounded-sam=x/y", "grounded-sam given twice"),
    ],
)
def test_bad_pipeline_settings_are_refused_with_the_reason(pipeline: str, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        make_settings(pipeline=[pipeline], detector="x/y")


def test_pipelines_come_from_repeated_flags_and_a_json_environment_variable(tmp_path: Path) -> None:
    from tunnelvision.cli import build_parser, settings_from_args

    args = build_parser().parse_args(["serve", "--pipeline", "a=x/y", "--pipeline", "b=p/q+r/s"])
    assert [(s.name, s.parts) for s in settings_from_args(args).pipelines] == [
        ("a", ("x/y",)),
        ("b", ("p/q", "r/s")),
    ]
    env = {"TUNNELVISION_PIPELINE": json.dumps(["c=m/n"]), "TUNNELVISION_KEYS_FILE": str(tmp_path / "k")}
    code = "from tunnelvision.config import Settings; print([s.name for s in Settings().pipelines])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "['c']"
