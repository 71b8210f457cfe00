"""The ``kmsenv`` command line: argument parsing, messages and exit codes, nothing else.

Each command group lives in its own module with a ``register(subparsers)`` function; command
bodies import the heavy machinery (crypto, store, SDKs) only when they run, so ``kmsenv --help``
stays fast. Every :class:`~kmsenv.errors.KmsenvError` becomes one ``kmsenv: error: ...`` line,
an optional ``kmsenv: hint: ...`` line, and the exit code of its class (see ``kmsenv.errors``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from kmsenv.cli import access, agent, audit, files, kms, server, store

__all__ = ["main"]

PROG = "kmsenv"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The whole command line. The ~25 ``kms`` Action parsers are built only when the command is
    ``kms`` (they would cost a short command like ``encrypt`` of a small file a third of its time)."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Alibaba Cloud KMS-compatible key management and envelope encryption of local files.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    words = list(sys.argv[1:] if argv is None else argv)
    kms.register(sub, with_actions=bool(words) and words[0] == "kms")
    files.register(sub)
    access.register(sub)
    server.register(sub)
    audit.register(sub)
    store.register(sub)
    agent.register(sub)
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
