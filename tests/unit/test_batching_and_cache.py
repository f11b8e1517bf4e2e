"""Batches and the embedding cache change speed, never answers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tunnelvision.models.grounded_sam import GroundedSam
from tunnelvision.schemas import DetectParams, SegmentParams


@pytest.fixture(scope="module")
def backend(tiny_models: tuple[Path, Path]) -> GroundedSam:
    return GroundedSam(str(tiny_models[0]), str(tiny_models[1]), device="cpu", cache_bytes=64 * 1024**2)


def image(seed: int, height: int = 120, width: int = 160) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)


def answer(backend: GroundedSam, raw: Any, params: DetectParams, prepared: Any) -> list[dict[str, Any]]:
    return [d.model_dump() for d in backend.finish(raw, params, prepared)]


REQUESTS: list[DetectParams] = [
    SegmentParams(prompt="cat", box_threshold=0.0, max_detections=3),
    SegmentParams(
        prompt="red forklift . person . a dog", box_threshold=0.0, max_detections=4, multimask=True
    ),
    DetectParams(prompt="bicycle", box_threshold=0.0, max_detections=5),
    SegmentParams(boxes=[[5, 5, 60, 70], [20, 30, 150, 110]]),
    SegmentParams(points=[[40, 50, 1], [100, 20, 0]], mask_format="polygon"),
]


def test_a_batch_answers_exactly_as_one_by_one(backend: GroundedSam) -> None:
    prepared = [backend.prepare(image(seed), params) for seed, params in enumerate(REQUESTS)]
    keys = {backend.batch_key(p, params) for p, params in zip(prepared, REQUESTS, strict=True)}
    assert len(keys) == 2  # the three text prompts share a detector pass, box/point prompts a SAM pass
    batched = backend.run_batch(list(zip(prepared, REQUESTS, strict=True)))
    for raw, p, params in zip(batched, prepared, REQUESTS, strict=True):
        alone = backend.run(p, params)
        assert answer(backend, raw, params, p) == answer(backend, alone, params, p)


def test_images_of_different_sizes_get_different_batch_keys(backend: GroundedSam) -> None:
    params = DetectParams(prompt="cat")
    small, large = backend.prepare(image(0, 120, 160), params), backend.prepare(image(1, 300, 200), params)
    assert backend.batch_key(small, params) != backend.batch_key(large, params)


def test_a_second_prompt_on_the_same_image_reuses_its_embedding(backend: GroundedSam) -> None:
    backend.clear_caches()
    pixels = image(7)
    first_params = SegmentParams(prompt="cat", box_threshold=0.0, max_detections=2)
    first = backend.prepare(pixels, first_params, image_id="img-7")
    cold = answer(backend, backend.run(first, first_params), first_params, first)
    before = backend.cache_stats()
    warm = answer(backend, backend.run(first, first_params), first_params, first)
    after = backend.cache_stats()
    assert warm == cold  # identical masks from the cached embedding
    assert after["hits"] == before["hits"] + 1 and after["entries"] == 1 and after["bytes"] > 0
    other_params = SegmentParams(boxes=[[0, 0, 50, 50]])
    other = backend.prepare(pixels, other_params, image_id="img-7")
    backend.run(other, other_params)
    assert backend.cache_stats()["hits"] == after["hits"] + 1


def test_without_an_image_id_nothing_is_cached(backend: GroundedSam) -> None:
    backend.clear_caches()
    params = SegmentParams(boxes=[[0, 0, 50, 50]])
    for seed in (1, 2):
        backend.run(backend.prepare(image(seed), params), params)
    assert backend.cache_stats()["entries"] == 0


def test_the_cache_is_bounded_in_bytes(tiny_models: tuple[Path, Path]) -> None:
    one_embedding = 16 * 16 * 16 * 4  # tiny SAM: 16 channels x 16 x 16 float32
    small = GroundedSam(str(tiny_models[0]), str(tiny_models[1]), device="cpu", cache_bytes=2 * one_embedding)
    params = SegmentParams(boxes=[[0, 0, 50, 50]])
    for seed in range(4):
        small.run(small.prepare(image(seed), params, image_id=f"img-{seed}"), params)
    stats = small.cache_stats()
    assert stats["entries"] == 2 and stats["bytes"] <= 2 * one_embedding and stats["evictions"] == 2
