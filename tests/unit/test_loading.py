from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunnelvision.errors import ModelUnavailable
from tunnelvision.models.loading import resolve_device, resolve_dtype, resolve_source


def test_local_folders_load_without_the_hub(tiny_models: tuple[Path, Path]) -> None:
    source = resolve_source(str(tiny_models[0]), "detector")
    assert source.local_files_only and source.location == str(tiny_models[0])


def test_missing_or_empty_folders_fail_with_their_name(tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_source(str(tmp_path / "nope"), "detector")
    with pytest.raises(ModelUnavailable, match=r"no config\.json"):
        resolve_source(str(tmp_path), "segmenter")


def test_unreachable_hub_fails_fast_naming_model_cache_and_remedies(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(ModelUnavailable) as caught:
        resolve_source("someone/not-cached-model", "detector")
    message = caught.value.message
    assert "someone/not-cached-model" in message and "Cache folder" in message
    assert "--detector /path/to/folder" in message and "--demo" in message


def test_device_and_dtype_resolution() -> None:
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(ModelUnavailable, match="float16"):
        resolve_dtype("float16", resolve_device("cpu"))


# -- the family comes from the checkpoint's own config ---------------------------------------------


def test_the_family_is_read_from_the_checkpoints_config(tiny_models: tuple[Path, Path]) -> None:
    from tunnelvision.models.grounding_dino import GroundingDino
    from tunnelvision.models.registry import family_class, model_type_of
    from tunnelvision.models.sam import Sam

    detector, segmenter = (resolve_source(str(p), "pipeline") for p in tiny_models)
    assert (model_type_of(detector), model_type_of(segmenter)) == ("grounding-dino", "sam")
    assert family_class("grounding-dino", "x") is GroundingDino and family_class("sam", "x") is Sam
    assert family_class("mm-grounding-dino", "x") is GroundingDino  # MM-Grounding-DINO and LLMDet


def test_an_unknown_model_type_fails_at_start_naming_the_known_ones(tmp_path: Path) -> None:
    from support import make_settings
    from tunnelvision.models.factory import build_backends

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ModelUnavailable) as caught:
        build_backends(make_settings(pipeline=[f"chat={tmp_path}"], device="cpu"))
    message = caught.value.message
    assert (
        "'llama'" in message
        and "grounding-dino, mm-grounding-dino, owlv2, sam, sam2, sam2_video, sam3" in message
    )
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["X"]}))
    with pytest.raises(ModelUnavailable, match="names no model_type"):
        build_backends(make_settings(pipeline=[f"chat={tmp_path}"], device="cpu"))


def test_a_pair_must_be_a_detector_then_a_segmenter(tiny_models: tuple[Path, Path]) -> None:
    from support import make_settings
    from tunnelvision.models.factory import build_backends

    swapped = make_settings(detector=str(tiny_models[1]), segmenter=str(tiny_models[0]), device="cpu")
    with pytest.raises(ModelUnavailable, match=r"\(sam, a segmenter\).*DETECTOR\+SEGMENTER"):
        build_backends(swapped)


def test_an_mm_grounding_dino_checkpoint_is_served_by_the_grounding_dino_family(
    tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    import numpy as np

    from tunnelvision.models.grounded_sam import GroundedSam
    from tunnelvision.models.random import write_random_detector
    from tunnelvision.schemas import DetectParams

    write_random_detector(tmp_path / "mm", "tiny", "mm-grounding-dino")
    backend = GroundedSam(str(tmp_path / "mm"), str(tiny_models[1]), "cpu")
    assert backend.info.pipelines[0].models[0].family == "mm-grounding-dino"
    image = np.random.default_rng(0).integers(0, 255, (120, 160, 3), dtype=np.uint8)
    params = DetectParams(prompt="cat . dog", box_threshold=0.0, text_threshold=0.0, max_detections=5)
    prepared = backend.prepare(image, params)
    found = backend.finish(backend.run(prepared, params), params, prepared)
    assert len(found) == 5 and {d.label for d in found} <= {"cat", "dog"}


def test_a_family_needing_torchvision_is_refused_at_load_with_the_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from support import make_settings
    from tunnelvision.models import loading
    from tunnelvision.models.factory import build_backends
    from tunnelvision.models.random_families import write_random_family

    write_random_family(tmp_path / "sam2", "sam2", "tiny", 0)
    monkeypatch.setattr(loading, "torchvision_importable", lambda: False)  # as where it fails to import
    with pytest.raises(ModelUnavailable, match="sam2 needs torchvision"):
        build_backends(make_settings(pipeline=[f"s={tmp_path / 'sam2'}"], device="cpu"))
