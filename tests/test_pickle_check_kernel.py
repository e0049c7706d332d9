"""%pickle_check through a real kernel: what a notebook user sees.

The kernel is the real environment of the feature: its ``__main__`` is the
notebook's namespace with no file behind it, which is exactly what makes
notebook-defined functions fail in spawned children.
"""

from __future__ import annotations

import html
import textwrap

import pytest


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


@pytest.mark.parametrize(
    ("define", "name", "verdicts", "dumper", "shown_as"),
    [
        ("def work(x):\n    return x * 2", "work", {"pickle": "spawn", "dill": "ok", "cloudpickle": "ok"},
         "pickle", "function __main__.work"),
        # cloudpickle copies the notebook's functions, but writes one under lru_cache by name, as pickle does
        ("import functools\n@functools.lru_cache\ndef memo(x):\n    return x * 2", "memo",
         {"pickle": "spawn", "dill": "ok", "cloudpickle": "spawn"}, "cloudpickle",
         "function __main__.memo (under functools.lru_cache)"),
    ],
)
def test_a_notebook_function_is_a_spawn_trap_where_it_is_written_by_name(kernel, define, name, verdicts, dumper, shown_as):
    kernel.run("import nbisolate\n" + define)
    text = shown(kernel.run(f"%pickle_check {name}"))["text/plain"]
    assert "defined in the notebook" in text and "FAILS under spawn" in text and shown_as in text
    found = kernel.value(f"{{k: r.verdict for k, r in nbisolate.pickle_check({name}, {name!r}).results.items()}}")
    assert found == verdicts
    # what a spawned child really says
    error = kernel.value(f"__import__('nbisolate.probe').probe.spawn_loads(__import__({dumper!r}).dumps({name}))")
    assert f"Can't get attribute '{name}'" in error


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
