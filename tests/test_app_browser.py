"""The playground in a real browser: headless Chromium (Debian's `chromium`, which .ci/run installs;
another one with HF_MULTILORA_CHROMIUM=PATH) driven by Playwright opens the page served with the
demo assets. It selects three adapters, runs them in one request and sees three different outputs,
each the one demo.json expects; a failed "Load adapter" leaves the rows usable.

With HF_MULTILORA_SCREENSHOT=1 it saves the page to docs/images/playground.png (the README's
screenshot). Every request to a host other than the app's is blocked and fails the test: the page
must work offline.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import pytest
from helpers import free_port
from hf_multilora.app import ui
from hf_multilora.app.demo import Demo, read_demo
from hf_multilora.app.service import Playground
from playwright.sync_api import Locator, Page, Route, expect, sync_playwright

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = Path(os.environ.get("HF_MULTILORA_CHROMIUM", "/usr/bin/chromium"))
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
SCREENSHOT = ROOT / "docs" / "images" / "playground.png"
ROWS = 3
CLICK_MS = 5_000  # a click on an element that is covered fails after this, instead of Playwright's 30 s

needs_chromium = pytest.mark.skipif(
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


@contextmanager
def page_of(playground: Playground) -> Iterator[Page]:
    """The playground's page, open in Chromium, with requests outside the app blocked."""
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
                page.goto(url)
                expect(page.locator("#choices")).to_be_visible()
                yield page
            finally:
                browser.close()
    finally:
        blocks.close()
    assert outside == [], f"the page asked for resources outside the app: {outside}"


def row_boxes(page: Page) -> dict[str, Locator]:
    """The row checkboxes by adapter name."""
    labels = page.locator("#choices label").all()
    return {label.inner_text().strip(): label.locator("input[type=checkbox]") for label in labels}


def run_rows(page: Page, text: str, rows: list[str]) -> dict[str, str]:
    """Select exactly `rows`, run, and return each visible row's output by its label."""
    for name, checkbox in row_boxes(page).items():
        checkbox.set_checked(name in rows, timeout=CLICK_MS)
    page.locator("#prompt textarea").fill(text)
    page.locator("#run").click()
    expect(page.locator("#latency")).to_contain_text("Done", timeout=120_000)
    outputs = {}
    for box in page.locator(".row-output").all():
        if box.is_visible():
            label = box.locator("[data-testid=block-info]").inner_text().strip()
            outputs[label] = box.locator("textarea").input_value()
    return outputs


def axis_labels(page: Page, plot: str, axis: str) -> list[str]:
    """The tick labels Vega drew on the `axis` ("X" or "Y") of the plot with elem_id `plot`."""
    labels = page.locator(f"#{plot} g.role-axis[aria-label^='{axis}-axis'] g.role-axis-label text")
    expect(labels.first).to_be_visible()
    return labels.all_text_contents()


def load_adapter(page: Page, folder: str, name: str) -> None:
    page.locator("#load-folder input").fill(folder)
    page.locator("#load-folder input").press("Enter")
    page.locator("#load-name textarea, #load-name input").first.fill(name)
    page.locator("#load").click()


@needs_chromium
def test_three_adapters_in_the_browser():
    demo = read_demo()
    text, expected = pick_rows(demo)
    with page_of(Playground.from_demo(demo)) as page:
        outputs = run_rows(page, text, list(expected))
        assert outputs == expected
        assert len(set(outputs.values())) == ROWS
        # The memory panel after the request: its plots' steps are whole numbers, so are the ticks
        # of their step axes (Vega picks fractions on a short axis: 0, 0.2, ... for two steps).
        expect(page.locator("#memory")).to_contain_text("free pages")  # the pool exists now
        for plot in ["pages-plot", "swaps-plot"]:
            ticks = axis_labels(page, plot, "X")
            assert all(re.fullmatch(r"[-\u2212]?\d+", tick) for tick in ticks), (plot, ticks)
            assert len(set(ticks)) == len(ticks) >= 2, (plot, ticks)
        if os.environ.get("HF_MULTILORA_SCREENSHOT") == "1":
            SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(SCREENSHOT), full_page=True)


@needs_chromium
def test_a_failed_load_leaves_the_rows_usable():
    """A load that fails (the folder's adapter is registered under its name already) shows its
    error, and every row can still be clicked: no "Error" badge lies over the rows or the form."""
    playground = Playground.from_demo(read_demo())
    taken = playground.model.adapter_names[0]
    with page_of(playground) as page:
        page.get_by_text("Load an adapter").click()
        load_adapter(page, taken, "")
        expect(page.get_by_text(f"adapter {taken!r} is already loaded")).to_be_visible()
        for component in ["#choices", "#load-folder", "#load-name"]:
            expect(page.locator(f"{component} .error")).to_have_count(0)
        for checkbox in row_boxes(page).values():
            was = checkbox.is_checked()
            checkbox.click(timeout=CLICK_MS)
            expect(checkbox).to_be_checked(checked=not was)
        expect(page.locator("#loaded .error")).to_have_count(1)  # the load's own output shows it

        # The same folder under a free name loads: a new row, selected; the form is cleared.
        selected = [name for name, box in row_boxes(page).items() if box.is_checked()]
        load_adapter(page, taken, "again")
        expect(page.locator("#loaded textarea, #loaded input").first).to_have_value("again")
        expect(page.locator("#choices label", has_text="again")).to_be_visible()
        boxes = row_boxes(page)
        assert [name for name, box in boxes.items() if box.is_checked()] == [*selected, "again"]
        expect(page.locator("#load-folder input")).to_have_value("")
        expect(page.locator("#load-name textarea, #load-name input").first).to_have_value("")
    assert playground.choices[-1] == "again"


def test_a_missing_chromium_is_reported_in_the_summary(tmp_path):
    """Without Chromium the browser tests are skipped, and the README's test command says so in
    its summary, with the reason (pyproject's addopts)."""
    missing = tmp_path / "no-chromium"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_app_browser.py",
            "-k",
            "three",
        ],
        cwd=ROOT,
        env={**os.environ, "HF_MULTILORA_CHROMIUM": str(missing)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    reason = rf"SKIPPED \[1\] tests/test_app_browser.py:\d+: no Chromium at {re.escape(str(missing))}"
    assert re.search(reason, result.stdout), result.stdout
