"""Grounded-SAM on transformers: GroundingDINO turns phrases into boxes, SAM boxes into masks."""

from __future__ import annotations

import logging
from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel

from tunnelvision.engine.backend import BackendInfo, Check, no_deadline
from tunnelvision.engine.cache import ByteLRU
from tunnelvision.errors import DeviceOutOfMemory, InvalidInput
from tunnelvision.imaging import RGBImage
from tunnelvision.masks import batched_nms, encode_mask, mask_to_box
from tunnelvision.models.loading import (
    load_model,
    load_pretrained,
    processor_kwargs,
    resolve_device,
    resolve_dtype,
    resolve_source,
)
from tunnelvision.schemas import Detection, DetectParams, Segmentation, SegmentParams

log = logging.getLogger(__name__)
PHRASE_SEPARATOR_ID = 1012  # '.' in BERT's vocabulary; GroundingDINO splits phrases on it


@dataclass
class Prepared:
    height: int
    width: int
    detector_inputs: dict[str, torch.Tensor] | None  # text prompts only
    phrase_spans: list[tuple[int, int]]  # token [start, end) of each phrase
    sam_pixels: torch.Tensor | None  # segmentation only
    sam_scale: tuple[float, float]  # original -> SAM input coordinates (x, y)
    boxes: torch.Tensor | None  # box prompts, original pixels
    points: torch.Tensor | None  # point prompts (n, 2) and their labels (n,)
    point_labels: torch.Tensor | None
    image_id: str = ""  # the sender's id for the image: the embedding cache's key ("": not cached)


@dataclass
class RawResult:
    boxes: torch.Tensor  # (n, 4) original pixels
    scores: torch.Tensor | None  # (n,) detector scores, text prompts only
    phrase_ids: torch.Tensor | None  # (n,)
    low_res_masks: torch.Tensor | None  # (n, h, w) SAM logits before upscaling
    mask_scores: torch.Tensor | None  # (n,)


class GroundedSam:
    """One replica: both models on one device. Safe to `prepare`/`finish` from any thread."""

    def __init__(
        self,
        detector: str,
        segmenter: str,
        device: str = "auto",
        dtype: str = "float32",
        sam_chunk_size: int = 64,
        cache_bytes: int = 0,
        attention: str = "sdpa",
        compile_encoder: bool = False,
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.sam_chunk_size = sam_chunk_size
        self.embeddings: ByteLRU[torch.Tensor] = ByteLRU(cache_bytes)
        det_src, seg_src = resolve_source(detector, "detector"), resolve_source(segmenter, "segmenter")
        self.detector_processor = load_pretrained(
            AutoProcessor.from_pretrained, det_src, "detector", **processor_kwargs()
        )
        self.detector = self._to_device(
            load_model(AutoModelForZeroShotObjectDetection.from_pretrained, det_src, "detector", attention)
        )
        self.sam_processor = load_pretrained(
            AutoProcessor.from_pretrained, seg_src, "segmenter", **processor_kwargs()
        )
        self.sam = self._to_device(load_model(SamModel.from_pretrained, seg_src, "segmenter", attention))
        if compile_encoder:  # fixed input size (the padded square), so one compilation serves all
            self.sam.vision_encoder = torch.compile(self.sam.vision_encoder)
        self.max_text_tokens = int(getattr(self.detector.config, "max_text_len", 256))
        self.info = BackendInfo(detector, segmenter, str(self.device), dtype)

    def _to_device(self, model: Any) -> Any:
        return model.to(device=self.device, dtype=self.dtype).eval()

    # -- CPU: prepare ----------------------------------------------------------------------

    def prepare(
        self, image: RGBImage, params: DetectParams, image_id: str = "", check: Check = no_deadline
    ) -> Prepared:
        height, width = image.shape[:2]
        prepared = Prepared(height, width, None, [], None, (1.0, 1.0), None, None, None, image_id)
        if params.phrases:
            prepared.detector_inputs, prepared.phrase_spans = self._prepare_detector(image, params.phrases)
        if isinstance(params, SegmentParams):
            check()  # each processor resizes and normalises the whole image
            self._prepare_sam(image, params, prepared)
        return prepared

    def _prepare_detector(
        self, image: RGBImage, phrases: list[str]
    ) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        text = ". ".join(phrases) + "."
        # Channels last, said explicitly: a 1-3 pixel tall image would be guessed channels-first.
        inputs = self.detector_processor(
            images=image, text=text, return_tensors="pt", input_data_format="channels_last"
        )
        ids = inputs["input_ids"][0].tolist()
        if len(ids) > self.max_text_tokens:
            raise InvalidInput(f"prompt is {len(ids)} tokens long; the detector takes {self.max_text_tokens}")
        return dict(inputs), phrase_token_spans(ids, len(phrases))

    def _prepare_sam(self, image: RGBImage, params: SegmentParams, prepared: Prepared) -> None:
        sam_inputs = self.sam_processor(images=image, return_tensors="pt", input_data_format="channels_last")
        prepared.sam_pixels = sam_inputs["pixel_values"]
        new_h, new_w = (int(v) for v in sam_inputs["reshaped_input_sizes"][0])
        prepared.sam_scale = (new_w / prepared.width, new_h / prepared.height)
        if params.boxes:
            prepared.boxes = torch.tensor(params.boxes, dtype=torch.float32)
        if params.points:
            pts = torch.tensor(params.points, dtype=torch.float32)
            prepared.points, prepared.point_labels = pts[:, :2], pts[:, 2].long()

    # -- device: run -----------------------------------------------------------------------

    def batch_key(self, prepared: Prepared, params: DetectParams) -> Hashable | None:
        """GroundingDINO batches exactly only images of the same processed size (models.md);
        SAM's encoder pads every image to one square, so box/point prompts always batch."""
        if prepared.detector_inputs is not None:
            return ("detect", tuple(prepared.detector_inputs["pixel_values"].shape))
        if prepared.sam_pixels is not None:
            return ("sam", tuple(prepared.sam_pixels.shape))
        return None

    def run(self, prepared: Prepared, params: DetectParams) -> RawResult:
        (raw,) = self.run_batch([(prepared, params)])
        if isinstance(raw, BaseException):
            raise raw
        assert isinstance(raw, RawResult)
        return raw

    @torch.inference_mode()
    def run_batch(self, items: list[tuple[Prepared, DetectParams]]) -> list[Any]:
        try:
            return self._run_batch(items)
        except torch.cuda.OutOfMemoryError as exc:
            self.embeddings.clear()
            free_device_memory()
            raise DeviceOutOfMemory("the GPU ran out of memory; retry, or send a smaller image", 5.0) from exc

    def _run_batch(self, items: list[tuple[Prepared, DetectParams]]) -> list[Any]:
        raws = [
            RawResult(p.boxes if p.boxes is not None else torch.empty(0, 4), None, None, None, None)
            for p, _ in items
        ]
        detecting = [i for i, (p, _) in enumerate(items) if p.detector_inputs is not None]
        for i, raw in zip(detecting, self._detect_batch([items[i] for i in detecting]), strict=True):
            raws[i] = raw
        # Nothing detected, or detect only: SAM is not called for that item.
        segmenting = [
            i
            for i, (p, _) in enumerate(items)
            if p.sam_pixels is not None and (raws[i].boxes.numel() > 0 or p.points is not None)
        ]
        embeddings = self._embeddings([items[i][0] for i in segmenting])
        for i, embedding in zip(segmenting, embeddings, strict=True):
            prepared, params = items[i]
            raws[i].low_res_masks, raws[i].mask_scores = self._segment(
                embedding, prepared, raws[i].boxes, params
            )
        return raws

    def _detect_batch(self, items: list[tuple[Prepared, DetectParams]]) -> list[RawResult]:
        if not items:
            return []
        inputs = collate_detector_inputs([p.detector_inputs or {} for p, _ in items])
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.detector(**inputs)
        return [
            self._select_boxes(outputs.logits[row], outputs.pred_boxes[row], prepared, params)
            for row, (prepared, params) in enumerate(items)
        ]

    def _select_boxes(
        self, logits: torch.Tensor, pred_boxes: torch.Tensor, prepared: Prepared, params: DetectParams
    ) -> RawResult:
        probs = logits.float().sigmoid()  # (queries, text tokens)
        phrase_probs = torch.stack([probs[:, s:e].max(dim=1).values for s, e in prepared.phrase_spans], dim=1)
        scores, phrase_ids = phrase_probs.max(dim=1)
        boxes = cxcywh_to_xyxy(pred_boxes.float(), prepared.width, prepared.height)
        keep = (scores >= params.box_threshold) & (scores >= params.text_threshold)
        boxes, scores, phrase_ids = boxes[keep], scores[keep], phrase_ids[keep]
        if params.nms_iou < 1.0:
            kept = batched_nms(boxes, scores, phrase_ids, params.nms_iou)
        else:
            kept = scores.argsort(descending=True)
        kept = kept[: params.max_detections]
        return RawResult(boxes[kept].cpu(), scores[kept].cpu(), phrase_ids[kept].cpu(), None, None)

    def _embeddings(self, prepared: list[Prepared]) -> list[torch.Tensor]:
        """SAM image embeddings from the cache, the misses encoded together in one batch."""
        found = [self.embeddings.get(self._embedding_key(p)) if p.image_id else None for p in prepared]
        missing = [i for i, embedding in enumerate(found) if embedding is None]
        if missing:
            pixels = torch.cat([_sam_pixels(prepared[i]) for i in missing])
            encoded = self.sam.get_image_embeddings(pixels.to(self.device, self.dtype))
            for i, embedding in zip(missing, encoded, strict=True):
                embedding = embedding[None].clone()
                found[i] = embedding
                if not prepared[i].image_id:
                    continue
                self.embeddings.put(
                    self._embedding_key(prepared[i]), embedding, embedding.numel() * embedding.element_size()
                )
        return [e for e in found if e is not None]

    def _embedding_key(self, prepared: Prepared) -> Hashable:
        shape = tuple(_sam_pixels(prepared).shape)
        return (prepared.image_id, self.info.segmenter, str(self.dtype), shape)

    def _segment(
        self, embeddings: torch.Tensor, prepared: Prepared, boxes: torch.Tensor, params: DetectParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        multimask = isinstance(params, SegmentParams) and params.multimask
        scale = torch.tensor(prepared.sam_scale * 2)
        if prepared.points is not None:
            assert prepared.point_labels is not None
            points = (prepared.points * scale[:2])[None, None].to(self.device)
            labels = prepared.point_labels[None, None].to(self.device)
            return self._decode(embeddings, multimask, input_points=points, input_labels=labels)
        chunks = [
            self._decode(embeddings, multimask, input_boxes=(chunk * scale)[None].to(self.device))
            for chunk in boxes.split(self.sam_chunk_size)
        ]
        return torch.cat([m for m, _ in chunks]), torch.cat([s for _, s in chunks])

    def cache_stats(self) -> dict[str, int]:
        return self.embeddings.stats()

    def memory_allocated(self) -> int | None:
        return torch.cuda.memory_allocated(self.device) if self.device.type == "cuda" else None

    def _decode(
        self, embeddings: torch.Tensor, multimask: bool, **prompts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.sam(image_embeddings=embeddings, multimask_output=multimask, **prompts)
        masks, ious = out.pred_masks[0].float(), out.iou_scores[0].float()  # (n, k, h, w), (n, k)
        best = ious.argmax(dim=1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        return masks[rows, best].cpu(), ious[rows, best].cpu()

    # -- CPU: finish -----------------------------------------------------------------------

    def finish(
        self, raw: RawResult, params: DetectParams, prepared: Prepared, check: Check = no_deadline
    ) -> list[Detection]:
        phrases = params.phrases
        labels = [phrases[int(i)] for i in raw.phrase_ids] if raw.phrase_ids is not None else None
        if not isinstance(params, SegmentParams):
            return [
                Detection(label=labels[i] if labels else None, score=_score(raw.scores, i), box=_box(b))
                for i, b in enumerate(raw.boxes)
            ]
        return self._finish_masks(raw, params, prepared, labels, check)

    def _finish_masks(
        self,
        raw: RawResult,
        params: SegmentParams,
        prepared: Prepared,
        labels: list[str] | None,
        check: Check,
    ) -> list[Detection]:
        if raw.low_res_masks is None or raw.mask_scores is None:
            return []
        results: list[Detection] = []
        for i, low_res in enumerate(raw.low_res_masks):
            check()  # each mask is upscaled to full size and encoded: the costly part
            mask = self._upscale(low_res, prepared)  # one at a time: full-size masks add up fast
            box = _box(raw.boxes[i]) if prepared.points is None else mask_to_box(mask)
            results.append(
                Segmentation(
                    label=labels[i] if labels else None,
                    score=_score(raw.scores, i),
                    box=box,
                    mask=encode_mask(mask, params.mask_format),
                    mask_score=round(float(raw.mask_scores[i]), 4),
                )
            )
        return results

    def _upscale(self, low_res: torch.Tensor, prepared: Prepared) -> Any:
        reshaped = [
            [round(prepared.height * prepared.sam_scale[1]), round(prepared.width * prepared.sam_scale[0])]
        ]
        masks = self.sam_processor.post_process_masks(
            [low_res[None, None]], [[prepared.height, prepared.width]], reshaped
        )
        return masks[0][0, 0].numpy()


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


TEXT_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def collate_detector_inputs(inputs: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One batch from per-image processor outputs: text padded on the right (exact, models.md),
    images stacked (the batch key guarantees equal shapes)."""
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
    return torch.stack(
        [
            xyxy[:, 0].clamp(0, width),
            xyxy[:, 1].clamp(0, height),
            xyxy[:, 2].clamp(0, width),
            xyxy[:, 3].clamp(0, height),
        ],
        dim=-1,
    )


def _sam_pixels(prepared: Prepared) -> torch.Tensor:
    assert prepared.sam_pixels is not None
    return prepared.sam_pixels


def free_device_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _box(box: torch.Tensor) -> list[float]:
    return [round(float(v), 2) for v in box]


def _score(scores: torch.Tensor | None, i: int) -> float | None:
    return None if scores is None else round(float(scores[i]), 4)
