"""%pickle_check's engine: verdicts, culprit paths, categories, bounds, the spawn trap.

The scenarios are the real stories behind the feature: a strategy object that
carried a vendor SDK module into a multiprocessing child (every backtest then
hung until its 900 s timeout), an embedder with an open file four attributes
deep, a nested worker function, and a notebook function that pickles fine
and still cannot be loaded by a spawned child. Then dill's own object zoo, as
an outside referee: for every object, our verdict per serializer must match
what really happens when that serializer dumps and loads it.
"""

from __future__ import annotations

import collections
import datetime
import io
import os
import pickle
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tracemalloc
import types
import warnings
from pathlib import Path

import cloudpickle
import dill
import numpy as np
import psutil
import pytest

from nbisolate import ship
from nbisolate.diagnose import (
    NamespaceReport,
    Problem,
    Report,
    UnknownNameError,
    available_serializers,
    check_namespace,
    pickle_check,
)
from nbisolate.probe import spawn_loads

with warnings.catch_warnings():  # dill's zoo resets warning filters when imported
    import dill._objects as ZOO

# --- objects of the stories ----------------------------------------------------


class Strategy:
    """A backtest strategy that keeps the vendor's data module at hand."""

    def __init__(self, data_module: types.ModuleType, window: int = 20) -> None:
        self.data = data_module
        self.window = window


class Dataset:
    def __init__(self, path: str) -> None:
        self.path = path
        self._fh = open(path, "rb")


class Loader:
    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.batch_size = 32


class Model:
    def __init__(self, loader: Loader) -> None:
        self.loader = loader
        self.weights = [0.5] * 100


class Holder:
    def __init__(self, conn: object) -> None:
        self.conn = conn


class Node:
    def __init__(self) -> None:
        self.next: object = None


class Sleeper:
    """Unpickling this runs a shell that sleeps: a loader that never finishes."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["sh", "-c", f"sleep 30; echo {self.marker}"],))


def outer_factory():
    def worker(x):
        return x + 1

    return worker


def problem_at(report: Report, path: str) -> Problem:
    found = [p for p in report.problems if p.path == path]
    assert found, f"no problem at {path!r}; got {[p.path for p in report.problems]}\n{report}"
    return found[0]


@pytest.fixture
def vendor_data(tmp_path, monkeypatch):
    """An installed-looking vendor SDK with a ``data`` submodule."""
    pkg = tmp_path / "acme_vendor"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "data.py").write_text("def bars(symbol):\n    return [1.0, 2.0]\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import acme_vendor.data

    yield acme_vendor.data
    for name in ("acme_vendor.data", "acme_vendor"):
        sys.modules.pop(name, None)


@pytest.fixture
def notebook_main():
    """Run code in ``__main__`` the way a notebook cell does (no file behind it)."""
    main = sys.modules["__main__"]
    before = set(vars(main))

    def run(code: str) -> dict:
        exec(compile(code, "<notebook cell>", "exec"), main.__dict__)
        return main.__dict__

    yield run
    for name in set(vars(main)) - before:
        delattr(main, name)


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "embeddings.bin"
    path.write_bytes(b"\x00" * 64)
    return str(path)


# --- story 1: a module object inside a strategy --------------------------------


def test_module_attribute_fails_plain_pickle_but_not_isolate(vendor_data):
    strategy = Strategy(vendor_data)
    report = pickle_check(strategy, "strategy")

    assert report.results["pickle"].ok is False
    assert report.results["dill"].ok is True  # %%isolate re-imports it by name
    assert report.isolate_ok is True
    assert report.ok is False
    p = problem_at(report, "strategy.data")
    assert p.type_name == "module"
    assert p.category == "module"
    assert p.what == "module acme_vendor.data"
    assert p.fails_with[0] == "pickle" and "dill" not in p.fails_with
    assert p.severity == "warning"  # does not break %%isolate
    assert "fine with %%isolate (re-imported by name), fails with plain pickle" in p.reason.lower()
    assert "import" in p.fix
    assert len(report.problems) == 1


# --- story 2: an open file deep inside an embedder -----------------------------


def test_open_file_four_levels_deep_is_named_exactly(data_file):
    model = Model(Loader(Dataset(data_file)))
    try:
        report = pickle_check(model, "model")
        p = problem_at(report, "model.loader.dataset._fh")
        assert p.type_name == "_io.BufferedReader"
        assert p.category == "open-file"
        assert "pickle" in p.fails_with and "cloudpickle" in p.fails_with
        assert report.results["dill"].ok  # %%isolate opens the same file again (same path here)
        assert "path" in p.fix and "opens the same file again" in p.fix
        assert [q.path for q in report.problems] == ["model.loader.dataset._fh"]
        text = str(report)
        assert "model.loader.dataset._fh" in text and "_io.BufferedReader" in text
        page = report._repr_html_()
        assert "model.loader.dataset._fh" in page and "_io.BufferedReader" in page
        assert "<table" in page
    finally:
        model.loader.dataset._fh.close()


def test_checking_a_writable_file_never_truncates_it(tmp_path):
    path = tmp_path / "log.txt"
    fh = open(path, "w")
    fh.write("keep me")
    fh.flush()
    try:
        report = pickle_check({"log": fh}, "state")
        assert report.results["dill"].dumps_ok
        assert path.read_text() == "keep me"
    finally:
        fh.close()


# --- story 3: a nested worker function ------------------------------------------


def test_nested_function_fails_pickle_only():
    worker = outer_factory()
    report = pickle_check(worker, "worker")
    assert report.results["pickle"].ok is False
    assert "local object" in report.results["pickle"].error
    assert report.results["dill"].ok and report.results["cloudpickle"].ok
    p = problem_at(report, "worker")
    assert p.category == "local-function"
    assert "Can't get local object" in p.reason
    assert p.what.endswith("outer_factory.<locals>.worker")


def test_lambda_in_a_config_dict():
    cfg = {"transform": lambda x: x * 2, "n": 3}
    report = pickle_check(cfg, "cfg")
    p = problem_at(report, "cfg['transform']")
    assert p.category == "lambda"
    assert p.fails_with == ("pickle",)


# --- story 4: notebook-defined function under spawn -----------------------------


def test_notebook_function_is_flagged_though_pickle_dumps_succeeds(notebook_main):
    ns = notebook_main("def work(x):\n    return x * 2\n")
    work = ns["work"]
    data = pickle.dumps(work)  # succeeds: a reference to __main__.work

    report = pickle_check({"fn": work, "n": 1}, "jobs")
    res = report.results["pickle"]
    assert res.dumps_ok and res.loads_ok  # fine in this process ...
    assert res.spawn_ok is False and res.ok is False  # ... not in a spawned child
    assert res.verdict == "spawn"
    p = problem_at(report, "jobs['fn']")
    assert p.category == "notebook-defined"
    assert p.fails_with == ("pickle",)
    assert report.results["dill"].ok and report.results["cloudpickle"].ok
    assert "Fine with %%isolate" in p.fix

    # and it is not a guess: a freshly spawned interpreter really can't load it
    error = spawn_loads(data)
    assert error is not None and "Can't get attribute 'work'" in error
    assert spawn_loads(pickle.dumps(os.path.join)) is None


def test_notebook_enum_and_typevar_travel_by_value_under_isolate(notebook_main):
    """%%isolate sends notebook functions, Enums and TypeVars by value: nothing to report.

    (Plain dill would send the Enum and the TypeVar by name, which a worker's
    ``__main__`` lacks; the fast path never does.)
    """
    ns = notebook_main(
        "import enum, typing\n"
        "class Side(enum.Enum):\n    BUY = 1\n    SELL = -1\n"
        "T = typing.TypeVar('T')\n"
        "def work(x):\n    return x\n"
    )
    report = pickle_check({"side": ns["Side"].BUY, "T": ns["T"], "fn": ns["work"]}, "cfg")
    assert report.results["dill"].ok and report.isolate_ok is True
    assert report.results["cloudpickle"].ok
    assert not [p for p in report.problems if p.severity == "error"]
    assert ns["Side"].BUY is ns["Side"](1)  # the notebook's enum is untouched by the check


def test_the_isolate_column_judges_ships_own_two_tries(tmp_path):
    """Its size is what ship.dumps writes, and a lock makes it redo the value with dill."""
    arr = np.arange(10_000, dtype=np.float64)
    report = pickle_check({"arr": arr, "n": [1, 2]}, "x", serializers=["dill"])
    shipped = ship.dumps({"x": {"arr": arr, "n": [1, 2]}})
    assert report.results["dill"].size == shipped.sizes["x"]
    assert report.results["dill"].oob_bytes == arr.nbytes
    report = pickle_check({"lock": threading.Lock()}, "h", serializers=["dill"])
    assert report.isolate_ok and ship.dumps({"h": {"lock": threading.Lock()}}).how == {"h": "dill"}


def test_instances_of_a_notebook_class_are_reported_once_at_the_instance(notebook_main):
    ns = notebook_main("class Signal:\n    def __init__(self, v):\n        self.v = v\n")
    signals = [ns["Signal"](i) for i in range(3)]
    report = pickle_check(signals, "signals")
    assert report.results["pickle"].ok is False
    problems = [p for p in report.problems if p.category == "notebook-defined"]
    assert len(problems) == 1
    p = problems[0]
    assert p.path == "signals[0]"
    assert p.type_name == "__main__.Signal"
    assert "signals[1]" in p.also_at


def test_unimportable_module_is_verified_by_the_injected_probe():
    mod = types.ModuleType("nbisolate_dynamic_mod")
    exec("def helper():\n    return 1\n", mod.__dict__)
    mod.helper.__module__ = mod.__name__
    sys.modules[mod.__name__] = mod
    try:
        unverified = pickle_check(mod.helper, "helper")
        assert unverified.results["pickle"].dumps_ok
        p = problem_at(unverified, "helper")
        assert p.category == "unverified-reference" and p.severity == "warning"

        calls = []

        def probe(data: bytes) -> str | None:
            calls.append(data)
            return spawn_loads(data)

        report = pickle_check({"a": mod.helper, "b": mod.helper}, "refs", verify_spawn=probe)
        assert len(calls) == 1  # one probe per distinct reference
        p = problem_at(report, "refs['a']")
        assert p.category == "unimportable-module"
        assert "No module named 'nbisolate_dynamic_mod'" in p.reason
        assert report.results["pickle"].spawn_ok is False
        assert not report.ok
    finally:
        del sys.modules[mod.__name__]


def test_importable_references_need_no_probe():
    def probe(data: bytes) -> str | None:
        raise AssertionError("no probe needed for importable references")

    report = pickle_check({"join": os.path.join, "cls": io.BytesIO}, "refs", verify_spawn=probe)
    assert report.ok and report.problems == []


# --- graph shapes: dict/list paths, cycles, sharing, many culprits --------------


def test_connection_inside_dict_and_list():
    cfg = {"name": "prices", "feeds": ["csv", sqlite3.connect(":memory:")]}
    report = pickle_check(cfg, "cfg")
    p = problem_at(report, "cfg['feeds'][1]")
    assert p.type_name == "sqlite3.Connection"
    assert p.category == "database"
    assert p.fails_with == ("pickle", "dill", "cloudpickle")
    assert p.severity == "error"
    assert "connect inside the worker" in p.fix


def test_cycle_terminates_and_names_the_culprit():
    a, b = Node(), Node()
    a.next, b.next = b, a
    b.lock = threading.Lock()
    a.items = [a, b]
    report = pickle_check(a, "a")
    assert [p.path for p in report.problems] == ["a.next.lock"]
    assert report.problems[0].type_name == "_thread.lock"
    assert report.problems[0].category == "lock"
    assert not report.truncated


def test_shared_object_reported_once_with_its_other_paths():
    conn = sqlite3.connect(":memory:")
    cfg = {"primary": conn, "replicas": [conn], "holder": Holder(conn)}
    report = pickle_check(cfg, "cfg")
    assert len(report.problems) == 1
    p = report.problems[0]
    assert p.path == "cfg['primary']"
    assert set(p.also_at) == {"cfg['replicas'][0]", "cfg['holder'].conn"}


def test_every_distinct_culprit_is_reported(data_file):
    fh = open(data_file, "rb")
    sock = socket.socket()
    thread = threading.Thread(target=lambda: None)
    state = {
        "fh": fh,
        "db": sqlite3.connect(":memory:"),
        "rows": (i for i in range(3)),
        "lock": threading.RLock(),
        "sock": sock,
        "thread": thread,
        "frame": sys._getframe(),
        "fine": [1, 2, 3],
    }
    try:
        report = pickle_check(state, "state")
        got = {p.path: p.category for p in report.problems}
        assert got["state['fh']"] == "open-file"
        assert got["state['db']"] == "database"
        assert got["state['rows']"] == "generator"
        assert got["state['lock']"] == "lock"
        assert got["state['sock']"] == "socket"
        assert got["state['frame']"] == "frame"
        assert got["state['thread']"] == "thread"  # not its private locks
        assert not any(path.startswith("state['fine']") for path in got)
        for p in report.problems:
            assert p.fix and p.reason and p.type_name
    finally:
        fh.close()
        sock.close()


def test_closure_and_global_of_a_function_are_followed_for_dill(notebook_main):
    ns = notebook_main(
        "import sqlite3\n"
        "conn = sqlite3.connect(':memory:')\n"
        "def query(sql):\n"
        "    return conn.execute(sql).fetchall()\n"
        "def make_reader(fh):\n"
        "    def read():\n"
        "        return fh.read()\n"
        "    return read\n"
    )
    report = pickle_check(ns["query"], "query", serializers=["dill"])
    p = problem_at(report, "query.<global conn>")
    assert p.type_name == "sqlite3.Connection" and p.severity == "error"

    lock_reader = ns["make_reader"](threading.Lock())
    report = pickle_check(lock_reader, "read", serializers=["cloudpickle"])
    assert problem_at(report, "read.<closure fh>").type_name == "_thread.lock"


def test_checking_leaves_notebook_classes_untouched(notebook_main):
    # loading in-process, cloudpickle would set unpickled copies of the
    # methods on the original class; a diagnosis must not change the notebook
    ns = notebook_main("class Scorer:\n    def score(self, x):\n        return x + 1\n")
    scorer_cls = ns["Scorer"]
    method = scorer_cls.score
    report = pickle_check({"s": scorer_cls(), "cls": scorer_cls}, "models")
    assert report.results["cloudpickle"].ok and report.results["dill"].ok
    assert scorer_cls.score is method
    assert scorer_cls.score.__code__.co_filename == "<notebook cell>"


def test_dataframe_and_object_array_cells_get_public_paths():
    import pandas as pd

    lock = threading.Lock()
    df = pd.DataFrame({"price": [1.0, 2.0], "guard": ["free", lock]})
    report = pickle_check(df, "df", serializers=["pickle"])
    assert [p.path for p in report.problems] == ["df['guard'].iloc[1]"]
    arr = np.array([[1, 2], [3, lock]], dtype=object)
    report = pickle_check(arr, "arr", serializers=["pickle"])
    assert [p.path for p in report.problems] == ["arr[1, 1]"]


def test_logging_handler_is_one_problem(tmp_path):
    import logging

    handler = logging.FileHandler(tmp_path / "run.log")
    try:
        report = pickle_check({"log": handler}, "cfg", serializers=["pickle"])
        (p,) = report.problems
        assert (p.path, p.type_name, p.category) == ("cfg['log']", "logging.FileHandler", "logging")
        assert "_thread.RLock" in p.reason or "TextIOWrapper" in p.reason
    finally:
        handler.close()


def test_too_deep_for_the_pickler_is_one_recursion_problem():
    deep: list = []
    cur = deep
    for _ in range(50_000):
        cur.append([])
        cur = cur[0]
    report = pickle_check(deep, "deep")
    (p,) = report.problems
    assert p.category == "recursion" and p.path == "deep"
    assert set(p.fails_with) == {"pickle", "dill", "cloudpickle"}
    assert report.truncated and any(" ... " in n for n in report.notes)


# --- bounds ---------------------------------------------------------------------


def test_time_bound_stops_early_and_says_so():
    rows = [{"i": i, "lock": threading.Lock()} for i in range(100_000)]
    report = pickle_check(rows, "rows", max_seconds=0.05, serializers=["pickle"])
    assert report.truncated
    assert any("max_seconds" in n for n in report.notes)
    assert report.results["pickle"].ok is False  # the verdict is still known
    assert report.problems and report.problems[0].path == "rows[0]['lock']"
    assert "note:" in str(report)


def test_a_whole_namespace_check_looks_for_each_variables_culprits_briefly(monkeypatch):
    """Checking every variable, one whose culprits take long to find (a function whose globals
    reach a cluster client took a second) gets a short search, says so and names the longer
    one; the verdicts still come from complete dumps, and a named check searches as before."""
    from nbisolate.diagnose import namespace

    monkeypatch.setattr(namespace, "NAMESPACE_SEARCH_SECONDS", 0.01)
    values = {"rows": [{"i": i} for i in range(60_000)] + [threading.Lock()], "fine": [1, 2]}
    whole = check_namespace(values).reports["rows"]
    assert whole.results["pickle"].ok is False and whole.truncated
    assert any("stopped looking" in n for n in whole.notes), whole.notes
    assert "%pickle_check rows alone looks for up to 5 s" in whole.notes
    named = check_namespace(values, ["rows"]).reports["rows"]
    assert not any("looks for up to" in n or "stopped looking" in n for n in named.notes), named.notes
    assert named.problems[0].path == "rows[60000]"


def test_depth_bound_stops_early_and_says_so():
    head = node = Node()
    for _ in range(300):
        node.next = Node()
        node = node.next
    node.lock = threading.Lock()
    shallow = pickle_check(head, "chain", max_depth=40, serializers=["pickle"])
    assert shallow.truncated
    assert any("max_depth" in n for n in shallow.notes)

    deep = pickle_check(head, "chain", max_depth=1000, serializers=["pickle"])
    assert not deep.truncated
    (p,) = deep.problems
    assert p.path == "chain" + ".next" * 300 + ".lock"


def test_many_culprits_are_capped_in_the_listing():
    locks = [threading.Lock() for _ in range(30)]
    report = pickle_check(locks, "locks", max_problems=5, serializers=["pickle"])
    assert len(report.problems) == 5
    assert report.omitted == 25
    assert any("max_problems" in n for n in report.notes)


# --- size -------------------------------------------------------------------------


def test_sizing_an_array_does_not_copy_it():
    arr = np.ones(5_000_000)  # 40 MB
    tracemalloc.start()
    try:
        report = pickle_check(arr, "arr")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4_000_000, f"checking copied the array: peak {peak} bytes"
    for res in report.results.values():
        assert res.ok
        assert res.oob_bytes == arr.nbytes
        assert arr.nbytes <= res.size < arr.nbytes + 1000


def test_large_object_gets_a_cost_warning_not_an_error():
    arr = np.zeros(10_000)
    report = pickle_check(arr, "arr", large_bytes=50_000)
    assert report.ok
    (p,) = report.problems
    assert p.category == "large" and p.severity == "warning"
    assert "78.2 KB" in p.reason and "per run" in p.reason  # binary units, as everywhere


# --- API surface --------------------------------------------------------------------


def test_serializer_selection_and_validation():
    assert available_serializers()[:2] == ["pickle", "dill"]
    report = pickle_check([1, 2], "x", serializers=["dill"])
    assert list(report.results) == ["dill"] and report.ok
    with pytest.raises(ValueError, match="unknown serializer"):
        pickle_check(1, serializers=["marshal"])


def test_problem_fields_used_by_isolate_error_messages():
    report = pickle_check({"db": sqlite3.connect(":memory:")}, name="inputs")
    p = report.problems[0]
    assert (p.path, p.type_name) == ("inputs['db']", "sqlite3.Connection")
    assert isinstance(p.fix, str) and p.fix


def test_load_failure_is_caught_by_the_round_trip():
    # pickles fine, but its reconstructor rejects the arguments on load
    class Fussy(int):
        def __reduce__(self):
            return (Fussy, ("not a number",))

    Fussy.__qualname__ = "Fussy"
    globals()["Fussy"] = Fussy
    try:
        report = pickle_check(Fussy(3), "f", serializers=["pickle"])
        res = report.results["pickle"]
        assert res.dumps_ok and res.loads_ok is False and not res.ok
        p = problem_at(report, "f")
        assert p.category == "load-fails" and "ValueError" in p.reason
    finally:
        del globals()["Fussy"]


# --- namespaces ---------------------------------------------------------------------


def test_check_namespace_skips_ipython_names_and_lists_problems_first():
    conn = sqlite3.connect(":memory:")
    ns = {
        "In": [""], "Out": {}, "_": 1, "__": 2, "___": 3, "_i": "", "_i1": "x = 1", "_ii": "",
        "_oh": {}, "_ih": [], "_dh": [], "exit": object(), "quit": object(),
        "get_ipython": lambda: None, "_private": conn, "__builtins__": {},
        "json": __import__("json"), "x": 1, "prices": [1.0, 2.0], "db": conn,
    }
    report = check_namespace(ns)
    assert isinstance(report, NamespaceReport)
    assert list(report.reports) == ["db", "x", "prices"]
    assert report.modules == ["json"]
    assert not report.ok
    text = str(report)
    assert "db" in text and "sqlite3.Connection" in text and "json" in text
    page = report._repr_html_()
    assert "sqlite3.Connection" in page and "<table" in page


def test_check_namespace_named_variables_and_unknown_names():
    ns = {"json": __import__("json"), "x": 1}
    report = check_namespace(ns, ["json"])
    p = report.reports["json"].problems[0]
    assert p.category == "module" and p.severity == "warning"

    with pytest.raises(KeyError) as info:
        check_namespace(ns, ["x", "nope", "nada"])
    err = info.value
    assert isinstance(err, UnknownNameError)
    assert err.names == ("nope", "nada")
    assert str(err).startswith("no notebook variables named nope, nada")


# --- the spawn probe ----------------------------------------------------------------


def test_spawn_probe_kills_a_hanging_child_and_everything_it_started():
    marker = f"nbisolate-probe-test-{os.getpid()}-{time.monotonic_ns()}"
    data = pickle.dumps(Sleeper(marker))
    started = time.monotonic()
    error = spawn_loads(data, timeout=1.0)
    assert error is not None and "killed" in error
    assert time.monotonic() - started < 20

    def leftovers():
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            if marker in " ".join(proc.info["cmdline"] or []):
                found.append(proc)
        return found

    assert not leftovers()


def test_spawn_probe_reports_garbage_and_success():
    assert spawn_loads(pickle.dumps({"a": [1, 2]})) is None
    assert "UnpicklingError" in spawn_loads(b"not a pickle")
    assert spawn_loads(dill.dumps(lambda: 1), module="dill") is None


# --- dill's object zoo: agree with reality, object by object ------------------------

_ZOO = {f"a.{k}": v for k, v in ZOO.a.items()} | {f"x.{k}": v for k, v in ZOO.x.items()}
_KEEP_ALIVE: list[object] = []  # loaded objects may wrap descriptors of the zoo's files


def _really(serializer: str, obj: object) -> tuple[bool, str]:
    """What actually happens when ``serializer`` dumps ``obj`` and loads it back."""
    try:
        if serializer == "pickle":
            _KEEP_ALIVE.append(pickle.loads(pickle.dumps(obj, protocol=5)))
        elif serializer == "dill":  # %%isolate: ship's fast path, else dill for all of it
            s = ship.dumps({"obj": obj})
            _KEEP_ALIVE.append(ship.loads(s.names, s.data, s.buffers, s.engine))
        else:
            _KEEP_ALIVE.append(pickle.loads(cloudpickle.dumps(obj, protocol=5)))
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    return True, ""


@pytest.mark.parametrize("key", sorted(_ZOO))
def test_zoo_verdicts_match_reality(key):
    obj = _ZOO[key]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = pickle_check(obj, key)
        for serializer, res in report.results.items():
            claimed = bool(res.dumps_ok and res.loads_ok)
            actual, error = _really(serializer, obj)
            if claimed != actual:
                again, _ = _really(serializer, obj)
                if again != actual:
                    pytest.skip(f"{key} behaves differently on each try with {serializer}")
            assert claimed == actual, (
                f"{key}: we said {serializer} {'works' if claimed else 'fails'}, "
                f"really: {error or 'works'}\n{report}"
            )
            if actual:
                continue
            # every failure names its culprit and the culprit's type
            mine = [p for p in report.problems if serializer in p.fails_with]
            assert mine, f"{key}: {serializer} fails ({error}) but no culprit named\n{report}"
            assert all(p.type_name and p.path.startswith(key) for p in mine)
            named = re.search(r"cannot pickle '([^']+)'", error)
            if named:  # as the culprit's type, or as the failing member of a resource
                tname = named.group(1)
                assert any(
                    p.type_name == tname
                    or p.type_name.endswith("." + tname)
                    or f"cannot pickle '{tname}'" in p.reason
                    for p in mine
                ), f"{key}: {serializer} says {error!r}, we named {[p.type_name for p in mine]}"


# --- the loader process: loads back out of this process, with the same verdicts ------------


_ZOO_IN_BOTH_PLACES = """
import json, warnings
warnings.simplefilter("ignore")
import dill._objects as ZOO
from nbisolate.diagnose import pickle_check
from nbisolate.diagnose.spawn import _Context
from nbisolate.probe import spawn_loads
zoo = {f"a.{k}": v for k, v in ZOO.a.items()} | {f"x.{k}": v for k, v in ZOO.x.items()}
ctx = _Context(spawn_loads)
assert ctx.loads_elsewhere
differ = []
try:
    for key in sorted(zoo):
        here = pickle_check(zoo[key], key)
        there = pickle_check(zoo[key], key, _ctx=ctx)
        for s, res in here.results.items():
            other = there.results[s]
            if (res.ok, res.dumps_ok, res.loads_ok) != (other.ok, other.dumps_ok, other.loads_ok):
                differ.append((key, s, res.error, other.error, other.note))
finally:
    ctx.close()
print(json.dumps({"checked": len(zoo), "differ": differ}))
"""


def test_zoo_verdicts_are_the_same_in_the_loader_process():
    """Every zoo object, loaded back here and in the loader process: the same verdicts.

    In a fresh interpreter: this one has already played the worker's part
    (``ship.loads`` above), and an object it rebuilt goes back by a token only
    this process can resolve, which no kernel would have.
    """
    import json

    out = subprocess.run(
        [sys.executable, "-c", _ZOO_IN_BOTH_PLACES], capture_output=True, text=True, timeout=120,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert found["checked"] > 100
    assert not found["differ"]


_WRITERS = """
import os
class Writer:
    def __init__(self, path, mode):
        self.fh = open(path, mode)
        self.fh.write("from the loader")
        self.fh.flush()
class Remover:
    def __init__(self, path):
        os.remove(path)
        os.open(path + ".new", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
class Later:
    def __init__(self, *args):
        self.args = args
    def __reduce__(self):
        return self.args
"""


def test_loads_that_write_files_change_nothing_and_fail_where_a_real_open_would(
    notebook_main, tmp_path
):
    ns = notebook_main(_WRITERS)
    Later, Writer, Remover = ns["Later"], ns["Writer"], ns["Remover"]
    kept = tmp_path / "kept.txt"
    kept.write_text("precious")
    cases = {
        "truncate": Later(Writer, (str(kept), "w")),
        "append": Later(Writer, (str(kept), "a")),
        "update": Later(Writer, (str(kept), "r+")),
        "new": Later(Writer, (str(tmp_path / "new.txt"), "w")),
        "remove": Later(Remover, (str(kept),)),
        "exclusive": Later(Writer, (str(kept), "x")),
        "no-dir": Later(Writer, (str(tmp_path / "no" / "such.txt"), "w")),
        "a-dir": Later(Writer, (str(tmp_path), "w")),
    }
    report = check_namespace(cases, serializers=["cloudpickle"], verify_spawn=spawn_loads)
    verdict = {k: r.results["cloudpickle"] for k, r in report.reports.items()}
    for name in ("truncate", "append", "update", "new", "remove"):
        assert verdict[name].loads_ok, (name, verdict[name].error)
    assert "FileExistsError" in verdict["exclusive"].error
    assert "FileNotFoundError" in verdict["no-dir"].error
    assert "IsADirectoryError" in verdict["a-dir"].error
    assert kept.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.txt"]


def test_a_load_that_kills_the_loader_is_reported_and_the_next_one_gets_a_new_loader(
    notebook_main,
):
    ns = notebook_main("import os\nclass Exits:\n    def __reduce__(self):\n"
                       "        return (os._exit, (7,))\n")
    report = check_namespace(
        {"exits": ns["Exits"](), "fine": [1, 2]}, verify_spawn=spawn_loads
    )
    res = report.reports["exits"].results["pickle"]
    assert res.loads_ok is False and "died (exit code 7)" in res.error
    assert all(r.ok for r in report.reports["fine"].results.values())


def test_the_loader_imports_ahead_what_the_loads_need_and_survives_what_it_cannot(tmp_path):
    """``Loader.begin`` starts the process with the packages to import before the first load
    (so a check's serializing overlaps them); one that is missing, or exits the process as
    it is imported, leaves the loads to report what they find."""
    from nbisolate.probe import Loader

    (tmp_path / "nbi_exits_on_import.py").write_text("import os\nos._exit(4)\n")
    marks = tmp_path / "nbi_marks_its_import.py"  # maps itself: its path shows in the maps
    marks.write_text("import mmap\n_f = open(__file__, 'rb')\n_m = mmap.mmap(_f.fileno(), 0, "
                     "access=mmap.ACCESS_READ)\n")
    sys.path.insert(0, str(tmp_path))
    frame = pickle.dumps([1, 2j], protocol=5)
    loader = Loader()
    try:
        loader.begin(["nbi_no_such_package", "nbi_marks_its_import"])
        assert loader.loads("pickle", frame, [], "pickle", 30) == ("ok", None)
        assert str(marks) in Path(f"/proc/{loader._proc.pid}/maps").read_text()
        loader.close()
        loader = Loader()
        loader.begin(["nbi_exits_on_import"])
        verdict, text = loader.loads("pickle", frame, [], "pickle", 30)
        assert verdict == "error" and "exit code 4" in text, (verdict, text)
        assert loader.loads("pickle", frame, [], "pickle", 30) == ("ok", None)  # a new one
    finally:
        loader.close()
        sys.path.remove(str(tmp_path))


def test_a_notebook_class_that_refuses_to_load_fails_in_the_loader_as_here(notebook_main):
    # sent by value, the class is rebuilt in the loader, and its reconstructor raises there
    ns = notebook_main(
        "class Fussy(int):\n    def __reduce__(self):\n        return (Fussy, ('not a number',))\n"
    )
    report = check_namespace(
        {"f": ns["Fussy"](3)}, serializers=["dill", "cloudpickle"], verify_spawn=spawn_loads
    )
    for res in report.reports["f"].results.values():
        assert res.dumps_ok and res.loads_ok is False and "ValueError" in res.error
    p = problem_at(report.reports["f"], "f")
    assert p.category == "load-fails" and "ValueError" in p.reason


def test_large_buffers_are_not_copied_into_the_loader(monkeypatch):
    from nbisolate import probe

    monkeypatch.setattr(probe, "_SEND_LIMIT", 1000)
    arr = np.arange(100_000, dtype=np.float64)  # 800 KB: stood in for by zero pages
    report = check_namespace({"arr": arr, "small": np.arange(3)}, verify_spawn=spawn_loads)
    for r in report.reports.values():
        assert all(res.ok and res.loads_ok for res in r.results.values()), r


def test_a_whole_namespace_checks_loads_keep_their_own_bound(tmp_path):
    """Checking every variable, only the search for culprits is short: a load that waits for the
    loader's imports (here a package that takes a second to import) still gets its verdict."""
    (tmp_path / "nbi_slow_to_import.py").write_text(
        "import time\ntime.sleep(1.0)\nclass Slow:\n    def __init__(self):\n        self.n = 1\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        import nbi_slow_to_import

        report = check_namespace({"slow": nbi_slow_to_import.Slow()}, verify_spawn=spawn_loads)
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("nbi_slow_to_import", None)
    res = report.reports["slow"].results["pickle"]
    assert res.ok is True and res.loads_ok is True, (res, report.reports["slow"].notes)


def test_a_loader_that_cannot_start_leaves_the_verdict_unknown_not_failed(monkeypatch):
    monkeypatch.setattr(sys, "executable", "/bin/false")
    # A date is rebuilt by calling its class: loading it runs code, so only the loader may.
    report = check_namespace(
        {"x": [datetime.date(2020, 1, 2)]}, serializers=["pickle"], verify_spawn=spawn_loads
    )
    res = report.reports["x"].results["pickle"]
    assert res.ok is None and res.loads_ok is None
    assert "could not start" in res.note and "/bin/false" in res.note


def test_plain_data_needs_no_loader_at_any_size(monkeypatch):
    """Strings, numbers and builtin containers load without running any code, and back as
    they were: they need no loader process (here none could start, and none is missed),
    whatever their size, and are serialized once, not once per serializer."""
    monkeypatch.setattr(sys, "executable", "/bin/false")
    rows = [{"id": i, "v": i * 0.5, "k": f"r{i}", "t": (i, None, b"4")} for i in range(50_000)]
    values = {"x": [1, "two", {"k": (3.0, None, b"4")}], "y": {5, 6}, "rows": rows}
    report = check_namespace(values, verify_spawn=spawn_loads)
    for name in values:
        results = report.reports[name].results
        assert results["pickle"].ok is True and results["pickle"].loads_ok is True, results
        assert not results["pickle"].note, results
        for res in results.values():
            assert res.ok is True and res.loads_ok is True, (name, res)
            assert not res.note or res.note.startswith("plain data"), (name, res)


@pytest.mark.parametrize("value", [
    collections.OrderedDict(a=1),  # a subclass of dict: rebuilt by calling it
    [1, 2j],  # complex numbers are rebuilt by calling complex()
    {"when": datetime.date(2020, 1, 2)},
])
def test_containers_of_anything_but_plain_builtins_are_loaded_back(value, monkeypatch):
    """Only the exact builtin types skip the load-back; inside a list or dict, anything else
    makes the stream call code, so it goes to the loader (here one that cannot start)."""
    monkeypatch.setattr(sys, "executable", "/bin/false")
    res = check_namespace({"v": value}, serializers=["pickle"], verify_spawn=spawn_loads).reports["v"]
    assert res.results["pickle"].loads_ok is None and "could not start" in res.results["pickle"].note


def test_classes_and_functions_of_installed_packages_are_looked_up_here(monkeypatch):
    """``from collections import OrderedDict``, ``from json import dumps``: pickled by reference,
    loading them is a lookup in a module a fresh interpreter imports from the same file, so the
    kernel looks them up itself (the loader would import the package again: a second for some).
    A class of a module made at run time, or a value whose loading calls code, still goes to
    the loader process, which cannot start here: their verdicts stay unknown."""
    import json

    made = types.ModuleType("nbi_made_at_run_time")
    exec("class Local:\n    pass\n", made.__dict__)
    made.Local.__module__ = made.__name__
    monkeypatch.setitem(sys.modules, made.__name__, made)
    monkeypatch.setattr(sys, "executable", "/bin/false")
    values = {"od": collections.OrderedDict, "dumps": json.dumps, "both": [json.loads, collections.Counter]}
    report = check_namespace(
        {**values, "local": made.Local, "day": datetime.date(2020, 1, 2)},
        serializers=["pickle"], verify_spawn=spawn_loads,
    )
    for name in values:
        res = report.reports[name].results["pickle"]
        assert res.ok is True and res.loads_ok is True and not res.note, (name, res)
    for name in ("local", "day"):  # not looked up here: sent to the loader, which is not there
        res = report.reports[name].results["pickle"]
        assert res.ok is not True and "could not start" in res.note, (name, res)


def test_large_plain_data_is_serialized_once_and_judged_for_every_serializer():
    """A large object of plain data is written the same by every C-pickler serializer:
    %pickle_check serializes it once (a notebook's worth of frames stays within seconds)."""
    import numpy as np

    rows = [{"id": i, "v": i * 0.5, "k": f"r{i}"} for i in range(60_000)]
    report = pickle_check(rows, "rows")
    assert report.ok and report.isolate_ok
    sizes = {name: r.size for name, r in report.results.items()}
    assert len(set(sizes.values())) == 1 and sizes["pickle"] > 1 << 20
    judged = [name for name, r in report.results.items() if r.note and "not serialized again" in r.note]
    assert judged and "pickle" not in judged
    # Not for what pickle finds in __main__, nor for small objects: each serializer runs.
    small = pickle_check({"a": np.arange(3)}, "small")
    assert not any(r.note for r in small.results.values())
