"""The notebook's settings, read in one process and taken in another (settings.py).

The kernel test in test_meaning_kernel.py checks that an isolated cell obeys
them; these check the round trip of the parts that are easy to get wrong: the
interpreter's own filters (plain strings, not patterns), flags kept, and a
category the other process cannot name left out rather than guessed.
"""

from __future__ import annotations

import pickle
import sys
import warnings

from nbisolate import settings


def test_warning_filters_survive_a_round_trip_through_pickle():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Some.*text", category=FutureWarning, module=r"pkg\.mod")
        warnings.simplefilter("error", UserWarning)
        warnings.filters.append(("default", None, DeprecationWarning, "__main__", 0))  # the C defaults' shape
        before = list(warnings.filters)
        packed = pickle.loads(pickle.dumps(settings.capture()))
        warnings.resetwarnings()
        settings.restore(packed)
        assert warnings.filters == []  # not outside the cell's code: see cell_filters
        with settings.cell_filters(packed):
            assert warnings.filters == before
            ours = next(f for f in warnings.filters if f[2] is FutureWarning)
            assert ours[1].flags == next(f for f in before if f[2] is FutureWarning)[1].flags  # IGNORECASE
        assert warnings.filters == []  # this process's own again


def test_a_category_this_process_cannot_name_is_left_out():
    class NotebookWarning(UserWarning):  # a class of the notebook's: not importable here
        pass

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotebookWarning)
        warnings.simplefilter("error", RuntimeWarning)
        before = [f for f in warnings.filters if f[2] is not NotebookWarning]
        packed = settings.capture()
        warnings.resetwarnings()
        with settings.cell_filters(packed):
            assert warnings.filters == before and warnings.filters[0][2] is RuntimeWarning


def test_the_recursion_limit_travels():
    limit = sys.getrecursionlimit()
    try:
        packed = {"recursion": limit + 500}
        settings.restore(packed)
        assert sys.getrecursionlimit() == limit + 500
    finally:
        sys.setrecursionlimit(limit)


def test_log_handlers_to_the_output_and_to_files_travel_and_others_stay_behind(tmp_path):
    import io
    import logging

    root = logging.getLogger()
    named = logging.getLogger("nbisolate-unit-named")
    saved = (root.level, root.handlers[:])
    try:
        to_file = logging.FileHandler(tmp_path / "log.txt", encoding="utf-8")
        to_cell = logging.StreamHandler(sys.stderr)
        to_cell.setFormatter(logging.Formatter("{levelname}: {message}", style="{"))
        elsewhere = logging.StreamHandler(io.StringIO())  # not the cell's output: stays here
        root.handlers[:] = [to_file, to_cell, elsewhere]
        root.setLevel(logging.DEBUG)
        named.addHandler(logging.StreamHandler(sys.stdout))
        named.propagate = False
        packed = pickle.loads(pickle.dumps(settings.capture()))["logging"]
        assert packed["root"] == logging.DEBUG
        mine = [h for h in packed["handlers"] if h[0] in ("", "nbisolate-unit-named")]  # not a library's
        assert mine == [
            ("", "file", (str(tmp_path / "log.txt"), "utf-8"), logging.NOTSET, None, None, "%"),
            ("", "stderr", None, logging.NOTSET, "{levelname}: {message}", None, "{"),
            ("nbisolate-unit-named", "stdout", None, logging.NOTSET, None, None, "%"),
        ]
        assert "nbisolate-unit-named" in packed["alone"]
        to_file.close()
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        named.handlers.clear()
        named.propagate = True


# -- what a cell changed, back to the kernel -------------------------------------------------


def _job(**extra):
    import os

    return {"settings": settings.capture(), "cwd": os.getcwd(), "sys_path": list(sys.path), **extra}


def test_left_by_cell_names_what_the_cell_changed_and_nothing_else(monkeypatch):

    from nbisolate.pools import ENV_REPORT

    job = _job()
    environ = settings.environment()
    assert settings.left_by_cell(job, environ, None) == {}  # nothing changed: nothing comes back
    monkeypatch.setenv("NBI_UNIT_SET", "1")
    monkeypatch.setenv(ENV_REPORT, "@worker-own-socket")  # the worker's own pools': never sent
    monkeypatch.syspath_prepend("/nbi/unit")
    limit = sys.getrecursionlimit()
    try:
        sys.setrecursionlimit(limit + 7)
        left = settings.left_by_cell(job, environ, [("ignore", None, "builtins", "UserWarning", None, 0)])
    finally:
        sys.setrecursionlimit(limit)
    assert left["env"] == {"set": {"NBI_UNIT_SET": "1"}, "unset": []}
    assert left["sys_path"][0] == "/nbi/unit" and left["recursion"] == limit + 7
    assert left["warnings"] == [("ignore", None, "builtins", "UserWarning", None, 0)]
    assert "cwd" not in left and "logging" not in left


def test_apply_takes_the_changes_and_keeps_the_kernels_other_log_handlers(tmp_path, monkeypatch):
    import io
    import logging
    import os

    root = logging.getLogger()
    saved = (root.level, root.handlers[:], warnings.filters[:])
    to_file = logging.StreamHandler(io.StringIO())  # a handler that never travels
    monkeypatch.setenv("NBI_UNIT_GONE", "x")
    monkeypatch.chdir(tmp_path)
    try:
        root.handlers[:] = [to_file]
        changed = {
            "logging": {"root": logging.INFO, "levels": {}, "handlers": [("", "stderr", None, 0, "%(message)s", None, "%")]},
            "warnings": [("error", None, "builtins", "UserWarning", None, 0)],
            "env": {"set": {"NBI_UNIT_NEW": "v"}, "unset": ["NBI_UNIT_GONE"]},
            "cwd": "/",
        }
        assert settings.apply(changed) == []
        assert root.level == logging.INFO and root.handlers[0] is to_file and len(root.handlers) == 2
        assert root.handlers[1].stream is sys.stderr
        assert warnings.filters[0][:3] == ("error", None, UserWarning)
        assert os.environ.get("NBI_UNIT_NEW") == "v" and "NBI_UNIT_GONE" not in os.environ
        assert os.getcwd() == "/"
        assert settings.apply({"cwd": str(tmp_path / "not-there")})[0].startswith("the working directory")
    finally:
        os.environ.pop("NBI_UNIT_NEW", None)
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
        warnings.filters[:] = saved[2]
        warnings._filters_mutated()  # type: ignore[attr-defined]
        to_file.close()


def test_a_changed_decimal_context_travels_and_a_new_ones_does_not():
    import decimal

    with decimal.localcontext():
        assert "decimal" not in settings.capture()  # a new context's settings: nothing to send
        decimal.getcontext().prec = 6
        decimal.getcontext().traps[decimal.Inexact] = True
        packed = pickle.loads(pickle.dumps(settings.capture()))["decimal"]
        assert packed["prec"] == 6 and "Inexact" in packed["traps"]
    with decimal.localcontext():
        settings.restore({"decimal": packed})
        assert decimal.getcontext().prec == 6 and decimal.getcontext().traps[decimal.Inexact]
        job = {"settings": {"decimal": packed}, "cwd": __import__("os").getcwd(), "sys_path": list(sys.path)}
        environ = settings.environment()
        assert "decimal" not in settings.left_by_cell(job, environ, None)  # as it came
        decimal.setcontext(decimal.Context())
        back = settings.left_by_cell(job, environ, None)["decimal"]  # set back to a new context's
        assert back["prec"] == decimal.Context().prec
