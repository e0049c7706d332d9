"""%pickle_check through a real kernel: what a notebook user sees.

The kernel is the real environment of the feature: its ``__main__`` is the
notebook's namespace with no file behind it, which is exactly what makes
notebook-defined functions fail in spawned children.
"""

from __future__ import annotations

import html
import textwrap


def cell(code: str) -> str:
    return textwrap.dedent(code).strip("\n")


def shown(res) -> dict:
    """The rich output of a cell: its execute_result, else its last display_data."""
    if res.result is not None:
        return res.result
    assert res.displays, f"nothing displayed; messages: {[m['msg_type'] for m in res.messages]}"
    return res.displays[-1]["data"]


def test_magic_names_member_path_and_type_in_text_and_html(kernel):
    kernel.run(
        cell(
            """
            import sqlite3

            class Store:
                def __init__(self):
                    self.db = sqlite3.connect(":memory:")
                    self.table = "prices"

            class Engine:
                def __init__(self):
                    self.store = Store()
                    self.symbols = ["AAPL", "MSFT"]

            e = Engine()
            """
        )
    )
    data = shown(kernel.run("%pickle_check e"))
    text, page = data["text/plain"], data["text/html"]
    assert "e.store.db" in text and "sqlite3.Connection" in text
    assert "database connection" in text
    assert html.escape("e.store.db") in page and "sqlite3.Connection" in page
    assert "<table" in page


def test_python_api_in_the_kernel(kernel):
    kernel.run(
        cell(
            """
            import sqlite3, nbisolate
            cfg = {"feeds": ["csv", sqlite3.connect(":memory:")]}
            report = nbisolate.pickle_check(cfg, name="cfg")
            first = report.problems[0]
            """
        )
    )
    assert kernel.value("(first.path, first.type_name, report.ok)") == (
        "cfg['feeds'][1]",
        "sqlite3.Connection",
        False,
    )
    data = shown(kernel.run("report"))
    assert "cfg['feeds'][1]" in data["text/plain"]
    assert html.escape("cfg['feeds'][1]") in data["text/html"]


def test_notebook_function_is_a_spawn_trap_for_pickle_only(kernel):
    kernel.run("def work(x):\n    return x * 2")
    data = shown(kernel.run("%pickle_check work"))
    text = data["text/plain"]
    assert "defined in the notebook" in text
    assert "FAILS under spawn" in text
    verdicts = kernel.value(
        "{k: r.verdict for k, r in nbisolate.pickle_check(work, 'work').results.items()}"
    )
    assert verdicts == {"pickle": "spawn", "dill": "ok", "cloudpickle": "ok"}
    # what a spawned child really says
    error = kernel.value(
        "__import__('nbisolate.probe').probe.spawn_loads(__import__('pickle').dumps(work))"
    )
    assert "Can't get attribute 'work'" in error


def test_an_lru_cached_notebook_function_is_a_spawn_trap_for_cloudpickle_too(kernel):
    """cloudpickle copies the notebook's functions, but writes one under ``functools.lru_cache``
    by name, as pickle does; %%isolate sends it by value."""
    kernel.run("import functools\n@functools.lru_cache\ndef memo(x):\n    return x * 2")
    text = shown(kernel.run("%pickle_check memo"))["text/plain"]
    assert "function __main__.memo (under functools.lru_cache)" in text
    verdicts = kernel.value(
        "{k: r.verdict for k, r in nbisolate.pickle_check(memo, 'memo').results.items()}"
    )
    assert verdicts == {"pickle": "spawn", "dill": "ok", "cloudpickle": "spawn"}
    error = kernel.value(
        "__import__('nbisolate.probe').probe.spawn_loads(__import__('cloudpickle').dumps(memo))"
    )
    assert "Can't get attribute 'memo'" in error


def test_whole_namespace_lists_problems_first_and_modules_as_fine(kernel):
    kernel.run("import json\nclean_numbers = [1, 2, 3]\nlog_lock = __import__('threading').Lock()")
    data = shown(kernel.run("%pickle_check"))
    text = data["text/plain"]
    assert "log_lock" in text and "_thread.lock" in text
    assert text.index("log_lock") < text.index("clean_numbers")
    assert "json" in text and "re-imported by name" in text
    assert "In" not in text.split()  # IPython's own history is not a user variable


def test_unknown_name_is_a_clear_error(kernel):
    res = kernel.execute("%pickle_check no_such_variable")
    assert not res.ok
    assert "no_such_variable" in res.error_text + res.stderr
