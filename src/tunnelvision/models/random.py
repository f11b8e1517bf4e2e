"""Random-weight checkpoints in the real formats, written with `save_pretrained`.

Tiny ones make tests and `serve --demo` fast; full-size ones have the default architectures'
shapes, so they cost what real weights cost (compute does not depend on weight values).
This module holds the Grounded-SAM pair and the pieces every family shares; the other
families are in `random_families`.
"""

from __future__ import annotations

import string
from pathlib import Path
from typing import Any, Literal

Size = Literal["tiny", "full"]
GroundingFamily = Literal["grounding-dino", "mm-grounding-dino"]

# GroundingDINO hard-codes BERT's ids for these tokens when it splits phrases, so a small
# vocabulary must keep them where BERT has them.
_SPECIAL_IDS = {"[PAD]": 0, "[UNK]": 100, "[CLS]": 101, "[SEP]": 102, "[MASK]": 103, ".": 1012, "?": 1029}
# Whole-word tokens in every tiny tokenizer, so common prompts tokenize as they would for real.
PROMPT_WORDS = (
    "a an the of and on in with cat cats dog dogs person people car truck forklift box pallet "
    "bird horse chair table bottle cup phone laptop tree building road sign bike bicycle"
).split()
_TINY_TEXT_VOCAB = 1200
_FULL_TEXT_VOCAB = 30522


def build_vocab(vocab_size: int) -> dict[str, int]:
    """BERT-compatible vocabulary: the special ids where BERT has them, whole words, and
    letters plus '##letters' so any lowercase word tokenizes to word pieces, never [UNK]."""
    vocab = dict(_SPECIAL_IDS)
    letters = list(string.ascii_lowercase)
    pieces = [*PROMPT_WORDS, *letters, *(f"##{c}" for c in letters), *string.digits, ",", "-", "'", "!"]
    for next_id, piece in enumerate(dict.fromkeys(p for p in pieces if p not in vocab), start=1040):
        vocab[piece] = next_id
    taken = set(vocab.values())
    free_ids = (i for i in range(vocab_size) if i not in taken)
    for filler, free in enumerate(free_ids):  # fill the gaps so a full-size vocab has BERT's size
        if len(vocab) >= vocab_size:
            break
        vocab[f"[unused{filler}]"] = free
    return vocab


def save_checkpoint(path: Path, model: Any, processor: Any) -> None:
    """One folder that `from_pretrained` reads: config, safetensors weights, processor files."""
    model.eval().save_pretrained(path)
    processor.save_pretrained(path)


def write_random_models(out: Path, size: Size = "tiny", seed: int = 0) -> tuple[Path, Path]:
    """Write `out/detector` and `out/segmenter`; return both paths."""
    import torch

    torch.manual_seed(seed)
    detector_dir, segmenter_dir = out / "detector", out / "segmenter"
    write_random_detector(detector_dir, size)
    write_random_segmenter(segmenter_dir, size)
    return detector_dir, segmenter_dir


# The two share one processor and one tiny recipe: (config class, model class) in transformers.
GROUNDING_CLASSES: dict[str, tuple[str, str]] = {
    "grounding-dino": ("GroundingDinoConfig", "GroundingDinoForObjectDetection"),
    "mm-grounding-dino": ("MMGroundingDinoConfig", "MMGroundingDinoForObjectDetection"),
}


def write_random_detector(path: Path, size: Size, family: GroundingFamily = "grounding-dino") -> None:
    """GroundingDINO or MM-Grounding-DINO."""
    import transformers

    model = getattr(transformers, GROUNDING_CLASSES[family][1])(grounding_dino_config(size, family))
    save_checkpoint(path, model, grounding_dino_processor(size))


def grounding_dino_config(size: Size, family: GroundingFamily = "grounding-dino") -> Any:
    import transformers
    from transformers import BertConfig, SwinConfig

    config_class = getattr(transformers, GROUNDING_CLASSES[family][0])
    if size == "full":
        return config_class()  # the -T models: Swin-T + BERT-base, 900 queries
    return config_class(
        backbone_config=SwinConfig(
            embed_dim=8,
            depths=[1, 1, 1, 1],
            num_heads=[1, 1, 2, 2],
            window_size=4,
            out_features=["stage2", "stage3", "stage4"],
        ),
        text_config=BertConfig(
            vocab_size=_TINY_TEXT_VOCAB,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=256,
        ),
        d_model=32,
        encoder_layers=1,
        decoder_layers=2,  # 1 fails: the bbox heads are tied across decoder layers
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_queries=30,
    )


def grounding_dino_processor(size: Size) -> Any:
    from transformers import BertTokenizerFast, GroundingDinoImageProcessorPil, GroundingDinoProcessor

    vocab_size = _TINY_TEXT_VOCAB if size == "tiny" else _FULL_TEXT_VOCAB
    if size == "tiny":
        image_size = {"shortest_edge": 160, "longest_edge": 256}
    else:
        image_size = {"shortest_edge": 800, "longest_edge": 1333}
    # `vocab=`, not `vocab_file=`: transformers 5 ignores the latter and every word becomes [UNK].
    tokenizer = BertTokenizerFast(vocab=build_vocab(vocab_size), do_lower_case=True)
    return GroundingDinoProcessor(
        image_processor=GroundingDinoImageProcessorPil(size=image_size), tokenizer=tokenizer
    )


# The released SAM image encoders (the prompt encoder and mask decoder are the same for all).
SAM_ENCODERS: dict[str, dict[str, Any]] = {
    "vit-b": {},  # SamConfig's defaults
    "vit-l": {
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "global_attn_indexes": [5, 11, 17, 23],
        "mlp_dim": 4096,
    },
    "vit-h": {
        "hidden_size": 1280,
        "num_hidden_layers": 32,
        "num_attention_heads": 16,
        "global_attn_indexes": [7, 15, 23, 31],
        "mlp_dim": 5120,
    },
}
_TINY_SAM_IMAGE = 256


def write_random_segmenter(path: Path, size: Size, encoder: str = "vit-b") -> None:
    """`encoder` picks the full-size variant: vit-b, vit-l or vit-h."""
    from transformers import SamModel

    save_checkpoint(path, SamModel(sam_config(size, encoder)), sam_processor(size))


def sam_config(size: Size, encoder: str = "vit-b") -> Any:
    from transformers import SamConfig

    if size == "full":
        return SamConfig(vision_config=SAM_ENCODERS[encoder])
    # Below 1024 works when the vision config, the prompt encoder and the processor agree.
    return SamConfig(
        vision_config={
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "window_size": 4,
            "global_attn_indexes": [1],
            "image_size": _TINY_SAM_IMAGE,
            "mlp_dim": 64,
            "output_channels": 16,
            "num_pos_feats": 8,
        },
        prompt_encoder_config={
            "hidden_size": 16,
            "image_size": _TINY_SAM_IMAGE,
            "mask_input_channels": 4,
            "image_embedding_size": _TINY_SAM_IMAGE // 16,
        },
        mask_decoder_config={
            "hidden_size": 16,
            "mlp_dim": 32,
            "num_attention_heads": 2,
            "iou_head_hidden_dim": 16,
        },
    )


def sam_processor(size: Size) -> Any:
    from transformers import SamImageProcessorPil, SamProcessor

    image_size = _TINY_SAM_IMAGE if size == "tiny" else 1024
    image_processor = SamImageProcessorPil(
        size={"longest_edge": image_size}, pad_size={"height": image_size, "width": image_size}
    )
    return SamProcessor(image_processor=image_processor)
