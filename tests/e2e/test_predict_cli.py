"""`tunnelvision predict` on a folder against a real server, validated with pycocotools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools.coco import COCO

from support import cli_server, image_bytes


@pytest.fixture(scope="module")
def url(tiny_models: tuple[Path, Path]) -> Iterator[str]:
    with cli_server(*tiny_models, "--no-warmup") as (server_url, _):
        yield server_url


def predict(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tunnelvision.cli", "predict", "--url", url, *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "COLUMNS": "120"},
    )


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "nested").mkdir(parents=True)
    (root / "a.png").write_bytes(image_bytes(160, 120, seed=1))
    (root / "nested" / "b.jpg").write_bytes(image_bytes(90, 60, fmt="JPEG", seed=2))
    (root / "broken.png").write_bytes(b"not a png at all")
    (root / "notes.txt").write_text("not an image: ignored")
    return root


def test_folder_to_coco_overlays_and_masks_then_resume(url: str, folder: Path, tmp_path: Path) -> None:
    coco_path, out = tmp_path / "coco.json", tmp_path / "out"
    args = (
        str(folder),
        "--prompt",
        "cat . dog",
        "--box-threshold",
        "0",
        "--max-detections",
        "3",
        "--coco",
        str(coco_path),
        "--out",
        str(out),
        "--concurrency",
        "2",
    )
    first = predict(url, *args)
    assert first.returncode == 1  # broken.png failed, and says so
    assert "2 done, 0 skipped (already done), 1 failed" in first.stdout
    assert "broken.png" in first.stderr and "invalid_image" in first.stderr

    coco = COCO(str(coco_path))
    assert {c["name"] for c in coco.loadCats(coco.getCatIds())} == {"cat", "dog"}
    images = {i["file_name"]: i for i in coco.loadImgs(coco.getImgIds())}
    assert set(images) == {"a.png", "nested/b.jpg"}
    assert (images["nested/b.jpg"]["width"], images["nested/b.jpg"]["height"]) == (90, 60)
    for name, image in images.items():
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(annotations) == 3, name
        for annotation in annotations:
            assert coco.annToMask(annotation).shape == (image["height"], image["width"])
            assert annotation["area"] == coco.annToMask(annotation).sum()

    assert Image.open(out / "a.overlay.png").size == (160, 120)
    index = np.asarray(Image.open(out / "nested" / "b.masks.png"))
    assert index.shape == (60, 90) and index.max() <= 3
    assert json.loads((out / "a.json").read_text())["image"] == {"width": 160, "height": 120}

    (folder / "broken.png").write_bytes(image_bytes(50, 40, seed=3))  # fixed; the rest is done
    second = predict(url, *args)
    assert second.returncode == 0, second.stderr
    assert "1 done, 2 skipped (already done), 0 failed" in second.stdout
    assert len(COCO(str(coco_path)).getImgIds()) == 3


def test_globs_and_no_match(url: str, folder: Path) -> None:
    globbed = predict(url, str(folder / "**" / "*.jpg"), "--prompt", "cat")
    assert globbed.returncode == 0 and "1 done" in globbed.stdout
    nothing = predict(url, str(folder / "*.gif"), "--prompt", "cat")
    assert nothing.returncode == 2 and "no images found" in nothing.stderr
