"""The fuzz targets of tests/fuzz/ as bounded hypothesis property tests, and the fuzzers' findings.

Each target (see tests/fuzz/targets.py for the contract) gets random bytes and mutated seeds from
the test vectors: flipped bits, truncations, insertions, duplicated slices. The example counts keep
the whole set well under 30 s; the long, coverage-guided runs are `python tests/fuzz/run.py`
(docs/security.md records their figures). Every finding is pinned as a regression test in
tests/test_fuzz_findings.py.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fuzz.targets import TARGETS, Target

_SETTINGS = settings(
    max_examples=300,
    deadline=timedelta(seconds=5),  # a hang is a finding, not a slow test
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=False,
)


@st.composite
def _mutated(draw: st.DrawFn, target: Target) -> bytes:
    data = bytearray(draw(st.sampled_from(target.seeds())))
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "cut", "insert", "dup", "set"]))
        at = draw(st.integers(0, len(data)))
        if op == "flip" and at < len(data):
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif op == "cut":
            del data[at : at + draw(st.integers(1, 64))]
        elif op == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif op == "dup":
            data[at:at] = data[at : at + draw(st.integers(1, 64))]
        elif op == "set" and at < len(data):
            data[at] = draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]))
    return bytes(data)


_NAMES = sorted(TARGETS)


@pytest.mark.parametrize("name", _NAMES)
def test_seeds_keep_the_contract(name: str) -> None:
    target = TARGETS[name]
    seeds = target.seeds()
    assert seeds
    for seed in seeds:
        target.run(seed)


@pytest.mark.parametrize("name", _NAMES)
def test_random_bytes_keep_the_contract(name: str) -> None:
    @_SETTINGS
    @given(st.binary(max_size=512))
    def check(data: bytes) -> None:
        TARGETS[name].run(data)

    check()


@pytest.mark.parametrize("name", _NAMES)
def test_mutated_seeds_keep_the_contract(name: str) -> None:
    target = TARGETS[name]

    @_SETTINGS
    @given(_mutated(target))
    def check(data: bytes) -> None:
        target.run(data)

    check()


def test_run_py_lists_the_targets() -> None:
    import subprocess
    import sys
    from pathlib import Path

    run = Path(__file__).parent / "fuzz" / "run.py"
    out = subprocess.run([sys.executable, str(run), "--list"], capture_output=True, text=True, check=True).stdout
    assert sorted(line.split()[0] for line in out.splitlines()) == _NAMES
