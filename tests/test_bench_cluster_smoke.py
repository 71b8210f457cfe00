"""bench/bench_cluster.py stays runnable: the three configurations end to end on a tiny count
(no timing is asserted; the benchmark prints its ratios and targets)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
def test_bench_cluster_runs_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "cluster.json"
    args = ["--count", "40", "--repeat", "1", "--concurrency", "4", "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_cluster.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())
    assert set(results["runs"]) == {"sqlite", "pg-1-node", "pg-2-nodes"}
    for runs in results["runs"].values():
        assert [r["action"] for r in runs] == ["GenerateDataKey", "Decrypt"]
        assert all(r["ok"] == 40 and r["errors"] == 0 for r in runs)
    ratios = results["summary"]["ratio_vs_sqlite"]
    assert ratios["sqlite"] == {"GenerateDataKey": 1.0, "Decrypt": 1.0}
    assert all(math.isfinite(x) and x > 0 for config in ratios.values() for x in config.values())
    assert "client-side round robin" in proc.stdout and "target pg-2-nodes GenerateDataKey" in proc.stdout
