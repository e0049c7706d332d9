"""What the output limit counts, through a real worker: bytes (as the limit and the note say),
and how much came faster than Jupyter's IOPub data rate limit lets through, so the note
never claims a smaller loss than the notebook server made."""

from __future__ import annotations

from typing import Any

import pytest

from nbisolate.options import RunOptions
from nbisolate.runner import CellRun
from nbisolate.supervisor import IOPUB_RATE, IOPUB_WINDOW


class Sink:
    def __init__(self) -> None:
        self.out: list[tuple[str, str]] = []

    def stream(self, name: str, text: str) -> None:
        self.out.append((name, text))

    def display(self, kind: str, data: dict[str, Any]) -> None:
        pass


@pytest.fixture(autouse=True)
def _template_closed():
    yield
    from nbisolate.supervisor import launcher

    launcher.close()


def run(source: str, max_output: str) -> tuple[Sink, list[Any]]:
    sink = Sink()
    events: list[Any] = []
    cell = CellRun(source, {}, RunOptions(max_output=max_output, quiet=True), sink=sink)
    cell.listeners.append(events.append)
    cell.run_sync()
    return sink, events


def test_the_limit_counts_bytes_not_characters() -> None:
    # 600 000 characters of two bytes each: 1.2 MB against a 1 MB limit.
    sink, events = run("print('é' * 600_000, end='')", "1M")
    sent = "".join(text for name, text in sink.out if name == "stdout")
    assert len(sent.encode()) <= 1024 * 1024 and len(sent.encode()) > 1024 * 1024 - 4
    (dropped,) = [e.data for e in events if e.kind == "dropped"]
    assert dropped["dropped"] == 1_200_000 - len(sent.encode())
    note = "".join(text for name, text in sink.out if name == "stderr")
    assert "of output was dropped" in note


def test_output_faster_than_jupyters_rate_limit_is_counted() -> None:
    sink, events = run("import sys\nfor _ in range(60):\n    sys.stdout.write('x' * 100_000)", "5M")
    (dropped,) = [e.data for e in events if e.kind == "dropped"]
    assert dropped["dropped"] == 6_000_000 - 5 * 2**20
    # 5 MB sent within a second or so: all but the window's allowance came too fast.
    allowance = IOPUB_RATE * IOPUB_WINDOW
    sent = 5 * 2**20
    assert sent - allowance - 2 * IOPUB_RATE <= dropped["over_rate"] <= sent - allowance


def test_slow_output_is_never_counted_as_too_fast() -> None:
    _, events = run(
        "import sys, time\nfor _ in range(3):\n    print('y' * 1000)\n    time.sleep(0.1)\n"
        "sys.stdout.write('z' * 1_100_000)",
        "1M",
    )
    (dropped,) = [e.data for e in events if e.kind == "dropped"]
    assert dropped["over_rate"] == 0  # 1 MB in a burst is within the window's allowance


def test_the_note_does_not_claim_a_smaller_loss_than_the_server_made() -> None:
    sink, events = run("import sys\nfor _ in range(60):\n    sys.stdout.write('x' * 100_000)", "5M")
    (dropped,) = [e.data for e in events if e.kind == "dropped"]
    note = "".join(text for name, text in sink.out if name == "stderr")
    assert dropped["over_rate"] > 0
    assert "IOPub data rate" in note and "may have dropped up to" in note
