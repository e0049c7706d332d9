"""The JupyterLab extension in Notebook 7, in a real browser against a real server.

Notebook 7 (the ``notebook`` package) runs on the same jupyter_server as
JupyterLab and loads the same federated extensions, but its notebook page has no
status bar: the isolated workers are listed and stopped through the
"Show Isolated Workers" command, from the Kernel menu or the command palette.
The ``jupyter lab`` server of tests/lab_server.py serves Notebook 7's pages too
(``/notebooks/NAME.ipynb``) once ``notebook`` is installed.  Screenshots go to
build/screenshots/.  Without Chromium, playwright or notebook>=7 the tests are
skipped, saying why.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .lab_server import (
    CHROMIUM_ARGS,
    KERNEL_JS,
    SCREENSHOTS,
    LabServer,
    browser_env,
    require_chromium,
    running_lab,
    wait_kernel_idle,
    wait_kernel_settled,
)

pytestmark = pytest.mark.browser

NOTEBOOK = "notebook7-test.ipynb"
CELLS = [
    "%load_ext nbisolate",
    "%%isolate\nimport time\ntime.sleep(60)\nprint('slept')",
]
LOAD_CELL, SLEEP_CELL = range(2)
COMMAND = "nbisolate:show-workers"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = require_chromium()
    notebook = pytest.importorskip(
        "notebook", reason="Notebook 7 tests need the notebook package: pip install 'notebook>=7'"
    )
    major = int(notebook.__version__.split(".")[0])
    if major < 7:
        pytest.skip(f"Notebook 7 tests need notebook>=7, found {notebook.__version__}")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, chromium: str) -> Iterator[LabServer]:
    root = tmp_path_factory.mktemp("nb7-root")
    with running_lab(root, tmp_path_factory.mktemp("nb7-state"), CELLS, NOTEBOOK) as lab:
        yield lab


@pytest.fixture(scope="module")
def page(
    server: LabServer, chromium: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Any]:
    """Notebook 7's page for the notebook (not JupyterLab's), its kernel idle."""
    from playwright.sync_api import sync_playwright

    home: Path = tmp_path_factory.mktemp("nb7-browser-home")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium, args=CHROMIUM_ARGS, headless=True, env=browser_env(home)
        )
        try:
            context = browser.new_context(viewport={"width": 1200, "height": 800})
            page = context.new_page()
            page.set_default_timeout(30_000)
            page.goto(server.url(f"notebooks/{NOTEBOOK}"))
            page.wait_for_selector(".jp-Notebook .jp-Cell")
            page.wait_for_function("() => !!window.jupyterapp", timeout=30_000)
            wait_kernel_idle(page, timeout=60_000)
            yield page
        finally:
            browser.close()


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def cell(page: Any, index: int) -> Any:
    return page.locator(".jp-Notebook .jp-Cell").nth(index)


def output_text(page: Any, index: int) -> str:
    return cell(page, index).locator(".jp-OutputArea").inner_text()


def execution_done(page: Any, index: int) -> bool:
    prompt = cell(page, index).locator(".jp-InputArea-prompt").inner_text()
    return "*" not in prompt and re.search(r"\[\d+\]", prompt) is not None


def run_cell(page: Any, index: int) -> None:
    """Click into the cell and press Shift+Enter, as a person would."""
    cell(page, index).locator(".jp-InputArea-editor").click()
    page.keyboard.press("Shift+Enter")


def command_state(page: Any) -> dict[str, Any]:
    return page.evaluate(
        """(id) => {
             const app = window.jupyterapp;
             return {
               name: app.name,
               activated: app.isPluginActivated('nbisolate:plugin'),
               has: app.commands.hasCommand(id),
               enabled: app.commands.isEnabled(id),
               visible: app.commands.isVisible(id),
               statusbar: !!document.querySelector('#jp-main-statusbar'),
             };
           }""",
        COMMAND,
    )


# -- the tests -------------------------------------------------------------------


def test_the_page_is_notebook_7_and_the_command_is_usable(page: Any) -> None:
    state = command_state(page)
    assert state["name"] == "Jupyter Notebook", state
    assert not state["statusbar"], "Notebook 7's notebook page has no status bar"
    assert state["activated"] and state["has"], state
    assert state["enabled"] and state["visible"], state
    # The extension probes and opens its status comm just after the page first reads idle (the
    # kernel is busy with each for a moment, truthfully): the kernel must come back to idle, and
    # stay there.
    wait_kernel_settled(page)
    assert page.evaluate(KERNEL_JS) == "idle"
    shot(page, "nb7-01-opened")


def test_kernel_menu_lists_the_workers_and_stop_ends_the_cell(page: Any) -> None:
    run_cell(page, LOAD_CELL)
    page.wait_for_function(
        "() => window.jupyterapp.shell.currentWidget.content.widgets[0].model.executionCount !== null"
    )
    wait_kernel_idle(page)
    run_cell(page, SLEEP_CELL)

    # The Kernel menu has the command, enabled.
    page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Kernel$")).click()
    item = page.locator(".lm-Menu-item[data-command='nbisolate:show-workers']")
    item.wait_for()
    assert "lm-mod-disabled" not in (item.get_attribute("class") or "")
    assert item.inner_text().strip().startswith("Show Isolated Workers")
    shot(page, "nb7-02-kernel-menu")
    item.click()

    dialog = page.locator(".jp-Dialog")
    dialog.wait_for()
    row = dialog.locator(".nbisolate-worker")
    row.first.wait_for(timeout=20_000)
    assert row.count() == 1, dialog.inner_text()
    assert re.fullmatch(r"\d+", row.locator(".nbisolate-worker-pid").inner_text())
    assert not execution_done(page, SLEEP_CELL)
    shot(page, "nb7-03-workers-dialog")

    stopped_at = time.monotonic()
    row.locator(".nbisolate-stop").click()
    while not execution_done(page, SLEEP_CELL):
        assert time.monotonic() - stopped_at < 10, "the stopped cell did not end within 10 s"
        time.sleep(0.1)
    out = output_text(page, SLEEP_CELL)
    assert "KeyboardInterrupt" in out, out
    assert "slept" not in out
    # The open list follows: the stopped worker's row goes away.
    dialog.locator(".nbisolate-worker").first.wait_for(state="detached", timeout=10_000)
    shot(page, "nb7-04-stopped")
    dialog.get_by_role("button", name="Close").click()
    dialog.wait_for(state="detached")


def test_command_palette_opens_the_same_list(page: Any) -> None:
    wait_kernel_idle(page)
    run_cell(page, SLEEP_CELL)
    page.locator(".jp-Notebook").click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+Shift+C")
    search = page.locator(".lm-CommandPalette-input")
    search.wait_for()
    search.fill("isolated workers")
    entry = page.locator(".lm-CommandPalette-item[data-command='nbisolate:show-workers']")
    entry.wait_for()
    assert "lm-mod-disabled" not in (entry.get_attribute("class") or "")
    shot(page, "nb7-05-palette")
    page.keyboard.press("Enter")

    dialog = page.locator(".jp-Dialog")
    row = dialog.locator(".nbisolate-worker")
    row.first.wait_for(timeout=20_000)
    row.first.locator(".nbisolate-stop").click()
    deadline = time.monotonic() + 10
    while not execution_done(page, SLEEP_CELL):
        assert time.monotonic() < deadline, "the stopped cell did not end within 10 s"
        time.sleep(0.1)
    assert "KeyboardInterrupt" in output_text(page, SLEEP_CELL)
    dialog.get_by_role("button", name="Close").click()
    dialog.wait_for(state="detached")
