"""`write_random_family`: each family's tiny checkpoint is made here, loads with the stock
transformers Auto classes and runs one prompt through its stock processor, offline."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from tunnelvision.models import loading
from tunnelvision.models.random_families import (
    FAMILIES,
    NEEDS_TORCHVISION,
    RECIPES,
    TorchvisionRequired,
    build_model,
    write_random_family,
)

HAS_TORCHVISION = loading.torchvision_importable()
NO_TORCHVISION = "the stock SAM 2 / SAM 3 processors need torchvision, which does not import here"
# OWLv2's PIL image processor resizes with scipy; its torchvision one does not need it.
OWL_RUNS = HAS_TORCHVISION or importlib.util.find_spec("scipy") is not None
NO_OWL_BACKEND = "OWLv2's processor needs torchvision or scipy; neither is here"
H, W = 60, 80


def family_params(runs_owlv2: bool = True, video: bool = True) -> list[Any]:
    """Every family (without the video trackers: `video=False`); the ones this environment
    cannot process are skipped, saying why."""
    params = []
    for family in FAMILIES:
        if not video and family.endswith("-video"):
            continue
        marks = []
        if family in NEEDS_TORCHVISION and not HAS_TORCHVISION:
            marks.append(pytest.mark.skip(reason=NO_TORCHVISION))
        if family == "owlv2" and runs_owlv2 and not OWL_RUNS:
            marks.append(pytest.mark.skip(reason=NO_OWL_BACKEND))
        params.append(pytest.param(family, marks=marks))
    return params


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hub offline, and any outgoing connection fails the test: nothing may be fetched."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Each family's tiny checkpoint (seed 0), written once for the module."""
    written: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in written:
            written[family] = write_random_family(tmp_path_factory.mktemp(family), family, "tiny", 0)
        return written[family]

    return get


@pytest.fixture(scope="module")
def image() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 255, (H, W, 3), dtype=np.uint8))


def load(folder: Path) -> tuple[Any, Any]:
    """As a user's folder is loaded: the class comes from the checkpoint's own config."""
    import transformers
    from transformers import AutoConfig, AutoProcessor

    model_type = AutoConfig.from_pretrained(folder).model_type
    if model_type in {"grounding-dino", "mm-grounding-dino", "owlv2"}:
        auto: Any = transformers.AutoModelForZeroShotObjectDetection
    elif model_type in {"sam", "sam2"}:
        auto = transformers.AutoModelForMaskGeneration
    else:
        auto = transformers.AutoModel
    return AutoProcessor.from_pretrained(folder), auto.from_pretrained(folder).eval()


def run_grounding_dino(processor: Any, model: Any, image: Image.Image) -> None:
    inputs = processor(images=image, text="a cat. a dog.", return_tensors="pt")
    ids = inputs.input_ids[0].tolist()
    assert processor.tokenizer.convert_ids_to_tokens(ids) == [
        "[CLS]",
        "a",
        "cat",
        ".",
        "a",
        "dog",
        ".",
        "[SEP]",
    ]
    # The model splits phrases on BERT's ids for [CLS], '.' and [SEP].
    assert (ids[0], ids[3], ids[-1]) == (101, 1012, 102)
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.pred_boxes.shape == (1, 30, 4)
    result = processor.post_process_grounded_object_detection(
        outputs, inputs.input_ids, threshold=0.0, text_threshold=0.0, target_sizes=[(H, W)]
    )[0]
    assert result["boxes"].shape == (30, 4)


def run_owlv2(processor: Any, model: Any, image: Image.Image) -> None:
    inputs = processor(images=image, text=[["a cat", "a dog"]], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    assert outputs.logits.shape == (1, 36, 2)  # 6 x 6 patches, one box each, two queries
    labels = [["a cat", "a dog"]]
    result = processor.post_process_grounded_object_detection(
        outputs, threshold=0.0, target_sizes=[(H, W)], text_labels=labels
    )[0]
    assert result["boxes"].shape == (36, 4)
    # Image-guided: an exemplar region of the same image is the query.
    guided = processor(images=image, query_images=image.crop((10, 10, 40, 40)), return_tensors="pt")
    with torch.no_grad():
        outputs = model.image_guided_detection(**guided)
    assert outputs.logits.shape == (1, 36, 1)
    result = processor.post_process_image_guided_detection(
        outputs, threshold=0.0, target_sizes=torch.tensor([[H, W]])
    )[0]
    assert result["boxes"].ndim == 2 and result["boxes"].shape[1] == 4


def run_box_segmenter(processor: Any, model: Any, image: Image.Image) -> None:
    """SAM and SAM 2: two box prompts, one mask each."""
    inputs = processor(images=image, input_boxes=[[[5, 5, 40, 40], [10, 20, 70, 50]]], return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs, multimask_output=False)
    assert outputs.iou_scores.shape == (1, 2, 1)
    sizes = [inputs["original_sizes"]]
    if "reshaped_input_sizes" in inputs:  # SAM pads, SAM 2 resizes to a square
        sizes.append(inputs["reshaped_input_sizes"])
    masks = processor.post_process_masks(outputs.pred_masks, *sizes)[0]
    assert masks.shape == (2, 1, H, W) and masks.dtype == torch.bool


def run_sam3(processor: Any, model: Any, image: Image.Image) -> None:
    text = processor(images=image, text="cat", return_tensors="pt")
    exemplar = processor(
        images=image, input_boxes=[[[5, 5, 40, 40]]], input_boxes_labels=[[1]], return_tensors="pt"
    )
    for inputs in (text, exemplar):
        with torch.no_grad():
            outputs = model(**inputs)
        result = processor.post_process_instance_segmentation(
            outputs, threshold=0.0, mask_threshold=0.5, target_sizes=[(H, W)]
        )[0]
        assert result["masks"].shape == (10, H, W)  # every query of the tiny model, at image size
        assert result["boxes"].shape == (10, 4) and result["scores"].shape == (10,)


RUNNERS: dict[str, Callable[[Any, Any, Image.Image], None]] = {
    "grounding-dino": run_grounding_dino,
    "mm-grounding-dino": run_grounding_dino,
    "owlv2": run_owlv2,
    "sam": run_box_segmenter,
    "sam2": run_box_segmenter,
    "sam3": run_sam3,
}


@pytest.mark.parametrize("family", family_params(runs_owlv2=False))
def test_checkpoint_holds_weights_processor_and_tokenizer_and_loads_by_its_config(
    family: str, checkpoints: Callable[[str], Path]
) -> None:
    folder = checkpoints(family)
    files = {path.name for path in folder.iterdir()}
    assert {"config.json", "model.safetensors", "processor_config.json"} <= files
    if family not in {"sam", "sam2", "sam2-video", "sam3-tracker-video"}:  # box/point prompts: no text
        assert {"tokenizer.json", "tokenizer_config.json"} <= files
    _, model = load(folder)
    assert type(model).__name__ == RECIPES[family].model_class
    # Tiny: seconds on a CPU. Video trackers need a memory width of 128 at least.
    limit = 5_000_000 if family.endswith("-video") else 1_000_000
    assert sum(p.numel() for p in model.parameters()) < limit


# The video trackers run frame by frame through their sessions in test_video_models.py.
@pytest.mark.parametrize("family", family_params(video=False))
def test_tiny_checkpoint_runs_a_prompt_through_the_stock_processor(
    family: str, checkpoints: Callable[[str], Path], image: Image.Image
) -> None:
    processor, model = load(checkpoints(family))
    RUNNERS[family](processor, model, image)


@pytest.mark.parametrize("family", family_params(runs_owlv2=False))
def test_same_seed_gives_the_same_weights_and_another_seed_others(
    family: str, checkpoints: Callable[[str], Path], tmp_path: Path
) -> None:
    first = load_file(checkpoints(family) / "model.safetensors")
    again = load_file(write_random_family(tmp_path / "again", family, "tiny", 0) / "model.safetensors")
    other = load_file(write_random_family(tmp_path / "other", family, "tiny", 1) / "model.safetensors")
    assert first.keys() == again.keys() == other.keys()
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


# Parameter counts of the released default architectures (millions), built on the meta device.
FULL_PARAMS_M = {
    "grounding-dino": 172.3,  # Swin-T + BERT-base
    "mm-grounding-dino": 172.3,
    "owlv2": 155.0,  # ViT-B/16 at 960 px
    "sam": 93.7,  # ViT-B
    "sam2": 31.4,  # SAM 2.1 Hiera-T, image model
    "sam3": 840.4,
    "sam2-video": 224.4,  # SAM 2.1 Hiera-L with its video memory
    "sam3-tracker-video": 465.8,
    "sam3-video": 859.9,
}


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_configs_have_the_released_architectures(family: str) -> None:
    with torch.device("meta"):  # shapes only: nothing is allocated or initialised for real
        model = build_model(RECIPES[family], "full")
    params_m = sum(p.numel() for p in model.parameters()) / 1e6
    assert params_m == pytest.approx(FULL_PARAMS_M[family], abs=0.1)


@pytest.mark.parametrize("family", sorted(NEEDS_TORCHVISION))
def test_families_that_need_torchvision_say_so_and_write_nothing(
    family: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loading, "torchvision_importable", lambda: False)  # as where it fails to import
    with pytest.raises(TorchvisionRequired, match=f"{family} checkpoints need torchvision"):
        write_random_family(tmp_path / family, family, "tiny", 0)
    assert not (tmp_path / family).exists()


def test_an_unknown_family_is_refused_with_the_known_ones(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="known: grounding-dino, mm-grounding-dino, owlv2, sam, sam2, sam3"):
        write_random_family(tmp_path, "yolo", "tiny", 0)
