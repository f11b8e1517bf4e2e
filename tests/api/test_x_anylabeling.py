"""X-AnyLabeling's remote-server protocol under /x-anylabeling, over real HTTP against tiny random
GroundingDINO + SAM, SAM 2, SAM 3 and a detector alone: requests built exactly as its desktop
client builds them (anylabeling/services/auto_labeling/remote_server.py), the `Token` key,
LabelMe shapes back, and hostile marks refused with a 4xx that says why."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from support import cli_server, image_bytes
from tunnelvision.models.random_families import write_random_family
from tunnelvision.security.keys import KeyStore

WIDTH, HEIGHT = 64, 48
PNG = image_bytes(WIDTH, HEIGHT)
PREFIX = "/x-anylabeling"
# The widget names the client's panel knows (AutoLabelingWidget.supported_remote_widgets).
CLIENT_WIDGETS = {
    "button_send", "button_add_point", "button_add_rect", "add_pos_rect", "add_neg_rect",
    "button_run_rect", "button_remove_point", "button_clear", "button_finish_object", "input_conf",
    "edit_conf", "input_iou", "edit_iou", "output_label", "output_select_combobox",
    "toggle_preserve_existing_annotations", "button_classes_filter", "button_run", "edit_text",
    "mask_fineness_slider", "mask_fineness_value_label", "remote_task_select_combobox",
}  # fmt: skip
SHAPE_FIELDS = {
    "label", "shape_type", "points", "score", "attributes", "description", "difficult", "direction",
    "flags", "group_id", "kie_linking",
}  # fmt: skip


@pytest.fixture(scope="module")
def served(
    tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, Path]]:
    """The server URL as a user pastes it into the client, the key, and the server's log."""
    folder = tmp_path_factory.mktemp("x-anylabeling")
    sam2, sam3 = (write_random_family(folder / family, family, "tiny", seed=1) for family in ("sam2", "sam3"))
    store = KeyStore(folder / "keys.json")
    key = store.add("labeler")
    detector = tiny_models[0]
    pipelines = {"sam2": sam2, "sam3": sam3, "boxes": detector}
    flags = [flag for name, spec in pipelines.items() for flag in ("--pipeline", f"{name}={spec}")]
    log = folder / "server.log"
    with cli_server(*tiny_models, *flags, "--keys-file", str(store.path), "--log-level", "info", log=log) as (
        url,
        _,
    ):
        yield f"{url}{PREFIX}", key, log


@pytest.fixture(scope="module")
def server_url(served: tuple[str, str, Path]) -> str:
    return served[0]


@pytest.fixture(scope="module")
def headers(served: tuple[str, str, Path]) -> dict[str, str]:
    """What the client sends with every request (RemoteServer.__init__)."""
    return {"Content-Type": "application/json", "Token": served[1]}


def client_payload(
    model: str, text_prompt: str | None = None, marks: list[dict[str, Any]] | None = None, **params: Any
) -> dict[str, Any]:
    """RemoteServer.predict_shapes: a PNG data URL, the panel's values, the prompt, the marks."""
    sent: dict[str, Any] = {"conf_threshold": 0.0, "iou_threshold": 0.0, "epsilon_factor": 0.001, **params}
    if text_prompt:
        sent["text_prompt"] = text_prompt.rstrip(".")
    if marks:
        sent["marks"] = marks
    image = f"data:image/png;base64,{base64.b64encode(PNG).decode('utf-8')}"
    return {"model": model, "image": image, "params": sent}


def predict(server_url: str, headers: dict[str, str], payload: Any) -> httpx.Response:
    return httpx.post(f"{server_url}/v1/predict", json=payload, headers=headers, timeout=60)


def shapes(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["data"]["description"] == "" and "replace" in body["data"]
    found: list[dict[str, Any]] = body["data"]["shapes"]
    for shape in found:
        assert set(shape) == SHAPE_FIELDS
        assert all(0 <= x <= WIDTH and 0 <= y <= HEIGHT for x, y in shape["points"])
        assert shape["score"] is None or 0.0 <= shape["score"] <= 1.0
    return found


def mark(kind: str, data: list[int], label: int = 1) -> dict[str, Any]:
    """As the canvas builds them (Canvas.update_auto_labeling_marks)."""
    return {"type": kind, "data": data, "label": label}


def test_health_answers_without_a_key(server_url: str) -> None:
    body = httpx.get(f"{server_url}/health").json()
    assert body["status"] == "healthy" and body["models_loaded"] == 4 and body["timestamp"].endswith("Z")


@pytest.mark.parametrize("token", [None, "not-a-key"])
def test_without_the_right_token_the_models_are_refused(server_url: str, token: str | None) -> None:
    response = httpx.get(f"{server_url}/v1/models", headers={"Token": token} if token else {})
    assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
    assert predict(server_url, {"Token": token} if token else {}, client_payload("sam2")).status_code == 401


def test_the_model_list_names_each_pipeline_with_the_widgets_the_client_knows(
    server_url: str, headers: dict[str, str]
) -> None:
    body = httpx.get(f"{server_url}/v1/models", headers=headers).json()
    assert body["success"] is True
    models = body["data"]
    assert list(models) == ["grounded-sam", "sam2", "sam3", "boxes"]
    names = {model: {w["name"] for w in info["widgets"]} for model, info in models.items()}
    assert all(widgets <= CLIENT_WIDGETS for widgets in names.values())
    assert {"edit_text", "button_send", "edit_conf"} <= names[
        "grounded-sam"
    ] and "mask_fineness_slider" in names["sam3"]
    assert {"button_add_point", "button_add_rect"} <= names["sam2"] and "edit_text" not in names["sam2"]
    assert {"add_pos_rect", "add_neg_rect"} <= names["sam3"] and "button_add_point" not in names["sam3"]
    assert "mask_fineness_slider" not in names["boxes"]
    assert (
        models["sam3"]["batch_processing_mode"] == "text_prompt"
        and models["sam2"]["batch_processing_mode"] is None
    )
    assert models["sam2"]["display_name"] == "sam2 (sam2)"


def test_one_models_info_and_an_unknown_one(server_url: str, headers: dict[str, str]) -> None:
    info = httpx.get(f"{server_url}/v1/models/sam3/info", headers=headers).json()
    assert info["success"] is True and info["data"]["model_id"] == "sam3"
    missing = httpx.get(f"{server_url}/v1/models/nope/info", headers=headers)
    assert missing.status_code == 404 and missing.json()["success"] is False


def test_a_text_prompt_gives_closed_polygons_labelled_with_its_phrases(
    server_url: str, headers: dict[str, str]
) -> None:
    found = shapes(predict(server_url, headers, client_payload("grounded-sam", "cat,dog.")))
    assert found and {s["label"] for s in found} <= {"cat", "dog"}
    for shape in found:
        assert shape["shape_type"] == "polygon" and len(shape["points"]) >= 4
        assert shape["points"][0] == shape["points"][-1]


def test_a_detector_alone_gives_rectangles_as_four_corners(server_url: str, headers: dict[str, str]) -> None:
    found = shapes(predict(server_url, headers, client_payload("boxes", "cat")))
    assert found and {s["shape_type"] for s in found} == {"rectangle"}
    for shape in found:
        (x1, y1), (x2, y1b), (x2b, y2), (x1b, y2b) = shape["points"]
        assert (x1, y1, x2, y2) == (x1b, y1b, x2b, y2b) and x1 <= x2 and y1 <= y2


def test_the_confidence_box_is_a_threshold(server_url: str, headers: dict[str, str]) -> None:
    loose = shapes(predict(server_url, headers, client_payload("boxes", "cat", conf_threshold=0.01)))
    strict = shapes(predict(server_url, headers, client_payload("boxes", "cat", conf_threshold=0.99)))
    assert len(strict) < len(loose) and all(s["score"] >= 0.01 for s in loose)


def test_a_rectangle_mark_cuts_one_object_whichever_corner_it_started_from(
    server_url: str, headers: dict[str, str]
) -> None:
    forward = shapes(
        predict(server_url, headers, client_payload("sam2", marks=[mark("rectangle", [4, 4, 40, 30])]))
    )
    backward = shapes(
        predict(server_url, headers, client_payload("sam2", marks=[mark("rectangle", [40, 30, 4, 4])]))
    )
    assert len(forward) == 1 and forward == backward
    assert forward[0]["label"] == "AUTOLABEL_OBJECT" and forward[0]["shape_type"] == "polygon"


def test_point_marks_make_one_object_and_fineness_simplifies_it(
    server_url: str, headers: dict[str, str]
) -> None:
    points = [mark("point", [20, 20]), mark("point", [50, 40], 0)]
    fine = shapes(
        predict(server_url, headers, client_payload("grounded-sam", marks=points, epsilon_factor=0.0))
    )
    coarse = shapes(
        predict(server_url, headers, client_payload("grounded-sam", marks=points, epsilon_factor=0.05))
    )
    assert len(fine) == len(coarse) == 1
    assert len(coarse[0]["points"]) < len(fine[0]["points"])


def test_sam3_takes_positive_and_negative_rectangles_with_the_text(
    server_url: str, headers: dict[str, str]
) -> None:
    marks = [mark("rectangle", [4, 4, 40, 30]), mark("rectangle", [30, 20, 60, 44], 0)]
    found = shapes(predict(server_url, headers, client_payload("sam3", "cat", marks, conf_threshold=0.01)))
    assert found and {s["label"] for s in found} == {"cat"}
    alone = shapes(predict(server_url, headers, client_payload("sam3", marks=marks, conf_threshold=0.01)))
    assert alone and {s["label"] for s in alone} == {"AUTOLABEL_OBJECT"}


HOSTILE = [
    (client_payload("sam2", marks=[mark("point", [100, 10])]), 422, "outside"),
    (client_payload("sam2", marks=[mark("rectangle", [4, 4, 400, 30])]), 422, "outside"),
    (client_payload("sam2", marks=[mark("rectangle", [-4, 4, 40, 30])]), 422, "negative"),
    (client_payload("sam2", marks=[mark("rectangle", [4, 4, 4, 30])]), 422, "degenerate"),
    (client_payload("sam2", marks=[mark("point", [10, 10])] * 257), 422, "256"),
    (client_payload("sam2", marks=[mark("point", [10, 10, 20, 20])]), 422, "2 numbers"),
    (client_payload("sam2", marks=[{"type": "polygon", "data": [1, 2], "label": 1}]), 422, "marks.0.type"),
    (client_payload("sam2", marks=[{"type": "point", "data": ["a", 2], "label": 1}]), 422, "marks.0.data"),
    (client_payload("sam2", marks=[mark("point", [10, 10], 2)]), 422, "marks.0.label"),
    (client_payload("sam2", marks=[mark("point", [9, 9]), mark("rectangle", [4, 4, 9, 9])]), 422, "not both"),
    (client_payload("sam2", marks=[mark("rectangle", [4, 4, 40, 30], 0)]), 422, "negative rectangles"),
    (client_payload("sam3", marks=[mark("point", [10, 10])]), 422, "not points"),
    (client_payload("boxes", marks=[mark("point", [10, 10])]), 422, "text prompt"),
    (client_payload("sam2", "cat"), 422, "cannot take text"),
    (client_payload("sam2"), 422, "nothing to do"),
    (client_payload("nope", "cat"), 422, "grounded-sam, sam2, sam3, boxes"),
    (client_payload("grounded-sam", "cat", conf_threshold=2), 422, "conf_threshold"),
    ({**client_payload("grounded-sam", "cat"), "image": "data:image/png;base64,!!!"}, 400, "base64"),
    ({"model": "sam2", "params": {}}, 422, "image"),
    ([], 422, "must be an object"),
]  # fmt: skip


@pytest.mark.parametrize(("payload", "status", "words"), HOSTILE)
def test_hostile_requests_get_a_4xx_that_says_why(
    server_url: str, headers: dict[str, str], payload: Any, status: int, words: str
) -> None:
    response = predict(server_url, headers, payload)
    assert response.status_code == status, response.text
    body = response.json()
    assert body["success"] is False and words in body["error"]["message"], body


def test_a_body_that_is_not_json_gets_a_4xx(server_url: str, headers: dict[str, str]) -> None:
    response = httpx.post(f"{server_url}/v1/predict", content=b"{", headers=headers)
    assert response.status_code == 422 and response.json()["success"] is False


def test_the_token_is_never_logged(served: tuple[str, str, Path], headers: dict[str, str]) -> None:
    server_url, key, log = served
    predict(server_url, headers, client_payload("sam2", marks=[mark("point", [10, 10])]))
    text = log.read_text()
    assert f"{PREFIX}/v1/predict" in text and key not in text
