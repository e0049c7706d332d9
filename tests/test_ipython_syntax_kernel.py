"""IPython lines in an isolated cell: they run in the worker, or are refused by name first.

And a syntax error looks like Python's in an ordinary cell: ``Cell In[n], line k``
with the caret, ``n`` the number the front end shows and ``k`` counted as the
user counts (the ``%%isolate`` line is line 1).
"""

from __future__ import annotations

import re
import textwrap

import pytest

ANSI = re.compile(r"\x1b\[[0-9;]*m")


def cell(code: str) -> str:
    return textwrap.dedent(code).strip("\n")


def plain(text: str) -> str:
    return ANSI.sub("", text)


def test_shell_escapes_run_in_the_worker_with_variables_expanded(kernel):
    kernel.run("word = 'hello'")
    res = kernel.run(
        cell(
            """
            %%isolate
            import os
            !echo "$word from {os.getpid()}"
            files = !printf 'a\\nb\\n'
            pid = os.getpid()
            """
        )
    )
    pid = kernel.value("pid")
    assert f"hello from {pid}" in res.stdout
    assert kernel.value("list(files)") == ["a", "b"]
    assert pid != kernel.value("__import__('os').getpid()")


def test_time_timeit_env_cd_and_matplotlib_inline(kernel, tmp_path):
    home = kernel.value("__import__('os').getcwd()")
    res = kernel.run(
        cell(
            f"""
            %%isolate
            %matplotlib inline
            %env NBISOLATE_DEMO=42
            %cd {tmp_path}
            total = %time sum(range(1000))
            %timeit -n 1 -r 1 sum(range(10))
            import os
            seen = (os.environ["NBISOLATE_DEMO"], os.getcwd())
            """
        )
    )
    assert "Wall time:" in res.stdout and "per loop" in res.stdout
    assert kernel.value("total") == 499500
    assert kernel.value("seen") == ("42", str(tmp_path))
    # As after an ordinary cell, %env and %cd changed the kernel's environment and directory.
    assert kernel.value("(__import__('os').environ.get('NBISOLATE_DEMO'), __import__('os').getcwd())") == (
        "42",
        str(tmp_path),
    )
    kernel.run(f"import os\nos.chdir({home!r})\ndel os.environ['NBISOLATE_DEMO']")


def test_what_time_and_timeit_run_reads_inputs_and_binds_results(kernel):
    """``%time x = f(n)`` binds ``x`` and reads ``f`` and ``n`` in an ordinary cell; so here."""
    kernel.run("n_items = 1000\ndef work(n):\n    return sum(range(n))")
    res = kernel.run(
        cell(
            """
            %%isolate
            %time timed = work(n_items)
            %timeit -n 1 -r 1 timed_again = work(n_items)
            for k in range(2):
                %time looped = work(k + 3)
            """
        )
    )
    assert "Wall time:" in res.stdout and "per loop" in res.stdout
    assert kernel.value("(timed, looped)") == (499500, 6)
    res = kernel.run("%%isolate\n%%time\ncell_timed = work(n_items) + 1")
    assert "Wall time:" in res.stdout
    assert kernel.value("cell_timed") == 499501


def test_timeit_o_gives_what_it_gives_in_an_ordinary_cell(kernel):
    """``r = %timeit -o stmt`` binds IPython's ``TimeitResult`` (``r.average``, ``r.best``), and
    the line it prints reads as IPython's, digits aside."""
    ordinary = kernel.run("plain = %timeit -o -n 3 -r 2 -p 4 sum(range(2000))")
    res = kernel.run("%%isolate\nr = %timeit -o -n 3 -r 2 -p 4 sum(range(2000))\nparts = (r.loops, r.repeat, len(r.all_runs))")
    assert kernel.value("(type(r) is type(plain), parts, r.best <= r.average <= r.worst)") == (True, (3, 2, 2), True)

    def shape(text: str) -> str:  # the result's line (a slow first run may add one before it), times left out
        return re.sub(r"[\d.]+ (?:s|ms|μs|µs|us|ns)\b", "TIME", text.splitlines()[-1])

    assert shape(res.stdout) == shape(ordinary.stdout) and "per loop" in res.stdout
    quiet = kernel.run("%%isolate\nq = %timeit -q -o -n 1 -r 1 sum(range(10))")
    assert quiet.stdout == "" and kernel.value("q.loops") == 1


@pytest.mark.parametrize("options", ["-n1 -r1", "-n 2 -r 3 -p 2", "-q -o -n1 -r2", "-t -n1 -r1", "-c -r1 -n1"])
def test_timeit_reads_its_options_as_in_an_ordinary_cell(kernel, options):
    """getopt's forms, as IPython reads them (``-n1``, grouped ``-qo``), loop as often and print
    the same line (times aside); ``-n1 -r1`` ran seven rounds of millions of loops instead."""
    ordinary = kernel.run(f"%timeit {options} sum(range(50))")
    res = kernel.run(f"%%isolate\n%timeit {options} sum(range(50))")

    def shape(text: str) -> str:
        last = text.strip().splitlines()[-1] if text else ""
        return re.sub(r"[\d.]+(?:e[+-]\d+)? (?:s|ms|μs|µs|us|ns)\b", "TIME", last)

    assert shape(res.stdout) == shape(ordinary.stdout), (res.stdout, ordinary.stdout)
    assert res.result == ordinary.result or (ordinary.result and res.result), (res.result, ordinary.result)


def test_timeit_refuses_an_option_it_does_not_take_as_ipython_does(kernel):
    """IPython shows a UsageError as one line on stderr, without a traceback; so here."""
    ordinary = kernel.execute("%timeit -z pass", allow_error=True)
    res = kernel.execute("%%isolate\n%timeit -z pass", allow_error=True)
    assert not ordinary.ok and not res.ok
    assert ordinary.stderr.startswith("UsageError: option -z not recognized (")
    # (then the options it takes, which IPython 8 writes otherwise, without -v)
    assert res.stderr.split(" (")[0] == ordinary.stderr.split(" (")[0], res.stderr
    assert res.error == ordinary.error, res.error


def test_time_writes_microseconds_as_the_kernels_ipython_does(kernel):
    """IPython 9 writes ``μs`` (Greek mu), IPython 8 ``µs`` (the micro sign): ``%time`` in an
    isolated cell prints the kernel's, though the worker never imports IPython for it."""
    kernel.run("from IPython.core.magics.execution import _format_time")
    res = kernel.run(
        "%%isolate\n%time pass\nunit = __import__('nbisolate.worker_shell', fromlist=['_fmt_time'])._fmt_time(2e-6)"
    )
    assert "Wall time:" in res.stdout
    assert kernel.value("unit") == kernel.value("_format_time(2e-6)")


def test_cell_magics_inside_the_body(kernel, tmp_path):
    target = tmp_path / "note.txt"
    res = kernel.run(f"%%isolate\n%%writefile {target}\nwritten in the worker\n")
    assert target.read_text() == "written in the worker\n"
    assert "Writing" in res.stdout


def test_a_magic_that_needs_the_kernel_is_refused_before_anything_runs(kernel, tmp_path):
    marker = tmp_path / "ran"
    for magic, words in (
        ("%load_ext autoreload", ["%load_ext", "ordinary cell"]),
        ("%who", ["%who", "ordinary cell"]),
        ("%store x", ["%store", "ordinary cell"]),
    ):
        res = kernel.execute(f"%%isolate\nopen({str(marker)!r}, 'w').close()\n{magic}\nafter = 1")
        assert not res.ok
        text = plain(res.stderr + res.error_text)
        for word in words:
            assert word in text, (magic, text)
        assert "Nothing ran" in text
        assert not marker.exists()


def test_a_syntax_error_looks_like_pythons(kernel):
    res = kernel.execute("%%isolate\nx = 1\ny = (1,\nz = 3")
    assert not res.ok
    number = res.reply["content"]["execution_count"]
    err = res.error
    assert err["ename"] == "SyntaxError"
    text = plain("\n".join(err["traceback"]))
    assert f"Cell In[{number}], line 3" in text, text
    assert "^" in text
    assert "isolate" not in text.split("SyntaxError")[0].lower() or "%%isolate" not in text


def test_worker_tracebacks_name_the_cell_as_the_front_end_does(kernel):
    res = kernel.execute("%%isolate\nx = 1\n\n1 / 0")
    number = res.reply["content"]["execution_count"]
    text = plain("\n".join(res.error["traceback"]))
    assert f"Cell In[{number}], line 4" in text, text


def test_run_a_script_isolated_as_ipython_runs_it(kernel, tmp_path):
    """``%run script.py ARGS`` runs it as ``__main__`` with its arguments, and what it binds
    comes to the notebook; ``-i`` runs it among the cell's variables (the plan reads the
    script for them); its exception or ``sys.exit(2)`` is shown and the cell goes on."""
    (tmp_path / "helper_mod.py").write_text("FACTOR = 2\n")
    (tmp_path / "job.py").write_text(
        "import sys\nfrom helper_mod import FACTOR\nargs = sys.argv[1:]\nname = __name__\n"
        "def twice(v):\n    return FACTOR * v\nresult = twice(21)\n"
    )
    kernel.run(f"%%isolate\n%run {tmp_path / 'job.py'} --fast 3")
    assert kernel.value("(args, name, result, twice(4))") == (["--fast", "3"], "__main__", 42, 8)
    (tmp_path / "uses.py").write_text("total = base * 10\n")
    kernel.run("base = 4")
    kernel.run(f"%%isolate\n%run -i {tmp_path / 'uses.py'}")
    assert kernel.value("total") == 40
    (tmp_path / "uses.py").write_text("total = base * 100\n")  # edited: read again
    kernel.run(f"%%isolate\n%run -i {tmp_path / 'uses.py'}")
    assert kernel.value("total") == 400
    (tmp_path / "quits.py").write_text("import sys\nbefore_exit = 1\nsys.exit(2)\n")
    (tmp_path / "fails.py").write_text("before_error = 1\nraise KeyError('missing')\n")
    res = kernel.run(f"%%isolate\n%run {tmp_path / 'quits.py'}\n%run {tmp_path / 'fails.py'}\nafter = 2")
    assert "SystemExit: 2" in res.stderr and "KeyError: 'missing'" in res.stderr, res.stderr
    assert kernel.value("(before_exit, before_error, after)") == (1, 1, 2)
    res = kernel.execute("%%isolate\n%run -t job.py")
    assert not res.ok and "-t" in res.error_text
