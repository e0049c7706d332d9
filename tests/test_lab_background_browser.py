"""Background cells (``%%isolate --bg``) in a real JupyterLab: the job's output keeps arriving
in its own cell while other cells run, the status item shows it apart from running cells,
and a notification with "Show cell" says when it ends."""

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
    wait_kernel_idle,
)

pytestmark = pytest.mark.browser

NOTEBOOK = "background-test.ipynb"
CELLS = [
    "%load_ext nbisolate",
    "%%isolate --bg\nimport time\nfor i in range(8):\n    print('bg tick', i, flush=True)\n"
    "    time.sleep(1)\nbg_done = 'yes'",
    "print('meanwhile', 6 * 7)",
    "%%isolate --bg\nimport time\ntime.sleep(120)",
    "%%isolate --bg\nimport time\nfor i in range(12):\n    print('replayed', i, flush=True)\n"
    "    time.sleep(1)\nafter_reload = 1",
]
LOAD, BG, ORDINARY, LONG, RELOAD = range(5)


chromium, lab, page = lab_fixtures(NOTEBOOK, CELLS)


def output_text(page: Any, index: int) -> str:
    return cell(page, index).locator(".jp-OutputArea").inner_text()


def wait_for(what: str, predicate: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"{what} did not happen within {timeout} s")


def status_text(page: Any) -> str:
    item = page.locator("#jp-main-statusbar .nbisolate-status")
    return item.inner_text() if item.count() and item.is_visible() else ""


def run(page: Any, index: int) -> None:
    select_cell(page, index)
    page.keyboard.press("Shift+Enter")


def test_background_job_streams_into_its_cell_and_notifies_when_done(page: Any) -> None:
    run(page, LOAD)
    wait_kernel_idle(page)
    run(page, BG)
    wait_for("the --bg cell returned its Job", lambda: "Job 1 started" in output_text(page, BG))
    wait_kernel_idle(page)  # the cell ended; the job runs on
    run(page, ORDINARY)
    wait_for("the ordinary cell ran", lambda: "meanwhile 42" in output_text(page, ORDINARY))
    assert "bg tick" not in output_text(page, ORDINARY)
    # The job's output arrives in its own cell, after that cell ended.
    wait_for("the job's output in its cell", lambda: "bg tick 2" in output_text(page, BG))
    wait_for("the status item shows the job", lambda: "1 in background" in status_text(page))
    item = page.locator("#jp-main-statusbar .nbisolate-status")
    assert item.get_attribute("data-jobs") == "1"
    item.click()
    popup = page.locator(".nbisolate-popup")
    popup.wait_for()
    row = popup.locator(".nbisolate-job")
    assert row.count() == 1 and "running" in row.inner_text()
    page.screenshot(path=str(SCREENSHOTS / "bg-01-popup.png"))
    page.keyboard.press("Escape")
    toast = page.locator(".Toastify__toast", has_text="Background job 1")
    toast.wait_for(timeout=30_000)
    assert "finished" in toast.inner_text() and "bg_done" in toast.inner_text()
    page.screenshot(path=str(SCREENSHOTS / "bg-02-notification.png"))
    select_cell(page, ORDINARY)
    toast.get_by_text("Show cell").click()
    wait_for("Show cell selects the job's cell", lambda: page.evaluate(
        "() => window.jupyterapp.shell.currentWidget.content.activeCellIndex") == BG, 10)
    assert re.search(r"background job 1 done at \d\d:\d\d:\d\d", output_text(page, BG))
    wait_for("the status item no longer counts the job",
             lambda: "background" not in status_text(page), 10)


def test_stop_from_the_popup(page: Any) -> None:
    run(page, LONG)
    wait_for("the long job is listed", lambda: "1 in background" in status_text(page))
    page.locator("#jp-main-statusbar .nbisolate-status").click()
    popup = page.locator(".nbisolate-popup")
    popup.wait_for()
    popup.locator(".nbisolate-job .nbisolate-stop").click()
    toast = page.locator(".Toastify__toast", has_text="was stopped")
    toast.wait_for(timeout=30_000)
    wait_for("the stop is shown under the cell", lambda: "stopped at" in output_text(page, LONG))
    page.keyboard.press("Escape")


def test_a_reloaded_page_shows_the_jobs_output_again(page: Any) -> None:
    run(page, RELOAD)
    wait_for("the job printed", lambda: "replayed 2" in output_text(page, RELOAD))
    page.reload()
    page.wait_for_selector(".jp-Notebook .jp-Cell")
    wait_kernel_idle(page, timeout=60_000)
    # What the job printed before the reload comes back, and what it prints next follows.
    wait_for("the kept output after the reload", lambda: "replayed 1" in output_text(page, RELOAD))
    text = output_text(page, RELOAD)
    assert "Job " in text and "started" in text
    later = int(re.findall(r"replayed (\d+)", text)[-1]) + 1
    wait_for("live output after the reload",
             lambda: f"replayed {min(later, 11)}" in output_text(page, RELOAD), 30)
    page.screenshot(path=str(SCREENSHOTS / "bg-03-after-reload.png"))
    wait_for("the job's end line", lambda: "done at" in output_text(page, RELOAD), 30)
    # The cell itself is not running: its prompt is a number, not [*].
    prompt = cell(page, RELOAD).locator(".jp-InputArea-prompt").inner_text()
    assert "*" not in prompt
