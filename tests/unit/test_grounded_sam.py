"""The real backend on tiny random checkpoints, loaded through the code users run."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tunnelvision.engine.cache import ByteLRU
from tunnelvision.errors import DeviceOutOfMemory, InvalidInput
from tunnelvision.models.grounded_sam import GroundedSam
from tunnelvision.models.grounding_dino import phrase_token_spans
from tunnelvision.models.roles import Boxes
from tunnelvision.schemas import RLE, DetectParams, Segmentation, SegmentParams


@pytest.fixture(scope="module")
def backend(tiny_models: tuple[Path, Path]) -> GroundedSam:
    return GroundedSam(str(tiny_models[0]), str(tiny_models[1]), device="cpu")


@pytest.fixture
def image() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)


def parts(backend: GroundedSam) -> tuple[Any, Any]:
    """The detector and segmenter of the backend's one pipeline."""
    pipeline = backend.pipelines["grounded-sam"]
    return pipeline.detector, pipeline.segmenter  # type: ignore[attr-defined]


def predict(backend: GroundedSam, image: np.ndarray, params: DetectParams) -> list[Any]:
    prepared = backend.prepare(image, params)
    return backend.finish(backend.run(prepared, params), params, prepared)


def test_phrase_spans_follow_the_separators() -> None:
    # [CLS] a cat . fork ##lift . [SEP]
    assert phrase_token_spans([101, 5, 6, 1012, 7, 8, 1012, 102], 2) == [(1, 3), (4, 6)]
    with pytest.raises(InvalidInput):
        phrase_token_spans([101, 5, 1012, 102], 2)


def test_detections_carry_the_users_phrases_inside_the_image(backend: GroundedSam, image: np.ndarray) -> None:
    params = DetectParams(prompt="Red Forklift . zebra", box_threshold=0.0, max_detections=10)
    detections = predict(backend, image, params)
    assert 0 < len(detections) <= 10
    for d in detections:
        assert d.label in {"Red Forklift", "zebra"}  # never '[SEP]' or '##' pieces
        x1, y1, x2, y2 = d.box
        assert 0 <= x1 <= x2 <= 160 and 0 <= y1 <= y2 <= 120
    scores = [d.score for d in detections]
    assert scores == sorted(scores, reverse=True)


def test_thresholds_and_max_detections_filter(backend: GroundedSam, image: np.ndarray) -> None:
    loose = predict(
        backend, image, DetectParams(prompt="cat", box_threshold=0.0, nms_iou=1.0, max_detections=900)
    )
    strict = [d for d in loose if d.score >= 0.9]
    got = predict(
        backend, image, DetectParams(prompt="cat", box_threshold=0.9, nms_iou=1.0, max_detections=900)
    )
    assert len(got) == len(strict)
    assert len(predict(backend, image, DetectParams(prompt="cat", box_threshold=0.0, max_detections=2))) <= 2


def test_nms_removes_overlapping_boxes_of_a_phrase(backend: GroundedSam, image: np.ndarray) -> None:
    without = predict(
        backend, image, DetectParams(prompt="cat", box_threshold=0.0, nms_iou=1.0, max_detections=900)
    )
    with_nms = predict(
        backend, image, DetectParams(prompt="cat", box_threshold=0.0, nms_iou=0.1, max_detections=900)
    )
    assert len(with_nms) < len(without)


def test_segment_by_text_gives_full_size_masks(backend: GroundedSam, image: np.ndarray) -> None:
    params = SegmentParams(prompt="cat", box_threshold=0.0, max_detections=3)
    results = predict(backend, image, params)
    assert len(results) == 3
    for r in results:
        assert isinstance(r, Segmentation) and isinstance(r.mask, RLE)
        assert r.mask.size == [120, 160]


def test_box_chunks_give_the_same_masks_as_one_call(
    tiny_models: tuple[Path, Path], image: np.ndarray
) -> None:
    boxes = [[0, 0, 50, 50], [10, 10, 100, 80], [30, 5, 160, 120], [1, 1, 2, 2], [60, 60, 90, 110]]
    params = SegmentParams(boxes=boxes, mask_format="rle")
    chunked = GroundedSam(str(tiny_models[0]), str(tiny_models[1]), device="cpu", sam_chunk_size=2)
    whole = GroundedSam(str(tiny_models[0]), str(tiny_models[1]), device="cpu", sam_chunk_size=64)
    a, b = predict(chunked, image, params), predict(whole, image, params)
    assert [r.mask.counts for r in a] == [r.mask.counts for r in b]
    assert [r.box for r in a] == [[float(v) for v in box] for box in boxes]


def test_masks_upscaled_on_the_device_equal_masks_upscaled_in_the_finish_step(
    tiny_models: tuple[Path, Path], image: np.ndarray
) -> None:
    """The GPU path (all masks upscaled where the model runs, in chunks) gives the very masks the
    CPU path gives one at a time; forced here on the CPU, which is the device too."""
    boxes = [[0, 0, 50, 50], [10, 10, 100, 80], [30, 5, 160, 120]] * 7  # more than one chunk
    params = SegmentParams(boxes=boxes, mask_format="rle")
    on_device = GroundedSam(str(tiny_models[0]), str(tiny_models[1]), device="cpu")
    _, segmenter = parts(on_device)
    segmenter.upscale_on_device = True
    in_finish = GroundedSam(str(tiny_models[0]), str(tiny_models[1]), device="cpu")
    assert parts(in_finish)[1].upscale_on_device is False  # the CPU default
    prepared = on_device.prepare(image, params)
    raw = on_device.run(prepared, params)
    assert raw.masks.full is not None and raw.masks.full.shape == (21, 120, 160)
    a, b = on_device.finish(raw, params, prepared), predict(in_finish, image, params)
    assert all(isinstance(r, Segmentation) for r in [*a, *b])
    assert [r.mask for r in a] == [r.mask for r in b]  # type: ignore[attr-defined]


def test_multimask_keeps_the_mask_with_the_best_predicted_iou(
    backend: GroundedSam, image: np.ndarray
) -> None:
    sam = parts(backend)[1]
    prepared = sam.prepare(image)
    with torch.inference_mode():
        embeddings = sam.model.get_image_embeddings(prepared.pixels)
        boxes = torch.tensor([[[0.0, 0.0, 80.0, 80.0]]]) * torch.tensor(prepared.scale * 2)
        out = sam.model(image_embeddings=embeddings, input_boxes=boxes, multimask_output=True)
        masks = sam._decode(embeddings, True, input_boxes=boxes)
    best = int(out.iou_scores[0, 0].argmax())
    assert torch.equal(masks.low_res[0], out.pred_masks[0, 0, best])
    assert float(masks.scores[0]) == pytest.approx(float(out.iou_scores[0, 0].max()))


def test_points_give_one_mask_and_its_box(backend: GroundedSam, image: np.ndarray) -> None:
    results = predict(backend, image, SegmentParams(points=[[20, 30, 1], [100, 90, 0]], mask_format="png"))
    assert len(results) == 1
    assert results[0].label is None and isinstance(results[0].mask, str)


def test_no_detections_means_sam_is_never_called(
    backend: GroundedSam, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    detector, sam = parts(backend)
    empty = Boxes(torch.empty(0, 4), torch.empty(0), torch.empty(0, dtype=torch.long))
    monkeypatch.setattr(detector, "detect_batch", lambda items: [empty for _ in items])
    monkeypatch.setattr(sam.model, "get_image_embeddings", lambda *a: pytest.fail("SAM was called"))
    assert predict(backend, image, SegmentParams(prompt="cat")) == []


def test_out_of_memory_frees_the_caches_and_becomes_a_retryable_error(
    backend: GroundedSam, image: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    freed = []

    def oom(*args: Any) -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    detector, sam = parts(backend)
    monkeypatch.setattr(detector, "detect_batch", oom)
    monkeypatch.setattr("tunnelvision.engine.pipeline.free_device_memory", lambda: freed.append(1))
    params = SegmentParams(prompt="cat")
    monkeypatch.setattr(sam.embeddings, "lru", ByteLRU(1024))
    sam.embeddings.lru.put("some image", torch.zeros(4), 16)
    assert backend.cache_stats()["entries"] == 1
    with pytest.raises(DeviceOutOfMemory) as caught:
        backend.run(backend.prepare(image, params), params)
    assert freed == [1] and caught.value.retry_after_s > 0
    assert backend.cache_stats()["entries"] == 0  # cached embeddings are let go first


def test_a_prompt_longer_than_the_text_encoder_is_refused(backend: GroundedSam, image: np.ndarray) -> None:
    long_prompt = [" ".join(["forklift"] * 20) + f" {i}" for i in range(20)]
    with pytest.raises(InvalidInput, match="tokens"):
        backend.prepare(image, DetectParams(prompt=long_prompt))


def test_sdpa_attention_where_the_architecture_has_it(backend: GroundedSam) -> None:
    detector, sam = parts(backend)
    assert sam.model.config._attn_implementation == "sdpa"
    assert detector.model.config._attn_implementation == "eager"  # GroundingDINO has no SDPA path


def test_one_replica_per_configured_device(tiny_models: tuple[Path, Path]) -> None:
    from support import make_settings
    from tunnelvision.models.factory import build_backends

    settings = make_settings(detector=str(tiny_models[0]), segmenter=str(tiny_models[1]), device="cpu, cpu")
    backends = build_backends(settings)
    assert len(backends) == 2 and all(b.info.device == "cpu" for b in backends)
    assert backends[0] is not backends[1]
