"""``kmsenv audit verify [FILE|DIR ...]``: check the hash chains of kmsenv servers' audit logs
(one file, one chain, per node)."""

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
        description="Check every record's hash and its link to the previous record, in each file given (a "
        "folder: its *.jsonl files; several nodes each write their own chain). One line per file: OK with a "
        "summary, or the first bad line; exit 0 only if every file is whole, else 7. Records removed from the "
        "end leave no trace in the chain: compare the printed head hashes with ones kept elsewhere.",
    )
    verify.add_argument(
        "files", nargs="*", type=Path, metavar="FILE|DIR", help="default: KMSENV_HOME/audit.jsonl"
    )
    verify.set_defaults(func=_verify)


def _verify(args: argparse.Namespace) -> int:
    from kmsenv.errors import IntegrityError
    from kmsenv.kms.service import default_home
    from kmsenv.server.audit import verify_all

    results = verify_all(args.files or [default_home() / "audit.jsonl"])
    failed = [outcome for _, outcome in results if isinstance(outcome, IntegrityError)]
    for path, outcome in results:
        if isinstance(outcome, IntegrityError):
            if len(results) > 1:  # a single file's error is the command's own error message below
                print(f"{path}: FAILED: {outcome.message}")
            continue
        span = f", {outcome.first_time} to {outcome.last_time}" if outcome.records else ""
        nodes = f"; node {', '.join(outcome.nodes)}" if outcome.nodes else ""
        print(f"{path}: OK: {outcome.records} records{span}{nodes}; head hash {outcome.head}")
    if len(failed) == 1:
        raise failed[0]
    if failed:
        raise IntegrityError(f"{len(failed)} of {len(results)} audit logs failed verification (see above)")
    return 0
