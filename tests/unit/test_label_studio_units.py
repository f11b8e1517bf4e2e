"""The pure parts of the Label Studio backend: labeling configs (hostile ones too), the brush RLE
(checked against a decoder written here from the format's description), result items, and
which task image URLs are fetched."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import numpy as np
import pytest

from tunnelvision.errors import PayloadTooLarge
from tunnelvision.integrations.label_studio import results
from tunnelvision.integrations.label_studio.brush import encode_brush
from tunnelvision.integrations.label_studio.config import (
    MAX_CONFIG_CHARS,
    MAX_DEPTH,
    InvalidLabelConfig,
    MalformedLabelConfig,
    parse_label_config,
    prompt_for,
)
from tunnelvision.integrations.label_studio.images import (
    ImageFetchFailed,
    ImageRefused,
    ImageSource,
    fetch_image,
    resolve,
)
from tunnelvision.integrations.label_studio.protocol import BoundedMap
from tunnelvision.masks import encode_rle
from tunnelvision.schemas import Detection, Segmentation

CONFIG = """<View>
  <Image name="image" value="$image"/>
  <Image name="other" value="$second"/>
  <rectanglelabels name="box" toName="image">
    <Label value="cat"/><Label value="Traffic.Light"/>
  </rectanglelabels>
  <BrushLabels name="brush" toName="image"><Label value="cat"/></BrushLabels>
  <PolygonLabels name="poly" toName="other"><Label value="dog"/></PolygonLabels>
  <KeyPointLabels name="kp" toName="image" smart="true"><Label value="cat"/></KeyPointLabels>
  <Choices name="c" toName="image"><Choice value="x"/></Choices>
  <RectangleLabels name="nowhere" toName="missing"><Label value="cat"/></RectangleLabels>
</View>"""


# -- labeling configs ---------------------------------------------------------------------------


def test_each_tool_is_found_with_its_image_field_and_labels() -> None:
    config = parse_label_config(CONFIG)
    found = {c.from_name: (c.tool, c.to_name, c.image_key, c.labels) for c in config.controls}
    assert found == {
        "box": ("rectangle", "image", "image", ("cat", "Traffic.Light")),
        "brush": ("brush", "image", "image", ("cat",)),
        "poly": ("polygon", "other", "second", ("dog",)),
        "kp": ("keypoint", "image", "image", ("cat",)),
    }
    assert [c.from_name for c in config.pre_annotated] == ["box", "brush", "poly"]
    assert config.controls[0].result_type == "rectanglelabels"
    brush_tool, polygon_tool = config.mask_tool("image"), config.mask_tool("other")
    assert brush_tool is not None and brush_tool.from_name == "brush"  # brush first
    assert polygon_tool is not None and polygon_tool.from_name == "poly"
    assert config.mask_tool("nothing") is None


def test_labels_become_phrases_the_engine_takes() -> None:
    assert prompt_for(["Traffic.Light", "cat", "CAT", " "]) == {
        "Traffic Light": "Traffic.Light",
        "cat": "cat",
    }


@pytest.mark.parametrize(
    "text",
    [
        # billion laughs: refused at the DOCTYPE, nothing expands
        '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;">]>'
        '<View><Image name="i" value="$i"/><RectangleLabels name="r" toName="i">'
        '<Label value="&lol2;"/></RectangleLabels></View>',
        # an external entity (a file on the server)
        '<!DOCTYPE v [<!ENTITY x SYSTEM "file:///etc/passwd">]><View><Label value="&x;"/></View>',
        '<!DOCTYPE View SYSTEM "http://example.com/x.dtd"><View/>',
        "<View><Image name='i' value='$i'/>",  # not closed
        "<View>&undefined;</View>",
        "",
        "<View>" + "<View>" * (MAX_DEPTH + 1) + "</View>" * (MAX_DEPTH + 1) + "</View>",
        "<View>" + "<Label/>" * 20_000 + "</View>",
        "<View>" + " " * (MAX_CONFIG_CHARS + 1) + "</View>",
    ],
    ids=[
        "entity-bomb",
        "external-entity",
        "external-dtd",
        "unclosed",
        "entity",
        "empty",
        "deep",
        "wide",
        "huge",
    ],
)
def test_hostile_or_broken_xml_is_refused_before_anything_expands(text: str) -> None:
    with pytest.raises(MalformedLabelConfig):
        parse_label_config(text)


def test_a_config_without_tools_we_fill_is_refused_saying_what_is_needed() -> None:
    with pytest.raises(InvalidLabelConfig, match="RectangleLabels"):
        parse_label_config('<View><Image name="i" value="$i"/><Choices name="c" toName="i"/></View>')


# -- brush RLE ----------------------------------------------------------------------------------


def decode_brush(rle: list[int]) -> np.ndarray:
    """Label Studio's brush RLE, read from its description: a bit stream (MSB first) with a
    32-bit value count, a 5-bit word size - 1, four 4-bit run field sizes - 1, then blocks of a
    flag (1: repeat, 0: literal values), a 2-bit field choice, run length - 1, value(s)."""
    bits = "".join(f"{byte:08b}" for byte in rle)
    position = 0

    def take(n: int) -> int:
        nonlocal position
        value = int(bits[position : position + n], 2)
        position += n
        return value

    count, word = take(32), take(5) + 1
    sizes = [take(4) + 1 for _ in range(4)]
    out: list[int] = []
    while len(out) < count:
        repeat = take(1)
        run = take(sizes[take(2)]) + 1
        out += [take(word)] * run if repeat else [take(word) for _ in range(run)]
    return np.array(out[:count], dtype=np.uint8)


@pytest.mark.parametrize(
    "mask",
    [
        np.zeros((3, 5), bool),
        np.ones((200, 150), bool),  # runs longer than the widest field: split
        np.random.default_rng(1).random((31, 17)) > 0.5,  # short runs everywhere
        np.pad(np.ones((40, 70), bool), ((5, 9), (13, 2))),
        np.eye(50, dtype=bool),
    ],
)
def test_brush_rle_round_trips_through_an_independent_decoder(mask: np.ndarray) -> None:
    values = decode_brush(encode_brush(mask)).reshape(*mask.shape, 4)
    assert (values == (mask[..., None] * 255)).all()  # every RGBA channel of a pixel alike


# -- result items -------------------------------------------------------------------------------


def test_detections_become_regions_of_each_tool_in_percent() -> None:
    config = parse_label_config(CONFIG)
    mask = np.zeros((50, 200), bool)
    mask[10:20, 50:100] = True
    detections = [
        Segmentation(label="cat", score=0.8, box=[50, 10, 100, 20], mask=encode_rle(mask), mask_score=0.9),
        Detection(label="traffic light", score=0.5, box=[0, 0, 200, 50]),
        Detection(label="zebra", score=0.9, box=[0, 0, 1, 1]),  # no tool has it
    ]
    items = results.pre_annotations(
        config.pre_annotated, detections, prompt_for(["cat", "Traffic.Light"]), 200, 50
    )
    kinds = [(i["from_name"], i["type"], i["value"][i["type"]]) for i in items]
    assert kinds == [
        ("box", "rectanglelabels", ["cat"]),
        ("brush", "brushlabels", ["cat"]),
        ("box", "rectanglelabels", ["Traffic.Light"]),  # the config's spelling, not the phrase
    ]
    box = items[0]
    assert box["value"] == {
        "x": 25.0,
        "y": 20.0,
        "width": 25.0,
        "height": 20.0,
        "rotation": 0,
        **{"rectanglelabels": ["cat"]},
    }
    assert (box["original_width"], box["original_height"], box["score"]) == (200, 50, 0.8)
    brush = items[1]["value"]
    assert brush["format"] == "rle"
    assert (decode_brush(brush["rle"]).reshape(50, 200, 4)[:, :, 3] > 0).sum() == mask.sum()
    prediction = results.prediction(items, "p@1")
    assert prediction["model_version"] == "p@1" and prediction["score"] == round((0.8 + 0.8 + 0.5) / 3, 4)


def test_a_mask_becomes_one_polygon_per_part() -> None:
    (polygon_tool,) = parse_label_config(CONFIG).tools("polygon")
    mask = np.zeros((40, 80), bool)
    mask[5:15, 10:30] = True
    mask[25:35, 50:70] = True
    items = results.polygons(polygon_tool, "dog", mask, 0.7)
    assert len(items) == 2
    for item in items:
        assert item["type"] == "polygonlabels" and item["value"]["closed"] is True
        assert item["value"]["polygonlabels"] == ["dog"]
        assert all(0 <= c <= 100 for point in item["value"]["points"] for c in point)


# -- task images --------------------------------------------------------------------------------

SOURCE = ImageSource.parse("http://127.0.0.1:8080/", "tok")


@pytest.mark.parametrize(
    ("reference", "url"),
    [
        ("/data/upload/1/cat.png", "http://127.0.0.1:8080/data/upload/1/cat.png"),
        ("http://127.0.0.1:8080/data/x.png?y=1", "http://127.0.0.1:8080/data/x.png?y=1"),
        ("HTTP://127.0.0.1:8080/a.png", "HTTP://127.0.0.1:8080/a.png"),
    ],
)
def test_label_studio_paths_and_urls_on_its_host_are_fetched(reference: str, url: str) -> None:
    assert resolve(reference, SOURCE) == url


@pytest.mark.parametrize(
    "reference",
    [
        "http://169.254.169.254/latest/meta-data",
        "https://127.0.0.1:8080/a.png",  # another scheme is another origin
        "http://127.0.0.1:8081/a.png",
        "http://127.0.0.1:8080@evil.example.com/a.png",
        "//evil.example.com/a.png",
        "s3://bucket/a.png",
        "file:///etc/passwd",
        "gopher://127.0.0.1:8080/",
        "",
    ],
)
def test_other_hosts_and_schemes_are_refused(reference: str) -> None:
    with pytest.raises(ImageRefused):
        resolve(reference, SOURCE)


def test_without_a_label_studio_url_nothing_is_fetched() -> None:
    with pytest.raises(ImageRefused, match="TUNNELVISION_LABEL_STUDIO_URL"):
        resolve("/data/upload/1/cat.png", None)


def _fetch(handler: httpx.MockTransport, max_bytes: int = 1000) -> bytes:
    url = "http://127.0.0.1:8080/data/a.png"
    return asyncio.run(fetch_image(url, SOURCE, max_bytes, 5.0, transport=handler))


def test_the_token_goes_to_label_studio_and_redirects_stay_on_its_host() -> None:
    seen: list[tuple[str, str | None]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append((str(request.url), request.headers.get("authorization")))
        if request.url.path == "/data/a.png":
            return httpx.Response(302, headers={"location": "/data/b.png"})
        if request.url.path == "/data/b.png":
            return httpx.Response(302, headers={"location": "http://evil.example.com/c.png"})
        return httpx.Response(200, content=b"never")

    with pytest.raises(ImageRefused, match=r"evil\.example\.com"):
        _fetch(httpx.MockTransport(handler))
    assert seen == [
        ("http://127.0.0.1:8080/data/a.png", "Token tok"),
        ("http://127.0.0.1:8080/data/b.png", "Token tok"),
    ]


def test_an_image_over_the_size_limit_is_cut_off_while_streaming() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(2):
            yield b"x" * 600

    def endless(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=chunks())  # streamed, no Content-Length

    with pytest.raises(PayloadTooLarge):
        _fetch(httpx.MockTransport(endless))
    assert _fetch(httpx.MockTransport(lambda r: httpx.Response(200, content=b"png!"))) == b"png!"


def test_an_error_status_names_the_token_for_401() -> None:
    with pytest.raises(ImageFetchFailed, match=r"401.*token"):
        _fetch(httpx.MockTransport(lambda r: httpx.Response(401)))


def test_remembered_entries_are_bounded() -> None:
    memory: BoundedMap[int] = BoundedMap(3)
    for i in range(10):
        memory.put(i, i)
        memory.get(0)  # keeps 0 the most recently used
    assert len(memory) == 3 and memory.get(0) == 0 and memory.get(9) == 9 and memory.get(5) is None


def test_a_configured_label_studio_url_is_the_only_image_source() -> None:
    from support import make_settings
    from tunnelvision.api.routes.label_studio import image_source

    pinned = make_settings(label_studio_url="http://ls.internal:8080", label_studio_api_key="")
    source = image_source(pinned, "http://169.254.169.254", "from-setup")
    assert source == ImageSource("http://ls.internal:8080", "from-setup")  # the setup's host ignored
    keyed = make_settings(label_studio_url="http://ls.internal:8080/", label_studio_api_key="from-settings")
    assert image_source(keyed, None, "from-setup") == ImageSource("http://ls.internal:8080", "from-settings")
    # Without the setting, nothing: /setup's hostname is the caller's word (request forgery).
    assert image_source(make_settings(), "http://127.0.0.1:8080", "t") is None
    assert image_source(make_settings(), None, None) is None
