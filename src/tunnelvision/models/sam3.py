"""SAM 3 concept segmenters: phrases and/or exemplar boxes -> every instance, with box, score and mask.

One prompt per phrase, each with all the exemplars (they refine the phrase); exemplars alone are
one prompt (the processor then uses its own placeholder text). The image's vision features are
computed once and cached by its id, so a second prompt on the same image skips the encoder; one
image's prompts run as one batch over those features. The stock processor needs torchvision.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, ClassVar

import torch
from transformers import AutoProcessor, Sam3Model
from transformers.models.sam3.modeling_sam3 import Sam3VisionEncoderOutput

from tunnelvision.engine.backend import Check, no_deadline
from tunnelvision.imaging import RGBImage
from tunnelvision.models.base import Family, ImageCache, tensor_bytes
from tunnelvision.models.loading import (
    LoadOptions,
    ModelSource,
    load_model,
    load_pretrained,
    to_device,
)
from tunnelvision.models.roles import EXEMPLAR_PHRASE, BoolMask, Exemplar, Instances, Masks, Role
from tunnelvision.models.sam import MASKS_PER_UPSCALE
from tunnelvision.models.sam2 import require_torchvision

PROMPT_INPUTS = ("input_ids", "attention_mask", "input_boxes", "input_boxes_labels")


@dataclass
class Sam3Inputs:
    height: int
    width: int
    pixels: torch.Tensor  # (1, 3, side, side)
    prompts: dict[str, torch.Tensor]  # PROMPT_INPUTS, one row per prompt
    phrase_ids: list[int]  # each prompt's phrase (EXEMPLAR_PHRASE: exemplars alone)
    image_id: str = ""  # the vision-feature cache's key ("": not cached)
    encode_ms: float | None = None  # the image encoder's time, when this request ran it


class Sam3(Family):
    role: ClassVar[Role] = "concept_segmenter"
    family: ClassVar[str] = "sam3"

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype, options: LoadOptions
    ) -> None:
        super().__init__(source, device, dtype)
        # On a GPU masks are upscaled where they were made (see Sam.segment_batch for why not on the CPU).
        self.upscale_on_device = device.type != "cpu"
        require_torchvision(self.family, source.source)
        self.features: ImageCache[Sam3VisionEncoderOutput] = ImageCache(
            self, options.cache_bytes, features_bytes
        )
        self.processor = load_pretrained(AutoProcessor.from_pretrained, source, "segmenter")
        self.model = to_device(
            load_model(Sam3Model.from_pretrained, source, "segmenter", options.attention), device, dtype
        )

    # -- CPU -------------------------------------------------------------------------------

    def prepare(
        self,
        image: RGBImage,
        phrases: list[str],
        exemplars: list[Exemplar],
        image_id: str = "",
        check: Check = no_deadline,
    ) -> Sam3Inputs:
        height, width = image.shape[:2]
        pixels = self.processor(images=image, return_tensors="pt", input_data_format="channels_last")
        # None: the processor's own text (exemplars alone)
        texts: list[str | None] = [p.lower() for p in phrases] if phrases else [None]
        boxes: dict[str, Any] = {}
        if exemplars:
            boxes = {
                "input_boxes": [[box for box, _ in exemplars]] * len(texts),
                "input_boxes_labels": [[label for _, label in exemplars]] * len(texts),
            }
        prompts = self.processor(
            text=texts, original_sizes=[[height, width]] * len(texts), return_tensors="pt", **boxes
        )
        phrase_ids = list(range(len(phrases))) if phrases else [EXEMPLAR_PHRASE]
        return Sam3Inputs(
            height,
            width,
            pixels["pixel_values"],
            {name: prompts[name] for name in PROMPT_INPUTS if name in prompts},
            phrase_ids,
            image_id,
        )

    def upscale(self, low_res: torch.Tensor, prepared: Sam3Inputs) -> BoolMask:
        mask: BoolMask = self.full_masks(low_res[None], prepared)[0].numpy()
        return mask

    def full_masks(self, low_res: torch.Tensor, prepared: Sam3Inputs) -> torch.Tensor:
        """(n, h, w) mask logits -> (n, height, width) bool masks of the original image, on the
        CPU, by the processor's own resizing and threshold, run where `low_res` lives."""
        chunks = [self._stock_masks(chunk, prepared).cpu() for chunk in low_res.split(MASKS_PER_UPSCALE)]
        if not chunks:
            return torch.zeros((0, prepared.height, prepared.width), dtype=torch.bool)
        return torch.cat(chunks)

    def _stock_masks(self, low_res: torch.Tensor, prepared: Sam3Inputs) -> torch.Tensor:
        # The processor's instance post-processing on these masks alone (every one kept: the
        # pipeline has already chosen them).
        n = len(low_res)
        outputs = SimpleNamespace(
            pred_logits=low_res.new_zeros(1, n),
            pred_boxes=low_res.new_zeros(1, n, 4),
            pred_masks=low_res[None],
            presence_logits=None,
        )
        (result,) = self.processor.post_process_instance_segmentation(
            outputs, threshold=-1.0, mask_threshold=0.5, target_sizes=[(prepared.height, prepared.width)]
        )
        masks: torch.Tensor = result["masks"].bool()
        return masks

    # -- device ----------------------------------------------------------------------------

    def batch_key(self, prepared: Sam3Inputs) -> Hashable:
        """Every image is resized to one square: the encoder batches them all; prompts run per image."""
        return tuple(prepared.pixels.shape)

    def find_batch(self, prepared: list[Sam3Inputs]) -> list[Instances]:
        features = self._features(prepared)
        return [self._find(feature, item) for feature, item in zip(features, prepared, strict=True)]

    def _find(self, features: Sam3VisionEncoderOutput, item: Sam3Inputs) -> Instances:
        """Every query of every prompt as a candidate: thresholds and NMS are the pipeline's."""
        n_prompts = len(item.phrase_ids)
        prompts = {
            name: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
            for name, value in item.prompts.items()
        }
        outputs = self.model(vision_embeds=expand(features, n_prompts), **prompts)
        (found,) = self.processor.post_process_object_detection(
            _flatten_prompts(outputs), threshold=-1.0, target_sizes=[(item.height, item.width)]
        )
        queries = outputs.pred_logits.shape[1]
        phrase_ids = torch.tensor(item.phrase_ids).repeat_interleave(queries)
        scores = found["scores"].float()
        low_res = outputs.pred_masks.flatten(0, 1).float()
        limits = torch.tensor([item.width, item.height] * 2, device=scores.device)
        boxes = torch.minimum(found["boxes"].float().clamp(min=0), limits)
        return Instances(boxes, scores, phrase_ids.to(scores.device), Masks(low_res, scores))

    def _features(self, prepared: list[Sam3Inputs]) -> list[Sam3VisionEncoderOutput]:
        """Vision features from the cache, the misses encoded together in one batch."""

        def encode(pixels: torch.Tensor) -> list[Sam3VisionEncoderOutput]:
            encoded = self.model.get_vision_features(pixel_values=pixels)
            return [one_image(encoded, row) for row in range(len(pixels))]

        return self.features.fetch(prepared, encode)

    def cache_stats(self) -> dict[str, int]:
        return self.features.stats()

    def clear_cache(self) -> None:
        self.features.clear()


def _flatten_prompts(outputs: Any) -> SimpleNamespace:
    """Every prompt's queries as one image's, so the processor scores them in one call; each
    prompt's presence score goes with its own queries."""
    prompts, queries = outputs.pred_logits.shape
    presence = outputs.presence_logits
    return SimpleNamespace(
        pred_logits=outputs.pred_logits.reshape(1, prompts * queries),
        pred_boxes=outputs.pred_boxes.reshape(1, prompts * queries, 4),
        presence_logits=None if presence is None else presence.expand(prompts, queries).reshape(1, -1),
    )


def _tensors(features: Sam3VisionEncoderOutput) -> dict[str, Any]:
    return {
        "last_hidden_state": features.last_hidden_state,
        "fpn_hidden_states": features.fpn_hidden_states,
        "fpn_position_encoding": features.fpn_position_encoding,
    }


def one_image(features: Sam3VisionEncoderOutput, row: int) -> Sam3VisionEncoderOutput:
    """Row `row` of a batch of vision features, as a batch of one (copied, so the batch can go)."""
    return Sam3VisionEncoderOutput(
        **{
            name: value[row : row + 1].clone()
            if isinstance(value, torch.Tensor)
            else tuple(level[row : row + 1].clone() for level in value)
            for name, value in _tensors(features).items()
        }
    )


def expand(features: Sam3VisionEncoderOutput, prompts: int) -> Sam3VisionEncoderOutput:
    """One image's features seen by `prompts` prompts at once (views, no copies)."""
    return Sam3VisionEncoderOutput(
        **{
            name: value.expand(prompts, *value.shape[1:])
            if isinstance(value, torch.Tensor)
            else tuple(level.expand(prompts, *level.shape[1:]) for level in value)
            for name, value in _tensors(features).items()
        }
    )


def features_bytes(features: Sam3VisionEncoderOutput) -> int:
    return tensor_bytes(
        [features.last_hidden_state, *features.fpn_hidden_states, *features.fpn_position_encoding]
    )
