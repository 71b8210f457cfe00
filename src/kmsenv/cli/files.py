"""``kmsenv encrypt`` / ``decrypt`` / ``inspect`` / ``migrate``: envelope encryption of files.

Presentation only: this module parses arguments, picks default output names, maps ``-`` to
stdin/stdout and prints ``inspect``; the work is :mod:`kmsenv.envelope`. Heavy imports (the
envelope layer pulls in ``cryptography``; the KMS pulls in SQLite or an SDK) happen inside the
command functions, so ``kmsenv --help`` stays fast. The KMS is opened lazily, on the first call
the envelope layer makes, so a missing input or an existing output is reported without opening
(or creating) a KMS home.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from kmsenv.cli._kms_options import add_kms_options, open_kms
from kmsenv.clients import _ActionKms  # light: the KMS behind it is imported only when opened
from kmsenv.errors import KmsenvError, OutputError, UsageError

if TYPE_CHECKING:
    from kmsenv.clients import AlibabaKms, EmbeddedKms, Kms
    from kmsenv.envelope import DecryptResult

__all__ = ["default_decrypt_output", "default_encrypt_output", "default_migrate_output", "parse_context", "register"]

CIPHER_SUFFIX = ".cipher"
DECRYPTED_SUFFIX = ".decrypted"
STDIO = "-"
_SIZE_UNITS = {"": 1, "k": 1024, "kib": 1024, "m": 1024 * 1024, "mib": 1024 * 1024}


# ------------------------------------------------------------------------------ names --


def default_encrypt_output(input_name: str) -> str:
    """``INPUT.cipher`` as in the reference document; stdout for stdin."""
    return STDIO if input_name == STDIO else input_name + CIPHER_SUFFIX


def default_decrypt_output(input_name: str) -> str:
    """``INPUT`` without ``.cipher``; ``INPUT.decrypted`` when there is no such suffix; stdout for stdin."""
    if input_name == STDIO:
        return STDIO
    stem = input_name[: -len(CIPHER_SUFFIX)]
    if input_name.endswith(CIPHER_SUFFIX) and stem and not stem.endswith("/"):
        return stem
    return input_name + DECRYPTED_SUFFIX


def default_migrate_output(input_name: str) -> str:
    """``sales.csv.cipher`` → ``sales.csv.v1.cipher``; other names get ``.v1.cipher`` appended."""
    if input_name.endswith(CIPHER_SUFFIX) and len(input_name) > len(CIPHER_SUFFIX):
        return input_name[: -len(CIPHER_SUFFIX)] + ".v1" + CIPHER_SUFFIX
    return input_name + ".v1" + CIPHER_SUFFIX


# ---------------------------------------------------------------------------- options --


def parse_context(pairs: list[str] | None) -> dict[str, str]:
    """``["k=v", ...]`` → ``{"k": "v"}``; UsageError for a pair without ``=``, an empty key, or
    one key given two different values."""
    context: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--context takes KEY=VALUE, not {pair!r}", hint="e.g. --context project=apollo")
        if context.get(key, value) != value:
            raise UsageError(f"--context gives {key!r} two different values")
        context[key] = value
    return context


def _chunk_size(text: str) -> int:
    """argparse type for --chunk-size: bytes, or with a K/KiB/M/MiB suffix."""
    lowered = text.strip().lower()
    digits = lowered.rstrip("kmib")
    unit = lowered[len(digits) :]
    if not digits.isdigit() or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 65536, 64K or 1M)")
    return int(digits) * _SIZE_UNITS[unit]


def _add_context(parser: argparse.ArgumentParser, help_text: str) -> None:
    parser.add_argument("--context", action="append", metavar="KEY=VALUE", help=help_text + " (repeatable)")


def _add_output(parser: argparse.ArgumentParser, default_text: str) -> None:
    parser.add_argument(
        "-o", "--output", metavar="OUTPUT", help=f"output file, '-' for stdout (default: {default_text})"
    )
    parser.add_argument("-f", "--force", action="store_true", help="replace OUTPUT if it exists")


def _add_key_selection(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--key-id",
        action="append",
        metavar="KEY",
        help="try only the wrapped keys under this CMK (key id or key ARN, not an alias); repeatable. "
        "Without --key-id every wrapped key of this KMS is tried, in order",
    )
    parser.add_argument(
        "--discovery",
        action="store_true",
        help="with --key-id: after the named keys, also try the file's other wrapped keys",
    )


def _add_reporting(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help="say on stderr which wrapped key worked")
    parser.add_argument(
        "--metadata-output",
        metavar="FILE",
        help="write one JSON line per file (input, output, keys, context, sizes, outcome) to FILE, '-' for stdout",
    )


def register(sub: argparse._SubParsersAction[Any]) -> None:
    p = sub.add_parser(
        "encrypt",
        help="encrypt a file with a new data key from the KMS (envelope encryption)",
        description="Encrypt INPUT with a fresh data key from GenerateDataKey under --key-id, in the "
        "streaming kmsenv v1 format. The output appears only when complete; an existing one is "
        "kept unless --force.",
    )
    p.add_argument("input", metavar="INPUT", help="file to encrypt, '-' for stdin")
    p.add_argument(
        "--key-id",
        required=True,
        action="append",
        metavar="KEY",
        help="CMK: key id, key ARN, alias (alias/...) or alias ARN; repeat to wrap the data key under several "
        "CMKs (GenerateDataKey under the first, Encrypt under each other; any one decrypts)",
    )
    _add_context(p, "encryption context pair bound to the file (stored in its header in the clear)")
    _add_output(p, "INPUT.cipher; stdout for stdin")
    p.add_argument(
        "--chunk-size",
        type=_chunk_size,
        default=None,
        metavar="N",
        help="plaintext bytes per chunk: a power of two from 4K to 16M (default 1M)",
    )
    add_kms_options(p)
    p.set_defaults(func=_encrypt)

    p = sub.add_parser(
        "decrypt",
        help="decrypt a kmsenv file (or a reference-sample 4-line file)",
        description="Decrypt INPUT (format v1, or the reference sample's legacy 4-line file). Output "
        "is created mode 0600 and only after every byte authenticated; with OUTPUT '-' each chunk "
        "is written once verified, and a later failure exits non-zero after those chunks.",
    )
    p.add_argument("input", metavar="INPUT", help="file to decrypt, '-' for stdin")
    _add_context(p, "pair that must be in the file's encryption context, else exit 8")
    _add_output(p, "INPUT without .cipher, or INPUT.decrypted; stdout for stdin")
    _add_key_selection(p)
    _add_reporting(p)
    add_kms_options(p)
    p.set_defaults(func=_decrypt)

    p = sub.add_parser(
        "inspect",
        help="show a file's header: format, key ARNs, context, sizes (no KMS, no key)",
        description="Print what FILE's header says without any KMS call or key. Nothing shown is "
        "authenticated: only decrypt verifies a file.",
    )
    p.add_argument("file", metavar="FILE", help="kmsenv v1 or legacy file")
    p.add_argument("--json", action="store_true", help="print the facts as JSON")
    p.set_defaults(func=_inspect)

    p = sub.add_parser(
        "migrate",
        help="rewrite a reference-sample legacy file as a kmsenv v1 file",
        description="Decrypt the legacy 4-line AES-EAX file LEGACY and encrypt its content into the "
        "v1 format under a new data key. LEGACY is left as it is.",
    )
    p.add_argument("input", metavar="LEGACY", help="legacy file (whole-file format: read into memory)")
    p.add_argument("--key-id", help="CMK for the new file (default: the CMK that wrapped the legacy data key)")
    _add_context(p, "encryption context pair for the new file")
    _add_output(p, "LEGACY with .cipher → .v1.cipher")
    add_kms_options(p)
    p.set_defaults(func=_migrate)


# ------------------------------------------------------------------------------- kms --


class _LazyKms(_ActionKms):
    """The KMS the options name, opened on its first Action.

    Every input, output, format and context check runs before the envelope layer calls the
    KMS, so a command that fails early never opens, or creates, a KMS home. The ``Kms`` calls
    themselves come from :class:`~kmsenv.clients._ActionKms`, written once in terms of Actions.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self._args = args
        self._kms: EmbeddedKms | AlibabaKms | None = None

    def _get(self) -> EmbeddedKms | AlibabaKms:
        if self._kms is None:
            self._kms = open_kms(self._args)
        return self._kms

    def close(self) -> None:
        if self._kms is not None:
            self._kms.close()

    def call(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        return self._get().call(action, params)

    def _key_arn(self, key_id: str) -> str:
        return self._get()._key_arn(key_id)


@contextmanager
def kms_from_args(args: argparse.Namespace) -> Iterator[Kms]:
    """The one place a file command gets its KMS: embedded by default, remote with --endpoint."""
    kms = _LazyKms(args)
    try:
        yield kms
    finally:
        kms.close()


# ------------------------------------------------------------------------------ stdio --


@contextmanager
def _source(name: str) -> Iterator[BinaryIO]:
    if name == STDIO:
        yield sys.stdin.buffer
        return
    from kmsenv.envelope import open_input

    with open_input(name) as (f, _):
        yield f


def _sink(name: str, *, force: bool, mode: int | None, binary: bool) -> AbstractContextManager[BinaryIO]:
    """Context manager for an output: stdout for ``-`` (not atomic), else an AtomicOutput."""
    if name == STDIO:
        if binary and sys.stdout.isatty():
            raise UsageError("refusing to write ciphertext to a terminal", hint="pass -o FILE or redirect stdout")
        return nullcontext(sys.stdout.buffer)
    from kmsenv._atomic import AtomicOutput

    return AtomicOutput(name, force=force, mode=mode)


def _flush_stdout(name: str) -> None:
    if name == STDIO:
        sys.stdout.buffer.flush()


# --------------------------------------------------------------------------- commands --


def _encrypt(args: argparse.Namespace) -> int:
    from kmsenv import envelope
    from kmsenv.format import DEFAULT_CHUNK_SIZE

    context = parse_context(args.context)
    output = args.output or default_encrypt_output(args.input)
    chunk_size = args.chunk_size or DEFAULT_CHUNK_SIZE
    options: dict[str, Any] = {"key_id": args.key_id, "context": context, "chunk_size": chunk_size}
    with kms_from_args(args) as kms:
        if STDIO not in (args.input, output):
            envelope.encrypt_file(args.input, output, kms=kms, force=args.force, **options)
            return 0
        with _source(args.input) as src, _sink(output, force=args.force, mode=None, binary=True) as dst:
            envelope.encrypt_stream(src, dst, kms=kms, **options)
        _flush_stdout(output)
    return 0


def _decrypt(args: argparse.Namespace) -> int:
    from kmsenv import envelope
    from kmsenv._atomic import PRIVATE_MODE

    context = parse_context(args.context)
    output = args.output or default_decrypt_output(args.input)
    options: dict[str, Any] = {"context": context, "key_ids": args.key_id, "discovery": args.discovery}
    with _metadata(args.metadata_output, output) as meta, kms_from_args(args) as kms:
        record: dict[str, Any] = {"input": args.input, "output": output, "operation": "decrypt"}
        try:
            if STDIO not in (args.input, output):
                result = envelope.decrypt_file_result(args.input, output, kms=kms, force=args.force, **options)
            else:
                with (
                    _source(args.input) as src,
                    _sink(output, force=args.force, mode=PRIVATE_MODE, binary=False) as dst,
                ):
                    result = envelope.decrypt_stream_result(src, dst, kms=kms, **options)
                _flush_stdout(output)
        except KmsenvError as exc:
            meta.write({**record, **failure_fields(exc)})
            raise
        meta.write({**record, "outcome": "ok", **result.as_dict()})
        if args.verbose:
            note(f"{_show(args.input)}: {describe_key(result)}")
    return 0


def describe_key(result: DecryptResult) -> str:
    """Which key decrypted a file, for ``--verbose``."""
    if result.stanza is None:
        return f"decrypted with key {result.key_id} (legacy file)"
    total = len(result.outcomes)
    return f"decrypted with wrapped key #{result.stanza} of {total}: {_show(result.key_arn or result.key_id)}"


def note(text: str) -> None:
    print(f"kmsenv: note: {text}", file=sys.stderr)


def failure_fields(exc: KmsenvError) -> dict[str, Any]:
    """The ``--metadata-output`` fields of a failed file: outcome, error class, code, message."""
    error: dict[str, Any] = {"class": type(exc).__name__, "exit_code": exc.exit_code, "message": exc.message}
    code = getattr(exc, "code", None)
    if code is not None:
        error["code"] = code
    return {"outcome": "failed", "error": error}


class MetadataWriter:
    """``--metadata-output``: one JSON object per line, flushed per line; thread-safe."""

    def __init__(self, stream: TextIO | None) -> None:
        import threading

        self._stream = stream
        self._lock = threading.Lock()

    def write(self, record: Mapping[str, Any]) -> None:
        if self._stream is None:
            return
        line = json.dumps(record, ensure_ascii=False, sort_keys=True)
        with self._lock:
            self._stream.write(line + "\n")
            self._stream.flush()


@contextmanager
def _metadata(target: str | None, *outputs: str) -> Iterator[MetadataWriter]:
    """The metadata writer for ``--metadata-output`` (a no-op without it)."""
    if target is None:
        yield MetadataWriter(None)
        return
    if target == STDIO:
        if STDIO in outputs:
            raise UsageError("--metadata-output - and output - would mix on stdout", hint="write one of them to a file")
        yield MetadataWriter(sys.stdout)
        return
    try:
        stream = open(target, "w", encoding="utf-8")  # noqa: SIM115 - closed below
    except OSError as exc:
        raise OutputError(f"cannot write the metadata file {target}: {exc.strerror or exc}") from None
    with stream:
        yield MetadataWriter(stream)


def _migrate(args: argparse.Namespace) -> int:
    from kmsenv import envelope

    if STDIO in (args.input, args.output):
        raise UsageError("migrate works on files, not stdin/stdout")
    context = parse_context(args.context)
    output = args.output or default_migrate_output(args.input)
    with kms_from_args(args) as kms:
        envelope.migrate_file(args.input, output, kms=kms, key_id=args.key_id, context=context, force=args.force)
    return 0


def _show(text: str) -> str:
    """Header text is attacker-controlled: never send raw control characters to a terminal."""
    return text if text.isprintable() else json.dumps(text)


def format_facts(name: str, facts: Mapping[str, Any]) -> str:
    """The text form of :func:`kmsenv.envelope.inspect_file`'s facts."""

    def size(key: str) -> str:
        value = facts.get(key)
        return "unknown" if value is None else f"{value} bytes"

    version = facts["format_version"]
    lines = [
        f"file:           {_show(name)}",
        f"format:         {facts['format']}" + (f" v{version}" if version else " (legacy, whole-file)"),
        f"suite:          {facts['suite']}",
    ]
    if "chunk_size" in facts:
        lines.append(f"chunk size:     {facts['chunk_size']} bytes")
        lines.append(f"header size:    {facts['header_size']} bytes")
    lines.append(f"file size:      {size('file_size')}")
    lines.append(f"payload size:   {size('payload_size')}")
    plaintext = size("plaintext_size")
    if facts.get("chunks"):
        plaintext += f" in {facts['chunks']} chunk(s)"
    lines.append(f"plaintext size: {plaintext}")
    if facts.get("problem"):
        lines.append(f"problem:        {facts['problem']}")
    context = facts["context"]
    shown = ", ".join(f"{_show(k)}={_show(v)}" for k, v in context.items()) if context else "(none)"
    lines.append(f"context:        {shown}")
    for i, key in enumerate(facts["wrapped_keys"], 1):
        arn = _show(key["key_arn"]) if key["key_arn"] else "(named only inside the blob)"
        version_id = f", version {_show(key['key_version_id'])}" if key["key_version_id"] else ""
        lines.append(
            f"wrapped key {i}:  {_show(key['provider'])} {arn}{version_id}, blob {key['blob_size']} bytes"
        )
    lines.append("note:           nothing above is authenticated; only decrypt verifies the file")
    return "\n".join(lines)


def _inspect(args: argparse.Namespace) -> int:
    from kmsenv import envelope

    facts = envelope.inspect_file(args.file)
    if args.json:
        json.dump(facts, sys.stdout, indent=2, ensure_ascii=False)
        sys.stdout.write("\n")
    else:
        print(format_facts(args.file, facts))
    return 0
