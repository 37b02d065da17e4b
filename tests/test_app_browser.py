"""The playground in a real browser: headless Chromium (Debian's `chromium`, which .ci/run installs)
driven by Playwright opens the page served with the demo assets, selects three adapters, runs them
in one request and sees three different outputs, each the one demo.json expects.

With HF_MULTILORA_SCREENSHOT=1 it saves the page to docs/images/playground.png (the README's
screenshot). Every request to a host other than the app's is blocked and fails the test: the page
must work offline.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import pytest
from hf_multilora.app import ui
from hf_multilora.app.demo import Demo, read_demo
from hf_multilora.app.service import Playground
from playwright.sync_api import Page, Route, expect, sync_playwright
from test_app_client import free_port

CHROMIUM = Path("/usr/bin/chromium")
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
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "images" / "playground.png"
ROWS = 3

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(), reason=f"no Chromium at {CHROMIUM} (apt-get install chromium)"
)


def pick_rows(demo: Demo) -> tuple[str, dict[str, str]]:
    """A demo text with expected outputs from ROWS adapters, all different: {adapter: output}."""
    by_text: dict[str, dict[str, str]] = {}
    for example in demo.examples:
        by_text.setdefault(example.text, {})[example.choice] = example.expected
    for text, expected in by_text.items():
        rows: dict[str, str] = {}
        for name, output in expected.items():
            if output not in rows.values() and len(rows) < ROWS:
                rows[name] = output
        if len(rows) == ROWS:
            return text, rows
    raise AssertionError(f"demo.json has no text with {ROWS} adapters of different expected outputs")


def drive(page: Page, url: str, text: str, expected: dict[str, str], screenshot: Path | None) -> None:
    """Open the page, select exactly the adapters of `expected`, run, and check each row's output."""
    page.goto(url)
    choices = page.locator("#choices")
    expect(choices).to_be_visible()
    for box in choices.locator("label").all():
        name = box.inner_text().strip()
        checkbox = box.locator("input[type=checkbox]")
        checkbox.set_checked(name in expected)
    page.locator("#prompt textarea").fill(text)
    page.locator("#run").click()
    expect(page.locator("#latency")).to_contain_text("Done", timeout=120_000)

    outputs = {}
    for box in page.locator(".row-output").all():
        if box.is_visible():
            outputs[box.locator("[data-testid=block-info]").inner_text().strip()] = box.locator(
                "textarea"
            ).input_value()
    assert outputs == expected
    assert len(set(outputs.values())) == ROWS
    if screenshot is not None:
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)


def run_in_chromium(
    playground: Playground, text: str, expected: dict[str, str], screenshot: Path | None
) -> None:
    blocks = ui.build(playground)
    url = ui.launch(blocks, "127.0.0.1", free_port(), block=False)
    app_host = urlparse(url).netloc
    outside: list[str] = []

    def local_only(route: Route) -> None:
        if urlparse(route.request.url).netloc == app_host:
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page(viewport={"width": 1280, "height": 900})
                page.route("**/*", local_only)
                drive(page, url, text, expected, screenshot)
            finally:
                browser.close()
    finally:
        blocks.close()
    assert outside == [], f"the page asked for resources outside the app: {outside}"


def test_three_adapters_in_the_browser():
    demo = read_demo()
    text, expected = pick_rows(demo)
    playground = Playground.from_demo(demo)
    screenshot = SCREENSHOT if os.environ.get("HF_MULTILORA_SCREENSHOT") == "1" else None
    run_in_chromium(playground, text, expected, screenshot)
