"""The JupyterLab extension in a real browser against a real ``jupyter lab`` server.

One server and one page serve the whole module; the tests run in file order, as
a person would work through the notebook.  Screenshots go to build/screenshots/.
Without Chromium or the ``playwright`` package the tests are skipped, saying why.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any

import pytest

from .lab_server import (
    KERNEL_JS,
    SCREENSHOTS,
    LabServer,
    cell,
    lab_fixtures,
    labextension_build,
    labextension_list,
    select_cell,
    wait_kernel_idle,
)

pytestmark = pytest.mark.browser

NOTEBOOK = "isolate-test.ipynb"
CELLS = [
    "import os; print('KERNEL', os.getpid())",
    "import os; print('WORKER', os.getpid())",
    "import time\ntime.sleep(20)\nprint('slept')",
    "x = 1",
    "%%isolate\nimport time\nfor _ in range(5):\n    time.sleep(1)",
]
KERNEL_CELL, WORKER_CELL, SLEEP_CELL, TOGGLE_CELL, PANEL_CELL = range(5)

chromium, lab, page = lab_fixtures(NOTEBOOK, CELLS)


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def cell_source(page: Any, index: int) -> str:
    return page.evaluate(
        "(i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.sharedModel.getSource()",
        index,
    )


def output_text(page: Any, index: int) -> str:
    return cell(page, index).locator(".jp-OutputArea").inner_text()


def wait_output(page: Any, index: int, pattern: str, timeout: float = 30.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(pattern, output_text(page, index))
        if match:
            return match
        if time.monotonic() > deadline:
            raise AssertionError(
                f"cell {index} output has no {pattern!r}: {output_text(page, index)!r}"
            )
        time.sleep(0.1)


def execution_done(page: Any, index: int) -> bool:
    prompt = cell(page, index).locator(".jp-InputArea-prompt").inner_text()
    return "*" not in prompt and re.search(r"\[\d+\]", prompt) is not None


def status_item(page: Any) -> Any:
    return page.locator("#jp-main-statusbar .nbisolate-status")


def wait_status_text(page: Any, pattern: str, timeout: float = 20.0) -> str:
    item = status_item(page)
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        if item.count() and item.is_visible():
            text = item.inner_text()
            if re.search(pattern, text):
                return text
        time.sleep(0.1)
    raise AssertionError(f"status item never showed {pattern!r}; last text {text!r}")


def kernel_status(page: Any) -> str | None:
    return page.evaluate(KERNEL_JS)


def assert_busy_for(page: Any, seconds: float) -> None:
    """The kernel status reads busy now and stays so for ``seconds``."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert kernel_status(page) == "busy", "the kernel status left busy while a cell ran"
        time.sleep(0.05)


# -- the tests -------------------------------------------------------------------


def test_extension_is_listed_enabled() -> None:
    out = labextension_list()
    lines = [line for line in out.splitlines() if re.match(r"\s*nbisolate\b", line)]
    assert lines, out
    assert "enabled" in lines[0] and "OK" in lines[0], lines[0]


def test_page_serves_the_extension_built_from_this_tree(page: Any) -> None:
    """The server loads the build next to the imported package, not an older installed copy."""
    build = labextension_build()
    if build is None:
        pytest.skip("no labextension build next to the package: the installed one is served")
    expected = json.loads((build / "package.json").read_text())["jupyterlab"]["_build"]["load"]
    served = page.evaluate(
        """() => JSON.parse(document.getElementById('jupyter-config-data').textContent)
                   .federated_extensions.filter(e => e.name === 'nbisolate')"""
    )
    assert [e["load"] for e in served] == [expected], served


def test_page_loaded_the_plugin(page: Any) -> None:
    state = page.evaluate(
        """() => {
             const app = window.jupyterapp;
             return {
               activated: app.isPluginActivated('nbisolate:plugin'),
               run: app.commands.hasCommand('nbisolate:run-isolated'),
               toggle: app.commands.hasCommand('nbisolate:toggle-isolate'),
               keys: app.commands.keyBindings
                 .filter(b => b.command === 'nbisolate:run-isolated')
                 .map(b => b.keys.join(' ')),
               clashes: app.commands.keyBindings
                 .filter(b => b.command !== 'nbisolate:run-isolated'
                              && b.keys.join(' ') === 'Ctrl Alt Enter')
                 .map(b => b.command),
             };
           }"""
    )
    assert state["activated"], state
    assert state["run"] and state["toggle"], state
    assert "Ctrl Alt Enter" in state["keys"], state
    assert state["clashes"] == [], f"Ctrl Alt Enter is also bound to {state['clashes']}"
    button = page.locator(".jp-NotebookPanel-toolbar [data-command='nbisolate:run-isolated']")
    assert button.count() == 1 and button.is_visible()
    # nbisolate is not loaded in the fresh kernel: nothing in the status bar.
    item = status_item(page)
    assert item.count() == 0 or not item.is_visible() or item.inner_text().strip() == ""
    shot(page, "01-notebook-opened")


def test_shortcut_runs_the_cell_in_another_process(page: Any) -> None:
    select_cell(page, KERNEL_CELL)
    page.keyboard.press("Shift+Enter")
    kernel_pid = int(wait_output(page, KERNEL_CELL, r"KERNEL (\d+)").group(1))
    wait_kernel_idle(page)

    select_cell(page, WORKER_CELL)
    page.keyboard.press("Control+Alt+Enter")
    worker_pid = int(wait_output(page, WORKER_CELL, r"WORKER (\d+)", timeout=60).group(1))
    assert worker_pid != kernel_pid
    # The cell text is unchanged: %%isolate was added for the run only.
    assert cell_source(page, WORKER_CELL) == CELLS[WORKER_CELL]
    page.wait_for_function(
        "(i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.executionCount !== null",
        arg=WORKER_CELL,
    )
    # The extension was loaded on demand, so the status item now shows.
    wait_status_text(page, r"isolate: idle")
    shot(page, "02-run-isolated")


def test_status_bar_counts_a_worker_and_stops_it(page: Any) -> None:
    select_cell(page, SLEEP_CELL)
    page.locator(".jp-NotebookPanel-toolbar [data-command='nbisolate:run-isolated']").click()
    text = wait_status_text(page, r"isolate: 1 running")
    assert status_item(page).get_attribute("data-count") == "1", text
    # The kernel reads Busy while the isolated cell runs, as for any cell ...
    assert_busy_for(page, 1.0)

    shot(page, "03-worker-running")

    status_item(page).click()
    popup = page.locator(".nbisolate-popup")
    popup.wait_for()
    # ... and opening the popup (a comm message, handled on a subshell) does not flip it.
    assert_busy_for(page, 1.0)
    row = popup.locator(".nbisolate-worker")
    assert row.count() == 1
    assert re.fullmatch(r"\d+", row.locator(".nbisolate-worker-pid").inner_text())
    assert row.locator(".nbisolate-worker-label").inner_text().strip()
    shot(page, "04-workers-popup")

    stopped_at = time.monotonic()
    row.locator(".nbisolate-stop").click()
    deadline = stopped_at + 10
    while not execution_done(page, SLEEP_CELL):
        assert time.monotonic() < deadline, "the stopped cell did not end within 10 s"
        time.sleep(0.1)
    took = time.monotonic() - stopped_at
    assert took < 10
    assert "slept" not in output_text(page, SLEEP_CELL)
    assert (
        cell(page, SLEEP_CELL)
        .locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        .count()
        >= 1
    ), output_text(page, SLEEP_CELL)
    wait_status_text(page, r"isolate: idle")
    page.keyboard.press("Escape")
    shot(page, "05-worker-stopped")


def test_live_status_panel_counts_the_time(page: Any) -> None:
    """The %%isolate status panel (an ipywidgets widget) updates while the cell runs."""
    select_cell(page, PANEL_CELL)
    page.keyboard.press("Shift+Enter")
    elapsed = cell(page, PANEL_CELL).locator(".nbisolate-panel .nbisolate-elapsed")
    elapsed.first.wait_for(timeout=15_000)
    first = elapsed.first.inner_text()
    page.wait_for_function(
        """([i, first]) => {
             const cell = window.jupyterapp.shell.currentWidget.content.widgets[i];
             const el = cell.node.querySelector('.nbisolate-panel .nbisolate-elapsed');
             return el && el.textContent !== first;
           }""",
        arg=[PANEL_CELL, first],
        timeout=10_000,
    )
    shot(page, "06-live-panel")
    page.wait_for_function(
        "(i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.executionCount !== null",
        arg=PANEL_CELL,
        timeout=30_000,
    )


def test_toggle_from_the_context_menu(page: Any) -> None:
    select_cell(page, TOGGLE_CELL)
    cell(page, TOGGLE_CELL).locator(".jp-InputArea-editor").click(button="right")
    menu = page.locator(".lm-Menu")
    menu.get_by_text("Toggle %%isolate", exact=True).click()
    assert cell_source(page, TOGGLE_CELL) == "%%isolate\n" + CELLS[TOGGLE_CELL]
    shot(page, "07-toggled")
    cell(page, TOGGLE_CELL).locator(".jp-InputArea-editor").click(button="right")
    assert menu.get_by_text("Run Cell Isolated", exact=True).is_visible()
    menu.get_by_text("Toggle %%isolate", exact=True).click()
    assert cell_source(page, TOGGLE_CELL) == CELLS[TOGGLE_CELL]


def test_status_item_follows_a_kernel_restart(page: Any) -> None:
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.restartKernel()")
    # The restarted kernel has not loaded nbisolate: the item goes away ...
    page.wait_for_function(
        """() => {
             const el = document.querySelector('#jp-main-statusbar .nbisolate-status');
             return !el || !el.offsetParent || el.textContent.trim() === '';
           }""",
        timeout=30_000,
    )
    wait_kernel_idle(page, timeout=60_000)
    # ... and comes back, counting workers, once a cell runs isolated again.
    select_cell(page, SLEEP_CELL)
    # Not awaited: the command's promise settles only when the cell ends.
    page.evaluate("() => { void window.jupyterapp.commands.execute('nbisolate:run-isolated'); }")
    wait_status_text(page, r"isolate: 1 running", timeout=30)
    shot(page, "08-after-restart")
    status_item(page).click()
    page.locator(".nbisolate-popup .nbisolate-stop").click()
    wait_status_text(page, r"isolate: idle", timeout=15)
    page.keyboard.press("Escape")


def test_status_item_after_a_page_reload(page: Any, lab: LabServer) -> None:
    """A page opened on a kernel that already loaded nbisolate finds it by itself."""
    page.reload()
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    wait_kernel_idle(page, timeout=60_000)
    wait_status_text(page, r"isolate: idle", timeout=30)
    shot(page, "09-after-reload")
