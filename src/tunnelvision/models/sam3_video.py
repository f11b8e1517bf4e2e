"""SAM 3 video: find every instance of the given phrases on each frame and follow them.

The model detects on every frame and matches detections to the objects it already follows, so it
picks the object ids (unique within a session) and knows which phrase found each object. Sessions
stream like the box/point trackers' (see sam2_video); besides the tracker's memory, SAM 3 video
keeps per-frame bookkeeping (scores, unmatched frames, suppressed ids) and, in streaming mode,
never drops an object; both are bounded here after each frame.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import torch
from transformers import Sam3VideoModel
from transformers.models.sam3_video.processing_sam3_video import Sam3VideoProcessor

from tunnelvision.errors import UnsupportedPrompt
from tunnelvision.models.base import Family
from tunnelvision.models.loading import LoadOptions, ModelSource, load_model, load_pretrained, to_device
from tunnelvision.models.roles import Role
from tunnelvision.models.sam2 import require_torchvision
from tunnelvision.models.sam2_video import (
    check_frame,
    device_pixels,
    frame_pixels,
    prune_tracker_state,
    start_streaming,
)
from tunnelvision.models.video_tracking import (
    VIDEO_TRACKER,
    ObjectPrompt,
    TrackedFrame,
    VideoAbility,
    boxes_of,
    nested_tensor_bytes,
)


class TextTrackingSession:
    """One streaming SAM 3 video session over fixed phrases."""

    def __init__(self, tracker: Sam3Video, height: int, width: int, phrases: Sequence[str]) -> None:
        self.tracker, self.height, self.width = tracker, height, width
        self.session: Any = start_streaming(tracker.processor, tracker.device, tracker.dtype)
        texts = [phrase.lower() for phrase in phrases]  # as the image family sends them
        tracker.processor.add_text_prompt(self.session, texts)
        # The session keeps one prompt per distinct text: a repeated phrase answers as its first.
        self.phrase_of_prompt = {self.session.add_prompt(text): texts.index(text) for text in texts}
        self.frame_idx = 0
        self.last_seen: dict[int, int] = {}  # object id -> the last frame it had a mask on
        # An object unseen this many frames is dropped (the model's longest keep-alive).
        self.forget_after = int(tracker.model.config.max_trk_keep_alive)

    def push(
        self, frame: np.ndarray, prompts: Sequence[ObjectPrompt] = (), pixels: torch.Tensor | None = None
    ) -> TrackedFrame:
        if prompts:
            raise UnsupportedPrompt(
                "sam3-video finds its objects from the phrases alone and takes no boxes, points or "
                "masks; use a sam3-tracker-video or sam2-video checkpoint to follow given objects"
            )
        check_frame(frame, self.height, self.width)
        tracker, session = self.tracker, self.session
        pixels = device_pixels(tracker, frame, pixels)
        with torch.inference_mode():
            out = tracker.model(inference_session=session, frame_idx=self.frame_idx, frame=pixels)
            found = tracker.processor.postprocess_outputs(
                session, out, original_sizes=[[self.height, self.width]]
            )
            result = self._tracked(found)
            self._prune()
        self.frame_idx += 1
        return result

    def _tracked(self, found: dict[str, Any]) -> TrackedFrame:
        """Masks as the processor gives them, less the objects left without a pixel (its overlap
        rule can empty a mask); boxes from those masks (the processor's own are computed before
        that rule, and with inclusive ends); the score is the detector's probability for the
        object when it was found."""
        masks = found["masks"].cpu().numpy().astype(bool)
        present = [i for i, mask in enumerate(masks) if mask.any()]
        object_ids = [int(found["object_ids"][i]) for i in present]
        for object_id in object_ids:
            self.last_seen[object_id] = self.frame_idx
        scores = found["scores"].float().tolist()
        prompt_of = self.session.obj_id_to_prompt_id
        return TrackedFrame(
            object_ids=object_ids,
            scores=[float(scores[i]) for i in present],
            masks=masks[present],
            boxes=boxes_of(masks[present]),
            phrase_ids=[self.phrase_of_prompt[prompt_of[i]] for i in object_ids],
        )

    def _prune(self) -> None:
        session, frame_idx = self.session, self.frame_idx
        self._forget_lost_objects()
        prune_tracker_state(session, frame_idx, self.tracker.model.tracker_model.config)
        # Per-frame bookkeeping is read for the current frame only...
        session.obj_id_to_tracker_score_frame_wise = keep_keys(
            session.obj_id_to_tracker_score_frame_wise, frame_idx
        )
        session.suppressed_obj_ids = keep_keys(session.suppressed_obj_ids, frame_idx)
        # ...and frame lists only for their length, which streaming never compares past the hotstart delay.
        delay = max(int(self.tracker.model.config.hotstart_delay), 1)
        for lists in (session.unmatched_frame_inds, session.overlap_pair_to_frame_inds):
            for key in lists:
                del lists[key][:-delay]

    def _forget_lost_objects(self) -> None:
        """Streaming SAM 3 video never removes an object; drop those unseen for `forget_after`
        frames so the state does not grow with every object that ever passed by."""
        session = self.session
        for object_id in list(session.obj_ids):
            first = session.obj_first_frame_idx.get(object_id, self.frame_idx)
            if self.frame_idx - self.last_seen.get(object_id, first) <= self.forget_after:
                continue
            session.remove_object(object_id)
            self.last_seen.pop(object_id, None)
            for per_object in (
                session.obj_id_to_score,
                session.obj_id_to_last_occluded,
                session.trk_keep_alive,
                session.obj_first_frame_idx,
                session.unmatched_frame_inds,
            ):
                per_object.pop(object_id, None)
            for pair in [p for p in session.overlap_pair_to_frame_inds if object_id in p]:
                del session.overlap_pair_to_frame_inds[pair]

    def state_bytes(self) -> int:
        s = self.session
        parts = (s.output_dict_per_obj, s.processed_frames, s.cache._vision_features, s.mask_inputs_per_obj)
        return sum(nested_tensor_bytes(p) for p in parts)

    def stored_outputs(self) -> int:
        return sum(
            len(frames)
            for per_obj in self.session.output_dict_per_obj.values()
            for frames in per_obj.values()
        )

    def bookkeeping_entries(self) -> int:
        """Entries of SAM 3 video's per-frame bookkeeping (bounded like the tensors)."""
        s = self.session
        lists = (*s.unmatched_frame_inds.values(), *s.overlap_pair_to_frame_inds.values())
        return len(s.obj_id_to_tracker_score_frame_wise) + len(s.suppressed_obj_ids) + sum(map(len, lists))

    def close(self) -> None:
        self.session = None


def keep_keys(per_frame: Any, frame_idx: int) -> Any:
    """`per_frame` (a dict or defaultdict by frame) with only `frame_idx`'s entry left."""
    for old in [t for t in per_frame if t != frame_idx]:
        del per_frame[old]
    return per_frame


class Sam3Video(Family):
    role: ClassVar[Role] = VIDEO_TRACKER
    family: ClassVar[str] = "sam3-video"
    video_abilities: ClassVar[frozenset[VideoAbility]] = frozenset({"video-text"})

    def __init__(
        self, source: ModelSource, device: torch.device, dtype: torch.dtype, options: LoadOptions
    ) -> None:
        super().__init__(source, device, dtype)
        require_torchvision(self.family, source.source)
        self.processor = load_pretrained(Sam3VideoProcessor.from_pretrained, source, "pipeline")
        model = load_model(Sam3VideoModel.from_pretrained, source, "pipeline", options.attention)
        self.model = to_device(model, device, dtype)

    def prepare(self, frame: np.ndarray) -> torch.Tensor:
        return frame_pixels(self.processor, frame)

    def start(self, height: int, width: int, phrases: Sequence[str] = ()) -> TextTrackingSession:
        if not [p for p in phrases if p.strip()]:
            raise UnsupportedPrompt("sam3-video finds objects by text: give at least one phrase")
        return TextTrackingSession(self, height, width, phrases)
