"""``kmsenv server``: see register()."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:  # filled in with the server work
    del sub
