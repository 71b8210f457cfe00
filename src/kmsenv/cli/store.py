"""``kmsenv store migrate|check-version|check|export|import``: the KMS store's schema, integrity,
backup and restore.

Every command works on the store a KMS would use: ``--store URL``, else ``KMSENV_STORE``, else the
SQLite ``kms.db`` in ``KMSENV_HOME`` (see docs/cluster.md).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "store",
        help="schema migrations, backup and restore of the KMS store",
        description="Work on the KMS store: --store URL, else KMSENV_STORE (postgresql://...), else kms.db "
        "in KMSENV_HOME.",
    )
    actions = parser.add_subparsers(dest="store_action", metavar="ACTION")
    actions.required = True

    def add(name: str, helptext: str, func: Any) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=helptext, description=helptext)
        p.add_argument("--store", metavar="URL", help="a postgresql:// URL (default: KMSENV_STORE, else kms.db)")
        p.set_defaults(func=func)
        return p

    add("migrate", "apply the schema's forward migrations (once per upgrade, from one node)", _migrate)
    add(
        "check-version",
        "compare the store's schema version with this kmsenv's; exit 0 only if they match",
        _check_version,
    )
    check = add(
        "check",
        "verify every sealed key version and AccessKey opens under the root key, aliases point at live keys, "
        "and the audit chain is whole; exit 0 only if all hold",
        _check,
    )
    check.add_argument(
        "--audit-log", type=Path, metavar="FILE", help="the audit log to verify (default: audit.jsonl in KMSENV_HOME)"
    )
    export = add("export", "write the whole KMS (sealed material, no root key) to a file, mode 0600", _export)
    export.add_argument("-o", "--output", type=Path, required=True, metavar="FILE")
    export.add_argument("--force", action="store_true", help="replace FILE if it exists")
    imp = add(
        "import",
        "load an export into an empty store; the root key (KMSENV_ROOT_KEY_FILE) must be the exported KMS's",
        _import,
    )
    imp.add_argument("file", type=Path, metavar="FILE")


def _home() -> Path:
    from kmsenv.kms.service import default_home

    return default_home()


def _migrate(args: argparse.Namespace) -> int:
    from kmsenv.kms.store_io import migrate_store

    where, before, after = migrate_store(_home(), args.store)
    if before == after:
        print(f"kmsenv: the KMS store {where} is at schema version {after}; nothing to do", file=sys.stderr)
    else:
        print(f"kmsenv: migrated the KMS store {where} from schema version {before} to {after}", file=sys.stderr)
    return 0


def _check_version(args: argparse.Namespace) -> int:
    from kmsenv.errors import ConfigError
    from kmsenv.kms.store import SCHEMA_VERSION
    from kmsenv.kms.store_io import store_schema_version

    where, version = store_schema_version(_home(), args.store)
    print(f"store {where}: schema version {version}; this kmsenv: {SCHEMA_VERSION}")
    if version > SCHEMA_VERSION:
        raise ConfigError(
            f"the KMS store {where} has schema version {version}, newer than this kmsenv understands "
            f"({SCHEMA_VERSION})",
            hint="upgrade kmsenv on this node",
        )
    if 0 < version < SCHEMA_VERSION:
        raise ConfigError(
            f"the KMS store {where} has schema version {version}; this kmsenv needs {SCHEMA_VERSION}",
            hint="run `kmsenv store migrate`",
        )
    return 0


def _check(args: argparse.Namespace) -> int:
    from kmsenv.errors import IntegrityError
    from kmsenv.kms.check import check_store

    report = check_store(_home(), store=args.store, audit_log=args.audit_log)
    for problem in report.problems:
        print(f"problem: {problem}")
    print(f"store {report.where}: checked {report.summary()}")
    if not report.ok:
        raise IntegrityError(
            f"the KMS store {report.where} failed {len(report.problems)} check(s)",
            hint="restore from a backup (kmsenv store import) or check KMSENV_ROOT_KEY_FILE",
        )
    return 0


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in counts.items())


def _export(args: argparse.Namespace) -> int:
    from kmsenv.kms.store_io import export_store

    counts = export_store(_home(), args.output, store=args.store, force=args.force)
    print(f"kmsenv: exported {_summary(counts)} to {args.output} (no root key in it)", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace) -> int:
    from kmsenv.kms.store_io import import_store

    counts = import_store(_home(), args.file, store=args.store)
    print(f"kmsenv: imported {_summary(counts)} from {args.file}", file=sys.stderr)
    return 0
