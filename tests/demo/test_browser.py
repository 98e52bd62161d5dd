"""End to end: the running demo driven by headless Chromium (Selenium + the distribution's chromedriver).

The app is launched on a free 127.0.0.1 port in this process; the browser loads the page, and in every tab clicks
the first example, clicks Run and waits for the outputs: both answers (or images), the heatmaps, the timing line and
``h.stats``. A screenshot of each tab is saved under the test's temporary folder. Skipped, saying why, where
Chromium, its driver, Selenium or Gradio is missing (CI installs them with apt-get and the [test] extra).
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

pytestmark = pytest.mark.slow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
DRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--disable-dev-shm-usage", "--window-size=1400,2200")
RUN_TIMEOUT = 300

if not (os.path.exists(CHROMIUM) and os.path.exists(DRIVER)):
    pytest.skip(f"headless Chromium and its driver are needed ({CHROMIUM}, {DRIVER}; Debian: apt-get install "
                "chromium chromium-driver)", allow_module_level=True)
pytest.importorskip("selenium", reason="the browser test drives Chromium with selenium (pip install selenium)")
pytest.importorskip("gradio", reason="the demo needs gradio (the [demo] / [test] extra)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.common.exceptions import StaleElementReferenceException  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

# tab label, element id prefix, example row, a key of h.stats the run must show, images the gallery must show
RUNS = [("VLM", "vlm", 0, "passes", 2), ("VLM", "vlm", 1, "kept", 3), ("LLM", "llm", 0, "biased_calls", 0),
        ("Diffusion", "diffusion", 0, "heads_touched", 1), ("Diffusion", "diffusion", 1, "grounds", 2),
        ("Merge", "merge", 0, "pi_v", 0)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url():
    from demo import app

    blocks = app.build_app()
    options = app.launch_options(app.parse_args(["--port", str(free_port())]))
    assert options["server_name"] == "127.0.0.1" and options["share"] is False
    blocks.queue().launch(prevent_thread_lock=True, quiet=True, **app.supported(options))
    try:
        yield f"http://127.0.0.1:{options['server_port']}/"
    finally:
        blocks.close()


@pytest.fixture
def browser(tmp_path):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path / 'chromium-profile'}")
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    driver.set_page_load_timeout(120)
    try:
        yield driver
    finally:
        driver.quit()


def text_of(driver, selector: str) -> str:
    elements = driver.find_elements(By.CSS_SELECTOR, selector)
    return " ".join(e.get_attribute("value") or e.text for e in elements)


def test_every_tab_runs_an_example_in_the_browser(url, browser, tmp_path):
    shots = tmp_path / "screenshots"
    shots.mkdir()
    browser.get(url)
    wait = WebDriverWait(browser, 120)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "button[role=tab]")) >= 4)
    assert "built-in tiny model (random weights)" in browser.find_element(By.TAG_NAME, "body").text
    browser.save_screenshot(str(shots / "0-loaded.png"))
    progress = set()  # the progress bar's texts seen while the runs ran
    for index, (label, prefix, row, stat, pictures) in enumerate(RUNS, 1):
        tab = next(e for e in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if e.text.strip() == label)
        tab.click()
        example = wait.until(lambda d: d.find_element(
            By.CSS_SELECTOR, f"#{prefix}-examples td[data-testid='dataset-cell-{row}-0']"))
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", example)
        example.click()
        run = browser.find_element(By.CSS_SELECTOR, f"#{prefix}-run")
        browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", run)
        if index == 1:  # a longer first run, so that the progress bar is seen for certain
            tokens = browser.find_element(By.CSS_SELECTOR, "#vlm-tokens input[type=number]")
            tokens.send_keys(Keys.CONTROL, "a")
            tokens.send_keys("32", Keys.TAB)
        stats_before = text_of(browser, f"#{prefix}-stats")
        run.click()

        def finished(d):
            try:
                progress.update(e.text for e in d.find_elements(By.CSS_SELECTOR, ".progress-level-inner"))
            except StaleElementReferenceException:
                pass
            stats = text_of(d, f"#{prefix}-stats")
            return (stat in stats and stats != stats_before and "method" in text_of(d, f"#{prefix}-timing")
                    or text_of(d, ".toast-body"))

        try:
            WebDriverWait(browser, RUN_TIMEOUT, poll_frequency=0.1,
                          ignored_exceptions=(StaleElementReferenceException,)).until(finished)
        finally:
            browser.save_screenshot(str(shots / f"{index}-{prefix}-{row}.png"))
        errors = text_of(browser, ".toast-body")
        assert not errors, errors
        if prefix != "diffusion":  # answers in text, plain and method side by side
            assert text_of(browser, f"#{prefix}-plain textarea").strip(), f"{label}: no plain answer"
            assert text_of(browser, f"#{prefix}-method textarea").strip(), f"{label}: no method answer"
        if prefix == "vlm":  # the plain attention heatmap; CARVE's saliency
            assert browser.find_elements(By.CSS_SELECTOR, "#vlm-plain-heat img")
            assert bool(browser.find_elements(By.CSS_SELECTOR, "#vlm-method-heat img")) == (row == 0)
        if prefix == "diffusion":  # the two images (or the input and RefAM's heatmap)
            for side in ("plain", "method"):
                assert browser.find_elements(By.CSS_SELECTOR, f"#diffusion-{side} img"), f"{label}: no {side} image"
        if pictures:  # CARVE mask + refined image, PyramidDrop's three stages, RefAM mask + overlay
            assert len(browser.find_elements(By.CSS_SELECTOR, f"#{prefix}-gallery img")) >= pictures
        if prefix == "llm":  # the token heatmaps: one highlighted span per prompt character
            for side in ("plain-heat", "method-heat"):
                assert "capital" in "".join(text_of(browser, f"#llm-{side}").split())
        if prefix == "merge":
            assert "lambda_r" in text_of(browser, "#merge-table")
    assert len(list(shots.iterdir())) == len(RUNS) + 1
    assert any(text.startswith(("loading the model", "plain model", "carve")) and "%" in text for text in progress), \
        progress

    # uploads: over the size limit (Gradio refuses the file), over the pixel limit (the tab refuses the image)
    import numpy as np
    from PIL import Image

    noise = np.random.RandomState(0).randint(0, 256, (2200, 2200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "big.png")  # about 14.5 MB: PNG cannot compress noise
    Image.new("RGB", (5000, 4000), (10, 200, 30)).save(tmp_path / "huge.png")  # small file, 20 Mpixels
    assert (tmp_path / "big.png").stat().st_size > 10 * 2 ** 20
    next(e for e in browser.find_elements(By.CSS_SELECTOR, "button[role=tab]") if e.text.strip() == "VLM").click()
    upload = browser.find_element(By.CSS_SELECTOR, "#vlm-image input[type=file]")
    assert upload.get_attribute("accept") == "image/*"
    upload.send_keys(str(tmp_path / "big.png"))
    WebDriverWait(browser, 60).until(lambda d: "exceed the maximum allowed size" in text_of(d, ".toast-body"))
    browser.save_screenshot(str(shots / "upload-too-large.png"))
    browser.refresh()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#vlm-image input[type=file]"))
    browser.find_element(By.CSS_SELECTOR, "#vlm-image input[type=file]").send_keys(str(tmp_path / "huge.png"))
    WebDriverWait(browser, 60).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#vlm-image img"))
    browser.find_element(By.CSS_SELECTOR, "#vlm-run").click()
    WebDriverWait(browser, 120).until(lambda d: "accepts up to" in text_of(d, ".toast-body"))
    assert "resize it first" in text_of(browser, ".toast-body")
    browser.save_screenshot(str(shots / "upload-too-many-pixels.png"))
