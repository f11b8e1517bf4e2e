"""CVAT auto-annotation functions that ask a tunnelvision server (cvat-sdk's function interface).

Detection (the default): every frame of a task gets the prompt's objects as rectangles, masks or
polygons, under labels named after the prompt's phrases:

    export TUNNELVISION_URL=https://api.example.com TUNNELVISION_API_KEY=tv_...
    cvat-cli --server-host https://cvat.example.com --auth me task auto-annotate 42 \\
        --function-module tunnelvision.integrations.cvat \\
        -p prompt=str:"forklift . person" -p shape=str:mask [--conf-threshold 0.4] [--conv-mask-to-poly]

Interactive (`-p mode=str:interactive`, for `cvat-cli function create-native` and `run-agent`):
points or a box drawn in CVAT's UI become one mask.

Parameters (`-p NAME=TYPE:VALUE`): prompt, shape (rectangle | mask | polygon), model (a pipeline
name), box_threshold, text_threshold, max_detections, url, timeout, mode. The key comes from
TUNNELVISION_API_KEY (a `key` parameter works too, but shows in the process list and the shell's
history). Only the light client is used, so `pip install 'tunnelvision[cvat]'` needs no torch.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import cvat_sdk.auto_annotation as cvataa
import cvat_sdk.masks
import PIL.Image
from cvat_sdk import models

from tunnelvision.client import APIError, AuthenticationError, Client, TransportError
from tunnelvision.masks import BoolMask, decode_rle, encode_polygons
from tunnelvision.schemas import RLE, Detection, Segmentation, normalize_prompt

Shape = Literal["rectangle", "mask", "polygon"]
SHAPES: tuple[Shape, ...] = ("rectangle", "mask", "polygon")
MODES = ("detect", "interactive")
CONFIDENCE = int(cvataa.InteractionResultAttributes.CONFIDENCE)


class TunnelvisionCVATError(RuntimeError):
    """A parameter or a server answer that stops the function, said in words cvat-cli prints."""


def create(
    prompt: str = "",
    shape: str = "mask",
    model: str | None = None,
    box_threshold: float | None = None,
    text_threshold: float | None = None,
    max_detections: int | None = None,
    url: str | None = None,
    key: str | None = None,
    timeout: float = 120.0,
    mode: str = "detect",
) -> DetectionFunction | InteractionFunction:
    """What cvat-cli calls with the `-p` parameters. Asks the server for its pipelines first, so a
    wrong key, URL or model fails here, before CVAT sends the task's frames."""
    if mode not in MODES:
        raise TunnelvisionCVATError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
    client = Client(url, key, timeout=timeout)
    if mode == "interactive":
        check_server(client, model, {"points", "boxes", "masks"})
        return InteractionFunction(client, model)
    options = detection_options(prompt, shape, box_threshold, text_threshold, max_detections)
    check_server(client, model, {"text"} if options.shape == "rectangle" else {"text", "masks"})
    return DetectionFunction(client, model, options)


@dataclass(frozen=True)
class Options:
    """The detection parameters, checked once."""

    phrases: list[str]
    shape: Shape
    box_threshold: float | None
    request: dict[str, Any]  # the other options, sent with every frame as given


def detection_options(
    prompt: str,
    shape: str,
    box_threshold: float | None,
    text_threshold: float | None,
    max_detections: int | None,
) -> Options:
    try:
        phrases = normalize_prompt(prompt)
    except ValueError as exc:
        raise TunnelvisionCVATError(f"prompt: {exc}") from None
    if not phrases:
        raise TunnelvisionCVATError(
            "no prompt: pass the labels to find, e.g. -p prompt=str:'forklift . person'"
        )
    if shape not in SHAPES:
        raise TunnelvisionCVATError(f"shape must be one of {', '.join(SHAPES)}, not {shape!r}")
    request = {"text_threshold": text_threshold, "max_detections": max_detections}
    given = {k: v for k, v in request.items() if v is not None}
    return Options(phrases, shape, box_threshold, given)


def check_server(client: Client, model: str | None, needs: set[str]) -> None:
    """An error naming what is wrong with the key, the URL or the model, if anything is."""
    try:
        served = client.models()
    except AuthenticationError as exc:
        raise TunnelvisionCVATError(
            f"{client.url} refused the API key ({exc.status} {exc.message}): set TUNNELVISION_API_KEY "
            "to a key of that server"
        ) from None
    except TransportError as exc:  # no answer: its message names the URL and what to check
        raise TunnelvisionCVATError(str(exc)) from None
    except APIError as exc:
        raise TunnelvisionCVATError(f"{client.url} answered {exc}") from None
    pipelines = {p.name: p for p in served.pipelines}
    chosen = pipelines.get(model) if model else served.pipelines[0] if served.pipelines else None
    if chosen is None:
        raise TunnelvisionCVATError(f"{client.url} serves no model {model!r}; it has {', '.join(pipelines)}")
    lacking = needs - set(chosen.abilities)
    if lacking:
        raise TunnelvisionCVATError(
            f"model {chosen.name!r} cannot take or make {', '.join(sorted(lacking))} "
            f"(it has {', '.join(chosen.abilities)}): choose another with -p model=str:NAME"
        )


class DetectionFunction:
    """cvat-sdk's DetectionFunction: one server call per frame, shapes under the spec's labels."""

    def __init__(self, client: Client, model: str | None, options: Options) -> None:
        self.client, self.model, self.options = client, model, options
        self.label_ids = {phrase.casefold(): i for i, phrase in enumerate(options.phrases)}
        self.spec = cvataa.DetectionFunctionSpec(
            labels=[cvataa.label_spec(p, i, type=options.shape) for i, p in enumerate(options.phrases)]
        )

    def detect(
        self, context: cvataa.DetectionFunctionContext, image: PIL.Image.Image
    ) -> list[models.LabeledShapeRequest]:
        # CVAT's --conf-threshold is this run's threshold; the box_threshold parameter the default.
        threshold = (
            context.conf_threshold if context.conf_threshold is not None else self.options.box_threshold
        )
        request = dict(self.options.request, box_threshold=threshold)
        shape = self.options.shape
        if shape == "mask" and context.conv_mask_to_poly:
            shape = "polygon"  # CVAT then expects polygons under the mask labels
        width, height = image.size
        found = self.ask(image, shape, {k: v for k, v in request.items() if v is not None})
        shapes = []
        for detection in found:
            label_id = self.label_ids.get((detection.label or "").casefold())
            if label_id is None or not _confident(detection, context.conf_threshold):
                continue  # a label the prompt did not name (none for a text prompt) has no CVAT label
            shapes.extend(to_shapes(detection, label_id, shape, width, height))
        return shapes

    def ask(self, image: PIL.Image.Image, shape: Shape, request: dict[str, Any]) -> Sequence[Detection]:
        png = png_bytes(image)
        prompt = self.options.phrases
        if shape == "rectangle":  # boxes only: the detector alone, no segmenter pass
            return self.client.detect(png, prompt, self.model, **request).detections
        return self.client.segment(png, prompt, self.model, mask_format="rle", **request).detections


def _confident(detection: Detection, threshold: float | None) -> bool:
    """cvat-sdk's rule: with a threshold, only objects at least that confident."""
    return threshold is None or (detection.score is not None and detection.score >= threshold)


def to_shapes(
    detection: Detection, label_id: int, shape: Shape, width: int, height: int
) -> list[models.LabeledShapeRequest]:
    """One detection as CVAT shapes: a rectangle inside the image, a mask, or one polygon per part
    of the mask (CVAT's polygons are single outlines)."""
    if shape == "rectangle":
        return [cvataa.rectangle(label_id, clip_box(detection.box, width, height))]
    bitmap = detection_bitmap(detection)
    if bitmap is None or not bitmap.any():
        return []
    if shape == "mask":
        return [cvataa.mask(label_id, cvat_sdk.masks.encode_mask(bitmap))]
    return [cvataa.polygon(label_id, outline) for outline in encode_polygons(bitmap)]


def detection_bitmap(detection: Detection) -> BoolMask | None:
    mask = detection.mask if isinstance(detection, Segmentation) else None
    return decode_rle(mask) if isinstance(mask, RLE) else None


def clip_box(box: Sequence[float], width: int, height: int) -> list[float]:
    """[x1, y1, x2, y2] within the frame: CVAT stores what it is given."""
    limits = (width, height, width, height)
    return [min(max(float(v), 0.0), float(limit)) for v, limit in zip(box, limits, strict=True)]


def png_bytes(image: PIL.Image.Image) -> bytes:
    """The frame as PNG: lossless, so the server sees CVAT's pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


@dataclass(frozen=True)
class PreparedImage:
    """An interaction's image, encoded once: CVAT's agent reuses it for every click on it."""

    png: bytes
    width: int
    height: int


class InteractionFunction:
    """cvat-sdk's InteractionFunction: positive/negative points, or a box, become one mask.

    Our segment call takes points or a box, not both at once, so a prompt with both is refused."""

    spec = cvataa.InteractionFunctionSpec(min_pos_points=0, min_neg_points=0, min_bounding_boxes=0)

    def __init__(self, client: Client, model: str | None) -> None:
        self.client, self.model = client, model

    def preprocess_image(
        self, context: cvataa.InteractionFunctionContext, image: PIL.Image.Image
    ) -> PreparedImage:
        return PreparedImage(png_bytes(image), *image.size)

    def detect(
        self,
        context: cvataa.InteractionFunctionContext,
        pp_image: PreparedImage | PIL.Image.Image,
        prompts: cvataa.InteractionPrompts,
    ) -> list[cvataa.InteractionResultShape]:
        prepared = (
            pp_image if isinstance(pp_image, PreparedImage) else self.preprocess_image(context, pp_image)
        )
        found = self.client.segment(
            prepared.png, model=self.model, mask_format="rle", **interaction_request(prompts)
        ).detections
        results = []
        for detection in found:
            bitmap = detection_bitmap(detection)
            if bitmap is None or not bitmap.any():
                continue
            # SAM's predicted IoU can stray a little outside 0-1; CVAT wants a number within it
            score = min(max(detection.mask_score, 0.0), 1.0)
            confidence = models.AttributeValRequest(spec_id=CONFIDENCE, value=f"{score:.4f}")
            results.append(
                cvataa.InteractionResultShape(
                    type="mask", points=cvat_sdk.masks.encode_mask(bitmap), attributes=[confidence]
                )
            )
        return results


def interaction_request(prompts: cvataa.InteractionPrompts) -> dict[str, Any]:
    """CVAT's prompts as our segment options: `boxes` or `points` ([x, y, 1|0])."""
    points = [[x, y, 1] for x, y in prompts.pos_points] + [[x, y, 0] for x, y in prompts.neg_points]
    box = prompts.bounding_box
    if box is not None and points:
        raise TunnelvisionCVATError("give points or a box, not both: the server takes one kind at a time")
    if box is not None:
        (x1, y1), (x2, y2) = box
        return {"boxes": [[x1, y1, x2, y2]]}
    if not prompts.pos_points:
        raise TunnelvisionCVATError(
            "nothing to segment: click at least one point on the object, or draw a box"
        )
    return {"points": points, "multimask": len(points) == 1}  # one click is ambiguous: SAM's best of 3


__all__ = ["DetectionFunction", "InteractionFunction", "TunnelvisionCVATError", "create"]
