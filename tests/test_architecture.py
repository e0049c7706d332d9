"""docs/architecture.md stays true: its event kinds and its three walls, checked against the code.

The walls are checked statically (every ``import`` statement, also those inside
functions, so a lazy import cannot sneak through), beside tests/test_walls.py,
which imports the worker side in a fresh interpreter.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from nbisolate.events import KINDS

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "nbisolate"
DOC = ROOT / "docs" / "architecture.md"

# Calls whose first argument is an event or message kind, wherever they are made.
_EMITTERS = re.compile(
    r"""\b(?:Event|_emit|emit|_send|send|publish|_notify_kind)\(\s*["']([a-z_]+)["']"""
)
# The template's control socket has its own kinds (protocol.TEMPLATE_KINDS): never events.
_TEMPLATE_FILES = {"template.py"}


def _sources() -> dict[str, str]:
    return {
        str(path.relative_to(PACKAGE)): path.read_text()
        for path in PACKAGE.rglob("*.py")
        if "labextension" not in path.parts
    }


def test_every_event_kind_in_the_code_is_listed_and_documented():
    emitted: dict[str, set[str]] = {}
    for name, text in _sources().items():
        if name in _TEMPLATE_FILES:
            continue
        for kind in _EMITTERS.findall(text):
            emitted.setdefault(kind, set()).add(name)
    from nbisolate import protocol

    emitted = {k: v for k, v in emitted.items() if k not in protocol.TEMPLATE_KINDS or k in KINDS}
    missing = {k: sorted(v) for k, v in emitted.items() if k not in KINDS and k not in protocol.CHANNEL_ONLY}
    assert not missing, f"event kinds emitted but not in events.KINDS: {missing}"
    doc = DOC.read_text()
    undocumented = [k for k in KINDS if f"| `{k}` |" not in doc]
    assert not undocumented, f"event kinds missing from docs/architecture.md: {undocumented}"
    # The worker's kinds are checked against what it sends in tests/test_protocol.py.
    unused = [k for k in KINDS if k not in emitted and k not in protocol.KINDS]
    assert not unused, f"events.KINDS lists kinds nothing emits: {unused}"


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Absolute module names ``path`` imports (relative imports resolved inside nbisolate)."""
    tree = ast.parse(path.read_text())
    package = ".".join(("nbisolate", *path.relative_to(PACKAGE).with_suffix("").parts[:-1]))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join([*base, node.module] if node.module else base)
                if node.module is None:  # from . import x, y: submodules or names
                    found.update(f"{module}.{alias.name}" for alias in node.names)
                found.add(module)
            else:
                found.add(node.module or "")
    return found


def _modules(*names: str) -> list[Path]:
    paths: list[Path] = []
    for name in names:
        path = PACKAGE / name
        paths.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path.with_suffix(".py")])
    return [p for p in paths if p.exists()]


def _violations(paths: list[Path], forbidden: tuple[str, ...], top_level_only: bool = False) -> dict:
    bad = {}
    for path in paths:
        hits = sorted(
            m
            for m in _imports(path, top_level_only)
            if any(m == f or m.startswith(f + ".") for f in forbidden)
        )
        if hits:
            bad[str(path.relative_to(ROOT))] = hits
    return bad


KERNEL_SIDE = (
    "nbisolate.runner", "nbisolate.magics", "nbisolate.panel", "nbisolate.labcomm",
    "nbisolate.supervisor", "nbisolate.backends", "nbisolate.sweep", "nbisolate.wait",
    "nbisolate.kernel_comms",
)
UI = ("IPython", "ipywidgets", "ipykernel", "comm", "nbisolate.panel", "nbisolate.labcomm",
      "nbisolate.magics", "nbisolate.kernel_comms")
PROCESSES = ("subprocess", "multiprocessing", "multiprocess", "concurrent.futures",
             "nbisolate.supervisor", "nbisolate.template", "nbisolate.probe", "nbisolate.backends",
             "nbisolate.worker")


def test_wall_1_the_worker_side_loads_nothing_of_the_kernel_side():
    worker_side = _modules(
        "worker", "display_worker", "protocol", "wire", "proctree", "ship", "byvalue", "travel",
        "worker_shell", "magicline", "widgetrelay", "pools", "_mpchild", "inplace", "attributes", "rng", "sweep_leader",
    )
    assert worker_side
    bad = _violations(worker_side, (*KERNEL_SIDE, "IPython", "ipywidgets", "ipykernel"), top_level_only=True)
    assert not bad, f"worker-side modules import the kernel side at import time: {bad}"


def test_wall_2_planning_shipping_and_diagnosis_start_no_processes():
    planning = _modules("plan", "ship", "byvalue", "travel", "options", "units", "diagnose")
    assert planning
    bad = _violations(planning, PROCESSES)
    assert not bad, f"planning/shipping/diagnosis modules import process machinery: {bad}"


def test_wall_3_supervisor_and_backends_know_no_ui():
    side = _modules("supervisor", "backends", "template", "wait", "events", "runner", "sweep")
    bad = _violations(side, UI)
    assert not bad, f"supervisor/backends import a UI: {bad}"


@pytest.mark.parametrize("wall", ["1.", "2.", "3."])
def test_the_walls_are_written_down(wall):
    assert f"{wall} **" in DOC.read_text()
