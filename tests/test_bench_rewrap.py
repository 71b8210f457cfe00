"""bench/bench_rewrap.py stays runnable: end to end on a tiny file (no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_rewrap.py"


@pytest.mark.slow
def test_bench_rewrap_runs(tmp_path: Path) -> None:
    out = tmp_path / "rewrap.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--size", "2M", "--rounds", "1", "--dir", str(tmp_path), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        env={"ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true", "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr
    results = json.loads(out.read_text())
    assert results["size"] == 2 << 20
    assert all(results["checks"].values()), results["checks"]  # in place, same inode, payload kept
    assert set(results["results"]) == {
        "re-encrypt (decrypt | encrypt, fsync)",
        "rewrap add, in place",
        "rewrap remove, in place",
        "rewrap add (CLI process)",
    }
    assert all(row["median_s"] > 0 for row in results["results"].values())
    assert "rewrap add / re-encrypt (target <= 0.01)" in proc.stdout
    assert list(tmp_path.glob("kmsenv-bench-rewrap-*")) == []  # its work folder is removed
