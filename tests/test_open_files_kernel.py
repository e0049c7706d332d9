"""An open file means in an isolated cell what it means in an ordinary one.

The notebook's log, a dataset's reader, a file the cell opens: each is the same file
in the worker, at the same place, and the notebook's file object moves on to where
the cell left it. Before, the worker opened a write handle again with ``open(name,
"w")``, which erased everything the notebook had written to it, and started every
reader at the top. Through a real kernel, each cell run both ways where it matters.
"""

from __future__ import annotations

import textwrap

import pytest


def cell(code: str) -> str:
    return textwrap.dedent(code).strip("\n")


def both_ways(kernel, setup: str, code: str, probe: str, tmp_path, allow_error: bool = False):
    """``probe`` after ``setup`` then ``code``: in an ordinary cell, then isolated (fresh files)."""
    seen = []
    for way, magic in (("ordinary", ""), ("isolated", "%%isolate\n")):
        folder = tmp_path / way
        folder.mkdir()
        kernel.run(f"D = {str(folder)!r}\n" + cell(setup))
        res = kernel.execute(magic + cell(code), allow_error=allow_error)
        assert allow_error or res.ok, res.error_text + res.stderr
        seen.append(kernel.value(probe))
    return seen


def test_a_log_the_notebook_writes_to_keeps_what_it_wrote(kernel, tmp_path):
    """Written, flushed or not, before and after the cell: every line, in order, once."""
    ordinary, isolated = both_ways(
        kernel,
        """
        log = open(f"{D}/run.log", "w")
        log.write("one\\n")
        """,
        'log.write(f"two {log.mode}\\n")',
        '(log.write("three\\n"), log.flush(), open(f"{D}/run.log").read(), log.tell())',
        tmp_path,
    )
    assert ordinary == isolated == (6, None, "one\ntwo w\nthree\n", 16)
    kernel.run("log.close()")


def test_a_reader_inside_a_dataset_reads_on_from_where_the_cell_stopped(kernel, tmp_path):
    """The DataLoader story: a dataset keeps an open binary file, deep inside a holder; the cell
    reads a record, the notebook reads the next one, and the dataset is still the notebook's."""
    ordinary, isolated = both_ways(
        kernel,
        """
        with open(f"{D}/records.bin", "wb") as out:
            out.write(b"rec1\\nrec2\\nrec3\\n")
        class Dataset:
            def __init__(self, path):
                self._fh = open(path, "rb")
        ds = Dataset(f"{D}/records.bin")
        loaders = {"train": ds}
        """,
        "first = loaders['train']._fh.readline()",
        "(first, ds._fh.readline(), loaders['train'] is ds, ds._fh.tell())",
        tmp_path,
    )
    assert ordinary == isolated == (b"rec1\n", b"rec2\n", True, 10)
    kernel.run("ds._fh.close()")


def test_a_file_the_cell_opens_comes_back_open_with_its_contents(kernel, tmp_path):
    """Opened for writing in the cell and handed back: the kernel does not truncate it again,
    and goes on writing where the cell stopped."""
    ordinary, isolated = both_ways(
        kernel,
        "",
        'out = open(f"{D}/made.txt", "w")\nout.write("data")',
        '(out.write("+more"), out.close(), open(f"{D}/made.txt").read())',
        tmp_path,
    )
    assert ordinary == isolated == (5, None, "data+more")


def test_a_file_the_cell_closes_is_closed_and_the_same_object_comes_back(kernel, tmp_path):
    ordinary, isolated = both_ways(
        kernel,
        """
        done = open(f"{D}/done.txt", "w")
        same = open(f"{D}/same.txt", "w")
        """,
        'done.write("bye"); done.close()\nalias = same; alias.write("z")',
        '(done.closed, open(f"{D}/done.txt").read(), alias is same, same.tell())',
        tmp_path,
    )
    assert ordinary == isolated == (True, "bye", True, 1)
    kernel.run("same.close()")


def test_what_a_failing_cell_wrote_stays_written(kernel, tmp_path):
    ordinary, isolated = both_ways(
        kernel,
        'partial = open(f"{D}/partial.txt", "w")',
        'partial.write("before"); 1 / 0',
        '(partial.tell(), open(f"{D}/partial.txt").read())',
        tmp_path,
        allow_error=True,
    )
    assert ordinary == isolated == (6, "before")
    kernel.run("partial.close()")


def test_files_without_a_name_or_deleted_since_are_the_same_file(kernel, tmp_path):
    """A ``TemporaryFile`` has no path and a deleted log none any more: the worker opens the very
    file the kernel has open (Linux: through the kernel's ``/proc/<pid>/fd``)."""
    ordinary, isolated = both_ways(
        kernel,
        """
        import os, tempfile
        scratch = tempfile.TemporaryFile("w+")
        scratch.write("abc")
        gone = open(f"{D}/gone.txt", "w+")
        os.remove(f"{D}/gone.txt")
        """,
        'scratch.write("def")\ngone.write("still here")',
        "(scratch.seek(0), scratch.read(), gone.seek(0), gone.read())",
        tmp_path,
    )
    assert ordinary == isolated == (0, "abcdef", 0, "still here")
    kernel.run("scratch.close(); gone.close()")


def test_a_file_replaced_at_its_path_is_refused_before_anything_runs(kernel, tmp_path):
    """A log rotated away since it was opened: the worker would open another file by that name.
    Through ``/proc`` the kernel's own file is reached, so this checks the worker's identity test
    where ``/proc`` gives no path: loading an open file whose path now names another file."""
    kernel.run(
        cell(
            f"""
            import os
            from nbisolate import openfiles
            rotated = open({str(tmp_path / "app.log")!r}, "w")
            rotated.write("old")
            token, path, *rest = openfiles.reduce(rotated, None)[1]
            os.rename({str(tmp_path / "app.log")!r}, {str(tmp_path / "app.log.1")!r})
            open({str(tmp_path / "app.log")!r}, "w").close()
            try:
                openfiles.reopen(None, {str(tmp_path / "app.log")!r}, *rest)
            except FileNotFoundError as exc:
                said = str(exc)
            """
        )
    )
    said = kernel.value("said")
    assert "app.log" in said and "replaced" in said and "open it inside the cell" in said
    # And shipped as it is now (its path moved): the same file, found where it went.
    res = kernel.execute('%%isolate\nrotated.write("+new")')
    assert res.ok, res.error_text + res.stderr
    assert kernel.value(f"(rotated.flush(), open({str(tmp_path / 'app.log.1')!r}).read())") == (None, "old+new")
    kernel.run("rotated.close()")


@pytest.mark.parametrize("mode", ["r+", "a", "rb+"])
def test_other_modes_keep_their_meaning(kernel, tmp_path, mode):
    binary = "b" in mode
    ordinary, isolated = both_ways(
        kernel,
        f"""
        with open(f"{{D}}/m.txt", "w") as seed:
            seed.write("0123456789")
        fm = open(f"{{D}}/m.txt", {mode!r})
        if {mode!r} != "a":
            fm.seek(2)
        """,
        "fm.write(b'XY')" if binary else "fm.write('XY')",
        "(fm.tell(), fm.flush(), open(f'{D}/m.txt').read())",
        tmp_path,
    )
    assert ordinary == isolated
    assert ordinary[2] == ("0123456789XY" if mode == "a" else "01XY456789")
    kernel.run("fm.close()")
