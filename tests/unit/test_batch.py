"""`predict`'s parts without a server: where outputs go, how a COCO file grows, atomic writes,
and where overlay tags are drawn."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tunnelvision.batch import find_images
from tunnelvision.coco import Coco
from tunnelvision.drawing import color_for, draw_boxes
from tunnelvision.files import write_atomic
from tunnelvision.masks import encode_rle
from tunnelvision.schemas import Detection, SegmentResponse


def touch(*paths: Path) -> None:
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def names(*inputs: str | Path, exclude: Path | None = None) -> list[str]:
    return sorted(job.name for job in find_images([str(i) for i in inputs], exclude))


def test_names_are_relative_to_the_common_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    img, other = tmp_path / "img", tmp_path / "other"
    touch(img / "cat.jpg", img / "x.jpg", img / "x.png", img / "deep" / "y.png", other / "cat.jpg")
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    assert names("../img/cat.jpg") == ["cat.jpg"]  # not "../img/cat.jpg"
    assert names(img / "cat.jpg") == ["cat.jpg"]  # not the absolute path
    assert names(img) == ["cat.jpg", "deep/y.png", "x.jpg", "x.png"]  # extensions keep x apart
    assert names("../img/cat.jpg", other / "cat.jpg") == ["img/cat.jpg", "other/cat.jpg"]
    assert names(img, other) == ["img/cat.jpg", "img/deep/y.png", "img/x.jpg", "img/x.png", "other/cat.jpg"]
    assert names(f"{img}/**/*.png") == ["deep/y.png", "x.png"]  # relative to the glob's fixed folders
    assert names("../*/cat.jpg") == ["img/cat.jpg", "other/cat.jpg"]
    assert all(".." not in name and not os.path.isabs(name) for name in names("../img", "../other/cat.jpg"))


def test_the_output_folder_is_not_an_input(tmp_path: Path) -> None:
    touch(tmp_path / "a.png", tmp_path / "out" / "a.png.overlay.png")
    assert names(tmp_path, exclude=tmp_path / "out") == ["a.png"]


def answer(*labels: str, width: int = 8, height: int = 6) -> SegmentResponse:
    mask = encode_rle(np.ones((height, width), dtype=bool)).model_dump()
    detection = {"score": 0.5, "box": [0, 0, width, height], "mask": mask, "mask_score": 0.9}
    detections = [{"label": label, **detection} for label in labels]
    return SegmentResponse.model_validate(
        {
            "image": {"width": width, "height": height},
            "image_id": "i",
            "mask_format": "rle",
            "detections": detections,
            "timings_ms": {},
        }
    )


def test_a_coco_file_grows_with_new_phrases(tmp_path: Path) -> None:
    first = Coco(["cat"])
    first.add("a.png", answer("cat", "cat"), ["cat"])
    assert first.asked("a.png") == {"cat"} and first.asked("b.png") is None

    second = Coco(["Cat", "dog"], first.data)  # "Cat" is the known "cat"
    assert [(c["id"], c["name"]) for c in second.data["categories"]] == [(1, "cat"), (2, "dog")]
    second.add("a.png", answer("Cat", "dog"), ["Cat", "dog"])  # redone: its cat answers replaced
    annotations = second.data["annotations"]
    assert sorted(a["category_id"] for a in annotations) == [1, 2]
    assert len({a["id"] for a in annotations}) == 2 and len(second.data["images"]) == 1
    assert second.asked("a.png") == {"cat", "dog"}

    third = Coco(["bird"], second.data)
    third.add("a.png", answer("bird"), ["bird"])  # cat and dog answers stay
    assert sorted(a["category_id"] for a in third.data["annotations"]) == [1, 2, 3]


def test_images_of_older_files_count_as_asked_for_the_files_categories() -> None:
    legacy = {
        "images": [{"id": 4, "file_name": "a.png", "width": 8, "height": 6}],
        "annotations": [],
        "categories": [{"id": 7, "name": "cat"}],
    }
    coco = Coco(["dog"], legacy)
    assert coco.asked("a.png") == {"cat"}
    coco.add("b.png", answer("dog"), ["dog"])
    assert [i["id"] for i in coco.data["images"]] == [4, 5]
    assert coco.data["annotations"][0]["category_id"] == 8


def test_atomic_writes_leave_no_staging_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "coco.json"
    write_atomic(target, b"old")

    def fail(*args: object) -> None:
        raise OSError(28, "No space left on device")

    assert target.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # as any new file, not 0600
    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert [p.name for p in tmp_path.iterdir()] == ["coco.json"] and target.read_bytes() == b"old"


def current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def tag_pixels(box: list[float], rows: slice) -> int:
    """Pixels of the tag's colour in `rows`, between the box's sides, inside its outline."""
    picture = Image.new("RGB", (200, 100))
    draw_boxes(picture, [Detection(label="cat", score=0.9, box=box)])
    pixels = np.asarray(picture)[rows, int(box[0]) + 3 : int(box[2]) - 3]
    return int((pixels == color_for("cat")).all(axis=-1).sum())


def test_a_tag_goes_inside_a_box_at_the_top_edge() -> None:
    assert tag_pixels([10, 0, 150, 90], slice(3, 30)) > 100  # was drawn above row 0: lost
    assert tag_pixels([10, 50, 150, 90], slice(53, 80)) == 0  # room above: above it stays
    assert tag_pixels([10, 50, 150, 90], slice(20, 48)) > 100


def test_a_tag_stays_inside_the_right_edge() -> None:
    picture = Image.new("RGB", (200, 100))
    draw_boxes(picture, [Detection(label="a long label", score=0.9, box=[190, 40, 199, 90])])
    tag_rows = np.asarray(picture)[10:38]
    columns = np.nonzero((tag_rows == color_for("a long label")).all(axis=-1).any(axis=0))[0]
    assert columns.min() < 150 and columns.max() < 200  # moved left, whole
