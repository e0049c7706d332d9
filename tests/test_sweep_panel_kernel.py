"""A sweep (``--over``) as the notebook shows it: no ``Out`` of Nones, the swept name's
type, and a phase line that fits a sweep (plan and serialize once, then the runs)."""

from __future__ import annotations

import re

from .test_panel_kernel import Models, final, fresh_widgets, rows


def test_a_sweep_ending_in_print_shows_no_out(kernel):
    res = kernel.run("%%isolate --over lr=[0.1, 0.01, 0.001]\nprint(lr * 2)")
    assert res.result is None, res.result
    assert "[lr=0.01] 0.02" in res.stdout
    # A value still comes back as a list, with None where a run gave None.
    res = kernel.run("%%isolate --over n=[1, 2, 3]\nn * 10 if n != 2 else None")
    assert res.result["text/plain"] == "[10, None, 30]"


def test_the_swept_name_has_the_type_of_its_values(kernel):
    res = kernel.run("%%isolate --over lr=[0.1, 0.01]\nprint(lr)")
    table = rows(final(res)["text/html"])
    assert table["lr"][1] == "float", table
    res = kernel.run("%%isolate --over x=[1, 2.5, None]\nprint(x)")
    table = rows(final(res)["text/html"])
    assert table["x"][1] == "int | float | NoneType", table


def test_the_phase_line_fits_a_sweep(kernel):
    fresh_widgets(kernel)
    res = kernel.run("%%isolate --over s=range(3)\nimport time\ntime.sleep(0.8)\nprint(s)")
    html = final(res)["text/html"]
    phases = re.search(r"<div class='nbisolate-phases'.*?</div>", html).group(0)
    labels = re.findall(r">(\w+)&nbsp;", phases)
    assert labels == ["plan", "serialize", "run"], phases
    # Live, the runs are one phase with the sweep's progress, not one worker's start/load/return.
    models = Models(res)
    (main,) = models.with_class("nbisolate-main")
    live = [
        m["content"]["data"]["state"]["value"]
        for m in res.of("comm_msg")
        if m["content"]["comm_id"] == main and "value" in m["content"]["data"].get("state", {})
    ]
    assert any(re.search(r"run&nbsp;…</b>&nbsp;\(\d of 3\)", v) for v in live), live
    assert not any(">start" in v or ">load" in v or ">return" in v for v in live), live
