"""GroundingDINO detectors: phrases -> boxes. Also serves MM-Grounding-DINO and LLMDet checkpoints
(model_type `mm-grounding-dino`): same processor and outputs, and the same auto class loads both."""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor

from tunnelvision.engine.backend import Check, no_deadline
from tunnelvision.errors import InvalidInput
from tunnelvision.imaging import RGBImage
from tunnelvision.models.base import Family
from tunnelvision.models.loading import (
    LoadOptions,
    ModelSource,
    load_model,
    load_pretrained,
    processor_kwargs,
    to_device,
)
from tunnelvision.models.roles import Boxes, Role

PHRASE_SEPARATOR_ID = 1012  # '.' in BERT's vocabulary; GroundingDINO splits phrases on it
TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class DetectorInputs:
    height: int
    width: int
    inputs: dict[str, torch.Tensor]
    phrase_spans: list[tuple[int, int]]  # token [start, end) of each phrase


class GroundingDino(Family):
    role: ClassVar[Role] = "detector"
    family: ClassVar[str] = "grounding-dino"

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype, options: LoadOptions
    ) -> None:
        super().__init__(source, device, dtype)
        self.processor = load_pretrained(
            AutoProcessor.from_pretrained, source, "detector", **processor_kwargs()
        )
        model = load_model(
            AutoModelForZeroShotObjectDetection.from_pretrained, source, "detector", options.attention
        )
        self.model = to_device(model, device, dtype)
        self.max_text_tokens = int(getattr(self.model.config, "max_text_len", 256))

    def prepare(self, image: RGBImage, phrases: list[str], check: Check = no_deadline) -> DetectorInputs:
        height, width = image.shape[:2]
        text = ". ".join(phrases).lower() + "."  # the model was trained on lower-case text
        # Channels last, said explicitly: a 1-3 pixel tall image would be guessed channels-first.
        inputs = self.processor(
            images=image, text=text, return_tensors="pt", input_data_format="channels_last"
        )
        ids = inputs["input_ids"][0].tolist()
        if len(ids) > self.max_text_tokens:
            raise InvalidInput(f"prompt is {len(ids)} tokens long; the detector takes {self.max_text_tokens}")
        return DetectorInputs(height, width, dict(inputs), phrase_token_spans(ids, len(phrases)))

    def batch_key(self, prepared: DetectorInputs) -> Hashable:
        """Batches are exact only for images of the same processed size: bucket by shape."""
        return tuple(prepared.inputs["pixel_values"].shape)

    def detect_batch(self, prepared: list[DetectorInputs]) -> list[Boxes]:
        inputs = collate_detector_inputs([p.inputs for p in prepared])
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.model(**inputs)
        return [
            phrase_boxes(outputs.logits[row], outputs.pred_boxes[row], item)
            for row, item in enumerate(prepared)
        ]


def phrase_boxes(logits: torch.Tensor, pred_boxes: torch.Tensor, prepared: DetectorInputs) -> Boxes:
    """Each query's best phrase (its tokens' highest probability) and box in original pixels."""
    probs = logits.float().sigmoid()  # (queries, text tokens)
    phrase_probs = torch.stack([probs[:, s:e].max(dim=1).values for s, e in prepared.phrase_spans], dim=1)
    scores, phrase_ids = phrase_probs.max(dim=1)
    return Boxes(cxcywh_to_xyxy(pred_boxes.float(), prepared.width, prepared.height), scores, phrase_ids)


def phrase_token_spans(input_ids: list[int], n_phrases: int) -> list[tuple[int, int]]:
    """Token ranges of each phrase in '[CLS] a cat . dog . [SEP]' (between the separators)."""
    spans, start = [], 1
    for position, token in enumerate(input_ids[1:-1], start=1):
        if token == PHRASE_SEPARATOR_ID:
            if position > start:
                spans.append((start, position))
            start = position + 1
    if len(spans) != n_phrases:
        raise InvalidInput("could not split the prompt into its phrases; avoid '.' inside a label")
    return spans


def collate_detector_inputs(inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch from per-image processor outputs: text padded on the right (exact), images
    stacked (the batch key guarantees equal shapes)."""
    longest = max(x["input_ids"].shape[1] for x in inputs)
    batch = {}
    for name in inputs[0]:
        parts = [x[name] for x in inputs]
        if name in TEXT_INPUTS:
            parts = [torch.nn.functional.pad(part, (0, longest - part.shape[1])) for part in parts]
        batch[name] = torch.cat(parts)
    return batch


def cxcywh_to_xyxy(boxes: torch.Tensor, width: int, height: int) -> torch.Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    xyxy = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)
    xyxy = xyxy * torch.tensor([width, height, width, height], device=boxes.device)
    limits = torch.tensor([width, height, width, height], device=boxes.device, dtype=xyxy.dtype)
    return torch.minimum(xyxy.clamp(min=0), limits)
