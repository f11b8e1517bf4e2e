"""`write_random_family`: one random-weight checkpoint of any supported family, made locally.

Each family is a config recipe (tiny for tests, full for benchmarks), a model class and a
stock processor whose tokenizer is built here, so nothing is downloaded.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from tunnelvision.models import loading
from tunnelvision.models.family_names import RANDOM_FAMILIES
from tunnelvision.models.random import (
    GROUNDING_CLASSES,
    PROMPT_WORDS,
    Size,
    grounding_dino_config,
    grounding_dino_processor,
    sam_config,
    sam_processor,
    save_checkpoint,
)

FAMILIES = RANDOM_FAMILIES
# The stock SAM 2 and SAM 3 processors exist only as torchvision versions (no PIL fallback).
NEEDS_TORCHVISION = frozenset({"sam2", "sam3", "sam2-video", "sam3-tracker-video", "sam3-video"})


class TorchvisionRequired(ImportError):
    """A family whose stock processor needs torchvision, which does not import here."""


@dataclass(frozen=True)
class Recipe:
    model_class: str  # a class name in `transformers`
    config: Callable[[Size], Any]
    processor: Callable[[Size], Any]
    # Adjusts the random weights after they are drawn (same shapes, so the same compute cost).
    tune: Callable[[Any, Size], None] | None = None


def write_random_family(out: Path, family: str, size: Size, seed: int) -> Path:
    """Write one `family` checkpoint with random weights (fixed by `seed`) into `out`."""
    import torch

    recipe = family_recipe(family)
    require_torchvision_for(family)
    torch.manual_seed(seed)
    model = build_model(recipe, size)
    if recipe.tune is not None:
        recipe.tune(model, size)
    save_checkpoint(out, model, recipe.processor(size))
    return out


def family_recipe(family: str) -> Recipe:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    return RECIPES[family]


def build_model(recipe: Recipe, size: Size) -> Any:
    """The model with random weights; under `torch.device('meta')` it allocates nothing."""
    import transformers

    return getattr(transformers, recipe.model_class)(recipe.config(size))


def require_torchvision_for(family: str) -> None:
    if family in NEEDS_TORCHVISION and not loading.torchvision_importable():
        raise TorchvisionRequired(
            f"{family} checkpoints need torchvision: its stock transformers processor has no "
            "PIL version. Install a torchvision that imports with this torch "
            "(e.g. torch==2.14.1 with torchvision==0.29.1)."
        )


# CLIP-style tokenizers (OWLv2, SAM 3): byte-level BPE, words end in '</w>'.
_START, _END = "<|startoftext|>", "<|endoftext|>"
_CLIP_START_ID = 49406  # where CLIP has them; the full text models' configs expect these ids


def clip_vocab_and_merges(size: Size) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Every byte alone and word-final, merges that make PROMPT_WORDS whole tokens, then the two
    special tokens with the highest ids: OWLv2 pools the text at the highest id in a prompt."""
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = sorted(ByteLevel.alphabet())
    tokens = [*alphabet, *(f"{c}</w>" for c in alphabet)]
    merges: list[tuple[str, str]] = []  # tuples: a 'c a' string fails in the tokenizers library
    for word in PROMPT_WORDS:
        symbols = [*word[:-1], f"{word[-1]}</w>"]
        while len(symbols) > 1:  # merge left to right: 'c a t</w>' -> 'ca t</w>' -> 'cat</w>'
            merges.append((symbols[0], symbols[1]))
            symbols = [symbols[0] + symbols[1], *symbols[2:]]
            tokens.append(symbols[0])
    vocab = {token: i for i, token in enumerate(dict.fromkeys(tokens))}
    start_id = len(vocab) if size == "tiny" else _CLIP_START_ID
    vocab.update({_START: start_id, _END: start_id + 1})
    return vocab, list(dict.fromkeys(merges))


def clip_tokenizer(size: Size, max_length: int, **kwargs: Any) -> Any:
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges(size)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length, **kwargs)


def tiny_clip_text_ids() -> dict[str, int]:
    """A tiny text config's vocabulary size and special ids, matching the tiny tokenizer."""
    vocab, _ = clip_vocab_and_merges("tiny")
    return {"vocab_size": len(vocab), "bos_token_id": vocab[_START], "eos_token_id": vocab[_END]}


# OWLv2 base (patch 16) sees 960 px; the tiny one 96 px (6 x 6 patches, 36 boxes).
_OWL_IMAGE = {"tiny": 96, "full": 960}
_OWL_TEXT_POSITIONS = 16
_OWL_PAD = "!"  # id 0, as in the released tokenizer


def owlv2_config(size: Size) -> Any:
    from transformers import Owlv2Config

    vision = {"image_size": _OWL_IMAGE[size], "patch_size": 16}
    if size == "full":
        return Owlv2Config(vision_config=vision)
    return Owlv2Config(
        text_config={
            **tiny_clip_text_ids(),
            "pad_token_id": 0,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": _OWL_TEXT_POSITIONS,
        },
        vision_config={
            **vision,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
        },
        projection_dim=32,
    )


def owlv2_processor(size: Size) -> Any:
    from transformers import Owlv2ImageProcessorPil, Owlv2Processor

    side = _OWL_IMAGE[size]
    # Padding to max length fails unless the tokenizer knows the text model's length.
    tokenizer = clip_tokenizer(size, _OWL_TEXT_POSITIONS, pad_token=_OWL_PAD)
    return Owlv2Processor(
        image_processor=Owlv2ImageProcessorPil(size={"height": side, "width": side}), tokenizer=tokenizer
    )


_SAM2_IMAGE = {"tiny": 128, "full": 1024}


def sam2_config(size: Size) -> Any:
    from transformers import Sam2Config

    if size == "full":
        return Sam2Config()  # SAM 2.1 Hiera-T
    return Sam2Config(**sam2_tiny_parts(_SAM2_IMAGE[size], hidden=32))


def sam2_tiny_parts(side: int, hidden: int) -> dict[str, Any]:
    """The vision, prompt-encoder and mask-decoder configs of a tiny SAM 2 seeing `side` px, whose
    feature maps have `hidden` channels (the image and video models share them)."""
    return {
        "vision_config": {
            "backbone_config": {  # a dict backbone must name its type
                "model_type": "sam2_hiera_det_model",
                "hidden_size": 12,
                "blocks_per_stage": [1, 1, 2, 1],
                "embed_dim_per_stage": [12, 24, 48, 96],
                "num_attention_heads_per_stage": [1, 1, 2, 2],
                "global_attention_blocks": [3],
                "window_size_per_stage": [8, 4, 4, 4],
                "image_size": [side, side],
            },
            "backbone_channel_list": [96, 48, 24, 12],
            "backbone_feature_sizes": [
                [side // 4, side // 4],
                [side // 8, side // 8],
                [side // 16, side // 16],
            ],
            "fpn_hidden_size": hidden,
        },
        # The prompt encoder's image size must be the processor's, or boxes land elsewhere.
        "prompt_encoder_config": {"hidden_size": hidden, "image_size": side},
        "mask_decoder_config": {
            "hidden_size": hidden,
            "mlp_dim": 64,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
    }


def sam2_processor(size: Size) -> Any:
    from transformers import Sam2ImageProcessor, Sam2Processor

    side = _SAM2_IMAGE[size]
    image_processor = Sam2ImageProcessor(
        size={"height": side, "width": side}, mask_size={"height": side // 4, "width": side // 4}
    )
    return Sam2Processor(image_processor=image_processor)


# SAM 3 sees 1008 px in patches of 14; the tiny one 112 px (8 x 8 patches).
_SAM3_IMAGE = {"tiny": 112, "full": 1008}
_SAM3_TEXT_POSITIONS = 32  # its processor pads every prompt to 32 tokens
# The tiny video models see 56 px (4 x 4 patches): they run a detector and a tracker per frame.
_SAM3_VIDEO_IMAGE = {"tiny": 56, "full": 1008}


def sam3_config(size: Size) -> Any:
    from transformers import Sam3Config

    if size == "full":
        return Sam3Config()
    return Sam3Config(**sam3_tiny_parts(_SAM3_IMAGE[size], fpn=32))


def sam3_tiny_vision(side: int, fpn: int) -> dict[str, Any]:
    """A tiny SAM 3 ViT seeing `side` px, its feature pyramid `fpn` channels wide."""
    grid = side // 14
    return {
        "backbone_config": {
            "model_type": "sam3_vit_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": side,
            "patch_size": 14,
            "window_size": 4,
            "global_attn_indexes": [1],
        },
        "fpn_hidden_size": fpn,
        "backbone_feature_sizes": [[grid * scale] * 2 for scale in (4, 2, 1)],
        "scale_factors": [4.0, 2.0, 1.0, 0.5],
    }


def sam3_tiny_parts(side: int, fpn: int) -> dict[str, Any]:
    """Every sub-config of a tiny SAM 3 detector (the image model and the video model's detector);
    its DETR, geometry encoder and mask decoder are as wide as the feature pyramid."""
    small = {"hidden_size": fpn, "num_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
    return {
        "vision_config": sam3_tiny_vision(side, fpn),
        # A text config given as a dict does not get SAM 3's text defaults: gelu must be explicit.
        "text_config": {
            **tiny_clip_text_ids(),
            "hidden_size": 32,
            "intermediate_size": 64,
            "projection_dim": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": _SAM3_TEXT_POSITIONS,
            "hidden_act": "gelu",
        },
        "geometry_encoder_config": small,
        "detr_encoder_config": small,
        "detr_decoder_config": {**small, "num_queries": 10},
        "mask_decoder_config": {
            "hidden_size": fpn,
            "num_attention_heads": 2,
        },  # GroupNorm(8): a multiple of 8
    }


def sam3_processor(size: Size, side: int | None = None) -> Any:
    from transformers import Sam3ImageProcessor, Sam3Processor

    side = side or _SAM3_IMAGE[size]
    mask_side = side // 14 * 4
    image_processor = Sam3ImageProcessor(
        size={"height": side, "width": side}, mask_size={"height": mask_side, "width": mask_side}
    )
    return Sam3Processor(
        image_processor=image_processor, tokenizer=clip_tokenizer(size, _SAM3_TEXT_POSITIONS)
    )


# -- video trackers ---------------------------------------------------------------------------
# The memory attention's keys are 64 wide (the memory encoder's output), so a tracker's feature
# maps must be a multiple of 64 and more than 64 wide: 128 in the tiny ones.
_TINY_TRACKER_HIDDEN = 128
# SAM 2.1 Hiera-L, as in facebook/sam2.1-hiera-large (the video memory modules are the defaults).
_TINY_OBJECT_SCORE = 4.0  # logit: sigmoid 0.98
_SAM2_HIERA_LARGE = {
    "backbone_config": {
        "model_type": "sam2_hiera_det_model",
        "hidden_size": 144,
        "num_attention_heads": 2,
        "blocks_per_stage": [2, 6, 36, 4],
        "embed_dim_per_stage": [144, 288, 576, 1152],
        "num_attention_heads_per_stage": [2, 4, 8, 16],
        "global_attention_blocks": [23, 33, 43],
        "window_size_per_stage": [8, 4, 16, 8],
        "window_positional_embedding_background_size": [7, 7],
    },
    "backbone_channel_list": [1152, 576, 288, 144],
}


def tiny_tracker_memory(grid: int) -> dict[str, Any]:
    """The memory modules of a tiny SAM 2 / SAM 3 tracker whose top feature map is grid x grid:
    3 memory frames (the current one and two before it), one attention layer."""
    hidden = _TINY_TRACKER_HIDDEN
    return {
        "num_maskmem": 3,
        "memory_attention_hidden_size": hidden,
        "memory_attention_num_layers": 1,
        "memory_attention_feed_forward_hidden_size": 64,
        "memory_attention_rope_feat_sizes": [grid, grid],
        "memory_encoder_hidden_size": hidden,
        "mask_downsampler_embed_dim": hidden,
        "memory_fuser_embed_dim": hidden,
        "memory_fuser_intermediate_dim": 64,
        "memory_fuser_num_layers": 1,
    }


def tracker_sees_objects(model: Any, size: Size) -> None:
    """A tiny tracker that always finds its object present, so what it follows keeps a mask.

    With random weights the object score sits near 0 and the tracker drops every object after its
    first frame; a positive bias on that one output keeps tests about tracking meaningful."""
    if size != "tiny":
        return
    import torch

    tracker = getattr(model, "tracker_model", model)
    with torch.no_grad():
        tracker.mask_decoder.pred_obj_score_head.proj_out.bias.fill_(_TINY_OBJECT_SCORE)


def sam2_video_config(size: Size) -> Any:
    from transformers import Sam2VideoConfig

    if size == "full":
        return Sam2VideoConfig(vision_config=_SAM2_HIERA_LARGE)
    side = _SAM2_IMAGE[size]
    return Sam2VideoConfig(
        **sam2_tiny_parts(side, hidden=_TINY_TRACKER_HIDDEN),
        image_size=side,
        **tiny_tracker_memory(side // 16),
    )


def tracker_video_processor(processor_class: type, image_processor: Any, **kwargs: Any) -> Any:
    """A video tracker's processor: frames go through `image_processor` one at a time (streaming);
    the video processor, which takes whole clips, sees the same square."""
    from transformers.models.sam2_video.video_processing_sam2_video import Sam2VideoVideoProcessor

    side = image_processor.size["height"]
    video_processor = Sam2VideoVideoProcessor(size={"height": side, "width": side})
    return processor_class(image_processor=image_processor, video_processor=video_processor, **kwargs)


def sam2_video_processor(size: Size) -> Any:
    from transformers import Sam2VideoProcessor

    return tracker_video_processor(Sam2VideoProcessor, sam2_processor(size).image_processor)


def sam3_tracker_video_config(size: Size) -> Any:
    from transformers import Sam3TrackerVideoConfig

    if size == "full":
        return Sam3TrackerVideoConfig()  # facebook/sam3's tracker
    return Sam3TrackerVideoConfig(**sam3_tiny_tracker(_SAM3_VIDEO_IMAGE[size]))


def sam3_tiny_tracker(side: int) -> dict[str, Any]:
    hidden = _TINY_TRACKER_HIDDEN
    return {
        "vision_config": sam3_tiny_vision(side, hidden),
        "prompt_encoder_config": {"hidden_size": hidden, "image_size": side, "patch_size": 14},
        "mask_decoder_config": {
            "hidden_size": hidden,
            "mlp_dim": 64,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 32,
        },
        "image_size": side,
        **tiny_tracker_memory(side // 14),
    }


def sam3_tracker_video_processor(size: Size) -> Any:
    from transformers import Sam3TrackerVideoProcessor

    image_processor = sam3_processor(size, _SAM3_VIDEO_IMAGE[size]).image_processor
    return tracker_video_processor(Sam3TrackerVideoProcessor, image_processor)


def sam3_video_config(size: Size) -> Any:
    from transformers import Sam3VideoConfig

    if size == "full":
        return Sam3VideoConfig()  # facebook/sam3
    side = _SAM3_VIDEO_IMAGE[size]
    # The detector's feature pyramid feeds the tracker: both are as wide as the tracker needs.
    return Sam3VideoConfig(
        detector_config=sam3_tiny_parts(side, fpn=_TINY_TRACKER_HIDDEN),
        tracker_config=sam3_tiny_tracker(side),
        low_res_mask_size=side // 14 * 4,
        # Random weights score every query near 0.2: below the stock thresholds, so lower them
        # for the tiny model to find (and follow) something.
        score_threshold_detection=0.05,
        new_det_thresh=0.05,
        max_num_objects=2,
    )


def sam3_video_processor(size: Size) -> Any:
    # The top-level name is a placeholder where torchvision is missing: import the real one.
    from transformers.models.sam3_video.processing_sam3_video import Sam3VideoProcessor

    stock = sam3_processor(size, _SAM3_VIDEO_IMAGE[size])
    return tracker_video_processor(Sam3VideoProcessor, stock.image_processor, tokenizer=stock.tokenizer)


RECIPES: dict[str, Recipe] = {
    "grounding-dino": Recipe(
        GROUNDING_CLASSES["grounding-dino"][1], grounding_dino_config, grounding_dino_processor
    ),
    "mm-grounding-dino": Recipe(
        GROUNDING_CLASSES["mm-grounding-dino"][1],
        partial(grounding_dino_config, family="mm-grounding-dino"),
        grounding_dino_processor,
    ),
    "owlv2": Recipe("Owlv2ForObjectDetection", owlv2_config, owlv2_processor),
    "sam": Recipe("SamModel", sam_config, sam_processor),
    "sam2": Recipe("Sam2Model", sam2_config, sam2_processor),
    "sam3": Recipe("Sam3Model", sam3_config, sam3_processor),
    "sam2-video": Recipe("Sam2VideoModel", sam2_video_config, sam2_video_processor, tracker_sees_objects),
    "sam3-tracker-video": Recipe(
        "Sam3TrackerVideoModel", sam3_tracker_video_config, sam3_tracker_video_processor, tracker_sees_objects
    ),
    "sam3-video": Recipe("Sam3VideoModel", sam3_video_config, sam3_video_processor, tracker_sees_objects),
}
