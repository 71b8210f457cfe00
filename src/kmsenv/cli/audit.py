"""``kmsenv audit verify [FILE]``: check the hash chain of a kmsenv server's audit log."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "audit",
        help="check the server's hash-chained audit log",
        description="Work with the audit log a kmsenv server writes (one hash-chained JSON line per request).",
    )
    actions = parser.add_subparsers(dest="audit_action", metavar="ACTION")
    actions.required = True
    verify = actions.add_parser(
        "verify",
        help="check that no record was edited, deleted, inserted or reordered",
        description="Check every record's hash and its link to the previous record. Exit 0 with a summary, "
        "or exit 7 naming the first bad line. Records removed from the end leave no trace in the chain: "
        "compare the printed head hash with one kept elsewhere.",
    )
    verify.add_argument("file", nargs="?", type=Path, metavar="FILE", help="default: KMSENV_HOME/audit.jsonl")
    verify.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    from kmsenv.kms.service import default_home
    from kmsenv.server.audit import verify

    path = args.file or default_home() / "audit.jsonl"
    summary = verify(path)
    span = f", {summary.first_time} to {summary.last_time}" if summary.records else ""
    print(f"{path}: OK: {summary.records} records{span}; head hash {summary.head}")
    return 0
