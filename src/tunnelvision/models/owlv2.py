"""OWLv2 detectors: phrases and/or exemplar boxes -> boxes.

Text queries are the text model's embeddings. An exemplar is image-guided detection: its region
of the image, cut out, is the query image, and the model's most object-like box in it becomes a
query like a phrase (so phrases and exemplars are scored by the same class head in one pass).
Negative exemplars drop the boxes that match them better than what they were found for.
The stock processor pads each image to a square (bottom and right) before resizing, so boxes are
fractions of the padded square's side.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import AutoProcessor, Owlv2ForObjectDetection

from tunnelvision.engine.backend import Check, no_deadline
from tunnelvision.errors import InvalidInput
from tunnelvision.imaging import RGBImage
from tunnelvision.models.base import Family
from tunnelvision.models.grounding_dino import cxcywh_to_xyxy
from tunnelvision.models.loading import (
    LoadOptions,
    ModelSource,
    load_model,
    load_pretrained,
    processor_kwargs,
    to_device,
)
from tunnelvision.models.roles import EXEMPLAR_PHRASE, Boxes, Exemplar, Role


@dataclass
class OwlInputs:
    height: int
    width: int
    pixels: torch.Tensor  # (1, 3, side, side): padded to a square, then resized
    text: dict[str, torch.Tensor] | None = None  # input_ids, attention_mask: one row per phrase
    query_pixels: torch.Tensor | None = None  # (exemplars, 3, side, side): each exemplar's region
    query_labels: list[int] = field(default_factory=list)  # 1 more like this, 0 not this


class Owlv2(Family):
    role: ClassVar[Role] = "detector"
    family: ClassVar[str] = "owlv2"
    takes_exemplars: ClassVar[bool] = True

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype, options: LoadOptions
    ) -> None:
        super().__init__(source, device, dtype)
        self.processor = load_pretrained(
            AutoProcessor.from_pretrained, source, "detector", **processor_kwargs()
        )
        model = load_model(Owlv2ForObjectDetection.from_pretrained, source, "detector", options.attention)
        self.model = to_device(model, device, dtype)
        self.max_text_tokens = int(self.model.config.text_config.max_position_embeddings)
        # Without it the tokenizer cannot pad to the text model's length.
        self.processor.tokenizer.model_max_length = self.max_text_tokens

    # -- CPU -------------------------------------------------------------------------------

    def prepare(self, image: RGBImage, phrases: list[str], check: Check = no_deadline) -> OwlInputs:
        return self.prepare_with_exemplars(image, phrases, [], check)

    def prepare_with_exemplars(
        self, image: RGBImage, phrases: list[str], exemplars: list[Exemplar], check: Check = no_deadline
    ) -> OwlInputs:
        height, width = image.shape[:2]
        pixels = self._pixels(images=image)
        prepared = OwlInputs(height, width, pixels)
        if phrases:
            text = self.processor(text=[phrase.lower() for phrase in phrases], return_tensors="pt")
            if text["input_ids"].shape[1] > self.max_text_tokens:
                longest = text["input_ids"].shape[1]
                raise InvalidInput(f"a phrase is {longest} tokens long; OWLv2 takes {self.max_text_tokens}")
            prepared.text = {name: text[name] for name in ("input_ids", "attention_mask")}
        if exemplars:
            check()  # each exemplar's region is resized and normalised like a whole image
            prepared.query_pixels = self._pixels(query_images=[region(image, box) for box, _ in exemplars])
            prepared.query_labels = [label for _, label in exemplars]
        return prepared

    def _pixels(self, **images: object) -> torch.Tensor:
        # Channels last, said explicitly: a 1-3 pixel tall image would be guessed channels-first.
        inputs = self.processor(**images, return_tensors="pt", input_data_format="channels_last")
        pixels: torch.Tensor = inputs["query_pixel_values" if "query_images" in images else "pixel_values"]
        return pixels

    # -- device ----------------------------------------------------------------------------

    def batch_key(self, prepared: OwlInputs) -> Hashable:
        """Every image is padded and resized to one square, so all of them batch."""
        return tuple(prepared.pixels.shape)

    def detect_batch(self, prepared: list[OwlInputs]) -> list[Boxes]:
        model = self.model
        feature_map = model.image_embedder(
            pixel_values=self._on_device(torch.cat([p.pixels for p in prepared]))
        )[0]
        image_feats = feature_map.flatten(1, 2)  # (images, patches, hidden)
        pred_boxes = model.box_predictor(image_feats, feature_map)  # cxcywh, fractions of the square
        text_queries = self._text_queries(prepared)
        exemplar_queries = self._exemplar_queries(prepared)
        answers = []
        for row, item in enumerate(prepared):
            queries = torch.cat([text_queries[row], exemplar_queries[row]])
            logits, _ = model.class_predictor(image_feats[row : row + 1], queries[None], None)
            answers.append(self._candidates(logits[0].float(), pred_boxes[row].float(), item))
        return answers

    def _text_queries(self, prepared: list[OwlInputs]) -> list[torch.Tensor]:
        """Each item's phrase embeddings (phrases, dim); the text of the whole batch in one pass."""
        counts = [0 if p.text is None else len(p.text["input_ids"]) for p in prepared]
        dim = self.model.config.projection_dim
        if not any(counts):
            return [torch.empty(0, dim, device=self.device, dtype=self.dtype) for _ in prepared]
        texts = [p.text for p in prepared if p.text is not None]
        embeds = self.model.owlv2.get_text_features(
            input_ids=torch.cat([t["input_ids"] for t in texts]).to(self.device),
            attention_mask=torch.cat([t["attention_mask"] for t in texts]).to(self.device),
        ).pooler_output
        return list(embeds.split(counts))

    def _exemplar_queries(self, prepared: list[OwlInputs]) -> list[torch.Tensor]:
        """Each item's exemplar embeddings: the most object-like box of each exemplar's region."""
        counts = [0 if p.query_pixels is None else len(p.query_pixels) for p in prepared]
        dim = self.model.config.text_config.hidden_size  # the class head's output size
        if not any(counts):
            return [torch.empty(0, dim, device=self.device, dtype=self.dtype) for _ in prepared]
        pixels = torch.cat([p.query_pixels for p in prepared if p.query_pixels is not None])
        query_map = self.model.image_embedder(pixel_values=self._on_device(pixels))[0]
        embeds, _, _ = self.model.embed_image_query(query_map.flatten(1, 2), query_map)
        return list(embeds[:, 0].split(counts))

    def _candidates(self, logits: torch.Tensor, pred_boxes: torch.Tensor, item: OwlInputs) -> Boxes:
        """Per patch: its best phrase, and (as EXEMPLAR_PHRASE) its match to the positive
        exemplars; a row goes where a negative exemplar matches it better."""
        n_text = 0 if item.text is None else len(item.text["input_ids"])
        labels = torch.tensor(item.query_labels, device=logits.device)
        exemplar_logits = logits[:, n_text:]
        negative = exemplar_logits[:, labels == 0].max(dim=1).values if (labels == 0).any() else None
        side = max(item.height, item.width)  # boxes are fractions of the padded square's side
        boxes = cxcywh_to_xyxy(pred_boxes, side, side)
        limits = torch.tensor([item.width, item.height, item.width, item.height], device=boxes.device)
        boxes = torch.minimum(boxes, limits)
        parts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (best logit, phrase id) per patch
        if n_text:
            best, phrase_ids = logits[:, :n_text].max(dim=1)
            parts.append((best, phrase_ids))
        if (labels == 1).any():
            best = exemplar_logits[:, labels == 1].max(dim=1).values
            parts.append((best, torch.full_like(best, EXEMPLAR_PHRASE, dtype=torch.long)))
        kept_boxes, scores, ids = [], [], []
        for best, phrase_ids in parts:
            keep = best > negative if negative is not None else torch.ones_like(best, dtype=torch.bool)
            kept_boxes.append(boxes[keep])
            scores.append(best[keep].sigmoid())
            ids.append(phrase_ids[keep])
        if not parts:  # negative exemplars alone find nothing
            return Boxes(boxes[:0], logits.new_zeros(0), torch.zeros(0, dtype=torch.long))
        return Boxes(torch.cat(kept_boxes), torch.cat(scores), torch.cat(ids))

    def _on_device(self, pixels: torch.Tensor) -> torch.Tensor:
        return pixels.to(self.device, self.dtype)


def region(image: RGBImage, box: list[float]) -> RGBImage:
    """The pixels inside [x1, y1, x2, y2], at least one pixel each way."""
    height, width = image.shape[:2]
    x1, y1 = min(int(box[0]), width - 1), min(int(box[1]), height - 1)
    x2, y2 = max(min(math.ceil(box[2]), width), x1 + 1), max(min(math.ceil(box[3]), height), y1 + 1)
    cropped: RGBImage = image[y1:y2, x1:x2]
    return cropped
