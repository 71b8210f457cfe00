"""``kmsenv kms <Action> --<Param> value ...``: every KMS Action, shaped like ``aliyun kms``.

Parameters use the API's own names and string values exactly as on the wire; the service's action
table (``kmsenv.kms.actions``) defines and validates them, so this module only builds the parser
from that table and prints the response JSON. The table module is light (no crypto, no SQL), so
building the parser keeps ``kmsenv --help`` fast.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from kmsenv.cli._kms_options import add_kms_options, open_kms

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any], *, with_actions: bool = True) -> None:
    from kmsenv.kms.actions import ACTIONS

    kms = sub.add_parser(
        "kms",
        help="call a KMS Action (CreateKey, CreateAlias, GenerateDataKey, Decrypt, ...)",
        description="Call an Alibaba Cloud KMS (2016-01-20) Action on the embedded KMS "
        "(KMSENV_HOME, default ~/.kmsenv), or with --endpoint/--profile on a kmsenv server or "
        "Alibaba Cloud KMS. Prints the response JSON; on failure prints the Alibaba error Code and "
        "Message on stderr and exits 3.",
    )
    actions = kms.add_subparsers(dest="action", metavar="ACTION", title="Actions")
    actions.required = True
    if not with_actions:  # another command runs: listing ``kms`` in the top-level help is enough
        return
    for action in ACTIONS.values():
        parser = actions.add_parser(action.name, help=action.summary, description=action.summary)
        for param in action.params:
            parser.add_argument(
                f"--{param.name}",
                dest=param.name,
                metavar=param.kind.upper() if param.kind != "str" else "VALUE",
                # Not enforced by argparse: a missing parameter is the service's MissingParameter
                # (exit 3, the Alibaba Code and Message), the same on every door.
                help=param.help + (" (required)" if param.required else ""),
            )
        add_kms_options(parser)
        parser.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    from kmsenv.kms.actions import ACTIONS

    action = ACTIONS[args.action]
    params = {p.name: getattr(args, p.name) for p in action.params if getattr(args, p.name) is not None}
    kms = open_kms(args)
    try:
        response = kms.call(action.name, params)
    finally:
        kms.close()
    json.dump(response, sys.stdout, indent=2, ensure_ascii=False)
    sys.stdout.write("\n")
    return 0
