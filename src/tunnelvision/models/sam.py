"""SAM segmenters: boxes or points -> masks, the image embedding cached by the image's id."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from transformers import AutoProcessor, SamModel

from tunnelvision.engine.backend import Check, no_deadline
from tunnelvision.imaging import RGBImage
from tunnelvision.models.base import Family, ImageCache, tensor_bytes_of
from tunnelvision.models.loading import (
    LoadOptions,
    ModelSource,
    load_model,
    load_pretrained,
    processor_kwargs,
    to_device,
)
from tunnelvision.models.roles import BoolMask, Masks, Role, SegmentPrompt


@dataclass
class SamInputs:
    height: int
    width: int
    pixels: torch.Tensor  # resized and padded to SAM's square
    scale: tuple[float, float]  # original -> SAM input coordinates (x, y)
    image_id: str = ""  # the sender's id for the image: the embedding cache's key ("": not cached)
    encode_ms: float | None = None  # the image encoder's time, when this request ran it


# Masks upscaled in one call: each makes a float copy at the padded square and at full size.
MASKS_PER_UPSCALE = 16


class PromptableSegmenter(Family):
    """SAM-style segmenters: one cached image encoding per image, then a decoder pass per chunk of
    prompts. Subclasses encode (`_embeddings`), decode (`_segment`) and upscale (`full_masks`)."""

    embeddings: ImageCache[Any]

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype, options: LoadOptions
    ) -> None:
        super().__init__(source, device, dtype)
        self.chunk_size = options.sam_chunk_size  # box prompts decoded in one call
        self.upscale_on_device = device.type != "cpu"  # see segment_batch

    def segment_batch(self, items: list[tuple[Any, SegmentPrompt]]) -> list[Masks]:
        """On a GPU the masks are upscaled and thresholded there, many at once, and only the final
        bool masks cross to the CPU. On the CPU that would only move the same work into the
        device worker, out of reach of the request's deadline (and it measured slower than one
        mask at a time), so the finish step upscales them one by one instead."""
        embeddings = self._embeddings([prepared for prepared, _ in items])
        answers = []
        for embedding, (prepared, prompt) in zip(embeddings, items, strict=True):
            masks = self._segment(embedding, prepared, prompt)
            full = self.full_masks(masks.low_res, prepared) if self.upscale_on_device else None
            answers.append(Masks(masks.low_res.cpu(), masks.scores.cpu(), full))
        return answers

    def _embeddings(self, prepared: list[Any]) -> list[Any]:
        raise NotImplementedError

    def _segment(self, embedding: Any, prepared: Any, prompt: SegmentPrompt) -> Masks:
        raise NotImplementedError

    def upscale(self, low_res: torch.Tensor, prepared: Any) -> BoolMask:
        mask: BoolMask = self.full_masks(low_res[None], prepared)[0].numpy()
        return mask

    def full_masks(self, low_res: torch.Tensor, prepared: Any) -> torch.Tensor:
        """(n, h, w) logits -> (n, height, width) bool masks of the original image, on the CPU.
        The processor's own upscaling, run where `low_res` lives (the device), many masks per
        call; chunks bound the float copies it makes at full size."""
        parts = low_res.split(MASKS_PER_UPSCALE)
        chunks = [self._upscaled(chunk[:, None], prepared)[:, 0].cpu() for chunk in parts]
        if not chunks:
            return torch.zeros((0, prepared.height, prepared.width), dtype=torch.bool)
        return torch.cat(chunks)

    def _upscaled(self, masks: torch.Tensor, prepared: Any) -> torch.Tensor:
        """(n, 1, h, w) logits -> (n, 1, height, width) bool, by the family's processor."""
        raise NotImplementedError

    def cache_stats(self) -> dict[str, int]:
        return self.embeddings.stats()

    def clear_cache(self) -> None:
        self.embeddings.clear()


class Sam(PromptableSegmenter):
    role: ClassVar[Role] = "segmenter"
    family: ClassVar[str] = "sam"

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype, options: LoadOptions
    ) -> None:
        super().__init__(source, device, dtype, options)
        self.embeddings: ImageCache[torch.Tensor] = ImageCache(self, options.cache_bytes, tensor_bytes_of)
        self.processor = load_pretrained(
            AutoProcessor.from_pretrained, source, "segmenter", **processor_kwargs()
        )
        self.model = to_device(
            load_model(SamModel.from_pretrained, source, "segmenter", options.attention), device, dtype
        )
        if options.compile_encoder:  # fixed input size (the padded square), so one compilation serves all
            self.model.vision_encoder = torch.compile(self.model.vision_encoder)

    # -- CPU -------------------------------------------------------------------------------

    def prepare(self, image: RGBImage, image_id: str = "", check: Check = no_deadline) -> SamInputs:
        height, width = image.shape[:2]
        inputs = self.processor(images=image, return_tensors="pt", input_data_format="channels_last")
        new_h, new_w = (int(v) for v in inputs["reshaped_input_sizes"][0])
        return SamInputs(height, width, inputs["pixel_values"], (new_w / width, new_h / height), image_id)

    def _upscaled(self, masks: torch.Tensor, prepared: SamInputs) -> torch.Tensor:
        reshaped = [[round(prepared.height * prepared.scale[1]), round(prepared.width * prepared.scale[0])]]
        original = [[prepared.height, prepared.width]]
        upscaled: torch.Tensor = self.processor.post_process_masks([masks], original, reshaped)[0]
        return upscaled

    # -- device ----------------------------------------------------------------------------

    def batch_key(self, prepared: SamInputs) -> Hashable:
        """Every image is resized and padded to one square, so all of them batch exactly."""
        return tuple(prepared.pixels.shape)

    def _embeddings(self, prepared: list[SamInputs]) -> list[torch.Tensor]:
        """Image embeddings from the cache, the misses encoded together in one batch."""
        return self.embeddings.fetch(
            prepared, lambda pixels: [e[None].clone() for e in self.model.get_image_embeddings(pixels)]
        )

    def _segment(self, embeddings: torch.Tensor, prepared: SamInputs, prompt: SegmentPrompt) -> Masks:
        scale = torch.tensor(prepared.scale * 2)
        if prompt.points is not None:
            assert prompt.point_labels is not None
            points = (prompt.points * scale[:2])[None, None].to(self.device)
            labels = prompt.point_labels[None, None].to(self.device)
            return self._decode(embeddings, prompt.multimask, input_points=points, input_labels=labels)
        assert prompt.boxes is not None
        chunks = [
            self._decode(embeddings, prompt.multimask, input_boxes=(chunk * scale)[None].to(self.device))
            for chunk in prompt.boxes.split(self.chunk_size)
        ]
        return Masks(torch.cat([c.low_res for c in chunks]), torch.cat([c.scores for c in chunks]))

    def _decode(self, embeddings: torch.Tensor, multimask: bool, **prompts: torch.Tensor) -> Masks:
        out = self.model(image_embeddings=embeddings, multimask_output=multimask, **prompts)
        return best_masks(out.pred_masks[0], out.iou_scores[0])


def best_masks(pred_masks: torch.Tensor, iou_scores: torch.Tensor) -> Masks:
    """Of the k masks a SAM-style decoder proposes per prompt, (n, k, h, w) with scores (n, k),
    the one with the best predicted IoU; left on the device."""
    masks, ious = pred_masks.float(), iou_scores.float()
    best = ious.argmax(dim=1)
    rows = torch.arange(masks.shape[0], device=masks.device)
    return Masks(masks[rows, best], ious[rows, best])
