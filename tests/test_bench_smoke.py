"""The benchmark harness runs and writes well-formed output (timings are not asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_run_writes_table_json_and_chart(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    data = json.loads((tmp_path / "results.json").read_text())
    cases = {row["case"]: row for row in data["rows"]}
    assert set(cases) == {"trivial cell", "100 MB array in"}
    for row in cases.values():
        for approach in ("isolate", "direct", "mp_pool"):
            assert isinstance(row[approach], float) and row[approach] > 0
    assert "target" in cases["trivial cell"] and isinstance(cases["trivial cell"]["met"], bool)
    assert data["meta"]["machine"] and data["meta"]["date"]
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "isolate/mp_pool" in (tmp_path / "table.md").read_text()
