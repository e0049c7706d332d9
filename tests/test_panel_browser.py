"""The %%isolate status panel as a person sees it: JupyterLab in headless Chromium.

Uses the JupyterLab server fixture of ``tests/lab_server.py``.  Screenshots go
to build/screenshots/ (``panel-*.png``) and are kept as artifacts.  Without
Chromium or the ``playwright`` package the tests are skipped, saying why.
"""

from __future__ import annotations

import re
import time
from typing import Any

import pytest

from .lab_server import (
    SCREENSHOTS,
    cell,
    lab_fixtures,
    select_cell,
)

pytestmark = pytest.mark.browser

NOTEBOOK = "panel-test.ipynb"
CELLS = [
    "%load_ext nbisolate\nimport json, sqlite3\n"
    "prices = [101.5, 99.0, 104.25] * 1000\n"
    "def score(x):\n    return round(x * 1.1, 2)",
    "%%isolate --timeout 60\nimport time\nfor step in range(8):\n"
    "    print('step', step, flush=True)\n    time.sleep(0.5)\n"
    "best = max(score(p) for p in prices)\nreport = json.dumps({'best': best})",
    "%%isolate\nimport time\nprint('waiting', flush=True)\ntime.sleep(60)\nnever = 1",
    "class Store:\n    def __init__(self):\n        self.db = sqlite3.connect(':memory:')\n"
    "class Experiment:\n    def __init__(self):\n        self.store = Store()\ne = Experiment()",
    "%%isolate\nprint(e)",
    "%%isolate --timeout 60\nimport time\nfrom IPython.display import clear_output\n"
    "for epoch in range(20):\n    clear_output(wait=True)\n    print('epoch', epoch, flush=True)\n"
    "    time.sleep(0.4)",
]
SETUP, LIVE, STOPPED, DEFINE, UNSHIPPABLE, CLEARING = range(6)

chromium, lab, page = lab_fixtures(NOTEBOOK, CELLS, width=1280)


def run_cell(page: Any, index: int) -> None:
    """Select the cell in command mode and run it in place (Ctrl+Enter), as a person would."""
    select_cell(page, index)
    page.keyboard.press("Control+Enter")


def wait_done(page: Any, index: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        prompt = cell(page, index).locator(".jp-InputArea-prompt").inner_text()
        if "*" not in prompt and re.search(r"\[\d+\]", prompt):
            return
        assert time.monotonic() < deadline, f"cell {index} did not finish: prompt {prompt!r}"
        time.sleep(0.1)


def shot(page: Any, index: int, name: str) -> None:
    """A screenshot of one cell (input and output), kept under build/screenshots/."""
    cell(page, index).screenshot(path=str(SCREENSHOTS / f"panel-{name}.png"))


def test_live_panel_renders_ticks_and_collapses_to_its_summary(page: Any) -> None:
    run_cell(page, SETUP)
    wait_done(page, SETUP)
    run_cell(page, LIVE)
    panel = cell(page, LIVE).locator(".nbisolate-panel")
    elapsed = panel.locator(".nbisolate-elapsed")
    elapsed.first.wait_for(timeout=20_000)
    # The variables the cell reads are listed with how they travel, once serialized.
    panel.locator("tr.nbisolate-var", has_text="by value").wait_for()
    text = panel.first.inner_text()
    assert "prices" in text and "pickle" in text and "module (re-imported)" in text, text
    assert panel.locator(".nbisolate-panel-stop button, button.nbisolate-panel-stop").count() == 1
    first = elapsed.first.inner_text()
    cell(page, LIVE).locator(".jp-OutputArea-output", has_text="step 2").wait_for()
    assert elapsed.first.inner_text() != first, "the elapsed time did not move"
    shot(page, LIVE, "live")
    wait_done(page, LIVE)
    done = cell(page, LIVE).locator("details.nbisolate-panel")
    done.wait_for()
    summary = done.locator("summary").inner_text()
    assert re.search(r"ran [\d.]+ s in pid \d+; 3 in \(.+\), 4 out", summary), summary
    assert done.get_attribute("open") is None  # collapsed to the summary line
    shot(page, LIVE, "done")
    done.locator("summary").click()
    assert done.locator("tr.nbisolate-var").count() == 3  # prices, json, score
    shot(page, LIVE, "done-expanded")


def test_stop_button_interrupts_the_cell(page: Any) -> None:
    run_cell(page, STOPPED)
    out = cell(page, STOPPED)
    out.locator(".jp-OutputArea-output", has_text="waiting").wait_for(timeout=20_000)
    button = out.locator(".nbisolate-panel button", has_text="Stop")
    shot(page, STOPPED, "before-stop")
    clicked = time.monotonic()
    button.click()
    wait_done(page, STOPPED, timeout=15)
    assert time.monotonic() - clicked < 10
    assert "KeyboardInterrupt" in out.locator(".jp-OutputArea").inner_text()
    summary = out.locator("details.nbisolate-panel summary").inner_text()
    assert "stopped (Stop button)" in summary, summary
    shot(page, STOPPED, "stopped")


def test_unshippable_input_shows_path_type_and_fix(page: Any) -> None:
    run_cell(page, DEFINE)
    wait_done(page, DEFINE)
    run_cell(page, UNSHIPPABLE)
    wait_done(page, UNSHIPPABLE)
    done = cell(page, UNSHIPPABLE).locator("details.nbisolate-panel")
    done.wait_for()
    # The error under the panel explains in full; the panel folds to one line ...
    assert done.get_attribute("open") is None
    assert "cannot be sent to the worker (e.store.db: sqlite3.Connection)" in done.inner_text()
    assert "ShipError" in cell(page, UNSHIPPABLE).locator(".jp-OutputArea").inner_text()
    # ... and lists every problem when opened.
    done.locator("summary").click()
    problem = done.locator("tr.nbisolate-problem")
    assert problem.count() >= 1
    text = problem.first.inner_text()
    assert "e.store.db" in text and "sqlite3.Connection" in text and "fix:" in text, text
    shot(page, UNSHIPPABLE, "unshippable")


def test_clear_output_in_the_cell_keeps_the_panel(page: Any) -> None:
    """An epoch loop's clear_output(wait=True) clears the cell's output, never the panel."""
    run_cell(page, CLEARING)
    out = cell(page, CLEARING)
    out.locator(".jp-OutputArea-output", has_text=re.compile(r"epoch [3-9]")).first.wait_for(
        timeout=30_000
    )
    seen = set()
    for _ in range(6):  # across several clears
        panel = out.locator(".nbisolate-panel")
        assert panel.count() == 1, out.locator(".jp-OutputArea").inner_text()
        assert panel.locator("button", has_text="Stop").is_visible()
        assert panel.locator(".nbisolate-timeout").count() == 1
        text = out.locator(".jp-OutputArea").inner_text()
        epochs = re.findall(r"epoch \d+", text)
        assert len(epochs) <= 1, text  # the cell's own output was cleared
        seen.update(epochs)
        time.sleep(0.45)
    assert len(seen) >= 3, seen
    shot(page, CLEARING, "clear-output-live")
    wait_done(page, CLEARING)
    summary = out.locator("details.nbisolate-panel summary")
    summary.wait_for()
    assert re.search(r"ran [\d.]+ s in pid \d+", summary.inner_text())
    assert "epoch 19" in out.locator(".jp-OutputArea").inner_text()
    shot(page, CLEARING, "clear-output-done")
