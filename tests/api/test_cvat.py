"""The CVAT auto-annotation function against our real server (tiny random models), driven the way
`cvat-cli task auto-annotate` drives it: cvat-cli's own argument parser and function loader, and
cvat-sdk's own checks of what a function returns (the driver's label mapper), with only the CVAT
server's part (download frames, upload shapes) replaced by frames in memory."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import pytest
from PIL import Image

from support import image_bytes, keyed_cli_server
from tunnelvision.client import Client, decode_masks

cvataa = pytest.importorskip("cvat_sdk.auto_annotation")
cvat_main = pytest.importorskip("cvat_cli.__main__")  # cvat-cli needs Python >= 3.11
from cvat_cli._internal.agent_driver_interaction import (  # noqa: E402
    _InteractionFunctionContextImpl,
    _InteractionPromptsImpl,
)
from cvat_cli._internal.utils import popattr  # noqa: E402
from cvat_sdk import models  # noqa: E402
from cvat_sdk.auto_annotation import driver  # noqa: E402
from cvat_sdk.core.auth import ClientAuthParameters  # noqa: E402
from cvat_sdk.masks import decode_mask  # noqa: E402

from tunnelvision.integrations.cvat import TunnelvisionCVATError  # noqa: E402

MODULE = "tunnelvision.integrations.cvat"
FRAMES = [Image.open(io.BytesIO(image_bytes(96, 64, seed=s))).convert("RGB") for s in (1, 2)]
OPEN = ("-p", "box_threshold=float:0", "-p", "text_threshold=float:0", "-p", "max_detections=int:3")
OPEN_OPTIONS: dict[str, Any] = {"box_threshold": 0.0, "text_threshold": 0.0, "max_detections": 3}


@pytest.fixture(scope="module")
def server(
    tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str]]:
    """A keyed server: (url, key)."""
    with keyed_cli_server(tiny_models, tmp_path_factory.mktemp("cvat-keys"), "cvat") as server:
        yield server


@pytest.fixture
def env(server: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """The key where the docs tell users to put it; the URL too (one test passes it as `-p url`)."""
    url, key = server
    monkeypatch.setenv("TUNNELVISION_API_KEY", key)
    monkeypatch.setenv("TUNNELVISION_URL", url)
    return url


def task_labels(names: list[str], kind: str) -> list[Any]:
    """A CVAT task's labels: other ids than the function's, matched by name."""
    return [
        models.Label(id=100 + i, name=n, type=kind, sublabels=[], attributes=[]) for i, n in enumerate(names)
    ]


def auto_annotate(monkeypatch: pytest.MonkeyPatch, labels: list[Any], *args: str) -> tuple[int, list[Any]]:
    """`cvat-cli --server-host H --auth U:P task auto-annotate 7 ARGS...` through cvat-cli's main;
    the task's frames are FRAMES, and the shapes it would upload are returned."""
    uploaded: list[Any] = []

    def no_cvat_server(parsed: Any, logger: Any) -> contextlib.nullcontext[None]:
        for name in attrs.fields_dict(ClientAuthParameters):  # as cvat-cli's build_client does
            popattr(parsed, name)
        return contextlib.nullcontext()

    def annotate_frames(
        client: None,
        task_id: int,
        function: Any,
        *,
        pbar: Any = None,
        clear_existing: bool = False,
        allow_unmatched_labels: bool = False,
        conf_threshold: float | None = None,
        conv_mask_to_poly: bool = False,
    ) -> None:
        """cvat-sdk's annotate_task, less the CVAT server: the same context and the same checks."""
        assert isinstance(function.spec, cvataa.DetectionFunctionSpec)
        mapper = driver._AnnotationMapper(
            logging.getLogger("cvat-test"),
            function.spec.labels,
            labels,
            allow_unmatched_labels=allow_unmatched_labels,
            conv_mask_to_poly=conv_mask_to_poly,
        )
        for index, frame in enumerate(FRAMES):
            context = driver._DetectionFunctionContextImpl(
                frame_name=f"frame_{index:06d}.png",
                conf_threshold=conf_threshold,
                conv_mask_to_poly=conv_mask_to_poly,
            )
            _, shapes = mapper.validate_and_remap(function.detect(context, frame.copy()), index)
            uploaded.extend(shapes)

    monkeypatch.setattr(cvat_main, "build_client", no_cvat_server)
    monkeypatch.setattr(cvataa, "annotate_task", annotate_frames)
    argv = ["--server-host", "http://cvat.invalid", "--auth", "me:pw", "task", "auto-annotate", "7"]
    code = cvat_main.main([*argv, "--function-module", MODULE, *args])
    return code, uploaded


def direct(url: str, key: str, frame: Image.Image, route: str, **options: Any) -> Any:
    """Our own client's answer for the same frame: what the function should have turned into shapes."""
    with Client(url, key) as client:
        return getattr(client, route)(frame, **{"prompt": "cat . dog", **options})


def test_masks_are_the_servers_masks_under_the_tasks_labels(
    env: str, server: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    labels = task_labels(["cat", "dog"], "mask")
    code, shapes = auto_annotate(
        monkeypatch, labels, "-p", "prompt=str:cat . dog", "-p", "shape=str:mask", *OPEN
    )
    assert code == 0 and shapes
    names = {label.id: label.name for label in labels}
    for index, frame in enumerate(FRAMES):
        width, height = frame.size
        mine = [s for s in shapes if s.frame == index]
        expected = direct(*server, frame, "segment", **OPEN_OPTIONS)
        assert len(mine) == len(expected.detections) > 0
        for shape, detection, mask in zip(mine, expected.detections, decode_masks(expected), strict=True):
            assert isinstance(shape, models.LabeledShapeRequest)
            assert shape.type.value == "mask" and shape.source == "auto"
            assert names[shape.label_id] == detection.label  # the task's id for the phrase's label
            bitmap = decode_mask(shape.points, image_width=width, image_height=height)
            assert bitmap.shape == (height, width) and bitmap.any()
            assert np.array_equal(bitmap, mask)


def test_polygons_and_conv_mask_to_poly(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    for labels, args in (
        (task_labels(["cat", "dog"], "polygon"), ("-p", "shape=str:polygon")),
        (task_labels(["cat", "dog"], "polygon"), ("-p", "shape=str:mask", "--conv-mask-to-poly")),
    ):
        code, shapes = auto_annotate(monkeypatch, labels, "-p", "prompt=str:cat . dog", *OPEN, *args)
        assert code == 0 and shapes, args
        for shape in shapes:
            width, height = FRAMES[shape.frame].size
            assert shape.type.value == "polygon"
            points = shape.points  # flat [x1, y1, x2, y2, ...]
            assert len(points) >= 6 and len(points) % 2 == 0 and all(isinstance(v, float) for v in points)
            assert all(0 <= x <= width for x in points[0::2]) and all(0 <= y <= height for y in points[1::2])


def test_rectangles_inside_the_frame_and_the_conf_threshold(
    env: str, server: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    labels = task_labels(["cat", "dog"], "rectangle")
    url = f"url=str:{server[0]}"  # the URL as a parameter this time
    code, shapes = auto_annotate(
        monkeypatch, labels, "-p", url, "-p", "prompt=str:cat . dog", "-p", "shape=str:rectangle", *OPEN
    )
    assert code == 0 and shapes
    for shape in shapes:
        width, height = FRAMES[shape.frame].size
        x1, y1, x2, y2 = shape.points
        assert shape.type.value == "rectangle"
        assert 0 <= x1 <= x2 <= width and 0 <= y1 <= y2 <= height
    # --conf-threshold: only detections at least that confident (random weights: take the median)
    scores = sorted(d.score for d in direct(*server, FRAMES[0], "detect", **OPEN_OPTIONS).detections)
    threshold = scores[len(scores) // 2]
    code, shapes = auto_annotate(
        monkeypatch,
        labels,
        "-p",
        "prompt=str:cat . dog",
        "-p",
        "shape=str:rectangle",
        *OPEN,
        "--conf-threshold",
        str(threshold),
    )
    expected = direct(*server, FRAMES[0], "detect", **{**OPEN_OPTIONS, "box_threshold": threshold})
    kept = [s for s in shapes if s.frame == 0]
    assert code == 0 and 0 < len(kept) < len(scores)  # the threshold took some away
    assert len(kept) == len([d for d in expected.detections if d.score >= threshold])


def load(*params: str) -> Any:
    """cvat-cli's loader on `-p` parameters, as `task auto-annotate` and `function` commands use it."""
    from cvat_cli._internal.common import FunctionLoader
    from cvat_cli._internal.parsers import parse_function_parameter

    return FunctionLoader(MODULE, None, dict(parse_function_parameter(p) for p in params)).load()


def test_the_spec_names_labels_after_the_prompt(env: str) -> None:
    function = load("prompt=str:Forklift . person . forklift", "shape=str:polygon")
    spec = function.spec
    assert isinstance(spec, cvataa.DetectionFunctionSpec)
    assert [(label.name, label.id, label.type) for label in spec.labels] == [
        ("Forklift", 0, "polygon"),
        ("person", 1, "polygon"),
    ]


def test_a_wrong_key_is_a_clear_error_before_any_frame(env: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNELVISION_API_KEY", "tv_wrong")
    with pytest.raises(TunnelvisionCVATError, match="refused the API key") as caught:
        load("prompt=str:cat")
    assert "tv_wrong" not in str(caught.value)
    with pytest.raises(TunnelvisionCVATError, match="refused the API key"):  # through cvat-cli itself
        auto_annotate(monkeypatch, task_labels(["cat"], "mask"), "-p", "prompt=str:cat")


def test_a_server_that_does_not_answer_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from support import free_port

    monkeypatch.setenv("TUNNELVISION_URL", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("TUNNELVISION_API_KEY", "tv_any")
    with pytest.raises(TunnelvisionCVATError, match="cannot reach") as caught:
        load("prompt=str:cat")
    assert "answered" not in str(caught.value)


def test_unknown_model_shape_and_empty_prompt_are_refused(env: str) -> None:
    with pytest.raises(TunnelvisionCVATError, match="serves no model 'nope'; it has"):
        load("prompt=str:cat", "model=str:nope")
    with pytest.raises(TunnelvisionCVATError, match="shape must be one of rectangle, mask, polygon"):
        load("prompt=str:cat", "shape=str:ellipse")
    with pytest.raises(TunnelvisionCVATError, match="no prompt"):
        load("shape=str:mask")


def test_interactive_points_or_a_box_become_one_mask(env: str, server: tuple[str, str]) -> None:
    function = load("mode=str:interactive")
    assert isinstance(function.spec, cvataa.InteractionFunctionSpec)
    frame = FRAMES[0]
    width, height = frame.size
    context = _InteractionFunctionContextImpl()
    prepared = function.preprocess_image(context, frame)
    click = _InteractionPromptsImpl(pos_points=((30.0, 20.0),), neg_points=((5.0, 5.0),), bounding_box=None)
    box = _InteractionPromptsImpl(pos_points=(), neg_points=(), bounding_box=((10.0, 8.0), (60.0, 40.0)))
    for prompts in (click, box):
        (result,) = function.detect(context, prepared, prompts)
        assert isinstance(result, cvataa.InteractionResultShape) and result.type == "mask"
        bitmap = decode_mask(result.points, image_width=width, image_height=height)
        assert bitmap.shape == (height, width) and bitmap.any()
        (confidence,) = result.attributes
        assert confidence.spec_id == cvataa.InteractionResultAttributes.CONFIDENCE
        assert 0.0 <= float(confidence.value) <= 1.0
    expected = direct(*server, frame, "segment", prompt=None, boxes=[[10.0, 8.0, 60.0, 40.0]])
    (result,) = function.detect(context, prepared, box)
    assert np.array_equal(
        decode_mask(result.points, image_width=width, image_height=height), decode_masks(expected)[0]
    )
    both = _InteractionPromptsImpl(
        pos_points=((30.0, 20.0),), neg_points=(), bounding_box=((10.0, 8.0), (60.0, 40.0))
    )
    with pytest.raises(TunnelvisionCVATError, match="points or a box, not both"):
        function.detect(context, prepared, both)
