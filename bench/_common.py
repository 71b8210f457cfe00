"""Helpers every file benchmark shares: size arguments, page-cache warming, timing one action.

Imported by the scripts in this folder (run as ``python bench/NAME.py``, which puts this folder
first on ``sys.path``); not part of kmsenv.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

MiB = 1 << 20
#: Binary units, long and short forms (1GiB = 1G), matched case-insensitively.
UNITS = {"KiB": 1 << 10, "MiB": MiB, "GiB": 1 << 30, "K": 1 << 10, "M": MiB, "G": 1 << 30}


def parse_size(text: str) -> int:
    """Bytes in ``text``: a number, optionally fractional, with an optional unit (64M, 1GiB, 1.5G)."""
    lowered = text.strip().lower()
    for unit in sorted(UNITS, key=len, reverse=True):
        if lowered.endswith(unit.lower()):
            return int(float(lowered[: -len(unit)]) * UNITS[unit])
    return int(lowered)


def warm(path: Path) -> None:
    """Read ``path`` so that a timed run starts from the page cache, as a user's recent file would."""
    with path.open("rb") as f:
        while f.read(16 * MiB):
            pass


def timed(action: Callable[[], object]) -> float:
    """Wall seconds of ``action()``."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start
