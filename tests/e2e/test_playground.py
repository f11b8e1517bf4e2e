"""The playground page in headless Chromium, against `tunnelvision serve` with tiny random models
(Grounded-SAM, SAM alone, OWLv2 alone and a SAM 2 video tracker): the pipeline picker and what each
pipeline's abilities enable, text detection, click-to-segment whose later clicks reuse the cached
image embedding, a dragged box, exemplars, mask opacity, the JSON, COCO and PNG downloads, and a
clip tracked live whose overlay plays from the page with its objects listed."""

from __future__ import annotations

import io
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from pycocotools import mask as coco_mask

from support import cli_server, image_bytes
from tunnelvision.models.random_families import write_random_family
from tunnelvision.video.synthetic import write_moving_square_clip

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (scripts/test installs them when run as root)",
)
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"
WIDTH, HEIGHT = 320, 240
PIPELINES = ["grounded-sam", "sam", "owl"]  # the image picker's; the video picker has "track"
STEPS_WITHOUT_ENCODER = {"decode", "prepare", "queue", "device", "finish", "total"}


def csp_violations(driver: Any) -> list[str]:
    """Console messages about the Content-Security-Policy since the last call (the log drains)."""
    entries = driver.get_log("browser")
    return [e["message"] for e in entries if "Content Security Policy" in e["message"]]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        "--window-size=1280,900",
        # No internet: names other than 127.0.0.1 do not resolve, and whatever is not loopback goes
        # to a proxy that is not there (the pages must work from this server's files alone).
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=127.0.0.1:9",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations are logged here
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or ""), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def url(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """grounded-sam (the default: text, boxes, points, masks), sam (boxes, points, masks) and owl
    (text and exemplars, no masks): the picker has a choice, and each choice enables other tools;
    track (a video tracker: boxes and points through clips) is the video picker's."""
    detector, segmenter = tiny_models
    owl = write_random_family(tmp_path_factory.mktemp("owl") / "owlv2", "owlv2", "tiny", seed=1)
    tracker = write_random_family(
        tmp_path_factory.mktemp("track") / "sam2-video", "sam2-video", "tiny", seed=1
    )
    pipelines = [
        "--pipeline",
        f"sam={segmenter}",
        "--pipeline",
        f"owl={owl}",
        "--pipeline",
        f"track={tracker}",
    ]
    with cli_server(detector, segmenter, *pipelines, "--no-warmup") as (server_url, _):
        yield server_url


@pytest.fixture
def picture(tmp_path: Path) -> Path:
    path = tmp_path / "scene.png"
    path.write_bytes(image_bytes(WIDTH, HEIGHT, seed=4))
    return path


# -- driving the page ------------------------------------------------------------------------


def open_page(driver: Any, url: str, picture: Path) -> None:
    """The page, its pipelines listed, `picture` chosen in its file input."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url + "/")
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#model option"))
    driver.execute_script("document.getElementById('file').hidden = false")
    driver.find_element(By.ID, "file").send_keys(str(picture))
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "savePng").is_enabled())


def choose(driver: Any, pipeline: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element(By.ID, "model")).select_by_value(pipeline)


def slide(driver: Any, element_id: str, value: float) -> None:
    driver.execute_script(
        "const s = document.getElementById(arguments[0]); s.value = arguments[1];"
        "s.dispatchEvent(new Event('input'));",
        element_id,
        str(value),
    )


def open_thresholds(driver: Any) -> None:
    """Random weights score too low for the default thresholds."""
    slide(driver, "box", 0)
    slide(driver, "text", 0)


def calls(driver: Any) -> int:
    from selenium.webdriver.common.by import By

    return int(driver.find_element(By.ID, "status").get_attribute("data-calls") or 0)


def answered(driver: Any, before: int) -> str:
    """Waits for the request started after `before` answers; its status line."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 60).until(lambda d: calls(d) > before)
    status: str = driver.find_element(By.ID, "status").text
    return status


def press(driver: Any, button: str) -> str:
    from selenium.webdriver.common.by import By

    before = calls(driver)
    driver.find_element(By.ID, button).click()
    return answered(driver, before)


def pick_tool(driver: Any, tool: str) -> None:
    from selenium.webdriver.common.by import By

    driver.find_element(By.CSS_SELECTOR, f"input[name=tool][value={tool}]").click()


def on_image(driver: Any, x: int, y: int) -> tuple[float, float]:
    """The viewport point at the middle of image pixel (x, y): the canvas shows the image at its size."""
    left, top = driver.execute_script(
        "const c = document.getElementById('canvas'); c.scrollIntoView({block: 'center'});"
        "const r = c.getBoundingClientRect(); return [r.left, r.top];"
    )
    return left + x + 0.5, top + y + 0.5


def mouse(driver: Any, event: str, at: tuple[float, float], held: bool) -> None:
    """A trusted mouse event, as a user's hand makes it (through Chromium's DevTools protocol)."""
    button = "none" if event == "mouseMoved" else "left"
    fields = {"type": event, "x": at[0], "y": at[1], "button": button, "buttons": int(held), "clickCount": 1}
    driver.execute_cdp_cmd("Input.dispatchMouseEvent", fields)


def click_image(driver: Any, x: int, y: int) -> str:
    before = calls(driver)
    at = on_image(driver, x, y)
    mouse(driver, "mouseMoved", at, held=False)
    mouse(driver, "mousePressed", at, held=True)
    mouse(driver, "mouseReleased", at, held=False)
    return answered(driver, before)


def drag_on_image(driver: Any, start: tuple[int, int], end: tuple[int, int]) -> str:
    before = calls(driver)
    (x0, y0), (x1, y1) = on_image(driver, *start), on_image(driver, *end)
    mouse(driver, "mouseMoved", (x0, y0), held=False)
    mouse(driver, "mousePressed", (x0, y0), held=True)
    mouse(driver, "mouseMoved", ((x0 + x1) / 2, (y0 + y1) / 2), held=True)
    mouse(driver, "mouseMoved", (x1, y1), held=True)
    mouse(driver, "mouseReleased", (x1, y1), held=False)
    return answered(driver, before)


def sent(driver: Any) -> tuple[str, dict[str, Any]]:
    """The page's account of its last request: the route, and the fields it sent."""
    from selenium.webdriver.common.by import By

    first, _, fields = driver.find_element(By.ID, "request").text.partition("\n")
    return first, json.loads(fields)


def listed(driver: Any) -> list[str]:
    from selenium.webdriver.common.by import By

    return [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#list li.detection")]


def canvas_png(driver: Any) -> str:
    data: str = driver.execute_script("return document.getElementById('canvas').toDataURL()")
    return data


def download(driver: Any, button: str, folder: Path, name: str) -> Path:
    """Clicks a download button; the file Chromium saved into `folder`."""
    from selenium.webdriver.common.by import By

    driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(folder)})
    driver.find_element(By.ID, button).click()
    path = folder / name
    for _ in range(100):
        if path.exists() and not list(folder.glob("*.crdownload")):
            return path
        time.sleep(0.1)
    raise AssertionError(f"no {name} in {folder}: {sorted(p.name for p in folder.iterdir())}")


def embedding_cache(url: str) -> tuple[float, float]:
    """(hits, misses) of the segmenters' image-embedding cache, from /metrics."""
    counts = {}
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=10).text):
        for sample in family.samples:
            if sample.name.startswith("tunnelvision_cache_") and sample.labels.get("cache") == "embeddings":
                counts[sample.name] = sample.value
    return counts["tunnelvision_cache_hits_total"], counts["tunnelvision_cache_misses_total"]


# -- the tests -------------------------------------------------------------------------------


def test_the_picker_lists_the_pipelines_and_their_abilities_enable_the_tools(
    browser: Any, url: str, picture: Path
) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    open_page(driver, url, picture)
    served = [p["name"] for p in httpx.get(f"{url}/v1/models", timeout=10).json()["pipelines"]]
    options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#model option")]
    assert served == [*PIPELINES, "track"] and options == PIPELINES  # images: no video-only pipeline
    assert driver.find_element(By.ID, "model").get_attribute("value") == "grounded-sam"  # the default

    def enabled() -> set[str]:
        tools = driver.find_elements(By.CSS_SELECTOR, "input[name=tool]")
        controls = [driver.find_element(By.ID, i) for i in ("prompt", "detect", "segment", "annotate")]
        return {t.get_attribute("value") for t in tools if t.is_enabled()} | {
            c.get_attribute("id") for c in controls if c.is_enabled()
        }

    assert enabled() == {"positive", "negative", "box", "prompt", "detect", "segment", "annotate"}
    choose(driver, "sam")  # no text: points and boxes only
    assert enabled() == {"positive", "negative", "box", "segment", "annotate"}
    choose(driver, "owl")  # a detector that takes exemplars, and makes no masks
    assert enabled() == {"exemplar", "counter", "prompt", "detect"}
    assert driver.find_element(By.CSS_SELECTOR, "input[name=tool][value=exemplar]").is_selected()


def test_detect_then_each_click_segments_from_the_cached_embedding(
    browser: Any, url: str, picture: Path, tmp_path: Path
) -> None:
    driver = browser
    open_page(driver, url, picture)
    open_thresholds(driver)
    status = press(driver, "detect")
    assert "detection(s)" in status, status
    route, fields = sent(driver)
    assert route == "POST v1/detect" and fields["image"] == "<file scene.png>"
    assert fields["prompt"] == "cat . dog" and fields["model"] == "grounded-sam"
    assert listed(driver) and all(text.split()[0] in ("cat", "dog") for text in listed(driver))
    hits, misses = embedding_cache(url)

    # First click: the image goes by its id; the segmenter encodes it once (detect did not).
    status = click_image(driver, 100, 80)
    route, fields = sent(driver)
    assert route == "POST v1/segment" and "image" not in fields and len(fields["image_id"]) == 32
    assert fields["points"] == [[100, 80, 1]], fields
    assert embedding_cache(url) == (hits, misses + 1)
    assert " encode " in status, status  # the answer's timings show the encoder pass
    assert listed(driver) == [listed(driver)[0]] and listed(driver)[0].startswith("object mask ")

    # Second click, a background point: the same id, the embedding from the cache.
    pick_tool(driver, "negative")
    status = click_image(driver, 250, 200)
    route, fields = sent(driver)
    assert fields["points"] == [[100, 80, 1], [250, 200, 0]] and "image_id" in fields
    assert embedding_cache(url) == (hits + 1, misses + 1)
    answer = json.loads(download(driver, "saveJson", tmp_path, "scene.json").read_text())
    assert answer["image_id"] == fields["image_id"] and answer["mask_format"] == "rle"
    assert len(answer["detections"]) == 1 and answer["detections"][0]["mask"]["size"] == [HEIGHT, WIDTH]
    # No encoder pass in the timings (the engine reports no `encode` step on a cache hit).
    assert set(answer["timings_ms"]) == STEPS_WITHOUT_ENCODER and "encode" not in status
    assert "timings (ms): " in status and " device " in status


def test_a_dragged_box_its_overlay_opacity_and_the_downloads(
    browser: Any, url: str, picture: Path, tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    csp_violations(driver)  # start from an empty log
    open_page(driver, url, picture)
    choose(driver, "sam")
    pick_tool(driver, "box")
    status = drag_on_image(driver, (40, 30), (200, 150))
    assert "1 detection(s)" in status, status
    route, fields = sent(driver)
    assert route == "POST v1/segment" and fields["boxes"] == [[40, 30, 200, 150]] and fields["model"] == "sam"

    slide(driver, "opacity", 0)
    clear = canvas_png(driver)
    slide(driver, "opacity", 0.5)
    half = canvas_png(driver)
    slide(driver, "opacity", 1)
    assert len({clear, half, canvas_png(driver)}) == 3  # the slider redraws the masks

    answer = json.loads(download(driver, "saveJson", tmp_path, "scene.json").read_text())
    (detection,) = answer["detections"]
    rle = {"size": detection["mask"]["size"], "counts": detection["mask"]["counts"].encode()}
    mask = coco_mask.decode(rle).astype(bool)
    assert mask.any()

    coco = json.loads(download(driver, "saveCoco", tmp_path, "scene.coco.json").read_text())
    assert coco["images"] == [{"id": 1, "file_name": "scene.png", "width": WIDTH, "height": HEIGHT}]
    assert coco["categories"] == [{"id": 1, "name": "object", "supercategory": "object"}]
    (annotation,) = coco["annotations"]
    x1, y1, x2, y2 = detection["box"]
    assert annotation["segmentation"] == detection["mask"]
    assert annotation["area"] == int(coco_mask.area(rle)) == mask.sum()  # the page's RLE decoding
    assert annotation["bbox"] == pytest.approx([x1, y1, x2 - x1, y2 - y1])
    assert (annotation["image_id"], annotation["category_id"], annotation["iscrowd"]) == (1, 1, 0)

    # The overlay at opacity 1: the mask in one colour, the rest of the picture as it was (away
    # from the outline of the answer's box); the dragged box is not in it.
    overlay = np.asarray(
        Image.open(download(driver, "savePng", tmp_path, "scene.overlay.png")).convert("RGB")
    )
    original = np.asarray(Image.open(io.BytesIO(picture.read_bytes())).convert("RGB"))
    assert overlay.shape == original.shape == (HEIGHT, WIDTH, 3)
    assert len(np.unique(overlay[mask], axis=0)) == 1
    untouched = ~mask & ~outline(detection["box"], 3)
    assert (overlay[untouched] == original[untouched]).all()
    assert driver.find_element(By.ID, "saveCoco").is_enabled()
    assert csp_violations(driver) == []  # blob: downloads and canvas exports included


def outline(box: list[float], width: int) -> np.ndarray:
    """Pixels within `width` of the box's edges."""
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    x1, y1, x2, y2 = box
    outer = (xs >= x1 - width) & (xs <= x2 + width) & (ys >= y1 - width) & (ys <= y2 + width)
    inner = (xs > x1 + width) & (xs < x2 - width) & (ys > y1 + width) & (ys < y2 - width)
    return np.asarray(outer & ~inner)


def test_exemplar_boxes_on_a_pipeline_that_takes_them(browser: Any, url: str, picture: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    open_page(driver, url, picture)
    choose(driver, "owl")
    open_thresholds(driver)
    driver.find_element(By.ID, "prompt").clear()
    status = drag_on_image(driver, (20, 20), (120, 100))  # "more like this": the first tool owl takes
    assert "detection(s)" in status, status
    route, fields = sent(driver)
    assert route == "POST v1/detect" and fields["exemplars"] == [[20, 20, 120, 100, 1]]
    assert "prompt" not in fields and fields["model"] == "owl"
    assert listed(driver)
    pick_tool(driver, "counter")
    drag_on_image(driver, (150, 120), (300, 230))
    _, fields = sent(driver)
    assert fields["exemplars"] == [[20, 20, 120, 100, 1], [150, 120, 300, 230, 0]] and "image_id" in fields


def test_text_segment_annotate_and_the_key_kept_for_the_tab(browser: Any, url: str, picture: Path) -> None:
    from selenium.webdriver.common.by import By

    driver = browser
    csp_violations(driver)  # start from an empty log
    open_page(driver, url, picture)
    before = canvas_png(driver)
    open_thresholds(driver)
    prompt = driver.find_element(By.ID, "prompt")
    prompt.clear()
    prompt.send_keys("cat . dog")
    driver.find_element(By.ID, "key").send_keys("tv_kept_for_the_tab")
    status = press(driver, "segment")
    assert "detection(s)" in status, status
    items = listed(driver)
    assert items and all(text.split()[0] in ("cat", "dog") and " mask " in text for text in items)
    assert '"detections"' in driver.find_element(By.ID, "json").text
    assert canvas_png(driver) != before  # masks and boxes were drawn
    size = driver.execute_script("const c = document.getElementById('canvas'); return [c.width, c.height]")
    assert size == [WIDTH, HEIGHT]
    ARTIFACTS.mkdir(exist_ok=True)
    driver.execute_script("window.scrollTo(0, 0)")
    driver.save_screenshot(str(ARTIFACTS / "playground.png"))

    segmented = canvas_png(driver)
    status = press(driver, "annotate")
    assert status.startswith("annotated: ") and status.split()[1].isdigit(), status
    route, fields = sent(driver)
    assert route == "POST v1/annotate" and "image_id" in fields
    assert canvas_png(driver) != segmented  # the server's picture now
    assert not driver.find_element(By.ID, "saveJson").is_enabled()  # an annotate answer is a picture

    driver.refresh()
    time.sleep(0.2)
    assert driver.find_element(By.ID, "key").get_attribute("value") == "tv_kept_for_the_tab"
    assert csp_violations(driver) == []  # its script, style, fetch, blob: and data: images


CLIP_FRAMES, CLIP_WIDTH, CLIP_HEIGHT = 12, 96, 64


def test_a_clip_tracked_live_its_overlay_played_and_its_objects_listed(
    browser: Any, url: str, tmp_path: Path
) -> None:
    import av
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    clip = tmp_path / "square.mp4"
    write_moving_square_clip(clip, CLIP_FRAMES, CLIP_WIDTH, CLIP_HEIGHT, fps=10)
    csp_violations(driver)  # start from an empty log
    driver.get(url + "/")
    WebDriverWait(driver, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#videoModel option"))
    options = [o.get_attribute("value") for o in driver.find_elements(By.CSS_SELECTOR, "#videoModel option")]
    assert options == ["track"]
    assert not driver.find_element(By.ID, "videoPrompt").is_enabled()  # sam2-video takes no text
    assert driver.find_element(By.ID, "videoBoxes").is_enabled()
    assert not driver.find_element(By.ID, "track").is_enabled()  # no clip yet

    driver.execute_script("document.getElementById('videoFile').hidden = false")
    driver.find_element(By.ID, "videoFile").send_keys(str(clip))
    driver.find_element(By.ID, "videoBoxes").send_keys("[[0, 20, 20, 40]]")
    driver.find_element(By.ID, "track").click()
    WebDriverWait(driver, 60).until(
        lambda d: d.find_element(By.ID, "videoStatus").get_attribute("data-finished") == "1"
    )
    status = driver.find_element(By.ID, "videoStatus").text
    assert status == f"done: {CLIP_FRAMES} frame(s), 1 object(s) · {CLIP_FRAMES} frame event(s) received live"
    assert driver.execute_script("return document.getElementById('videoProgress').value") == 1
    rows = [
        [cell.text for cell in row.find_elements(By.TAG_NAME, "td")]
        for row in driver.find_elements(By.CSS_SELECTOR, "#objects tbody tr")
    ]
    assert rows == [["1", "object", "0", str(CLIP_FRAMES - 1), str(CLIP_FRAMES)]]

    # The overlay plays in the page, from a blob: URL (the request for it carried the key).
    source = driver.execute_script("return document.getElementById('overlay').src")
    assert source.startswith("blob:")
    WebDriverWait(driver, 15).until(
        lambda d: d.execute_script(
            "const v = document.getElementById('overlay'); return v.readyState >= 2 || v.error"
        )
    )
    size = driver.execute_script(
        "const v = document.getElementById('overlay'); return [v.videoWidth, v.videoHeight]"
    )
    assert size == [CLIP_WIDTH, CLIP_HEIGHT]
    assert driver.execute_script("return document.getElementById('overlay').duration") == pytest.approx(
        1.2, abs=0.15
    )

    saved = download(driver, "saveMp4", tmp_path, "square.overlay.mp4")
    with av.open(str(saved), "r") as container:
        assert len(list(container.decode(video=0))) == CLIP_FRAMES
    result = json.loads(download(driver, "saveVideoJson", tmp_path, "square.video.json").read_text())
    assert [f["frame"] for f in result["frames"]] == list(range(CLIP_FRAMES))
    assert csp_violations(driver) == []  # the event stream by fetch, the blob: video


# ReDoc always renders Redocly's logo from its CDN; the policy refuses it and ReDoc hides the image.
REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def test_the_docs_render_offline_under_their_policy_and_a_violation_would_show(
    browser: Any, url: str
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver = browser
    csp_violations(driver)  # start from an empty log
    driver.get(url + "/docs")
    WebDriverWait(driver, 15).until(lambda d: d.find_elements(By.CSS_SELECTOR, ".opblock"))
    paths = {e.text for e in driver.find_elements(By.CSS_SELECTOR, ".opblock-summary-path")}
    assert {"/v1/segment", "/v1/detect", "/healthz"} <= paths
    assert csp_violations(driver) == []
    driver.get(url + "/redoc")
    WebDriverWait(driver, 15).until(lambda d: "/v1/segment" in d.find_element(By.TAG_NAME, "body").text)
    assert all(REDOCLY_LOGO in message for message in csp_violations(driver))
    driver.get(url + "/")
    assert csp_violations(driver) == []
    # The same check catches a page that breaks its policy: an injected inline script is refused.
    driver.execute_script(
        "const s = document.createElement('script'); s.textContent = 'window.injected = 1';"
        "document.body.appendChild(s);"
    )
    assert driver.execute_script("return window.injected === undefined")
    WebDriverWait(driver, 5).until(lambda d: bool(csp_violations(d)))


def test_errors_are_shown_not_swallowed_and_the_buttons_work_from_the_keyboard(
    browser: Any, url: str, picture: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    driver = browser
    open_page(driver, url, picture)
    driver.find_element(By.ID, "prompt").clear()
    before = calls(driver)
    driver.find_element(By.ID, "prompt").send_keys(Keys.TAB)  # to the first tool, then onwards
    for _ in range(40):
        if driver.switch_to.active_element.get_attribute("id") == "segment":
            break
        driver.switch_to.active_element.send_keys(Keys.TAB)
    assert driver.switch_to.active_element.get_attribute("id") == "segment"
    driver.switch_to.active_element.send_keys(Keys.ENTER)
    status = answered(driver, before)
    assert status.startswith("422: ") and "nothing to segment" in status, status
    assert '"error"' in driver.find_element(By.ID, "json").text
