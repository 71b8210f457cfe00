"""bench/bench_header.py stays runnable: a few hundred calls end to end (no timing is asserted)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_header.py"


@pytest.mark.slow
def test_bench_header_runs() -> None:
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--calls", "200", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    per_call = dict(re.findall(r"^  (\S.*?)\s+([\d.]+) us per call$", proc.stdout, re.MULTILINE))
    assert set(per_call) == {"new_header + encode", "parse_header + open_header", "crypto only"}
    assert all(float(us) > 0 for us in per_call.values())
    # The header code includes its crypto, so it cannot cost less than the crypto alone.
    ratios = [float(x) for x in re.findall(r"/ crypto only: ([\d.]+)x$", proc.stdout, re.MULTILINE)]
    assert len(ratios) == 2 and all(r > 1 for r in ratios), proc.stdout
