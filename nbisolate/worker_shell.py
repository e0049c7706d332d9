"""The small shell an isolated cell sees as ``get_ipython()``: the IPython lines that make sense in a worker.

A notebook cell is IPython, not Python: ``!ls``, ``files = !ls``, ``%time f()``,
``%timeit``, ``%env``, ``%cd``, ``%pip install``, ``%matplotlib inline``.  The
kernel turns such a cell into Python with IPython's own input transformers
(:mod:`nbisolate.cellsyntax`): ``!ls`` becomes ``get_ipython().system('ls')``.
The worker then needs a ``get_ipython()`` that answers those calls -- and only
those: a magic that needs the kernel (``%load_ext``, ``%who``, ``%store``...)
was refused in the kernel before anything ran.

This module is that shell, written on the standard library so a worker starts
without IPython; IPython is imported only for what only it has (the ``SList``
that ``x = !ls`` returns), and only when the cell uses it.  Output goes to the
worker's file descriptors 1 and 2, which stream into the cell like any output.
"""

from __future__ import annotations

import builtins
import gc
import math
import os
import shlex
import string
import subprocess
import sys
import time
import timeit
import types
from collections.abc import MutableMapping
from typing import Any

from .magicline import TIMEIT, split_options

LINE_MAGICS = frozenset({"time", "timeit", "env", "cd", "pwd", "matplotlib", "pip", "conda", "sx", "system", "run"})
"""Line magics an isolated cell may use (``!cmd`` is ``system``, ``x = !cmd`` is ``getoutput``)."""

CELL_MAGICS = frozenset({"time", "timeit", "bash", "sh", "writefile"})
"""Cell magics an isolated cell may use inside its body."""


class _Formatter(string.Formatter):
    """IPython's expansion of ``!`` lines: ``{expr}`` is evaluated, ``$name`` looked up, ``$$`` is ``$``."""

    def __init__(self, ns: MutableMapping[str, Any]) -> None:
        self.ns = ns

    def get_field(self, field_name: str, args: Any, kwargs: Any) -> tuple[Any, str]:
        return eval(field_name, dict(self.ns)), field_name

    def expand(self, text: str) -> str:
        out: list[str] = []
        i = 0
        while i < len(text):
            ch = text[i]
            if ch == "$" and text[i + 1 : i + 2] == "$":
                out.append("$")
                i += 2
                continue
            if ch == "$":
                j = i + 1
                while j < len(text) and (text[j].isalnum() or text[j] == "_"):
                    j += 1
                name = text[i + 1 : j]
                if name and name in self.ns:
                    out.append(str(self.ns[name]))
                    i = j
                    continue
            out.append(ch)
            i += 1
        expanded = "".join(out)
        try:
            return self.vformat(expanded, (), {})
        except Exception:  # not a format string after all (a brace in a shell command): as is
            return expanded


_micro = "µs"
"""Microseconds as the kernel's IPython writes them (the job's ``micro``, see :func:`install`)."""


def _fmt_time(seconds: float, precision: int = 3) -> str:
    """IPython's way: ``precision`` significant digits with the fitting unit."""
    if seconds >= 60:
        minutes, rest = divmod(seconds, 60)
        return f"{int(minutes)}min {rest:.0f}s"
    for unit, scale in (("s", 1.0), ("ms", 1e3), (_micro, 1e6), ("ns", 1e9)):
        if seconds * scale >= 1 or unit == "ns":
            return f"{seconds * scale:.{precision}g} {unit}"
    return f"{seconds:.{precision}g} s"  # pragma: no cover


def _timeit_result(loops: int, repeat: int, all_runs: list[float], precision: int) -> Any:
    """What ``%timeit -o`` gives: IPython's own ``TimeitResult`` (``.average``, ``.best``,
    ``.all_runs``...), printed as IPython prints it, when IPython is here (imported now, for
    this); else :class:`_Timings`, with the same attributes."""
    best, worst = min(all_runs) / loops, max(all_runs) / loops
    try:
        from IPython.core.magics.execution import TimeitResult
    except ImportError:
        return _Timings(loops, repeat, best, worst, all_runs, 0.0, precision)
    return TimeitResult(loops, repeat, best, worst, all_runs, 0.0, precision)


class _Timings:
    """``%timeit -o``'s result where IPython is missing: IPython's ``TimeitResult``'s attributes."""

    def __init__(
        self, loops: int, repeat: int, best: float, worst: float, all_runs: list[float], compile_time: float,
        precision: int,
    ) -> None:
        self.loops, self.repeat, self.best, self.worst = loops, repeat, best, worst
        self.all_runs, self.compile_time, self._precision = all_runs, compile_time, precision
        self.timings = [t / loops for t in all_runs]

    @property
    def average(self) -> float:
        return math.fsum(self.timings) / len(self.timings)

    @property
    def stdev(self) -> float:
        mean = self.average
        return math.sqrt(math.fsum((t - mean) ** 2 for t in self.timings) / len(self.timings))

    def __str__(self) -> str:
        return (
            f"{_fmt_time(self.average, self._precision)} ± {_fmt_time(self.stdev, self._precision)} per loop "
            f"(mean ± std. dev. of {self.repeat} run{'s' if self.repeat != 1 else ''}, "
            f"{self.loops:,} loop{'s' if self.loops != 1 else ''} each)"
        )

    def __repr__(self) -> str:
        return f"<TimeitResult : {self}>"


class WorkerShell:
    """What ``get_ipython()`` is in an isolated cell (see the module docstring)."""

    def __init__(self, user_ns: MutableMapping[str, Any]) -> None:
        self.user_ns = user_ns

    # -- shell escapes ---------------------------------------------------------------------------
    def var_expand(self, cmd: str, depth: int = 0) -> str:
        return _Formatter(self.user_ns).expand(cmd)

    def system(self, cmd: str) -> None:
        """``!cmd``: run it in a shell, its output straight into the cell; sets ``_exit_code``."""
        sys.stdout.flush()
        sys.stderr.flush()
        code = subprocess.call(self.var_expand(cmd), shell=True)
        self.user_ns["_exit_code"] = code

    def getoutput(self, cmd: str, split: bool = True, depth: int = 0) -> Any:
        """``x = !cmd`` / ``!!cmd``: its output as a list of lines (IPython's ``SList``)."""
        done = subprocess.run(
            self.var_expand(cmd), shell=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            text=True,
        )
        self.user_ns["_exit_code"] = done.returncode
        if not split:
            return done.stdout
        from IPython.utils.text import SList  # only a cell that captures output needs it

        return SList(done.stdout.splitlines())

    # -- magics ----------------------------------------------------------------------------------
    def run_line_magic(self, magic_name: str, line: str, _stack_depth: int = 1) -> Any:
        name = magic_name.lstrip("%")
        handler = getattr(self, f"_line_{name}", None)
        if name not in LINE_MAGICS or handler is None:
            raise NameError(f"%{name} is not available in an isolated cell; run it in an ordinary cell")
        return handler(line)

    def run_cell_magic(self, magic_name: str, line: str, cell: str) -> Any:
        name = magic_name.lstrip("%")
        handler = getattr(self, f"_cell_{name}", None)
        if name not in CELL_MAGICS or handler is None:
            raise NameError(f"%%{name} is not available in an isolated cell; run it in an ordinary cell")
        return handler(line, cell)

    def _run(self, code: str, mode: str = "exec") -> Any:
        compiled = compile(code, "<isolated cell>", mode)
        return eval(compiled, self.user_ns) if mode == "eval" else exec(compiled, self.user_ns)

    def _timed(self, code: str) -> Any:
        try:
            compile(code, "<isolated cell>", "eval")
            mode = "eval"
        except SyntaxError:
            mode = "exec"
        wall0, cpu0 = time.perf_counter(), os.times()
        try:
            return self._run(code, mode)
        finally:
            wall, cpu = time.perf_counter() - wall0, os.times()
            user, system = cpu.user - cpu0.user, cpu.system - cpu0.system
            print(
                f"CPU times: user {_fmt_time(user)}, sys: {_fmt_time(system)}, "
                f"total: {_fmt_time(user + system)}\nWall time: {_fmt_time(wall)}"
            )

    def _line_time(self, line: str) -> Any:
        return self._timed(line)

    def _cell_time(self, line: str, cell: str) -> Any:
        return self._timed(cell)

    def _timeit(self, line: str, stmt: str | None = None) -> Any:
        """``%timeit [-n N] [-r R] [-p P] [-q] [-o] stmt`` / ``%%timeit [options] setup`` + body."""
        options, rest = split_options(line, TIMEIT)  # as IPython reads them: -n1 -r 3 -qo
        number = int(options.get("n", 0))
        repeat = int(options.get("r", max(timeit.default_repeat, 7)))
        precision = int(options.get("p", 3))
        clock = time.time if "t" in options else time.process_time if "c" in options else time.perf_counter
        setup, body = (rest.strip(), stmt) if stmt is not None else ("", rest.strip())
        timer = timeit.Timer(body or "pass", setup or "pass", timer=clock, globals=self.user_ns)
        if not number:  # IPython's rule: the first power of ten taking 0.2 s or more
            for power in range(10):
                number = 10**power
                if timer.timeit(number) >= 0.2:
                    break
        gc_was = gc.isenabled()
        try:
            all_runs = timer.repeat(repeat=repeat, number=number)
        finally:
            if gc_was:
                gc.enable()
        result = _timeit_result(number, repeat, all_runs, precision)
        if "v" in options:  # IPython 9's -v NAME
            self.user_ns[options["v"]] = result
        if "q" not in options:
            if result.worst > 4 * result.best and result.best > 0 and result.worst > 1e-6:
                print(
                    f"The slowest run took {result.worst / result.best:0.2f} times longer than the fastest. "
                    "This could mean that an intermediate result is being cached."
                )
            print(result)
        return result if "o" in options else None

    def _line_timeit(self, line: str) -> Any:
        return self._timeit(line)

    def _cell_timeit(self, line: str, cell: str) -> Any:
        return self._timeit(line, cell)

    def _line_env(self, line: str) -> Any:
        line = line.strip()
        if not line:
            return dict(os.environ)
        if "=" in line or " " in line:
            key, _, value = line.partition("=") if "=" in line else line.partition(" ")
            key, value = key.strip(), self.var_expand(value.strip())
            os.environ[key] = value
            print(f"env: {key}={value}")
            return None
        return os.environ.get(line)

    def _line_cd(self, line: str) -> None:
        target = self.var_expand(line.strip()) or os.path.expanduser("~")
        os.chdir(os.path.expanduser(target))
        print(os.getcwd())

    def _line_pwd(self, line: str) -> str:
        return os.getcwd()

    def _line_matplotlib(self, line: str) -> None:
        choice = line.strip().split()[0] if line.strip() else "inline"
        if choice != "inline":
            print(
                f"%matplotlib {choice}: an isolated cell shows figures inline (it has no window or "
                "widget front end of its own); figures are shown as images."
            )

    def _line_sx(self, line: str) -> Any:
        return self.getoutput(line)

    def _line_system(self, line: str) -> Any:
        return self.getoutput(line)

    def _install(self, tool: list[str], line: str) -> None:
        args = shlex.split(self.var_expand(line))
        sys.stdout.flush()
        code = subprocess.call([*tool, *args])
        if code == 0 and args[:1] == ["install"]:
            print("Note: the packages were installed into the worker's environment, which is the "
                  "kernel's; an ordinary cell needs a kernel restart to see new versions.")

    def _line_pip(self, line: str) -> None:
        self._install([sys.executable, "-m", "pip"], line)

    def _line_conda(self, line: str) -> None:
        conda = os.environ.get("CONDA_EXE") or "conda"
        self._install([conda], line)

    def _script(self, program: str, cell: str) -> None:
        sys.stdout.flush()
        sys.stderr.flush()
        subprocess.run([program], input=cell, text=True)

    def _cell_bash(self, line: str, cell: str) -> None:
        self._script("bash", cell)

    def _cell_sh(self, line: str, cell: str) -> None:
        self._script("sh", cell)

    def _cell_writefile(self, line: str, cell: str) -> None:
        args = shlex.split(self.var_expand(line))
        append = "-a" in args or "--append" in args
        names = [a for a in args if not a.startswith("-")]
        if not names:
            raise ValueError("%%writefile needs a file name")
        exists = os.path.exists(names[0])
        with open(names[0], "a" if append else "w") as fh:
            fh.write(cell)
        print(f"{'Appending to' if append else 'Overwriting' if exists else 'Writing'} {names[0]}")


    # -- %run ---------------------------------------------------------------------------------
    _RUN_FLAGS = frozenset({"-i", "-e", "-n"})

    def _line_run(self, line: str) -> None:
        """``%run [-i] [-e] [-n] FILE [ARGS]`` and ``%run -m MODULE [ARGS]``, as IPython runs a script.

        The script runs as ``__main__`` (``-n``: under its own name) with ``sys.argv``
        its name and ``ARGS`` and its directory first on ``sys.path``, in a namespace
        of its own whose names then join the cell's (so they come back to the
        notebook, as after IPython's ``%run``); with ``-i`` it runs in the cell's
        namespace, seeing the variables the cell was given (the plan reads the
        script for them: :func:`nbisolate.plan.magic_code`).  As IPython's, an
        exception in the script is shown and the cell goes on, and a ``sys.exit``
        ends the script, not the cell (a code other than 0 is shown; ``-e``: not
        even that).
        """
        import runpy

        flags, module, path, args = self._run_target(line)
        saved_argv, saved_main = sys.argv, sys.modules.get("__main__")
        sys.argv = [path, *args]
        where = None if module is not None else os.path.dirname(os.path.abspath(path))
        if where is not None and where not in sys.path:  # its own directory first, while it runs
            sys.path.insert(0, where)
        else:
            where = None
        name = "__main__" if "-n" not in flags else os.path.splitext(os.path.basename(path))[0]
        inside = "-i" in flags and module is None  # in the cell's own namespace
        made: dict[str, Any] = self.user_ns if inside else {}  # type: ignore[assignment]
        kept_file = made.get("__file__")
        try:
            if module is not None:
                made = runpy.run_module(module, run_name=name, alter_sys=True)
            else:
                with open(path, "rb") as fh:
                    code = compile(fh.read(), path, "exec")
                if not inside:  # a module of its own, the __main__ while it runs (as IPython's new_main_mod)
                    script = types.ModuleType(name)
                    made = script.__dict__
                    made["__builtins__"] = builtins
                    if name == "__main__":
                        sys.modules["__main__"] = script
                made["__file__"] = os.path.abspath(path)
                exec(code, made)
        except SystemExit as exc:
            if exc.code not in (None, 0) and "-e" not in flags:
                sys.stdout.flush()
                print(f"An exception has occurred: the script called sys.exit({exc.code!r}).\n"
                      f"SystemExit: {exc.code}", file=sys.stderr)
        except Exception as exc:  # shown, and the cell goes on, as IPython's %run does
            import traceback

            sys.stdout.flush()
            shown = traceback.format_exception(type(exc), exc, exc.__traceback__.tb_next if exc.__traceback__ else None)
            sys.stderr.write("".join(shown))
        finally:
            sys.argv = saved_argv
            if where is not None and where in sys.path:
                sys.path.remove(where)
            if saved_main is not None:
                sys.modules["__main__"] = saved_main
            if inside:  # the cell's __file__ is as it was
                if kept_file is None:
                    made.pop("__file__", None)
                else:
                    made["__file__"] = kept_file
            else:  # what the script bound joins the cell's names, as in IPython
                self.user_ns.update({k: v for k, v in made.items() if not (k.startswith("__") and k.endswith("__"))})

    def _run_target(self, line: str) -> tuple[set[str], str | None, str, list[str]]:
        """``%run``'s line: its flags, the module (``-m``) or None, the file (or module) name,
        and the script's arguments; a clear error for what an isolated cell cannot run."""
        args = shlex.split(self.var_expand(line))
        flags: set[str] = set()
        while args and args[0].startswith("-") and args[0] != "-m":
            flag = args.pop(0)
            if flag not in self._RUN_FLAGS:
                raise ValueError(
                    f"%run {flag}: an isolated cell runs scripts with -i, -e, -n and -m only; "
                    "run it in an ordinary cell for the others (-t, -d, -p, -G)"
                )
            flags.add(flag)
        if args[:1] == ["-m"]:
            if len(args) < 2:
                raise ValueError("%run -m needs a module name: %run -m package.module [ARGS]")
            return flags, args[1], args[1], args[2:]
        if not args:
            raise ValueError("%run needs a file name: %run script.py [ARGS]")
        path = os.path.expanduser(args.pop(0))
        if not os.path.exists(path) and os.path.exists(path + ".py"):
            path += ".py"
        if not os.path.isfile(path):
            raise FileNotFoundError(f"%run: no file {path!r} (in {os.getcwd()})")
        if not path.endswith(".py"):
            raise ValueError(
                f"%run {path}: an isolated cell runs Python files (.py); run a notebook or an "
                ".ipy script in an ordinary cell"
            )
        return flags, None, path, args


def install(ns: MutableMapping[str, Any], micro: str | None = None) -> WorkerShell:
    """Make ``get_ipython()`` in ``ns`` return a :class:`WorkerShell` on ``ns``; ``micro`` is how
    the kernel's IPython writes microseconds (``µs`` or, from IPython 9, ``μs``)."""
    global _micro
    if micro:
        _micro = micro
    shell = WorkerShell(ns)
    ns["get_ipython"] = lambda: shell
    return shell
