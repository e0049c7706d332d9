"""The demo notebooks, run as ``make demo`` runs them: top to bottom in a real kernel (nbclient).

A demo that stops working is a broken promise in the place users look first;
each must run without an error its cells do not announce (the
``raises-exception`` tag), and the quickstart must still show what its text
says it shows.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import nbformat
import pytest
from nbclient.exceptions import CellExecutionError

from .conftest import mp_folders

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
sys.path.insert(0, str(NOTEBOOKS))

import run_demo  # noqa: E402


def _outputs(nb: nbformat.NotebookNode, starts: str) -> str:
    """The text of what the code cell whose source starts with ``starts`` showed."""
    cell = next(c for c in nb.cells if c.cell_type == "code" and c.source.startswith(starts))
    return "".join(
        o.get("text", "") or str(o.get("data", {}).get("text/plain", "")) for o in cell.get("outputs", [])
    )


def _relays_widgets() -> bool:
    """ipywidgets 8.1 on makes its comms with ``comm.create_comm``, which a worker relays (8.0's
    widgets stay in the worker, and so do their handlers)."""
    import ipywidgets.widgets.widget as widget

    return hasattr(widget, "comm")


@pytest.mark.parametrize("name", sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")))
def test_a_demo_notebook_runs_top_to_bottom(name: str):
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    before = mp_folders()
    try:
        run_demo.execute(nb, NOTEBOOKS)  # raises at the first cell that fails unannounced
    except CellExecutionError as exc:
        if "--bg needs a kernel that can send output" in str(exc):  # ipykernel before 7: refused, said why
            pytest.skip("this ipykernel cannot route output to a finished cell: the --bg demo is refused")
        raise
    finally:
        # The folder of the forkserver's socket that 05's ordinary cell started in the kernel:
        # ipykernel's shutdown ends the kernel before multiprocessing's exit handler removes it.
        for folder in mp_folders() - before:
            shutil.rmtree(folder, ignore_errors=True)
    announced = [c for c in nb.cells if "raises-exception" in c.metadata.get("tags", [])]
    for cell in announced:  # a failure the text announces still happens
        assert any(o.output_type == "error" for o in cell.outputs), cell.source
    if name == "03-rich-output.ipynb":  # the bar the isolated cell moved is the notebook's widget
        assert "('IntProgress', 5)" in _outputs(nb, 'bar.description = "done"')
        if _relays_widgets():  # the cell's click handler came back, and ran in the kernel
            assert "('clicked 1', [1])" in _outputs(nb, "button.click()")
    if name == "01-quickstart.ipynb":
        assert "back in the kernel: 100.875 True" in _outputs(nb, 'print("back in the kernel:"')
        assert "3 ['w0', 'w1', 'w2'] 30 v2" in _outputs(nb, 'warnings.warn("old API")')
