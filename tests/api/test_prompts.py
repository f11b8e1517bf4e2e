"""Prompts as users write them: a JSON list in a multipart field, labels in the user's spelling,
a file sent in the wrong field."""

from __future__ import annotations

import httpx

from support import ThreadServer, image_bytes

PNG = image_bytes(32, 24)


def detect(url: str, **data: str | list[str]) -> httpx.Response:
    return httpx.post(f"{url}/v1/detect", files={"image": ("i.png", PNG)}, data=data, timeout=10)


def test_a_multipart_prompt_holding_a_json_list_is_a_list_of_labels(server: ThreadServer) -> None:
    # The simulated backend labels its one detection with the first phrase it was given.
    answer = detect(server.url, prompt='["Fork lift", "person"]')
    assert answer.status_code == 200, answer.text
    assert [d["label"] for d in answer.json()["detections"]] == ["Fork lift"]


def test_labels_come_back_as_the_user_wrote_them(server: ThreadServer) -> None:
    for prompt in ("Forklift . person", ["Forklift", "person"]):
        answer = detect(server.url, prompt=prompt)
        assert answer.status_code == 200, answer.text
        assert answer.json()["detections"][0]["label"] == "Forklift"


def test_a_prompt_field_that_starts_like_json_but_is_not_a_list_of_strings_is_a_422(
    server: ThreadServer,
) -> None:
    for prompt in ("[1, 2]", '["cat"', '[{"a": 1}]'):
        answer = detect(server.url, prompt=prompt)
        assert answer.status_code == 422, (prompt, answer.text)
        assert "'prompt'" in answer.json()["error"]["message"]


def test_a_file_in_a_field_other_than_image_names_the_image_field(server: ThreadServer) -> None:
    answer = httpx.post(
        f"{server.url}/v1/detect", files={"file": ("i.png", PNG)}, data={"prompt": "cat"}, timeout=10
    )
    assert answer.status_code == 422
    message = answer.json()["error"]["message"]
    assert "'file'" in message and "image=@" in message
