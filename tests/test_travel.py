"""How each kind of value travels, and that the label says what really happened.

The labels are read from the shipment after serialization (``Shipment.travel``
and ``Shipment.how``), never predicted apart from it. Notebook objects live in
``__main__``, which under pytest is pytest's own, so those are defined by a
real ``python -c`` script and their shipments loaded by another fresh
interpreter, the way a spawned worker loads them.
"""

from __future__ import annotations

import collections
import enum
import io
import json
import pickle
import subprocess
import sys
import textwrap
import threading
import typing

import numpy as np
import pandas as pd
import pytest

from nbisolate import ship, travel
from nbisolate.travel import Route
from nbisolate.wire import HAVE_MEMFD, SHM_THRESHOLD


class Colour(enum.Enum):
    RED = 1


T = typing.TypeVar("T")


def _closure() -> typing.Callable[[int], int]:
    k = 3

    def add(v: int) -> int:
        return v + k

    return add


def shipped(value: object) -> ship.Shipment:
    return ship.dumps({"v": value})


@pytest.mark.parametrize(
    ("value", "label"),
    [
        (json, "module (re-imported)"),
        (len, "by reference"),
        (collections.OrderedDict, "by reference"),
        (json.dumps, "by reference"),
        (Colour, "by reference"),
        (Colour.RED, "by reference"),
        (T, "by reference"),
        (lambda v: v, "by value"),
        (_closure(), "by value"),
        (np.arange(10), "pickle"),
        (pd.DataFrame({"a": [1, 2], "b": ["x", "y"]}), "pickle"),
        ([1, {"a": 2}], "pickle"),
    ],
    ids=lambda v: v if isinstance(v, str) else type(v).__name__,
)
def test_each_kind_is_labelled_with_the_path_it_took(value: object, label: str) -> None:
    s = shipped(value)
    assert s.how["v"] == label == s.label("v") == s.travel["v"].label
    assert s.travel["v"].size == s.sizes["v"] > 0
    out = ship.loads(s.names, s.data, s.buffers, s.engine)["v"]
    if isinstance(value, np.ndarray):
        np.testing.assert_array_equal(out, value)
    elif isinstance(value, pd.DataFrame):
        pd.testing.assert_frame_equal(out, value)
    elif label in ("by reference", "module (re-imported)"):
        assert out is value  # found again by its name, not a copy


def test_a_reference_names_what_it_is_looked_up_by() -> None:
    assert shipped(collections.OrderedDict).travel["v"].reference == "collections.OrderedDict"
    assert shipped(Colour.RED).travel["v"].reference == f"{__name__}.Colour"
    assert shipped([1]).travel["v"].reference is None


@pytest.mark.skipif(not HAVE_MEMFD, reason="shared memory needs memfd_create")
def test_a_15_mb_array_says_direct_copy_because_its_buffers_skip_the_socket() -> None:
    big = np.zeros(15 * 2**20 // 8)
    s = ship.dumps({"big": big, "small": [1, 2]})
    assert s.large_buffers and sum(b.nbytes for b in s.buffers) >= SHM_THRESHOLD
    assert s.how == {"big": "pickle + direct copy", "small": "pickle"}
    assert s.travel["big"].buffer_bytes == big.nbytes


def test_arrays_under_the_threshold_go_through_the_socket() -> None:
    s = ship.dumps({"a": np.zeros(SHM_THRESHOLD // 8 // 4)})
    assert not s.large_buffers and s.how["a"] == "pickle"
    assert s.travel["a"].buffer_bytes == SHM_THRESHOLD // 4


def test_containers_count_what_went_by_value_inside() -> None:
    s = shipped([lambda: 1, _closure(), 3])
    assert s.how["v"] == "pickle" and s.travel["v"].by_value == 2


def test_only_the_variable_the_fast_path_cannot_write_goes_by_dill(tmp_path) -> None:
    path = tmp_path / "f.txt"
    path.write_text("x")
    with open(path) as fh:
        s = ship.dumps({"lock": threading.Lock(), "mod": json, "n": 1, "f": _closure(), "fh": fh})
    assert s.how == {
        "lock": "dill", "mod": "module (re-imported)", "n": "pickle", "f": "by value",
        "fh": "same file, opened again",
    }
    assert travel.route(fh) is Route.OPEN_FILE


def test_the_route_is_the_decision_the_pickler_carried_out() -> None:
    """For every module, function and class the fast pickler meets, it did what route() says."""
    zoo = [json, len, collections.OrderedDict, Colour, lambda: 1, _closure(), travel.route]
    for value in zoo:
        pickler = ship.FastPickler(io.BytesIO(), protocol=ship.PROTOCOL)
        pickler.dump(value)
        how = travel.route(value)
        assert (how is Route.BY_VALUE) == (pickler.copied == 1), value
        assert (how is Route.MODULE) == ("json" in pickler.modules), value


def test_route_is_cheap_and_only_about_the_object_itself() -> None:
    assert travel.route([lambda: 1]) is Route.PICKLE
    assert travel.route(np.arange(3)) is Route.PICKLE
    assert travel.route(typing.TypeVar("Nameless")) is Route.BY_VALUE  # not found under its name
    assert travel.route(type((lambda: 0).__code__)) is Route.REFERENCE  # types.CodeType


# --- notebook-style objects: defined in a real __main__, loaded by a fresh interpreter -----

_NOTEBOOK = textwrap.dedent(
    """
    import enum, pickle, sys, typing
    from nbisolate import ship

    def helper(x):
        return x + 1

    def f(x):
        return helper(x) * 2

    class Point:
        def __init__(self, x):
            self.x = x
        def norm(self):
            return helper(self.x)

    class Colour(enum.Enum):
        RED = 1

    T = typing.TypeVar("T")
    values = {"f": f, "Point": Point, "p": Point(4), "lam": lambda v: v * 3,
              "Colour": Colour, "red": Colour.RED, "T": T}
    out = {}
    for name, value in values.items():
        s = ship.dumps({name: value})
        out[name] = (s.how[name], s.names, s.data, s.engine)
    sys.stdout.buffer.write(pickle.dumps(out))
    """
)

_LOADER = textwrap.dedent(
    """
    import pickle, sys
    from nbisolate import ship
    names, data, engine = pickle.loads(sys.stdin.buffer.read())
    try:
        value = ship.loads(names, data, [], engine)[names[0]]
    except Exception as exc:
        print("fails:", type(exc).__name__, exc)
    else:
        probe = {"f": lambda v: v(4), "Point": lambda v: v(4).norm(), "p": lambda v: v.norm(),
                 "lam": lambda v: v(4)}.get(names[0], repr)
        print("loads:", probe(value))
    """
)


def test_notebook_objects_travel_as_labelled_and_load_where_by_value_says_so() -> None:
    made = subprocess.run(
        [sys.executable, "-c", _NOTEBOOK], capture_output=True, check=True, timeout=120
    ).stdout
    shipments = pickle.loads(made)
    labels = {name: entry[0] for name, entry in shipments.items()}
    # Everything the notebook defined goes by value, an Enum and a TypeVar too.
    assert labels == {
        "f": "by value", "Point": "by value", "p": "pickle",
        "lam": "by value", "Colour": "by value", "red": "by value",
        "T": "by value",
    }
    results = {}
    for name, (_, names, data, engine) in shipments.items():
        results[name] = subprocess.run(
            [sys.executable, "-c", _LOADER], input=pickle.dumps((names, data, engine)),
            capture_output=True, check=True, timeout=120,
        ).stdout.decode().strip()
    assert results["f"] == "loads: 10"
    assert results["Point"] == results["p"] == "loads: 5"
    assert results["lam"] == "loads: 12"
    assert results["Colour"] == "loads: <enum 'Colour'>"
    assert results["red"] == "loads: <Colour.RED: 1>"
    assert results["T"] == "loads: ~T"
