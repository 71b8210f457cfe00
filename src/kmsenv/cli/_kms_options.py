"""Which KMS a command talks to: the embedded one (default), a remote one (``--endpoint``/``--profile``),
or the key agent serving the file commands (``KMSENV_AGENT_SOCK`` / ``--agent``).

Every command that needs a KMS adds these options with :func:`add_kms_options` and gets its KMS
from :func:`open_kms`, so ``kmsenv kms``, ``encrypt`` and ``decrypt`` choose a KMS the same way.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kmsenv.clients import _ActionKms

__all__ = ["AGENT_COMMANDS", "add_kms_options", "agent_socket", "is_remote", "open_kms"]

#: Commands whose KMS calls may go through the agent. ``kmsenv kms`` is not one: a raw Action must
#: return what the KMS returns (a fresh GenerateDataKey every time), and ``kmsenv agent`` itself
#: must never talk to an agent.
AGENT_COMMANDS = frozenset({"encrypt", "decrypt", "rewrap", "migrate"})


def add_kms_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "KMS selection",
        "Default: the embedded KMS in KMSENV_HOME. With --endpoint, --profile or --region: a kmsenv server or "
        "Alibaba Cloud KMS through the official SDK and the standard Alibaba credential chain "
        "(ALIBABA_CLOUD_ACCESS_KEY_ID/_SECRET, ~/.aliyun/config.json profiles, STS, RAM roles).",
    )
    group.add_argument("--endpoint", help="host:port of a kmsenv server, or kms.<region>.aliyuncs.com")
    group.add_argument("--insecure-http", action="store_true", help="plain http (loopback endpoints only)")
    group.add_argument("--profile", help="profile in ~/.aliyun/config.json for credentials")
    group.add_argument("--region", help="region id; alone, it selects Alibaba Cloud KMS kms.<region>.aliyuncs.com")
    # The agent options belong to the file commands only; their parsers are "kmsenv <command>".
    words = parser.prog.split()
    if len(words) < 2 or words[1] not in AGENT_COMMANDS:
        return
    agent = group.add_mutually_exclusive_group()
    agent.add_argument(
        "--agent",
        action="store_true",
        default=None,
        help="use the key agent (KMSENV_AGENT_SOCK, else the default socket); used anyway when "
        "KMSENV_AGENT_SOCK is set, unless a KMS option is given (see docs/agent.md)",
    )
    agent.add_argument("--no-agent", dest="agent", action="store_false", help="ignore KMSENV_AGENT_SOCK")


def is_remote(args: argparse.Namespace) -> bool:
    # --region alone means Alibaba Cloud KMS in that region (kms.<region>.aliyuncs.com): the
    # embedded KMS has its region fixed at creation, so the option has no other meaning.
    return bool(args.endpoint or args.profile or args.region)


def agent_socket(args: argparse.Namespace) -> str | None:
    """The agent socket this command should use, or None for the KMS itself.

    ``--agent`` always (a usage error with KMS options: the agent's KMS was chosen when it started);
    ``--no-agent`` never; otherwise a non-empty ``KMSENV_AGENT_SOCK`` unless the command names a
    KMS explicitly (the command line wins over the environment). Off unless asked for.
    """
    import os

    if getattr(args, "command", None) not in AGENT_COMMANDS:
        if getattr(args, "agent", None):
            from kmsenv.errors import UsageError

            raise UsageError("--agent serves the file commands (encrypt, decrypt, rewrap, migrate) only")
        return None
    wanted = getattr(args, "agent", None)
    if wanted is False:
        return None
    if wanted:
        if is_remote(args):
            from kmsenv.errors import UsageError

            raise UsageError(
                "--agent cannot be combined with --endpoint, --profile or --region",
                hint="the agent talks to the KMS chosen when it was started (kmsenv agent status shows it)",
            )
        from kmsenv._agent import default_socket_path

        return str(default_socket_path())
    named = os.environ.get("KMSENV_AGENT_SOCK", "")
    return named if named and not is_remote(args) else None


def open_kms(args: argparse.Namespace) -> _ActionKms:
    """The KMS the options name; callers ``close()`` it when done."""
    sock = agent_socket(args)
    if sock is not None:
        from kmsenv._agent import AgentKms

        return AgentKms(sock)
    if is_remote(args):
        from kmsenv.clients import AlibabaKms

        return AlibabaKms(args.endpoint, region=args.region, profile=args.profile, insecure_http=args.insecure_http)
    from kmsenv.clients import EmbeddedKms

    return EmbeddedKms()
