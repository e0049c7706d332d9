"""Shipping: the per-object choice of serializer, sharing, modules and failures."""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import sqlite3
import subprocess
import sys
import threading

import numpy as np
import pytest

from nbisolate import ship
from nbisolate.errors import ShipError

from .conftest import new_shm, shm_names


def roundtrip(values):
    s = ship.dumps(values)
    return s, ship.loads(s.names, s.data, s.buffers, s.engine)


def test_plain_data_takes_the_c_pickler_and_keeps_sharing():
    a = [1]
    s, out = roundtrip({"a": a, "b": {"x": a}})
    assert s.engine == "pickle"
    assert out["b"]["x"] is out["a"]


def test_modules_are_reimported_not_pickled():
    holder = {"mod": json}
    s, out = roundtrip({"json": json, "holder": holder})
    assert out["json"] is json and out["holder"]["mod"] is json
    assert s.how["json"] == "module (re-imported)"
    assert s.sizes["json"] < 100


def test_local_functions_and_classes_go_by_value_with_their_globals():
    def make():
        k = 3

        class Local:
            def get(self):
                return k

        return Local, (lambda v: v + k)

    Local, fn = make()
    s, out = roundtrip({"cls": Local, "obj": Local(), "fn": fn})
    assert s.engine == "pickle" and s.how["fn"] == "by value"
    assert out["obj"].get() == 3 and out["fn"](1) == 4
    assert type(out["obj"]) is out["cls"]


def test_a_traitlets_class_travels_without_what_its_metaclass_computes():
    """A widget class defined in a notebook travels by value; what traitlets' metaclass computes
    from it (its bases' descriptors, the library's own handlers among them) does not: copied, it
    carried ipywidgets' ``_comm_changed`` by value with its module's registry of every widget.
    It is computed again on loading, so the class's own trait and handler still work there."""
    widgets = pytest.importorskip("ipywidgets")
    traitlets = pytest.importorskip("traitlets")

    def make():
        class Counter(widgets.Button):
            clicks = traitlets.Int(0)

            @traitlets.observe("clicks")
            def _show(self, change):
                self.description = f"clicked {change['new']}"

        return Counter

    Counter = make()
    others = [widgets.IntSlider() for _ in range(3)]  # the process's widgets, in ipywidgets' registry
    s, out = roundtrip({"cls": Counter})
    assert b"_comm_changed" not in s.data and len(s.data) < 4000, len(s.data)
    button = out["cls"](description="count")
    button.clicks = 2
    assert button.description == "clicked 2"
    assert "clicks" in out["cls"].class_trait_names() and "description" in out["cls"].class_trait_names()
    for widget in [*others, button]:
        widget.close()


def test_arrays_travel_out_of_band_and_sizes_count_them():
    arr = np.arange(100_000, dtype=np.float64)
    s, out = roundtrip({"arr": arr})
    assert len(s.buffers) == 1 and s.sizes["arr"] >= arr.nbytes
    assert len(s.data) < 1000
    np.testing.assert_array_equal(out["arr"], arr)


def test_falls_back_to_dill_for_what_only_dill_can_do():
    lock = threading.Lock()
    lock.acquire()
    s, out = roundtrip({"lock": lock})
    assert s.how == {"lock": "dill"}
    assert out["lock"].locked()  # dill makes a new lock, in the state the old one was


def test_unshippable_raises_naming_the_variable():
    with pytest.raises(ShipError, match="'conn'.*sqlite3.Connection"):
        ship.dumps({"ok": 1, "conn": sqlite3.connect(":memory:")})


def test_skip_failures_names_what_was_left_out():
    s = ship.dumps({"ok": 1, "conn": sqlite3.connect(":memory:")}, skip_failures=True)
    assert s.names == ["ok"] and "sqlite3.Connection" in s.skipped["conn"]


def test_notebook_style_main_function_loads_in_a_fresh_interpreter(tmp_path):
    """The spawn trap: a __main__ function must arrive by value, so a fresh child can load it."""
    code = (
        "import sys, pickle\n"
        "from nbisolate import ship\n"
        "def f(x):\n    return helper(x) * 2\n"
        "def helper(x):\n    return x + 1\n"
        "s = ship.dumps({'f': f})\n"
        "sys.stdout.buffer.write(pickle.dumps((s.names, s.data, s.engine)))\n"
    )
    blob = subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout
    names, data, engine = pickle.loads(blob)
    loader = (
        "import sys, pickle\nfrom nbisolate import ship\n"
        "names, data, engine = pickle.loads(sys.stdin.buffer.read())\n"
        "print(ship.loads(names, data, [], engine)['f'](4))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", loader], input=pickle.dumps((names, data, engine)),
        capture_output=True, check=True,
    )
    assert out.stdout.strip() == b"10"


def test_bytesio_roundtrip_uses_fast_path():
    s, out = roundtrip({"b": io.BytesIO(b"abc")})
    assert out["b"].getvalue() == b"abc"


def test_large_buffers_cross_a_real_channel_through_shared_memory():
    """Above the threshold buffers travel in a memfd: zero-copy views, nothing in /dev/shm."""
    import socket

    from nbisolate.wire import SHM_THRESHOLD, Arena, Channel

    arr = np.arange(SHM_THRESHOLD // 8 * 3, dtype=np.float64)
    s = ship.dumps({"arr": arr, "small": [1, 2]})
    a, b = socket.socketpair()
    before = shm_names()
    arena = Arena()
    try:
        sender, receiver = Channel(a), Channel(b)
        import threading

        t = threading.Thread(target=sender.send, args=("run", {"names": s.names}, s.buffers, arena))
        t.start()
        kind, body, buffers = receiver.recv()
        t.join()
        out = ship.loads(body["names"], s.data, buffers, s.engine)
        np.testing.assert_array_equal(out["arr"], arr)
        assert isinstance(buffers[0], memoryview) and out["small"] == [1, 2]
        out["arr"][0] = -1.0  # the mapping is writable, like a normal array
    finally:
        arena.close()
        a.close()
        b.close()
    assert not new_shm(before)


def test_dill_fallback_reimports_local_modules_and_keeps_arrays_out_of_band(tmp_path, monkeypatch):
    (tmp_path / "local_helper_mod.py").write_text("VALUE = 7\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import local_helper_mod

    arr = np.arange(50_000, dtype=np.float64)
    holder = {"lock": threading.Lock(), "mod": local_helper_mod, "arr": arr}  # only dill: a lock
    s, out = roundtrip({"holder": holder, "n": 1})
    assert s.how == {"holder": "dill", "n": "pickle"}
    assert out["holder"]["mod"] is local_helper_mod  # re-imported, not rebuilt by value
    assert len(s.buffers) == 1 and len(s.data) < arr.nbytes  # dill's buffer, out of band still
    np.testing.assert_array_equal(out["holder"]["arr"], arr)


class _Fragile:
    """Rebuilding raises inside ``with _Fragile.failing():``: a result the kernel cannot take."""

    fail = False

    def __setstate__(self, state):
        if type(self).fail:
            raise ValueError("cannot rebuild here")
        self.__dict__.update(state)

    @classmethod
    @contextlib.contextmanager
    def failing(cls):
        cls.fail = True
        try:
            yield
        finally:
            cls.fail = False


def test_a_value_that_cannot_be_rebuilt_is_named_and_the_rest_loads():
    import numpy as np

    first, after = np.arange(300_000), np.ones(200_000)
    fragile = _Fragile()
    fragile.data = np.zeros(100_000)  # its own buffer, never consumed by the failed load
    s = ship.dumps({"first": first, "fragile": fragile, "after": after, "shared": first})
    failed: dict[str, BaseException] = {}
    with _Fragile.failing():
        out = ship.loads(s.names, s.data, s.buffers, s.engine, starts=s.starts, failed=failed)
    assert list(failed) == ["fragile"] and "cannot rebuild here" in str(failed["fragile"])
    np.testing.assert_array_equal(out["after"], after)
    assert out["shared"] is out["first"]  # the memo survives the failure
    with pytest.raises(ValueError), _Fragile.failing():
        ship.loads(s.names, s.data, s.buffers, s.engine)


def test_after_a_value_that_failed_the_next_keeps_its_own_sharing():
    """A value loaded after one that could not be rebuilt, holding one dict twice, is rebuilt with
    it twice (its memo places were taken by others' once, and it was dropped as sharing objects
    with the failed one)."""
    fragile = _Fragile()
    fragile.data = [1, 2]
    twice = {"n": 2}
    values = {"first": [["inner"], {"k": "v"}], "fragile": fragile, "after": [["new"], twice, twice], "last": [7]}
    s = ship.dumps(values)
    failed: dict[str, BaseException] = {}
    with _Fragile.failing():
        out = ship.loads(s.names, s.data, s.buffers, s.engine, starts=s.starts, failed=failed)
    assert list(failed) == ["fragile"], failed
    assert out["after"] == [["new"], twice, twice] and out["after"][1] is out["after"][2]
    assert out["first"] == values["first"] and out["last"] == [7]


def test_objects_both_sides_have_travel_as_references_to_this_sides_own():
    """``shared`` objects (a worker's inputs, which the kernel has): a value that is one, or holds
    one, is written as a reference and loads as the loading side's own object, before and after a
    value that cannot be rebuilt; everything else travels as before."""
    import numpy as np

    data, arr = [1, 2, 3], np.arange(100_000)
    fragile = _Fragile()
    fragile.data = np.zeros(10)
    values = {"y": data, "pair": (data, arr), "fragile": fragile, "z": arr, "own": [data, [4]]}
    s = ship.dumps(values, skip_failures=True, returning=True, shared=[data, arr])
    assert s.sizes["z"] < 100 and not s.buffers[1:], s.sizes  # the array went as a reference, not 800 kB
    here_data, here_arr = ["the kernel's"], np.zeros(3)
    failed: dict[str, BaseException] = {}
    with _Fragile.failing():
        out = ship.loads(
            s.names, s.data, s.buffers, s.engine, starts=s.starts, failed=failed, shared=[here_data, here_arr]
        )
    assert list(failed) == ["fragile"]
    assert out["y"] is here_data and out["pair"][0] is here_data and out["pair"][1] is here_arr
    assert out["z"] is here_arr and out["own"][0] is here_data and out["own"][1] == [4]


def test_a_value_sharing_objects_with_one_that_failed_says_so():
    inner = {"k": [1, 2, 3]}
    part = _Fragile()
    part.n = 1
    fragile = [part, inner]  # inner is written after the part whose rebuilding raises
    s = ship.dumps({"fragile": fragile, "later": inner, "plain": 5})
    failed: dict[str, BaseException] = {}
    with _Fragile.failing():
        out = ship.loads(s.names, s.data, s.buffers, s.engine, starts=s.starts, failed=failed)
    assert out == {"plain": 5}
    assert list(failed) == ["fragile", "later"]
    assert "shares objects with 'fragile'" in str(failed["later"])


# A child of this process, started fresh (forking pytest, which runs threads of earlier tests,
# could deadlock the child): it runs MAKE (Python source defining ``make()``), prints where its
# buffers are, and keeps them until it reads a byte.
_HOLDING = """
import json, sys
import numpy as np
from nbisolate import ship
{make}
buffers = make()
sys.stdout.write(json.dumps(ship.pull_spans(buffers)) + "\\n")
sys.stdout.flush()
sys.stdin.read(1)
"""


def _child_holding(make: str):
    """Start a child that builds buffers with ``make`` (source defining ``make()``), reports their
    spans and waits; returns (pid, spans, release), release() lets it exit and reaps it."""
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDING.format(make=make)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    line = proc.stdout.readline()

    def release():
        proc.stdin.close()  # its read returns: it exits
        proc.wait(timeout=30)
        proc.stdout.close()

    if not line:
        release()
        raise AssertionError(f"the child holding buffers failed (exit code {proc.returncode})")
    return proc.pid, json.loads(line), release


def test_pull_copies_buffers_out_of_another_process_into_private_memory():
    make = """
def make():
    global kept
    big = np.arange(1_000_000, dtype=np.float64)
    big.flags.writeable = False  # read-only there: still readable, and a copy here
    small = [np.full(10, i, dtype=np.int16) for i in range(1500)]  # over one read's 1,024
    kept = [big, small]
    return [memoryview(big).cast("B"), memoryview(b"bytes too"), memoryview(b""),
            *(memoryview(a).cast("B") for a in small)]
"""
    pid, spans, release = _child_holding(make)
    try:
        out = ship.pull(pid, spans)
    finally:
        release()
    assert len(out) == 3 + 1500
    big = np.frombuffer(out[0], dtype=np.float64)
    assert big[-1] == 999_999 and big.flags.writeable
    assert bytes(out[1]) == b"bytes too" and out[2].nbytes == 0
    assert [int(np.frombuffer(v, dtype=np.int16)[3]) for v in out[3:]] == list(range(1500))


def test_pull_says_why_it_cannot_read():
    import errno

    pid, spans, release = _child_holding("def make():\n    return [memoryview(bytearray(2 << 20))]")
    release()
    with pytest.raises(OSError) as gone:
        ship.pull(pid, spans)
    assert gone.value.errno == errno.ESRCH and str(pid) in str(gone.value)
    import os

    with pytest.raises(OSError) as bad:
        ship.pull(os.getpid(), [(8, 4096)])  # not memory of that process
    assert bad.value.errno == errno.EFAULT


def test_split_cuts_a_large_copy_into_two_halves_at_huge_page_boundaries():
    mb = 1 << 20
    todo = [(1000 * mb, 5000 * mb, 3 * mb), (2000 * mb, 6000 * mb, 200 * mb), (3000 * mb, 7000 * mb, 1)]
    first, second = ship._split(todo)
    segments = first + second
    assert sum(n for _, _, n in segments) == sum(n for _, _, n in todo)
    assert abs(sum(n for _, _, n in first) - sum(n for _, _, n in second)) <= 4 * mb
    cut = [(d, s, n) for d, s, n in segments if d >= 2000 * mb and d < 3000 * mb]
    assert len(cut) == 2 and cut[0][2] % (2 * mb) == 0  # the big one, cut on a 2 MiB boundary
    assert cut[1][0] - cut[0][0] == cut[0][2] == cut[1][1] - cut[0][1]  # both sides advance alike
    assert ship._split([(0, 0, 4096)]) == [[(0, 0, 4096)]]  # too small to cut: one part


_ROOM = """
import json, sys
import numpy as np
from nbisolate import ship
views, spans = ship.room(json.loads(sys.argv[1]))
sys.stdout.write(json.dumps(spans) + "\\n")
sys.stdout.flush()
sys.stdin.read(1)
ok = (
    np.frombuffer(views[0], dtype=np.float64)[-1] == 8_999_999
    and bytes(views[1]) == b"small bytes"
    and list(np.frombuffer(views[2], dtype=np.int8)) == [3] * 7
)
sys.exit(0 if ok else 3)
"""


def test_place_writes_buffers_into_room_another_process_made():
    """The input side: a child makes room, this process copies into it (over the size two
    threads share, and small buffers beside), and the child reads exactly what was sent."""
    sent = [np.arange(9_000_000, dtype=np.float64), b"small bytes", np.full(7, 3, dtype=np.int8)]
    proc = subprocess.Popen(
        [sys.executable, "-c", _ROOM, json.dumps([memoryview(b).nbytes for b in sent])],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    assert proc.stdout is not None and proc.stdin is not None
    try:
        spans = json.loads(proc.stdout.readline())
        ship.place(proc.pid, spans, sent)
        with pytest.raises(OSError):  # a buffer larger than the room made for it
            ship.place(proc.pid, [(spans[1][0], 3)], [b"too long"])
    finally:
        proc.stdin.close()  # its read returns: it checks what it was sent
        proc.wait(timeout=30)
        proc.stdout.close()
    assert proc.returncode == 0


def test_room_takes_memory_made_ready_ahead_when_the_buffers_fit():
    ready = ship.Ready(5 << 20)
    while ready.fault_some():
        pass
    assert ready.faulted == ready.size == 6 << 20  # rounded up to whole huge pages
    views, spans = ship.room([3 << 20, 100, (1 << 20) + 1], ready)
    assert [v.nbytes for v in views] == [3 << 20, 100, (1 << 20) + 1]
    assert spans[2][0] - spans[0][0] == 3 << 20  # both large ones in the ready mapping, page-aligned
    assert ready.map is None  # the views hold it now
    views[2][:4] = b"abcd"
    assert bytes(views[2][:4]) == b"abcd"

    small = ship.Ready(2 << 20)
    views, spans = ship.room([3 << 20], small)  # does not fit: fresh memory, and the ready one freed
    assert views[0].nbytes == 3 << 20 and small.map is None
