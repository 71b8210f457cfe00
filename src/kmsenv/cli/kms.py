"""``kmsenv kms <Action> --<Param> value ...``: every KMS Action, shaped like ``aliyun kms``."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    del sub
