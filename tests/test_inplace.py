"""In-place changes: what is watched, what counts as changed, how the notebook's object takes it."""

from __future__ import annotations

import json
import pickle
import random
import threading

import numpy as np
import pytest

from nbisolate import inplace, ship


class Plain:
    def __init__(self) -> None:
        self.w = 0


class Seeded(random.Random):
    pass


class Guarded:
    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)


def test_only_small_changeable_inputs_are_watched():
    values = {"n": 1, "s": "x", "t": (1,), "mod": json, "f": len, "lst": [], "big": [0], "obj": Plain()}
    sizes = {"lst": 10, "big": inplace.WATCH_LIMIT + 1, "obj": 50}
    assert inplace.watchable(values, sizes) == ["lst", "obj"]


def test_a_change_is_seen_and_an_untouched_or_rebound_input_is_not():
    ns = {"a": [1], "b": {"k": 1}, "c": Plain(), "d": [0]}
    taken = inplace.snapshot(ns, ["a", "b", "c", "d"])
    ns["a"].append(2)
    ns["c"].w = 3
    ns["d"] = [0]  # bound to a new object: an ordinary result, not an in-place change
    assert inplace.changed(ns, taken) == (["a", "c"], ["b"])


def test_a_value_only_dill_can_write_is_watched_as_dill_writes_it_a_lock_itself_never():
    holder = Plain()
    holder.lock, holder.items = threading.Lock(), []
    ns = {"lock": threading.Lock(), "holder": holder}
    # A lock is each process's own: nothing of it comes back.
    assert inplace.watchable(ns, {"lock": 100, "holder": 100}) == ["holder"]
    taken = inplace.snapshot(ns, ["holder"])
    assert inplace.changed(ns, taken) == ([], ["holder"])
    holder.items.append(1)
    assert inplace.changed(ns, taken) == (["holder"], [])


def test_an_object_taking_a_change_keeps_its_own_locks_and_events():
    obj, new = Plain(), Plain()
    obj.lock, obj.ready, obj.n = threading.Lock(), threading.Event(), 1
    new.lock, new.ready, new.n = threading.Lock(), threading.Event(), 2
    lock, ready = obj.lock, obj.ready
    assert inplace.apply_in_place(obj, new, {})
    assert obj.n == 2 and obj.lock is lock and obj.ready is ready


def test_apply_keeps_the_notebooks_objects_and_their_links():
    a, holder = [1], {"a": None}
    holder["a"] = a
    new_a, new_holder = [1, 2], {"a": None}
    new_holder["a"] = new_a
    swap = {id(new_a): a, id(new_holder): holder}
    assert inplace.apply_in_place(a, new_a, swap) and inplace.apply_in_place(holder, new_holder, swap)
    assert a == [1, 2] and holder["a"] is a


def test_apply_what_can_and_cannot_take_a_change():
    obj, new = Plain(), Plain()
    new.w = 5
    assert inplace.apply_in_place(obj, new, {}) and obj.w == 5
    arr = np.zeros(3)
    assert inplace.apply_in_place(arr, np.ones(3), {}) and arr.tolist() == [1, 1, 1]
    assert not inplace.apply_in_place(np.zeros(3), np.ones(4), {})  # another shape: rebind
    assert not inplace.apply_in_place(Guarded(), Guarded(), {})  # its own __setattr__
    assert not inplace.apply_in_place(Seeded(1), Seeded(2), {})  # state outside its __dict__
    assert not inplace.apply_in_place([1], (1,), {})  # another type
    s, b = {1}, bytearray(b"a")
    assert inplace.apply_in_place(s, {2}, {}) and s == {2}
    assert inplace.apply_in_place(b, bytearray(b"bc"), {}) and b == b"bc"


def test_the_shipment_sizes_decide_with_the_real_pickler():
    small, big = [1, 2, 3], np.zeros(inplace.WATCH_LIMIT // 4)
    s = ship.dumps({"small": small, "big": big})
    assert inplace.watchable({"small": small, "big": big}, s.sizes) == ["small"]


def test_an_object_applied_onto_itself_is_left_intact():
    # A process-state value (os.environ) comes back as the kernel's own object: "applying" the
    # change must not empty it first (clearing its __dict__ broke the kernel's os.environ).
    class Holder:
        def __init__(self) -> None:
            self.data = {"k": 1}

    obj, mapping = Holder(), {"a": 1}
    assert inplace.apply_in_place(obj, obj, {}) and obj.data == {"k": 1}
    assert inplace.apply_in_place(mapping, mapping, {}) and mapping == {"a": 1}


def test_dict_and_set_kinds_take_a_change_with_their_own_meaning():
    import collections

    counts, ordered = collections.Counter(a=1), collections.OrderedDict(b=1, a=2)
    assert inplace.apply_in_place(counts, collections.Counter(a=2, b=1), {})
    assert dict(counts) == {"a": 2, "b": 1}  # set, not counted again
    assert inplace.apply_in_place(ordered, collections.OrderedDict(a=3, c=4), {})
    assert list(ordered.items()) == [("a", 3), ("c", 4)] and ordered.popitem() == ("c", 4)


def test_what_functions_bring_along_is_watched_when_it_holds_state_and_is_small():
    ns = {"results": [], "tally": {}, "big": list(range(200_000)), "n": 3, "arr": np.zeros(3), "f": len}
    assert inplace.brought_along(ns, list(ns)) == ["results", "tally", "arr"]


def test_what_a_notebook_function_keeps_is_watched_and_taken_back():
    ns: dict = {}
    exec(
        "def log(x, seen=[], n=0, *, counts={}, tag='t'):\n    pass\n"
        "def counter():\n    n = 0\n    hits = []\n    def inc():\n        nonlocal n\n        n += 1\n"
        "        hits.append(n)\n        return n\n    return inc\n"
        "inc = counter()",
        ns,
    )
    ns["log"].__module__ = ns["inc"].__module__ = "__main__"
    ns["imported"] = inplace.holds_state  # not the notebook's: never watched
    seen = inplace.watch_functions(ns, ["log", "inc", "imported", "missing"])
    assert sorted(seen) == sorted(inplace.STATE + k for k in ("log.seen", "log.counts", "inc.n", "inc.hits"))
    ns["log"].__defaults__[0].append(1)
    ns["inc"]()
    changed = inplace.functions_changed(ns, seen)
    assert changed == {inplace.STATE + "log.seen": [1], inplace.STATE + "inc.n": 1, inplace.STATE + "inc.hits": [1]}
    # The kernel's own functions take it: a default in place, a closure's variable in place or rebound.
    kernel: dict = {}
    exec(
        "def log(x, seen=[]):\n    pass\n"
        "def counter():\n    n = 0\n    hits = []\n    def inc():\n        nonlocal n\n        n += 1\n"
        "        hits.append(n)\n        return n\n    return inc\n"
        "inc = counter()",
        kernel,
    )
    own_seen, own_hits = kernel["log"].__defaults__[0], inplace._closure(kernel["inc"])["hits"].cell_contents
    for key, value in changed.items():
        assert inplace.take_function_state(kernel, key, value)
    assert kernel["log"].__defaults__[0] is own_seen == [1]
    assert kernel["inc"]() == 2 and own_hits == [1, 2]
    assert not inplace.take_function_state(kernel, inplace.STATE + "missing.x", 1)
    assert inplace.describe_state(inplace.STATE + "log.seen") == "seen, which log() keeps"


def test_a_tuple_of_changeable_items_is_watched_and_its_items_take_the_change():
    items, table = [1], {"a": 1}
    pair = (items, table, 3)
    assert inplace.changeable(pair) and inplace.holds_state(pair)
    assert not inplace.changeable((1, "a")) and inplace.changeable(((1, [2]),))
    assert inplace.apply_in_place(pair, ([1, 2], {"a": 1, "b": 2}, 3), {})
    assert pair[0] is items == [1, 2] and pair[1] is table == {"a": 1, "b": 2}
    assert not inplace.apply_in_place((1,), (2,), {})  # an item that is a value cannot change: rebound
    array = np.zeros(2)
    assert inplace.apply_in_place((array,), (np.ones(2),), {}) and array.tolist() == [1.0, 1.0]


def test_objects_that_stay_inside_an_input_keep_their_identity():
    class Est:
        def __init__(self) -> None:
            self.coef = None

    a, b, inner = Est(), Est(), [0]
    models = {"a": a, "b": b, "log": [inner]}
    before = inplace.identities(models)
    assert {path for path, _ in before.values()} == {(("k", "a"),), (("k", "b"),), (("k", "log"),), (("k", "log"), ("i", 0))}
    # As a worker would leave it: one fitted, one list moved, one object replaced by an equal new one.
    a.coef = 3
    models["log"].insert(0, ["new"])
    models["b"] = Est()
    pairs = inplace.same_objects(models, before)
    assert (("k", "a"),) in [now for now, _ in pairs] and ((("k", "log"), ("i", 1)), (("k", "log"), ("i", 0))) in pairs
    assert all(now != (("k", "b"),) for now, _ in pairs)
    assert inplace.moved(models, before) and not inplace.moved(models, inplace.identities(models))
    # The kernel's own objects take the change, and the input refers to them again.
    a0, b0, inner0 = Est(), Est(), [0]
    mine = {"a": a0, "b": b0, "log": [inner0]}
    theirs = ship.loads(["m"], *_dumped(models))["m"]
    swap = {id(theirs): mine}
    inplace.keep_identities({"m": mine}, {"m": theirs}, {"m": pairs}, swap)
    assert inplace.apply_in_place(mine, theirs, swap)
    assert mine["a"] is a0 and a0.coef == 3 and mine["log"][1] is inner0 and mine["log"][0] == ["new"]
    assert mine["b"] is not b0 and mine["b"].coef is None


def _dumped(value):
    shipped = ship.dumps({"m": value})
    return shipped.data, shipped.buffers, shipped.engine


def test_an_object_kept_in_slots_takes_a_change_in_place_unless_c_keeps_state_too():
    class Point:
        __slots__ = ("x", "y", "__weakref__")

    class Frozen:
        __slots__ = ("x",)

        def __setattr__(self, name, value):
            raise AttributeError(name)

    mine, theirs = Point(), Point()
    mine.x, theirs.x, theirs.y = 1, 2, [3]
    assert inplace.holds_state(mine) and inplace.apply_in_place(mine, theirs, {})
    assert (mine.x, mine.y) == (2, [3])
    del theirs.y
    assert inplace.apply_in_place(mine, theirs, {}) and not hasattr(mine, "y")
    assert inplace._slot_names(Frozen()) is None and inplace._slot_names(random.Random()) is None


def test_a_dataframe_and_a_series_take_their_copy_in_place():
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame({"a": [1, 2]})
    col = df["a"]
    copy = pickle.loads(pickle.dumps(df))
    copy["y"] = 2
    copy.attrs["k"] = 1
    assert inplace.holds_state(df) and inplace.apply_in_place(df, copy, {})
    assert list(df.columns) == ["a", "y"] and df.attrs == {"k": 1} and col.tolist() == [1, 2]
    df["z"] = 3  # the notebook's frame goes on as a whole one
    assert df.shape == (2, 3)
    ser = pd.Series([1, 2], name="s")
    copy = pickle.loads(pickle.dumps(ser))
    copy[0] = 9
    copy.name = "t"
    assert inplace.apply_in_place(ser, copy, {}) and ser.tolist() == [9, 2] and ser.name == "t"
    # Inside a changed input, a Series is an object that keeps its identity.
    assert list(inplace.identities({"s": ser}).values())[0][1] is ser
