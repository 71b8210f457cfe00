"""``kmsenv agent start|stop|status|flush``: run and control the key agent (docs/agent.md).

Presentation only: options → :class:`kmsenv._agent.AgentServer` (start) or one request through
:class:`kmsenv._agent.AgentKms` (the others). ``start`` detaches by default, ssh-agent style: it
runs ``kmsenv agent start --foreground`` as a new session, waits until the socket is listening,
and prints ``export KMSENV_AGENT_SOCK=...`` for ``eval``. ``--foreground`` is for service managers
and tests. The agent module and the KMS are imported only when a subcommand runs.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

from kmsenv.cli._kms_options import add_kms_options, is_remote, open_kms
from kmsenv.cli.files import _age
from kmsenv.errors import ConfigError

__all__ = ["register"]

#: How long ``start`` waits for a detached agent to listen (opening a KMS home can take a moment).
START_TIMEOUT = 60.0
#: How long ``stop`` waits for the socket to disappear after the agent acknowledged.
STOP_TIMEOUT = 10.0


def _socket_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="the agent's socket (default: KMSENV_AGENT_SOCK, else $XDG_RUNTIME_DIR/kmsenv/agent.sock, "
        "else /tmp/kmsenv-UID/agent.sock)",
    )


def register(sub: argparse._SubParsersAction[Any]) -> None:
    agent = sub.add_parser(
        "agent",
        help="keep unwrapped data keys in memory so many file commands share one KMS call",
        description="The key agent holds data keys the KMS unwrapped or generated, for a bounded time, and "
        "serves them to your own kmsenv encrypt/decrypt/rewrap/migrate commands over a private Unix socket "
        "(used when KMSENV_AGENT_SOCK is set, or with --agent). See docs/agent.md.",
    )
    actions = agent.add_subparsers(dest="agent_action", metavar="ACTION")
    actions.required = True

    start = actions.add_parser(
        "start",
        help="start an agent (detached; prints the export line for eval)",
        description='Start an agent for the KMS chosen by the options below; eval "$(kmsenv agent start)" '
        "sets KMSENV_AGENT_SOCK in your shell.",
    )
    _socket_option(start)
    start.add_argument("--foreground", action="store_true", help="serve in this process until stopped")
    start.add_argument("--ready-fd", type=int, help=argparse.SUPPRESS)  # set by a detaching parent
    limits = start.add_argument_group("limits", "Each must be positive. A key is wiped at the first limit reached.")
    limits.add_argument("--ttl", type=_age, metavar="T", help="seconds a key is held, or 90s, 5m, 1h (default 5m)")
    limits.add_argument("--max-uses", type=int, metavar="N", help="requests served per key (default 10000)")
    limits.add_argument("--max-keys", type=int, metavar="N", help="keys held at once (default 1000)")
    add_kms_options(start)
    start.set_defaults(func=_start)

    for name, text, func in (
        ("stop", "wipe every key and stop the agent", _stop),
        ("status", "print the agent's state as JSON (limits, keys held, KMS calls made)", _status),
        ("flush", "wipe every key now; the agent keeps running", _flush),
    ):
        p = actions.add_parser(name, help=text, description=text[0].upper() + text[1:] + ".")
        _socket_option(p)
        p.set_defaults(func=func)


def _socket_path(args: argparse.Namespace) -> Path:
    from kmsenv._agent import default_socket_path

    return Path(args.socket) if args.socket else default_socket_path()


def _limits(args: argparse.Namespace) -> Any:
    from kmsenv._agent import DEFAULT_MAX_KEYS, DEFAULT_MAX_USES, DEFAULT_TTL, AgentLimits

    return AgentLimits(
        ttl=DEFAULT_TTL if args.ttl is None else args.ttl,
        max_uses=DEFAULT_MAX_USES if args.max_uses is None else args.max_uses,
        max_keys=DEFAULT_MAX_KEYS if args.max_keys is None else args.max_keys,
    )


def _describe(args: argparse.Namespace) -> str:
    if is_remote(args):
        parts = [
            f"{k}={v}"
            for k, v in (("endpoint", args.endpoint), ("region", args.region), ("profile", args.profile))
            if v
        ]
        return "remote " + " ".join(parts)
    from kmsenv.kms.service import default_home

    return f"embedded KMSENV_HOME={default_home()}"


def _export_line(path: Path) -> str:
    import shlex

    return f"export KMSENV_AGENT_SOCK={shlex.quote(str(path))}"


def _start(args: argparse.Namespace) -> int:
    from kmsenv._agent import _check_path_length

    path = _socket_path(args).absolute()
    _check_path_length(path)
    limits = _limits(args)  # validated here, before anything detaches
    if not args.foreground:
        if not is_remote(args):
            # Open (and on first use create) the embedded KMS here, where the user sees its
            # messages ("back up the root key") and errors; the detached agent's stderr goes nowhere.
            open_kms(args).close()
        return _detach(args, path)
    from kmsenv._agent import AgentServer, run_agent

    ready_fd = args.ready_fd
    try:
        kms = open_kms(args)
        server = AgentServer(kms, path, limits=limits, describe=_describe(args))

        def ready() -> None:
            print(_export_line(path), flush=True)
            if ready_fd is not None:
                os.write(ready_fd, f"ok {os.getpid()}\n".encode())
                os.close(ready_fd)

        try:
            run_agent(server, ready=ready)
        finally:
            kms.close()
    except Exception as exc:
        if ready_fd is not None:
            from kmsenv.errors import KmsenvError

            text = exc.message if isinstance(exc, KmsenvError) else f"{type(exc).__name__}: {exc}"
            hint = exc.hint if isinstance(exc, KmsenvError) else None
            with contextlib.suppress(OSError):
                os.write(ready_fd, json.dumps({"message": text, "hint": hint}).encode() + b"\n")
        raise
    return 0


def _detach(args: argparse.Namespace, path: Path) -> int:
    """Run the agent as a new session in the background; return once it listens (or failed)."""
    import subprocess

    argv = [sys.executable, "-m", "kmsenv", "agent", "start", "--foreground", "--socket", str(path)]
    for option, value in (
        ("--ttl", args.ttl),
        ("--max-uses", args.max_uses),
        ("--max-keys", args.max_keys),
        ("--endpoint", args.endpoint),
        ("--profile", args.profile),
        ("--region", args.region),
    ):
        if value is not None:
            argv += [option, str(value)]
    if args.insecure_http:
        argv.append("--insecure-http")
    read_end, write_end = os.pipe()
    argv += ["--ready-fd", str(write_end)]
    env = {k: v for k, v in os.environ.items() if k != "KMSENV_AGENT_SOCK"}
    try:
        child = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(write_end,),
            start_new_session=True,  # survives the shell that started it, like ssh-agent
            env=env,
            cwd="/",
        )
    finally:
        os.close(write_end)
    with os.fdopen(read_end, "rb") as ready:
        answer = _read_ready(ready.fileno(), START_TIMEOUT)
    if answer.startswith(b"ok "):
        print(_export_line(path))
        print(f"kmsenv: note: agent pid {child.pid} listening on {path}", file=sys.stderr)
        return 0
    if child.poll() is None and not answer:
        raise ConfigError(f"the agent did not start listening within {START_TIMEOUT:.0f} s (pid {child.pid})")
    try:
        failure = json.loads(answer.decode("utf-8", "replace"))
        raise ConfigError(f"the agent did not start: {failure['message']}", hint=failure.get("hint"))
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"the agent did not start (exit code {child.wait()})") from None


def _read_ready(fd: int, timeout: float) -> bytes:
    """What the child wrote on its ready pipe, up to its first newline or end of file."""
    import select

    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select([fd], [], [], left)
        if not readable:
            break
        chunk = os.read(fd, 4096)
        if not chunk:
            break
        data += chunk
    return data


def _client(args: argparse.Namespace) -> Any:
    from kmsenv._agent import AgentKms

    return AgentKms(_socket_path(args))


def _stop(args: argparse.Namespace) -> int:
    client = _client(args)
    result = client.stop()
    deadline = time.monotonic() + STOP_TIMEOUT
    while client.socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    print(
        f"kmsenv: note: agent pid {result.get('pid')} stopped; {result.get('wiped', 0)} key(s) wiped", file=sys.stderr
    )
    return 0


def _status(args: argparse.Namespace) -> int:
    json.dump(_client(args).status(), sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


def _flush(args: argparse.Namespace) -> int:
    print(f"kmsenv: note: {_client(args).flush()} key(s) wiped", file=sys.stderr)
    return 0
