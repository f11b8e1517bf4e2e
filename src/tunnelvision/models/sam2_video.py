"""SAM 2 / 2.1 and SAM 3 trackers: follow objects given by boxes, points or masks through video.

One session is one transformers inference session in its streaming mode: no clip is ever given,
each pushed frame is preprocessed alone and tracked from the session's memory. transformers keeps
every frame's pixels and outputs for the session's lifetime (it was written for clips held whole),
so after each frame the session drops what the model will not read again; see `prune_tracker_state`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import Sam2VideoModel, Sam2VideoProcessor, Sam3TrackerVideoModel, Sam3TrackerVideoProcessor

from tunnelvision.errors import InvalidInput, UnsupportedPrompt
from tunnelvision.models.base import Family
from tunnelvision.models.loading import LoadOptions, ModelSource, load_model, load_pretrained, to_device
from tunnelvision.models.roles import Role
from tunnelvision.models.sam2 import require_torchvision
from tunnelvision.models.video_tracking import (
    VIDEO_TRACKER,
    ObjectPrompt,
    TrackedFrame,
    VideoAbility,
    boxes_of,
    empty_frame,
    nested_tensor_bytes,
)

# What a stored frame output must keep for later frames: its memory (for the memory window) and
# its object pointer (for the longer pointer window). Masks are read only on their own frame.
MEMORY_KEYS = ("maskmem_features", "maskmem_pos_enc")
POINTER_KEYS = ("object_pointer", "object_score_logits")
# Conditioning (prompted) frames kept per object where the model itself sets no limit (SAM 2: -1).
DEFAULT_MAX_CONDITIONING_FRAMES = 4


class FrameWindow(dict[int, torch.Tensor]):
    """The session's `processed_frames`, holding only frames not yet tracked while `len` still
    counts every frame pushed: the trackers read the length as the clip's length when they look
    back for object pointers."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0

    def __setitem__(self, frame_idx: int, pixels: torch.Tensor) -> None:
        super().__setitem__(frame_idx, pixels)
        self.seen = max(self.seen, frame_idx + 1)

    def __len__(self) -> int:
        return self.seen


def tracker_windows(config: Any) -> tuple[int, int, int]:
    """(memory frames, pointer frames, conditioning frames) a tracker reads behind the current frame."""
    memory = max(int(config.num_maskmem) - 1, 0)
    pointers = max(int(config.max_object_pointers_in_encoder) - 1, 0)
    conditioning = int(config.max_cond_frame_num)
    return memory, pointers, conditioning if conditioning > 0 else DEFAULT_MAX_CONDITIONING_FRAMES


def prune_tracker_state(session: Any, frame_idx: int, config: Any) -> None:
    """After `frame_idx`, drop what no later frame reads: outputs older than the pointer window,
    memory features older than the memory window, masks of past frames, all but the newest
    conditioning frames, consumed prompts, pixels and cached vision features.

    Frames are pushed with increasing indices, so "later" is always "higher"."""
    memory, pointers, conditioning = tracker_windows(config)
    next_frame = frame_idx + 1
    for outputs in session.output_dict_per_obj.values():
        tracked = outputs["non_cond_frame_outputs"]
        for old in [t for t in tracked if t < next_frame - pointers]:
            del tracked[old]
        prompted = outputs["cond_frame_outputs"]
        for old in sorted(prompted)[:-conditioning]:
            del prompted[old]
        for t, out in [*tracked.items(), *prompted.items()]:
            keep = (
                (*MEMORY_KEYS, *POINTER_KEYS) if t >= next_frame - memory or t in prompted else POINTER_KEYS
            )
            for key in [k for k in out if k not in keep]:
                del out[key]
    for per_frame in (
        session.frames_tracked_per_obj,
        session.point_inputs_per_obj,
        session.mask_inputs_per_obj,
    ):
        for frames in per_frame.values():
            for old in [t for t in frames if t <= frame_idx]:
                del frames[old]
    session.processed_frames.clear()
    session.cache.clear_all()


def start_streaming(processor: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """A streaming inference session whose state stays on the model's device: it is bounded (see
    `prune_tracker_state`), so moving it to the CPU would only add copies per frame."""
    session = processor.init_video_session(inference_device=device, dtype=dtype)
    session.processed_frames = FrameWindow()
    return session


def check_frame(frame: np.ndarray, height: int, width: int) -> None:
    if frame.shape != (height, width, 3) or frame.dtype != np.uint8:
        raise InvalidInput(
            f"video frame of shape {frame.shape} ({frame.dtype}); "
            f"this session takes ({height}, {width}, 3) uint8"
        )


def frame_pixels(processor: Any, frame: np.ndarray) -> torch.Tensor:
    """(3, side, side) pixels of one frame, by the stock image processor, on the CPU."""
    pixels: torch.Tensor = processor(images=frame, return_tensors="pt", input_data_format="channels_last")[
        "pixel_values"
    ]
    return pixels[0]


def device_pixels(tracker: Any, frame: np.ndarray, pixels: torch.Tensor | None) -> torch.Tensor:
    """The frame's pixels on the tracker's device: as prepared on the CPU, or prepared now."""
    prepared = frame_pixels(tracker.processor, frame) if pixels is None else pixels
    return prepared.to(tracker.device, tracker.dtype)


class PromptTrackingSession:
    """One streaming session of a box/point/mask tracker (SAM 2 video, SAM 3 tracker)."""

    def __init__(self, tracker: PromptTracker, height: int, width: int) -> None:
        self.tracker, self.height, self.width = tracker, height, width
        self.session: Any = start_streaming(tracker.processor, tracker.device, tracker.dtype)
        self.frame_idx = 0  # the next frame's index in this session

    def push(
        self, frame: np.ndarray, prompts: Sequence[ObjectPrompt] = (), pixels: torch.Tensor | None = None
    ) -> TrackedFrame:
        check_frame(frame, self.height, self.width)
        for prompt in prompts:
            check_prompt(prompt, self.height, self.width)
        tracker, session = self.tracker, self.session
        pixels = device_pixels(tracker, frame, pixels)
        with torch.inference_mode():
            for prompt in prompts:
                self._add(prompt)
            # Each add replaces the session's list of objects with new inputs (so two adds then
            # one forward would lose the first): name them all, then track once.
            session.obj_with_new_inputs = list(dict.fromkeys(p.object_id for p in prompts))
            if session.get_obj_num() == 0:
                result = empty_frame(self.height, self.width)
            else:
                out = tracker.model(inference_session=session, frame_idx=self.frame_idx, frame=pixels)
                result = self._tracked(out)
            prune_tracker_state(session, self.frame_idx, tracker.model.config)
        self.frame_idx += 1
        return result

    def _add(self, prompt: ObjectPrompt) -> None:
        inputs: dict[str, Any]
        if prompt.mask is not None:
            inputs = {"input_masks": [prompt.mask]}
        else:
            inputs = {}
            if prompt.box is not None:
                inputs["input_boxes"] = [[list(prompt.box)]]
            if prompt.points:
                inputs["input_points"] = [[[list(point) for point in prompt.points]]]
                inputs["input_labels"] = [[list(prompt.point_labels or (1,) * len(prompt.points))]]
        self.tracker.processor.add_inputs_to_inference_session(
            self.session,
            frame_idx=self.frame_idx,
            obj_ids=[prompt.object_id],
            original_size=(self.height, self.width),
            **inputs,
        )

    def _tracked(self, out: Any) -> TrackedFrame:
        """Masks at the frame's size (upscaled where they were made), the object score as the
        score; an object whose mask is empty (the model says it is not there) is absent."""
        size = [[self.height, self.width]]
        masks = self.tracker.processor.post_process_masks([out.pred_masks], original_sizes=size)[0][:, 0]
        masks_np = masks.cpu().numpy()
        scores = torch.sigmoid(out.object_score_logits.float()).flatten().cpu().tolist()
        present = [i for i, mask in enumerate(masks_np) if mask.any()]
        kept = masks_np[present]
        return TrackedFrame(
            object_ids=[int(out.object_ids[i]) for i in present],
            scores=[float(scores[i]) for i in present],
            masks=kept,
            boxes=boxes_of(kept),
        )

    def state_bytes(self) -> int:
        """Bytes of every tensor the session holds (what `prune_tracker_state` keeps bounded)."""
        s = self.session
        parts = (s.output_dict_per_obj, s.processed_frames, s.cache._vision_features)
        return sum(nested_tensor_bytes(p) for p in (*parts, s.point_inputs_per_obj, s.mask_inputs_per_obj))

    def stored_outputs(self) -> int:
        """Frame outputs held, all objects together."""
        return sum(
            len(frames)
            for per_obj in self.session.output_dict_per_obj.values()
            for frames in per_obj.values()
        )

    def close(self) -> None:
        self.session = None


def check_prompt(prompt: ObjectPrompt, height: int, width: int) -> None:
    """The tracker takes a mask alone, or a box and/or points."""
    name = f"object {prompt.object_id}"
    if prompt.mask is not None:
        if prompt.box is not None or prompt.points:
            raise UnsupportedPrompt(f"{name}: a mask cannot be combined with a box or points")
        if prompt.mask.shape != (height, width):
            raise InvalidInput(
                f"{name}: mask of shape {prompt.mask.shape}; the frames are ({height}, {width})"
            )
        return
    if prompt.box is None and not prompt.points:
        raise UnsupportedPrompt(f"{name}: a prompt needs a box, points or a mask")
    if prompt.point_labels and len(prompt.point_labels) != len(prompt.points):
        raise InvalidInput(f"{name}: {len(prompt.points)} points but {len(prompt.point_labels)} labels")


class PromptTracker(Family):
    """A checkpoint that follows objects given by boxes, points or masks (ids are the caller's)."""

    role: ClassVar[Role] = VIDEO_TRACKER
    family: ClassVar[str]
    video_abilities: ClassVar[frozenset[VideoAbility]] = frozenset({"video-boxes", "video-points"})
    model_class: ClassVar[Any]
    processor_class: ClassVar[Any]

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype, options: LoadOptions
    ) -> None:
        super().__init__(source, device, dtype)
        require_torchvision(self.family, source.source)
        self.processor = load_pretrained(self.processor_class.from_pretrained, source, "pipeline")
        model = load_model(self.model_class.from_pretrained, source, "pipeline", options.attention)
        self.model = to_device(model, device, dtype)

    def prepare(self, frame: np.ndarray) -> torch.Tensor:
        return frame_pixels(self.processor, frame)

    def start(self, height: int, width: int, phrases: Sequence[str] = ()) -> PromptTrackingSession:
        if phrases:
            raise UnsupportedPrompt(
                f"{self.family} follows boxes, points and masks, not text; "
                "use a sam3-video checkpoint for text"
            )
        return PromptTrackingSession(self, height, width)


class Sam2Video(PromptTracker):
    family: ClassVar[str] = "sam2-video"
    model_class: ClassVar[Any] = Sam2VideoModel
    processor_class: ClassVar[Any] = Sam2VideoProcessor


class Sam3TrackerVideo(PromptTracker):
    family: ClassVar[str] = "sam3-tracker-video"
    model_class: ClassVar[Any] = Sam3TrackerVideoModel
    processor_class: ClassVar[Any] = Sam3TrackerVideoProcessor
