"""Cell planning is a pure function: source text and available names in, plan out."""

from __future__ import annotations

import sys

import pytest

from nbisolate.errors import IsolateUsageError
from nbisolate.plan import cell_packages, plan_cell

NS = {"x", "y", "df", "np", "helper", "total", "cfg", "print", "unused"}


def test_reads_before_binding_are_inputs():
    plan = plan_cell("x = x + 1\nz = y * 2\nw = z", NS)
    assert plan.inputs == ("x", "y")
    assert plan.outputs == ("x", "z", "w")


def test_unused_and_missing_names_are_not_inputs():
    plan = plan_cell("a = x + not_defined_anywhere", NS)
    assert plan.inputs == ("x",)
    assert plan.missing == ("not_defined_anywhere",)


def test_builtins_are_not_inputs_unless_shadowed():
    assert plan_cell("print(len([1]))", {"x"}).inputs == ()
    assert plan_cell("print(1)", NS).inputs == ("print",)


def test_function_bodies_and_comprehensions_read_globals():
    src = "def f(a):\n    return helper(a) + a\nr = [v * total for v in df]\nf(1)"
    plan = plan_cell(src, NS)
    assert set(plan.inputs) == {"helper", "total", "df"}
    assert plan.has_result


def test_conditional_binding_still_ships_the_fallback():
    plan = plan_cell("if cfg:\n    y = 1\nprint(y)", NS)
    assert "y" in plan.inputs and "cfg" in plan.inputs
    assert "y" in plan.outputs


def test_imports_defs_for_with_and_walrus_are_outputs():
    src = (
        "import numpy as np2, os.path\nfrom math import sqrt as s\n"
        "def f():\n    pass\nclass K:\n    pass\n"
        "for i in range(3):\n    acc = i\nwith open('f') as fh:\n    pass\n(n := 5)\n"
    )
    plan = plan_cell(src, NS)
    assert set(plan.outputs) >= {"np2", "os", "s", "f", "K", "i", "acc", "fh", "n"}


def test_augmented_assignment_reads_first():
    assert plan_cell("total += 1", NS).inputs == ("total",)
    assert plan_cell("total = 0\ntotal += 1", NS).inputs == ()


def test_global_declared_in_function_is_output():
    plan = plan_cell("def bump():\n    global counter\n    counter = 1\nbump()", NS)
    assert "counter" in plan.outputs


def test_a_global_a_function_updates_or_deletes_is_read_and_may_be_deleted():
    # ``total += 1`` and ``del x`` under ``global`` are no reference to symtable, yet need the value.
    plan = plan_cell("def f():\n    global total, x\n    total += 1\n    del x\nf()", NS)
    assert set(plan.inputs) == {"total", "x"}
    assert {"total", "x"} <= set(plan.outputs) and {"total", "x"} <= set(plan.deletes)
    assert plan_cell("def f():\n    return total\n", NS).deletes == ()  # read only: never deleted


def test_class_body_reads_globals():
    plan = plan_cell("class A:\n    scale = cfg\n    def m(self):\n        return np.ones(2)", NS)
    assert set(plan.inputs) == {"cfg", "np"}


def test_named_inputs_override_and_must_exist():
    assert plan_cell("z = x + y", NS, inputs=["x"]).inputs == ("x",)
    with pytest.raises(IsolateUsageError, match="no_such"):
        plan_cell("z = 1", NS, inputs=["no_such"])


def test_out_narrows_and_semicolon_hides_result():
    plan = plan_cell("a = 1\nb = 2\na + b;", NS, outputs=["b"])
    assert plan.outputs == ("b",)
    assert not plan.has_result


def test_syntax_error_names_the_cell_line():
    with pytest.raises(SyntaxError) as info:
        plan_cell("a = 1\nb = (", NS, first_line=2, filename="<cell 7>")
    assert info.value.lineno == 3 and info.value.filename == "<cell 7>"


def test_deeply_nested_expressions_do_not_overflow():
    names = {f"v{i}" for i in range(1000)}
    src = "k = " + " + ".join(f"len(v{i})" for i in range(1000))
    plan = plan_cell(src, names)
    assert len(plan.inputs) == 1000 and plan.inputs[0] == "v0"


def test_comprehension_reads_are_inputs_and_loop_variables_are_not():
    """Python 3.12+ inlines comprehensions (no scope of their own): found all the same."""
    plan = plan_cell("traces = [helper(i) for i in range(3) if i < total]\nd = {k: cfg for k in df}", NS)
    assert set(plan.inputs) == {"helper", "total", "cfg", "df"}
    assert plan_cell("r = [x for x in range(3)]", NS).inputs == ()
    assert plan_cell("r = [y + 1 for y in x]", NS).inputs == ("x",)


@pytest.mark.parametrize(
    ("python", "inputs", "outputs"),
    [
        # what IPython's transform makes of `%time total = work(n)` and friends
        ("get_ipython().run_line_magic('time', 'total = work(n)')", ("work", "n"), ("total",)),
        ("get_ipython().run_line_magic('timeit', '-n 3 -r 1 y = f(a)')", ("f", "a"), ("y",)),
        ("get_ipython().run_line_magic('timeit', '-n3 -r1 y = f(a)')", ("f", "a"), ("y",)),  # getopt's
        ("get_ipython().run_line_magic('timeit', '-qo -p 2 f(a)')", ("f", "a"), ()),
        ("get_ipython().run_line_magic('timeit', '-q n')", ("n",), ()),  # -q takes no value
        ("get_ipython().run_line_magic('time', '-n')", ("n",), ()),  # %time takes no options
        ("get_ipython().run_line_magic('timeit', '-z f(a)')", (), ()),  # refused when it runs
        ("get_ipython().run_cell_magic('time', '', 'z = g(b)\\nw = 2\\n')", ("g", "b"), ("z", "w")),
        ("get_ipython().run_line_magic('time', '!ls')", (), ()),  # not Python: left to run time
        ("get_ipython().run_line_magic('env', 'X=1')", (), ()),  # not code
    ],
)
def test_code_run_by_time_magics_is_planned_as_if_written_plainly(python, inputs, outputs):
    plan = plan_cell(python, {"work", "n", "f", "a", "g", "b"})
    assert plan.inputs == inputs and plan.outputs == outputs


def test_deleted_names_are_read_and_noted():
    plan = plan_cell("del a\nif b:\n    del c", {"a", "b", "c"})
    assert plan.inputs == ("a", "b", "c") and plan.deletes == ("a", "c")


def test_imports_are_read_anywhere_in_the_cell_and_only_installed_packages_are_preloaded(tmp_path, monkeypatch):
    source = (
        "import numpy as np, os.path\n"
        "from IPython.display import HTML\n"
        "from . import sibling\n"
        "def f():\n"
        "    import matplotlib.pyplot as plt\n"
        "    import torch\n"
        "    import nbi_plan_own_module\n"
    )
    (tmp_path / "nbi_plan_own_module.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    plan = plan_cell(source, available=set())
    assert plan.imports == (
        "numpy", "os.path", "IPython.display", "matplotlib.pyplot", "torch", "nbi_plan_own_module"
    )
    # The standard library, packages that start threads at import and the user's own
    # module (not in site-packages) stay out.
    assert cell_packages(plan.imports) == ["numpy", "IPython.display", "matplotlib.pyplot"]


def test_own_sources_are_the_users_modules_and_their_submodules_not_installed_ones(tmp_path, monkeypatch):
    from nbisolate.plan import own_sources

    pkg = tmp_path / "nbi_own_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("from . import sub\n")
    (pkg / "sub.py").write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    importlib.import_module("nbi_own_pkg")
    import numpy  # noqa: F401  (installed: never watched)

    try:
        found = own_sources(["nbi_own_pkg", "numpy"])
        assert set(found) == {"nbi_own_pkg", "nbi_own_pkg.sub"}
        path, mtime, size = found["nbi_own_pkg.sub"]
        assert path == str(pkg / "sub.py") and size == len("X = 1\n") and mtime > 0
    finally:
        for name in ("nbi_own_pkg.sub", "nbi_own_pkg"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize(
    ("source", "inputs", "whole"),
    [
        ("r = eval('a + 1')", ("a",), None),
        ("exec('r = a + b')", ("a", "b"), None),
        ("r = globals()['a'] + globals().get('b', 0)", ("a", "b"), None),
        ("names = dir()", (), "dir()"),
        ("frames = [k for k, v in globals().items()]", (), "globals()"),
        ("r = '{a}'.format(**vars())", (), "vars()"),
        ("exec(text)", ("text",), None),  # a text the plan cannot read: the worker may lack names
    ],
)
def test_names_read_through_the_namespace(source, inputs, whole):
    plan = plan_cell(source, {"a", "b", "text"})
    assert (tuple(sorted(plan.inputs)), plan.whole_namespace) == (inputs, whole)


def test_item_writes_are_the_variables_whose_items_the_text_writes():
    plan = plan_cell(
        "arr[0] = 5\nbig['y'] = 2\ndf.loc[0, 'a'] = 1\ndel d[k]\nn += 1\ncfg.opts['a'] = 1\n"
        "s = arr.sum()\nother.append(1)\ndef f():\n    g[0] = 1",
        {"arr", "big", "df", "d", "k", "n", "cfg", "other", "g"},
    )
    # cfg.opts[...] is an attribute's item (nbisolate.attributes); a call may only read.
    assert set(plan.written) == {"arr", "big", "df", "d", "n", "g"}
    assert plan_cell("x = arr[0]", {"arr"}).written == ()
