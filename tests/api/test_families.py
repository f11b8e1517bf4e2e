"""SAM 2.1, OWLv2 and SAM 3 end to end over real HTTP, on tiny random checkpoints of each: text,
boxes and points, exemplars, every mask format, the embedding cache, bad input; and, in
process, batches that answer exactly as one request at a time."""

from __future__ import annotations

import base64
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from support import cli_server, image_bytes, make_settings
from tunnelvision.client import Client
from tunnelvision.engine.pipeline import DeviceBackend
from tunnelvision.models.factory import build_backends
from tunnelvision.models.random_families import write_random_family
from tunnelvision.schemas import DetectParams, SegmentParams

NEW_FAMILIES = ("mm-grounding-dino", "owlv2", "sam2", "sam3")
WIDTH, HEIGHT = 64, 48
PNG = image_bytes(WIDTH, HEIGHT)
BOX: list[float] = [4, 4, 40, 30]
POSITIVE: list[float] = [*BOX, 1]
NEGATIVE: list[float] = [30, 20, 60, 44, 0]


@pytest.fixture(scope="session")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint of each new family, as `tunnelvision models random --family` writes."""
    out = tmp_path_factory.mktemp("families")
    return {family: write_random_family(out / family, family, "tiny", seed=1) for family in NEW_FAMILIES}


def pipeline_flags(families: dict[str, Path]) -> list[str]:
    specs = {
        "sam2": f"{families['sam2']}",
        "owl": f"{families['owlv2']}",
        "owl-sam2": f"{families['owlv2']}+{families['sam2']}",
        "sam3": f"{families['sam3']}",
        "mm-sam2": f"{families['mm-grounding-dino']}+{families['sam2']}",
    }
    return [flag for name, spec in specs.items() for flag in ("--pipeline", f"{name}={spec}")]


@pytest.fixture(scope="module")
def url(tiny_models: tuple[Path, Path], families: dict[str, Path]) -> Iterator[str]:
    with cli_server(*tiny_models, *pipeline_flags(families)) as (server_url, _):
        yield server_url


def post(url: str, route: str, image: bytes = PNG, **fields: Any) -> httpx.Response:
    data = {k: json.dumps(v) if isinstance(v, list) else str(v) for k, v in fields.items()}
    return httpx.post(f"{url}{route}", files={"image": ("i.png", image, "image/png")}, data=data, timeout=60)


def post_open(url: str, route: str, **fields: Any) -> httpx.Response:
    """`post` with both thresholds at 0: random weights score too low for the defaults."""
    return post(url, route, box_threshold=0.0, text_threshold=0.0, **fields)


def ok(response: httpx.Response) -> list[dict[str, Any]]:
    assert response.status_code == 200, response.text
    detections: list[dict[str, Any]] = response.json()["detections"]
    return detections


def refused(response: httpx.Response, code: str) -> str:
    assert response.status_code == 422, response.text
    error = response.json()["error"]
    assert error["code"] == code
    message: str = error["message"]
    return message


def cache_hits(url: str) -> int:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "tunnelvision_cache_hits_total" and sample.labels["cache"] == "embeddings":
                return int(sample.value)
    raise AssertionError("no embeddings cache counter in /metrics")


def test_models_lists_the_families_and_their_abilities(url: str) -> None:
    pipelines = {p["name"]: p for p in httpx.get(f"{url}/v1/models").json()["pipelines"]}
    abilities = {name: pipelines[name]["abilities"] for name in ("sam2", "owl", "owl-sam2", "sam3")}
    assert abilities == {
        "sam2": ["boxes", "masks", "points"],
        "owl": ["exemplars", "text"],
        "owl-sam2": ["boxes", "exemplars", "masks", "points", "text"],
        "sam3": ["exemplars", "masks", "text"],
    }
    assert [(m["role"], m["family"]) for m in pipelines["owl-sam2"]["models"]] == [
        ("detector", "owlv2"),
        ("segmenter", "sam2"),
    ]
    assert [(m["role"], m["family"]) for m in pipelines["sam3"]["models"]] == [("concept_segmenter", "sam3")]


def test_sam2_cuts_boxes_and_points(url: str) -> None:
    boxes = ok(post(url, "/v1/segment", model="sam2", boxes=[BOX, [10, 10, 60, 40]]))
    assert [d["box"] for d in boxes] == [[float(v) for v in BOX], [10.0, 10.0, 60.0, 40.0]]
    assert all(d["label"] is None and d["mask"]["size"] == [HEIGHT, WIDTH] for d in boxes)
    points = ok(post(url, "/v1/segment", model="sam2", points=[[20, 20, 1], [50, 40, 0]], multimask="true"))
    assert len(points) == 1 and points[0]["label"] is None and points[0]["score"] is None
    x1, y1, x2, y2 = points[0]["box"]  # a point prompt's box is its mask's extent
    assert 0 <= x1 <= x2 <= WIDTH and 0 <= y1 <= y2 <= HEIGHT


@pytest.mark.parametrize("model", ["sam2", "sam3"])
def test_every_mask_format(url: str, model: str) -> None:
    prompt = (
        {"boxes": [BOX]}
        if model == "sam2"
        else {"prompt": "cat", "box_threshold": 0.0, "text_threshold": 0.0, "max_detections": 2}
    )
    answers = {
        f: ok(post(url, "/v1/segment", model=model, mask_format=f, **prompt))
        for f in ("rle", "polygon", "png", "none")
    }
    assert len({len(a) for a in answers.values()}) == 1 and answers["rle"]
    first = {f: a[0]["mask"] for f, a in answers.items()}
    assert first["rle"]["size"] == [HEIGHT, WIDTH] and isinstance(first["rle"]["counts"], str)
    assert isinstance(first["polygon"], list)
    assert Image.open(io.BytesIO(base64.b64decode(first["png"]))).size == (WIDTH, HEIGHT)
    assert first["none"] is None


def test_owlv2_detects_from_text_from_exemplars_and_from_both(url: str) -> None:
    text = ok(post_open(url, "/v1/detect", model="owl", prompt="cat . dog", max_detections=5))
    assert len(text) == 5 and {d["label"] for d in text} <= {"cat", "dog"}
    assert all(0 <= x <= WIDTH and 0 <= y <= HEIGHT for d in text for x, y in (d["box"][:2], d["box"][2:]))
    alone = ok(post_open(url, "/v1/detect", model="owl", exemplars=[POSITIVE], max_detections=3))
    assert len(alone) == 3 and {d["label"] for d in alone} == {None}
    both = ok(
        post_open(url, "/v1/segment", model="owl-sam2", prompt="cat", exemplars=[POSITIVE], nms_iou=1.0)
    )
    assert {d["label"] for d in both} == {"cat", None} and all(d["mask"] for d in both)
    # A negative exemplar drops what matches it better than the positive: never more boxes.
    with_negative = ok(post_open(url, "/v1/detect", model="owl", exemplars=[POSITIVE, NEGATIVE], nms_iou=1.0))
    only_positive = ok(post_open(url, "/v1/detect", model="owl", exemplars=[POSITIVE], nms_iou=1.0))
    assert len(with_negative) < len(only_positive)


def test_sam3_finds_instances_from_text_exemplars_or_both(url: str) -> None:
    # Random weights: scores near 0.25 and boxes in about one place, so no threshold and no NMS.
    fields: dict[str, Any] = {
        "model": "sam3",
        "box_threshold": 0.0,
        "text_threshold": 0.0,
        "max_detections": 3,
        "nms_iou": 1.0,
    }
    text = ok(post(url, "/v1/segment", prompt="cat . dog", **fields))
    assert len(text) == 3 and {d["label"] for d in text} <= {"cat", "dog"}
    assert all(d["mask"]["size"] == [HEIGHT, WIDTH] and d["score"] == d["mask_score"] for d in text)
    exemplars = ok(post(url, "/v1/segment", exemplars=[POSITIVE, NEGATIVE], **fields))
    assert len(exemplars) == 3 and {d["label"] for d in exemplars} == {None}
    both = ok(post(url, "/v1/segment", prompt="cat", exemplars=[POSITIVE], **fields))
    assert {d["label"] for d in both} == {"cat"} and both != text
    boxes_only = ok(post(url, "/v1/detect", prompt="cat", **fields))
    assert boxes_only and all(set(d) == {"label", "score", "box"} for d in boxes_only)


@pytest.mark.parametrize("model", ["sam2", "sam3"])
def test_a_cache_hit_answers_as_the_cold_request(url: str, model: str) -> None:
    prompt = (
        {"boxes": [BOX]}
        if model == "sam2"
        else {"prompt": "cat", "box_threshold": 0.0, "text_threshold": 0.0, "max_detections": 2}
    )
    unseen = image_bytes(96, 64, seed=len(model))  # an image no other test sent: its first pass encodes
    cold = post(url, "/v1/segment", image=unseen, model=model, **prompt)
    hits = cache_hits(url)
    warm = httpx.post(
        f"{url}/v1/segment", json={"image_id": cold.json()["image_id"], "model": model, **prompt}, timeout=60
    )
    assert ok(warm) == ok(cold)
    assert cache_hits(url) == hits + 1  # the second prompt skipped the image encoder
    assert cold.json()["timings_ms"]["encode"] > 0  # and the answers say so
    assert "encode" not in warm.json()["timings_ms"]


def test_the_clients_send_exemplars(url: str) -> None:
    with Client(url) as client:
        found = client.segment(
            PNG,
            model="sam3",
            exemplars=[POSITIVE],
            box_threshold=0.0,
            text_threshold=0.0,
            nms_iou=1.0,
            max_detections=2,
        )
        assert len(found.detections) == 2 and found.detections[0].label is None
        assert client.detect(
            PNG, model="owl", exemplars=[POSITIVE], box_threshold=0.0, text_threshold=0.0
        ).detections


@pytest.mark.parametrize(
    ("model", "fields", "code", "message"),
    [
        (
            "sam3",
            {"exemplars": [[10, 10, 70, 40, 1]]},
            "invalid_input",
            "exemplar 0 reaches outside the 64x48 image",
        ),
        ("owl-sam2", {"exemplars": [[10, 10, 20, 49, 1]]}, "invalid_input", "exemplar 0 reaches outside"),
        ("sam3", {"exemplars": [[10, 10, 20, 20, 2]]}, "invalid_input", "exemplar 0 has label 2"),
        ("sam3", {"exemplars": [[20, 10, 10, 20, 1]]}, "invalid_input", "exemplar 0 is degenerate"),
        ("sam3", {"exemplars": [[1, 2, 3, 4, 1]] * 65}, "invalid_input", "exemplars"),
        (
            "sam2",
            {"exemplars": [POSITIVE]},
            "unsupported_prompt",
            "cannot take exemplar boxes; it takes: box",
        ),
        ("grounded-sam", {"exemplars": [POSITIVE]}, "unsupported_prompt", "cannot take exemplar boxes"),
        ("sam3", {"boxes": [BOX]}, "unsupported_prompt", "cannot take box prompts; it takes: exemplar boxes"),
        ("sam3", {"exemplars": [POSITIVE], "boxes": [BOX]}, "invalid_input", "give only one of"),
    ],
)
def test_bad_exemplars_get_422_naming_the_problem(
    url: str, model: str, fields: dict[str, Any], code: str, message: str
) -> None:
    assert message in refused(post(url, "/v1/segment", model=model, **fields), code)
    assert httpx.get(f"{url}/healthz").status_code == 200


# -- in process: batches answer exactly as one request at a time ------------------------------


@pytest.fixture(scope="module")
def backend(families: dict[str, Path]) -> DeviceBackend:
    settings = make_settings(pipeline=pipeline_flags(families)[1::2], device="cpu", cache_bytes=2**26)
    (built,) = build_backends(settings)
    assert isinstance(built, DeviceBackend)
    return built


def image(seed: int, height: int = 120, width: int = 160) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def answer(backend: DeviceBackend, raw: Any, params: DetectParams, prepared: Any) -> list[dict[str, Any]]:
    return [d.model_dump() for d in backend.finish(raw, params, prepared)]


BATCHES: dict[str, list[DetectParams]] = {
    "sam2": [
        SegmentParams(model="sam2", boxes=[[5, 5, 60, 70], [20, 30, 150, 110]]),
        SegmentParams(model="sam2", points=[[40, 50, 1], [100, 20, 0]], multimask=True),
        SegmentParams(model="sam2", boxes=[[0, 0, 50, 50]], mask_format="polygon"),
    ],
    "owl-sam2": [
        SegmentParams(
            model="owl-sam2", prompt="cat . dog", box_threshold=0.0, text_threshold=0.0, max_detections=3
        ),
        DetectParams(
            model="owl-sam2", prompt="bicycle", box_threshold=0.0, text_threshold=0.0, max_detections=5
        ),
        SegmentParams(
            model="owl-sam2",
            exemplars=[[5, 5, 60, 70, 1]],
            box_threshold=0.0,
            text_threshold=0.0,
            max_detections=2,
        ),
    ],
    "sam3": [
        SegmentParams(
            model="sam3", prompt="cat . dog", box_threshold=0.0, text_threshold=0.0, max_detections=3
        ),
        SegmentParams(
            model="sam3",
            exemplars=[[5, 5, 60, 70, 1], [20, 30, 150, 110, 0]],
            box_threshold=0.0,
            text_threshold=0.0,
        ),
        DetectParams(
            model="sam3",
            prompt="person",
            exemplars=[[5, 5, 60, 70, 1]],
            box_threshold=0.0,
            text_threshold=0.0,
        ),
    ],
}


@pytest.mark.parametrize("pipeline", list(BATCHES))
def test_a_batch_answers_exactly_as_one_by_one(backend: DeviceBackend, pipeline: str) -> None:
    requests = BATCHES[pipeline]
    prepared = [backend.prepare(image(seed), params) for seed, params in enumerate(requests)]
    items = list(zip(prepared, requests, strict=True))
    batched = backend.run_batch(items)
    for raw, (p, params) in zip(batched, items, strict=True):
        assert answer(backend, raw, params, p) == answer(backend, backend.run(p, params), params, p)


def test_sam3_reuses_the_vision_features_for_a_second_prompt(backend: DeviceBackend) -> None:
    backend.clear_caches()
    pixels = image(9)
    first = SegmentParams(model="sam3", prompt="cat", box_threshold=0.0, text_threshold=0.0, max_detections=2)
    prepared = backend.prepare(pixels, first, image_id="img-9")
    cold = answer(backend, backend.run(prepared, first), first, prepared)
    hits = backend.cache_stats()["hits"]
    assert answer(backend, backend.run(prepared, first), first, prepared) == cold
    second = SegmentParams(model="sam3", exemplars=[[5, 5, 60, 70, 1]], box_threshold=0.0, text_threshold=0.0)
    backend.run(backend.prepare(pixels, second, image_id="img-9"), second)
    assert backend.cache_stats()["hits"] == hits + 2 and backend.cache_stats()["entries"] == 1


def test_mm_grounding_dino_finds_and_sam2_cuts_from_text(url: str) -> None:
    """An MM-Grounding-DINO / LLMDet checkpoint is served by the GroundingDINO family, here with
    SAM 2.1 as its segmenter: text in, labelled boxes and masks out, every mask format."""
    models = {p["name"]: p for p in httpx.get(f"{url}/v1/models", timeout=10).json()["pipelines"]}
    assert [m["family"] for m in models["mm-sam2"]["models"]] == ["mm-grounding-dino", "sam2"]
    for mask_format in ("rle", "polygon", "png", "none"):
        found = ok(
            post(
                url,
                "/v1/segment",
                model="mm-sam2",
                prompt="cat . dog",
                box_threshold=0,
                text_threshold=0,
                max_detections=3,
                mask_format=mask_format,
            )
        )
        assert len(found) == 3 and {d["label"] for d in found} <= {"cat", "dog"}
        assert all((d["mask"] is None) == (mask_format == "none") for d in found)
