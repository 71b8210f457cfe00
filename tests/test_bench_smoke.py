"""The benchmarks stay runnable: each runs end to end on tiny inputs (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.mark.slow
def test_bench_files_runs(tmp_path: Path) -> None:
    out = tmp_path / "files.json"
    args = ["--sizes", "1MiB,2MiB", "--repeat", "1", "--reference-sample", "--dir", str(tmp_path), "--out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_files.py"), *args],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert set(results["sizes"]) == {"1MiB", "2MiB"}
    for entry in results["sizes"].values():
        assert {"cp+fsync", "kmsenv encrypt", "kmsenv decrypt"} <= set(entry)
        assert all(row["MBps"] > 0 and row["peak_rss"] > 0 for row in entry.values())
    assert "reference sample" in results["sizes"]["1MiB"]
    assert results["small_encrypt"]["ratio"] > 0
    assert "x cp+fsync" in proc.stdout
    assert list(tmp_path.glob("kmsenv-bench-*")) == []  # its work folder is removed
