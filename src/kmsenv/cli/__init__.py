"""The ``kmsenv`` command line: argument parsing, messages and exit codes, nothing else.

Each command group lives in its own module with a ``register(subparsers)`` function; command
bodies import the heavy machinery (crypto, store, SDKs) only when they run, so ``kmsenv --help``
stays fast. Every :class:`~kmsenv.errors.KmsenvError` becomes one ``kmsenv: error: ...`` line,
an optional ``kmsenv: hint: ...`` line, and the exit code of its class (see ``kmsenv.errors``).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

PROG = "kmsenv"

#: The command modules of ``kmsenv.cli``, in ``--help`` order.
_MODULES = ("kms", "files", "access", "server", "audit", "store", "agent")
#: Which module registers each command.
_COMMANDS = {
    "kms": "kms",
    **dict.fromkeys(("encrypt", "decrypt", "rewrap", "inspect", "migrate"), "files"),
    "access-key": "access",
    "server": "server",
    "audit": "audit",
    "store": "store",
    "agent": "agent",
}


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The command line. A run of a known command imports and builds only its own module's
    parsers: the others (and their imports, e.g. ``logging``) cost ``kmsenv encrypt`` ~1 MiB of
    peak RSS (docs/performance.md, "Peers"). ``--help``, no command or an unknown one build them
    all, so help and "invalid choice" list every command. The ~25 ``kms`` Action parsers are built
    only when the command is ``kms``."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Alibaba Cloud KMS-compatible key management and envelope encryption of local files.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    words = list(sys.argv[1:] if argv is None else argv)
    command = words[0] if words else ""
    for name in (_COMMANDS[command],) if command in _COMMANDS else _MODULES:
        module = importlib.import_module(f"kmsenv.cli.{name}")
        if name == "kms":
            module.register(sub, with_actions=command == "kms")
        else:
            module.register(sub)
    return parser


def fail(message: str, *, hint: str | None = None) -> None:
    """Print an error (and hint) the one way kmsenv prints errors."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    if hint:
        print(f"{PROG}: hint: {hint}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    from kmsenv.errors import KmsenvError

    parser = build_parser(argv)
    args = parser.parse_args(argv)
    try:
        rc: int = args.func(args)
    except KmsenvError as exc:
        fail(exc.message if not hasattr(exc, "code") else str(exc), hint=exc.hint)
        return exc.exit_code
    except KeyboardInterrupt:
        fail("interrupted")
        return 130
    except BrokenPipeError:
        # stdout closed early (``| head``): not an error worth a traceback.
        return 141
    return rc


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
