"""Video trackers on tiny random checkpoints: streaming sessions, ids, mask seeding, bounded state.

Frames are a white square moving over black. Random weights cannot see the square, so these tests
check what the families promise whatever the weights: ids kept from frame to frame, masks at the
frame's size, a session seeded with a mask going on, and state that stops growing.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tunnelvision.errors import InvalidInput, UnsupportedPrompt
from tunnelvision.models.loading import LoadOptions, resolve_source
from tunnelvision.models.random_families import write_random_family
from tunnelvision.models.video_tracking import ObjectPrompt, TrackedFrame

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torchvision") is None, reason="the SAM 2/3 video processors need torchvision"
)

H, W = 72, 96
Tracker = Callable[[str], Any]  # family -> the loaded tiny model
SQUARE = 20


def frame_at(index: int) -> np.ndarray:
    """A white square moving right (and wrapping) on black."""
    frame = np.zeros((H, W, 3), dtype=np.uint8)
    x = 4 + (index * 3) % (W - SQUARE - 8)
    frame[26 : 26 + SQUARE, x : x + SQUARE] = 255
    return frame


def square_box(index: int) -> tuple[float, float, float, float]:
    x = 4 + (index * 3) % (W - SQUARE - 8)
    return (float(x), 26.0, float(x + SQUARE), 26.0 + SQUARE)


@pytest.fixture(scope="session")
def tracker(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Any]:
    """Each family written once into a temporary folder and loaded by its class, as the factory does."""
    from tunnelvision.models.sam2_video import Sam2Video, Sam3TrackerVideo
    from tunnelvision.models.sam3_video import Sam3Video

    classes: dict[str, Any] = {
        "sam2-video": Sam2Video,
        "sam3-tracker-video": Sam3TrackerVideo,
        "sam3-video": Sam3Video,
    }
    loaded: dict[str, Any] = {}

    def get(family: str) -> Any:
        if family not in loaded:
            folder = write_random_family(tmp_path_factory.mktemp(family), family, "tiny", 0)
            source = resolve_source(str(folder), "pipeline")
            loaded[family] = classes[family](source, torch.device("cpu"), torch.float32, LoadOptions())
        return loaded[family]

    return get


def check_shapes(result: TrackedFrame) -> None:
    n = len(result.object_ids)
    assert result.masks.shape == (n, H, W) and result.masks.dtype == bool
    assert result.boxes.shape == (n, 4) and result.boxes.dtype == np.float32
    assert len(result.scores) == n and all(0.0 <= s <= 1.0 for s in result.scores)
    assert all(mask.any() for mask in result.masks)  # a lost object is absent, not an empty mask


PROMPT_TRACKERS = ["sam2-video", "sam3-tracker-video"]
FRAMES = 120  # the window is full after 16 frames; 80 more show it stays so


@pytest.mark.parametrize("family", PROMPT_TRACKERS)
def test_a_boxed_object_keeps_its_id_on_the_following_frames(
    family: str, tracker: Callable[[str], Any]
) -> None:
    model = tracker(family)
    assert model.role == "video_tracker" and model.video_abilities == {"video-boxes", "video-points"}
    session = model.start(H, W)
    first = session.push(frame_at(0), [ObjectPrompt(7, box=square_box(0))])
    results = [first, *(session.push(frame_at(i)) for i in range(1, 5))]
    for result in results:
        check_shapes(result)
        assert result.object_ids == [7] and result.phrase_ids == []
    # a second object, by points, joins on a later frame; both answer with their own ids
    both = session.push(frame_at(5), [ObjectPrompt(9, points=((30.0, 36.0),), point_labels=(1,))])
    check_shapes(both)
    assert sorted(both.object_ids) == [7, 9]
    session.close()


@pytest.mark.parametrize("family", PROMPT_TRACKERS)
def test_a_session_seeded_with_a_mask_goes_on_with_the_same_id(
    family: str, tracker: Callable[[str], Any]
) -> None:
    mask = frame_at(10)[..., 0] > 0
    session = tracker(family).start(H, W)
    seeded = session.push(frame_at(10), [ObjectPrompt(3, mask=mask)])
    check_shapes(seeded)
    # on its own frame the committed mask comes back (through the model's low-res masks)
    assert seeded.object_ids == [3]
    iou = (seeded.masks[0] & mask).sum() / (seeded.masks[0] | mask).sum()
    assert iou > 0.8
    assert np.abs(seeded.boxes[0] - np.array(square_box(10))).max() <= 2
    for i in range(11, 14):
        result = session.push(frame_at(i))
        check_shapes(result)
        assert result.object_ids == [3]


@pytest.mark.parametrize("family", PROMPT_TRACKERS)
def test_state_stays_flat_over_120_frames_and_tracking_goes_on(
    family: str, tracker: Callable[[str], Any]
) -> None:
    session = tracker(family).start(H, W)
    session.push(
        frame_at(0), [ObjectPrompt(1, box=square_box(0)), ObjectPrompt(2, mask=frame_at(0)[..., 0] > 0)]
    )
    sizes = {}
    for i in range(1, FRAMES):
        result = session.push(frame_at(i))
        if i in (40, FRAMES - 1):
            sizes[i] = (session.state_bytes(), session.stored_outputs())
    # the window (15 object pointers behind the frame, 2 memory frames) is full long before 40
    assert sizes[FRAMES - 1] == sizes[40]
    assert sizes[FRAMES - 1][1] <= 2 * 16  # per object: 15 tracked frames + its prompted one
    check_shapes(result)
    assert sorted(result.object_ids) == [1, 2]
    assert session.session.processed_frames == {} and len(session.session.processed_frames) == FRAMES


def test_prompt_trackers_refuse_what_they_cannot_take(tracker: Tracker) -> None:
    model = tracker("sam2-video")
    with pytest.raises(UnsupportedPrompt, match="not text"):
        model.start(H, W, ["cat"])
    session = model.start(H, W)
    assert session.push(frame_at(0)).object_ids == []  # nothing to follow yet
    with pytest.raises(UnsupportedPrompt, match="box, points or a mask"):
        session.push(frame_at(1), [ObjectPrompt(1)])
    with pytest.raises(UnsupportedPrompt, match="cannot be combined"):
        session.push(frame_at(1), [ObjectPrompt(1, box=square_box(1), mask=np.ones((H, W), bool))])
    with pytest.raises(InvalidInput, match="mask of shape"):
        session.push(frame_at(1), [ObjectPrompt(1, mask=np.ones((H, W + 1), bool))])
    with pytest.raises(InvalidInput, match="video frame of shape"):
        session.push(np.zeros((H + 1, W, 3), np.uint8))


def test_the_text_tracker_finds_objects_names_their_phrase_and_stays_bounded(
    tracker: Tracker,
) -> None:
    model = tracker("sam3-video")
    assert model.video_abilities == {"video-text"}
    session = model.start(H, W, ["cat", "dog", "cat"])
    results = [session.push(frame_at(i)) for i in range(36)]
    for result in results:
        check_shapes(result)
        assert len(result.phrase_ids) == len(result.object_ids)
        assert set(result.phrase_ids) <= {0, 1}  # the repeated "cat" answers as the first
    seen = [i for r in results for i in r.object_ids]
    assert seen, "the tiny model's lowered thresholds should find something"
    # ids are the session's own: an id found on one frame comes back on the next
    assert set(results[-1].object_ids) & set(results[-2].object_ids)
    sizes = (session.state_bytes(), session.stored_outputs(), session.bookkeeping_entries())
    for i in range(36, 40):
        session.push(frame_at(i))
    assert (session.state_bytes(), session.stored_outputs(), session.bookkeeping_entries()) == sizes
    assert len(session.session.obj_id_to_tracker_score_frame_wise) == 1


def test_the_text_tracker_refuses_prompts_and_no_phrases(tracker: Tracker) -> None:
    model = tracker("sam3-video")
    with pytest.raises(UnsupportedPrompt, match="at least one phrase"):
        model.start(H, W, [])
    session = model.start(H, W, ["cat"])
    with pytest.raises(UnsupportedPrompt, match="takes no boxes, points or masks"):
        session.push(frame_at(0), [ObjectPrompt(1, box=square_box(0))])


def test_the_cli_writes_a_video_family(tmp_path: Path) -> None:
    """`tunnelvision models random OUT --family sam2-video`: one checkpoint of that model_type."""
    import json
    import subprocess
    import sys

    from tunnelvision.models.family_names import RANDOM_FAMILIES
    from tunnelvision.models.random_families import NEEDS_TORCHVISION

    video = {"sam2-video", "sam3-tracker-video", "sam3-video"}
    assert video <= set(RANDOM_FAMILIES) and video <= NEEDS_TORCHVISION
    out = tmp_path / "tracker"
    command = [sys.executable, "-m", "tunnelvision.cli", "models", "random", str(out)]
    subprocess.run([*command, "--family", "sam2-video"], check=True, capture_output=True, timeout=120)
    assert json.loads((out / "config.json").read_text())["model_type"] == "sam2_video"
