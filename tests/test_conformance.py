"""By-value conformance: where cloudpickle carries a value, nbisolate's shipping carries it too.

cloudpickle's own test suite is the reference for what "by value" means; these
cases cover the same ground in our own words. A real ``__main__`` (a ``python
-c`` script, as a notebook's namespace is ``__main__``) defines each value and
writes it twice, with ``cloudpickle.dumps`` and with :func:`nbisolate.ship.dumps`;
a *fresh* interpreter that never saw that ``__main__`` loads both and runs the
same check on each. Every case cloudpickle passes must pass through ship.
"""

from __future__ import annotations

import pickle
import subprocess
import sys
import textwrap

import pytest

# name -> (source that defines ``value`` in the notebook's __main__, a check run where it loads)
CASES: dict[str, tuple[str, str]] = {
    "lambda": ("value = lambda x: x * 3", "v(4) == 12"),
    "closure_with_nonlocal": (
        """
        def counter():
            n = 0
            def bump():
                nonlocal n
                n += 1
                return n
            return bump
        value = counter()
        """,
        "(v(), v()) == (1, 2)",
    ),
    "recursive_nested": (
        """
        def outer():
            def fib(n):
                return n if n < 2 else fib(n - 1) + fib(n - 2)
            return fib
        value = outer()
        """,
        "v(10) == 55",
    ),
    "defaults_kwdefaults_annotations_attributes": (
        """
        def f(a, b=2, *, c=3) -> int:
            "doc of f"
            return a + b + c
        f.tag = "t"
        value = f
        """,
        "v(1) == 6 and v.__doc__ == 'doc of f' and v.tag == 't' and v.__kwdefaults__ == {'c': 3}"
        " and v.__annotations__ == {'return': int}",
    ),
    "functions_sharing_a_global": (
        """
        total = 0
        def add(n):
            global total
            total += n
        def read():
            return total
        value = (add, read)
        """,
        "(v[0](5), v[0](2), v[1]())[2] == 7",
    ),
    "generator_and_coroutine_functions": (
        """
        def gen(n):
            yield from range(n)
        async def coro():
            return 9
        value = (gen, coro)
        """,
        "list(v[0](3)) == [0, 1, 2] and __import__('asyncio').run(v[1]()) == 9",
    ),
    "partial_of_a_notebook_function": (
        """
        import functools
        def power(b, e):
            return b ** e
        value = functools.partial(power, e=3)
        """,
        "v(2) == 8",
    ),
    "class_with_super_and_bound_method": (
        """
        class Base:
            def hello(self):
                return "base"
        class Child(Base):
            def hello(self):
                return "child+" + super().hello()
        value = (Child, Child().hello)
        """,
        "v[0]().hello() == 'child+base' and v[1]() == 'child+base'",
    ),
    "instances_share_one_class": (
        """
        class Pt:
            def __init__(self, x):
                self.x = x
        value = [Pt(1), Pt(2), Pt]
        """,
        "type(v[0]) is type(v[1]) is v[2] and v[1].x == 2",
    ),
    "slots_property_classmethod_staticmethod": (
        """
        class Tight:
            __slots__ = ("v",)
            def __init__(self, v):
                self.v = v
            @property
            def twice(self):
                return 2 * self.v
            @classmethod
            def make(cls):
                return cls(5)
            @staticmethod
            def one():
                return 1
        value = Tight(3)
        """,
        "v.twice == 6 and type(v).make().twice == 10 and type(v).one() == 1 and not hasattr(v, '__dict__')",
    ),
    "dataclasses_frozen_and_slots": (
        """
        import dataclasses
        @dataclasses.dataclass(frozen=True)
        class Frozen:
            a: int
        value = (Frozen(1), Frozen)
        """,
        "v[0] == v[1](1) and hash(v[0]) == hash(v[1](1))",
    ),
    "enum_intenum_flag": (
        """
        import enum
        class Colour(enum.Enum):
            RED = 1
            BLUE = 2
        class Level(enum.IntEnum):
            LOW = 1
        class Perm(enum.Flag):
            R = 1
            W = 2
        value = (Colour.RED, Colour, Level.LOW, Perm.R | Perm.W, Perm)
        """,
        "v[0] is v[1].RED and v[2] == 1 and v[3] == v[4].R | v[4].W and list(v[1])[1].name == 'BLUE'",
    ),
    "namedtuple_and_typeddict": (
        """
        import typing
        class Pair(typing.NamedTuple):
            x: int
            y: int = 0
        class Movie(typing.TypedDict):
            title: str
        value = (Pair(1), Movie)
        """,
        "v[0] == (1, 0) and v[0].y == 0 and v[1](title='x') == {'title': 'x'}",
    ),
    "typevar_generic_protocol": (
        """
        import typing
        T = typing.TypeVar("T")
        class Box(typing.Generic[T]):
            def __init__(self, item: T):
                self.item = item
        class Sized(typing.Protocol):
            def __len__(self) -> int: ...
        value = (T, Box[int](3), Sized)
        """,
        "v[0].__name__ == 'T' and v[1].item == 3 and v[2].__name__ == 'Sized'",
    ),
    "abc_with_registered_virtual_subclass": (
        """
        import abc
        class Shape(abc.ABC):
            @abc.abstractmethod
            def area(self): ...
        class Square(Shape):
            def area(self):
                return 4
        class Foreign:
            pass
        Shape.register(Foreign)
        value = (Shape, Square(), Foreign)
        """,
        "isinstance(v[1], v[0]) and issubclass(v[2], v[0]) and v[1].area() == 4",
    ),
    "metaclass_and_init_subclass": (
        """
        class Meta(type):
            def describe(cls):
                return cls.__name__.lower()
        class Plugin(metaclass=Meta):
            seen = []
            def __init_subclass__(cls, **kw):
                super().__init_subclass__(**kw)
                Plugin.seen.append(cls.__name__)
        class Sub(Plugin):
            pass
        value = (Plugin, Sub)
        """,
        "v[1].describe() == 'sub' and 'Sub' in v[0].seen",
    ),
    "self_referential_class": (
        """
        class Conf:
            def __init__(self, n=0):
                self.n = n
        Conf.DEFAULT = Conf(7)
        value = Conf
        """,
        "type(v.DEFAULT) is v and v.DEFAULT.n == 7",
    ),
    "notebook_exception_class_and_instance": (
        """
        class Oops(ValueError):
            pass
        value = (Oops, Oops("bad"))
        """,
        "isinstance(v[1], v[0]) and str(v[1]) == 'bad'",
    ),
    "custom_reduce": (
        """
        class Token:
            def __init__(self, s):
                self.s = s
            def __reduce__(self):
                return (Token, (self.s.upper(),))
        value = Token("ab")
        """,
        "v.s == 'AB'",
    ),
    "function_using_a_module_and_a_submodule": (
        """
        import json
        import xml.dom.minidom
        def parse(s):
            return xml.dom.minidom.parseString(s).documentElement.tagName + json.dumps(1)
        value = parse
        """,
        "v('<a/>') == 'a1'",
    ),
    "runtime_module": (
        """
        import types
        value = types.ModuleType("made_here")
        exec("def hi():\\n    return 'hi'", value.__dict__)
        """,
        "v.hi() == 'hi'",
    ),
    "memoryview_and_builtins": (
        """
        value = (memoryview(b"abc"), len, str.upper, type(None), NotImplemented, Ellipsis)
        """,
        "bytes(v[0]) == b'abc' and v[1]('ab') == 2 and v[2]('a') == 'A' and v[3] is type(None)"
        " and v[4] is NotImplemented and v[5] is Ellipsis",
    ),
    "code_object": ("value = compile('1 + 2', '<s>', 'eval')", "eval(v) == 3"),
    "lambda_default_and_container_of_functions": (
        """
        def base():
            return 1
        value = {"f": lambda g=base: g() + 1, "s": frozenset({base})}
        """,
        "v['f']() == 2 and next(iter(v['s']))() == 1",
    ),
}

_DUMP = """
import pickle, sys, textwrap
import cloudpickle
from nbisolate import ship
cases = pickle.loads(sys.stdin.buffer.read())
out = {}
for name, source in cases.items():
    exec(textwrap.dedent(source), globals())
    value = globals()["value"]
    entry = {}
    try:
        entry["cloudpickle"] = cloudpickle.dumps(value)
    except Exception:
        entry["cloudpickle"] = None
    s = ship.dumps({"value": value}, main=globals())
    entry["ship"] = (s.names, s.data, [bytes(b) for b in s.buffers], s.engine, s.how["value"])
    out[name] = entry
sys.stdout.buffer.write(pickle.dumps(out))
"""

_LOAD = """
import pickle, sys
from nbisolate import ship
dumped, checks, how = pickle.loads(sys.stdin.buffer.read())
out = {}
for name, entry in dumped.items():
    try:
        if how == "cloudpickle":
            if entry["cloudpickle"] is None:
                out[name, how] = "cannot dump"
                continue
            v = pickle.loads(entry["cloudpickle"])
        else:
            names, data, buffers, engine, _ = entry["ship"]
            v = ship.loads(names, data, buffers, engine)["value"]
        out[name, how] = "ok" if eval(checks[name]) is True else "check false"
    except Exception as exc:
        out[name, how] = f"{type(exc).__name__}: {exc}"
sys.stdout.buffer.write(pickle.dumps(out))
"""


@pytest.fixture(scope="module")
def outcomes() -> dict[tuple[str, str], str]:
    sources = {name: textwrap.dedent(src) for name, (src, _) in CASES.items()}
    dumped = subprocess.run(
        [sys.executable, "-c", _DUMP], input=pickle.dumps(sources),
        capture_output=True, timeout=120,
    )
    assert dumped.returncode == 0, dumped.stderr.decode()
    checks = {name: check for name, (_, check) in CASES.items()}
    found: dict[tuple[str, str], str] = {}
    for how in ("cloudpickle", "ship"):  # apart: cloudpickle's class tracker would link the two
        loaded = subprocess.run(
            [sys.executable, "-c", _LOAD],
            input=pickle.dumps((pickle.loads(dumped.stdout), checks, how)),
            capture_output=True, timeout=120,
        )
        assert loaded.returncode == 0, loaded.stderr.decode()
        found.update(pickle.loads(loaded.stdout))
    return found


# Where ship keeps more than cloudpickle alone: cloudpickle sets ``__slots__`` after making
# the class, so the copy's instances get a ``__dict__`` and no slots.
BEYOND_CLOUDPICKLE = {"slots_property_classmethod_staticmethod"}


@pytest.mark.parametrize("case", sorted(CASES))
def test_what_cloudpickle_carries_ship_carries(outcomes, case):
    reference = outcomes[case, "cloudpickle"]
    if case in BEYOND_CLOUDPICKLE:
        assert reference != "ok", "cloudpickle carries this one now: move it out of BEYOND_CLOUDPICKLE"
    else:
        assert reference == "ok", f"the case itself is wrong: cloudpickle gives {reference}"
    assert outcomes[case, "ship"] == "ok", outcomes[case, "ship"]
