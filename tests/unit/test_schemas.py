from __future__ import annotations

import pytest
from pydantic import ValidationError

from tunnelvision.schemas import DetectRequestParams, SegmentParams, normalize_prompt


def test_prompts_keep_the_users_phrases_tidied() -> None:
    assert normalize_prompt("A Cat . dog.  ") == ["A Cat", "dog"]
    assert normalize_prompt(["Fork  Lift", "person", "person"]) == ["Fork Lift", "person"]
    assert normalize_prompt("Forklift . forklift . FORKLIFT . Person") == ["Forklift", "Person"]
    assert normalize_prompt(" . ") == []
    with pytest.raises(ValueError):
        normalize_prompt(["a.b"])


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"prompt": " . "},
        {"prompt": "cat", "box_threshold": 1.5},
        {"prompt": "cat", "text_threshold": -0.1},
        {"prompt": "cat", "max_detections": 0},
        {"prompt": "cat", "unknown": 1},
    ],
)
def test_detect_params_refuse_bad_values(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        DetectRequestParams.model_validate(fields)


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"prompt": "cat", "boxes": [[0, 0, 5, 5]]},
        {"boxes": [[5, 5, 5, 9]]},
        {"boxes": [[-1, 0, 5, 9]]},
        {"boxes": [[0, 0, 5]]},
        {"points": [[1, 1, 2]]},
        {"points": [[1, 1]]},
        {"prompt": "cat", "mask_format": "bmp"},
    ],
)
def test_segment_params_refuse_bad_prompts(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        SegmentParams.model_validate(fields)


def test_segment_params_accept_each_prompt_kind() -> None:
    assert SegmentParams(prompt="cat").phrases == ["cat"]
    assert SegmentParams(boxes=[[0, 0, 5, 5]]).boxes == [[0, 0, 5, 5]]
    assert SegmentParams(points=[[1, 2, 1], [3, 4, 0]], mask_format="png").points
