"""bench/bench_scale.py stays runnable: it runs end to end on ~20 files (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_scale.py"


@pytest.mark.slow
def test_bench_scale_runs(tmp_path: Path) -> None:
    out = tmp_path / "scale.json"
    args = ["--files", "20", "--rounds", "1", "--per-process-sample", "1", "--jobs", "2", "--dir", str(tmp_path)]
    args += ["--out", str(out), "--settle", "0"]
    proc = subprocess.run([sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())["results"]
    assert results["kmsenv encrypt -r (cache)"]["generate_data_key_calls"] <= 5
    assert results["kmsenv encrypt -r --no-cache"]["generate_data_key_calls"] == 20
    assert results["kmsenv decrypt -r"]["verified"] is True
    assert results["kmsenv decrypt -r"]["decrypt_calls"] == "1"  # one wrapped data key: one KMS Decrypt
    assert all(r["files_per_s"] > 0 for r in results.values())
    # The reference floor and kmsenv's start-up are measured in the same run, and the bound uses them.
    assert results["floor: create + write, no crypto, no fsync"]["seconds"] > 0
    assert results["start-up: kmsenv encrypt -r of an empty folder"]["seconds"] > 0
    assert "GenerateDataKey calls with the cache: 1 (target <= 5): ok" in proc.stdout
    assert "load average" in proc.stdout
    assert list(tmp_path.glob("kmsenv-bench-*")) == []  # its work folder is removed
