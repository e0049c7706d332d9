"""The wall between the kernel side and the worker side, checked in fresh interpreters.

The worker must start fast and carry nothing of the kernel (IPython, widgets,
the magics, the runner); the kernel must not load the worker's modules (the
worker's display machinery patches ``builtins`` and ``sys.meta_path`` when
installed, and has no business in a kernel).  They share only
:mod:`nbisolate.protocol`, the framing of :mod:`nbisolate.wire` and a few
standard-library-only helpers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

# Everything a worker process may load of nbisolate: the worker itself and what it imports.
WORKER_SIDE = {
    "nbisolate",
    "nbisolate.worker",
    "nbisolate.display_worker",
    "nbisolate.protocol",
    "nbisolate.proctree",
    "nbisolate.template",
    "nbisolate.wire",
    "nbisolate.ship",
    "nbisolate.inplace",
    "nbisolate.openfiles",
    "nbisolate.attributes",
    "nbisolate.rng",
    "nbisolate.byvalue",
    "nbisolate.travel",
    "nbisolate.units",
    "nbisolate.errors",
    "nbisolate.pools",
    "nbisolate._mpchild",
    "nbisolate.sweep_leader",
    "nbisolate.widgetrelay",  # shared: the worker names its rebuild, ship asks it what a widget is
}
# The modules a kernel uses to run cells; none of them may pull in the worker.
KERNEL_SIDE = [
    "nbisolate.magics",
    "nbisolate.runner",
    "nbisolate.supervisor",
    "nbisolate.sweep",
    "nbisolate.panel",
    "nbisolate.labcomm",
]
FRONT_END = ("IPython", "ipywidgets", "ipykernel", "traitlets", "zmq", "jupyter_client")


def _modules_after_import(names: list[str]) -> set[str]:
    """The ``sys.modules`` of a fresh interpreter after importing ``names``."""
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}:\n"
        "    importlib.import_module(name)\n"
        "print(json.dumps(sorted(sys.modules)))\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120, check=True
    )
    return set(json.loads(out.stdout.strip().splitlines()[-1]))


def test_the_kernel_side_never_loads_the_worker():
    loaded = _modules_after_import(KERNEL_SIDE)
    assert set(KERNEL_SIDE) <= loaded  # the check imported what it claims to check
    assert "nbisolate.worker" not in loaded, "a kernel-side module imports nbisolate.worker"
    assert "nbisolate.display_worker" not in loaded, "a kernel-side module imports display_worker"


def test_the_worker_side_loads_nothing_of_the_kernel_or_the_front_end():
    loaded = _modules_after_import(sorted(WORKER_SIDE))
    ours = {name for name in loaded if name == "nbisolate" or name.startswith("nbisolate.")}
    assert ours == WORKER_SIDE, f"the worker side loaded kernel-side modules: {sorted(ours - WORKER_SIDE)}"
    front = sorted(name for name in loaded if name.split(".")[0] in FRONT_END)
    assert not front, f"the worker side loaded {front} at import time"
    assert "psutil" not in loaded  # proctree imports it only for the supervisor's Tree


def test_a_worker_loads_only_what_its_entry_point_needs():
    # What a spawned worker pays for before the cell's own imports: not the template, not ship.
    loaded = _modules_after_import(["nbisolate.worker"])
    ours = {name for name in loaded if name.startswith("nbisolate")}
    assert ours <= WORKER_SIDE - {"nbisolate.template", "nbisolate.ship"}, sorted(ours)
