"""``kmsenv access-key create|list|enable|disable|delete|set-policy``: AccessKeys of the KMS server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from kmsenv.errors import InputError

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "access-key",
        help="manage the AccessKeys that sign requests to a kmsenv server",
        description="Manage AccessKeys of the KMS in KMSENV_HOME. Secrets are stored sealed under the root "
        "key and shown once, at creation. Changes reach a running server within 1 second.",
    )
    actions = parser.add_subparsers(dest="access_action", metavar="ACTION")
    actions.required = True

    create = actions.add_parser("create", help="create an AccessKey; prints its id and secret once, as JSON")
    create.add_argument("--description", default="", help="free text, up to 1024 characters")
    create.add_argument("--policy-file", type=Path, help="RAM-style policy document (JSON); default: full access")
    create.set_defaults(func=_create)

    actions.add_parser("list", help="list AccessKeys (never their secrets)").set_defaults(func=_list)
    for name, helptext, func in (
        ("enable", "let an AccessKey sign requests again", _enable),
        ("disable", "refuse requests signed by an AccessKey (Forbidden.AccessKey)", _disable),
        ("delete", "delete an AccessKey for good", _delete),
    ):
        p = actions.add_parser(name, help=helptext)
        p.add_argument("access_key_id", metavar="ACCESS_KEY_ID")
        p.set_defaults(func=func)
    setp = actions.add_parser("set-policy", help="replace (or with --full-access remove) an AccessKey's policy")
    setp.add_argument("access_key_id", metavar="ACCESS_KEY_ID")
    group = setp.add_mutually_exclusive_group(required=True)
    group.add_argument("--policy-file", type=Path)
    group.add_argument("--full-access", action="store_true")
    setp.set_defaults(func=_set_policy)


def _read_policy(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"cannot read policy file {path}: {exc.__class__.__name__}") from None


def _print(value: object) -> int:
    json.dump(value, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0


def _with_keys(func: Any) -> Any:
    from kmsenv.kms.access import AccessKeys
    from kmsenv.kms.service import open_service

    service = open_service()
    try:
        return func(AccessKeys(service))
    finally:
        service.close()


def _create(args: argparse.Namespace) -> int:
    policy = _read_policy(args.policy_file)
    return _print(_with_keys(lambda keys: keys.create(description=args.description, policy=policy)))


def _list(args: argparse.Namespace) -> int:
    return _print({"AccessKeys": _with_keys(lambda keys: keys.list())})


def _enable(args: argparse.Namespace) -> int:
    return _print(_with_keys(lambda keys: keys.set_active(args.access_key_id, True)))


def _disable(args: argparse.Namespace) -> int:
    return _print(_with_keys(lambda keys: keys.set_active(args.access_key_id, False)))


def _delete(args: argparse.Namespace) -> int:
    _with_keys(lambda keys: keys.delete(args.access_key_id))
    return _print({"AccessKeyId": args.access_key_id, "Deleted": True})


def _set_policy(args: argparse.Namespace) -> int:
    policy = None if args.full_access else _read_policy(args.policy_file)
    return _print(_with_keys(lambda keys: keys.set_policy(args.access_key_id, policy)))
