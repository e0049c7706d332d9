"""An isolated cell means what the same cell means in the notebook, both ways.

Each test defines something in the notebook the way a user would, runs an
isolated cell that checks identity *inside the worker* (an assert there fails
the cell), and checks identity again back in the kernel.
"""

from __future__ import annotations

import logging
import sys
import textwrap

import pytest


def cell(code: str) -> str:
    return textwrap.dedent(code).strip("\n")


def isolated(kernel, code: str, timeout: float = 60.0):
    res = kernel.execute("%%isolate\n" + cell(code), timeout=timeout)
    assert res.ok, res.error_text + res.stderr
    return res


# -- one class per class, both ways ------------------------------------------------------


def test_results_refer_to_the_notebooks_own_classes(kernel):
    kernel.run(
        cell(
            """
            from dataclasses import dataclass
            @dataclass
            class Cfg:
                lr: float
            class P:
                def __init__(self, v): self.v = v
                def __eq__(self, o): return isinstance(o, P) and o.v == self.v
            """
        )
    )
    isolated(kernel, "p1 = P(2)\nc1 = Cfg(0.1)\nassert isinstance(p1, P) and type(c1) is Cfg")
    assert kernel.value(
        "(isinstance(p1, P), p1 == P(2), type(p1) is P, isinstance(c1, Cfg), c1 == Cfg(0.1))"
    ) == (True, True, True, True, True)
    # The notebook's class is the same object after the round trip: nothing was redefined.
    kernel.run("_P_before = P; _init_before = P.__init__")
    isolated(kernel, "p2 = P(3)")
    assert kernel.value("(P is _P_before, P.__init__ is _init_before, type(p2) is P)") == (
        True,
        True,
        True,
    )


def test_an_enum_travels_and_its_members_keep_identity(kernel):
    kernel.run(
        cell(
            """
            import enum
            class Color(enum.Enum):
                RED = 1
                GREEN = 2
            favourite = Color.GREEN
            """
        )
    )
    isolated(
        kernel,
        """
        assert favourite is Color.GREEN and Color(1) is Color.RED
        match favourite:
            case Color.GREEN:
                seen = "green"
            case _:
                seen = "other"
        back = Color.RED
        """,
    )
    assert kernel.value("(seen, back is Color.RED, favourite is Color.GREEN)") == ("green", True, True)
    res = kernel.run(
        cell(
            """
            match back:
                case Color.RED:
                    print("matched")
            """
        )
    )
    assert res.stdout.strip() == "matched"


def test_a_factory_and_its_class_arrive_as_one(kernel):
    kernel.run(
        cell(
            """
            class Base:
                pass
            class Thing(Base):
                pass
            def make():
                return Thing()
            """
        )
    )
    isolated(
        kernel,
        """
        t = make()
        assert isinstance(t, Thing) and isinstance(t, Base) and Thing.__mro__[1] is Base
        ok = True
        """,
    )
    assert kernel.value("(ok, type(t) is Thing)") == (True, True)


def test_functions_sharing_a_global_share_it_in_the_worker(kernel):
    kernel.run(
        cell(
            """
            counter = 0
            def bump():
                global counter
                counter += 1
            def read():
                return counter
            """
        )
    )
    isolated(kernel, "bump(); bump()\nseen = read()")
    assert kernel.value("seen") == 2
    # The functions rebound the notebook's global: as after an ordinary cell, it is 2 here too.
    assert kernel.value("counter") == 2


def test_classes_the_cell_defines_come_back_once(kernel):
    isolated(
        kernel,
        """
        class Point:
            def __init__(self, x): self.x = x
        a = Point(1)
        b = Point(2)
        """,
    )
    assert kernel.value("(type(a) is type(b), type(a) is Point, isinstance(b, Point))") == (
        True,
        True,
        True,
    )


def test_functions_from_the_notebook_come_back_as_themselves(kernel):
    kernel.run("def double(x):\n    return 2 * x")
    isolated(kernel, "fn = double\nassert fn(4) == 8")
    assert kernel.value("fn is double") is True


# -- the zoo ----------------------------------------------------------------------------------

ZOO = {
    "int_enum_and_flag": (
        """
        import enum
        class Level(enum.IntEnum):
            LOW = 1
            HIGH = 2
        class Perm(enum.Flag):
            R = 1
            W = 2
        """,
        "assert Level.HIGH > Level.LOW and (Perm.R | Perm.W) & Perm.W is Perm.W\nz = Level.HIGH",
        "z is Level.HIGH",
    ),
    "typevar_generic_protocol": (
        """
        from typing import Generic, Protocol, TypeVar
        T = TypeVar("T")
        class Box(Generic[T]):
            def __init__(self, item: T): self.item = item
        class HasLen(Protocol):
            def __len__(self) -> int: ...
        """,
        "b = Box[int](3)\nassert isinstance(b, Box) and T.__name__ == 'T'\nz = b",
        "type(z) is Box and z.item == 3",
    ),
    "frozen_and_slots_dataclasses": (
        """
        from dataclasses import dataclass
        @dataclass(frozen=True)
        class Frozen:
            a: int
        @dataclass(slots=True)
        class Slotted:
            b: int
        """,
        "z = (Frozen(1), Slotted(2))\nassert hash(z[0]) == hash(Frozen(1))",
        "z == (Frozen(1), Slotted(2)) and type(z[1]) is Slotted",
    ),
    "namedtuple_and_typeddict": (
        """
        from typing import NamedTuple, TypedDict
        class Pair(NamedTuple):
            x: int
            y: int
        class Movie(TypedDict):
            title: str
        """,
        "z = (Pair(1, 2), Movie(title='x'))\nassert z[0].y == 2",
        "type(z[0]) is Pair and z[0] == Pair(1, 2) and z[1] == {'title': 'x'}",
    ),
    "abc_with_a_registered_virtual_subclass": (
        """
        import abc
        class Shape(abc.ABC):
            @abc.abstractmethod
            def area(self): ...
        class Square(Shape):
            def area(self): return 4
        class Foreign:
            pass
        Shape.register(Foreign)
        """,
        "assert issubclass(Foreign, Shape) and Square().area() == 4\nz = Square()",
        "isinstance(z, Shape) and type(z) is Square",
    ),
    "metaclass_init_subclass_properties_slots": (
        """
        class Meta(type):
            def describe(cls): return cls.__name__.lower()
        class Plugin(metaclass=Meta):
            registry = []
            def __init_subclass__(cls, **kw):
                super().__init_subclass__(**kw)
                Plugin.registry.append(cls.__name__)
        class Tight:
            __slots__ = ("v",)
            def __init__(self, v): self.v = v
            @property
            def twice(self): return 2 * self.v
            @classmethod
            def make(cls): return cls(5)
            @staticmethod
            def unit(): return 1
        """,
        """
        class Sub(Plugin):
            pass
        assert Sub.describe() == "sub" and "Sub" in Plugin.registry
        t = Tight.make()
        assert t.twice == 10 and Tight.unit() == 1
        z = t
        """,
        "type(z) is Tight and z.twice == 10",
    ),
    "self_referential_class": (
        """
        class Conf:
            def __init__(self, n=0): self.n = n
        Conf.DEFAULT = Conf(7)
        """,
        "assert Conf.DEFAULT.n == 7 and type(Conf.DEFAULT) is Conf\nz = Conf.DEFAULT",
        "type(z) is Conf and z.n == 7",
    ),
    "recursive_and_mutually_recursive_nested_functions": (
        """
        def outer():
            def fact(n):
                return 1 if n <= 1 else n * fact(n - 1)
            def even(n):
                return True if n == 0 else odd(n - 1)
            def odd(n):
                return False if n == 0 else even(n - 1)
            return fact, even
        fact, even = outer()
        """,
        "assert fact(5) == 120 and even(10)\nz = fact(6)",
        "z == 720",
    ),
    "partials_memoryviews_and_runtime_modules": (
        """
        import functools, types
        def power(base, exp): return base ** exp
        square = functools.partial(power, exp=2)
        view = memoryview(b"abc")
        runtime = types.ModuleType("runtime")
        exec("def hello():\\n    return 'hi'", runtime.__dict__)
        """,
        "z = (square(9), bytes(view), runtime.hello())",
        "z == (81, b'abc', 'hi')",
    ),
    "lru_cached_functions": (
        """
        import functools
        @functools.lru_cache(maxsize=16)
        def fib(n):
            return n if n < 2 else fib(n - 1) + fib(n - 2)
        @functools.cache
        def label(n):
            return f"#{fib(n)}"
        def caller(n):
            return label(n)
        """,
        """
        assert fib.cache_parameters() == {"maxsize": 16, "typed": False}
        z = (fib(20), caller(10), fib, label)
        @functools.lru_cache
        def made_here(n):
            return -n
        made = made_here
        """,
        "z[:2] == (6765, '#55') and z[2] is fib and z[3] is label and made(3) == -3"
        " and made.cache_info().currsize == 1",
    ),
}


@pytest.mark.parametrize("case", sorted(ZOO))
def test_the_zoo_means_the_same(kernel, case):
    define, body, check = ZOO[case]
    kernel.run(cell(define))
    isolated(kernel, body)
    assert kernel.value(check) is True, case


def test_a_closure_from_a_package_with_a_relative_import(tmp_path):
    from .kernel import Kernel

    pkg = tmp_path / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "helpers.py").write_text("def scale(x):\n    return 10 * x\n")
    (pkg / "core.py").write_text(
        "from .helpers import scale\n\ndef make(k):\n    def f(x):\n        return scale(x) + k\n    return f\n"
    )
    k = Kernel(cwd=str(tmp_path))
    try:
        k.run("%load_ext nbisolate")
        k.run("import mypkg.core\nf = mypkg.core.make(1)")
        isolated(k, "z = f(2)")
        assert k.value("z") == 21
    finally:
        k.shutdown()


# -- submodules follow their package ----------------------------------------------------------


def test_submodules_the_notebook_imported_follow_their_package(kernel):
    kernel.run("import xml.dom.minidom\nimport email.mime.text")
    isolated(
        kernel,
        """
        doc = xml.dom.minidom.parseString("<a><b/></a>")
        tag = doc.documentElement.tagName
        msg = email.mime.text.MIMEText("hi")["Content-Type"]
        import sys
        loaded = sorted(m for m in ("xml.dom.minidom", "email.mime.text", "xml.sax") if m in sys.modules)
        del sys
        """,
    )
    assert kernel.value("tag") == "a"
    assert kernel.value("msg").startswith("text/plain")
    # What the cell reaches is imported; what the notebook never imported is not.
    assert kernel.value("loaded") == ["email.mime.text", "xml.dom.minidom"]


def test_a_shipped_function_that_uses_a_submodule(kernel):
    kernel.run("import xml.dom.minidom\ndef root(text):\n    return xml.dom.minidom.parseString(text).documentElement.tagName")
    isolated(kernel, "r = root('<top/>')")
    assert kernel.value("r") == "top"


# -- what the panel and %pickle_check say ------------------------------------------------


def test_travels_as_names_the_path_taken(kernel):
    kernel.run(
        cell(
            """
            import enum, typing
            class Mood(enum.Enum):
                OK = 1
            T2 = typing.TypeVar("T2")
            def helper(): return 1
            """
        )
    )
    res = kernel.execute("%%isolate\nz = (Mood.OK, T2, helper())")
    assert res.ok, res.error_text
    html = "".join(
        str(m["content"]["data"].get("text/html", ""))
        for m in res.messages
        if m["msg_type"] in ("display_data", "update_display_data")
    )
    rows = {name: html.split(f"data-name='{name}'", 1)[1].split("</tr>", 1)[0] for name in ("Mood", "T2", "helper")}
    for name, row in rows.items():
        assert "by value" in row and "dill" not in row, (name, row)
    check = kernel.execute("%pickle_check Mood T2 helper")
    assert check.ok and "cannot" not in check.stdout.lower()


def test_a_class_made_in_one_isolated_cell_travels_to_the_next_and_back(kernel):
    """A class that came back from a worker goes by value to the next worker, keeps its
    identity in the kernel, and its functions see the notebook as their globals."""
    isolated(kernel, "class Vec:\n    def __init__(self, x): self.x = x\n    def double(self): return Vec(2 * self.x)\nv = Vec(1)")
    isolated(kernel, "w = v.double()\nassert type(w) is Vec and isinstance(v, Vec)")
    isolated(kernel, "u = Vec(5).double()")
    assert kernel.value("(type(w) is Vec, type(u) is Vec, u.x, w.x)") == (True, True, 10, 2)
    res = kernel.run("print(Vec(3).double().x)")  # in the kernel, as an ordinary cell
    assert res.stdout.strip() == "6"


def test_one_value_only_dill_can_write_leaves_the_others_their_meaning(kernel, tmp_path):
    """An open file among the results (dill re-opens it), a notebook Enum member, an instance
    of a notebook class, a user's own spawn pool over a notebook function and an IPython
    line, all in one cell: each keeps what it means in an ordinary cell."""
    notes = tmp_path / "notes.txt"
    notes.write_text("kept")
    kernel.run(
        cell(
            f"""
            import enum
            class P:
                def __init__(self, v): self.v = v
            class C(enum.Enum):
                A = 1
                B = 2
            def sq(x): return x * x
            word = "hi"
            notes_path = {str(notes)!r}
            """
        )
    )
    res = kernel.execute(
        "%%isolate --timeout 60\n"
        + cell(
            """
            from multiprocessing import get_context
            p = P(2)
            c = C.A
            fh = open(notes_path)
            with get_context("spawn").Pool(2) as pool:
                squares = pool.map(sq, range(4))
            echoed = !echo $word
            """
        ),
        timeout=120,
    )
    assert res.ok, res.error_text + res.stderr
    assert "Memo" not in res.stderr and "PicklingWarning" not in res.stderr, res.stderr
    assert "'pool' (multiprocessing.pool.Pool) stayed in the worker: it is a process pool" in res.stderr
    summary = [m for m in res.messages if "skipped: pool (multiprocessing.pool.Pool)" in str(m["content"])]
    assert summary, "the summary line names the pool by its type"
    assert "not copied back" not in res.stderr, res.stderr
    assert kernel.value(
        "(type(p) is P, c is C.A, squares, list(echoed), fh.read(), get_context('spawn').get_start_method())"
    ) == (True, True, [0, 1, 4, 9], ["hi"], "kept", "spawn")
    shown = "".join(
        str(m["content"]["data"].get("text/html", ""))
        for m in res.messages
        if m["msg_type"] in ("display_data", "update_display_data")
    )
    kernel.run("fh.close()")
    assert "whole shipment" not in shown


# -- in-place changes to inputs ------------------------------------------------------------


def test_inputs_changed_in_place_change_in_the_notebook(kernel):
    """``model.fit(...)``, ``history.append(...)``, ``cfg[k] = v``, ``arr[i] = v``: the
    notebook's own objects take the change, and every other reference to them sees it."""
    kernel.run(
        cell(
            """
            import numpy as np, pandas as pd
            from dataclasses import dataclass, field
            @dataclass
            class Model:
                w: float = 0.0
                seen: list = field(default_factory=list)
                def fit(self, xs):
                    self.w = sum(xs) / len(xs)
                    self.seen.append(len(xs))
            class Tight:
                __slots__ = ("v",)
                def __init__(self): self.v = 0
            model = Model()
            models = [model]
            history = []
            book = {"h": history}
            cfg = {"lr": 0.1}
            grid = np.zeros(4)
            frame = pd.DataFrame({"a": [1, 2]})
            tight = Tight()
            kept = [1, 2]
            kept_alias = kept
            """
        )
    )
    isolated(
        kernel,
        """
        model.fit([1, 2, 3])
        history.append("epoch 1")
        cfg["lr"] = 0.2
        grid[1] = 5
        frame["b"] = frame.a * 10
        tight.v = 7
        total = len(kept) + len(book)
        if total < 0:
            kept = None
        """,
    )
    assert kernel.value(
        "(models[0] is model, model.w, model.seen, book['h'] is history, history, cfg, grid.tolist())"
    ) == (True, 2.0, [3], True, ["epoch 1"], {"lr": 0.2}, [0.0, 5.0, 0.0, 0.0])
    # Where the notebook's object cannot take the change itself, the name holds the changed copy.
    assert kernel.value("(list(frame.columns), frame.b.tolist(), tight.v)") == (["a", "b"], [10, 20], 7)
    # An input the cell did not change keeps its identity, even one the cell might have bound.
    assert kernel.value("(kept is kept_alias, total)") == (True, 3)


def test_what_a_notebook_function_changes_of_its_globals_changes_in_the_notebook(kernel):
    """``def run(x): results.append(x)`` then ``run(3)``: the cell names ``run``, not ``results``,
    which travels with ``run``; what the call put in it must be in the notebook's own list."""
    kernel.run(
        cell(
            """
            import collections
            results, seen, counts = [], {}, collections.Counter()
            alias = results
            def run(x):
                results.append(x * 2)
            def note(key):
                seen[key] = True
            def outer(key):
                note(key)
                for letter in key:
                    counts[letter] += 1
            """
        )
    )
    isolated(kernel, "run(3)\nouter('abca')")
    assert kernel.value("(results, alias is results, seen, dict(counts))") == (
        [6], True, {"abca": True}, {"a": 2, "b": 1, "c": 1}
    )
    kernel.run("%%isolate --quiet --over v=range(8)\nrun(v)")  # the values of a sweep: side by side, not back
    assert kernel.value("results") == [6]


def test_a_dataframe_or_series_changed_in_place_is_the_notebooks_own(kernel):
    """``alias = df`` then ``df["y"] = 2`` isolated: the alias sees the column, as after an ordinary
    cell (the name used to be bound to the changed copy, and the alias kept the old frame); a
    Series inside a dict takes ``bag["s"][0] = 9`` itself; attrs and a Series' name come too."""
    kernel.run(
        cell(
            """
            import pandas as pd
            df = pd.DataFrame({"a": [1, 2]})
            alias = df
            ser = pd.Series([1, 2], name="s")
            bag = {"s": ser}
            """
        )
    )
    isolated(kernel, 'df["y"] = df.a * 10\ndf.attrs["source"] = "lab"\nbag["s"][0] = 9\nbag["s"].name = "t"')
    assert kernel.value(
        "(alias is df, list(alias.columns), alias.y.tolist(), alias.attrs, "
        "bag['s'] is ser, ser.tolist(), ser.name)"
    ) == (True, ["a", "y"], [10, 20], {"source": "lab"}, True, [9, 2], "t")
    kernel.run('df["z"] = 0')  # and it is a whole frame, not a half-taken one
    assert kernel.value("(df.shape, list(alias.columns))") == ((2, 3), ["a", "y", "z"])


def test_inputs_too_large_to_watch_take_what_the_cell_writes_into_them(kernel):
    """Over the watch limit an input is not compared, but what the cell's text writes into it
    (``arr[0] = 5``, ``big["y"] = 2``, ``big.loc[0, "a"] = -1``, ``arr += 1``, ``del lst[0]``)
    changes the notebook's own object, which every alias sees; a cell that only reads it
    sends nothing back."""
    kernel.run(
        cell(
            """
            import numpy as np, pandas as pd
            arr = np.zeros(300_000); arr_alias = arr
            big = pd.DataFrame({"a": np.arange(300_000)}); big_alias = big
            lst = list(range(300_000)); lst_alias = lst
            """
        )
    )
    res = isolated(kernel, "print(float(arr.sum()) + len(lst))")
    said = [
        m["content"]["data"]["text/plain"]
        for m in res.messages
        if m["msg_type"] in ("display_data", "update_display_data") and "ran " in m["content"]["data"].get("text/plain", "")
    ]
    assert said and said[-1].endswith("0 out"), said  # only read: nothing comes back
    isolated(kernel, 'arr[0] = 5\narr += 1\nbig["y"] = 2\nbig.loc[0, "a"] = -1\ndel lst[0]')
    assert kernel.value(
        "(arr_alias is arr, float(arr_alias[0]), float(arr_alias[1]), big_alias is big, "
        "list(big_alias.columns), int(big_alias.loc[0, 'a']), lst_alias is lst, lst_alias[0], len(lst))"
    ) == (True, 6.0, 1.0, True, ["a", "y"], -1, True, 1, 299_999)


def test_a_failed_cell_changes_nothing_in_place(kernel):
    kernel.run("ledger = []")
    res = kernel.execute("%%isolate\nledger.append(1)\nraise ValueError('no')")
    assert not res.ok
    assert kernel.value("ledger") == []


def test_sweep_values_do_not_change_inputs_in_place(kernel):
    kernel.run("swept = []")
    res = kernel.execute("%%isolate --over v=range(3)\nswept.append(v)")
    assert res.ok, res.error_text
    assert kernel.value("swept") == []


def test_a_name_the_cell_deletes_is_deleted_in_the_notebook(kernel):
    kernel.run("scratch = list(range(10))\nkept_name = 1\nrebound = 0")
    isolated(kernel, "size = len(scratch)\ndel scratch\ndel rebound\nrebound = 2")
    assert kernel.value("('scratch' in globals(), size, kept_name, rebound)") == (False, 10, 1, 2)
    res = kernel.execute("%%isolate\ndel kept_name\nraise ValueError('no')")
    assert not res.ok and kernel.value("kept_name") == 1  # a failed cell deletes nothing


# -- names bound where the cell's text does not show it ---------------------------------------


def test_a_function_that_declares_a_global_updates_deletes_and_makes_it(kernel):
    kernel.run("hits = 0\ndoomed = 'x'")
    code = """
        def hit():
            global hits
            hits += 1
        def drop():
            global doomed
            del doomed
        def make():
            global made
            made = "new"
        hit(); hit(); drop(); make()
        """
    isolated(kernel, code)
    assert kernel.value("(hits, 'doomed' in globals(), made)") == (2, False, "new")


def test_names_bound_at_run_time_come_back_as_after_an_ordinary_cell(kernel):
    kernel.run("late = 1")
    code = """
        exec("from_exec = 5")
        globals()["from_globals"] = [1]
        globals()["late"] = 2
        from math import *
        """
    isolated(kernel, code)
    assert kernel.value("(from_exec, from_globals, late, floor(2.5), pi > 3)") == (5, [1], 2, 2, True)
    # Chosen with --out, only those come back.
    kernel.execute("%%isolate --out chosen\nchosen = 1\nexec('unchosen = 2')")
    assert kernel.value("(chosen, 'unchosen' in globals())") == (1, False)


# -- what the cell changes of its process stays changed, as after an ordinary cell -------------


def test_environment_directory_and_sys_path_the_cell_changes_stay_changed(fresh_kernel, tmp_path):
    k = fresh_kernel
    home = k.value("__import__('os').getcwd()")
    k.run("import os, sys\nos.environ['NBI_GONE'] = 'x'")
    code = f"""
        os.environ["NBI_SET"] = "on"
        del os.environ["NBI_GONE"]
        os.chdir({str(tmp_path)!r})
        sys.path.append("/nbi/extra")
        %env NBI_MAGIC=2
        """
    isolated(k, code)
    assert k.value(
        "(os.environ.get('NBI_SET'), 'NBI_GONE' in os.environ, os.getcwd(), sys.path[-1], os.environ.get('NBI_MAGIC'))"
    ) == ("on", False, str(tmp_path), "/nbi/extra", "2")
    # A failed cell changes nothing, nor does a sweep (which value's would win?).
    assert not k.execute("%%isolate\nos.environ['NBI_FAIL'] = '1'\nos.chdir('/')\nraise ValueError('x')").ok
    assert k.execute("%%isolate --over v=range(3)\nos.environ['NBI_SWEEP'] = str(v)").ok
    assert k.value("('NBI_FAIL' in os.environ, 'NBI_SWEEP' in os.environ, os.getcwd())") == (False, False, str(tmp_path))
    # Where the cell's own process pools report is the worker's: it never reaches the kernel.
    isolated(k, "import multiprocessing as mp\nwith mp.get_context('spawn').Pool(1) as pool:\n    got = pool.map(abs, [-1])")
    assert k.value("(got, [key for key in os.environ if key.startswith('NBISOLATE_MP')])") == ([1], [])
    k.run(f"os.chdir({home!r})")


def test_settings_the_cell_changes_stay_changed(fresh_kernel):
    k = fresh_kernel
    k.run("import logging, sys, warnings\nimport numpy as np, pandas as pd")
    code = """
        warnings.filterwarnings("ignore", message="shush")
        np.set_printoptions(precision=3)
        pd.set_option("display.max_rows", 11)
        sys.setrecursionlimit(4321)
        logging.getLogger("nbi.probe").setLevel(logging.ERROR)
        """
    isolated(k, code)
    assert k.value(
        "(np.get_printoptions()['precision'], pd.get_option('display.max_rows'), sys.getrecursionlimit(),"
        " logging.getLogger('nbi.probe').level)"
    ) == (3, 11, 4321, logging.ERROR)
    res = k.execute("warnings.warn('shush')\nwarnings.warn('speak')")
    assert "speak" in res.stderr and "shush" not in res.stderr, res.stderr
    # Back to a default in the cell: back to it here too.
    isolated(k, 'pd.reset_option("display.max_rows")')
    assert k.value("pd.get_option('display.max_rows')") == 60
    # NumPy's, kept per context, hold across later isolated and ordinary cells; an ordinary
    # cell that changes them again wins over what the isolated one left.
    isolated(k, "np.set_printoptions(precision=2)")
    isolated(k, "seen_inside = np.get_printoptions()['precision']")
    assert k.value("(seen_inside, np.get_printoptions()['precision'])") == (2, 2)
    k.run("np.set_printoptions(precision=5)")
    k.run("pass")
    assert k.value("np.get_printoptions()['precision']") == 5


# -- what IPython puts in the namespace, and the process's arguments ------------------------


def test_decimal_context_and_int_digits_hold_both_ways(fresh_kernel):
    """``decimal.getcontext().prec = 6`` and ``sys.set_int_max_str_digits(0)`` hold for every
    later cell of a notebook: isolated too, and what an isolated cell sets holds after it."""
    k = fresh_kernel
    digits = sys.version_info >= (3, 11)
    k.run("import decimal, sys\ndecimal.getcontext().prec = 6" + ("\nsys.set_int_max_str_digits(0)" if digits else ""))
    isolated(
        k,
        """
        import decimal, sys
        seventh = str(decimal.Decimal(1) / decimal.Decimal(7))
        if sys.version_info >= (3, 11):
            assert len(str(10 ** 5000)) == 5001  # past the default limit of 4300 digits
        decimal.getcontext().prec = 4
        decimal.getcontext().traps[decimal.DivisionByZero] = False
        if sys.version_info >= (3, 11):
            sys.set_int_max_str_digits(6000)
        """,
    )
    assert k.value("seventh") == "0.142857"
    assert k.value("(str(decimal.Decimal(1) / decimal.Decimal(7)), str(decimal.Decimal(1) / decimal.Decimal(0)))") == (
        "0.1429", "Infinity"
    )
    if digits:
        assert k.value("sys.get_int_max_str_digits()") == 6000
    isolated(k, "decimal.setcontext(decimal.Context())")  # back to a new context's settings: here too
    assert k.value("str(decimal.Decimal(1) / decimal.Decimal(7))") == "0.1428571428571428571428571429"


def test_names_read_through_eval_exec_and_globals_travel_and_the_whole_namespace_is_named(kernel):
    kernel.run("a, b = 41, 2")
    isolated(kernel, "via_eval = eval('a + 1')\nexec('via_exec = a + b')\nvia_globals = globals()['b']")
    assert kernel.value("(via_eval, via_exec, via_globals)") == (42, 43, 2)
    kernel.run("%isolate_config panel=text")
    try:
        res = isolated(kernel, "seen = sorted(k for k in globals() if not k.startswith('_')) + [a]")
    finally:
        kernel.run("%isolate_config panel=auto")
    said = res.stdout + res.stderr + "".join(m["content"]["data"].get("text/plain", "") for m in res.of("display_data"))
    assert "reads the notebook's namespace as a whole (globals())" in said
    assert "only the variables it names travel (a)" in said
    assert kernel.value("seen") == ["a", 41]


def test_ipython_history_reads_as_in_an_ordinary_cell(kernel):
    """``_``, ``__``, ``Out[n]``, ``In[n]`` and ``_i``: an ordinary cell reads them as any
    variable, and so does an isolated one (they travel only when the cell reads them)."""
    kernel.run("6 * 7")
    kernel.run("'forty-two'")
    isolated(
        kernel,
        "seen = (_, __, Out[max(Out)], _i.strip(), [o for o in Out.values() if o == 42][-1:], In[-1] == _ih[-1])",
    )
    assert kernel.value("seen") == ("forty-two", 42, "forty-two", "'forty-two'", [42], True)
    # A cell that only binds ``_`` (a loop) sends it back, as an ordinary cell would rebind it.
    isolated(kernel, "for _ in range(3):\n    pass")
    assert kernel.value("_") == 2


def test_the_cell_sees_the_kernels_arguments(kernel):
    """Code that reads its arguments (argparse in a notebook, a library's flags) finds the
    kernel's, as in an ordinary cell: ``parse_known_args`` leaves the same ones unknown."""
    probe = "import argparse, sys\n{0} = (sys.argv, argparse.ArgumentParser().parse_known_args()[1])"
    isolated(kernel, probe.format("iso_args"))
    kernel.run(probe.format("plain_args"))
    assert kernel.value("iso_args == plain_args and len(plain_args[0]) > 1") is True, kernel.value("iso_args")


# -- the notebook's random state -----------------------------------------------------------


def test_seeded_random_draws_are_those_of_ordinary_cells(kernel):
    """random.seed/np.random.seed in the notebook, then cells that draw: isolated or not,
    the same numbers, and the sequence goes on across cells."""
    draw = "drawn = (random.random(), float(np.random.rand()))"
    kernel.run("import random, numpy as np\nrandom.seed(7); np.random.seed(7)")
    isolated(kernel, draw.replace("drawn", "first"))
    kernel.run(draw.replace("drawn", "second"))  # an ordinary cell goes on from the worker's
    isolated(kernel, "third = random.random()")
    expected = kernel.run(
        "random.seed(7); np.random.seed(7)\n"
        + draw.replace("drawn", "e1") + "\n" + draw.replace("drawn", "e2")
        + "\ne3 = random.random()\nprint(repr((e1, e2, e3)))"
    ).stdout.strip()
    assert repr(kernel.value("(first, second, third)")) == expected
    # A failed cell leaves the state where it was.
    kernel.run("random.seed(3)")
    assert not kernel.execute("%%isolate\nrandom.random()\nraise ValueError('x')").ok
    assert kernel.value("random.random()") == kernel.value("(random.seed(3), random.random())[1]")


def test_sweep_values_draw_different_numbers(kernel):
    kernel.run("import random\nrandom.seed(1)")
    res = kernel.execute("%%isolate --over v=range(3)\nr = (v, random.random())")
    assert res.ok, res.error_text + res.stderr
    assert len({draw for _, draw in kernel.value("r")}) == 3


def test_out_naming_an_input_the_cell_left_alone_is_no_typo(kernel):
    kernel.run("given = [1, 2]\nsame_given = given")
    res = kernel.run("%%isolate --out given total\ntotal = sum(given)")
    assert "--out asked for" not in res.stderr, res.stderr
    assert kernel.value("(total, given is same_given)") == (3, True)


def test_a_cell_that_draws_nothing_from_numpy_does_not_import_its_random_module(fresh_kernel):
    """NumPy 2 imports numpy.random only when first used (about 10 ms): a worker sets the
    notebook's NumPy state only once its cell imports it, and then the draws are the kernel's."""
    k = fresh_kernel
    k.run("import numpy as np\nnp.random.seed(5)\nexpected = [float(np.random.rand()) for _ in range(2)]")
    k.run("np.random.seed(5)")
    res = k.execute("%%isolate\nimport sys\nhad = 'numpy.random' in sys.modules\nones = np.ones(3).sum()")
    assert res.ok, res.error_text
    lazy = int(k.value("np.__version__.split('.')[0]")) >= 2
    assert k.value("had") is (not lazy)
    res = k.execute("%%isolate\nfirst = float(np.random.rand())")
    assert res.ok, res.error_text
    assert k.value("[first, float(np.random.rand())] == expected") is True


def test_numpy_state_follows_even_when_the_worker_imports_numpy_itself(fresh_kernel):
    """NumPy seeded in the kernel but not bound in the notebook (so not preloaded): the worker
    does not pay for importing it up front, and a cell that imports it draws the kernel's numbers."""
    k = fresh_kernel
    k.run("__import__('numpy').random.seed(11)\nexpected = float(__import__('numpy').random.rand())")
    k.run("__import__('numpy').random.seed(11)")
    res = k.execute("%%isolate\nimport numpy\ngot = float(numpy.random.rand())")
    assert res.ok, res.error_text
    assert k.value("got == expected") is True


# -- the template imports the notebook's packages as the notebook did -------------------------


def test_a_preloaded_package_sees_the_notebooks_environment_and_directory(tmp_path):
    """Libraries read settings when imported (thread counts from OMP_NUM_THREADS, a backend,
    a config file in the working directory). The template imports the notebook's packages
    ahead of its cells, later than the notebook did: it must do so under the notebook's
    environment and working directory as they are then, not as they were when it started."""
    from .conftest import wait_until
    from .kernel import Kernel

    start, work, lib = tmp_path / "start", tmp_path / "work", tmp_path / "lib"
    for folder in (start, work, lib):
        folder.mkdir()
    (lib / "envprobe.py").write_text(
        "import os\nSEEN = os.environ.get('NBISOLATE_TEST_PROBE')\nWHERE = os.getcwd()\nBY = os.getpid()\n"
    )
    k = Kernel(cwd=str(start))
    try:
        k.run("%load_ext nbisolate")
        isolated(k, "warm = 1")  # the template runs, in the directory and environment it started with
        k.run(f"import os\nos.environ['NBISOLATE_TEST_PROBE'] = 'set in the notebook'\nos.chdir({str(work)!r})")
        k.run(f"import sys\nsys.path.insert(0, {str(lib)!r})\nimport envprobe")
        assert k.value("(envprobe.SEEN, envprobe.WHERE)") == ("set in the notebook", str(work))
        isolated(k, "first = envprobe.SEEN")  # the kernel now has the template preload it
        template = "__import__('nbisolate.supervisor', fromlist=['x']).launcher._current"
        assert wait_until(
            lambda: k.value(f"(lambda t: 'envprobe' in t.preloaded and not t.preloading)({template})"), 20
        )
        isolated(k, "import os\npreloaded = envprobe.BY != os.getpid()\nseen, where = envprobe.SEEN, envprobe.WHERE")
        assert k.value("preloaded") is True  # imported by the template: what this test is about
        assert k.value("(first, seen, where)") == ("set in the notebook", "set in the notebook", str(work))
    finally:
        k.shutdown()


def test_a_module_of_the_users_edited_and_reloaded_runs_its_new_code_isolated(tmp_path):
    """The template imports the notebook's own modules once for every worker; after the user
    edits one and reloads it (importlib.reload here; %autoreload does the same), isolated
    cells run the new code, as ordinary cells do, and again after a second edit."""
    from .conftest import wait_until
    from .kernel import Kernel

    lib = tmp_path / "lib"
    lib.mkdir()
    source = lib / "mylib_edit.py"
    source.write_text("def version():\n    return 1\n")
    k = Kernel(cwd=str(tmp_path))
    try:
        k.run("%load_ext nbisolate")
        k.run(f"import sys\nsys.path.insert(0, {str(lib)!r})\nimport importlib, mylib_edit")
        isolated(k, "v = mylib_edit.version()")
        template = "__import__('nbisolate.supervisor', fromlist=['x']).launcher._current"
        assert wait_until(
            lambda: k.value(f"(lambda t: 'mylib_edit' in t.preloaded and not t.preloading)({template})"), 20
        )
        for version in (2, 3):
            source.write_text(f"import os\nBY = os.getpid()\n\ndef version():\n    return {version}  # edited\n")
            k.run("importlib.reload(mylib_edit)")
            assert k.value("mylib_edit.version()") == version
            isolated(k, "import os\nv = mylib_edit.version()\nby_template = mylib_edit.BY != os.getpid()")
            assert k.value("v") == version
            assert k.value("by_template") is True  # the template's copy, reloaded: what this is about
    finally:
        k.shutdown()


# -- the notebook's settings hold in the worker ---------------------------------------------


SETTINGS_CELL = """
import sys, warnings
warnings.warn("silenced by the notebook", UserWarning)
def depth(n):
    return 0 if n == 0 else 1 + depth(n - 1)
deep = depth(5000)  # past the default recursion limit of 1000
try:
    warnings.warn("an error in this notebook", FutureWarning)
    raised = False
except FutureWarning:
    raised = True
try:
    np.float64(1.0) / np.float64(0.0)
    divided = True
except FloatingPointError:
    divided = False
shown = str(np.array([1 / 3]))
rows = len(str(pd.DataFrame({"a": range(100)})).splitlines())
"""


def test_the_notebooks_warning_filters_recursion_limit_numpy_and_pandas_settings_hold_isolated(fresh_kernel):
    """Set once at a notebook's top, obeyed by every later cell: an isolated cell obeys them too."""
    k = fresh_kernel
    k.run(
        cell(
            """
            import sys, warnings
            import numpy as np
            import pandas as pd
            pd.set_option("display.max_rows", 6)
            warnings.filterwarnings("ignore", category=UserWarning)
            warnings.simplefilter("error", FutureWarning)
            sys.setrecursionlimit(20000)
            np.seterr(divide="raise")
            np.set_printoptions(precision=2)
            """
        )
    )
    names = "(deep, raised, divided, shown, rows)"
    ordinary = k.execute(cell(SETTINGS_CELL))
    assert ordinary.ok, ordinary.error_text
    expected = k.value(names)
    assert expected[:4] == (5000, True, False, "[0.33]") and expected[4] < 20  # what they mean here
    k.run("del deep, raised, divided, shown, rows")
    res = isolated(k, SETTINGS_CELL)
    assert k.value(names) == expected
    assert "silenced by the notebook" not in res.stderr + ordinary.stderr


def test_a_plot_style_set_in_the_notebook_holds_isolated(fresh_kernel):
    """A style, a theme or a figure size set once makes every later plot look alike."""
    k = fresh_kernel
    k.run(
        cell(
            """
            import matplotlib.pyplot as plt
            plt.style.use("ggplot")
            plt.rcParams["figure.figsize"] = (3.0, 2.0)
            plt.rcParams["lines.linewidth"] = 4.5
            """
        )
    )
    look = "(tuple(plt.rcParams['figure.figsize']), plt.rcParams['lines.linewidth'], plt.rcParams['axes.facecolor'])"
    expected = k.value(look)
    assert expected[:2] == ((3.0, 2.0), 4.5)
    isolated(k, f"seen = {look}\nsize = tuple(float(x) for x in plt.figure().get_size_inches())\nplt.close('all')")
    assert k.value("seen") == expected
    assert k.value("size") == (3.0, 2.0)


def test_figures_are_drawn_in_the_formats_the_notebook_chose(fresh_kernel):
    """``%config InlineBackend.figure_formats``: SVG (or retina PNG) isolated, as in the kernel."""
    k = fresh_kernel
    k.run("import matplotlib.pyplot as plt")
    k.run("%config InlineBackend.figure_formats = ['svg']")
    plot = "plt.plot([1, 3, 2])\nplt.show()"
    ordinary = k.execute(plot)
    res = isolated(k, plot)
    kinds = [sorted(m["content"]["data"]) for m in ordinary.messages if m["msg_type"] == "display_data"]
    assert kinds and all("image/svg+xml" in kind for kind in kinds), kinds  # what the setting means here
    shown = [sorted(m["content"]["data"]) for m in res.messages if m["msg_type"] == "display_data"]
    assert [kind for kind in shown if "image/svg+xml" in kind] == kinds, shown


def test_log_records_show_as_the_notebook_configured_them(fresh_kernel):
    """After ``logging.basicConfig(level=logging.INFO)`` a cell's log records show, in its format."""
    k = fresh_kernel
    k.run('import logging\nlogging.basicConfig(level=logging.INFO, format="%(levelname)s|%(name)s|%(message)s")')
    k.run('logging.getLogger("noisy.lib").setLevel(logging.ERROR)')
    body = 'logging.getLogger("job").info("step one")\nlogging.getLogger("noisy.lib").warning("hidden")'
    ordinary = k.execute(body)
    assert "INFO|job|step one" in ordinary.stderr and "hidden" not in ordinary.stderr  # here
    res = isolated(k, body)
    assert "INFO|job|step one" in res.stderr and "hidden" not in res.stderr, res.stderr


def test_log_handlers_of_any_logger_write_where_they_write_in_the_notebook(fresh_kernel, tmp_path):
    """A training loop logging to a file, a named logger that prints to the cell, a logger that
    does not propagate, ``basicConfig(filename=...)`` in the cell itself: the same lines, in the
    same places and order, as after ordinary cells. Before, a record of the cell's on a logger
    with its own handlers went nowhere (the worker's logger had none), and a log file the
    notebook opened with mode "w" would have been written over by the notebook's next line."""
    k = fresh_kernel
    outs = {}
    for way in ("ordinary", "isolated"):
        folder = tmp_path / way
        folder.mkdir()
        k.run(
            cell(
                f"""
                import logging, sys
                D = {str(folder)!r}
                train = logging.getLogger(f"train.{way}")
                train.setLevel(logging.INFO)
                train.propagate = False
                to_file = logging.FileHandler(f"{{D}}/train.log", mode="w")
                to_file.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
                train.addHandler(to_file)
                shown = logging.getLogger(f"shown.{way}")
                shown.setLevel(logging.INFO)
                shown.addHandler(logging.StreamHandler(sys.stdout))
                train.info("epoch 0")
                """
            )
        )
        body = (
            'train.info("epoch 1")\nshown.info("to the cell")\n'
            'logging.basicConfig(filename=f"{D}/root.log", level=logging.INFO, force=True)\n'
            'logging.info("configured in the cell")'
        )
        res = k.execute(("%%isolate\n" if way == "isolated" else "") + body)
        assert res.ok, res.error_text + res.stderr
        k.run('train.info("epoch 2")\nlogging.info("after the cell")\n[h.flush() for h in (*train.handlers, *logging.getLogger().handlers)]')
        outs[way] = (
            res.stdout,
            k.value('open(f"{D}/train.log").read()'),
            k.value('open(f"{D}/root.log").read()'),
            k.value("(train.propagate, len(train.handlers), type(logging.getLogger().handlers[-1]).__name__)"),
        )
        k.run("to_file.close()\nlogging.basicConfig(force=True)")
    assert outs["ordinary"] == outs["isolated"] == (
        "to the cell\n",
        "INFO epoch 0\nINFO epoch 1\nINFO epoch 2\n",
        "INFO:root:configured in the cell\nINFO:root:after the cell\n",
        (False, 1, "FileHandler"),
    )


def test_warnings_as_errors_hold_for_the_cells_code_not_for_the_workers_own_steps(fresh_kernel):
    """``simplefilter("error")`` in a notebook turns the cells' warnings into errors; a warning of
    the worker's own (loading an input, sending a result) must not fail the cell."""
    k = fresh_kernel
    k.run(
        cell(
            """
            import warnings
            class Noisy:  # warns when rebuilt, as an old pickle of a library might
                def __reduce__(self):
                    return (_rebuild, ())
            def _rebuild():
                warnings.warn("rebuilt from an old format", DeprecationWarning)
                return Noisy()
            noisy = Noisy()
            warnings.simplefilter("error")
            """
        )
    )
    res = k.execute("%%isolate\nkept = type(noisy).__name__\ntry:\n    warnings.warn('the cell', UserWarning)\n    raised = False\nexcept UserWarning:\n    raised = True")
    assert res.ok, res.error_text
    assert k.value("(kept, raised)") == ("Noisy", True)


def test_the_processs_own_state_travels_as_the_other_sides_own(kernel):
    """``from os import environ``, ``from matplotlib import rcParams``: in an ordinary cell the
    name is the process's own object, and setting through it changes the process."""
    kernel.run("import os, sys, matplotlib\nfrom os import environ\nfrom matplotlib import rcParams\nfrom sys import path as search_path")
    code = """
        import os, sys, matplotlib
        assert environ is os.environ and rcParams is matplotlib.rcParams and search_path is sys.path
        environ["NBI_THROUGH_ALIAS"] = "yes"
        from os import environ as env_too
        from random import _inst as generator
        kept = rcParams
        """
    isolated(kernel, code)
    assert kernel.value(
        "(env_too is os.environ, kept is matplotlib.rcParams, os.environ.pop('NBI_THROUGH_ALIAS'),"
        " generator is __import__('random')._inst)"
    ) == (True, True, "yes", True)


def test_builtins_is_the_module_as_in_a_notebooks_main(kernel):
    # A function or class that comes back by value is rebuilt on the notebook's namespace, and
    # cloudpickle sets the builtins *dict* there: the notebook's own module must stay.
    isolated(kernel, "def made_here():\n    return len([1])\nclass MadeHere:\n    pass")
    assert kernel.value("(type(__builtins__).__name__, __builtins__.len is len, made_here())") == ("module", True, 1)
    isolated(kernel, "kind = type(__builtins__).__name__\nfound = __builtins__.len is len\nagain = made_here()")
    assert kernel.value("(kind, found, again)") == ("module", True, 1)


# -- what cells set on modules, classes and functions ---------------------------------------


def _config_module(kernel, folder, name: str) -> None:
    """A module of the user's own, as a project's ``config.py`` is, imported by the notebook."""
    (folder / f"{name}.py").write_text(
        "LR = 1.0\nGONE = 'in the file'\nclass Knob:\n    n = 0\ndef lr():\n    return LR\n"
    )
    kernel.run(f"import sys\nsys.path.insert(0, {str(folder)!r})\nimport {name}")


def test_what_an_isolated_cell_sets_on_modules_classes_and_functions_is_set_in_the_notebook(kernel, tmp_path):
    """``config.LR = 0.1`` in an ordinary cell changes the module every cell shares; modules,
    classes and functions arrive in the worker as its own and come back as the notebook's,
    so what the cell set on them must come back as such."""
    _config_module(kernel, tmp_path, "cfg_back")
    kernel.run("from cfg_back import Knob\nclass Local:\n    seen = 0\ndef helper():\n    pass")
    isolated(
        kernel,
        """
        cfg_back.LR = 0.1
        del cfg_back.GONE
        Knob.n += 5
        Local.seen = 2
        helper.calls = 3
        setattr(cfg_back, "ADDED", [1, 2])
        import collections
        collections.nbisolate_flag = "set"
        def later(v):
            cfg_back.LATER = v  # set by a function the cell defines and calls
        later("called")
        if False:
            Knob.n = -1  # never runs: the notebook keeps what it has
        """,
    )
    assert kernel.value(
        "(cfg_back.LR, hasattr(cfg_back, 'GONE'), Knob.n, cfg_back.Knob is Knob, Local.seen, helper.calls,"
        " cfg_back.ADDED, __import__('collections').nbisolate_flag, cfg_back.LATER, cfg_back.lr())"
    ) == (0.1, False, 5, True, 2, 3, [1, 2], "set", "called", 0.1)
    # Another isolated cell finds them set, as an ordinary cell would.
    isolated(
        kernel,
        """
        assert (cfg_back.LR, Knob.n, cfg_back.ADDED, cfg_back.lr()) == (0.1, 5, [1, 2], 0.1), cfg_back.LR
        assert not hasattr(cfg_back, "GONE")
        import cfg_back as again
        assert again.LATER == "called"
        """,
    )
    kernel.run("del __import__('collections').nbisolate_flag")


def test_what_the_notebook_set_on_a_module_holds_in_isolated_cells(kernel, tmp_path):
    """The worker imports a module from its file; what ordinary cells set on it since (a
    learning rate, a class attribute, an attribute deleted) must hold there all the same:
    in a module the cell names, one it imports itself under another name, and one that a
    notebook function reads."""
    _config_module(kernel, tmp_path, "cfg_there")
    kernel.run(
        "cfg_there.LR = 0.5\ncfg_there.Knob.n = 7\ndel cfg_there.GONE\n"
        "def scaled(x):\n    return x * cfg_there.lr()"
    )
    isolated(
        kernel,
        """
        import cfg_there as c
        seen = (cfg_there.LR, c.Knob.n, hasattr(c, "GONE"), scaled(2))
        assert seen == (0.5, 7, False, 1.0), seen
        """,
    )
    assert kernel.value("seen") == (0.5, 7, False, 1.0)
    kernel.run("cfg_there.LR = 0.25")  # changed again in an ordinary cell: the new value travels
    isolated(kernel, "latest = cfg_there.lr()")
    assert kernel.value("latest") == 0.25


def test_a_modules_list_or_dict_changed_in_place_changes_both_ways(kernel, tmp_path):
    """``config.LAYERS.append(3)`` and ``config.OPTS["a"] = 1`` change a value the module holds;
    every reference to it sees the change, in the notebook as after an ordinary cell, and the
    isolated cells after it see it too; so does a change an ordinary cell made."""
    (tmp_path / "cfg_inplace.py").write_text("LAYERS = [1, 2]\nOPTS = {}\nclass Model:\n    pass\n")
    kernel.run(
        f"import sys\nsys.path.insert(0, {str(tmp_path)!r})\nimport cfg_inplace\n"
        "from cfg_inplace import LAYERS\ncfg_inplace.Model.spec = {'depth': 1}"
    )
    isolated(
        kernel,
        """
        cfg_inplace.LAYERS.append(3)
        cfg_inplace.OPTS["lr"] = 0.1
        cfg_inplace.Model.spec["depth"] = 2
        """,
    )
    assert kernel.value(
        "(cfg_inplace.LAYERS, LAYERS is cfg_inplace.LAYERS, cfg_inplace.OPTS, cfg_inplace.Model.spec)"
    ) == ([1, 2, 3], True, {"lr": 0.1}, {"depth": 2})
    kernel.run("cfg_inplace.LAYERS.append(4)\ncfg_inplace.OPTS['momentum'] = 0.9")  # ordinary cells
    isolated(kernel, "seen = (list(cfg_inplace.LAYERS), dict(cfg_inplace.OPTS), cfg_inplace.Model.spec)")
    assert kernel.value("seen") == ([1, 2, 3, 4], {"lr": 0.1, "momentum": 0.9}, {"depth": 2})


def test_an_attribute_that_cannot_travel_is_named_and_the_rest_holds(kernel, tmp_path):
    _config_module(kernel, tmp_path, "cfg_locked")
    kernel.run("cfg_locked.lines = (n for n in range(3))\ncfg_locked.LR = 0.5")  # no pickler writes a generator
    first = isolated(kernel, "seen = cfg_locked.LR")
    assert "cfg_locked.lines, which the notebook set, cannot travel to the worker" in first.stderr
    assert kernel.value("seen") == 0.5
    again = isolated(kernel, "seen = cfg_locked.LR + 1")
    assert "cfg_locked.lines" not in again.stderr  # said once
    back = isolated(kernel, "cfg_locked.LR = 0.75\ncfg_locked.other = (n for n in range(3))")
    assert "the attribute cfg_locked.other was not copied back" in back.stderr
    assert kernel.value("(cfg_locked.LR, hasattr(cfg_locked, 'other'))") == (0.75, False)


def test_sweep_values_set_nothing_on_the_notebooks_modules(kernel, tmp_path):
    _config_module(kernel, tmp_path, "cfg_swept")
    res = kernel.run("%%isolate --quiet --over v=range(3)\ncfg_swept.LAST = v\nr = v", timeout=120)
    assert res.ok
    assert kernel.value("(r, hasattr(cfg_swept, 'LAST'), [n for n in globals() if '\\x00' in n])") == (
        [0, 1, 2], False, []
    )


# -- a function's default arguments are state it keeps -----------------------------------


def test_a_default_argument_the_cell_changes_is_changed_in_the_notebook(kernel):
    """``def log(x, seen=[])`` keeps what each call appended: a call in an isolated cell
    appends to the notebook's own list, as the same call in an ordinary cell does."""
    kernel.run(
        cell(
            """
            def log(x, seen=[], *, counts={}):
                seen.append(x)
                counts[x] = counts.get(x, 0) + 1
                return len(seen)
            log(0)
            kept = log.__defaults__[0]
            def fixed(x, k=3):
                return x * k
            """
        )
    )
    isolated(kernel, "n = log(1)\nm = fixed(2)")
    assert kernel.value("(n, m, log.__defaults__[0], log.__kwdefaults__)") == (2, 6, [0, 1], {"counts": {0: 1, 1: 1}})
    assert kernel.value("log.__defaults__[0] is kept") is True  # the notebook's own list, changed
    assert kernel.value("log(2)") == 3  # and the next ordinary call continues from it
    assert kernel.value("[k for k in globals() if not k.isidentifier()]") == []
    # A cell that defines the function anew brings back the new one, not the old one's defaults.
    isolated(kernel, "def log(x, seen=[]):\n    seen.append(x)\n    return len(seen)\nlog(5)")
    assert kernel.value("(log(6), kept)") == (2, [0, 1, 2])


def test_a_closures_variables_the_cell_changes_are_changed_in_the_notebook(kernel):
    """A counter made by a closure counts on after an isolated call, as after an ordinary one:
    a rebound ``nonlocal`` and a list it appends to."""
    kernel.run(
        cell(
            """
            def make_counter():
                n = 0
                calls = []
                def count(tag):
                    nonlocal n
                    n += 1
                    calls.append(tag)
                    return n
                return count
            count = make_counter()
            count("a")
            """
        )
    )
    isolated(kernel, "got = count('b')")
    assert kernel.value("(got, count('c'))") == (2, 3)
    assert kernel.value("count.__closure__[count.__code__.co_freevars.index('calls')].cell_contents") == ["a", "b", "c"]


def test_the_items_of_a_tuple_the_cell_changes_are_changed_in_the_notebook(kernel):
    kernel.run("history, best = [], {}\npair = (history, best)")
    isolated(kernel, "pair[0].append(0.5)\npair[1]['lr'] = 0.1")
    assert kernel.value("(pair, pair[0] is history, pair[1] is best)") == (([0.5], {"lr": 0.1}), True, True)


def test_what_methods_set_on_the_notebooks_class_is_set_on_it(kernel):
    """``Particle.count += 1`` in ``__init__``: making particles in an isolated cell counts them
    on the notebook's class, as an ordinary cell does, though the cell's text never names it."""
    kernel.run(
        cell(
            """
            class Particle:
                count = 0
                made = []
                def __init__(self, name):
                    Particle.count += 1
                    Particle.made.append(name)
                    type(self).last = name
            first = Particle("a")
            made_before = Particle.made
            """
        )
    )
    isolated(kernel, "ps = [Particle(n) for n in 'bc']")
    assert kernel.value("(Particle.count, Particle.made, Particle.last)") == (3, ["a", "b", "c"], "c")
    assert kernel.value("Particle.made is made_before and type(ps[0]) is Particle") is True
    # An instance alone brings its class: a method called on it counts there too.
    isolated(kernel, "first.__init__('d')")
    assert kernel.value("(Particle.count, Particle.last)") == (4, "d")
    assert kernel.value("[k for k in globals() if not k.isidentifier()]") == []


def test_an_object_inside_a_changed_input_stays_the_notebooks_own(kernel):
    """``for m in models.values(): m.fit(3)`` fits the notebook's estimators themselves, so
    ``est_a`` (named nowhere in the cell) is fitted too; an object moved inside an input keeps
    its identity, and one the cell put in anew is new, as in an ordinary cell."""
    kernel.run(
        cell(
            """
            class Est:
                def __init__(self):
                    self.coef = None
                def fit(self, v):
                    self.coef = v
            est_a, est_b = Est(), Est()
            models = {"a": est_a, "b": est_b}
            inner = [0]
            log = [inner]
            old = Est()
            slots = {"x": old}
            """
        )
    )
    isolated(kernel, "for m in models.values():\n    m.fit(3)\nlog[0].append(1)\nlog.insert(0, ['new'])\nslots['x'] = Est()")
    assert kernel.value("(est_a.coef, est_b.coef, models['a'] is est_a)") == (3, 3, True)
    assert kernel.value("(log, log[1] is inner, inner)") == ([["new"], [0, 1]], True, [0, 1])
    assert kernel.value("(slots['x'] is old, type(slots['x']) is Est)") == (False, True)


def test_a_slotted_object_a_bound_method_and_a_partial_change_the_notebooks_objects(kernel):
    """An object kept in ``__slots__`` takes its change in place (every alias sees it); a bound
    method (``step = model.step``) and a partial (``partial(put, acc)``) change the object they
    carry, the notebook's own, as they do in an ordinary cell."""
    kernel.run(
        cell(
            """
            import functools
            class Point:
                __slots__ = ("x", "y")
                def __init__(self):
                    self.x, self.y = 0, 0
            pt = Point()
            alias = pt
            class Model:
                def __init__(self):
                    self.steps = 0
                def step(self):
                    self.steps += 1
            model = Model()
            step = model.step
            acc = []
            def put(target, x):
                target.append(x)
            add = functools.partial(put, acc)
            """
        )
    )
    isolated(kernel, "pt.x = 5\nstep()\nstep()\nadd(1)")
    assert kernel.value("(pt.x, alias.x, pt is alias)") == (5, 5, True)
    assert kernel.value("(model.steps, step.__self__ is model)") == (2, True)
    assert kernel.value("(acc, add.args[0] is acc)") == ([1], True)


def test_a_thread_still_running_as_the_cell_ends_is_named_not_lost_silently(kernel):
    """In the notebook a thread runs on after its cell; in a worker it stops with the
    process, and what it would have done never happens. The cell names each thread it
    started that was still running; a thread that finished, and the threads of a library
    (an executor left open), are not named."""
    res = isolated(
        kernel,
        """
        import threading, time
        from concurrent.futures import ThreadPoolExecutor
        done = []
        def work():
            time.sleep(60)
            done.append("late")
        def quick():
            done.append(0)
        threading.Thread(target=work, daemon=True, name="loader").start()
        finished = threading.Thread(target=quick)
        finished.start()
        finished.join()
        pool = ThreadPoolExecutor(2)
        pool.submit(quick).result()
        """,
    )
    said = [line for line in res.stderr.splitlines() if line.startswith("nbisolate: thread ")]
    assert len(said) == 1, res.stderr
    assert "thread 'loader', which the cell started to run work(), was still running" in said[0]
    assert ".join()" in said[0] and "ThreadPoolExecutor-" not in res.stderr
    assert kernel.value("done") == [0, 0]


# -- what the notebook defined, found by name and by its text, in the worker ---------------


def test_pickling_an_instance_of_a_notebook_class_works_in_the_worker_as_in_the_notebook(kernel):
    """``pickle.dumps(p)`` finds ``p``'s class as ``__main__.P``. A class that reached the worker
    inside ``p`` (the cell does not name it) is bound there under the notebook's name, and so
    is a notebook function inside a value: saving them works isolated as it does in the
    notebook, and what was saved loads back in the notebook. A class the notebook no longer
    has under its name is bound nowhere, in either place."""
    kernel.run(
        cell(
            """
            import pickle
            class P:
                def __init__(self, v): self.v = v
            def scale(x): return 2 * x
            p = P(3)
            hooks = {"scale": scale}
            class Old: pass
            old = Old()
            class Old: pass
            """
        )
    )
    isolated(
        kernel,
        """
        blob = pickle.dumps((p, hooks))
        again, their_hooks = pickle.loads(blob)
        assert again.v == 3 and their_hooks["scale"](4) == 8
        try:
            pickle.dumps(old)
        except pickle.PicklingError as exc:
            refused = str(exc)
        """,
    )
    assert kernel.value("(lambda t: (type(t[0]) is P, t[0].v, t[1]['scale'] is scale))(pickle.loads(blob))") == (
        True,
        3,
        True,
    )
    assert "Old" in kernel.value("refused")


def test_a_traceback_through_a_notebook_function_shows_its_cell_and_lines(kernel):
    """An error inside a notebook function the isolated cell calls names the function's cell
    as IPython does (``Cell In[n], line 3, in f()``) with its lines, not a copy's nameless
    file; ``inspect.getsource`` finds a notebook function's text in the worker; and a
    function an isolated cell defined shows its lines when it fails in the notebook."""
    defined = kernel.execute(cell(
        """
        def f(x):
            y = x + 1
            return 1 / (y - y)
        """
    ))
    number = defined.reply["content"]["execution_count"]
    res = kernel.execute("%%isolate\nf(1)", allow_error=True)
    assert f"Cell In[{number}]" in res.error_text and "return 1 / (y - y)" in res.error_text
    assert "dynamic-code" not in res.error_text and "ipykernel_" not in res.error_text
    isolated(kernel, "import inspect\nsource = inspect.getsource(f)")
    assert kernel.value("source") == kernel.value("inspect.getsource(f)")
    isolated(kernel, "def g(x):\n    z = x * 2\n    return z / 0")
    res = kernel.execute("g(1)", allow_error=True)
    assert "return z / 0" in res.error_text and "dynamic-code" not in res.error_text


def test_a_singledispatch_function_travels_and_what_the_cell_registers_on_it_stays(kernel):
    """A ``functools.singledispatch`` function of the notebook dispatches in the worker as in
    the notebook (copied as a plain function it could not travel at all: its dispatch cache
    cannot be pickled); ``@show.register`` in the isolated cell registers on the notebook's
    own function, as in an ordinary cell, and the function stays the notebook's."""
    kernel.run(
        cell(
            """
            import functools
            @functools.singledispatch
            def show(x):
                return "any"
            @show.register
            def _(x: int):
                return "int"
            class Q:
                pass
            _show_before = show
            """
        )
    )
    isolated(
        kernel,
        """
        @show.register
        def _(x: Q):
            return "Q"
        seen = (show(1), show(Q()), show(1.5))
        """,
    )
    assert kernel.value("seen") == ("int", "Q", "any")
    assert kernel.value("(show is _show_before, show(Q()), show(2), show('s'))") == (True, "Q", "int", "any")


def test_a_class_with_a_cached_property_and_a_singledispatchmethod_travels(kernel):
    """Up to Python 3.11 a ``functools.cached_property`` holds a lock, which no pickler takes:
    such a class went to dill, and with a ``singledispatchmethod`` beside it could not travel
    at all. Its instance works in the worker as in the notebook, the value cached here too."""
    kernel.run(
        cell(
            """
            import functools
            class Report:
                def __init__(self, rows): self.rows = rows
                @functools.cached_property
                def total(self): return sum(self.rows)
                @functools.singledispatchmethod
                def fmt(self, x): return f"any {x}"
                @fmt.register
                def _(self, x: int): return f"int {x}"
            report = Report([1, 2, 3])
            report.total
            """
        )
    )
    isolated(kernel, "seen = (report.total, report.fmt(1), report.fmt('a'), type(report).__name__)")
    assert kernel.value("seen") == (6, "int 1", "any a", "Report")
    assert kernel.value("type(report) is Report")


def test_weak_references_refer_to_the_same_objects_and_changes_through_them_come_back(kernel):
    """A weak reference or weak container travelled as dill makes it: a copy of its referent
    of its own, held by nothing in the worker, so ``wr() is o`` was False and ``wr()`` alone
    was None. They travel with their referents now, which stay alive for the cell, and what
    the cell changes through them is changed on the notebook's own objects."""
    kernel.run(
        cell(
            """
            import weakref
            class Node:
                def __init__(self): self.v = 0
            node = Node()
            ref = weakref.ref(node)
            cache = weakref.WeakValueDictionary({"a": node})
            nodes = weakref.WeakSet([node])
            dead = weakref.ref(Node())
            """
        )
    )
    isolated(kernel, "assert ref() is node and cache['a'] is node and node in nodes and dead() is None")
    isolated(kernel, "assert ref() is not None and type(ref()).__name__ == 'Node'")  # the referent alone
    isolated(kernel, "ref().v = 5")  # through the reference only: the notebook's node changes
    assert kernel.value("(node.v, ref() is node, cache['a'] is node)") == (5, True, True)
    isolated(kernel, "fresh = Node()\ncache['b'] = fresh\nkept = weakref.ref(fresh)")
    assert kernel.value("(sorted(cache), cache['b'] is fresh, kept() is fresh, cache['a'] is node)") == (
        ["a", "b"], True, True, True,
    )
    # A copy that only a weak reference holds is gone once the results are bound, as it would be.
    isolated(kernel, "gone = weakref.ref(Node())")
    assert kernel.value("gone() is None")


def test_an_object_holding_a_lock_takes_the_cells_change_and_keeps_its_own_lock(kernel):
    """An input only dill can write (an object holding a lock, a queue) was never compared, so
    what a cell changed in it stayed in the worker, silently: ``store.items.append(1)`` was
    lost. It is compared as it travels now, and takes the change; the locks, conditions and
    events it holds stay the notebook's own (a thread of the kernel may hold or wait on one)."""
    kernel.run(
        cell(
            """
            import queue, threading
            class Store:
                def __init__(self):
                    self.lock = threading.Lock()
                    self.ready = threading.Event()
                    self.items = []
            store = Store()
            items, lock, ready = store.items, store.lock, store.ready
            jobs = queue.Queue()
            jobs.put("first")
            jobs.put("second")
            waiting_on = jobs.not_empty
            """
        )
    )
    isolated(kernel, "with store.lock:\n    store.items.append(1)\nfirst = jobs.get_nowait()")
    assert kernel.value("(store.items, items is store.items, first, jobs.qsize(), jobs.get_nowait())") == (
        [1], True, "first", 1, "second",
    )
    assert kernel.value("(store.lock is lock, store.ready is ready, jobs.not_empty is waiting_on)") == (
        True, True, True,
    )
    assert kernel.value("(lock.locked(), jobs.mutex.locked())") == (False, False)
    # Made in the cell, it comes back an instance of the notebook's class, not of a copy.
    isolated(kernel, "fresh = Store()\nfresh.items.append(2)")
    assert kernel.value("(type(fresh) is Store, isinstance(fresh, Store), fresh.items)") == (True, True, [2])


def test_an_exception_whose_init_takes_other_arguments_is_raised_as_itself(kernel):
    """Pickle rebuilds an exception by calling its class with its ``args``: one whose
    ``__init__`` takes other arguments could not be loaded, so the notebook saw a
    ``RemoteError`` where an ordinary cell raises the notebook's own exception."""
    kernel.run(
        cell(
            """
            class PairError(Exception):
                def __init__(self, a, b):
                    super().__init__(f"{a}-{b}")
                    self.a, self.b = a, b
            """
        )
    )
    res = kernel.execute("%%isolate\nraise PairError(1, 2)")
    assert (res.error["ename"], res.error["evalue"]) == ("PairError", "1-2"), res.error_text
    kernel.run(
        cell(
            """
            try:
                get_ipython().run_cell_magic("isolate", "--quiet", "raise PairError(3, 4)")
            except PairError as e:
                caught = (type(e) is PairError, e.a, e.b, str(e))
            """
        )
    )
    assert kernel.value("caught") == (True, 3, 4, "3-4")
    # Kept in a variable, both ways: it comes back, and goes to the next cell, as itself.
    isolated(kernel, "try:\n    raise PairError(5, 6)\nexcept PairError as e:\n    err = e")
    assert kernel.value("(type(err) is PairError, err.a, err.b, str(err))") == (True, 5, 6, "5-6")
    isolated(kernel, "seen = (type(err) is PairError, err.a, str(err))")
    assert kernel.value("seen") == (True, 5, "5-6")
    # Inside what a cell returns (a list of failures, a dict of them), where it was not
    # copied back at all ("missing 1 required positional argument"), and inside an input.
    isolated(kernel, "failures = {'x': [PairError(7, 8)]}\nboth = (failures, err)")
    assert kernel.value(
        "(type(failures['x'][0]) is PairError, failures['x'][0].b, str(failures['x'][0]), both[1].a)"
    ) == (True, 8, "7-8", 5)
    isolated(kernel, "inner = (type(failures['x'][0]) is PairError, failures['x'][0].a)")
    assert kernel.value("inner") == (True, 7)
    # A class with its own way to be pickled keeps it.
    kernel.run(
        cell(
            """
            class OwnWay(Exception):
                def __init__(self, n):
                    super().__init__(n)
                    self.n, self.reduced = n, False
                def __reduce__(self):
                    return (_own_way, (self.n,))
            def _own_way(n):
                e = OwnWay(n)
                e.reduced = True
                return e
            """
        )
    )
    isolated(kernel, "own = [OwnWay(3)]")
    assert kernel.value("(type(own[0]) is OwnWay, own[0].n, own[0].reduced)") == (True, 3, True)


def test_context_variables_travel_and_what_the_cell_sets_holds_after_it(kernel):
    """A ``ContextVar`` could not be sent at all (``cannot pickle '_contextvars.ContextVar'``).
    It goes as the notebook's variable: its value in the notebook's context goes with it, it
    comes back as itself, and a value the cell set stays set for the cells after it, as an
    ordinary cell's ``set`` does (though a kernel runs an awaiting cell in a copy of its context)."""
    kernel.run(
        cell(
            """
            import contextvars
            request_id = contextvars.ContextVar("request_id", default="none")
            unset = contextvars.ContextVar("unset")
            def current():
                return request_id.get()
            """
        )
    )
    isolated(kernel, "seen = (current(), request_id.get(), request_id.name)")
    assert kernel.value("seen") == ("none", "none", "request_id")
    kernel.run("_ = request_id.set('r1')")
    isolated(kernel, "seen = current()\ntry:\n    unset.get()\nexcept LookupError:\n    missing = True")
    assert kernel.value("(seen, missing)") == ("r1", True)
    isolated(kernel, "_ = request_id.set('r2')\ninside = current()\nsame = (request_id, unset)")
    assert kernel.value("(inside, request_id.get(), current(), same[0] is request_id, same[1] is unset)") == (
        "r2", "r2", "r2", True, True,
    )
    assert kernel.value("request_id.get()") == "r2"  # and in the cell after that one
    isolated(kernel, "again = request_id.get()")
    assert kernel.value("again") == "r2"
    # A cell that does not set it leaves the notebook's value alone, even bound again.
    kernel.run("_ = request_id.set('r3')")
    isolated(kernel, "alias = request_id")
    assert kernel.value("(request_id.get(), alias is request_id)") == ("r3", True)


def test_a_deque_the_cell_changes_is_changed_in_place(kernel):
    """A ``collections.deque`` changed by an isolated cell was rebound to the changed copy:
    another name for it (or a list holding it) still saw it as it was."""
    kernel.run("import collections\nrecent = collections.deque([1], maxlen=3)\nsame_recent = recent")
    isolated(kernel, "recent.extend([2, 3, 4])")
    assert kernel.value("(list(recent), same_recent is recent, recent.maxlen)") == ([2, 3, 4], True, 3)


def test_a_thread_waiting_on_a_queue_gets_what_an_isolated_cell_put(kernel):
    """A kernel thread blocked in ``queue.get()`` was not woken by the items an isolated cell
    put in the notebook's queue: they arrived in its deque, and the thread slept on."""
    kernel.run(
        cell(
            """
            import queue, threading
            work, got = queue.Queue(), []
            consumer = threading.Thread(target=lambda: got.append(work.get(timeout=20)), daemon=True)
            consumer.start()
            """
        )
    )
    isolated(kernel, "work.put('job 1')")
    assert kernel.value("(consumer.join(10), got, consumer.is_alive())") == (None, ["job 1"], False)


# -- a notebook object the cell binds again is that object ---------------------------------


IDENTITY_CELLS = [
    ("y = data\npair = (data, 1)\nd = {'k': arr}\nbox = Box(); box.ref = data\nz = arr",
     "(y is data, pair[0] is data, d['k'] is arr, box.ref is data, z is arr)"),
    ("data.append(4)\ny = data", "(y is data, data)"),
    ("w = arr\nw[0] = 99", "(w is arr, int(arr[0]))"),
    ("y = data\ny.append(5)", "(y is data, data)"),
]


def test_a_notebook_object_the_cell_binds_again_is_that_object(kernel):
    """``y = data`` binds the notebook's own list, as in an ordinary cell (``y.append`` changes
    ``data`` afterwards), also inside what the cell builds (``pair = (data, 1)``), and after the
    cell changed it in place; an array bound again goes back as a reference, not as a copy."""
    setup = "import numpy as np\ndata = [1, 2, 3]\narr = np.arange(5)\nclass Box: pass"
    seen = {}
    for how, prefix in (("ordinary", ""), ("isolated", "%%isolate --quiet\n")):
        kernel.run(setup)
        seen[how] = []
        for code, probe in IDENTITY_CELLS:
            res = kernel.run(prefix + code)
            assert res.stderr == "", res.stderr
            seen[how].append(kernel.value(probe))
        kernel.run("y.append(6)")
        seen[how].append(kernel.value("data[-1]"))
    assert seen["isolated"] == seen["ordinary"], seen
    assert seen["isolated"][0] == (True, True, True, True, True)
    kernel.run("big = np.zeros(20_000_000)")  # 160 MB: bound again, it goes back as a reference
    kernel.run("%%isolate --quiet\nsame = big\ntotal = float(big.sum())")
    assert kernel.value("(same is big, total)") == (True, 0.0)
    # Too large to watch, changed by a method call: bound again under its own name, it comes back.
    kernel.run("%%isolate --quiet\nbig.fill(7)\nbig = big")
    assert kernel.value("float(big[0])") == 7.0
    kernel.run("del big, same")
