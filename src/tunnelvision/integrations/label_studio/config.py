"""A project's labeling config (Label Studio's XML) -> the labeling tools we can fill in.

The XML comes from whoever holds a key, so it is parsed with expat directly: a document type
declaration is refused outright (no entity can be declared, so none can expand: no "billion
laughs", no external entities), and its size, depth and number of elements are capped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal
from xml.parsers import expat

from tunnelvision.errors import InvalidInput, MalformedInput
from tunnelvision.schemas import normalize_prompt

MAX_CONFIG_CHARS = 256 * 1024  # Label Studio's own templates are a few kilobytes
MAX_ELEMENTS = 10_000
MAX_DEPTH = 64
MAX_LABELS = 1000  # labels over all tools; the prompt is sent in chunks the engine takes

Tool = Literal["rectangle", "brush", "polygon", "keypoint"]
TOOL_TAGS: dict[str, Tool] = {
    "rectanglelabels": "rectangle",
    "brushlabels": "brush",
    "polygonlabels": "polygon",
    "keypointlabels": "keypoint",
}
PRE_ANNOTATED: tuple[Tool, ...] = ("rectangle", "brush", "polygon")  # keypoints only prompt SAM


class MalformedLabelConfig(MalformedInput):
    """The labeling config is not well-formed XML, or is XML we refuse to read (a DTD)."""

    code = "malformed_label_config"


class InvalidLabelConfig(InvalidInput):
    """Well-formed XML that is no labeling config we can fill in."""

    code = "invalid_label_config"


@dataclass(frozen=True)
class Element:
    tag: str  # lowercased: Label Studio's tag names are not case-sensitive
    attrs: dict[str, str]
    children: list[Element]


@dataclass(frozen=True)
class Control:
    """One labeling tool on an image: `<RectangleLabels name=.. toName=..><Label value=..>`."""

    tool: Tool
    from_name: str
    to_name: str
    image_key: str  # the task's data field that holds the image's URL
    labels: tuple[str, ...]

    @property
    def result_type(self) -> str:
        """What Label Studio calls this tool's results, e.g. 'rectanglelabels'."""
        return f"{self.tool}labels"


@dataclass(frozen=True)
class LabelConfig:
    controls: tuple[Control, ...]

    def tools(self, *kinds: Tool) -> list[Control]:
        return [control for control in self.controls if control.tool in kinds]

    @property
    def pre_annotated(self) -> list[Control]:
        return self.tools(*PRE_ANNOTATED)

    def mask_tool(self, to_name: str) -> Control | None:
        """Where a smart tool's mask goes: the brush on that image, else its polygon tool."""
        for tool in ("brush", "polygon"):
            found = [c for c in self.tools(tool) if c.to_name == to_name]
            if found:
                return found[0]
        return None


def parse_label_config(text: str) -> LabelConfig:
    """The tools on images the config defines; MalformedLabelConfig or InvalidLabelConfig."""
    root = parse_xml(text)
    images = {
        e.attrs["name"]: e.attrs.get("value", "")
        for e in _walk(root)
        if e.tag == "image" and e.attrs.get("name")
    }
    controls = tuple(c for e in _walk(root) if (c := _control(e, images)) is not None)
    if not controls:
        raise InvalidLabelConfig(
            "the labeling config has no RectangleLabels, BrushLabels, PolygonLabels or KeyPointLabels "
            "with labels on an <Image>: nothing this model can fill in"
        )
    total = sum(len(c.labels) for c in controls)
    if total > MAX_LABELS:
        raise InvalidLabelConfig(f"the labeling config has {total} labels; at most {MAX_LABELS} are used")
    return LabelConfig(controls)


def _control(element: Element, images: dict[str, str]) -> Control | None:
    tool = TOOL_TAGS.get(element.tag)
    name = element.attrs.get("name", "")
    targets = [t.strip() for t in element.attrs.get("toname", "").split(",")]
    target = next((t for t in targets if t in images), None)
    if tool is None or not name or target is None:
        return None
    labels = tuple(
        dict.fromkeys(v for e in _walk(element) if e.tag == "label" and (v := e.attrs.get("value", "")))
    )
    if not labels:
        return None
    return Control(tool, name, target, images[target].removeprefix("$"), labels)


def _walk(element: Element) -> list[Element]:
    """The element and all below it, in document order (iteratively: depth is capped anyway)."""
    found, stack = [], [element]
    while stack:
        current = stack.pop()
        found.append(current)
        stack.extend(reversed(current.children))
    return found


def parse_xml(text: str) -> Element:
    """Well-formed XML without a DTD into Elements; attribute names lowercased like tags."""
    if len(text) > MAX_CONFIG_CHARS:
        raise MalformedLabelConfig(f"the labeling config is over {MAX_CONFIG_CHARS} characters")
    builder = _Builder()
    parser = expat.ParserCreate()
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd  # unreachable without a DTD; a second lock
    parser.ExternalEntityRefHandler = _refuse_dtd
    parser.StartElementHandler = builder.start
    parser.EndElementHandler = builder.end
    try:
        parser.Parse(text, True)
    except expat.ExpatError as exc:
        raise MalformedLabelConfig(f"the labeling config is not well-formed XML: {exc}") from None
    if builder.root is None:
        raise MalformedLabelConfig("the labeling config is empty")
    return builder.root


def _refuse_dtd(*_: object) -> Any:
    raise MalformedLabelConfig("the labeling config must not have a DOCTYPE or entity declarations")


class _Builder:
    def __init__(self) -> None:
        self.root: Element | None = None
        self.stack: list[Element] = []
        self.count = 0

    def start(self, tag: str, attrs: dict[str, str]) -> None:
        self.count += 1
        if self.count > MAX_ELEMENTS:
            raise MalformedLabelConfig(f"the labeling config has more than {MAX_ELEMENTS} elements")
        if len(self.stack) >= MAX_DEPTH:
            raise MalformedLabelConfig(f"the labeling config is nested deeper than {MAX_DEPTH}")
        element = Element(tag.lower(), {k.lower(): v for k, v in attrs.items()}, [])
        if self.stack:
            self.stack[-1].children.append(element)
        else:
            self.root = element
        self.stack.append(element)

    def end(self, tag: str) -> None:
        self.stack.pop()


def prompt_for(labels: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Each label as the phrase sent to the engine -> the label, e.g. 'Traffic.Light' ->
    'Traffic Light' (a phrase may not hold '.'); labels alike but for case share the first."""
    phrases: dict[str, str] = {}
    folded: set[str] = set()
    for label in labels:
        cleaned = normalize_prompt([" ".join(label.replace(".", " ").split())])
        if cleaned and cleaned[0].casefold() not in folded:
            folded.add(cleaned[0].casefold())
            phrases[cleaned[0]] = label
    return phrases


def label_of(phrase: str | None, phrases: dict[str, str]) -> str | None:
    """The label of a detection's phrase (the engine may answer it in another case)."""
    if phrase is None:
        return None
    return phrases.get(phrase) or next(
        (label for p, label in phrases.items() if p.casefold() == phrase.casefold()), None
    )
