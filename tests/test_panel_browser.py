"""The %%isolate status panel as a person sees it: JupyterLab in headless Chromium.

Uses the JupyterLab server fixture of ``tests/lab_server.py``.  Screenshots go
to build/screenshots/ (``panel-*.png``) and are kept as artifacts.  Without
Chromium or the ``playwright`` package the tests are skipped, saying why.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .lab_server import CHROMIUM_ARGS, LabServer, find_chromium, notebook

pytestmark = pytest.mark.browser

SCREENSHOTS = Path(__file__).resolve().parents[1] / "build" / "screenshots"
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
]
SETUP, LIVE, STOPPED, DEFINE, UNSHIPPABLE = range(5)

LAB_SETTINGS = {
    "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {
        "fetchNews": "false",
        "checkForUpdates": False,
    },
}

KERNEL_JS = """() => {
  const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;
  const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;
  return k ? k.status : null;
}"""


@pytest.fixture(scope="module")
def chromium() -> str:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"browser tests need the playwright package: {exc}")
    path = find_chromium()
    if path is None:
        pytest.skip(
            "browser tests need Chromium: `apt-get install -y chromium`"
            " (or set NBISOLATE_CHROMIUM to a Chromium binary)"
        )
    return path


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[LabServer]:
    pytest.importorskip("jupyterlab", reason="browser tests need jupyterlab")
    root = tmp_path_factory.mktemp("panel-lab-root")
    state = tmp_path_factory.mktemp("panel-lab-state")
    notebook(CELLS, root / NOTEBOOK)
    for name, values in LAB_SETTINGS.items():
        path = state / "lab-settings" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))
    server = LabServer(root, state)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def page(lab: LabServer, chromium: str) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS, headless=True)
        try:
            context = browser.new_context(viewport={"width": 1280, "height": 900})
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(lab.url(f"lab/tree/{NOTEBOOK}") + "&reset")
            page.wait_for_selector(".jp-Notebook .jp-Cell")
            page.wait_for_function(f"() => ({KERNEL_JS})() === 'idle'", timeout=60_000)
            yield page
        finally:
            browser.close()


def cell(page: Any, index: int) -> Any:
    return page.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook .jp-Cell").nth(index)


def run_cell(page: Any, index: int) -> None:
    """Select the cell in command mode and run it in place (Ctrl+Enter), as a person would."""
    page.evaluate(
        """(index) => {
             const nb = window.jupyterapp.shell.currentWidget.content;
             nb.activeCellIndex = index;
             nb.deselectAll();
             nb.mode = 'command';
             nb.node.focus();
           }""",
        index,
    )
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
    panel.locator("tr.nbisolate-var", has_text="dill (by value)").wait_for()
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
    assert done.get_attribute("open") is not None  # problems are shown, not folded away
    problem = done.locator("tr.nbisolate-problem")
    assert problem.count() >= 1
    text = problem.first.inner_text()
    assert "e.store.db" in text and "sqlite3.Connection" in text and "fix:" in text, text
    shot(page, UNSHIPPABLE, "unshippable")
