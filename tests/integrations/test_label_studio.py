"""A real Label Studio (1.23.2, its own venv, offline on 127.0.0.1) connected to a real server
with tiny random models and keys on: Label Studio authenticates with Basic auth (the key as the
password), asks for pre-annotations and for smart-tool masks, and stores what we answer.
Random weights give meaningless boxes: the thresholds are opened through extra_params, so that
there is something to check."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from support import cli_server, client_venv, free_port, image_bytes
from tunnelvision.security.keys import KeyStore

LABEL_STUDIO = "label-studio==1.23.2"
TOKEN = "tunnelvision-test-token-1234"
WIDTH, HEIGHT = 96, 64
OPEN_THRESHOLDS = {"box_threshold": 0.0, "text_threshold": 0.0, "max_detections": 3}
ALL_TOOLS = """<View>
  <Image name="image" value="$image"/>
  <RectangleLabels name="box" toName="image"><Label value="cat"/><Label value="Dog"/></RectangleLabels>
  <BrushLabels name="brush" toName="image"><Label value="cat"/><Label value="Dog"/></BrushLabels>
  <PolygonLabels name="poly" toName="image"><Label value="cat"/><Label value="Dog"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat"/></KeyPointLabels>
</View>"""
POLYGONS_ONLY = """<View>
  <Image name="img" value="$picture"/>
  <PolygonLabels name="outline" toName="img"><Label value="cat"/></PolygonLabels>
  <KeyPointLabels name="click" toName="img" smart="true"><Label value="cat"/></KeyPointLabels>
</View>"""

pytestmark = pytest.mark.timeout(600)


@dataclass
class Studio:
    url: str
    http: httpx.Client  # with Label Studio's token
    python: Path  # the Label Studio venv's interpreter


@dataclass
class Backend:
    url: str
    key: str  # predict only, as Label Studio's should be
    admin: str  # for a reload


@pytest.fixture(scope="module")
def studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Studio]:
    python = client_venv("label-studio", [LABEL_STUDIO])
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    home = tmp_path_factory.mktemp("label-studio")
    env = {
        "PATH": f"{python.parent}:{os.environ.get('PATH', '')}",
        "HOME": str(home),
        "LABEL_STUDIO_BASE_DATA_DIR": str(home / "data"),
        "LABEL_STUDIO_USERNAME": "admin@example.com",
        "LABEL_STUDIO_PASSWORD": "not-a-real-password-1",
        "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN": "true",
        "LABEL_STUDIO_DISABLE_SIGNUP_WITHOUT_LINK": "true",
        "USE_DEFAULT_BANNED_SUBNETS": "false",  # else a 127.0.0.1 ML backend is refused
        "LABEL_STUDIO_HOST": url,
        "LATEST_VERSION_CHECK": "false",
        "SENTRY_DSN": "",
        "FRONTEND_SENTRY_DSN": "",
        "COLLECT_ANALYTICS": "false",
    }
    command = [str(python.parent / "label-studio"), "start", "--no-browser"]
    command += ["--internal-host", "127.0.0.1", "--port", str(port)]
    log = open(home / "label-studio.log", "wb")  # noqa: SIM115
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(f"{url}/health/", process, home / "label-studio.log", 180)
        with httpx.Client(base_url=url, headers={"Authorization": f"Token {TOKEN}"}, timeout=60) as http:
            yield Studio(url, http, python)
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # its own session: the server and its workers
        try:
            process.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
        log.close()


def _wait_for(url: str, process: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        assert process.poll() is None, f"Label Studio exited:\n{log.read_text()[-3000:]}"
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"Label Studio not up after {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def backend(
    studio: Studio, tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    key = KeyStore(keys_file).add("label-studio", ["predict"])
    admin = KeyStore(keys_file).add("operator", ["admin"])
    detector, segmenter = tiny_models
    # Images come only from the Label Studio the settings name; its token comes with /setup.
    extra = ("--keys-file", str(keys_file), "--public-metrics", "--label-studio-url", studio.url)
    with cli_server(detector, segmenter, *extra) as (url, _):
        yield Backend(url, key, admin)


def make_project(
    studio: Studio, backend: Backend, config: str, tasks: list[dict[str, Any]]
) -> dict[str, Any]:
    """A project with an uploaded image (and the other tasks given), our server connected."""
    project = studio.http.post("/api/projects", json={"title": "tunnelvision", "label_config": config})
    project_id = project.raise_for_status().json()["id"]
    upload = studio.http.post(
        f"/api/projects/{project_id}/import",
        params={"return_task_ids": "true"},
        files={"file": ("cat.png", image_bytes(WIDTH, HEIGHT, seed=3), "image/png")},
    )
    task_ids = upload.raise_for_status().json()["task_ids"]
    if tasks:
        more = studio.http.post(
            f"/api/projects/{project_id}/import", params={"return_task_ids": "true"}, json=tasks
        )
        task_ids += more.raise_for_status().json()["task_ids"]
    ml = studio.http.post(
        "/api/ml",
        json={
            "url": f"{backend.url}/label-studio",
            "project": project_id,
            "title": "tunnelvision",
            "is_interactive": True,
            "auth_method": "BASIC_AUTH",
            "basic_auth_user": "label-studio",
            "basic_auth_pass": backend.key,
            "extra_params": OPEN_THRESHOLDS,
        },
    )
    assert ml.status_code == 201, ml.text
    return {"id": project_id, "tasks": task_ids, "ml": ml.json()["id"]}


@pytest.fixture(scope="module")
def project(studio: Studio, backend: Backend) -> dict[str, Any]:
    elsewhere = {"image": "http://images.example.com/cat.png"}  # another host: refused, alone
    return make_project(studio, backend, ALL_TOOLS, [{"data": elsewhere}])


def predictions_of(studio: Studio, project_id: int, task_ids: list[int]) -> dict[int, list[dict[str, Any]]]:
    action = studio.http.post(
        "/api/dm/actions",
        params={"id": "retrieve_tasks_predictions", "project": project_id},
        json={"selectedItems": {"all": False, "included": task_ids}},
    )
    assert action.status_code == 200, action.text
    return {
        t: studio.http.get("/api/predictions", params={"task": t}).raise_for_status().json() for t in task_ids
    }


def click(studio: Studio, project: dict[str, Any], to_name: str, x: float, y: float) -> dict[str, Any]:
    """What Label Studio's UI posts for a smart keypoint, answered as the UI gets it."""
    keypoint = {
        "from_name": "kp",
        "to_name": to_name,
        "type": "keypointlabels",
        "original_width": WIDTH,
        "original_height": HEIGHT,
        "image_rotation": 0,
        "is_positive": True,
        "value": {"x": x, "y": y, "width": 0.5, "keypointlabels": ["cat"]},
    }
    answer = studio.http.post(
        f"/api/ml/{project['ml']}/interactive-annotating",
        json={"task": project["tasks"][0], "context": {"result": [keypoint]}},
    )
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    assert "errors" not in body, body
    data: dict[str, Any] = body["data"]
    return data


def cache_counts(backend: Backend, cache: str) -> dict[str, float]:
    """Hits and misses of one of the server's caches: 'embeddings' (a miss is a pass of SAM's
    image encoder) or 'images' (a hit is a request by image_id: no download, no decode)."""
    counts = {}
    text = httpx.get(f"{backend.url}/metrics", timeout=10).raise_for_status().text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.labels.get("cache") == cache and sample.name.endswith("_total"):
                counts[sample.name.removesuffix("_total").rsplit("_", 1)[-1]] = sample.value
    return counts


def decode_with_label_studio(studio: Studio, rles: list[list[int]]) -> list[list[int]]:
    """Label Studio's own decoder (label_studio_sdk.converter.brush): each mask's values."""
    script = (
        "import json, sys\n"
        "from label_studio_sdk.converter.brush import decode_rle\n"
        "print(json.dumps([decode_rle(r).tolist() for r in json.load(sys.stdin)]))\n"
    )
    done = subprocess.run(
        [str(studio.python), "-c", script],
        input=json.dumps(rles),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    decoded: list[list[int]] = json.loads(done.stdout)
    return decoded


def test_pre_annotations_of_each_tool_are_stored_by_label_studio(
    studio: Studio, backend: Backend, project: dict[str, Any]
) -> None:
    image_task, elsewhere_task = project["tasks"]
    stored = predictions_of(studio, project["id"], [image_task, elsewhere_task])
    assert stored[elsewhere_task] == []  # its failure stored nothing, and hurt no other task
    (prediction,) = stored[image_task]
    assert prediction["model_version"] == "grounded-sam@1"
    regions = prediction["result"]
    by_type: dict[str, list[dict[str, Any]]] = {}
    for region in regions:
        by_type.setdefault(region["type"], []).append(region)
        assert region["to_name"] == "image"
        assert (region["original_width"], region["original_height"]) == (WIDTH, HEIGHT)
        assert region["value"][region["type"]][0] in ("cat", "Dog")  # the config's own spelling
    assert {"rectanglelabels", "brushlabels", "polygonlabels"} <= set(by_type)
    for box in by_type["rectanglelabels"]:
        value = box["value"]
        assert box["from_name"] == "box"
        assert 0 <= value["x"] <= value["x"] + value["width"] <= 100.0001
        assert 0 <= value["y"] <= value["y"] + value["height"] <= 100.0001
        assert 0 <= box["score"] <= 1
    for polygon in by_type["polygonlabels"]:
        assert polygon["from_name"] == "poly" and polygon["value"]["closed"] is True
        assert len(polygon["value"]["points"]) >= 3
        assert all(0 <= c <= 100 for point in polygon["value"]["points"] for c in point)
    rles = [b["value"]["rle"] for b in by_type["brushlabels"]]
    for values in decode_with_label_studio(studio, rles):
        pixels = np.array(values, dtype=np.uint8).reshape(HEIGHT, WIDTH, 4)[:, :, 3]
        assert set(np.unique(pixels)) <= {0, 255} and pixels.any()


def test_the_refused_image_is_named_in_the_answer(backend: Backend, project: dict[str, Any]) -> None:
    """What Label Studio received for the task on another host (it logs it, stores nothing)."""
    setup = {"project": "99.1", "schema": ALL_TOOLS, "hostname": "http://127.0.0.1:9", "access_token": "t"}
    httpx.post(f"{backend.url}/label-studio/setup", json=setup, auth=("u", backend.key)).raise_for_status()
    body = {
        "tasks": [{"id": 1, "data": {"image": "http://images.example.com/cat.png"}}],
        "project": "99.1",
        "label_config": ALL_TOOLS,
        "params": {"context": None},
    }
    answer = httpx.post(f"{backend.url}/label-studio/predict", json=body, auth=("u", backend.key), timeout=30)
    assert answer.status_code == 200
    (result,) = answer.json()["results"]
    assert "result" not in result
    assert result["error"]["code"] == "image_url_refused"
    assert "images.example.com" in result["error"]["message"]


def test_a_smart_keypoint_gets_a_brush_mask_and_a_second_click_skips_the_encoder(
    studio: Studio, backend: Backend, project: dict[str, Any]
) -> None:
    predictions_of(studio, project["id"], project["tasks"][:1])  # the image has been seen
    before = {cache: cache_counts(backend, cache) for cache in ("embeddings", "images")}
    first = click(studio, project, "image", 40.0, 50.0)
    second = click(studio, project, "image", 60.0, 30.0)
    after = {cache: cache_counts(backend, cache) for cache in ("embeddings", "images")}
    # No pass of the image encoder: the embedding was cached by the pre-annotation.
    assert after["embeddings"]["misses"] == before["embeddings"]["misses"]
    assert after["embeddings"]["hits"] >= before["embeddings"]["hits"] + 2
    # Both clicks named the image by its image_id: not downloaded or decoded again.
    assert after["images"]["hits"] >= before["images"]["hits"] + 2
    for data in (first, second):
        (region,) = data["result"]
        assert region["type"] == "brushlabels" and region["from_name"] == "brush"
        assert region["value"]["brushlabels"] == ["cat"]
        (values,) = decode_with_label_studio(studio, [region["value"]["rle"]])
        assert len(values) == WIDTH * HEIGHT * 4


def test_a_polygon_only_project_gets_polygons_for_a_click(studio: Studio, backend: Backend) -> None:
    polygons = make_project(studio, backend, POLYGONS_ONLY, [])
    data = click(studio, polygons, "img", 50.0, 50.0)
    assert data["model_version"] == "grounded-sam@1"
    assert data["result"], "the random SAM drew no mask for the click"
    for region in data["result"]:
        assert region["type"] == "polygonlabels" and region["from_name"] == "outline"
        assert region["value"]["polygonlabels"] == ["cat"]
        assert all(0 <= c <= 100 for point in region["value"]["points"] for c in point)


def test_protocol_edges_on_our_side(backend: Backend) -> None:
    url = f"{backend.url}/label-studio"
    assert httpx.get(f"{url}/health").status_code == 401  # keys are on
    assert httpx.get(f"{url}/health", auth=("anyone", backend.key)).json()["status"] == "UP"
    assert httpx.post(f"{url}/webhook", json={"action": "ANNOTATION_CREATED"}).json() == {"status": "ok"}
    predict = f"{url}/predict"
    for body, status, code in [
        (b'{"tasks": [], "project": NaN}', 400, "malformed_input"),
        (b"[" * 100_000, 400, "malformed_input"),
        (b'{"tasks": {"id": 1}}', 422, "invalid_input"),
        (b'{"tasks": [], "label_config": "<View>"}', 400, "malformed_label_config"),
    ]:
        answer = httpx.post(
            predict, content=body, auth=("u", backend.key), headers={"content-type": "application/json"}
        )
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
    bad_clicks = [
        {"type": "keypointlabels", "to_name": "image", "value": {"x": 500, "y": 1}, "original_width": 9},
        {"type": "keypointlabels", "to_name": "nowhere", "value": {"x": 5, "y": 1}},
        {"type": "choices", "to_name": "image", "original_width": 9, "original_height": 9, "value": {}},
    ]
    for region in bad_clicks:
        click_body = {
            "tasks": [{"id": 1, "data": {"image": "/data/upload/1/a.png"}}],
            "label_config": ALL_TOOLS,
            "params": {"context": {"result": [region]}},
        }
        answer = httpx.post(predict, json=click_body, auth=("u", backend.key))
        assert answer.status_code == 422 and answer.json()["error"]["code"] == "invalid_input", answer.text
    bomb = (
        '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
        "<View><Image name='i' value='$i'/><RectangleLabels name='r' toName='i'><Label value='&b;'/>"
        "</RectangleLabels></View>"
    )
    refused = httpx.post(f"{url}/setup", json={"project": "1.1", "schema": bomb}, auth=("u", backend.key))
    assert refused.status_code == 400
    assert refused.json()["error"]["code"] == "malformed_label_config"
    unknown = httpx.post(
        f"{url}/setup",
        json={"project": "1.1", "schema": ALL_TOOLS, "extra_params": {"model": "nope"}},
        auth=("u", backend.key),
    )
    assert unknown.status_code == 422 and "nope" in unknown.json()["error"]["message"]
    assert re.fullmatch(
        r"[\w.-]+@\d+",
        httpx.post(
            f"{url}/setup", json={"project": "1.1", "schema": ALL_TOOLS}, auth=("u", backend.key)
        ).json()["model_version"],
    )


def test_a_reload_makes_label_studio_predict_again(
    studio: Studio, backend: Backend, project: dict[str, Any]
) -> None:
    """Last here: the new model version is what makes Label Studio ask again for a task it has a
    prediction for (and what makes `@1` in the tests above `@2` from now on)."""
    task = project["tasks"][0]
    assert [p["model_version"] for p in predictions_of(studio, project["id"], [task])[task]] == [
        "grounded-sam@1"
    ]
    reload = httpx.post(
        f"{backend.url}/v1/models/grounded-sam/reload",
        headers={"Authorization": f"Bearer {backend.admin}"},
        timeout=120,
    )
    assert reload.status_code == 200, reload.text
    again = predictions_of(studio, project["id"], [task])[task]
    assert sorted(p["model_version"] for p in again) == ["grounded-sam@1", "grounded-sam@2"]
