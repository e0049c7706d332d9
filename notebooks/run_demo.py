"""Execute every demo notebook headlessly and print what each one showed.

Used by ``make demo``: each notebook in the given folder runs top to bottom in
a fresh kernel (nbclient), an executed copy is written to the output folder,
and a short digest of each code cell's output is printed, so the demo can be
read from a terminal.  A cell that fails without the ``raises-exception`` tag
fails the whole run.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def _digest(output: dict) -> str:
    kind = output["output_type"]
    if kind == "stream":
        lines = [ln for ln in output["text"].splitlines() if ln.strip()]
        shown = " | ".join(lines[:3]) + (f" | ... (+{len(lines) - 3} lines)" if len(lines) > 3 else "")
        return f"{output['name']}: {shown}"
    if kind == "error":
        return f"error: {output['ename']}: {output['evalue'][:160]}"
    data = output.get("data", {})
    rich = [m for m in data if m != "text/plain"]
    text = str(data.get("text/plain", "")).splitlines()
    head = text[0][:120] if text else ""
    label = "Out" if kind == "execute_result" else "display"
    return f"{label}: {head}" + (f"  [{', '.join(sorted(rich))}]" if rich else "")


def execute(nb: nbformat.NotebookNode, folder: Path) -> None:
    """Run ``nb`` top to bottom in a fresh kernel, in ``folder``, its outputs written into it.

    Raises nbclient's ``CellExecutionError`` at the first cell that fails without the
    ``raises-exception`` tag (the tests run the notebooks through this too).
    """
    NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(folder)}}).execute()


def run(folder: Path, out: Path) -> int:
    out.mkdir(parents=True, exist_ok=True)
    failures = 0
    for path in sorted(folder.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        start = time.perf_counter()
        print(f"\n=== {path.name}")
        try:
            execute(nb, folder)
        except Exception as exc:  # report, keep the executed copy, carry on with the others
            failures += 1
            print(f"FAILED: {type(exc).__name__}: {str(exc)[-600:]}")
        nbformat.write(nb, out / path.name)
        for cell in nb.cells:
            if cell.cell_type == "markdown":
                first = cell.source.strip().splitlines()[0] if cell.source.strip() else ""
                if first.startswith("#"):
                    print(f"  {first}")
            elif cell.cell_type == "code" and cell.get("outputs"):
                src = cell.source.strip().splitlines()[0][:70]
                print(f"    [{cell.get('execution_count')}] {src}")
                for output in cell.outputs:
                    print(f"        {_digest(output)}")
        print(f"  ({time.perf_counter() - start:.1f} s, executed copy in {out / path.name})")
    return failures


def run_leaving_nothing(folder: Path, out: Path) -> int:
    """:func:`run` with a temporary folder of its own for the kernels and all they start,
    removed afterwards: the demos' scratch files, the Dask cluster's scratch space and the
    folder of a forkserver's socket (a kernel ends before multiprocessing's exit handler
    would remove it) would otherwise stay behind in the machine's /tmp."""
    scratch = tempfile.mkdtemp(prefix="nbisolate-demo-")
    before = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = scratch
    try:
        return run(folder, out)
    finally:
        if before is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = before
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "notebooks")
    target = Path(sys.argv[2] if len(sys.argv) > 2 else "build/notebooks")
    sys.exit(1 if run_leaving_nothing(folder, target) else 0)
