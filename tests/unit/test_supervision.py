"""`result.to_supervision()`: answers of the real server as supervision's own `sv.Detections`,
checked field by field and drawn by supervision's annotators."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import supervision as sv

from support import ThreadServer, image_bytes, make_settings
from tunnelvision import AsyncClient, Client
from tunnelvision.client import decode_masks
from tunnelvision.models.grounded_sam import GroundedSam
from tunnelvision.schemas import DetectResponse, SegmentResponse

WIDTH, HEIGHT = 96, 64
PNG = image_bytes(WIDTH, HEIGHT)
PIXELS = np.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8)
PHRASES = ["dog", "cat"]  # not alphabetical: class ids follow the request's order
FOUND: dict[str, Any] = {"prompt": PHRASES, "box_threshold": 0.0, "text_threshold": 0.0, "max_detections": 4}


@pytest.fixture(scope="module")
def client(tiny_models: tuple[Path, Path]) -> Iterator[Client]:
    backend = GroundedSam(str(tiny_models[0]), str(tiny_models[1]), device="cpu")
    with ThreadServer(make_settings(), backend) as server, Client(server.url) as client:
        yield client


def annotate_with_supervision(detections: sv.Detections) -> None:
    """supervision's own annotators take the detections as they are (default colour by class)."""
    annotators: list[sv.BoxAnnotator | sv.LabelAnnotator | sv.MaskAnnotator] = [
        sv.BoxAnnotator(),
        sv.LabelAnnotator(),
    ]
    if detections.mask is not None:
        annotators.append(sv.MaskAnnotator())
    for annotator in annotators:
        drawn = annotator.annotate(PIXELS.copy(), detections)
        assert drawn.shape == PIXELS.shape


@pytest.mark.parametrize("mask_format", ["rle", "polygon", "png"])
def test_a_segment_answer_in_each_mask_format_becomes_sv_detections(client: Client, mask_format: str) -> None:
    result = client.segment(PNG, mask_format=mask_format, **FOUND)
    labels = [d.label for d in result.detections]
    assert result.detections and set(labels) <= set(PHRASES)

    detections = result.to_supervision()

    assert isinstance(detections, sv.Detections) and len(detections) == len(result.detections)
    assert detections.xyxy.dtype.kind == "f" and detections.xyxy.shape == (len(labels), 4)
    np.testing.assert_allclose(detections.xyxy, [d.box for d in result.detections], atol=1e-3)
    assert isinstance(detections.mask, np.ndarray) and detections.mask.dtype == bool
    assert detections.mask.shape == (len(labels), HEIGHT, WIDTH)
    np.testing.assert_array_equal(detections.mask, np.stack(decode_masks(result)))
    assert detections.mask.any()
    assert detections.confidence is not None
    np.testing.assert_allclose(
        detections.confidence, [float(d.score or 0) for d in result.detections], atol=1e-6
    )
    assert detections.class_id is not None
    assert detections.class_id.tolist() == [PHRASES.index(str(label)) for label in labels]
    assert np.asarray(detections.data["class_name"]).tolist() == labels
    np.testing.assert_allclose(
        np.asarray(detections.data["mask_score"]), [d.mask_score for d in result.detections]
    )
    annotate_with_supervision(detections)


def test_lossless_mask_formats_give_identical_detections(client: Client) -> None:
    rle, png = (client.segment(PNG, mask_format=f, **FOUND).to_supervision() for f in ("rle", "png"))
    np.testing.assert_array_equal(rle.mask, png.mask)
    np.testing.assert_array_equal(rle.xyxy, png.xyxy)
    assert rle.class_id is not None and png.class_id is not None
    assert rle.class_id.tolist() == png.class_id.tolist()


def test_detect_and_mask_format_none_have_no_masks(client: Client) -> None:
    detected = client.detect(PNG, **FOUND)
    assert isinstance(detected, DetectResponse) and detected.detections
    for result in (detected, client.segment(PNG, mask_format="none", **FOUND)):
        detections = result.to_supervision()
        assert detections.mask is None and len(detections) == len(result.detections)
        assert detections.class_id is not None
        assert detections.class_id.tolist() == [PHRASES.index(str(d.label)) for d in result.detections]
        annotate_with_supervision(detections)


def test_box_and_point_prompts_have_no_class_and_no_detector_score(client: Client) -> None:
    boxed = client.segment(PNG, boxes=[[4, 4, 60, 40], [30, 10, 90, 60]])
    pointed = client.segment(PNG, points=[[20, 20, 1]], mask_format="png")
    for result in (boxed, pointed):
        detections = result.to_supervision()
        assert detections.class_id is not None and detections.class_id.tolist() == [-1] * len(
            result.detections
        )
        assert np.asarray(detections.data["class_name"]).tolist() == [""] * len(result.detections)
        assert detections.confidence is None  # no detector ran; SAM's own score is kept in data
        np.testing.assert_allclose(
            np.asarray(detections.data["mask_score"]), [d.mask_score for d in result.detections]
        )
        assert detections.mask is not None and detections.mask.shape[1:] == (HEIGHT, WIDTH)
        annotate_with_supervision(detections)


def test_class_ids_count_in_the_classes_given(client: Client) -> None:
    result = client.segment(PNG, prompt="Dog. cat", box_threshold=0.0, text_threshold=0.0)
    labels = [d.label for d in result.detections]
    assert labels and {str(label) for label in labels} <= {"Dog", "cat"}  # as the user wrote them
    in_request_order = [PHRASES.index(str(label).lower()) for label in labels]
    assert result.to_supervision().class_id.tolist() == in_request_order
    # Ids stable across a whole dataset: the caller's class list, whatever this request asked.
    classes = ["bird", "cat", "dog"]
    expected = [classes.index(str(label).lower()) for label in labels]  # matched regardless of case
    assert result.to_supervision(classes=classes).class_id.tolist() == expected
    assert result.to_supervision(classes="Bird . cat . dog").class_id.tolist() == expected
    assert result.to_supervision(classes=["bird"]).class_id.tolist() == [-1] * len(labels)


def test_the_async_client_numbers_classes_in_its_request_too(client: Client) -> None:
    async def segment() -> SegmentResponse:
        async with AsyncClient(client.url) as async_client:
            return await async_client.segment(PNG, **FOUND)

    result = asyncio.run(segment())
    class_id = result.to_supervision().class_id
    assert class_id is not None
    assert class_id.tolist() == [PHRASES.index(str(d.label)) for d in result.detections]


def test_an_answer_read_from_json_numbers_labels_as_they_first_appear() -> None:
    result = SegmentResponse.model_validate(
        {
            "image": {"width": 4, "height": 2},
            "image_id": "0" * 32,
            "mask_format": "polygon",
            "detections": [
                {
                    "label": lab,
                    "score": 0.5,
                    "box": [0, 0, 2, 2],
                    "mask": [[0, 0, 2, 0, 2, 2]],
                    "mask_score": 0.9,
                }
                for lab in ("cat", "dog", "cat", None)
            ],
            "timings_ms": {},
        }
    )
    detections = result.to_supervision()
    assert detections.class_id.tolist() == [0, 1, 0, -1]
    assert detections.mask.shape == (4, 2, 4)


def test_an_empty_answer_is_an_empty_sv_detections() -> None:
    result = SegmentResponse.model_validate(
        {
            "image": {"width": 5, "height": 3},
            "image_id": "0" * 32,
            "mask_format": "rle",
            "detections": [],
            "timings_ms": {},
        }
    )
    detections = result.to_supervision()
    assert len(detections) == 0 and detections.xyxy.shape == (0, 4)
    assert detections.mask is not None and detections.mask.shape == (0, 3, 5)
    annotate_with_supervision(detections)


def test_the_client_imports_supervision_only_when_asked() -> None:
    probe = "import sys, tunnelvision.client; print('supervision' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.strip() == "False"
