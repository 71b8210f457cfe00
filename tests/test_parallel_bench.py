"""bench/bench_large.py stays runnable: it runs end to end on a few MiB (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_large.py"


@pytest.mark.slow
def test_bench_large_runs(tmp_path: Path) -> None:
    out = tmp_path / "large.json"
    args = ["--size", "4M", "--rounds", "1", "--dir", str(tmp_path), "--out", str(out)]
    proc = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["verified"] is True
    assert all(row["median_s"] > 0 for row in results["results"].values())
    assert len(results["ratios"]) == 7 and all(r > 0 for r in results["ratios"].values())
    assert "outputs verified against the input: ok" in proc.stdout
    assert list(tmp_path.glob("kmsenv-bench-large-*")) == []  # its work folder is removed
