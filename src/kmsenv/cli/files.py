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
import contextlib
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, Any, BinaryIO, TextIO

from kmsenv.cli._kms_options import add_kms_options, open_kms
from kmsenv.clients import _ActionKms  # light: the KMS behind it is imported only when opened
from kmsenv.errors import KmsenvError, OutputError, UsageError

if TYPE_CHECKING:
    from kmsenv._cache import DataKeyCache
    from kmsenv._tree import TreeItem
    from kmsenv.clients import Kms
    from kmsenv.envelope import DecryptResult

__all__ = ["default_decrypt_output", "default_encrypt_output", "default_migrate_output", "parse_context", "register"]

CIPHER_SUFFIX = ".cipher"
DECRYPTED_SUFFIX = ".decrypted"
STDIO = "-"
#: ``-r`` without ``--jobs``: files at once, per CPU, at least 2 and at most 4. On the 2-CPU test
#: machine 2 workers beat 4 (interleaved, 2,000 x 4 KiB: encrypt -r 0.80 vs 0.85 s, decrypt -r
#: 0.90 vs 1.08 s, medians; docs/scale.md): the per-file work holds the GIL, so workers beyond
#: the CPUs only add hand-offs, while a second one overlaps the kernel's share of the first's.
DEFAULT_JOBS = max(2, min(4, os.cpu_count() or 2))
_SIZE_UNITS = {
    "": 1,
    **{unit: 1 << (10 * power) for power, letter in enumerate("kmgt", 1) for unit in (letter, letter + "ib")},
}
_AGE_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}


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


def _size(text: str) -> int:
    """argparse type for sizes: bytes, or with a K/KiB/M/MiB/G/GiB/T/TiB suffix (powers of 1024)."""
    lowered = text.strip().lower()
    digits = lowered.rstrip("kmgtib")
    unit = lowered[len(digits) :]
    if not digits.isdigit() or unit not in _SIZE_UNITS:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 65536, 64K, 1M or 64G)")
    return int(digits) * _SIZE_UNITS[unit]


def _age(text: str) -> float:
    """argparse type for --cache-max-age: seconds, or with an s/m/h suffix."""
    lowered = text.strip().lower()
    number = lowered.rstrip("smh")
    unit = lowered[len(number) :]
    try:
        value = float(number)
    except ValueError:
        value = float("nan")
    if value != value or unit not in _AGE_UNITS:  # noqa: PLR0124 - NaN check
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (use e.g. 300, 90s, 5m or 1h)")
    return value * _AGE_UNITS[unit]


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


def _jobs(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 256:
        raise argparse.ArgumentTypeError(f"not a number of jobs from 1 to 256: {text!r}")
    return int(text)


def _add_tree_options(parser: argparse.ArgumentParser, recursive: str) -> None:
    group = parser.add_argument_group("folders")
    group.add_argument("-r", "--recursive", action="store_true", help=recursive + " (mirrored tree)")
    group.add_argument(
        "-j",
        "--jobs",
        type=_jobs,
        default=None,
        metavar="N",
        help=f"with -r: files at once (default: CPUs, 2 to 4: {DEFAULT_JOBS} here); on one regular file: "
        "N >= 2 threads work on its chunk ranges, 1 one thread (default: the streaming engine); stdin always streams",
    )
    group.add_argument(
        "--progress", action="store_true", help="with -r: a status line on stderr, redrawn as files finish"
    )


def _add_cache_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "data-key cache",
        "Within one run over many files (-r), one data key serves several files up to these limits, "
        "whichever comes first; each file still gets its own key by HKDF with a random salt. Each limit must be "
        "positive; --no-cache gives every file its own data key.",
    )
    group.add_argument("--no-cache", action="store_true", help="one GenerateDataKey per file")
    group.add_argument(
        "--cache-max-age",
        type=_age,
        default=None,
        metavar="T",
        help="seconds (or 90s, 5m, 1h) a data key is used (default 5m)",
    )
    group.add_argument(
        "--cache-max-files", type=int, default=None, metavar="N", help="files per data key (default 10000)"
    )
    group.add_argument(
        "--cache-max-bytes", type=_size, default=None, metavar="SIZE", help="plaintext bytes per data key (default 64G)"
    )


def cache_from_args(args: argparse.Namespace) -> DataKeyCache | None:
    """The data-key cache the options describe; UsageError for a limit that is not positive."""
    from kmsenv._cache import DEFAULT_MAX_AGE, DEFAULT_MAX_BYTES, DEFAULT_MAX_FILES, DataKeyCache

    def pick(value: Any, default: Any) -> Any:
        return default if value is None else value

    # Built (so validated) even with --no-cache: a limit of 0 is a mistake worth reporting.
    cache = DataKeyCache(
        max_age=pick(args.cache_max_age, DEFAULT_MAX_AGE),
        max_files=pick(args.cache_max_files, DEFAULT_MAX_FILES),
        max_bytes=pick(args.cache_max_bytes, DEFAULT_MAX_BYTES),
    )
    return None if args.no_cache else cache


def _add_reporting(parser: argparse.ArgumentParser, verbose: str = "say on stderr which wrapped key worked") -> None:
    parser.add_argument("-v", "--verbose", action="store_true", help=verbose)
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
        type=_size,
        default=None,
        metavar="N",
        help="plaintext bytes per chunk: a power of two from 4K to 16M (default 1M)",
    )
    _add_tree_options(p, "encrypt every file below the folder INPUT into the folder -o OUTDIR, adding .cipher")
    _add_reporting(p, verbose="say on stderr what was written (and, with -r, how many data keys were made)")
    _add_cache_options(p)
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
    group = p.add_argument_group(
        "range", "Decrypt only part of the plaintext: only the chunks it covers (and the final chunk) are verified."
    )
    group.add_argument(
        "--offset", type=_size, default=None, metavar="N", help="first plaintext byte to write (K/M/G suffixes)"
    )
    group.add_argument(
        "--length", type=_size, default=None, metavar="M", help="bytes to write (default: to the end; K/M/G suffixes)"
    )
    _add_tree_options(
        p, "decrypt every *.cipher file below the folder INPUT into the folder -o OUTDIR, removing .cipher"
    )
    p.add_argument(
        "--no-cache",
        action="store_true",
        help="with -r: ask the KMS to unwrap every file's data key (default: once per wrapped key per run)",
    )
    _add_reporting(p)
    add_kms_options(p)
    p.set_defaults(func=_decrypt)

    p = sub.add_parser(
        "rewrap",
        help="add, refresh or remove a file's wrapped keys without re-encrypting its payload",
        description="Verify each FILE's header (one data key unwrapped, commitment and tag checked), then "
        "replace its wrapped keys: --key-id adds a CMK (ReEncrypt from a wrapped key that opened) or, for a CMK "
        "already in the file, re-wraps it under its current primary version; --remove-key-id drops one. Only "
        "the header changes: in place for v2 files (a header slot is written; the payload is not touched); a v1 "
        "file, or keys that outgrow the slots, is rewritten beside itself as v2 (kernel-side copy of the payload) "
        "and renamed over the original atomically, keeping its mode. A failure on one FILE is reported and the "
        "others go on.",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="kmsenv v1 or v2 file(s), changed in place")
    p.add_argument("--key-id", action="append", default=[], metavar="KEY", help="CMK to add or refresh (repeatable)")
    p.add_argument(
        "--remove-key-id",
        action="append",
        default=[],
        metavar="KEY",
        help="CMK (key id or key ARN) whose wrapped key to remove (repeatable); the last one cannot be removed",
    )
    _add_context(p, "pair that must be in the file's encryption context, else that file fails with exit 8")
    _add_reporting(p, verbose="print on stderr what changed in each file")
    add_kms_options(p)
    p.set_defaults(func=_rewrap)

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
        self._kms: _ActionKms | None = None
        self._lock = threading.Lock()  # folder runs call from several threads: open it once

    def _get(self) -> _ActionKms:
        with self._lock:
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
    options: dict[str, Any] = {
        "key_id": args.key_id,
        "context": context,
        "chunk_size": args.chunk_size or DEFAULT_CHUNK_SIZE,
        "cache": cache_from_args(args),
    }
    facts = {"key_ids": list(args.key_id), "context": context}
    if args.recursive:

        def encrypt_one(kms: Kms, src: str, dst: str, threads: int | None) -> dict[str, Any]:
            n = envelope.encrypt_file(src, dst, kms=kms, force=args.force, threads=threads, **options)
            if args.verbose:
                note(f"{_show(src)} -> {_show(dst)}")
            return {**facts, "plaintext_size": n, "output_size": None}  # set when it lands

        return _run_tree(args, encrypt_one, decrypt=False, cache=options["cache"])
    output = args.output or default_encrypt_output(args.input)
    with _metadata(args.metadata_output, output) as meta, kms_from_args(args) as kms:
        with meta.one_file("encrypt", args.input, output) as record:
            if STDIO not in (args.input, output):
                n = envelope.encrypt_file(args.input, output, kms=kms, force=args.force, threads=args.jobs, **options)
            else:
                with _source(args.input) as src, _sink(output, force=args.force, mode=None, binary=True) as dst:
                    n = envelope.encrypt_stream(src, dst, kms=kms, **options)
                _flush_stdout(output)
            record.update(facts, plaintext_size=n, output_size=_size_of(output))
        if args.verbose:
            note(f"{_show(args.input)} -> {_show(output)}")
    return 0


def _size_of(name: str) -> int | None:
    if name == STDIO:
        return None
    try:
        return os.stat(name).st_size
    except OSError:
        return None


def _decrypt(args: argparse.Namespace) -> int:
    from kmsenv import envelope
    from kmsenv._atomic import PRIVATE_MODE

    context = parse_context(args.context)
    for name in args.key_id or ():
        envelope.key_ref(name)  # an alias is a usage error once, not once per file
    options: dict[str, Any] = {"context": context, "key_ids": args.key_id, "discovery": args.discovery}
    ranged = args.offset is not None or args.length is not None
    if ranged and (args.recursive or args.input == STDIO):
        raise UsageError(
            "--offset/--length read one file at chosen places: not with -r or stdin",
            hint="decrypt the whole stream, or save it to a file first",
        )
    if args.recursive:
        # Files encrypted under one cached data key share its wrapped key: one KMS Decrypt serves
        # them all (within the cache's max age), instead of one call per file.
        unwrap_cache = None if args.no_cache else envelope.DataKeyCache()

        def decrypt_one(kms: Kms, src: str, dst: str, threads: int | None) -> dict[str, Any]:
            result = envelope.decrypt_file_result(
                src, dst, kms=kms, force=args.force, threads=threads, cache=unwrap_cache, **options
            )
            if args.verbose:
                note(f"{_show(src)}: {describe_key(result)}")
            return {**result.as_dict(), "output_size": None}  # set when it lands

        return _run_tree(args, decrypt_one, decrypt=True, cache=unwrap_cache)
    output = args.output or default_decrypt_output(args.input)
    with _metadata(args.metadata_output, output) as meta, kms_from_args(args) as kms:
        with meta.one_file("decrypt", args.input, output) as record:
            if ranged:
                sink = sys.stdout.buffer if output == STDIO else output
                n = envelope.decrypt_range(
                    args.input, sink, kms=kms, offset=args.offset or 0, length=args.length, force=args.force, **options
                )
                _flush_stdout(output)
                record.update(offset=args.offset or 0, length=n, output_size=_size_of(output))
                return 0
            if STDIO not in (args.input, output):
                result = envelope.decrypt_file_result(
                    args.input, output, kms=kms, force=args.force, threads=args.jobs, **options
                )
            else:
                with (
                    _source(args.input) as src,
                    _sink(output, force=args.force, mode=PRIVATE_MODE, binary=False) as dst,
                ):
                    result = envelope.decrypt_stream_result(src, dst, kms=kms, **options)
                _flush_stdout(output)
            record.update(result.as_dict(), output_size=_size_of(output))
        if args.verbose:
            note(f"{_show(args.input)}: {describe_key(result)}")
    return 0


#: (kms, input file, output file, stream threads) -> metadata fields; raises KmsenvError.
_FileWork = Callable[["Kms", str, str, int | None], dict[str, Any]]


def _run_tree(args: argparse.Namespace, work: _FileWork, *, decrypt: bool, cache: DataKeyCache | None) -> int:
    """``-r``: every file below INPUT into OUTDIR, ``--jobs`` at a time (see :mod:`kmsenv._tree`).

    Each worker takes a batch of up to :data:`_BATCH_FILES` files of one output folder (one
    task, not one per file: fewer hand-offs between threads, which take turns for the GIL) and
    writes each output complete but nameless (:class:`kmsenv._atomic.GroupCommit`), through one
    open descriptor of the folder; at the end of the batch it hands the batch to the group's
    commit thread, which fsyncs its files together and only then links each into place, while
    the worker goes on with the next batch. Each folder is fsynced once, at the end. A file is
    reported (``ok`` or failed) once it is in place, and the exit code is returned only after
    everything is durable.
    """
    from kmsenv._atomic import GroupCommit
    from kmsenv._tree import check_roots, plan

    if not args.output:
        raise UsageError("-r needs an output folder", hint="pass -o OUTDIR")
    if STDIO in (args.input, args.output):
        raise UsageError("-r works on folders, not stdin/stdout")
    check_roots(args.input, args.output)
    operation, verb = ("decrypt", "decrypted") if decrypt else ("encrypt", "encrypted")
    jobs = args.jobs or DEFAULT_JOBS
    # Files run side by side: the streams inside each run inline (a writer thread each would
    # only add hand-offs); a single job keeps the default engine.
    threads = None if jobs == 1 else 1
    # Batches are committed as batches (GroupCommit.batch), never because some number of files
    # waits: a batch's fsyncs run together, and no worker waits for the disk.
    group = GroupCommit(max_pending=None)
    made: set[str] = set()  # output folders known to exist: one makedirs per folder, not per file
    with _metadata(args.metadata_output) as meta, kms_from_args(args) as kms, contextlib.ExitStack() as finish:
        finish.callback(group.close)  # also after failures and Ctrl-C: finished files still land

        def task(item: TreeItem) -> Task:
            if item.skipped is not None:
                return Task.skip(item.input, item.skipped)
            if item.error is not None or item.output is None:
                return Task(item.input, None, partial(_raise, item.error or UsageError("no output")))
            return Task(item.input, item.output, partial(work, kms, item.input, item.output, threads), size=item.size)

        def run_batch(batch: list[Task]) -> _Outcomes:
            """One output folder's files, in order; the commit thread lands them (see above)."""
            folder = None if batch[0].output is None else os.path.dirname(batch[0].output)
            if folder is None:
                return _run_each(batch)
            try:
                if folder not in made:
                    _make_folder(folder, private=decrypt)
                    made.add(folder)
            except KmsenvError as exc:
                return [exc] * len(batch), None
            outcomes: list[dict[str, Any] | KmsenvError] = []
            stop: BaseException | None = None
            with group.batch(folder) as tickets:
                try:
                    for t in batch:
                        with group.deferring() as mine:
                            try:
                                facts = t.run()
                            except KmsenvError as exc:
                                outcomes.append(exc)
                                continue
                            finally:
                                tickets.extend(mine)  # a complete output lands whatever came after it
                        outcomes.append(_Landing(facts, mine) if mine else facts)
                except BaseException as exc:  # re-raised by the main thread, after the files before it
                    stop = exc
            return outcomes, stop

        items = plan(args.input, args.output, decrypt=decrypt)
        rc = run_tasks(
            (task(item) for item in items),
            meta=meta,
            operation=operation,
            verb=verb,
            jobs=jobs,
            progress=args.progress,
            window=_window(jobs),
            batch_size=_BATCH_FILES,
            batch_bytes=_BATCH_BYTES,
            runner=run_batch,
        )
    if cache is not None:
        stats = cache.stats()
        cache.clear()  # the run is over: drop the data keys now, not when the process exits
        if args.verbose and decrypt:
            note(f"{stats['unwrap_misses']} KMS Decrypt call(s) for the files' wrapped data keys")
        elif args.verbose:
            note(f"{stats['misses']} data key(s) from the KMS for {stats['hits'] + stats['misses']} file(s)")
    return rc


def _raise(exc: KmsenvError) -> dict[str, Any]:
    raise exc


#: Files per batch of a folder run (one output folder's files, one worker; see _run_tree).
#: Large enough that the per-batch costs (a task, a folder descriptor, a group of fsyncs) are
#: spread thin; small enough that 2 x jobs batches in flight stay a few hundred descriptors.
_BATCH_FILES = 64
#: ... and at most about this many input bytes: large files get a worker each, as before batches.
_BATCH_BYTES = 4 << 20


def _window(jobs: int) -> int:
    """Files a folder run may have in flight: two batches per worker, but at most half the
    process's descriptor limit (each file in flight may hold an open output until committed)."""
    try:
        import resource
    except ImportError:  # not a Unix: assume the common default limit
        budget = 512
    else:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        budget = soft // 2 if soft != resource.RLIM_INFINITY else 1 << 16
    return max(_BATCH_FILES, min(2 * jobs * _BATCH_FILES, budget))


def _land(outcome: dict[str, Any] | KmsenvError) -> dict[str, Any] | KmsenvError:
    """A task's outcome once its output is in place (the OutputError if it could not be)."""
    if isinstance(outcome, _Landing):
        try:
            return outcome.land()
        except KmsenvError as exc:
            return exc
    return outcome


class _Landing(dict[str, Any]):
    """A task's facts while its output still waits for its group commit."""

    def __init__(self, facts: Mapping[str, Any], tickets: list[Any]) -> None:
        super().__init__(facts)
        self.tickets = tickets

    def land(self) -> dict[str, Any]:
        """Wait until the output is in place (OutputError if it could not be); the final facts."""
        for ticket in self.tickets:
            ticket.wait()
        facts = dict(self)
        if "output_size" in facts:
            facts["output_size"] = self.tickets[-1].size  # the name did not exist when it was measured
        return facts


def _make_folder(folder: str, *, private: bool) -> None:
    """Create an output folder (and its parents) if missing; 0700 for plaintext trees.

    Not ``os.makedirs(mode=...)``: it gives the mode to the last folder only, so when workers
    reach ``a/b/c`` before ``a/b``, ``a/b`` of a plaintext tree would be left world-readable.
    """
    mode = 0o700 if private else 0o777
    if os.path.isdir(folder):
        return
    parent = os.path.dirname(folder)
    if parent and parent != folder:
        _make_folder(parent, private=private)
    try:
        os.mkdir(folder, mode)
    except FileExistsError:
        if not os.path.isdir(folder):
            raise OutputError(f"cannot create the output folder {folder}: a file is in the way") from None
    except OSError as exc:
        raise OutputError(f"cannot create the output folder {folder}: {exc.strerror or exc}") from None


def describe_key(result: DecryptResult) -> str:
    """Which key decrypted a file, for ``--verbose``."""
    if result.stanza is None:
        return f"decrypted with key {result.key_id} (legacy file)"
    total = len(result.outcomes)
    return f"decrypted with wrapped key #{result.stanza} of {total}: {_show(result.key_arn or result.key_id)}"


_STDERR_LOCK = threading.Lock()
_CLEAR_LINE = "\r\x1b[K"
#: Whether a --progress status line is on screen (it is erased before any other line).
_status_shown = False


def _stderr(line: str, *, status: bool = False) -> None:
    """One whole line to stderr: worker threads of a folder run must not interleave theirs.

    ``status``: a --progress line, redrawn in place (no newline) until the next line replaces it.
    """
    global _status_shown  # noqa: PLW0603 - one terminal line, shared by every writer
    with _STDERR_LOCK:
        prefix = _CLEAR_LINE if _status_shown or status else ""
        sys.stderr.write(prefix + line + ("" if status else "\n"))
        sys.stderr.flush()
        _status_shown = status


class _Progress:
    """``--progress``: a status line (files done, failed, skipped) redrawn at most 10 times a second."""

    def __init__(self, enabled: bool, verb: str) -> None:
        self.enabled = enabled
        self.verb = verb
        self._last = 0.0

    def show(self, counts: Mapping[str, int]) -> None:
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.1:
            self._last = now
            _stderr(f"kmsenv: {_summary(counts, self.verb)} ...", status=True)


def _summary(counts: Mapping[str, int], verb: str) -> str:
    return f"{counts['ok']} file(s) {verb}, {counts['failed']} failed, {counts['skipped']} skipped"


def note(text: str) -> None:
    _stderr(f"kmsenv: note: {text}")


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
        self._stream = stream
        self._lock = threading.Lock()

    @contextmanager
    def one_file(self, operation: str, input_name: str, output: str | None) -> Iterator[dict[str, Any]]:
        """The line for one file: the body adds its facts; ``ok`` if it ends cleanly, else the error."""
        record: dict[str, Any] = {"operation": operation, "input": input_name, "output": output}
        facts: dict[str, Any] = {}
        try:
            yield facts
        except KmsenvError as exc:
            self.write({**record, **failure_fields(exc)})
            raise
        self.write({**record, "outcome": "ok", **facts})

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


def _rewrap(args: argparse.Namespace) -> int:
    from kmsenv import envelope

    context = parse_context(args.context)
    for name in args.remove_key_id:
        envelope.key_ref(name)  # an alias is a usage error once, not once per file
    with _metadata(args.metadata_output) as meta, kms_from_args(args) as kms:

        def task(name: str) -> Task:
            def run() -> dict[str, Any]:
                result = envelope.rewrap_file(
                    name, kms=kms, key_ids=args.key_id, remove_key_ids=args.remove_key_id, context=context
                )
                if args.verbose:
                    changes = [
                        f"{what} {_show(arn)}"
                        for what, arns in (
                            ("added", result.added),
                            ("refreshed", result.refreshed),
                            ("removed", result.removed),
                        )
                        for arn in arns
                    ]
                    note(f"{_show(name)}: {', '.join(changes)}")
                return result.as_dict()

            return Task(name, name, run)

        return run_tasks([task(name) for name in args.files], meta=meta, operation="rewrap", verb="rewrapped")


@dataclass(frozen=True)
class Task:
    """One file of a multi-file command: its names, and the work (returns metadata fields).

    ``skipped``: a reason not to run it at all (a symbolic link, a special file). ``size``: the
    input's size if known (batches are closed by bytes as well as by files).
    """

    input: str
    output: str | None
    run: Callable[[], dict[str, Any]]
    skipped: str | None = None
    size: int = 0

    @classmethod
    def skip(cls, input_name: str, reason: str) -> Task:
        return cls(input_name, None, dict, skipped=reason)


#: What a worker returns for a batch of tasks run in order: each one's facts or KmsenvError (as
#: many as ran), and what stopped the batch early (Ctrl-C, a bug), to be raised after them.
_Outcomes = tuple[list["dict[str, Any] | KmsenvError"], BaseException | None]


def _run_each(batch: list[Task]) -> _Outcomes:
    """The plain batch runner: each task in turn; a KmsenvError is that task's outcome."""
    outcomes: list[dict[str, Any] | KmsenvError] = []
    for t in batch:
        try:
            outcomes.append(t.run())
        except KmsenvError as exc:
            outcomes.append(exc)
        except BaseException as exc:  # raised by the main thread once the earlier files are reported
            return outcomes, exc
    return outcomes, None


def run_tasks(
    tasks: Iterable[Task],
    *,
    meta: MetadataWriter,
    operation: str,
    verb: str,
    jobs: int = 1,
    progress: bool = False,
    window: int | None = None,
    batch_size: int = 1,
    batch_bytes: int | None = None,
    runner: Callable[[list[Task]], _Outcomes] = _run_each,
) -> int:
    """Run every task (``jobs`` at a time), report each failure and go on; return the exit code.

    Each failure is one ``kmsenv: error: INPUT: ...`` line (and its hint); each skipped file one
    ``kmsenv: note:`` line; each file one ``--metadata-output`` line, in the order of ``tasks``
    (skipped files as they come). Exit code: 0 if nothing failed (skipped files are not
    failures); the failing class's code if every failure has the same one; else 1. With more
    than one file, a summary line closes the run. ``progress``: a status line redrawn as files
    finish. On Ctrl-C, files not started yet are dropped and the ones running finish (each is
    atomic either way). ``window``: files submitted ahead of the oldest unfinished one (default
    4 per job), which bounds memory on huge trees. ``batch_size``: consecutive tasks with outputs
    in the same folder go to one worker together, up to this many (and, with ``batch_bytes``, up
    to the task that reaches that many input bytes), run by ``runner``.
    """
    from collections import deque
    from concurrent.futures import Future, ThreadPoolExecutor

    counts = {"ok": 0, "failed": 0, "skipped": 0}
    codes: set[int] = set()
    status = _Progress(progress, verb)

    def finish(t: Task, outcome: dict[str, Any] | KmsenvError | None) -> None:
        record: dict[str, Any] = {"operation": operation, "input": t.input, "output": t.output}
        if outcome is not None:
            outcome = _land(outcome)  # reported once in place
        if outcome is None:
            note(f"skipped {_show(t.input)}: {t.skipped}")
            record.update(outcome="skipped", reason=t.skipped)
        elif isinstance(outcome, KmsenvError):
            _report_failure(t.input, outcome)
            codes.add(outcome.exit_code)
            record.update(failure_fields(outcome))
        else:
            record.update(outcome="ok", **outcome)
        counts[record["outcome"]] += 1
        meta.write(record)
        status.show(counts)

    def finish_batch(batch: list[Task], future: Future[_Outcomes]) -> None:
        outcomes, stop = future.result()
        for t, outcome in zip(batch, outcomes, strict=False):  # fewer outcomes: the batch stopped
            finish(t, outcome)
        if stop is not None:
            raise stop

    limit = window or 4 * max(1, jobs)
    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        try:
            pending: deque[tuple[list[Task], Future[_Outcomes]]] = deque()
            in_flight = 0
            batch: list[Task] = []
            folder: str | None = None
            size = 0
            for t in tasks:
                if t.skipped is not None:
                    finish(t, None)
                    continue
                key = None if t.output is None else os.path.dirname(t.output)
                full = len(batch) >= batch_size or (batch_bytes is not None and size >= batch_bytes)
                if batch and (full or key != folder):
                    pending.append((batch, pool.submit(runner, batch)))
                    in_flight += len(batch)
                    batch, size = [], 0
                    while in_flight > limit:  # bounded: a huge tree is not held in memory
                        done = pending.popleft()
                        in_flight -= len(done[0])
                        finish_batch(*done)
                batch.append(t)
                folder = key
                size += t.size
            if batch:
                pending.append((batch, pool.submit(runner, batch)))
            while pending:
                finish_batch(*pending.popleft())
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    if progress or sum(counts.values()) > 1:
        _stderr(f"kmsenv: {_summary(counts, verb)}")  # also replaces the last status line
    if not codes:
        return 0
    return codes.pop() if len(codes) == 1 else 1


def _report_failure(name: str, exc: KmsenvError) -> None:
    message = str(exc) if hasattr(exc, "code") else exc.message
    _stderr(f"kmsenv: error: {_show(name)}: {message}")
    if exc.hint:
        _stderr(f"kmsenv: hint: {exc.hint}")


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
        lines.append(f"wrapped key {i}:  {_show(key['provider'])} {arn}{version_id}, blob {key['blob_size']} bytes")
    slot = facts.get("key_slot")
    if slot:
        lines.append(
            f"key slot:       {slot['active']} (generation {slot['generation']}), {slot['used']} of "
            f"{slot['capacity']} bytes used, {slot['free']} free: ~{slot['more_keys']} more wrapped key(s) fit in place"
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
