"""Open files, one step at a time: shipped, opened again, settled, caught up (nbisolate.openfiles).

The kernel tests (``test_open_files_kernel.py``) show the meaning through a real
kernel and worker; these pin each step and its refusals in one process.
"""

from __future__ import annotations

import os
import tempfile

import pytest

from nbisolate import byvalue, openfiles, ship
from nbisolate.diagnose import pickle_check
from nbisolate.errors import ShipError


def _descriptors() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_a_write_handle_is_opened_again_in_place_and_the_original_catches_up(tmp_path):
    path = tmp_path / "log.txt"
    log = open(path, "w")
    log.write("one\n")  # not flushed: shipping flushes it first
    shipped = ship.dumps({"log": log})
    assert shipped.how == {"log": "same file, opened again"}
    assert path.read_text() == "one\n"
    copy = ship.loads(shipped.names, shipped.data, shipped.buffers, shipped.engine)["log"]
    assert copy is not log and copy.name == str(path) and copy.tell() == 4 and copy.mode == "w"
    assert path.read_text() == "one\n"  # never truncated
    copy.write("two\n")
    report = openfiles.settle()  # flushes, and tells where it stands
    token = byvalue._TOKENS[log]
    assert report[token] == (4, 8) and path.read_text() == "one\ntwo\n"
    openfiles.catch_up({token: report[token]}, byvalue.sent)
    assert log.tell() == 8
    log.write("three\n")
    log.close()
    copy.close()
    assert path.read_text() == "one\ntwo\nthree\n"


def test_the_original_that_moved_meanwhile_keeps_its_place(tmp_path):
    """A background job's file the notebook went on writing to: the notebook's place wins."""
    path = tmp_path / "both.txt"
    f = open(path, "w")
    token = byvalue._token(f)
    f.write("notebook")
    openfiles.catch_up({token: (0, 3)}, byvalue.sent)
    assert f.tell() == 8
    openfiles.catch_up({token: (8, None)}, byvalue.sent)  # closed by the cell
    assert f.closed


def test_a_file_with_no_path_is_refused_where_no_proc_reaches_it(monkeypatch):
    monkeypatch.setattr(openfiles, "_PROC_FD", "/nonexistent-proc-fd")
    with tempfile.TemporaryFile("w+") as scratch, pytest.raises(ShipError) as caught:
        ship.dumps({"scratch": scratch})
    said = str(caught.value)
    assert "'scratch'" in said and "has no path" in said and "Nothing ran" in said


def test_a_text_file_read_by_an_unfinished_for_loop_says_what_to_do(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_text("1\n2\n3\n")
    with open(path) as lines, pytest.raises(ShipError) as caught:
        for _ in lines:
            break
        ship.dumps({"lines": lines})
    assert "readline()" in str(caught.value) and "'lines'" in str(caught.value)


def test_a_replaced_file_is_not_opened_and_a_check_opens_nothing(tmp_path):
    path = tmp_path / "app.log"
    old = open(path, "w")
    _, args = openfiles.reduce(old, None)
    os.rename(path, tmp_path / "app.log.1")
    path.write_text("a new file")
    before = _descriptors()
    with pytest.raises(FileNotFoundError, match="replaced"):
        openfiles.reopen(*args)
    with pytest.raises(FileNotFoundError, match="replaced"):
        openfiles.check_reopen(*args)
    _, args = openfiles.reduce(old, None)  # as it ships now: through the kernel's descriptor
    assert openfiles.check_reopen(*args) is not None
    assert _descriptors() == before
    old.close()


def test_pickle_check_of_a_write_handle_changes_nothing(tmp_path):
    path = tmp_path / "keep.txt"
    with open(path, "w") as keep:
        keep.write("kept")
        keep.flush()
        report = pickle_check(keep, "keep")
        assert report.isolate_ok
        assert path.read_text() == "kept" and keep.tell() == 4


def test_a_closed_file_arrives_closed_and_its_file_untouched(tmp_path):
    """dill opened a closed write handle again by name to close it: ``open(name, "w")``, which
    emptied the file (and made one where none was any more)."""
    path = tmp_path / "done.txt"
    done = open(path, "w")
    done.write("kept")
    done.close()
    reader = open(path, "rb")
    reader.close()
    gone = tmp_path / "gone.txt"
    deleted = open(gone, "w")
    deleted.close()
    gone.unlink()
    shipped = ship.dumps({"done": done, "reader": reader, "deleted": deleted})
    assert set(shipped.how.values()) == {"same file, opened again"}
    out = ship.loads(shipped.names, shipped.data, shipped.buffers, shipped.engine)
    assert all(f.closed for f in out.values())
    assert (out["done"].name, out["done"].mode, type(out["reader"])) == (str(path), "w", type(reader))
    assert path.read_text() == "kept" and not gone.exists()
