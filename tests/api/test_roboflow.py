"""Roboflow's inference-sdk (1.8.3, in a venv of its own) against our real server on tiny random
SAM 2, SAM 3 and GroundingDINO + SAM checkpoints: every SDK method that reaches a route we serve,
the key in the body, a header or the query, the SDK's errors carrying our message, hostile bodies,
and answers that equal what /v1/segment and /v1/detect say for the same prompts."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from pycocotools import mask as coco_mask

from support import cli_server, client_venv, image_bytes
from tunnelvision.models.random_families import write_random_family
from tunnelvision.security.keys import KeyStore

WIDTH, HEIGHT = 64, 48
PNG = image_bytes(WIDTH, HEIGHT)
IMAGE = {"type": "base64", "value": base64.b64encode(PNG).decode()}
CORNERS = [4.0, 4.0, 40.0, 30.0]  # as x1, y1, x2, y2
CENTRE_BOX = {"x": 22, "y": 17, "width": 36, "height": 26}  # the same box, Roboflow's SAM 2 way
TOP_LEFT_BOX = {"x": 4, "y": 4, "width": 36, "height": 26}  # the same box, Roboflow's SAM 3 way

# Runs in the SDK's venv: each call's answer, or the SDK exception's class, status and message.
SDK_SCRIPT = r"""
import io, json, sys, warnings
warnings.simplefilter("ignore")
from PIL import Image
from inference_sdk import InferenceHTTPClient
from inference_sdk.http.entities import InferenceConfiguration

url, key, image_path = sys.argv[1:4]
image = Image.open(image_path).convert("RGB")
box = {"x": 22, "y": 17, "width": 36, "height": 26}
client = InferenceHTTPClient(api_url=url, api_key=key)
header = InferenceHTTPClient(api_url=url, api_key=key).configure(
    InferenceConfiguration(api_key_transport="header")
)
calls = {
    "sam2": lambda: client.sam2_segment_image(
        image, prompts=[{"box": box}, {"points": [{"x": 10, "y": 10, "positive": True}]}]
    ),
    "sam2_rle": lambda: client.sam2_segment_image(image, prompts=[{"box": box}], mask_input_format="rle"),
    "concept": lambda: client.sam3_concept_segment(
        image,
        prompts=[
            {"type": "text", "text": "cat"},
            {"type": "visual", "boxes": [{"x": 4, "y": 4, "width": 36, "height": 26}], "box_labels": [1]},
        ],
        output_prob_thresh=0.0,
        format="rle",
    ),
    "concept_polygons": lambda: client.sam3_concept_segment(
        image, prompts=[{"type": "text", "text": "cat", "output_prob_thresh": 0.0}]
    ),
    "concept_nms": lambda: client.sam3_concept_segment(
        image,
        prompts=[{"type": "text", "text": "cat"}, {"type": "text", "text": "dog"}],
        output_prob_thresh=0.0,
        format="rle",
        nms_iou_threshold=0.5,
    ),
    "concept_no_nms": lambda: client.sam3_concept_segment(
        image,
        prompts=[{"type": "text", "text": "cat"}, {"type": "text", "text": "dog"}],
        output_prob_thresh=0.0,
        format="rle",
    ),
    "visual": lambda: client.sam3_visual_segment(image, prompts=[{"box": box}]),
    "embed": lambda: client.sam3_embed_image(image, image_id="my-image"),
    "header": lambda: header.sam2_segment_image(image, prompts=[{"box": box}]),
    "bad_key": lambda: InferenceHTTPClient(api_url=url, api_key="not-a-key").sam2_segment_image(
        image, prompts=[{"box": box}]
    ),
    "too_many_prompts": lambda: client.sam3_concept_segment(
        image, prompts=[{"type": "text", "text": "cat"}] * 17
    ),
}
answers = {}
for name, call in calls.items():
    try:
        answers[name] = {"ok": call()}
    except Exception as exc:
        answers[name] = {
            "raised": type(exc).__name__,
            "status": getattr(exc, "status_code", None),
            "message": getattr(exc, "api_message", str(exc)),
        }
print(json.dumps(answers))
"""


@pytest.fixture(scope="module")
def key_and_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str, Path]:
    folder = tmp_path_factory.mktemp("roboflow")
    store = KeyStore(folder / "keys.json")
    return store.path, store.add("sdk"), folder / "server.log"


@pytest.fixture(scope="module")
def url(
    tiny_models: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
    key_and_log: tuple[Path, str, Path],
) -> Iterator[str]:
    """grounded-sam (GroundingDINO + SAM, the default), sam2 and sam3, with keys on."""
    out = tmp_path_factory.mktemp("roboflow-models")
    sam2, sam3 = (write_random_family(out / family, family, "tiny", seed=1) for family in ("sam2", "sam3"))
    keys_file, _, log = key_and_log
    flags = ["--pipeline", f"sam2={sam2}", "--pipeline", f"sam3={sam3}", "--keys-file", str(keys_file)]
    with cli_server(*tiny_models, *flags, "--log-level", "info", log=log) as (server_url, _):
        yield server_url


@pytest.fixture(scope="module")
def key(key_and_log: tuple[Path, str, Path]) -> str:
    return key_and_log[1]


@pytest.fixture(scope="module")
def sdk(url: str, key: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every SDK call's answer (one subprocess for all of them: the venv's imports are slow)."""
    python = client_venv("inference-sdk", ["inference-sdk==1.8.3"])
    image = tmp_path_factory.mktemp("sdk") / "image.png"
    image.write_bytes(PNG)
    done = subprocess.run(
        [str(python), "-c", SDK_SCRIPT, url, key, str(image)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    answers: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return answers


def ok(sdk: dict[str, Any], name: str) -> dict[str, Any]:
    assert "ok" in sdk[name], sdk[name]
    answer: dict[str, Any] = sdk[name]["ok"]
    return answer


def ours(url: str, key: str, route: str, **fields: Any) -> list[dict[str, Any]]:
    """The same question asked of /v1/segment or /v1/detect."""
    body = {"image": base64.b64encode(PNG).decode(), **fields}
    response = httpx.post(f"{url}{route}", json=body, headers={"X-API-Key": key}, timeout=60)
    assert response.status_code == 200, response.text
    detections: list[dict[str, Any]] = response.json()["detections"]
    return detections


def post(url: str, route: str, body: Any, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{url}{route}", json=body, timeout=60, **kwargs)


def decoded(rle: dict[str, Any]) -> np.ndarray:
    return np.asarray(coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}), dtype=bool)


def assert_polygons_inside(prediction: dict[str, Any]) -> None:
    assert prediction["format"] == "polygon" and prediction["masks"]
    for polygon in prediction["masks"]:
        assert polygon and all(0 <= x <= WIDTH and 0 <= y <= HEIGHT for x, y in polygon)


# -- SAM 2 ----------------------------------------------------------------------------------------


def test_sam2_answers_one_polygon_mask_per_prompt(sdk: dict[str, Any]) -> None:
    predictions = ok(sdk, "sam2")["predictions"]
    assert len(predictions) == 2  # a box prompt and a point prompt
    for prediction in predictions:
        assert_polygons_inside(prediction)
        assert 0.0 <= prediction["confidence"] <= 1.0


def test_sam2_rle_masks_decode_to_the_image_size(sdk: dict[str, Any]) -> None:
    (prediction,) = ok(sdk, "sam2_rle")["predictions"]
    assert prediction["format"] == "rle" and decoded(prediction["masks"]).shape == (HEIGHT, WIDTH)


def test_sam2_centre_boxes_cut_what_our_corner_boxes_cut(url: str, key: str) -> None:
    # The SDK re-encodes images as JPEG: the same PNG bytes go to both routes here.
    body = {"image": IMAGE, "prompts": {"prompts": [{"box": CENTRE_BOX}]}, "format": "rle"}
    (prediction,) = post(url, "/sam2/segment_image", body, headers={"X-API-Key": key}).json()["predictions"]
    (same,) = ours(url, key, "/v1/segment", model="sam2", boxes=[CORNERS], multimask=True)
    assert prediction["masks"] == same["mask"]


def test_sam3_visual_segment_and_the_header_transport(sdk: dict[str, Any]) -> None:
    for name in ("visual", "header"):
        (prediction,) = ok(sdk, name)["predictions"]
        assert_polygons_inside(prediction)


# -- SAM 3 concepts ----------------------------------------------------------------------------------


def test_sam3_concepts_answer_per_prompt_with_its_echo(sdk: dict[str, Any]) -> None:
    text, visual = ok(sdk, "concept")["prompt_results"]
    assert text["echo"] == {"prompt_index": 0, "type": "text", "text": "cat", "num_boxes": 0}
    assert visual["echo"] == {"prompt_index": 1, "type": "visual", "text": None, "num_boxes": 1}
    assert text["predictions"] and visual["predictions"]
    for prediction in text["predictions"] + visual["predictions"]:
        assert prediction["format"] == "rle" and decoded(prediction["masks"]).shape == (HEIGHT, WIDTH)
        assert 0.0 <= prediction["confidence"] <= 1.0


def test_sam3_exemplar_boxes_are_top_left_anchored(url: str, key: str) -> None:
    prompts = [{"type": "visual", "boxes": [TOP_LEFT_BOX], "box_labels": [1]}]
    body = {"image": IMAGE, "prompts": prompts, "output_prob_thresh": 0.0, "format": "rle"}
    response = post(url, "/sam3/concept_segment", body, headers={"X-API-Key": key})
    (result,) = response.json()["prompt_results"]
    fields = {"box_threshold": 0.0, "text_threshold": 0.0, "nms_iou": 1.0}
    same = ours(url, key, "/v1/segment", model="sam3", exemplars=[[*CORNERS, 1]], **fields)
    assert [p["masks"] for p in result["predictions"]] == [d["mask"] for d in same] != []


def test_sam3_polygons_and_a_prompts_own_threshold(sdk: dict[str, Any]) -> None:
    (result,) = ok(sdk, "concept_polygons")["prompt_results"]
    assert result["predictions"]  # the prompt's 0.0 overrides the request's default 0.5
    for prediction in result["predictions"]:
        assert_polygons_inside(prediction)


def test_cross_prompt_nms_leaves_no_two_masks_overlapping_more(sdk: dict[str, Any]) -> None:
    kept = [p for r in ok(sdk, "concept_nms")["prompt_results"] for p in r["predictions"]]
    every = [p for r in ok(sdk, "concept_no_nms")["prompt_results"] for p in r["predictions"]]
    assert 0 < len(kept) < len(every)
    rles = [{"size": p["masks"]["size"], "counts": p["masks"]["counts"].encode()} for p in kept]
    ious = np.asarray(coco_mask.iou(rles, rles, [0] * len(rles)))
    assert (ious[~np.eye(len(rles), dtype=bool)] <= 0.5).all()


# -- embeddings -------------------------------------------------------------------------------------


def test_an_embedded_image_is_found_again_by_the_clients_id(sdk: dict[str, Any], url: str, key: str) -> None:
    assert ok(sdk, "embed")["image_id"] == "my-image"
    body = {"image_id": "my-image", "prompts": {"prompts": [{"box": CENTRE_BOX}]}, "format": "rle"}
    answer = post(url, "/sam3/visual_segment", body, headers={"X-API-Key": key})
    assert answer.status_code == 200, answer.text
    embedded = post(url, "/sam2/embed_image", {"image": IMAGE}, headers={"X-API-Key": key}).json()
    again = post(
        url, "/sam2/segment_image", {**body, "image_id": embedded["image_id"]}, params={"api_key": key}
    )
    assert again.status_code == 200 and len(again.json()["predictions"]) == 1
    unknown = post(url, "/sam2/segment_image", {**body, "image_id": "never-sent"}, headers={"X-API-Key": key})
    assert unknown.status_code == 404 and "not in the cache" in unknown.json()["message"]


# -- GroundingDINO -------------------------------------------------------------------------------------


def test_grounding_dino_answers_centre_boxes_with_class_ids(url: str, key: str) -> None:
    body = {
        "image": IMAGE,
        "text": ["cat", "dog"],
        "box_threshold": 0.0,
        "text_threshold": 0.0,
        "api_key": key,
    }
    response = post(url, "/grounding_dino/infer", body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["image"] == {"width": WIDTH, "height": HEIGHT}
    same = ours(url, key, "/v1/detect", prompt=["cat", "dog"], box_threshold=0.0, text_threshold=0.0)
    predictions = answer["predictions"]
    assert len(predictions) == len([d for d in same if d["label"] in ("cat", "dog")]) > 0
    for prediction, detection in zip(predictions, same, strict=False):
        x1, _, x2, _ = detection["box"]
        assert prediction["x"] == pytest.approx((x1 + x2) / 2, abs=0.01)
        assert prediction["width"] == pytest.approx(x2 - x1, abs=0.01)
        assert prediction["class"] == ["cat", "dog"][prediction["class_id"]]
        assert 0.0 <= prediction["confidence"] <= 1.0
    assert len({p["detection_id"] for p in predictions}) == len(predictions)
    agnostic = post(url, "/grounding_dino/infer", {**body, "class_agnostic_nms": True}).json()
    assert len(agnostic["predictions"]) <= len(predictions)


# -- keys and errors ------------------------------------------------------------------------------------


def test_the_sdk_raises_with_our_message(sdk: dict[str, Any]) -> None:
    assert sdk["bad_key"]["raised"] == "HTTPCallErrorError" and sdk["bad_key"]["status"] == 401
    assert sdk["bad_key"]["message"] == "invalid API key"  # the guard's 401 speaks Roboflow's shape too
    refused = sdk["too_many_prompts"]
    assert refused["status"] == 422 and "at most 16" in refused["message"]


@pytest.mark.parametrize(
    ("credentials", "status"),
    [
        ({"json": {"api_key": "KEY"}}, 200),
        ({"params": {"api_key": "KEY"}}, 200),
        ({"headers": {"Authorization": "Bearer KEY"}}, 200),
        ({}, 401),
        ({"json": {"api_key": "wrong"}}, 401),
        ({"params": {"api_key": "wrong"}}, 401),
    ],
)
def test_the_key_in_the_body_the_query_or_a_header(
    url: str, key: str, credentials: dict[str, Any], status: int
) -> None:
    body = {"image": IMAGE, "prompts": {"prompts": [{"box": CENTRE_BOX}]}}
    extra = json.loads(json.dumps(credentials).replace("KEY", key))
    response = post(url, "/sam2/segment_image", {**body, **extra.pop("json", {})}, **extra)
    assert response.status_code == status, response.text


SAM2, CONCEPT, DINO = "/sam2/segment_image", "/sam3/concept_segment", "/grounding_dino/infer"
BOXED: dict[str, Any] = {"image": IMAGE, "prompts": [{"box": CENTRE_BOX}]}
POINT = {"points": [{"x": 1, "y": 1}]}
OFF_IMAGE = {"box": {"x": 60, "y": 40, "width": 30, "height": 30}}
JUNK_GIF = base64.b64encode(b"GIF89a junk").decode()
HOSTILE = [
    (SAM2, {**BOXED, "image": {"type": "numpy", "value": "gASV"}}, 400, "pickled"),
    (
        CONCEPT,
        {"image": {"type": "url", "value": "http://10.0.0.1/"}, "prompts": [{"text": "a"}]},
        400,
        "no URLs",
    ),
    (CONCEPT, {"image": IMAGE, "prompts": [{"text": "cat"}] * 17}, 422, "at most 16"),
    (CONCEPT, {"image": IMAGE, "prompts": []}, 422, "at least 1"),
    (CONCEPT, {"image": IMAGE, "prompts": [{"type": "visual"}]}, 422, "at least one box"),
    (
        CONCEPT,
        {"image": IMAGE, "prompts": [{"boxes": [TOP_LEFT_BOX], "box_labels": [1, 0]}]},
        422,
        "one label",
    ),
    (SAM2, {**BOXED, "prompts": [{"box": CENTRE_BOX, **POINT}]}, 422, "together with points"),
    (SAM2, {**BOXED, "prompts": [POINT] * 17}, 422, "point prompts"),
    (SAM2, {**BOXED, "prompts": [OFF_IMAGE]}, 422, "outside"),
    (SAM2, {**BOXED, "prompts": []}, 422, "at least one prompt"),
    (SAM2, {**BOXED, "format": "binary"}, 422, "binary"),
    (SAM2, {**BOXED, "image": {"type": "base64", "value": "not base64!"}}, 400, "base64"),
    (SAM2, {**BOXED, "image": {"type": "base64", "value": JUNK_GIF}}, 400, "corrupt"),
    (SAM2, {"prompts": [{"box": CENTRE_BOX}]}, 400, "'image' is required"),
    (SAM2, [1, 2], 422, "must be an object"),
    (DINO, {"image": IMAGE, "text": []}, 422, "text"),
    (DINO, {"image": [IMAGE, IMAGE], "text": ["cat"]}, 422, "one image"),
    ("/sam2/embed_image", {"image_id": "x"}, 400, "'image' is required"),
]


@pytest.mark.parametrize(("route", "body", "status", "words"), HOSTILE)
def test_hostile_bodies_get_a_4xx_with_roboflows_message(
    url: str, key: str, route: str, body: Any, status: int, words: str
) -> None:
    response = post(url, route, body, headers={"X-API-Key": key})
    assert response.status_code == status, response.text
    answer = response.json()
    assert words in answer["message"] and answer["error"]["message"] == answer["message"]


def test_a_body_that_is_not_json_gets_a_4xx(url: str, key: str) -> None:
    response = httpx.post(f"{url}/sam2/segment_image", content=b'{"image": ', headers={"X-API-Key": key})
    assert response.status_code == 422 and "not valid JSON" in response.json()["message"]


def test_the_key_is_never_logged(
    url: str, key: str, key_and_log: tuple[Path, str, Path], sdk: dict[str, Any]
) -> None:
    post(
        url,
        "/sam2/segment_image",
        {"image": IMAGE, "prompts": [{"box": CENTRE_BOX}]},
        params={"api_key": key},
    )
    post(url, "/sam2/segment_image", {"image": {"type": "url"}, "api_key": key})  # refused, too
    log = key_and_log[2].read_text()
    assert "/sam2/segment_image" in log and "/sam3/concept_segment" in log  # the requests were logged
    assert key not in log
