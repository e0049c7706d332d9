"""Ask a freshly started interpreter whether it can load a pickle.

``pickle.dumps`` succeeding in the kernel proves little about a *spawned*
worker: functions and classes are stored by reference (``module`` plus
``qualname``), and the worker has to find them again by importing the module.
A notebook's ``__main__`` is not importable, a module loaded from a file under
a made-up name is not importable, an attribute added to a module at run time
does not exist after a fresh import. Static reasoning gets most cases right;
for the rest, the only honest answer comes from trying. That is all this
module does, so that :mod:`nbisolate.diagnose` can stay free of processes and
take the check as an injected callable (``verify_spawn=spawn_loads``).

The child gets the kernel's ``sys.path`` (through ``PYTHONPATH``) and its
working directory, like a ``multiprocessing`` spawn child would, and nothing
else: no ``__main__`` of ours, no already imported modules.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

from . import proctree

__all__ = ["spawn_loads"]

# What the child runs. It reads the pickle from stdin, loads it, and reports
# the exception on stderr after a marker line, so that anything the loaded
# objects print cannot be mistaken for our answer. ``os._exit`` skips
# interpreter shutdown: a loaded object may have started a thread or hold a
# resource whose finalizer blocks, and we only care whether loading worked.
_MARK = "--nbisolate-probe-error--"
_CHILD = f"""
import os, sys
data = sys.stdin.buffer.read()
try:
    import {{module}} as _ser
    _ser.loads(data)
except BaseException as exc:
    t = type(exc)
    name = t.__qualname__ if t.__module__ == "builtins" else t.__module__ + "." + t.__qualname__
    sys.stderr.write("\\n{_MARK}\\n" + name + ": " + str(exc) + "\\n")
    sys.stderr.flush()
    os._exit(3)
os._exit(0)
"""


def _child_env() -> dict[str, str]:
    """The kernel's environment, with its import path made explicit.

    ``sys.path`` of the kernel may differ from what a fresh interpreter would
    compute (a notebook that did ``sys.path.append("../src")``, the notebook's
    directory as ``''``); multiprocessing's spawn start method sends the
    parent's ``sys.path`` to the child, so the probe does the same.
    """
    env = dict(os.environ)
    cwd = os.getcwd()
    entries: list[str] = []
    for entry in sys.path:
        if not isinstance(entry, str):
            continue
        path = entry or cwd
        if path not in entries:
            entries.append(path)
    env["PYTHONPATH"] = os.pathsep.join(entries)
    # A startup hook or inspect mode would run code we did not ask for.
    for var in ("PYTHONSTARTUP", "PYTHONINSPECT"):
        env.pop(var, None)
    return env


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """Kill whatever is left in the child's process group (it leads its own session).

    Called even after the child exited: loading a pickle runs arbitrary
    reducers, which may have started processes of their own, and those stay
    in the child's process group, which keeps the group's id from reuse.
    """
    proctree.signal_group(proc.pid, signal.SIGKILL)


def spawn_loads(data: bytes, timeout: float = 10.0, *, module: str = "pickle") -> str | None:
    """Load ``data`` in a freshly started Python process; return None or the error.

    Returns ``None`` when ``module.loads(data)`` succeeded in the child, and
    otherwise one line saying why not, e.g. ``"AttributeError: Can't get
    attribute 'work' on <module '__main__' (built-in)>"``. A child that runs
    longer than ``timeout`` seconds is killed (with everything it started)
    and reported as such; no process is ever left behind, even when the
    caller is interrupted.

    ``module`` names the loader to use in the child: ``"pickle"`` (the
    default: what multiprocessing, concurrent.futures and DataLoader workers
    use), or ``"dill"``.
    """
    if module not in ("pickle", "dill", "cloudpickle"):
        raise ValueError(f"spawn_loads: unknown loader module {module!r}")
    cmd = [sys.executable, "-c", _CHILD.format(module=module)]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        cwd=os.getcwd(),
        env=_child_env(),
        start_new_session=True,
    )
    try:
        try:
            _, err = proc.communicate(input=data, timeout=timeout)
        except subprocess.TimeoutExpired:
            proctree.kill_tree(proc.pid)  # not reaped yet: the pid surely is our child
            proc.communicate()
            return (
                f"a fresh Python process was still loading the pickle after {timeout:g} s "
                "and was killed"
            )
        text = err.decode("utf-8", "replace")
        if proc.returncode == 0:
            return None
        if _MARK in text:
            lines = text.rsplit(_MARK, 1)[1].strip().splitlines()
            return lines[0] if lines else "unknown error while loading"
        tail = " ".join(text.strip().splitlines()[-3:])
        how = (
            f"signal {-proc.returncode}"
            if proc.returncode < 0
            else f"exit code {proc.returncode}"
        )
        return f"a fresh Python process died with {how} while loading the pickle" + (
            f": {tail}" if tail else ""
        )
    finally:
        if proc.returncode is None:  # interrupted: not reaped, so the pid surely is our child
            proctree.kill_tree(proc.pid)
        else:
            _kill_group(proc)
        if proc.poll() is None:  # pragma: no cover - killed just above
            proc.wait()
        for stream in (proc.stdin, proc.stderr):
            if stream is not None and not stream.closed:
                stream.close()
