"""Grounded-SAM on transformers: GroundingDINO turns phrases into boxes, SAM boxes into masks."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoModelForZeroShotObjectDetection, AutoProcessor, SamModel

from tunnelvision.engine.backend import BackendInfo
from tunnelvision.errors import DeviceOutOfMemory, InvalidInput
from tunnelvision.imaging import RGBImage
from tunnelvision.masks import batched_nms, encode_mask, mask_to_box
from tunnelvision.models.loading import (
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
    ) -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.sam_chunk_size = sam_chunk_size
        det_src, seg_src = resolve_source(detector, "detector"), resolve_source(segmenter, "segmenter")
        self.detector_processor = load_pretrained(
            AutoProcessor.from_pretrained, det_src, "detector", **processor_kwargs()
        )
        self.detector = self._to_device(
            load_pretrained(AutoModelForZeroShotObjectDetection.from_pretrained, det_src, "detector")
        )
        self.sam_processor = load_pretrained(
            AutoProcessor.from_pretrained, seg_src, "segmenter", **processor_kwargs()
        )
        self.sam = self._to_device(load_pretrained(SamModel.from_pretrained, seg_src, "segmenter"))
        self.max_text_tokens = int(getattr(self.detector.config, "max_text_len", 256))
        self.info = BackendInfo(detector, segmenter, str(self.device), dtype)

    def _to_device(self, model: Any) -> Any:
        return model.to(device=self.device, dtype=self.dtype).eval()

    # -- CPU: prepare ----------------------------------------------------------------------

    def prepare(self, image: RGBImage, params: DetectParams) -> Prepared:
        height, width = image.shape[:2]
        prepared = Prepared(height, width, None, [], None, (1.0, 1.0), None, None, None)
        if params.phrases:
            prepared.detector_inputs, prepared.phrase_spans = self._prepare_detector(image, params.phrases)
        if isinstance(params, SegmentParams):
            self._prepare_sam(image, params, prepared)
        return prepared

    def _prepare_detector(
        self, image: RGBImage, phrases: list[str]
    ) -> tuple[dict[str, torch.Tensor], list[tuple[int, int]]]:
        text = ". ".join(phrases) + "."
        inputs = self.detector_processor(images=image, text=text, return_tensors="pt")
        ids = inputs["input_ids"][0].tolist()
        if len(ids) > self.max_text_tokens:
            raise InvalidInput(f"prompt is {len(ids)} tokens long; the detector takes {self.max_text_tokens}")
        return dict(inputs), phrase_token_spans(ids, len(phrases))

    def _prepare_sam(self, image: RGBImage, params: SegmentParams, prepared: Prepared) -> None:
        sam_inputs = self.sam_processor(images=image, return_tensors="pt")
        prepared.sam_pixels = sam_inputs["pixel_values"]
        new_h, new_w = (int(v) for v in sam_inputs["reshaped_input_sizes"][0])
        prepared.sam_scale = (new_w / prepared.width, new_h / prepared.height)
        if params.boxes:
            prepared.boxes = torch.tensor(params.boxes, dtype=torch.float32)
        if params.points:
            pts = torch.tensor(params.points, dtype=torch.float32)
            prepared.points, prepared.point_labels = pts[:, :2], pts[:, 2].long()

    # -- device: run -----------------------------------------------------------------------

    @torch.inference_mode()
    def run(self, prepared: Prepared, params: DetectParams) -> RawResult:
        try:
            return self._run(prepared, params)
        except torch.cuda.OutOfMemoryError as exc:
            free_device_memory()
            raise DeviceOutOfMemory("the GPU ran out of memory; retry, or send a smaller image", 5.0) from exc

    def _run(self, prepared: Prepared, params: DetectParams) -> RawResult:
        raw = RawResult(torch.empty(0, 4), None, None, None, None)
        if prepared.detector_inputs is not None:
            raw = self._detect(prepared, params)
        elif prepared.boxes is not None:
            raw.boxes = prepared.boxes
        if prepared.sam_pixels is None or (raw.boxes.numel() == 0 and prepared.points is None):
            return raw  # detect only, or nothing detected: SAM is not called
        raw.low_res_masks, raw.mask_scores = self._segment(prepared, raw.boxes, params)
        return raw

    def _detect(self, prepared: Prepared, params: DetectParams) -> RawResult:
        inputs = {k: v.to(self.device) for k, v in (prepared.detector_inputs or {}).items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.detector(**inputs)
        probs = outputs.logits[0].float().sigmoid()  # (queries, text tokens)
        phrase_probs = torch.stack([probs[:, s:e].max(dim=1).values for s, e in prepared.phrase_spans], dim=1)
        scores, phrase_ids = phrase_probs.max(dim=1)
        boxes = cxcywh_to_xyxy(outputs.pred_boxes[0].float(), prepared.width, prepared.height)
        keep = (scores >= params.box_threshold) & (scores >= params.text_threshold)
        boxes, scores, phrase_ids = boxes[keep], scores[keep], phrase_ids[keep]
        if params.nms_iou < 1.0:
            kept = batched_nms(boxes, scores, phrase_ids, params.nms_iou)
        else:
            kept = scores.argsort(descending=True)
        kept = kept[: params.max_detections]
        return RawResult(boxes[kept].cpu(), scores[kept].cpu(), phrase_ids[kept].cpu(), None, None)

    def _segment(
        self, prepared: Prepared, boxes: torch.Tensor, params: DetectParams
    ) -> tuple[torch.Tensor, torch.Tensor]:
        assert prepared.sam_pixels is not None
        multimask = isinstance(params, SegmentParams) and params.multimask
        embeddings = self.sam.get_image_embeddings(prepared.sam_pixels.to(self.device, self.dtype))
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

    def _decode(
        self, embeddings: torch.Tensor, multimask: bool, **prompts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.sam(image_embeddings=embeddings, multimask_output=multimask, **prompts)
        masks, ious = out.pred_masks[0].float(), out.iou_scores[0].float()  # (n, k, h, w), (n, k)
        best = ious.argmax(dim=1)
        rows = torch.arange(masks.shape[0], device=masks.device)
        return masks[rows, best].cpu(), ious[rows, best].cpu()

    # -- CPU: finish -----------------------------------------------------------------------

    def finish(self, raw: RawResult, params: DetectParams, prepared: Prepared) -> list[Detection]:
        phrases = params.phrases
        labels = [phrases[int(i)] for i in raw.phrase_ids] if raw.phrase_ids is not None else None
        if not isinstance(params, SegmentParams):
            return [
                Detection(label=labels[i] if labels else None, score=_score(raw.scores, i), box=_box(b))
                for i, b in enumerate(raw.boxes)
            ]
        return self._finish_masks(raw, params, prepared, labels)

    def _finish_masks(
        self, raw: RawResult, params: SegmentParams, prepared: Prepared, labels: list[str] | None
    ) -> list[Detection]:
        if raw.low_res_masks is None or raw.mask_scores is None:
            return []
        results: list[Detection] = []
        for i, low_res in enumerate(raw.low_res_masks):
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


def free_device_memory() -> None:
    import gc

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _box(box: torch.Tensor) -> list[float]:
    return [round(float(v), 2) for v in box]


def _score(scores: torch.Tensor | None, i: int) -> float | None:
    return None if scores is None else round(float(scores[i]), 4)
