"""An isolated cell is IPython, not Python: turn it into Python the way IPython does, in the kernel.

``!ls``, ``files = !ls``, ``%time f()``, ``%pip install x`` are everyday lines.
IPython's own input transformers (``shell.transform_cell``) turn them into
calls on ``get_ipython()``; the worker answers those calls with the small
shell of :mod:`nbisolate.worker_shell`.  What that shell cannot do -- a magic
that needs the kernel, like ``%load_ext`` or ``%who`` -- is refused here,
before anything runs, by name, with what to do instead.

IPython keeps a line magic or a shell escape on its own line, so line numbers
in the worker's tracebacks stay the user's.
"""

from __future__ import annotations

import ast
from typing import Any

from .errors import IsolateUsageError
from .worker_shell import CELL_MAGICS, LINE_MAGICS

ADVICE: dict[str, str] = {
    "load_ext": "extensions load into the kernel: run `%load_ext NAME` in an ordinary cell; the "
    "worker imports what the cell itself imports",
    "reload_ext": "extensions live in the kernel: run it in an ordinary cell",
    "autoreload": "autoreload watches the kernel's modules: run it in an ordinary cell; every "
    "isolated cell imports fresh modules anyway",
    "who": "it lists the notebook's variables, which live in the kernel: run it in an ordinary cell",
    "whos": "it lists the notebook's variables, which live in the kernel: run it in an ordinary cell",
    "who_ls": "it lists the notebook's variables, which live in the kernel: run it in an ordinary cell",
    "store": "stored variables belong to the kernel: run `%store` in an ordinary cell, and use the "
    "value here (it is shipped as an input)",
    "reset": "it clears the kernel's namespace: run it in an ordinary cell",
    "load": "it edits the cell in the front end: use it in an ordinary cell",
    "debug": "debug in an ordinary cell: the worker has no debugger front end",
    "pdb": "debug in an ordinary cell: the worker has no debugger front end",
    "prun": "profile in an ordinary cell, or use cProfile inside this one",
    "isolate": "a cell is isolated once: remove the inner %%isolate",
    "capture": "put %%capture above %%isolate instead, to capture the whole isolated cell",
}


def needs_transform(cell: str) -> bool:
    """Whether the cell has anything IPython would rewrite (the common cell has not: no cost)."""
    return "%" in cell or "!" in cell or "?" in cell


def transform(shell: Any, cell: str) -> str:
    """The cell as Python, by IPython's transformers; refuses magics a worker cannot run.

    Raises :class:`IsolateUsageError` naming the magic and what to do instead.
    A cell that is Python already comes back unchanged (and is never handed to
    IPython, whose transformers would not change it either).
    """
    if not needs_transform(cell) or shell is None:
        return cell
    try:
        ast.parse(cell)
        return cell  # plain Python after all (a '%' in an expression or a string)
    except SyntaxError:
        pass
    code = shell.transform_cell(cell)
    refuse(magics_used(code))
    return code


def magics_used(code: str) -> list[tuple[str, str]]:
    """``(kind, name)`` for each ``get_ipython().<kind>(name, ...)`` call in ``code``."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return []  # the syntax error is reported when the cell is planned, with its line
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
            continue
        owner = node.func.value
        if not (
            isinstance(owner, ast.Call)
            and isinstance(owner.func, ast.Name)
            and owner.func.id == "get_ipython"
        ):
            continue
        kind = node.func.attr
        name = ""
        if node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            name = node.args[0].value.lstrip("%")
        found.append((kind, name))
    return found


def refuse(used: list[tuple[str, str]]) -> None:
    """Raise for the first call the worker's shell cannot answer."""
    for kind, name in used:
        if kind in ("system", "getoutput"):
            continue
        if kind == "run_line_magic" and name in LINE_MAGICS:
            continue
        if kind == "run_cell_magic" and name in CELL_MAGICS:
            continue
        prefix = "%%" if kind == "run_cell_magic" else "%"
        what = f"{prefix}{name}" if name else f"get_ipython().{kind}"
        advice = ADVICE.get(name, "it needs the kernel itself: run it in an ordinary cell, before "
                            "or after the isolated one")
        allowed = ", ".join(f"%{m}" for m in sorted(LINE_MAGICS - {"sx", "system"}))
        raise IsolateUsageError(
            f"{what} cannot run in an isolated cell: {advice}. Nothing ran. (An isolated cell "
            f"can use !commands and {allowed}.)"
        )


def cell_number(shell: Any) -> int:
    """The execution count the user sees on the running cell (``In [n]``).

    IPython 9 counts up before running a cell and IPython 8 after; the result
    object of the running cell has the number the front end shows, in both.
    """
    result = getattr(getattr(shell, "displayhook", None), "exec_result", None)
    number = getattr(result, "execution_count", None)
    if isinstance(number, int):
        return number
    return int(getattr(shell, "execution_count", 0) or 0)
