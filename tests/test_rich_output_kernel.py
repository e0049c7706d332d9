"""An isolated cell's output looks like an ordinary cell's: displays, plots, warnings.

Every check is on the IOPub messages a front end receives from a real
kernel, and where it can be, against what the same code produces when it
runs in the kernel itself.
"""

from __future__ import annotations

import base64
import os
import re
import struct
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import wait_until

WIDGET_MIME = "application/vnd.jupyter.widget-view+json"


def cell(code: str) -> str:
    return textwrap.dedent(code).strip("\n")


def own_messages(res) -> list[dict]:
    """IOPub messages of the cell's own output, without nbisolate's status panel.

    The panel is a display whose text starts with ``nbisolate:`` (and the
    updates of that display id) plus the comm traffic of its widgets.
    """
    panel_ids = set()
    for msg in res.messages:
        content = msg["content"]
        text = str(content.get("data", {}).get("text/plain", ""))
        if msg["msg_type"] == "display_data" and text.startswith("nbisolate:"):
            panel_ids.add((content.get("transient") or {}).get("display_id", id(msg)))
    mine = []
    for msg in res.messages:
        content = msg["content"]
        if msg["msg_type"].startswith("comm_"):
            continue
        if msg["msg_type"] in ("display_data", "update_display_data"):
            text = str(content.get("data", {}).get("text/plain", ""))
            display_id = (content.get("transient") or {}).get("display_id")
            if text.startswith("nbisolate:") or (display_id and display_id in panel_ids):
                continue
        mine.append(msg)
    return mine


def displays(res) -> list[dict]:
    """The ``display_data`` contents the cell itself produced."""
    return [m["content"] for m in own_messages(res) if m["msg_type"] == "display_data"]


def outputs(res) -> list[tuple[str, object]]:
    """The cell's visible outputs in order; consecutive stream texts joined, as a front end shows them."""
    shown: list[tuple[str, object]] = []
    for msg in own_messages(res):
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            key = f"stream:{content['name']}"
            if shown and shown[-1][0] == key:
                shown[-1] = (key, shown[-1][1] + content["text"])
            else:
                shown.append((key, content["text"]))
        elif kind in ("display_data", "update_display_data", "execute_result"):
            shown.append((kind, content["data"]))
        elif kind == "clear_output":
            shown.append((kind, content["wait"]))
    return shown


def png_size(data: str) -> tuple[int, int]:
    """Width and height from a base64 PNG's IHDR chunk."""
    raw = base64.b64decode(data)
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return struct.unpack(">II", raw[16:24])


def test_worker_stays_light_until_the_cell_needs_more(kernel):
    res = kernel.run(
        cell(
            """
            %%isolate
            import builtins, sys
            heavy = sorted(m for m in ('IPython', 'matplotlib', 'pandas', 'ipywidgets') if m in sys.modules)
            has_display = callable(getattr(builtins, 'display', None))
            """
        )
    )
    assert res.ok
    assert kernel.value("(heavy, has_display)") == ([], True)


def test_text_and_displays_arrive_in_the_order_the_cell_made_them(kernel):
    res = kernel.run(
        cell(
            """
            %%isolate
            from IPython.display import HTML, Markdown
            print('before')
            display(HTML('<b>bold</b>'))
            print('partial line, no newline', end='')
            display(Markdown('*md*'))
            print('after')
            """
        )
    )
    shown = outputs(res)
    assert [kind for kind, _ in shown] == [
        "stream:stdout",
        "display_data",
        "stream:stdout",
        "display_data",
        "stream:stdout",
    ]
    assert shown[0][1] == "before\n"
    assert shown[1][1]["text/html"] == "<b>bold</b>"
    assert shown[2][1] == "partial line, no newline"
    assert shown[3][1]["text/markdown"] == "*md*"
    assert shown[4][1] == "after\n"


# A 1x1 PNG, so the cell can display an image without drawing one.
PNG_1X1 = "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR4nGNgYPj/HwADAgH/Vp1bGwAAAABJRU5ErkJggg=="


def test_repr_methods_and_ipython_types_give_the_kernels_bundles(kernel):
    kernel.run(
        cell(
            f"""
            import base64
            from IPython.display import HTML, JSON, SVG, Image, Latex, Markdown
            PNG = base64.b64decode({PNG_1X1!r})
            class Rich:
                def __repr__(self):
                    return 'Rich()'
                def _repr_html_(self):
                    return '<p>rich</p>'
                def _repr_png_(self):
                    return PNG
                def _repr_latex_(self):
                    return r'$x^2$'
            class Bundle:
                def __repr__(self):
                    return 'Bundle()'
                def _repr_mimebundle_(self, include=None, exclude=None):
                    return ({{'text/plain': 'bundle text', 'application/vnd.custom+json': {{'k': 1}}}},
                            {{'application/vnd.custom+json': {{'expanded': True}}}})
            rich_objects = [
                Rich(), Bundle(), HTML('<i>h</i>'), Markdown('**m**'), JSON({{'a': [1, 2]}}),
                Image(data=PNG), SVG('<svg xmlns="http://www.w3.org/2000/svg"></svg>'),
                Latex(r'$\\alpha$'), {{'nested': list(range(30))}}, 42,
            ]
            """
        )
    )
    show = cell(
        """
        for obj in rich_objects:
            display(obj)
        display({'text/plain': 'raw', 'text/html': '<u>raw</u>'}, raw=True)
        display(Rich(), metadata={'text/html': {'isolated': False}})
        """
    )
    in_kernel = kernel.run(show)
    isolated = kernel.run("%%isolate rich_objects Rich\n" + show)
    expected = [(d["data"], d["metadata"]) for d in displays(in_kernel)]
    got = [(d["data"], d["metadata"]) for d in displays(isolated)]
    assert len(got) == 12
    assert got == expected
    assert got[0][0]["image/png"] == PNG_1X1


def test_update_display_and_clear_output(kernel):
    res = kernel.run(
        cell(
            """
            %%isolate
            from IPython.display import HTML, clear_output, update_display
            handle = display(HTML('<p>one</p>'), display_id=True)
            handle.update(HTML('<p>two</p>'))
            display('fixed 1', display_id='fixed-id')
            update_display('fixed 2', display_id='fixed-id')
            print('first')
            clear_output(wait=True)
            print('second')
            display('fresh', clear=True)
            """
        )
    )
    shown = outputs(res)
    assert [kind for kind, _ in shown] == [
        "display_data",
        "update_display_data",
        "display_data",
        "update_display_data",
        "stream:stdout",
        "clear_output",
        "stream:stdout",
        "clear_output",
        "display_data",
    ]
    ids = [
        m["content"]["transient"]["display_id"]
        for m in own_messages(res)
        if m["msg_type"] in ("display_data", "update_display_data")
        and m["content"].get("transient")
    ]
    assert len(ids) == 4 and ids[0] == ids[1] and ids[2] == ids[3] == "fixed-id"
    assert shown[1][1]["text/html"] == "<p>two</p>"
    assert shown[3][1] == {"text/plain": "'fixed 2'"}
    assert shown[5][1] is True
    assert shown[8][1] == {"text/plain": "'fresh'"}


PLOT = cell(
    """
    import matplotlib.pyplot as plt
    plt.plot([1, 4, 9])
    plt.title('squares')
    plt.show()
    fig, ax = plt.subplots()
    ax.bar(['a', 'b'], [3, 5])
    print('drawn')
    """
)


def test_matplotlib_figures_show_as_the_inline_backend_shows_them(kernel):
    in_kernel = kernel.run(PLOT)
    isolated = kernel.run("%%isolate\n" + PLOT)
    # plt.show() displays at once; the figure still open at the end shows after the text.
    assert [kind for kind, _ in outputs(isolated)] == [
        "display_data",
        "stream:stdout",
        "display_data",
    ]
    assert [kind for kind, _ in outputs(in_kernel)] == [
        "display_data",
        "stream:stdout",
        "display_data",
    ]
    sizes = [png_size(d["data"]["image/png"]) for d in displays(isolated)]
    # Same default size, DPI and tight bounding box as the kernel's inline backend.
    assert sizes == [png_size(d["data"]["image/png"]) for d in displays(in_kernel)]
    for width, height in sizes:
        assert 400 < width <= 640 and 300 < height <= 480  # 6.4 x 4.8 in at 100 dpi, cropped
    assert displays(isolated)[0]["data"]["text/plain"] == "<Figure size 640x480 with 1 Axes>"
    # The figure that came back as a variable is closed: the kernel does not show it again.
    assert kernel.run("print(type(fig).__name__)").stdout.strip() == "Figure"
    assert (
        kernel.run("import matplotlib.pyplot as plt\nprint(plt.get_fignums())").stdout.strip()
        == "[]"
    )


def test_worker_draws_with_agg_whatever_backend_the_kernel_hands_down(kernel):
    res = kernel.run(
        cell(
            """
            %%isolate
            import os, matplotlib
            import matplotlib.pyplot as plt
            kernel_backend = os.environ.get('MPLBACKEND')
            worker_backend = matplotlib.get_backend()
            """
        )
    )
    assert res.ok and not displays(res)  # no figure, nothing shown
    kernel_backend, worker_backend = kernel.value("(kernel_backend, worker_backend)")
    assert "inline" in kernel_backend
    assert worker_backend.lower() == "agg"


def test_figures_left_open_show_even_when_the_cell_fails(kernel):
    res = kernel.execute(
        cell(
            """
            %%isolate
            import matplotlib.pyplot as plt
            plt.plot([3, 1, 2])
            raise ValueError('after plotting')
            """
        )
    )
    assert res.error["ename"] == "ValueError"
    assert len(displays(res)) == 1 and "image/png" in displays(res)[0]["data"]
    kinds = [m["msg_type"] for m in own_messages(res)]
    assert kinds.index("display_data") < kinds.index("error")


def test_dataframe_result_and_display_match_the_kernel(kernel):
    res = kernel.run(
        cell(
            """
            %%isolate
            import pandas as pd
            pd.DataFrame({'a': [1, 2], 'b': ['x', 'y']})
            """
        )
    )
    assert "<table" in res.result["text/html"] and "dataframe" in res.result["text/html"]
    assert "a  b" in res.result["text/plain"]
    # A wide frame (pandas limits the columns it shows) renders as in a normal cell.
    kernel.run(
        "import numpy as np, pandas as pd\nwide = pd.DataFrame(np.arange(120).reshape(3, 40))"
    )
    in_kernel = kernel.run("display(wide)")
    isolated = kernel.run("%%isolate wide\ndisplay(wide)")
    made_inside = kernel.run(
        "%%isolate\nimport numpy as np, pandas as pd\ndisplay(pd.DataFrame(np.arange(120).reshape(3, 40)))"
    )
    assert displays(isolated)[0]["data"] == displays(in_kernel)[0]["data"]
    assert displays(made_inside)[0]["data"] == displays(in_kernel)[0]["data"]


def test_unpicklable_value_with_repr_html_is_the_cells_result(kernel):
    res = kernel.run(
        cell(
            """
            %%isolate
            import threading
            class Report:
                def __init__(self):
                    self.lock = threading.Lock()
                def __repr__(self):
                    return 'Report()'
                def _repr_html_(self):
                    return '<h3>report</h3>'
            Report()
            """
        )
    )
    assert [kind for kind, _ in outputs(res)] == ["execute_result"]
    assert res.result == {"text/plain": "Report()", "text/html": "<h3>report</h3>"}


def test_warnings_and_logging_reach_stderr(kernel):
    res = kernel.run(
        cell(
            """
            %%isolate
            import logging, warnings
            warnings.warn('mind the gap')
            logging.warning('disk almost full')
            logging.getLogger('app').error('app failed')
            print('done')
            """
        )
    )
    assert "UserWarning: mind the gap" in res.stderr
    assert "<isolated cell" in res.stderr  # the warning points at the cell
    assert "disk almost full" in res.stderr and "app failed" in res.stderr
    assert res.stdout == "done\n"


def test_input_and_getpass_ask_the_front_end_as_in_an_ordinary_cell(kernel):
    """``input()``, ``getpass()`` and ``sys.stdin`` raised ``EOFError`` in an isolated cell:
    the worker has no stdin. They ask the kernel, which sends the front end the same input
    request an ordinary cell's would (a password box for ``getpass``)."""
    res = kernel.execute(
        "%%isolate\nprint('before')\nname = input('Your name: ')\nprint('hello', name)", answers=["Ada"]
    )
    assert res.ok, res.error_text
    assert res.asked == [{"prompt": "Your name: ", "password": False}]
    assert res.stdout == "before\nhello Ada\n"
    res = kernel.execute(
        "%%isolate\nimport getpass, sys\nsecret = getpass.getpass('Token: ')\nline = sys.stdin.readline()",
        answers=["s3cret", "a line"],
    )
    assert res.ok, res.error_text
    assert res.asked == [{"prompt": "Token: ", "password": True}, {"prompt": "", "password": False}]
    assert kernel.value("(name, secret, line)") == ("Ada", "s3cret", "a line\n")
    assert "GetPassWarning" not in res.stderr


def test_input_where_no_one_can_answer_says_so(kernel):
    # A front end that takes no input (nbclient, a script): what the kernel raised, as EOFError.
    res = kernel.execute("%%isolate\nname = input('name? ')")
    assert res.error["ename"] == "EOFError"  # what input() raises without a stdin, as in Python
    tb = "\n".join(res.error["traceback"])
    assert "nbisolate" not in tb and "name = input('name? ')" in tb  # the user's code only
    assert "StdinNotImplementedError" in res.error["evalue"], res.error["evalue"]
    assert "normal cell" in res.error["evalue"]  # and what to do
    res = kernel.execute("%%isolate\nimport getpass\ntoken = getpass.getpass('Token: ')")
    assert res.error["evalue"].startswith("getpass() in an isolated cell asked the kernel"), res.error["evalue"]
    # A sweep's values, each its own worker, or children of one leader: nothing waits to answer.
    for values in (2, 8):
        kernel.run(
            f"%%isolate --over v=range({values})\nimport getpass\ntry:\n    getpass.getpass(f'{{v}}? ')\n"
            "except EOFError as e:\n    why = str(e)"
        )
        why = kernel.value("why")
        assert len(why) == values and all("getpass() has no one to ask" in w for w in why), why
        assert "normal cell" in why[0]


def test_interrupting_a_cell_waiting_for_input_stops_it(fresh_kernel):
    k = fresh_kernel
    k.run("kept = 'before'")
    msg_id = k.kc.execute("%%isolate\nkept = input('wait: ')", allow_stdin=True)
    request = k.kc.get_stdin_msg(timeout=30)
    assert request["content"]["prompt"] == "wait: "
    k.interrupt()
    reply = k.kc.get_shell_msg(timeout=30)
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = k.kc.get_shell_msg(timeout=30)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
    assert k.value("kept") == "before"
    assert k.run("%%isolate\n'still fine'").result == {"text/plain": "'still fine'"}


def test_a_timeout_ends_a_question_nobody_answers(fresh_kernel):
    """The worker is gone at its --timeout: the kernel stops waiting for the answer too."""
    k = fresh_kernel
    msg_id = k.kc.execute("%%isolate --timeout 2\nkept = input('never answered: ')", allow_stdin=True)
    assert k.kc.get_stdin_msg(timeout=30)["content"]["prompt"] == "never answered: "
    reply = k.kc.get_shell_msg(timeout=30)  # no answer sent
    while reply["parent_header"].get("msg_id") != msg_id:
        reply = k.kc.get_shell_msg(timeout=30)
    assert reply["content"]["ename"] == "IsolateTimeout", reply["content"]
    assert k.run("%%isolate\n'still fine'").result == {"text/plain": "'still fine'"}
    assert k.value("'kept' in dir()") is False


def _widget_traffic(res) -> list[tuple]:
    """The cell's widget messages as a front end reads them: which models open (by kind), which
    model each display shows and what each update says, the random model ids put in order."""
    ids: dict[str, str] = {}

    def named(comm_id: str) -> str:
        return ids.setdefault(comm_id, f"model{len(ids)}")

    seen = []
    for msg in res.messages:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "comm_open" and content.get("target_name") == "jupyter.widget":
            state = content["data"]["state"]
            if "nbisolate" in str(state.get("_dom_classes", "")):
                continue  # the panel's own
            seen.append(("open", named(content["comm_id"]), state["_model_name"]))
        elif kind == "comm_msg" and content["comm_id"] in ids:
            seen.append(("update", named(content["comm_id"]), content["data"].get("state")))
        elif kind == "display_data" and WIDGET_MIME in content["data"]:
            seen.append(("display", named(content["data"][WIDGET_MIME]["model_id"])))
    return seen


def _relays_widgets(kernel) -> bool:
    """ipywidgets 8.1 on makes its comms with ``comm.create_comm``, which the worker relays."""
    return kernel.value("hasattr(__import__('ipywidgets').widgets.widget, 'comm')")


WIDGET_CELL = cell(
    """
    import ipywidgets as widgets
    import time
    bar = widgets.IntProgress(min=0, max=3, description="steps")
    display(bar)
    for step in range(1, 4):
        bar.value = step
        time.sleep(0.02)
    bar.bar_style = "success"
    """
)


def test_a_widget_shows_and_moves_as_in_an_ordinary_cell(kernel):
    """A widget the cell makes sends the front end what an ordinary cell's sends: its models
    open with their state, the display names its model, each change is an update, in order."""
    if not _relays_widgets(kernel):
        pytest.skip("ipywidgets 8.0 makes ipykernel's Comm itself: its widgets stay in the worker")
    ordinary = kernel.run(WIDGET_CELL)
    res = kernel.run("%%isolate --quiet\n" + WIDGET_CELL)  # (the panel is made of widgets too)
    assert _widget_traffic(res) == _widget_traffic(ordinary), (_widget_traffic(res), _widget_traffic(ordinary))
    assert ("update", "model2", {"value": 3}) in _widget_traffic(res)
    assert "widget" not in res.stderr, res.stderr


def test_a_widget_the_cell_binds_comes_back_on_the_model_it_shows(kernel):
    """``bar`` is then the kernel's widget for the model shown above: a normal cell moves it, and
    what the front end changes reaches it, as for a widget an ordinary cell made."""
    if not _relays_widgets(kernel):
        pytest.skip("ipywidgets 8.0 makes ipykernel's Comm itself: its widgets stay in the worker")
    res = kernel.run("%%isolate --quiet\n" + WIDGET_CELL)  # (the panel is made of widgets too)
    shown = [m["content"]["data"][WIDGET_MIME]["model_id"] for m in res.of("display_data") if WIDGET_MIME in m["content"]["data"]]
    assert kernel.value("(type(bar).__name__, bar.model_id, bar.value, bar.bar_style, bar.description)") == (
        "IntProgress", shown[0], 3, "success", "steps"
    )
    assert kernel.value("__import__('ipywidgets').widgets.widget._instances[bar.model_id] is bar")
    after = kernel.run("bar.value = 1")
    assert [(m["content"]["comm_id"], m["content"]["data"]["state"]) for m in after.of("comm_msg")] == [(shown[0], {"value": 1})]
    # the front end moves it (as a slider's drag would): the kernel's widget takes the change
    _page_sends(kernel, shown[0], drag(2))
    assert wait_until(lambda: kernel.value("bar.value") == 2, 10)


def test_a_notebook_widget_moves_as_the_cell_runs_and_stays_itself(kernel):
    """A bar made in a normal cell and moved by a training loop in an isolated one: the page gets
    each step as the cell runs, the notebook's widget takes them (its observers run), and
    ``bar`` is the same object after the cell, as after an ordinary cell."""
    if not _relays_widgets(kernel):
        pytest.skip("ipywidgets 8.0 makes ipykernel's Comm itself: its widgets stay in the worker")
    setup = (
        "import ipywidgets as widgets\nbar = widgets.IntProgress(max=4)\nseen = []\n"
        "bar.observe(lambda change: seen.append(change['new']), 'value')\nbar_id = id(bar)"
    )
    loop = "import time\nfor step in range(1, 5):\n    bar.value = step\n    time.sleep(0.01)\nlast = bar.value"
    kernel.run(setup)
    ordinary = kernel.run(loop)
    ordinary_seen = kernel.value("seen")
    kernel.run(setup)
    model = kernel.value("bar.model_id")
    res = kernel.run("%%isolate --quiet\n" + loop)
    steps = [m["content"]["data"]["state"] for m in res.of("comm_msg") if m["content"]["comm_id"] == model]
    assert steps == [m["content"]["data"]["state"] for m in ordinary.of("comm_msg")] == [{"value": v} for v in range(1, 5)]
    assert kernel.value("(id(bar) == bar_id, bar.value, seen, last)") == (True, 4, ordinary_seen, 4)
    assert ordinary_seen == [1, 2, 3, 4]


def test_with_an_output_widget_the_cells_output_goes_into_it(kernel):
    """``with out:`` sets the widget's ``msg_id`` to the request the kernel runs, which the page
    reads as "this cell's output goes into the widget now": the same messages, in the same
    order, as in an ordinary cell (the worker's mark replaced by the request's id)."""
    if not _relays_widgets(kernel):
        pytest.skip("ipywidgets 8.0 makes ipykernel's Comm itself: its widgets stay in the worker")
    code = cell(
        """
        import ipywidgets as widgets
        out = widgets.Output()
        display(out)
        print("before")
        with out:
            print("inside")
            display({"text/plain": "shown inside"}, raw=True)
        print("after")
        """
    )

    def sequence(res) -> list[tuple[str, str]]:
        request = res.reply["parent_header"]["msg_id"]
        seen = []
        for msg in own_messages(res) + res.of("comm_msg"):
            kind, content = msg["msg_type"], msg["content"]
            state = content.get("data", {}).get("state") if kind == "comm_msg" else None
            if kind == "stream":
                seen.append((msg["header"]["date"], "stream", content["text"]))
            elif state and "msg_id" in state:
                seen.append((msg["header"]["date"], "into the widget", "yes" if state["msg_id"] == request else state["msg_id"]))
            elif kind == "display_data":
                seen.append((msg["header"]["date"], "display", content["data"]["text/plain"]))
        return [item[1:] for item in sorted(seen)]

    ordinary = kernel.run(code)
    res = kernel.run("%%isolate --quiet\n" + code)
    assert sequence(res) == sequence(ordinary), (sequence(res), sequence(ordinary))
    assert ("into the widget", "yes") in sequence(res) and ("stream", "inside\n") in sequence(res)


def test_an_exception_inside_an_output_widget_shows_there_as_an_error_and_the_cell_goes_on(kernel):
    """``with out:`` around a failing call: IPython shows the exception as an error output while the
    widget takes the cell's output, and the cell goes on, as in an ordinary cell; its traceback
    names the cell's function as IPython does (``Cell In[n], line k, in fail()``)."""
    if not _relays_widgets(kernel):
        pytest.skip("ipywidgets 8.0 makes ipykernel's Comm itself: its widgets stay in the worker")
    code = cell(
        """
        import ipywidgets as widgets
        out = widgets.Output()
        display(out)
        def fail():
            raise ValueError("inside the widget")
        with out:
            print("before")
            fail()
        went_on = True
        """
    )

    def sequence(res) -> list[tuple]:
        request = res.reply["parent_header"]["msg_id"]
        seen = []
        for msg in res.messages:
            kind, content = msg["msg_type"], msg["content"]
            state = content.get("data", {}).get("state") if kind == "comm_msg" else None
            if state and "msg_id" in state:
                seen.append(("into the widget", state["msg_id"] == request))
            elif kind == "stream":
                seen.append((kind, content["text"]))
            elif kind == "error":
                seen.append((kind, content["ename"], content["evalue"]))
        return seen

    ordinary = kernel.run(code)
    res = kernel.run("%%isolate --quiet\n" + code)
    assert sequence(res) == sequence(ordinary) == [
        ("into the widget", True), ("stream", "before\n"), ("error", "ValueError", "inside the widget"),
        ("into the widget", False),
    ], (sequence(res), sequence(ordinary))
    shown = re.sub(r"\x1b\[[0-9;]*m", "", "\n".join(res.of("error")[0]["content"]["traceback"]))
    assert "line 6, in fail()" in shown and "ValueError: inside the widget" in shown, shown
    assert res.ok and kernel.value("went_on") is True


def test_interact_shows_as_in_an_ordinary_cell_and_its_widget_comes_back(kernel):
    """``interact`` opens the same models and shows the function's output in its Output widget; the
    function comes back with its ``widget``: ipywidgets' ``interactive`` cannot be made from its
    traits alone, so it is the kernel's widget for the model shown, made an ``interactive``."""
    if not _relays_widgets(kernel):
        pytest.skip("ipywidgets 8.0 makes ipykernel's Comm itself: its widgets stay in the worker")
    code = cell(
        """
        from ipywidgets import interact, IntSlider
        def shown(x):
            print("x is", x)
        shown = interact(shown, x=IntSlider(value=3, max=10))
        """
    )
    ordinary = kernel.run(code)
    res = kernel.run("%%isolate --quiet\n" + code)
    opened = [m[2] for m in _widget_traffic(res) if m[0] == "open"]
    assert opened == [m[2] for m in _widget_traffic(ordinary) if m[0] == "open"] and "SliderStyleModel" in opened
    assert res.stdout == ordinary.stdout == "x is 3\n" and res.stderr == "", res.stderr
    shown = [d["data"][WIDGET_MIME]["model_id"] for d in displays(res) if WIDGET_MIME in d["data"]]
    assert kernel.value("(shown.widget.model_id, shown.widget.children[0].value, type(shown.widget).__name__)") == (
        shown[0], 3, "interactive"
    )


CLICK = {"method": "custom", "content": {"event": "click"}}
"""What the page sends when a person clicks a button."""


def drag(value: int) -> dict:
    """What the page sends when a person drags a slider to ``value``."""
    return {"method": "update", "state": {"value": value}, "buffer_paths": []}


def _page_sends(kernel, comm_id: str, data: dict) -> list[tuple]:
    """Send what the page sends when a person clicks or drags a widget; what the front end then
    gets back (the kernel's messages under that request, until it is idle again), in order."""
    kc = kernel.kc
    msg = kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
    kc.session.send(kc.shell_channel.socket, msg)
    seen = []
    while True:
        reply = kc.get_iopub_msg(timeout=30)
        if reply["parent_header"].get("msg_id") != msg["header"]["msg_id"]:
            continue
        kind, content = reply["msg_type"], reply["content"]
        if kind == "status":
            if content["execution_state"] == "idle":
                return seen
        elif kind == "stream":
            seen.append(("stream", content["name"], content["text"]))
        elif kind == "comm_msg":
            state = content["data"].get("state", {})
            if "msg_id" in state:  # an Output widget takes the output of this request, or stops
                state = dict(state, msg_id="this request" if state["msg_id"] == msg["header"]["msg_id"] else state["msg_id"])
            seen.append(("update", "model" if content["comm_id"] == comm_id else "other", state))
        else:
            seen.append((kind,))


CALLBACKS = cell(
    """
    import ipywidgets as widgets
    clicks, seen = [], []
    button = widgets.Button(description="go")
    out = widgets.Output()
    def go(b):
        clicks.append(b.description)
        with out:
            print("clicked", len(clicks))
    button.on_click(go)
    slider = widgets.IntSlider()
    slider.observe(lambda change: seen.append(change["new"]), "value")
    twin = widgets.IntSlider()
    pair = widgets.link((slider, "value"), (twin, "value"))
    display(button, out, slider, twin)
    """
)


def test_what_a_cell_registers_on_its_widgets_runs_when_the_page_clicks(kernel):
    """``on_click``, ``observe`` and ``link`` registered in an isolated cell: the page's click and
    drag run them in the kernel, with the notebook's names, and the front end gets what it gets
    from an ordinary cell's widgets (the printout into the Output widget, the linked slider)."""
    if not _relays_widgets(kernel):
        pytest.skip("ipywidgets 8.0 makes ipykernel's Comm itself: its widgets stay in the worker")
    seen = {}
    for how, prefix in (("ordinary", ""), ("isolated", "%%isolate --quiet\n")):
        res = kernel.run(prefix + CALLBACKS)
        assert res.stderr == "", res.stderr
        clicked = _page_sends(kernel, kernel.value("button.model_id"), CLICK)
        dragged = _page_sends(kernel, kernel.value("slider.model_id"), drag(7))
        state = kernel.value("(clicks, seen, twin.value, pair.source[0] is slider, button._click_handlers.callbacks == [go])")
        seen[how] = (clicked, [m for m in dragged if m[0] != "update" or m[1] != "other"], state)
    assert seen["isolated"] == seen["ordinary"], seen
    clicked, _, state = seen["isolated"]
    assert ("stream", "stdout", "clicked 1\n") in clicked and ("update", "other", {"msg_id": "this request"}) in clicked
    assert state == (["go"], [7], 7, True, True)


INTERACTIVE = cell(
    """
    import ipywidgets as widgets
    from ipywidgets import interact, interact_manual, IntSlider
    def show(x, y=2):
        print("x is", x, "y is", y)
        return x * y
    show = interact(show, x=IntSlider(value=3, max=10), y=(0, 5))
    @interact_manual(n=4)
    def twice(n):
        print("twice", 2 * n)
    class Counter(widgets.Button):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.n = 0
            self.on_click(self.bump)
        def bump(self, b):
            self.n += 1
            self.description = f"clicked {self.n}"
    counter = Counter(description="count")
    counter.n = 5
    display(counter)
    """
)


def test_interact_and_a_widget_class_of_the_cell_answer_the_page_as_in_an_ordinary_cell(kernel):
    """After the cell, dragging ``interact``'s slider runs its function again into its Output,
    ``interact_manual``'s button runs it once, and a widget class of the cell's own (which
    registers its method in ``__init__``) counts on from where the cell left it: the same messages
    to the page as an ordinary cell's, run in the kernel."""
    if not _relays_widgets(kernel):
        pytest.skip("ipywidgets 8.0 makes ipykernel's Comm itself: its widgets stay in the worker")
    seen = {}
    for how, prefix in (("ordinary", ""), ("isolated", "%%isolate --quiet\n")):
        res = kernel.run(prefix + INTERACTIVE)
        assert res.stderr == "", res.stderr
        seen[how] = (
            _page_sends(kernel, kernel.value("show.widget.children[0].model_id"), drag(7)),
            _page_sends(kernel, kernel.value("twice.widget.manual_button.model_id"), CLICK),
            _page_sends(kernel, kernel.value("counter.model_id"), CLICK),
            kernel.value("(type(show.widget).__name__, show.widget.result, counter.n, len(counter._click_handlers.callbacks))"),
        )
    assert seen["isolated"] == seen["ordinary"], seen
    dragged, pressed, counted, state = seen["isolated"]
    assert ("stream", "stdout", "x is 7 y is 2\n") in dragged and ("stream", "stdout", "twice 8\n") in pressed
    assert counted == [("update", "model", {"description": "clicked 6"})]
    assert state == ("interactive", 14, 6, 1)


def test_a_notebook_widget_keeps_what_the_cell_registered_on_it(kernel):
    """A slider made in a normal cell, observed in an isolated one: the observer runs in the kernel
    when the page drags it, once, and the notebook's slider is still the same object, with what
    the cell set beside its traits (``knob.step_count``), as after an ordinary cell."""
    if not _relays_widgets(kernel):
        pytest.skip("ipywidgets 8.0 makes ipykernel's Comm itself: its widgets stay in the worker")
    kernel.run(cell(
        """
        import ipywidgets as widgets
        class Knob(widgets.IntSlider):
            step_count = 0
        knob = Knob()
        knob.step_count = 5
        moves = []
        knob_id = id(knob)
        """
    ))
    res = kernel.run(cell(
        """
        %%isolate --quiet
        knob.observe(lambda change: moves.append(change['new']), 'value')
        counted = knob.step_count
        knob.step_count += 1
        """
    ))
    assert res.stderr == "", res.stderr
    _page_sends(kernel, kernel.value("knob.model_id"), drag(4))
    assert kernel.value("(moves, id(knob) == knob_id, counted, knob.step_count)") == ([4], True, 5, 6)


def test_a_callback_that_cannot_come_back_is_named_and_the_rest_arrive(kernel):
    """A click handler holding a database connection cannot leave the worker: the cell says so,
    and its widget and its other variables come back."""
    if not _relays_widgets(kernel):
        pytest.skip("ipywidgets 8.0 makes ipykernel's Comm itself: its widgets stay in the worker")
    code = cell(
        """
        import ipywidgets as widgets, sqlite3
        def counter():
            db = sqlite3.connect(":memory:")
            return lambda b: db.execute("select 1")
        press = widgets.Button(description="count")
        press.on_click(counter())
        kept = 5
        """
    )
    res = kernel.run("%%isolate --quiet\n" + code)
    assert (
        "nbisolate: what the cell registered to run on press (Button) could not come back: "
        "press._click_handlers[0].<closure db>: sqlite3.Connection"
    ) in res.stderr, res.stderr
    assert "register them in a normal cell" in res.stderr, res.stderr
    assert kernel.value("(kept, press.description, press._click_handlers.callbacks)") == (5, "count", [])


def test_a_notebook_progress_bar_is_the_notebooks_widget_bar(kernel):
    """``from tqdm.notebook import tqdm`` draws its widget bar, as in an ordinary cell (it drew
    tqdm's text bar when widgets could not leave the worker)."""
    if not _relays_widgets(kernel):
        pytest.skip("ipywidgets 8.0 makes ipykernel's Comm itself: its widgets stay in the worker")
    code = cell(
        """
        from tqdm.notebook import tqdm, trange
        total = 0
        for i in tqdm(range(5), desc="epochs"):
            total += i
        for j in trange(3):
            pass
        """
    )
    ordinary = kernel.run(code)
    res = kernel.run("%%isolate --quiet\n" + code)
    opened = [m[2] for m in _widget_traffic(res) if m[0] == "open"]
    assert opened == [m[2] for m in _widget_traffic(ordinary) if m[0] == "open"] and "FloatProgressModel" in opened
    assert [m[0] for m in _widget_traffic(res)] == [m[0] for m in _widget_traffic(ordinary)]
    assert "epochs" not in res.stderr and "widget" not in res.stderr, res.stderr
    assert kernel.value("total") == 10
    # The kernel has a widget for each bar shown, as after an ordinary cell: a page that reloads
    # asks the kernel's widgets for their state, and gets the bars at 100%.
    shown = [d["data"][WIDGET_MIME]["model_id"] for d in displays(res) if WIDGET_MIME in d["data"]]
    assert len(shown) == 2
    kernel.run("from ipywidgets.widgets.widget import _instances")
    assert kernel.value(f"[type(_instances[m]).__name__ for m in {shown!r}]") == ["HBox", "HBox"]
    assert kernel.value(f"[_instances[m].children[1].value for m in {shown!r}]") == [5, 3]


def test_where_nothing_shows_widgets_a_sweep_makes_say_so_and_come_back_new(kernel):
    """A sweep's values run where the kernel shows no widgets: a widget says it cannot be shown
    there, a progress bar draws as text, and what a value binds comes back as a new widget
    with its state."""
    res = kernel.run(
        cell(
            """
            %%isolate --over v=range(2)
            import ipywidgets as widgets
            from tqdm.notebook import tqdm
            slider = widgets.IntSlider(value=v + 3)
            display(slider)
            for i in tqdm(range(2), desc="inner"):
                pass
            """
        )
    )
    assert res.ok, res.error_text
    assert "IntSlider widget created in an isolated cell" in res.stderr and "comm channel" in res.stderr
    assert "inner: 100%" in res.stderr
    assert sorted(d["data"]["text/plain"] for d in displays(res)) == ["IntSlider(value=3)", "IntSlider(value=4)"]
    assert not [d for d in displays(res) if WIDGET_MIME in d["data"]]
    assert kernel.value("[(type(s).__name__, s.value) for s in slider]") == [("IntSlider", 3), ("IntSlider", 4)]
    assert kernel.value("len({s.model_id for s in slider})") == 2


def test_a_widget_display_dict_is_explained_once(kernel):
    """A widget view sent by hand (no widget object) is explained the first time only."""
    res = kernel.run(
        cell(
            """
            %%isolate
            from IPython.display import display
            view = {"application/vnd.jupyter.widget-view+json": {"model_id": "x"}, "text/plain": "w"}
            display(view, raw=True)
            display(view, raw=True)
            """
        )
    )
    assert res.stderr.count("comm channel") == 1, res.stderr


def test_display_outside_a_kernel_prints_the_text_form():
    """run_isolated from a plain Python process: displays fall back to their text, in order."""
    script = (
        "from nbisolate import run_isolated\n"
        "run_isolated(\"print('a')\\ndisplay({'k': 1})\\nprint('b')\", {})\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == "a\n{'k': 1}\nb\n"


FORMAT_SCRIPT = """
import base64, json, struct, sys
if sys.argv[1] == "no-ipython":
    sys.modules["IPython"] = None  # as if IPython were not installed
import matplotlib
matplotlib.use("agg")
import matplotlib.pyplot as plt
from nbisolate import display_worker

class Rich:
    def __repr__(self):
        return "Rich()"
    def _repr_html_(self):
        return "<p>rich</p>"

fig = plt.figure()
plt.plot([1, 4, 9])
png = display_worker.format_object(fig)[0]["image/png"]
print(json.dumps({
    "rich": display_worker.format_object(Rich())[0],
    "png_size": struct.unpack(">II", base64.b64decode(png)[16:24]),
    "ipython": "IPython.core.formatters" in sys.modules,
}))
"""


def test_formatting_without_ipython_gives_the_same_bundles_and_figure_size():
    """The fallback formatter (no IPython in the worker's environment) matches IPython's."""
    import json

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    got = {}
    for mode in ("ipython", "no-ipython"):
        done = subprocess.run(
            [sys.executable, "-c", FORMAT_SCRIPT, mode],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        got[mode] = json.loads(done.stdout)
    assert got["ipython"]["ipython"] is True and got["no-ipython"]["ipython"] is False
    assert got["no-ipython"]["rich"] == got["ipython"]["rich"]
    assert got["no-ipython"]["png_size"] == got["ipython"]["png_size"]


def test_what_a_cell_imports_the_template_imports_for_the_next_cells(fresh_kernel, tmp_path):
    """A plotting cell's worker imports matplotlib (about 0.4 s) on every run unless the
    template has it: once a cell has imported it, the template does, and the next runs show
    the same figure and HTML.  A module of the user's own is still imported afresh by each
    worker, so an edit to it shows in the next isolated cell."""
    k = fresh_kernel
    code = cell(
        """
        %%isolate
        import sys
        had = sorted(m for m in ('IPython.display', 'matplotlib.pyplot') if m in sys.modules)
        from IPython.display import HTML
        import matplotlib.pyplot as plt
        plt.plot([1, 2])
        HTML('<b>bold</b>')
        """
    )
    first = k.execute(code)
    assert first.ok, first.error_text
    assert k.value("had") == []
    later = None
    for _ in range(40):  # the template imports them while the next cells run
        later = k.execute(code)
        assert later.ok, later.error_text
        if k.value("had") == ["IPython.display", "matplotlib.pyplot"]:
            break
    else:
        raise AssertionError(f"the template never had the cell's imports: {k.value('had')}")
    for res in (first, later):
        shown = dict(outputs(res))
        assert sorted(shown) == ["display_data", "execute_result"], outputs(res)
        assert "<b>bold</b>" in shown["execute_result"]["text/html"]
    assert png_size(displays(later)[0]["data"]["image/png"]) == png_size(
        displays(first)[0]["data"]["image/png"]
    )

    (tmp_path / "nbi_own_module.py").write_text("VALUE = 1\n")
    k.run(f"import sys\nsys.path.insert(0, {str(tmp_path)!r})")
    assert k.execute("%%isolate\nimport nbi_own_module\nseen = nbi_own_module.VALUE").ok
    assert k.value("seen") == 1
    k.run("import time\ntime.sleep(1.5)")  # time for a preload, had there been one
    (tmp_path / "nbi_own_module.py").write_text("VALUE = 22\n")
    assert k.execute("%%isolate\nimport nbi_own_module\nseen = nbi_own_module.VALUE").ok
    assert k.value("seen") == 22
