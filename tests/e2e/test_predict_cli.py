"""`tunnelvision predict` as a user runs it (a subprocess) against a real server with a key,
validated with pycocotools: outputs under --out only, reruns that add phrases, messages (not
tracebacks) when the server, the key or the COCO file is wrong."""

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
from pycocotools import mask as coco_mask
from pycocotools.coco import COCO

from support import free_port, image_bytes, keyed_cli_server

FIND_ALL = ("--box-threshold", "0", "--max-detections", "3")


@pytest.fixture(scope="module")
def server(
    tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    with keyed_cli_server(tiny_models, tmp_path_factory.mktemp("keys"), "batch") as server:
        yield server


def predict(
    server: tuple[str, str],
    *args: str,
    url: str | None = None,
    key: str | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNNELVISION_")}
    command = ["predict", "--url", url or server[0], "--key", key or server[1], *args]
    return subprocess.run(
        [sys.executable, "-m", "tunnelvision.cli", *command],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=cwd,
        env={**env, "COLUMNS": "120"},
    )


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "photos"
    (root / "nested").mkdir(parents=True)
    (root / "a.png").write_bytes(image_bytes(160, 120, seed=1))
    (root / "nested" / "b.jpg").write_bytes(image_bytes(90, 60, fmt="JPEG", seed=2))
    (root / "broken.png").write_bytes(b"not a png at all")
    (root / "notes.txt").write_text("not an image: ignored")
    return root


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    root = tmp_path / "good"
    root.mkdir()
    for seed, name in enumerate(("a.png", "b.png", "c.png")):
        (root / name).write_bytes(image_bytes(64, 48, seed=seed))
    return root


def test_folder_to_coco_overlays_and_masks_then_resume(
    server: tuple[str, str], folder: Path, tmp_path: Path
) -> None:
    coco_path, out = tmp_path / "coco.json", tmp_path / "out"
    args = (str(folder), "--prompt", "cat . dog", *FIND_ALL, "--coco", str(coco_path), "--out", str(out))
    first = predict(server, *args, "--concurrency", "2")
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

    assert Image.open(out / "a.png.overlay.png").size == (160, 120)
    answer = json.loads((out / "nested" / "b.jpg.json").read_text())
    assert answer["image"] == {"width": 90, "height": 60}
    # Every detection's whole mask, overlaps included: one PNG each, numbered as in the JSON.
    assert listing(out / "nested" / "b.jpg.masks") == ["000.png", "001.png", "002.png"]
    for index, detection in enumerate(answer["detections"]):
        written = np.asarray(Image.open(out / "nested" / "b.jpg.masks" / f"{index:03d}.png")) > 0
        rle = {"size": detection["mask"]["size"], "counts": detection["mask"]["counts"].encode()}
        assert np.array_equal(written, coco_mask.decode(rle).astype(bool))

    (folder / "broken.png").write_bytes(image_bytes(50, 40, seed=3))  # fixed; the rest is done
    second = predict(server, *args)
    assert second.returncode == 0, second.stderr
    assert "1 done, 2 skipped (already done), 0 failed" in second.stdout
    assert len(COCO(str(coco_path)).getImgIds()) == 3
    assert not list(tmp_path.rglob("*.tmp"))


def test_outputs_stay_under_out(server: tuple[str, str], tmp_path: Path) -> None:
    img, other, work = tmp_path / "img", tmp_path / "other", tmp_path / "work"
    for folder in (img, other, work):
        folder.mkdir()
    (img / "cat.jpg").write_bytes(image_bytes(40, 30, fmt="JPEG", seed=1))
    (img / "x.jpg").write_bytes(image_bytes(40, 30, fmt="JPEG", seed=2))
    (img / "x.png").write_bytes(image_bytes(50, 30, seed=3))
    (other / "cat.jpg").write_bytes(image_bytes(30, 20, fmt="JPEG", seed=4))
    before = listing(img), listing(other)

    # A relative path up and out, and an absolute one: named from their common folder.
    files = predict(
        server, "../img/cat.jpg", str(other / "cat.jpg"), "--prompt", "cat", "--out", "out", cwd=work
    )
    assert files.returncode == 0, files.stderr
    assert "2 done" in files.stdout
    assert [p for p in listing(work / "out") if ".masks/" not in p] == [
        "img",
        *(f"img/cat.jpg.{part}" for part in ("json", "masks", "overlay.png")),
        "other",
        *(f"other/cat.jpg.{part}" for part in ("json", "masks", "overlay.png")),
    ]

    # x.jpg and x.png: two images, two sets of outputs, two COCO entries.
    coco_path = tmp_path / "x.json"
    both = predict(
        server, str(img / "x.*"), "--prompt", "cat", "--out", str(tmp_path / "xs"), "--coco", str(coco_path)
    )
    assert both.returncode == 0, both.stderr
    assert "2 done" in both.stdout
    assert {p.name for p in (tmp_path / "xs").glob("*.overlay.png")} == {
        "x.jpg.overlay.png",
        "x.png.overlay.png",
    }
    assert json.loads((tmp_path / "xs" / "x.png.json").read_text())["image"]["width"] == 50
    assert sorted(i["file_name"] for i in COCO(str(coco_path)).dataset["images"]) == ["x.jpg", "x.png"]
    assert (listing(img), listing(other)) == before  # nothing written beside the sources


def test_a_new_phrase_adds_its_category_and_redoes_the_images(
    server: tuple[str, str], photos: Path, tmp_path: Path
) -> None:
    coco_path = tmp_path / "coco.json"

    def run(prompt: str, *extra: str) -> str:
        done = predict(server, str(photos), "--prompt", prompt, *FIND_ALL, "--coco", str(coco_path), *extra)
        assert done.returncode == 0, done.stderr
        return done.stdout

    def per_image() -> dict[str, list[str]]:
        coco = COCO(str(coco_path))
        assert len({a["id"] for a in coco.dataset["annotations"]}) == len(coco.dataset["annotations"])
        names = {c["id"]: c["name"] for c in coco.dataset["categories"]}
        return {
            image["file_name"]: sorted(names[a["category_id"]] for a in coco.imgToAnns[image["id"]])
            for image in coco.dataset["images"]
        }

    assert "3 done, 0 skipped" in run("cat")
    dog = run("dog")  # not asked for dog yet: redone, not skipped
    assert "new categories dog" in dog and "3 done, 0 skipped" in dog
    assert per_image() == {name: ["cat"] * 3 + ["dog"] * 3 for name in ("a.png", "b.png", "c.png")}
    assert "0 done, 3 skipped" in run("dog . cat")  # both asked already
    assert "3 done, 0 skipped" in run("dog . cat", "--force")  # asked again: the answers replaced
    assert all(len(labels) == 3 for labels in per_image().values())
    assert [c["name"] for c in COCO(str(coco_path)).dataset["categories"]] == ["cat", "dog"]


def test_no_server_stops_at_once_with_a_message(
    server: tuple[str, str], photos: Path, tmp_path: Path
) -> None:
    nowhere = f"http://127.0.0.1:{free_port()}"
    coco_path, out = tmp_path / "coco.json", tmp_path / "out"
    done = predict(
        server, str(photos), "--prompt", "cat", "--url", nowhere, "--coco", str(coco_path), "--out", str(out)
    )
    assert done.returncode == 1
    assert "Traceback" not in done.stderr
    assert f"stopped: cannot reach POST {nowhere}/v1/segment" in done.stderr
    assert "Is the server running" in done.stderr
    assert "0 done, 0 skipped (already done), 0 failed, 3 not tried" in done.stdout
    assert not coco_path.exists() and not list(tmp_path.rglob("*.tmp"))


def test_a_refused_key_stops_at_once(server: tuple[str, str], photos: Path) -> None:
    done = predict(server, str(photos), "--prompt", "cat", "--concurrency", "1", key="tv_wrong")
    assert done.returncode == 1
    assert "Traceback" not in done.stderr and "failed:" not in done.stderr
    assert "stopped: the server refused access (401 unauthorized" in done.stderr and "--key" in done.stderr
    assert "0 done, 0 skipped (already done), 0 failed, 3 not tried" in done.stdout


def test_a_url_without_scheme_as_the_help_shows(server: tuple[str, str], photos: Path) -> None:
    done = predict(server, str(photos / "a.png"), "--prompt", "cat", url=server[0].removeprefix("http://"))
    assert done.returncode == 0, done.stderr
    assert "1 done" in done.stdout


def test_a_url_that_is_not_http_is_a_message(server: tuple[str, str], photos: Path) -> None:
    done = predict(server, str(photos), "--prompt", "cat", url="ftp://127.0.0.1:21")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "'ftp://127.0.0.1:21' is not an http(s) URL" in done.stderr


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "is not JSON"),
        ("[]", "is not a COCO instances file (not a JSON object)"),
        ('{"images": [{"id": 1}]}', "is not a COCO instances file (an entry of 'images' lacks"),
        (None, "is a folder"),
    ],
)
def test_an_unusable_coco_file_is_named_and_kept(
    server: tuple[str, str], photos: Path, tmp_path: Path, content: str | None, problem: str
) -> None:
    coco_path = tmp_path / "coco.json"
    if content is None:
        coco_path.mkdir()
    else:
        coco_path.write_text(content)
    done = predict(server, str(photos), "--prompt", "cat", "--coco", str(coco_path))
    assert done.returncode == 2
    assert "Traceback" not in done.stderr
    assert f"--coco {coco_path} {problem}" in done.stderr
    assert content is None or coco_path.read_text() == content


def test_a_prompt_without_phrases_is_refused(server: tuple[str, str], photos: Path) -> None:
    done = predict(server, str(photos), "--prompt", " . ")
    assert done.returncode == 2 and "--prompt has no phrases" in done.stderr


def test_globs_and_no_match(server: tuple[str, str], folder: Path) -> None:
    globbed = predict(server, str(folder / "**" / "*.jpg"), "--prompt", "cat")
    assert globbed.returncode == 0 and "1 done" in globbed.stdout
    nothing = predict(server, str(folder / "*.gif"), "--prompt", "cat")
    assert nothing.returncode == 2 and "no images found" in nothing.stderr
