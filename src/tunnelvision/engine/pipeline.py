"""Pipelines: named compositions of model roles, and the per-device backend that routes to them.

A `ComposedPipeline` is a detector + segmenter (Grounded-SAM style), a segmenter alone (boxes and
points) or a detector alone (boxes from text, and exemplars where the detector takes them). A
`ConceptPipeline` is one concept segmenter (text and exemplars -> instances with masks).
`DeviceBackend` is what the scheduler runs: every pipeline of one device, chosen by the request's `model`.
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import torch

from tunnelvision.boxes import batched_nms
from tunnelvision.engine import results
from tunnelvision.engine.backend import Ability, BackendInfo, Check, ModelPart, PipelineSummary, no_deadline
from tunnelvision.errors import DeviceOutOfMemory, InvalidInput
from tunnelvision.imaging import RGBImage
from tunnelvision.models.loading import free_device_memory
from tunnelvision.models.roles import (
    Boxes,
    ConceptSegmenter,
    Detector,
    Exemplar,
    ExemplarDetector,
    Instances,
    Masks,
    Segmenter,
    SegmentPrompt,
)
from tunnelvision.schemas import Detection, DetectParams, SegmentParams


class Cached(Protocol):
    def cache_stats(self) -> dict[str, int]: ...

    def clear_cache(self) -> None: ...


class Pipeline(Protocol):
    """The Backend steps for one pipeline; `summary` says what it is and can do."""

    summary: PipelineSummary

    def prepare(self, image: RGBImage, params: DetectParams, image_id: str, check: Check) -> Any: ...

    def batch_key(self, prepared: Any, params: DetectParams) -> Hashable | None: ...

    def run_batch(self, items: list[tuple[Any, DetectParams]]) -> list[Any]: ...

    def finish(self, raw: Any, params: DetectParams, prepared: Any, check: Check) -> list[Detection]: ...

    def caches(self) -> list[Cached]: ...

    def device_steps(self, prepared: Any) -> dict[str, float]:
        """Timings of device steps that ran for this item only (`encode`: the image encoder)."""
        ...


def encoder_steps(inputs: Any) -> dict[str, float]:
    """{"encode": ms} when the segmenter encoded this image; {} when its embedding was cached."""
    encode_ms = getattr(inputs, "encode_ms", None)
    return {} if encode_ms is None else {"encode": encode_ms}


@dataclass
class Prepared:
    detector: Any | None  # the detector's inputs (text prompts)
    segmenter: Any | None  # the segmenter's inputs (masks wanted)
    prompt: SegmentPrompt  # box or point prompts, if any


class ComposedPipeline:
    def __init__(
        self,
        name: str,
        detector: Detector | None,
        segmenter: Segmenter | None,
        models: tuple[ModelPart, ...],
    ) -> None:
        self.detector, self.segmenter = detector, segmenter
        abilities: set[Ability] = set()
        if detector is not None:
            abilities.add("text")
            if getattr(detector, "takes_exemplars", False):
                abilities.add("exemplars")
        if segmenter is not None:
            abilities |= {"boxes", "points", "masks"}
        self.summary = PipelineSummary(name, frozenset(abilities), models)

    # -- CPU: prepare ----------------------------------------------------------------------

    def prepare(
        self, image: RGBImage, params: DetectParams, image_id: str = "", check: Check = no_deadline
    ) -> Prepared:
        self.summary.check(params)
        exemplars = exemplars_inside(image, params)
        detector_inputs = segmenter_inputs = None
        if exemplars and self.detector is not None:  # the summary's check: it takes them
            detector = cast(ExemplarDetector, self.detector)
            detector_inputs = detector.prepare_with_exemplars(image, params.phrases, exemplars, check)
        elif params.phrases and self.detector is not None:
            detector_inputs = self.detector.prepare(image, params.phrases, check)
        if isinstance(params, SegmentParams) and self.segmenter is not None:
            check()  # each processor resizes and normalises the whole image
            segmenter_inputs = self.segmenter.prepare(image, image_id, check)
        return Prepared(detector_inputs, segmenter_inputs, segment_prompt(params))

    def batch_key(self, prepared: Prepared, params: DetectParams) -> Hashable | None:
        """Text prompts batch by the detector's key, box/point prompts by the segmenter's."""
        if prepared.detector is not None and self.detector is not None:
            return ("detect", self.detector.batch_key(prepared.detector))
        if prepared.segmenter is not None and self.segmenter is not None:
            return ("segment", self.segmenter.batch_key(prepared.segmenter))
        return None

    # -- device: run -----------------------------------------------------------------------

    def run_batch(self, items: list[tuple[Prepared, DetectParams]]) -> list[Any]:
        found = [
            Instances(p.prompt.boxes if p.prompt.boxes is not None else torch.empty(0, 4)) for p, _ in items
        ]
        detecting = [i for i, (p, _) in enumerate(items) if p.detector is not None]
        if detecting and self.detector is not None:
            candidates = self.detector.detect_batch([items[i][0].detector for i in detecting])
            for i, boxes in zip(detecting, candidates, strict=True):
                found[i] = select_detections(boxes, items[i][1])
        # Nothing detected, or detect only: the segmenter is not called for that item.
        segmenting = [
            i
            for i, (p, _) in enumerate(items)
            if p.segmenter is not None and (found[i].boxes.numel() > 0 or p.prompt.points is not None)
        ]
        if segmenting and self.segmenter is not None:
            prompts = [(items[i][0].segmenter, self._prompt(items[i][0], found[i])) for i in segmenting]
            for i, masks in zip(segmenting, self.segmenter.segment_batch(prompts), strict=True):
                found[i].masks = masks
        return found

    @staticmethod
    def _prompt(prepared: Prepared, found: Instances) -> SegmentPrompt:
        if prepared.prompt.points is not None:
            return prepared.prompt
        return SegmentPrompt(boxes=found.boxes, multimask=prepared.prompt.multimask)

    # -- CPU: finish -----------------------------------------------------------------------

    def finish(
        self, raw: Instances, params: DetectParams, prepared: Prepared, check: Check = no_deadline
    ) -> list[Detection]:
        if not isinstance(params, SegmentParams):
            return results.detections(raw, params.phrases)
        segmenter, masks = self.segmenter, raw.masks
        if segmenter is None or masks is None:
            return []
        return list(
            results.segmentations(
                raw,
                params.phrases,
                params.mask_format,
                lambda i: segmenter.upscale(masks.low_res[i], prepared.segmenter),
                boxes_from_masks=prepared.prompt.points is not None,
                check=check,
            )
        )

    def caches(self) -> list[Cached]:
        return [self.segmenter] if self.segmenter is not None else []

    def device_steps(self, prepared: Prepared) -> dict[str, float]:
        return encoder_steps(prepared.segmenter)


def segment_prompt(params: DetectParams) -> SegmentPrompt:
    if not isinstance(params, SegmentParams):
        return SegmentPrompt()
    prompt = SegmentPrompt(multimask=params.multimask)
    if params.boxes:
        prompt.boxes = torch.tensor(params.boxes, dtype=torch.float32)
    if params.points:
        points = torch.tensor(params.points, dtype=torch.float32)
        prompt.points, prompt.point_labels = points[:, :2], points[:, 2].long()
    return prompt


def select_detections(candidates: Boxes, params: DetectParams) -> Instances:
    """Thresholds, class-aware NMS and the best `max_detections`, the same for every detector."""
    kept = selected(candidates, params)
    return Instances(
        candidates.boxes[kept].cpu(), candidates.scores[kept].cpu(), candidates.phrase_ids[kept].cpu()
    )


def selected(candidates: Boxes, params: DetectParams) -> torch.Tensor:
    """The indices of the candidates that pass the thresholds, NMS and `max_detections`, best first."""
    boxes, scores, phrase_ids = candidates.boxes, candidates.scores, candidates.phrase_ids
    passing = ((scores >= params.box_threshold) & (scores >= params.text_threshold)).nonzero()[:, 0]
    boxes, scores, phrase_ids = boxes[passing], scores[passing], phrase_ids[passing]
    if params.nms_iou < 1.0:
        kept = batched_nms(boxes, scores, phrase_ids, params.nms_iou)
    else:
        kept = scores.argsort(descending=True)
    return passing[kept[: params.max_detections]]


def exemplars_inside(image: RGBImage, params: DetectParams) -> list[Exemplar]:
    """The request's exemplars as (box, label); InvalidInput for one reaching outside the image."""
    height, width = image.shape[:2]
    exemplars = []
    for i, (x1, y1, x2, y2, label) in enumerate(params.exemplars or []):
        if x2 > width or y2 > height:
            raise InvalidInput(f"exemplar {i} reaches outside the {width}x{height} image")
        exemplars.append(([x1, y1, x2, y2], int(label)))
    return exemplars


@dataclass
class ConceptPrepared:
    inputs: Any  # the concept segmenter's
    masks: bool  # /v1/segment (masks wanted), not /v1/detect


class ConceptPipeline:
    """One concept segmenter: phrases and/or exemplar boxes -> instances with boxes and masks."""

    def __init__(self, name: str, segmenter: ConceptSegmenter, models: tuple[ModelPart, ...]) -> None:
        self.segmenter = segmenter
        abilities: set[Ability] = {"text", "exemplars", "masks"}
        self.summary = PipelineSummary(name, frozenset(abilities), models)

    def prepare(
        self, image: RGBImage, params: DetectParams, image_id: str = "", check: Check = no_deadline
    ) -> ConceptPrepared:
        self.summary.check(params)
        exemplars = exemplars_inside(image, params)
        inputs = self.segmenter.prepare(image, params.phrases, exemplars, image_id, check)
        return ConceptPrepared(inputs, isinstance(params, SegmentParams))

    def batch_key(self, prepared: ConceptPrepared, params: DetectParams) -> Hashable | None:
        return self.segmenter.batch_key(prepared.inputs)

    def run_batch(self, items: list[tuple[ConceptPrepared, DetectParams]]) -> list[Any]:
        """Every candidate from the model; then the thresholds, NMS and `max_detections` of each
        request, as for detectors, keeping the chosen instances' masks."""
        found = self.segmenter.find_batch([p.inputs for p, _ in items])
        answers = []
        for (prepared, params), candidates in zip(items, found, strict=True):
            assert candidates.scores is not None and candidates.phrase_ids is not None
            assert candidates.masks is not None
            kept = selected(Boxes(candidates.boxes, candidates.scores, candidates.phrase_ids), params)
            low_res, mask_scores = candidates.masks.low_res[kept], candidates.masks.scores[kept]
            full = None
            if prepared.masks and self.segmenter.upscale_on_device:
                full = self.segmenter.full_masks(low_res, prepared.inputs)
            masks = Masks(low_res.cpu(), mask_scores.cpu(), full) if prepared.masks else None
            answers.append(
                Instances(
                    candidates.boxes[kept].cpu(),
                    candidates.scores[kept].cpu(),
                    candidates.phrase_ids[kept].cpu(),
                    masks,
                )
            )
        return answers

    def finish(
        self, raw: Instances, params: DetectParams, prepared: ConceptPrepared, check: Check = no_deadline
    ) -> list[Detection]:
        if not isinstance(params, SegmentParams):
            return results.detections(raw, params.phrases)
        masks, segmenter = raw.masks, self.segmenter
        if masks is None:
            return []
        upscale = lambda i: segmenter.upscale(masks.low_res[i], prepared.inputs)  # noqa: E731
        return list(results.segmentations(raw, params.phrases, params.mask_format, upscale, check=check))

    def caches(self) -> list[Cached]:
        return [self.segmenter]

    def device_steps(self, prepared: ConceptPrepared) -> dict[str, float]:
        return encoder_steps(prepared.inputs)


@dataclass
class Routed:
    """A prepared item and the pipeline it belongs to."""

    pipeline: str
    prepared: Any


class DeviceBackend:
    """Every pipeline on one device (the Backend the scheduler runs); requests pick one by `model`.
    Models shared by several pipelines are the same objects (see models/factory.py)."""

    def __init__(self, pipelines: list[Pipeline], device: str, dtype: str) -> None:
        self.pipelines = {p.summary.name: p for p in pipelines}
        self.device = device
        default = pipelines[0].summary.models
        self.info = BackendInfo(
            _source(default, "detector"),
            _source(default, "segmenter"),
            device,
            dtype,
            tuple(p.summary for p in pipelines),
        )

    def pipeline(self, params: DetectParams) -> Pipeline:
        return self.pipelines[self.info.pipeline(params.model).name]

    def prepare(
        self, image: RGBImage, params: DetectParams, image_id: str = "", check: Check = no_deadline
    ) -> Routed:
        pipeline = self.pipeline(params)
        return Routed(pipeline.summary.name, pipeline.prepare(image, params, image_id, check))

    def batch_key(self, prepared: Routed, params: DetectParams) -> Hashable | None:
        key = self.pipelines[prepared.pipeline].batch_key(prepared.prepared, params)
        return None if key is None else (prepared.pipeline, key)

    @torch.inference_mode()
    def run_batch(self, items: list[tuple[Routed, DetectParams]]) -> list[Any]:
        """Batches hold one pipeline's items (the key names it); grouped anyway, to be safe."""
        try:
            raws: list[Any] = [None] * len(items)
            for name in dict.fromkeys(r.pipeline for r, _ in items):
                rows = [i for i, (r, _) in enumerate(items) if r.pipeline == name]
                answers = self.pipelines[name].run_batch([(items[i][0].prepared, items[i][1]) for i in rows])
                for i, answer in zip(rows, answers, strict=True):
                    raws[i] = answer
            return raws
        except torch.cuda.OutOfMemoryError as exc:
            self.clear_caches()
            free_device_memory()
            raise DeviceOutOfMemory("the GPU ran out of memory; retry, or send a smaller image", 5.0) from exc

    def run(self, prepared: Routed, params: DetectParams) -> Any:
        """One item alone (tests and benchmarks)."""
        (raw,) = self.run_batch([(prepared, params)])
        if isinstance(raw, BaseException):
            raise raw
        return raw

    def finish(
        self, raw: Any, params: DetectParams, prepared: Routed, check: Check = no_deadline
    ) -> list[Detection]:
        return self.pipelines[prepared.pipeline].finish(raw, params, prepared.prepared, check)

    def device_steps(self, prepared: Routed) -> dict[str, float]:
        return self.pipelines[prepared.pipeline].device_steps(prepared.prepared)

    def _caches(self) -> list[Cached]:
        """Each cache once, however many pipelines share its model."""
        unique = {id(c): c for p in self.pipelines.values() for c in p.caches()}
        return list(unique.values())

    def cache_stats(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for cache in self._caches():
            for name, value in cache.cache_stats().items():
                total[name] = total.get(name, 0) + value
        return total

    def clear_caches(self) -> None:
        for cache in self._caches():
            cache.clear_cache()

    def memory_allocated(self) -> int | None:
        if not self.device.startswith("cuda"):
            return None
        return int(torch.cuda.memory_allocated(torch.device(self.device)))


def _source(models: tuple[ModelPart, ...], role: str) -> str:
    return next((m.source for m in models if m.role == role), "")
