"""Every shell and Python example in the README, run as written against a real `tunnelvision serve`
(tiny random models) from a folder holding the files the examples name. Only the host and port
change. A block that cannot run here (cloudflared, the hub, a server that never returns) carries
`<!-- not run: REASON -->` on the line before it and is reported as skipped with that reason."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from support import REPO, cli_server, image_bytes
from tunnelvision.models.random_families import write_random_family
from tunnelvision.video.synthetic import write_moving_square_clip

pytestmark = pytest.mark.e2e
README = REPO / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
NOT_RUN = re.compile(r"^<!-- not run: (.+?) -->$")
RUNNABLE = ("bash", "python")
# What an example may call the server; each is replaced by the test server's address.
ADDRESSES = ("http://127.0.0.1:8000", "https://api.example.com", "localhost:8000")
# Bigger than one command-line argument may be (Linux: 128 KiB), as a phone photo is.
PHOTO_BYTES = 1_000_000


@dataclass(frozen=True)
class Block:
    language: str
    code: str
    line: int  # of the opening fence, 1-based
    not_run: str | None  # the marker's reason


def readme_blocks(text: str) -> list[Block]:
    """The README's fenced blocks, with the `not run` marker of the line before each, if any."""
    blocks: list[Block] = []
    lines = text.splitlines()
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        end = next(i for i in range(index + 1, len(lines)) if lines[i].startswith("```"))
        marker = NOT_RUN.match(lines[index - 1]) if index else None
        code = "\n".join(lines[index + 1 : end]) + "\n"
        blocks.append(Block(opening.group(1), code, index + 1, marker.group(1) if marker else None))
        index = end + 1
    return blocks


BLOCKS = readme_blocks(README.read_text())
EXAMPLES = [b for b in BLOCKS if b.language in RUNNABLE]


def json_documents(output: str) -> list[Any]:
    """The JSON values an example printed, in order: curl's answers follow each other with no
    newline between them, and lines of plain text (a command's summary) are passed over."""
    decoder = json.JSONDecoder()
    documents, position = [], 0
    while position < len(output):
        if output[position].isspace():
            position += 1
        elif output[position] in "{[":
            value, position = decoder.raw_decode(output, position)
            documents.append(value)
        else:
            newline = output.find("\n", position)
            position = len(output) if newline < 0 else newline + 1
    return documents


def printing_curls(code: str) -> int:
    """Commands of a shell example that print an answer: `curl` starting a line (or the last
    stage of a pipe), without `-o`."""
    starts = (line.strip().removeprefix("| ") for line in code.splitlines())
    return sum(1 for line in starts if line.startswith("curl ") and " -o " not in line)


def localized(code: str, url: str) -> str:
    host = url.removeprefix("http://")
    for address in ADDRESSES:
        code = code.replace(address, host if address == "localhost:8000" else url)
    return code


def write_example_files(folder: Path, tiny_models: tuple[Path, Path]) -> None:
    """The files the examples name: photos, folders of them, and model folders to reload from."""
    photo = Image.open(io.BytesIO(image_bytes(1280, 720, seed=7)))
    photo.save(folder / "warehouse.jpg", quality=95)  # about 1 MB, as a camera's
    (folder / "cat.jpg").write_bytes(image_bytes(640, 480, fmt="JPEG", seed=8))
    for name, seed in (("a.jpg", 1), ("b.jpg", 2), ("photos/dock/c.jpg", 3), ("more/d.jpg", 4)):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(image_bytes(320, 240, fmt="JPEG", seed=seed))
    detector, segmenter = tiny_models
    (folder / "detector-v2").symlink_to(detector, target_is_directory=True)
    (folder / "segmenter").symlink_to(segmenter, target_is_directory=True)
    write_moving_square_clip(folder / "clip.mp4", 130, 640, 360, fps=25)
    write_random_family(folder / "models" / "track", "sam2-video", "tiny", seed=0)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory, tiny_models: tuple[Path, Path]) -> Path:
    folder = tmp_path_factory.mktemp("readme")
    write_example_files(folder, tiny_models)
    return folder


@pytest.fixture(scope="module")
def url(tiny_models: tuple[Path, Path], workdir: Path) -> Iterator[str]:
    """The server the README's examples talk to, with the `sam` pipeline they name. It starts in
    the examples' folder, as an operator's would, so a reload's `./detector-v2` means the same
    folder to the server as to the example."""
    detector, segmenter = tiny_models
    here = Path.cwd()
    os.chdir(workdir)
    try:
        pipelines = ("--pipeline", f"sam={segmenter}", "--pipeline", f"track={workdir / 'models' / 'track'}")
        with cli_server(detector, segmenter, "--no-warmup", *pipelines) as started:
            os.chdir(here)
            yield started[0]
    finally:
        os.chdir(here)


def run_example(block: Block, url: str, workdir: Path) -> subprocess.CompletedProcess[str]:
    code = localized(block.code, url)
    assert code != block.code, f"README line {block.line}: the example talks to no server we know"
    # The console scripts (`tunnelvision`) of this install come first, as in an activated venv.
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
        "TUNNELVISION_URL": url,
    }
    command = (
        ["bash", "-euo", "pipefail", "-c", code] if block.language == "bash" else [sys.executable, "-c", code]
    )
    return subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("block", EXAMPLES, ids=[f"{b.language}-line{b.line}" for b in EXAMPLES])
def test_readme_example_runs(block: Block, url: str, workdir: Path) -> None:
    if block.not_run:
        pytest.skip(f"README line {block.line}: {block.not_run}")
    done = run_example(block, url, workdir)
    assert done.returncode == 0, f"README line {block.line} exited {done.returncode}:\n{done.stderr[-3000:]}"
    documents = json_documents(done.stdout)
    assert len(documents) >= printing_curls(block.code), f"README line {block.line}:\n{done.stdout[-3000:]}"
    for document in documents:
        # Our errors are {"error": {"code", "message"}}; a video's status has "error": null.
        assert not (isinstance(document, dict) and isinstance(document.get("error"), dict)), (
            f"README line {block.line}: {document}"
        )


def test_the_json_body_example_takes_a_photo_too_big_for_an_argument(workdir: Path) -> None:
    """The example photo is as big as a real one, so building the body on the command line (the
    'Argument list too long' of an earlier README) cannot pass unnoticed."""
    assert (workdir / "warehouse.jpg").stat().st_size >= PHOTO_BYTES
    uses_json = [b for b in EXAMPLES if "application/json" in b.code and "warehouse.jpg" in b.code]
    assert uses_json and all(b.not_run is None for b in uses_json)


def test_every_example_runs_unless_marked_with_a_reason() -> None:
    assert len([b for b in EXAMPLES if b.not_run is None]) >= 8
    for block in BLOCKS:
        if block.not_run is not None:
            assert block.language in RUNNABLE, (
                f"README line {block.line}: a marker before a {block.language!r} block"
            )
    markers = README.read_text().count("<!-- not run:")
    assert markers == len([b for b in BLOCKS if b.not_run]), "a `not run` marker is not right before a block"


@pytest.mark.parametrize(
    "block", [b for b in BLOCKS if b.language == "json"], ids=lambda b: f"json-line{b.line}"
)
def test_readme_json_samples_parse(block: Block) -> None:
    json.loads(block.code)


def test_json_documents_reads_answers_between_plain_lines() -> None:
    assert json_documents('{"a": 1}{"b": 2}\nreloaded sam {x}\n[3]\n') == [{"a": 1}, {"b": 2}, [3]]
    assert json_documents("a text {not json\n") == []


def test_deploy_states_the_cuda_the_dockerfile_installs() -> None:
    """The driver advice follows the image: a new CUDA in deploy/Dockerfile needs a new minimum."""
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    deploy = (REPO / "docs" / "DEPLOY.md").read_text()
    base = re.search(r"^FROM (nvidia/cuda:(\d+\.\d+)\S*)", dockerfile, re.MULTILINE)
    index = re.search(r"download\.pytorch\.org/whl/(cu\d+)", dockerfile)
    assert base and index, "deploy/Dockerfile no longer names its CUDA image and torch index"
    assert base.group(1) in deploy and f"`{index.group(1)}`" in deploy
    assert f"cuda>={base.group(2)}" in deploy, "DEPLOY.md's driver minimum is for another CUDA"


def test_docs_name_the_torch_the_scripts_install() -> None:
    """README and DEPLOY.md say which CUDA the pinned PyPI torch is built for: a new pin needs a look."""
    pinned = re.search(r'"torch==([\d.]+)"', (REPO / "scripts" / "_venv.sh").read_text())
    assert pinned, "scripts/_venv.sh no longer pins torch"
    for doc in (README, REPO / "docs" / "DEPLOY.md"):
        assert f"torch {pinned.group(1)}" in doc.read_text().replace("\n", " "), doc.name
