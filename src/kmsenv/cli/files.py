"""``kmsenv encrypt`` / ``decrypt`` / ``inspect`` / ``migrate``: envelope encryption of files."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:  # filled in with the file-format work
    del sub
