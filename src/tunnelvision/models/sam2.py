"""SAM 2 / 2.1 segmenters: boxes or points -> masks, the image's feature maps cached by its id.

The stock processor resizes every image to one square (no padding) and maps prompts into it;
it needs torchvision. The image embedding is a list of feature maps (one per level).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import AutoProcessor, Sam2Model

from tunnelvision.engine.backend import Check, no_deadline
from tunnelvision.errors import ModelUnavailable
from tunnelvision.imaging import RGBImage
from tunnelvision.models import loading
from tunnelvision.models.base import ImageCache, tensor_bytes
from tunnelvision.models.loading import (
    LoadOptions,
    ModelSource,
    load_model,
    load_pretrained,
    to_device,
)
from tunnelvision.models.roles import Masks, Role, SegmentPrompt
from tunnelvision.models.sam import PromptableSegmenter, best_masks

Embedding = list[torch.Tensor]  # one (1, channels, h, w) feature map per level


def require_torchvision(family: str, source: str) -> None:
    """ModelUnavailable, before loading, where the family's stock processor cannot run."""
    if not loading.torchvision_importable():
        raise ModelUnavailable(
            f"cannot load '{source}': {family} needs torchvision (its transformers processor has no "
            "PIL version); install a torchvision built for this torch (e.g. torch 2.14.1 with "
            "torchvision 0.29.1)"
        )


@dataclass
class Sam2Inputs:
    height: int
    width: int
    pixels: torch.Tensor  # resized to SAM 2's square
    image_id: str = ""  # the embedding cache's key ("": not cached)
    encode_ms: float | None = None  # the image encoder's time, when this request ran it


class Sam2(PromptableSegmenter):
    role: ClassVar[Role] = "segmenter"
    family: ClassVar[str] = "sam2"

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype, options: LoadOptions
    ) -> None:
        super().__init__(source, device, dtype, options)
        require_torchvision(self.family, source.source)
        self.embeddings: ImageCache[Embedding] = ImageCache(self, options.cache_bytes, tensor_bytes)
        self.processor = load_pretrained(AutoProcessor.from_pretrained, source, "segmenter")
        self.model = to_device(
            load_model(Sam2Model.from_pretrained, source, "segmenter", options.attention), device, dtype
        )

    # -- CPU -------------------------------------------------------------------------------

    def prepare(self, image: RGBImage, image_id: str = "", check: Check = no_deadline) -> Sam2Inputs:
        height, width = image.shape[:2]
        inputs = self.processor(images=image, return_tensors="pt", input_data_format="channels_last")
        return Sam2Inputs(height, width, inputs["pixel_values"], image_id)

    def _upscaled(self, masks: torch.Tensor, prepared: Sam2Inputs) -> torch.Tensor:
        original = [[prepared.height, prepared.width]]
        upscaled: torch.Tensor = self.processor.post_process_masks([masks], original)[0]
        return upscaled

    # -- device ----------------------------------------------------------------------------

    def batch_key(self, prepared: Sam2Inputs) -> Hashable:
        """Every image is resized to one square, so all of them batch."""
        return tuple(prepared.pixels.shape)

    def _embeddings(self, prepared: list[Sam2Inputs]) -> list[Embedding]:
        """Feature maps (one tensor per level) from the cache, the misses encoded in one batch."""

        def encode(pixels: torch.Tensor) -> list[Embedding]:
            levels = self.model.get_image_embeddings(pixels)
            return [[level[row : row + 1].clone() for level in levels] for row in range(len(pixels))]

        return self.embeddings.fetch(prepared, encode)

    def _segment(self, embedding: Embedding, prepared: Sam2Inputs, prompt: SegmentPrompt) -> Masks:
        size = [[prepared.height, prepared.width]]
        if prompt.points is not None:
            assert prompt.point_labels is not None
            # One mask from the whole point set: image, one object, its points.
            points = self.processor(
                original_sizes=size,
                input_points=[[prompt.points.tolist()]],
                input_labels=[[prompt.point_labels.tolist()]],
                return_tensors="pt",
            )
            return self._decode(
                embedding,
                prompt.multimask,
                input_points=points["input_points"],
                input_labels=points["input_labels"],
            )
        assert prompt.boxes is not None
        chunks = []
        for chunk in prompt.boxes.split(self.chunk_size):
            boxes = self.processor(original_sizes=size, input_boxes=[chunk.tolist()], return_tensors="pt")
            chunks.append(self._decode(embedding, prompt.multimask, input_boxes=boxes["input_boxes"]))
        return Masks(torch.cat([c.low_res for c in chunks]), torch.cat([c.scores for c in chunks]))

    def _decode(self, embedding: Embedding, multimask: bool, **prompts: Any) -> Masks:
        prompts = {
            name: value.to(self.device, self.dtype) if value.is_floating_point() else value.to(self.device)
            for name, value in prompts.items()
        }
        out = self.model(image_embeddings=embedding, multimask_output=multimask, **prompts)
        return best_masks(out.pred_masks[0], out.iou_scores[0])
