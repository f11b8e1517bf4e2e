"""`pip install tunnelvision` (no extras) in a venv of its own: no torch, transformers or web server,
yet the client and `tunnelvision predict` work against our real server (started from the dev
install), and the server commands say what to install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from pycocotools.coco import COCO

from support import cli_server, client_venv, image_bytes

pytestmark = pytest.mark.e2e
SERVER_PACKAGES = ("torch", "torchvision", "transformers", "fastapi", "starlette", "uvicorn", "scipy")
SERVER_HINT = "this needs the server: pip install 'tunnelvision[server]'"


PYENV_VERSIONS = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
THIS_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"
OLDEST_PYTHON = "3.10"  # pyproject's requires-python


def interpreter_for(version: str) -> str | None:
    """A Python of that version: pyenv's (CI keeps 3.10 to 3.13 there), else one on PATH."""
    found = sorted(PYENV_VERSIONS.glob(f"{version}.*/bin/python"))
    return str(found[-1]) if found else shutil.which(f"python{version}")


@pytest.fixture(
    scope="module", params=list(dict.fromkeys([THIS_PYTHON, OLDEST_PYTHON])), ids=lambda v: f"py{v}"
)
def python(request: pytest.FixtureRequest) -> Path:
    """The base install's interpreter (this checkout, installed without extras), on this Python
    and on the oldest one we claim."""
    version: str = request.param
    if version == THIS_PYTHON:
        return client_venv("base-install", [], with_project=True)
    interpreter = interpreter_for(version)
    if interpreter is None:
        pytest.skip(
            f"no Python {version} here: neither {PYENV_VERSIONS}/{version}.* nor python{version} on PATH"
        )
    name = f"base-install-py{version.replace('.', '')}"
    return client_venv(name, [], with_project=True, interpreter=interpreter)


@pytest.fixture(scope="module")
def url(tiny_models: tuple[Path, Path]) -> Iterator[str]:
    with cli_server(*tiny_models, "--no-warmup") as (server_url, _):
        yield server_url


def run(
    command: list[str], timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def test_the_venv_runs_the_python_it_was_made_for(python: Path, request: pytest.FixtureRequest) -> None:
    done = run([str(python), "-c", "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')"])
    assert done.stdout.strip() == request.node.callspec.params["python"]


def test_the_base_install_has_none_of_the_servers_packages(python: Path) -> None:
    for package in SERVER_PACKAGES:
        done = run([str(python), "-c", f"import {package}"])
        assert done.returncode != 0 and "ModuleNotFoundError" in done.stderr, package


CLIENT_SCRIPT = """
import json, sys
from tunnelvision import Client
from tunnelvision.client import decode_masks
from tunnelvision.coco import Coco

url, image = sys.argv[1], open(sys.argv[2], "rb").read()
options = dict(box_threshold=0.0, text_threshold=0.0, max_detections=2)
with Client(url) as client:
    found = client.detect(image, "cat . dog", **options)
    cut = client.segment(image, "cat . dog", mask_format="polygon", **options)
    masks = decode_masks(cut)
print(json.dumps({
    "boxes": [d.box for d in found.detections],
    "labels": sorted({d.label for d in cut.detections}),
    "masks": [[*m.shape, int(m.sum())] for m in masks],
    "size": [cut.image.width, cut.image.height],
    "server_modules": sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[3].split(","))),
}))
"""


def test_the_client_works_without_torch(python: Path, url: str, tmp_path: Path) -> None:
    image = tmp_path / "a.png"
    image.write_bytes(image_bytes(80, 60, seed=3))
    done = run([str(python), "-c", CLIENT_SCRIPT, url, str(image), ",".join(SERVER_PACKAGES)])
    assert done.returncode == 0, done.stderr
    answer = json.loads(done.stdout)
    assert len(answer["boxes"]) == 2 and answer["size"] == [80, 60]
    assert set(answer["labels"]) <= {"cat", "dog"}
    assert [m[:2] for m in answer["masks"]] == [[60, 80], [60, 80]] and all(m[2] > 0 for m in answer["masks"])
    assert answer["server_modules"] == []


def test_predict_writes_coco_and_overlays_for_a_folder(python: Path, url: str, tmp_path: Path) -> None:
    folder, out, coco_path = tmp_path / "photos", tmp_path / "out", tmp_path / "instances.json"
    folder.mkdir()
    (folder / "a.png").write_bytes(image_bytes(96, 64, seed=1))
    (folder / "b.jpg").write_bytes(image_bytes(70, 50, fmt="JPEG", seed=2))
    tunnelvision = python.parent / "tunnelvision"  # the console script a user runs
    done = run(
        [
            str(tunnelvision),
            "predict",
            str(folder),
            "--prompt",
            "cat . dog",
            "--url",
            url,
            "--box-threshold",
            "0",
            "--max-detections",
            "2",
            "--out",
            str(out),
            "--coco",
            str(coco_path),
        ]
    )
    assert done.returncode == 0, done.stderr
    assert "2 done, 0 skipped (already done), 0 failed" in done.stdout
    coco = COCO(str(coco_path))
    images = {i["file_name"]: i for i in coco.loadImgs(coco.getImgIds())}
    assert set(images) == {"a.png", "b.jpg"}
    for image in images.values():
        annotations = coco.loadAnns(coco.getAnnIds(imgIds=[image["id"]]))
        assert len(annotations) == 2
        assert all(coco.annToMask(a).shape == (image["height"], image["width"]) for a in annotations)
    for name in ("a.png", "b.jpg"):  # outputs keep the input's extension: x.jpg and x.png stay apart
        assert (out / f"{name}.overlay.png").is_file() and (out / f"{name}.json").is_file()


@pytest.mark.parametrize("command", [["serve"], ["up"], ["models", "random", "models-out"]])
def test_server_commands_say_what_to_install(python: Path, command: list[str], tmp_path: Path) -> None:
    done = run([str(python.parent / "tunnelvision"), *command], timeout=60, cwd=tmp_path)
    assert done.returncode == 1
    assert SERVER_HINT in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "models-out").exists()


def test_help_and_the_light_commands_work(python: Path, tmp_path: Path) -> None:
    tunnelvision = str(python.parent / "tunnelvision")
    done = run([tunnelvision, "--help"], timeout=60)
    assert done.returncode == 0 and "predict" in done.stdout
    keys = str(tmp_path / "keys.json")
    added = run([tunnelvision, "keys", "--keys-file", keys, "add", "laptop"], timeout=60)
    assert added.returncode == 0 and added.stdout.startswith("tv_")
