"""The Space in a real browser: Debian's chromium driven by Python Playwright.

Uploads an image, runs classification and localization, reads both results from the page and saves
screenshots (to pytest's tmp folder, and also to $ONER_DEMO_SCREENSHOT_DIR when set, which is how
docs/img/demo.png is made). Never runs `playwright install`: the browser comes from apt
(`apt-get install -y chromium`), so this works offline.
"""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest

from conftest import free_port

REPO = Path(__file__).resolve().parent.parent
SPACE = REPO / "space"
EX = SPACE / "examples"
CHROMIUM = "/usr/bin/chromium"
# Headless flags for a machine with no display, no GPU and no network beyond localhost.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TIMEOUT_MS = 30_000

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent: install Debian's chromium (apt-get install -y chromium)"
)



@pytest.fixture
def served(tiny_model_dir):
    """The app on 127.0.0.1; the model is the tiny test model unless ONER_DEMO_TEST_MODEL names another."""
    sys.path.insert(0, str(SPACE))
    import app
    import oner_demo

    model = os.environ.get("ONER_DEMO_TEST_MODEL") or str(tiny_model_dir)
    oner_demo.activate(oner_demo.load_model(model))
    demo = app.build_demo(model)
    app.launch(demo, "127.0.0.1", free_port(), prevent_thread_lock=True, quiet=True)
    try:
        yield demo.local_url
    finally:
        demo.close()


@pytest.fixture
def page():
    playwright_api = pytest.importorskip("playwright.sync_api")
    with playwright_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(TIMEOUT_MS)
            yield page
        finally:
            browser.close()


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    """Screenshot to tmp_path (always) and to $ONER_DEMO_SCREENSHOT_DIR (when set); fail if empty."""
    path = tmp_path / name
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 10_000, f"screenshot {path} is suspiciously small"
    if os.environ.get("ONER_DEMO_SCREENSHOT_DIR"):
        target = Path(os.environ["ONER_DEMO_SCREENSHOT_DIR"])
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target / name)
    return path


def test_classify_and_localize_in_chromium(served, page, tmp_path):
    page.goto(served)

    # Zero-shot classification: upload, click, read the ranked labels from the Label component.
    page.locator("#classify-image input[type=file]").set_input_files(str(EX / "openmoji_cat_face.png"))
    page.locator("#classify-image img").first.wait_for()  # the upload is shown
    page.get_by_role("button", name="Classify").click()
    result = page.locator("#classify-result")
    result.get_by_text(re.compile(r"\d+%")).first.wait_for()
    text = result.inner_text()
    for label in ("cat face", "dog face", "red apple", "rocket"):
        assert label in text, f"label {label!r} missing from the classification result: {text!r}"
    assert len(re.findall(r"\d+%", text)) == 4, text
    save_screenshot(page, tmp_path, "demo-classify.png")

    # Zero-shot localization: another tab, another upload, a phrase; read the summary and the heatmap.
    page.get_by_role("tab", name="Zero-shot localization").click()
    page.locator("#localize-image input[type=file]").set_input_files(str(EX / "composite_cat_apple_rocket.png"))
    page.locator("#localize-image img").first.wait_for()
    page.locator("#localize-phrase textarea, #localize-phrase input").first.fill("rocket")
    page.get_by_role("button", name="Localize").click()
    summary = page.locator("#localize-summary textarea, #localize-summary input").first
    page.wait_for_function(
        "el => el.value.startsWith('Best patch')", arg=summary.element_handle(), timeout=TIMEOUT_MS
    )
    assert re.match(r"Best patch for 'rocket': row \d+, column \d+ of a \d+x\d+ grid", summary.input_value())
    heatmap = page.locator("#localize-heatmap img").first
    heatmap.wait_for()
    assert heatmap.evaluate("img => img.complete && img.naturalWidth") > 0, "the heatmap image did not load"
    save_screenshot(page, tmp_path, "demo.png")
