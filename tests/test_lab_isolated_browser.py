"""An isolated cell feels like an ordinary one in JupyterLab: a real server, headless Chromium.

Running several cells isolated, the mark that makes Shift+Enter run a cell isolated again,
Toggle %%isolate keeping the options, the workers popup (the cell's ``[n]``, a click that
shows the cell, Esc, the panel's clock and Stop), the Running panel section, the dialog
for front ends without a status bar, and what a page reload, a kernel restart, a notebook
closed and reopened, and a notebook saved mid-run show.  Tests run in file order, as a
person works through the notebook; screenshots go to build/screenshots/.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .lab_server import (
    KERNEL_JS,
    SCREENSHOTS,
    LabServer,
    cell,
    lab_page,
    notebook,
    require_chromium,
    running_lab,
    select_cell,
    wait_kernel_idle,
)

pytestmark = pytest.mark.browser

NOTEBOOK = "isolated-cells.ipynb"
CELLS = [
    "%load_ext nbisolate\nimport os\nprint('KERNEL', os.getpid())",
    "import os\nprint('A', os.getpid())",
    "import os\nprint('B', os.getpid())",
    "%%isolate --timeout 5\nx = 1",
    "%%isolate\nimport time\nfor i in range(80):\n    print('tick', i, flush=True)\n"
    "    time.sleep(0.25)",
    "%%isolate\nimport time\ntime.sleep(60)",
    "%%isolate\nimport time\ntime.sleep(4)\ndone_while_closed = 1",
]
SETUP, CELL_A, CELL_B, OPTIONS, TICKING, SLEEPING, SHORT = range(7)

WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"


@pytest.fixture(scope="module")
def chromium() -> str:
    return require_chromium()


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("isolated-lab-root")


@pytest.fixture(scope="module")
def lab(
    root: Path, tmp_path_factory: pytest.TempPathFactory, chromium: str
) -> Iterator[LabServer]:
    state = tmp_path_factory.mktemp("isolated-lab-state")
    with running_lab(root, state, CELLS, NOTEBOOK) as server:
        yield server


@pytest.fixture(scope="module")
def page(lab: LabServer, chromium: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with lab_page(lab, chromium, NOTEBOOK, tmp_path_factory.mktemp("isolated-home")) as page:
        yield page


# -- helpers ----------------------------------------------------------------------------


def shot(page: Any, name: str) -> None:
    page.screenshot(path=str(SCREENSHOTS / f"isolated-{name}.png"))


def js_cell(page: Any, index: int, expr: str) -> Any:
    return page.evaluate(
        f"(i) => {{ const c = window.jupyterapp.shell.currentWidget.content.widgets[i]; return {expr}; }}",
        index,
    )


def source(page: Any, index: int) -> str:
    return js_cell(page, index, "c.model.sharedModel.getSource()")


def count(page: Any, index: int) -> int | None:
    return js_cell(page, index, "c.model.executionCount")


def text(page: Any, index: int) -> str:
    return cell(page, index).locator(".jp-OutputArea").inner_text()


def wait_text(page: Any, index: int, pattern: str, timeout: float = 30.0) -> re.Match[str]:
    deadline = time.monotonic() + timeout
    while True:
        match = re.search(pattern, text(page, index))
        if match:
            return match
        assert time.monotonic() < deadline, f"cell {index} never showed {pattern!r}: {text(page, index)!r}"
        time.sleep(0.1)


def running(page: Any, index: int) -> bool:
    return "*" in cell(page, index).locator(".jp-InputArea-prompt").inner_text()


def wait_done(page: Any, index: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while running(page, index) or count(page, index) is None:
        assert time.monotonic() < deadline, f"cell {index} did not finish"
        time.sleep(0.1)


def status_text(page: Any) -> str:
    item = page.locator("#jp-main-statusbar .nbisolate-status")
    return item.inner_text() if item.count() and item.is_visible() else ""


def wait_status(page: Any, pattern: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, status_text(page)):
        assert time.monotonic() < deadline, f"status item never showed {pattern!r}: {status_text(page)!r}"
        time.sleep(0.1)
    return status_text(page)


def command(page: Any, name: str) -> None:
    page.evaluate(f"() => {{ void window.jupyterapp.commands.execute('{name}'); }}")


def kernel_pid(page: Any) -> int:
    return int(wait_text(page, SETUP, r"KERNEL (\d+)").group(1))


# -- running cells isolated ---------------------------------------------------------------


def test_several_selected_cells_run_isolated_in_order_and_stay_marked(page: Any) -> None:
    select_cell(page, SETUP)
    page.keyboard.press("Shift+Enter")
    kernel = kernel_pid(page)
    wait_kernel_idle(page)
    page.evaluate(
        """() => {
             const nb = window.jupyterapp.shell.currentWidget.content;
             nb.activeCellIndex = 1;
             nb.deselectAll();
             nb.extendContiguousSelectionTo(2);
             nb.mode = 'command';
             nb.node.focus();
           }"""
    )
    page.keyboard.press("Control+Alt+Enter")
    a = int(wait_text(page, CELL_A, r"A (\d+)", timeout=60).group(1))
    b = int(wait_text(page, CELL_B, r"B (\d+)", timeout=60).group(1))
    assert kernel not in (a, b) and a != b
    wait_done(page, CELL_B)
    assert count(page, CELL_A) < count(page, CELL_B)
    # The text is unchanged; the mark is in the metadata and shows on the cells.
    assert source(page, CELL_A) == CELLS[CELL_A]
    for index in (CELL_A, CELL_B):
        assert js_cell(page, index, "c.model.getMetadata('nbisolate')") == {"isolate": True}
        assert "nbisolate-mod-isolated" in (cell(page, index).get_attribute("class") or "")
    shot(page, "01-marked")

    # Run again as an ordinary cell would be run: the mark makes it isolated.
    select_cell(page, CELL_A)
    button = page.locator(".jp-NotebookPanel-toolbar [data-command='nbisolate:run-isolated']")
    assert button.locator("[aria-pressed='true']").count() + (
        1 if button.get_attribute("aria-pressed") == "true" else 0
    ) >= 1, button.inner_html()
    before = count(page, CELL_A)
    page.keyboard.press("Shift+Enter")
    page.wait_for_function(
        "([i, n]) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.executionCount > n",
        arg=[CELL_A, before],
        timeout=60_000,
    )
    again = int(wait_text(page, CELL_A, r"A (\d+)").group(1))
    assert again not in (kernel, a)


def test_toggle_keeps_the_options_and_unmarks(page: Any) -> None:
    select_cell(page, OPTIONS)
    command(page, "nbisolate:toggle-isolate")
    page.wait_for_function(
        "(i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.sharedModel.getSource() === 'x = 1'",
        arg=OPTIONS,
    )
    command(page, "nbisolate:toggle-isolate")
    page.wait_for_function(
        "(i) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.sharedModel.getSource().startsWith('%%isolate')",
        arg=OPTIONS,
    )
    assert source(page, OPTIONS) == CELLS[OPTIONS]
    # A marked cell toggled off runs in the kernel again.
    select_cell(page, CELL_B)
    command(page, "nbisolate:toggle-isolate")
    page.wait_for_function(
        "(i) => !window.jupyterapp.shell.currentWidget.content.widgets[i].node.classList.contains('nbisolate-mod-isolated')",
        arg=CELL_B,
    )
    assert source(page, CELL_B) == CELLS[CELL_B]
    before = count(page, CELL_B)
    select_cell(page, CELL_B)
    page.keyboard.press("Shift+Enter")
    page.wait_for_function(
        "([i, n]) => window.jupyterapp.shell.currentWidget.content.widgets[i].model.executionCount > n",
        arg=[CELL_B, before],
        timeout=30_000,
    )
    assert int(wait_text(page, CELL_B, r"B (\d+)").group(1)) == kernel_pid(page)


# -- the workers popup, the Running panel, the dialog ----------------------------------------


def test_popup_names_the_cell_and_shows_it(page: Any) -> None:
    select_cell(page, TICKING)
    page.keyboard.press("Shift+Enter")
    wait_status(page, r"isolate: 1 running · \d+\.\d s")
    wait_text(page, TICKING, r"tick 2")
    n = count(page, TICKING)
    # Scroll away from the cell, then find it again from the popup.
    select_cell(page, SETUP)
    page.locator("#jp-main-statusbar .nbisolate-status").click()
    popup = page.locator(".nbisolate-popup")
    popup.wait_for()
    row = popup.locator(".nbisolate-worker")
    assert row.count() == 1
    label = row.locator(".nbisolate-worker-label").inner_text()
    prompt = cell(page, TICKING).locator(".jp-InputArea-prompt").inner_text()
    assert re.fullmatch(r"\[\d+\] import time", label), label
    assert n is None or label.startswith(f"[{n}]") or "[*]" in prompt
    assert re.fullmatch(r"\d+\.\d s", row.locator(".nbisolate-worker-elapsed").inner_text())
    assert row.locator(".nbisolate-worker-timeout").inner_text() == "none"
    # The same Stop as the cell's panel: an ipywidgets button with the stop icon.
    stop = row.locator(".nbisolate-stop")
    panel_stop = cell(page, TICKING).locator(".nbisolate-panel button", has_text="Stop")
    for button in (stop, panel_stop):
        classes = button.get_attribute("class") or ""
        assert "widget-button" in classes and "jupyter-button" in classes, classes
        assert button.locator(".fa-stop").count() == 1
    shot(page, "02-popup")
    page.keyboard.press("Escape")
    popup.wait_for(state="detached", timeout=5_000)

    page.locator("#jp-main-statusbar .nbisolate-status").click()
    popup.locator(".nbisolate-worker-label").click()
    popup.wait_for(state="detached", timeout=5_000)
    assert page.evaluate("() => window.jupyterapp.shell.currentWidget.content.activeCellIndex") == TICKING
    assert cell(page, TICKING).is_visible()


def test_running_panel_and_the_dialog_list_the_worker(page: Any) -> None:
    page.evaluate("() => window.jupyterapp.shell.activateById('jp-running-sessions')")
    page.locator(".jp-AccordionPanel-title", has_text="Isolated workers").wait_for()
    item = page.locator(".jp-RunningSessions-item", has_text=re.compile(r"\[\d+\] import time"))
    item.first.wait_for(timeout=10_000)
    assert re.search(r"\[\d+\] import time", item.first.inner_text()), item.first.inner_text()
    shot(page, "03-running-panel")
    page.evaluate("() => window.jupyterapp.shell.collapseLeft()")
    # Without a status bar (as in Notebook 7) the command opens the list in a dialog.
    page.evaluate("() => window.jupyterapp.commands.execute('statusbar:toggle')")
    try:
        command(page, "nbisolate:show-workers")
        dialog = page.locator(".jp-Dialog .nbisolate-popup")
        dialog.wait_for()
        assert dialog.locator(".nbisolate-worker").count() == 1
        shot(page, "04-dialog")
        page.locator(".jp-Dialog button", has_text="Close").click()
        dialog.wait_for(state="detached")
    finally:
        page.evaluate("() => window.jupyterapp.commands.execute('statusbar:toggle')")


# -- losing sight of a running cell ------------------------------------------------------------


def test_a_page_reload_during_an_isolated_cell(page: Any) -> None:
    """The status item, the cell's output, its running prompt and its panel come back."""
    assert running(page, TICKING), "the ticking cell ended too early for this test"
    page.reload()
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    wait_status(page, r"isolate: 1 running", timeout=15)
    assert page.evaluate(KERNEL_JS) == "busy"
    # New output arrives in the cell, which shows it is running, with a live panel.
    seen = int(wait_text(page, TICKING, r"tick (\d+)", timeout=15).group(1))
    later = wait_text(page, TICKING, rf"tick (?!{seen}\b)(\d+)", timeout=10)
    assert int(later.group(1)) > seen
    assert running(page, TICKING)
    mirror = cell(page, TICKING).locator(".nbisolate-mirror")
    mirror.wait_for(timeout=10_000)
    assert "running in pid" in mirror.inner_text()
    shot(page, "05-after-reload")
    wait_done(page, TICKING, timeout=40)
    summary = cell(page, TICKING).locator("details.nbisolate-panel summary")
    summary.wait_for()
    assert re.search(r"ran [\d.]+ s in pid \d+", summary.inner_text())
    assert "tick 79" in text(page, TICKING)
    assert "Error displaying widget" not in text(page, TICKING)
    wait_status(page, r"isolate: idle")
    wait_kernel_idle(page)


def test_a_notebook_closed_and_reopened_shows_how_its_panel_ended(page: Any) -> None:
    select_cell(page, SHORT)
    page.keyboard.press("Shift+Enter")
    cell(page, SHORT).locator(".nbisolate-panel").first.wait_for(timeout=20_000)
    page.evaluate(
        """async () => {
             const panel = window.jupyterapp.shell.currentWidget;
             await panel.context.save();
             panel.context.model.dirty = false;
             panel.close();
           }"""
    )
    time.sleep(6)  # the cell ends while the notebook is closed
    page.evaluate(f"() => window.jupyterapp.commands.execute('docmanager:open', {{path: '{NOTEBOOK}'}})")
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    summary = cell(page, SHORT).locator("details.nbisolate-panel summary")
    summary.wait_for(timeout=20_000)
    assert re.search(r"ran [\d.]+ s in pid \d+", summary.inner_text()), summary.inner_text()
    assert "returning results" not in text(page, SHORT)
    shot(page, "06-reopened")


def test_a_kernel_restart_during_an_isolated_cell(page: Any) -> None:
    wait_kernel_idle(page, timeout=60_000)
    select_cell(page, SLEEPING)
    page.keyboard.press("Shift+Enter")
    panel = cell(page, SLEEPING).locator(".nbisolate-panel")
    panel.first.wait_for(timeout=20_000)
    wait_status(page, r"isolate: 1 running")
    page.evaluate("() => window.jupyterapp.shell.currentWidget.sessionContext.restartKernel()")
    wait_text(page, SLEEPING, r"the kernel restarted while this cell ran", timeout=30)
    assert cell(page, SLEEPING).locator(".jupyter-widgets").count() == 0
    wait_kernel_idle(page, timeout=60_000)
    assert not running(page, SLEEPING)
    shot(page, "07-after-restart")


def test_a_notebook_saved_mid_run_opens_readable(page: Any, root: Path) -> None:
    """A live panel saved in the file, opened where no kernel knows it: a note, not an error."""
    path = notebook(["%%isolate\nimport time\ntime.sleep(600)"], root / "saved-mid-run.ipynb")
    nb = json.loads(path.read_text())
    nb["cells"][0]["outputs"] = [
        {
            "output_type": "display_data",
            "data": {
                "text/plain": "nbisolate: isolated cell starting: 0 in, 1 out (time)",
                WIDGET_VIEW: {"version_major": 2, "version_minor": 0, "model_id": "0" * 32},
            },
            "metadata": {"nbisolate": {"display_id": "f" * 32, "live": True}},
        }
    ]
    path.write_text(json.dumps(nb))
    page.evaluate("() => window.jupyterapp.commands.execute('docmanager:open', {path: 'saved-mid-run.ipynb'})")
    page.wait_for_function(
        "() => window.jupyterapp.shell.currentWidget.context.path === 'saved-mid-run.ipynb'"
    )
    wait_text(page, 0, r"still running when its output was saved", timeout=60)
    assert "Error displaying widget" not in text(page, 0)
    shot(page, "08-saved-mid-run")
