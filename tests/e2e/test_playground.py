"""The playground page in headless Chromium: upload an image, run, see the overlay and detections."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from support import cli_server, image_bytes

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (scripts/test installs them when run as root)",
)
ARTIFACTS = Path(__file__).resolve().parents[2] / "artifacts"


def csp_violations(driver: object) -> list[str]:
    """Console messages about the Content-Security-Policy since the last call (the log drains)."""
    entries = driver.get_log("browser")  # type: ignore[attr-defined]
    return [e["message"] for e in entries if "Content Security Policy" in e["message"]]


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
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
        # to a proxy that is not there (the docs must render from this server's files alone).
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        "--proxy-server=127.0.0.1:9",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # CSP violations are logged here
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER or ""), options=options)
    yield driver
    driver.quit()


def test_upload_run_and_see_the_overlay(
    browser: object, tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    driver: WebDriver = browser  # type: ignore[assignment]
    picture = tmp_path / "scene.png"
    picture.write_bytes(image_bytes(200, 150, seed=4))
    with cli_server(*tiny_models, "--no-warmup") as (url, _):
        driver.get(url + "/")
        assert "tunnelvision playground" in driver.title
        driver.execute_script("document.getElementById('file').hidden = false")
        driver.find_element(By.ID, "file").send_keys(str(picture))
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "run").is_enabled())
        before = driver.execute_script("return document.getElementById('canvas').toDataURL()")
        driver.execute_script(
            "const s = document.getElementById('box'); s.value = '0';s.dispatchEvent(new Event('input'));"
        )
        prompt = driver.find_element(By.ID, "prompt")
        prompt.clear()
        prompt.send_keys("cat . dog")
        driver.find_element(By.ID, "key").send_keys("tv_kept_for_the_tab")
        driver.find_element(By.ID, "run").click()
        WebDriverWait(driver, 30).until(lambda d: "detection(s)" in d.find_element(By.ID, "status").text)
        items = [li.text for li in driver.find_elements(By.CSS_SELECTOR, "#list li.detection")]
        assert items and all(text.split()[0] in ("cat", "dog") for text in items)
        assert '"detections"' in driver.find_element(By.ID, "json").text
        after = driver.execute_script("return document.getElementById('canvas').toDataURL()")
        assert after != before  # masks and boxes were drawn
        size = driver.execute_script(
            "const c = document.getElementById('canvas'); return [c.width, c.height]"
        )
        assert size == [200, 150]
        ARTIFACTS.mkdir(exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "playground.png"))
        driver.refresh()
        time.sleep(0.2)
        assert driver.find_element(By.ID, "key").get_attribute("value") == "tv_kept_for_the_tab"
        assert csp_violations(driver) == []  # its script, style, fetch, blob: and data: images


# ReDoc always renders Redocly's logo from its CDN; the policy refuses it and ReDoc hides the image.
REDOCLY_LOGO = "https://cdn.redoc.ly/redoc/logo-mini.svg"


def test_the_docs_render_offline_under_their_policy_and_a_violation_would_show(
    browser: object, tiny_models: tuple[Path, Path]
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    driver: WebDriver = browser  # type: ignore[assignment]
    with cli_server(*tiny_models, "--no-warmup") as (url, _):
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


def test_errors_are_shown_not_swallowed(
    browser: object, tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.support.ui import WebDriverWait

    driver: WebDriver = browser  # type: ignore[assignment]
    picture = tmp_path / "scene.png"
    picture.write_bytes(image_bytes(64, 48))
    with cli_server(*tiny_models, "--no-warmup") as (url, _):
        driver.get(url + "/")
        driver.execute_script("document.getElementById('file').hidden = false")
        driver.find_element(By.ID, "file").send_keys(str(picture))
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "run").is_enabled())
        driver.find_element(By.ID, "prompt").clear()
        driver.find_element(By.ID, "run").click()
        WebDriverWait(driver, 30).until(lambda d: "422" in d.find_element(By.ID, "status").text)
        assert "nothing to segment" in driver.find_element(By.ID, "status").text
