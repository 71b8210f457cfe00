"""Envelope encryption of files and streams: the file-level layer over the format and a ``Kms``.

This module owns the whole life of one encrypted file: asking the KMS for a data key, writing
the header and the chunks, unwrapping a data key again, checking the caller's required
encryption context, reading legacy (reference-sample) files, and producing output atomically.
It knows nothing about HTTP or SQL: every KMS call goes through the :class:`~kmsenv.clients.Kms`
protocol, so the embedded KMS, a kmsenv server and the real cloud serve it alike.

Contracts shared by every function here:

* The source is only ever opened read-only; it is never modified.
* File outputs go through :class:`~kmsenv._atomic.AtomicOutput`: on *any* failure, no output
  and no temporary file remain, and an existing output is never replaced without ``force``.
  Decrypted outputs are created mode 0600.
* Decryption releases plaintext only after it authenticated (per chunk for v1 files, whole-file
  for legacy files). Writing to a stream (stdout) cannot be undone: a failure part-way leaves
  the verified chunks before it in the stream, and the call raises.
* Errors are :class:`~kmsenv.errors.KmsenvError` subclasses: ``InputError`` (unusable input),
  ``OutputError``, ``FormatError`` (not a kmsenv file, malformed header), ``IntegrityError``
  (modified, truncated or extended data), ``ContextError`` (required context pair not in the
  file), ``KmsError`` as the KMS raised it (disabled key, key not found, ...).
"""

from __future__ import annotations

import base64
import contextlib
import errno
import io
import os
import stat
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, BinaryIO

from kmsenv import _crypto
from kmsenv import format as fmt
from kmsenv._atomic import PRIVATE_MODE, AtomicOutput, same_file
from kmsenv._cache import DataKeyCache, Lease
from kmsenv.clients import Kms, UnwrappedKey, WrappedKey, decrypt_wipeable, generate_wipeable
from kmsenv.errors import (
    ConfigError,
    ContextError,
    FormatError,
    InputError,
    IntegrityError,
    KmsenvError,
    KmsError,
    OutputError,
    UsageError,
)
from kmsenv.format import legacy
from kmsenv.format.header import MAGIC_PREFIX, chunk_log2, encode_context
from kmsenv.format.random_access import EncryptedReader, Layout, decrypt_ranges, encrypt_ranges
from kmsenv.format.stream import _write_all

__all__ = [
    "DataKeyCache",
    "DecryptResult",
    "EncryptedReader",
    "StanzaOutcome",
    "decrypt_file",
    "decrypt_file_result",
    "decrypt_range",
    "decrypt_stream",
    "decrypt_stream_result",
    "encrypt_file",
    "encrypt_stream",
    "inspect_file",
    "migrate_file",
    "open_encrypted",
    "rewrap_file",
]

StrPath = str | os.PathLike[str]

#: Enough of a file to tell the formats apart (legacy detection looks at the first line).
_SNIFF_SIZE = 512
_SUITE_NAMES = {fmt.SUITE_AES256GCM_HKDF_SHA256: "AES-256-GCM, HKDF-SHA256"}
_CONTEXT_HINT = "`kmsenv inspect FILE` shows the encryption context a file is bound to"
_MODIFIED_HINT = "the file was modified, or was not written for these keys"
_DISCOVERY_HINT = "name one of the file's keys with --key-id (`kmsenv inspect FILE` lists them), or pass --discovery"
_NOT_KMSENV = "not a kmsenv encrypted file"
_NOT_KMSENV_HINT = "kmsenv decrypts files written by `kmsenv encrypt` and the reference sample's 4-line files"
#: errnos with which copy_file_range says "not between these files" (sendfile can still do it).
_NO_COPY_RANGE = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOTSUP}
_COPY_STEP = 1 << 30
#: errnos that mean "the output cannot take the data", whichever call noticed.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


# ----------------------------------------------------------------------------- inputs --


#: With ``open_input(..., whole=True)``, regular files up to this size are read in one
#: ``read(2)``: a folder run of small files then pays one read per input instead of a buffered
#: reader's set-up (``fstat``, ``lseek``) and three reads (two at EOF); every syscall lets
#: another worker take the GIL.
_READ_WHOLE = 1 << 20


class _WholeFile(io.BytesIO):
    """A small input read whole: its bytes, and its descriptor (``fileno`` for fstat and pread)."""

    def __init__(self, data: bytes, fd: int) -> None:
        super().__init__(data)
        self._fd = fd
        self.size = len(data)

    def fileno(self) -> int:
        return self._fd


@contextmanager
def open_input(path: StrPath, *, whole: bool = False) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """Open ``path`` read-only; InputError for missing, folder, unreadable.

    ``whole``: a regular file of up to :data:`_READ_WHOLE` bytes is read at once, and served
    from memory (only for callers that read it through: not where the file is locked first).
    Package-internal (the CLI uses it for the stream variants); not part of the public API.
    """
    name = os.fspath(path)
    try:
        # Not open(): it also asks whether the file is a terminal (an ioctl per input, and every
        # syscall hands the GIL round the workers of a folder run). Not FileIO(name) either: it
        # fstats the file for itself, and the stat is needed here anyway.
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise InputError(f"the input {name} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"the input {name} is a folder", hint="pass -r and -o OUTDIR to work on a folder") from None
    except OSError as exc:
        raise InputError(f"cannot read the input {name}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"the input {name} is a folder", hint="pass -r and -o OUTDIR to work on a folder")
        if whole and stat.S_ISREG(st.st_mode) and st.st_size <= _READ_WHOLE:
            try:
                data = os.read(fd, st.st_size + 1)
            except OSError as exc:
                raise InputError(f"cannot read the input {name}: {exc.strerror or exc}") from None
            if len(data) <= st.st_size:  # a short read of a regular file is its end
                with _WholeFile(data, fd) as f:
                    yield f, st
                return
            os.lseek(fd, 0, os.SEEK_SET)  # it grew since the fstat: read it as a stream
        # The buffer open() would pick: the file's block size.
        with io.BufferedReader(
            io.FileIO(fd, "rb", closefd=False), st.st_blksize if st.st_blksize > 1 else io.DEFAULT_BUFFER_SIZE
        ) as f:
            yield f, st
    finally:
        os.close(fd)


def _check_distinct(source: os.stat_result, dst: StrPath) -> None:
    """Refuse an output that is the input: ``force`` would otherwise replace the source."""
    try:
        target = os.stat(dst)
    except OSError:
        return
    if same_file(source, target):
        raise UsageError(f"the output {os.fspath(dst)} is the input file", hint="choose another output with -o")


def _check_unchanged(f: BinaryIO, before: os.stat_result) -> None:
    """InputError if a regular file changed while we read it: the output would mix versions."""
    if not stat.S_ISREG(before.st_mode):
        return
    after = os.fstat(f.fileno())
    if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
        raise InputError("the input changed while it was being read", hint="run the command again when it is stable")


@contextmanager
def _file_to_file(
    src: StrPath, dst: StrPath, *, force: bool, mode: int | None
) -> Iterator[tuple[BinaryIO, BinaryIO, os.stat_result]]:
    """The input opened read-only, the atomic output and the input's stat (taken once: a folder
    run pays every syscall per file), for a body that reads one into the other.

    The output is committed only if the body succeeds and the input did not change meanwhile.
    """
    with open_input(src, whole=True) as (fin, before):
        _check_distinct(before, dst)
        with AtomicOutput(dst, force=force, mode=mode) as out:
            yield fin, out, before
            _check_unchanged(fin, before)


@contextmanager
def _os_errors() -> Iterator[None]:
    """Turn an OSError from the byte pump into the error class a user can act on."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as exc:
        if exc.errno in _OUTPUT_ERRNOS:
            raise OutputError(f"cannot write the output: {exc.strerror or exc}") from None
        raise InputError(f"cannot read the input: {exc.strerror or exc}") from None


class _Prefixed(io.RawIOBase):
    """A non-seekable source with the bytes already sniffed from it put back in front."""

    def __init__(self, head: bytes, rest: BinaryIO) -> None:
        self._head = memoryview(head)
        self._rest = rest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            n = min(len(view), len(self._head))
            view[:n] = self._head[:n]
            self._head = self._head[n:]
            return n
        data = self._rest.read(len(view))
        view[: len(data)] = data
        return len(data)


def _remaining(src: BinaryIO) -> int | None:
    """Bytes left to read in ``src`` if it is a regular file, else None (a buffer-sizing hint)."""
    if isinstance(src, _WholeFile):
        return src.size - src.tell()  # known without an fstat
    try:
        st = os.fstat(src.fileno())
        return st.st_size - src.tell() if stat.S_ISREG(st.st_mode) else None
    except (AttributeError, OSError, ValueError):
        return None


def _sniff(src: BinaryIO) -> tuple[bytes, BinaryIO]:
    """The first bytes of ``src`` and a reader that still starts at them (pipes cannot seek)."""
    seekable = getattr(src, "seekable", None)  # duck-typed readers may lack it
    if seekable is not None and seekable():
        start = src.tell()
        head = src.read(_SNIFF_SIZE)
        src.seek(start)
        return head, src
    head = b""
    while len(head) < _SNIFF_SIZE:
        part = src.read(_SNIFF_SIZE - len(head))
        if not part:
            break
        head += part
    return head, io.BufferedReader(_Prefixed(head, src))


# ---------------------------------------------------------------------------- context --


def _context(context: Mapping[str, str] | None) -> dict[str, str]:
    """Validate a caller's encryption context (UsageError), before any KMS call."""
    if context is None:
        return {}
    if not isinstance(context, Mapping):
        raise UsageError("the encryption context must be a mapping of strings to strings")
    result: dict[str, str] = {}
    for key, value in context.items():
        if not isinstance(key, str) or not isinstance(value, str) or not key:
            raise UsageError("encryption context keys must be non-empty strings and values strings")
        result[key] = value
    try:
        encode_context(result)
    except FormatError as exc:
        raise UsageError(exc.message) from None
    return result


def _require_context(actual: Mapping[str, str], required: Mapping[str, str]) -> None:
    """ContextError unless every required pair is in the file's context with the same value.

    The file's context is authenticated (KDF input and header tag) and bound into the wrapped
    key, so once the header opens, these pairs are what the file was really encrypted with.
    """
    for key, value in required.items():
        if key not in actual:
            raise ContextError(f"the file's encryption context has no key {key!r}", hint=_CONTEXT_HINT)
        if actual[key] != value:
            raise ContextError(f"the file's encryption context has another value for {key!r}", hint=_CONTEXT_HINT)


# ----------------------------------------------------------------------------- keys --


def _check_chunk_size(chunk_size: int) -> None:
    try:
        chunk_log2(chunk_size)
    except FormatError as exc:
        raise UsageError(exc.message) from None


KeyIds = str | Sequence[str]


def _key_ids(key_id: KeyIds) -> tuple[str, ...]:
    """The CMKs to wrap a new data key under, in order (the first one generates it)."""
    ids = (key_id,) if isinstance(key_id, str) else tuple(key_id)
    if not ids:
        raise UsageError("at least one key id is needed", hint="pass --key-id KEY")
    if any(not isinstance(k, str) or not k for k in ids):
        raise UsageError("key ids must be non-empty strings")
    if len(set(ids)) != len(ids):
        raise UsageError("the same key id is given twice")
    if len(ids) > fmt.MAX_STANZAS:
        raise UsageError(f"a file holds at most {fmt.MAX_STANZAS} wrapped keys, not {len(ids)}")
    return ids


def key_ref(name: str) -> str:
    """The key id a key id or key ARN names, for matching stanzas (package-internal).

    A file records key ARNs, never aliases: an alias can be re-pointed, so naming keys by alias
    where a file's stanzas are selected would let whoever controls the alias choose. UsageError.
    """
    if name.startswith("alias/") or ":alias/" in name:
        raise UsageError(
            f"{name!r} is an alias: name keys by key id or key ARN here",
            hint="`kmsenv inspect FILE` shows the key ARNs a file is wrapped under",
        )
    return key_ref_of_arn(name)


def _stanza(kms: Kms, wrapped: WrappedKey) -> fmt.KeyStanza:
    return fmt.KeyStanza(
        provider=kms.provider_id,
        key_arn=wrapped.key_arn,
        key_version_id=wrapped.key_version_id,
        ciphertext_blob=base64.b64decode(wrapped.ciphertext_blob),
    )


def _generate(
    kms: Kms, key_ids: tuple[str, ...], context: Mapping[str, str]
) -> tuple[bytes | bytearray, tuple[fmt.KeyStanza, ...]]:
    """GenerateDataKey under the first CMK, Encrypt of the same data key under each other one."""
    data_key = generate_wipeable(kms, key_ids[0], encryption_context=context, number_of_bytes=fmt.DATA_KEY_SIZE)
    try:
        stanzas = [_stanza(kms, data_key.wrapped)]
        for other in key_ids[1:]:
            # bytes(): the protocol takes bytes; this copy lives for the call (it is base64 text next).
            wrapped = kms.encrypt_data_key(other, bytes(data_key.plaintext), encryption_context=context)
            stanzas.append(_stanza(kms, wrapped))
    except BaseException:
        data_key.wipe()
        raise
    return data_key.plaintext, tuple(stanzas)


def _generate_for_cache(
    kms: Kms, key_ids: tuple[str, ...], context: Mapping[str, str]
) -> tuple[bytes, tuple[fmt.KeyStanza, ...]]:
    """:func:`_generate` for the data-key cache, which keeps keys as ``bytes`` (it cannot wipe them)."""
    plaintext, stanzas = _generate(kms, key_ids, context)
    try:
        return bytes(plaintext), stanzas
    finally:
        _wipe_key(plaintext)


def _wipe_key(key: bytes | bytearray) -> None:
    """Zero a data key this operation owns, if it is mutable (kmsenv's clients return bytearrays)."""
    if isinstance(key, bytearray):
        _crypto.wipe(key)


def _new_file_key(
    kms: Kms,
    key_ids: tuple[str, ...],
    context: Mapping[str, str],
    *,
    chunk_size: int,
    cache: DataKeyCache | None,
    size_hint: int,
) -> tuple[fmt.Header, fmt.FileKey, Lease | None]:
    """A data key (fresh, or from ``cache`` within its limits) and the header around its stanzas.

    Each file gets its own random salt, hence its own payload key, even when the data key is
    shared (docs/format.md §6): that is what makes caching data keys safe.
    """
    lease: Lease | None = None
    if cache is None:
        plaintext, stanzas = _generate(kms, key_ids, context)
    else:
        cache_key = (id(kms), kms.provider_id, key_ids, tuple(sorted(context.items())))
        lease = cache.acquire(
            cache_key, lambda: _generate_for_cache(kms, key_ids, context), owner=kms, size_hint=size_hint
        )
        plaintext, stanzas = lease.data_key, lease.stanzas
    try:
        header, file_key = fmt.new_header(plaintext, stanzas=stanzas, context=context, chunk_size=chunk_size)
        return header, file_key, lease
    finally:
        # From here on only the derived keys are needed: a data key of our own is zeroed now
        # (the cache's copy is the cache's, within its limits; docs/security.md).
        if lease is None:
            _wipe_key(plaintext)


def _unwrap_blob(kms: Kms, blob: str, context: Mapping[str, str], cache: DataKeyCache | None = None) -> UnwrappedKey:
    """KMS ``Decrypt`` of a data key blob taken from a file (or the answer ``cache`` kept for it).

    ``InvalidCiphertext`` here means the KMS could not open the blob with the context the file
    carries: the file was modified (its context or wrapped key), or the key was wrapped by
    another KMS. Either way the file as it is does not authenticate, so it is an IntegrityError;
    every other KMS answer (disabled key, no permission, key not found) is passed on as-is.
    """
    if cache is not None:
        # The exact blob, context and KMS: a hit is the answer this KMS gave for these bytes.
        cache_key = ("unwrap", id(kms), kms.provider_id, blob, tuple(sorted(context.items())))
        return cache.unwrap(cache_key, lambda: _unwrap_blob(kms, blob, context), owner=kms)
    try:
        return decrypt_wipeable(kms, blob, encryption_context=context)
    except KmsError as exc:
        if exc.code != "InvalidCiphertext":
            raise
        raise IntegrityError(
            "the file's wrapped data key does not open: the file was modified or belongs to another KMS",
            hint=f"the KMS said: {exc}",
        ) from None


@dataclass(frozen=True, slots=True)
class StanzaOutcome:
    """What happened to one wrapped key of a file while opening it (1-based ``index``).

    ``code``: ``ok``, an Alibaba error code (``Forbidden.NoPermission``, ``Rejected.Disabled``...),
    ``InvalidCiphertext`` (does not open with the file's context), ``KeyMismatch`` (the KMS opened
    it with a key other than the one the stanza names), ``NotNamed`` (not tried: not among the
    caller's key ids and no discovery), ``OtherProvider`` (not tried: another kind of KMS) or
    ``NotTried`` (an earlier one opened).
    """

    index: int
    provider: str
    key_arn: str
    code: str

    def as_dict(self) -> dict[str, Any]:
        return {"index": self.index, "provider": self.provider, "key_arn": self.key_arn, "code": self.code}


@dataclass(frozen=True, slots=True)
class Opened:
    """A file's data key unwrapped and its header authenticated: the file key and how."""

    file_key: fmt.FileKey = field(repr=False)
    index: int  # 0-based index of the stanza that opened
    key_id: str
    key_version_id: str
    outcomes: tuple[StanzaOutcome, ...]


def _selection(
    header: fmt.Header, kms: Kms, key_ids: Sequence[str] | None, discovery: bool
) -> tuple[list[int], list[StanzaOutcome]]:
    """Which stanzas to try, in order, and the ones left out (with why).

    No ``key_ids``: every stanza of this KMS's provider, in header order. With ``key_ids``: the
    stanzas under those keys, in header order; with ``discovery`` also the others, after them.
    """
    named = {key_ref(k) for k in key_ids or ()}
    first: list[int] = []
    later: list[int] = []
    left_out: list[StanzaOutcome] = []
    for i, s in enumerate(header.stanzas):
        if s.provider != kms.provider_id:
            left_out.append(StanzaOutcome(i + 1, s.provider, s.key_arn, "OtherProvider"))
        elif not named or key_ref_of_arn(s.key_arn) in named:
            first.append(i)
        elif discovery:
            later.append(i)
        else:
            left_out.append(StanzaOutcome(i + 1, s.provider, s.key_arn, "NotNamed"))
    return first + later, left_out


def key_ref_of_arn(arn: str) -> str:
    """The key id at the end of a stanza's key ARN (the ARN itself if it has no ``:key/``)."""
    _, sep, tail = arn.rpartition(":key/")
    return tail if sep else arn


def _unwrap(
    kms: Kms,
    header: fmt.Header,
    key_ids: Sequence[str] | None = None,
    discovery: bool = False,
    cache: DataKeyCache | None = None,
) -> Opened:
    """Unwrap the data key from the first usable stanza (see :func:`_selection`); open the header.

    A stanza the KMS refuses (no permission, key not found, disabled...) or that does not open
    falls through to the next. One that unwraps but fails the commitment or the header tag is
    tampering: that stops everything with one IntegrityError.
    """
    order, left_out = _selection(header, kms, key_ids, discovery)
    named = {key_ref(k) for k in key_ids or ()} if not discovery else set()
    failures: list[tuple[StanzaOutcome, KmsenvError]] = []
    for i in order:
        stanza = header.stanzas[i]
        blob = base64.b64encode(stanza.ciphertext_blob).decode("ascii")
        try:
            unwrapped = _unwrap_blob(kms, blob, header.context, cache)
        except (KmsError, IntegrityError) as exc:
            code = exc.code if isinstance(exc, KmsError) else "InvalidCiphertext"
            failures.append((StanzaOutcome(i + 1, stanza.provider, stanza.key_arn, code), exc))
            continue
        if named and unwrapped.key_id not in named:
            # The stanza claims a key the caller named but its blob is under another key: a file
            # built by someone else (who then holds its data key), dressed up as one of ours.
            mismatch = IntegrityError("a wrapped key is not under the key its header names", hint=_MODIFIED_HINT)
            failures.append((StanzaOutcome(i + 1, stanza.provider, stanza.key_arn, "KeyMismatch"), mismatch))
            continue
        try:
            file_key = fmt.open_header(header, unwrapped.plaintext)
        finally:
            if cache is None:  # a cached answer stays the cache's until its limits drop it
                unwrapped.wipe()
        tried = [o for o, _ in failures] + [StanzaOutcome(i + 1, stanza.provider, stanza.key_arn, "ok")]
        rest = order[order.index(i) + 1 :]
        tried += [StanzaOutcome(j + 1, header.stanzas[j].provider, header.stanzas[j].key_arn, "NotTried") for j in rest]
        return Opened(
            file_key,
            i,
            unwrapped.key_id,
            unwrapped.key_version_id,
            tuple(sorted(tried + left_out, key=lambda o: o.index)),
        )
    raise _no_stanza_opened(header, kms, failures, left_out)


def _no_stanza_opened(
    header: fmt.Header, kms: Kms, failures: list[tuple[StanzaOutcome, KmsenvError]], left_out: list[StanzaOutcome]
) -> KmsenvError:
    """The error for a file none of whose stanzas opened: each stanza's code, in header order."""
    outcomes = sorted([o for o, _ in failures] + left_out, key=lambda o: o.index)
    listing = "; ".join(f"#{o.index} {o.key_arn}: {o.code}" for o in outcomes)
    if not failures:
        if all(o.code == "OtherProvider" for o in left_out):
            providers = ", ".join(sorted({s.provider for s in header.stanzas}))
            return ConfigError(
                f"the file's data key is wrapped only for KMS provider(s) {providers}, not {kms.provider_id}"
            )
        return ConfigError(
            f"none of the file's wrapped keys is under a key id you named ({listing})",
            hint=_DISCOVERY_HINT,
        )
    if len(outcomes) == 1:
        return failures[0][1]  # one wrapped key: its own error says it best
    message = f"none of the file's {len(outcomes)} wrapped keys opened ({listing})"
    # A real KMS refusal says more (and is actionable) than "does not open".
    refusal = next((exc for _, exc in failures if isinstance(exc, KmsError)), None)
    if refusal is not None:
        return KmsError(refusal.code, message, hint=refusal.hint)
    return IntegrityError(message, hint=failures[0][1].hint)


def _open_legacy(kms: Kms, parsed: legacy.LegacyFile) -> tuple[bytes, str]:
    """Unwrap (no context: the reference sample used none) and verify a legacy file.

    Returns the plaintext and the id of the CMK that wrapped its data key.
    """
    unwrapped = _unwrap_blob(kms, parsed.ciphertext_blob, {})
    try:
        return legacy.open_legacy(parsed, bytes(unwrapped.plaintext)), unwrapped.key_id
    finally:
        unwrapped.wipe()


# ---------------------------------------------------------------------------- streams --


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    kms: Kms,
    key_id: KeyIds,
    context: Mapping[str, str] | None = None,
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
    threads: int = 2,
    cache: DataKeyCache | None = None,
) -> int:
    """Encrypt ``src`` (read to EOF) into ``dst`` as a kmsenv file (format v2): header, then chunks.

    ``key_id`` is a key id, key ARN, alias (``alias/...``) or alias ARN, or a sequence of them:
    the data key comes from ``GenerateDataKey`` under the first and is wrapped under each other
    one with ``Encrypt``; every wrapped copy goes in the header, and any one of them decrypts.
    ``context`` is bound to the file (KMS blobs, key derivation, header tag) and stored in the
    header in the clear, so it must not hold secrets. ``chunk_size`` is a power of two from
    4 KiB to 16 MiB (UsageError otherwise). ``cache``: a :class:`DataKeyCache` to take the data
    key from (within its limits) instead of asking the KMS for every file. Returns the number of
    plaintext bytes read. ``dst`` receives bytes as they are produced; on failure it holds a
    partial file.
    """
    ctx = _context(context)
    _check_chunk_size(chunk_size)
    return _encrypt(
        src, dst, kms=kms, key_ids=_key_ids(key_id), ctx=ctx, chunk_size=chunk_size, threads=threads, cache=cache
    )


def _encrypt(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    kms: Kms,
    key_ids: tuple[str, ...],
    ctx: Mapping[str, str],
    chunk_size: int,
    threads: int,
    cache: DataKeyCache | None,
    size_hint: int = 0,
    positional: bool = False,
) -> int:
    """Header, then the payload: streamed, or (``positional``: ``src`` and ``dst`` are regular
    files and ``src`` holds exactly ``size_hint`` bytes) in chunk ranges on ``threads`` threads."""
    header, file_key, lease = _new_file_key(kms, key_ids, ctx, chunk_size=chunk_size, cache=cache, size_hint=size_hint)
    with file_key, _os_errors():  # the file's keys are wiped when it is done, or failed
        dst.write(header.encode())
        if positional:
            dst.flush()  # the chunks go round the buffer, by pwrite at their offsets
            layout = Layout(header.size, chunk_size, size_hint)
            encrypt_ranges(src.fileno(), dst.fileno(), file_key, layout, threads=threads)
            n = size_hint
        else:
            # size_hint 0 also means "unknown" (a stream): no buffer-sizing hint then.
            n = fmt.encrypt_stream(
                src, dst, file_key, chunk_size=chunk_size, threads=threads, expected_size=size_hint or None
            )
    if lease is not None:
        lease.settle(n)
    return n


@dataclass(frozen=True, slots=True)
class DecryptResult:
    """What :func:`decrypt_file_result` did: sizes, the file's context, and which key opened it.

    ``key_arn``/``stanza`` name the wrapped key that opened (``None`` for legacy files, which
    name their key only inside the blob); ``key_id``/``key_version_id`` are what the KMS said
    unwrapped it; ``outcomes`` has one entry per wrapped key (see :class:`StanzaOutcome`).
    """

    plaintext_size: int
    format: str
    context: Mapping[str, str]
    key_id: str
    key_version_id: str
    key_arn: str | None = None
    stanza: int | None = None
    outcomes: tuple[StanzaOutcome, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready facts (the ``--metadata-output`` fields of a decryption)."""
        return {
            "format": self.format,
            "context": dict(self.context),
            "plaintext_size": self.plaintext_size,
            "decrypted_with": {
                "key_id": self.key_id,
                "key_version_id": self.key_version_id,
                "key_arn": self.key_arn,
                "stanza": self.stanza,
            },
            "wrapped_keys": [o.as_dict() for o in self.outcomes],
        }


def decrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    kms: Kms,
    context: Mapping[str, str] | None = None,
    key_ids: Sequence[str] | None = None,
    discovery: bool = False,
    threads: int = 2,
    cache: DataKeyCache | None = None,
) -> int:
    """Decrypt a v1 or legacy file from ``src`` into ``dst``; return the plaintext byte count.

    ``context`` lists pairs that must be in the file's encryption context (ContextError
    otherwise, checked before any KMS call); the file's own context is used to unwrap.

    Which wrapped keys are tried, in header order, each failure falling through to the next:
    without ``key_ids``, every one for this KMS's provider; with ``key_ids`` (key ids or key
    ARNs, not aliases: UsageError), only those under the named keys, unless ``discovery`` is
    true, which tries the others after them. If none opens, the error lists each one's code.

    v1 chunks go to ``dst`` one by one, each only after its tag verified; a legacy file is
    verified whole first. On IntegrityError ``dst`` may already hold verified chunks from before
    the failure: the caller must discard them (:func:`decrypt_file` does).

    ``cache``: a :class:`DataKeyCache` that keeps the KMS's ``Decrypt`` answers (within its
    ``max_age``), so files sharing a wrapped data key cost one KMS call between them.
    """
    return decrypt_stream_result(
        src, dst, kms=kms, context=context, key_ids=key_ids, discovery=discovery, threads=threads, cache=cache
    ).plaintext_size


def decrypt_stream_result(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    kms: Kms,
    context: Mapping[str, str] | None = None,
    key_ids: Sequence[str] | None = None,
    discovery: bool = False,
    threads: int = 2,
    cache: DataKeyCache | None = None,
) -> DecryptResult:
    """:func:`decrypt_stream`, returning a :class:`DecryptResult` (which key opened the file)."""
    required = _context(context)
    names = tuple(key_ids or ())
    named = {key_ref(k) for k in names}  # UsageError for aliases, before any I/O or KMS call
    head, src = _sniff(src)
    if fmt.looks_like_v1(head) or head.startswith(MAGIC_PREFIX):
        header, opened = _open_v1(src, kms, required, names, discovery, cache=cache)
        with opened.file_key, _os_errors():
            size = fmt.decrypt_stream(
                src, dst, opened.file_key, chunk_size=header.chunk_size, threads=threads, expected_size=_remaining(src)
            )
        return _v1_result(size, header, opened)
    if legacy.looks_like_legacy(head):
        parsed = legacy.read_legacy(src)
        _require_context({}, required)  # the sample bound no context
        unwrapped = _unwrap_blob(kms, parsed.ciphertext_blob, {}, cache)
        if named and not discovery and unwrapped.key_id not in named:
            raise ConfigError("the legacy file's data key is not under a key id you named", hint=_DISCOVERY_HINT)
        try:
            plaintext = legacy.open_legacy(parsed, bytes(unwrapped.plaintext))
        finally:
            if cache is None:
                unwrapped.wipe()
        with _os_errors():
            dst.write(plaintext)
        return DecryptResult(len(plaintext), legacy.LEGACY_FORMAT, {}, unwrapped.key_id, unwrapped.key_version_id)
    if not head:
        raise FormatError(f"{_NOT_KMSENV}: the input is empty", hint=_NOT_KMSENV_HINT)
    raise FormatError(_NOT_KMSENV, hint=_NOT_KMSENV_HINT)


def _open_v1(
    src: BinaryIO,
    kms: Kms,
    required: Mapping[str, str],
    names: Sequence[str],
    discovery: bool,
    *,
    cache: DataKeyCache | None = None,
) -> tuple[fmt.Header, Opened]:
    """Read a v1 header from ``src``, check the required context, unwrap and open the header."""
    header = fmt.read_header(src)  # also words an unknown version or a bad header precisely
    _require_context(header.context, required)
    return header, _unwrap(kms, header, names, discovery, cache)


def _v1_result(size: int, header: fmt.Header, opened: Opened) -> DecryptResult:
    stanza = header.stanzas[opened.index]
    return DecryptResult(
        size,
        "kmsenv",
        dict(header.context),
        opened.key_id,
        opened.key_version_id,
        key_arn=stanza.key_arn,
        stanza=opened.index + 1,
        outcomes=opened.outcomes,
    )


# ------------------------------------------------------------------------------ files --


#: What ``threads=None`` means for the streaming engine (encryption: a writer thread).
_STREAM_THREADS = 2


def _stream_threads(threads: int | None) -> int:
    return _STREAM_THREADS if threads is None else threads


def _ranges(st: os.stat_result, threads: int | None, minimum: int = 0) -> bool:
    """Whether to split a file into chunk ranges: ``threads`` >= 2 asked for explicitly, and a
    regular file of more than ``minimum`` bytes. Pipes and special files stream; so does a
    default call (``threads=None``): ranges did not measure reliably faster on the 2-vCPU test
    machine (docs/scale.md, "Large files"). ``minimum``: for encryption, one chunk (less has
    nothing to split, and ``/proc`` or sysfs files, whose size is not their length, say 0 or
    4096)."""
    return threads is not None and threads >= 2 and stat.S_ISREG(st.st_mode) and st.st_size > minimum


def encrypt_file(
    src: StrPath,
    dst: StrPath,
    *,
    kms: Kms,
    key_id: KeyIds,
    context: Mapping[str, str] | None = None,
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
    force: bool = False,
    threads: int | None = None,
    cache: DataKeyCache | None = None,
) -> int:
    """Encrypt the file ``src`` into a new file ``dst`` (see :func:`encrypt_stream`).

    ``dst`` appears complete or not at all; an existing ``dst`` is replaced only with ``force``
    (OutputError otherwise, and it is left unchanged). ``dst`` may not be ``src``. With a
    ``cache``, the file's size counts towards the data key's byte limit before it is used.
    ``threads``: None (default) streams with a writer thread; 1 streams in this thread; N >= 2
    splits a regular file into chunk ranges encrypted by N threads (``pread``/``pwrite``, about
    2 chunks of memory per thread) — byte-identical output; pipes and special files stream.
    Returns the number of plaintext bytes.
    """
    ctx = _context(context)
    _check_chunk_size(chunk_size)
    key_ids = _key_ids(key_id)
    with _file_to_file(src, dst, force=force, mode=None) as (fin, out, st):
        size_hint = st.st_size if stat.S_ISREG(st.st_mode) else 0
        return _encrypt(
            fin,
            out,
            kms=kms,
            key_ids=key_ids,
            ctx=ctx,
            chunk_size=chunk_size,
            threads=_stream_threads(threads),
            cache=cache,
            size_hint=size_hint,
            positional=_ranges(st, threads, chunk_size),
        )


def decrypt_file(
    src: StrPath,
    dst: StrPath,
    *,
    kms: Kms,
    context: Mapping[str, str] | None = None,
    key_ids: Sequence[str] | None = None,
    discovery: bool = False,
    force: bool = False,
    threads: int | None = None,
    cache: DataKeyCache | None = None,
) -> int:
    """Decrypt the file ``src`` (v1 or legacy) into a new file ``dst``, mode 0600.

    ``context``: pairs that must be in the file's context (ContextError otherwise);
    ``key_ids``/``discovery``: which wrapped keys are tried (see :func:`decrypt_stream`). ``dst``
    appears only after every byte authenticated, never replaces an existing file without
    ``force``, and nothing remains of it on failure. ``threads``: None (default) or 1 decrypts
    in this thread (streaming); N >= 2 decrypts a regular v1 file's chunk ranges on N threads,
    each chunk written (``pwrite``) only once verified, a truncated or extended file failing
    before any chunk is read. ``cache``: keep the KMS's ``Decrypt`` answers for the next files
    (see :func:`decrypt_stream`). Returns the number of plaintext bytes.
    """
    return decrypt_file_result(
        src,
        dst,
        kms=kms,
        context=context,
        key_ids=key_ids,
        discovery=discovery,
        force=force,
        threads=threads,
        cache=cache,
    ).plaintext_size


def decrypt_file_result(
    src: StrPath,
    dst: StrPath,
    *,
    kms: Kms,
    context: Mapping[str, str] | None = None,
    key_ids: Sequence[str] | None = None,
    discovery: bool = False,
    force: bool = False,
    threads: int | None = None,
    cache: DataKeyCache | None = None,
) -> DecryptResult:
    """:func:`decrypt_file`, returning a :class:`DecryptResult` (which key opened the file)."""
    required = _context(context)
    names = tuple(key_ids or ())
    for name in names:
        key_ref(name)  # UsageError for aliases, before any I/O or KMS call
    with _file_to_file(src, dst, force=force, mode=PRIVATE_MODE) as (fin, out, st):
        # _ranges first: it admits only regular files, which _sniff reads without consuming.
        if _ranges(st, threads) and fmt.looks_like_v1(_sniff(fin)[0]):
            header, opened = _open_v1(fin, kms, required, names, discovery, cache=cache)
            # The size alone says where every chunk is, and whether the file was truncated or
            # extended (IntegrityError here, before any chunk is read).
            layout = Layout.of_file(header.size, header.chunk_size, st.st_size)
            with opened.file_key, _os_errors():
                decrypt_ranges(fin.fileno(), out.fileno(), opened.file_key, layout, threads=threads or 1)
            return _v1_result(layout.plaintext_size, header, opened)
        return decrypt_stream_result(
            fin,
            out,
            kms=kms,
            context=required,
            key_ids=key_ids,
            discovery=discovery,
            threads=_stream_threads(threads),
            cache=cache,
        )


# ------------------------------------------------------------------------------ random access --


def open_encrypted(
    path: StrPath,
    *,
    kms: Kms,
    context: Mapping[str, str] | None = None,
    key_ids: Sequence[str] | None = None,
    discovery: bool = False,
) -> EncryptedReader:
    """Open the v1 file ``path`` for reading its plaintext at any offset: an :class:`EncryptedReader`.

    On return the header is authenticated (data key unwrapped as :func:`decrypt_file` would,
    commitment and tag checked, ``context`` required as there) and the final chunk verified, so
    ``size`` is the authenticated plaintext size: a truncated or extended file fails here
    (IntegrityError). Each read then verifies only the chunks it touches and never returns bytes
    of one whose tag fails. A legacy file cannot be read this way (FormatError: it is a single
    whole-file record); nor can a pipe (InputError). Use it as a context manager, or close it.
    """
    required = _context(context)
    names = tuple(key_ids or ())
    for name in names:
        key_ref(name)
    with open_input(path) as (fin, st):
        if not stat.S_ISREG(st.st_mode):
            raise InputError(f"{os.fspath(path)} is not a regular file", hint="random access needs a seekable file")
        head, _ = _sniff(fin)
        if not (fmt.looks_like_v1(head) or head.startswith(MAGIC_PREFIX)):
            if legacy.looks_like_legacy(head):
                raise FormatError(
                    "a legacy file is one whole-file record: it cannot be read by offset",
                    hint="`kmsenv migrate` converts it to v1, or decrypt it whole",
                )
            raise FormatError(_NOT_KMSENV, hint=_NOT_KMSENV_HINT)
        header, opened = _open_v1(fin, kms, required, names, discovery)
        layout = Layout.of_file(header.size, header.chunk_size, st.st_size)
        # Its own descriptor: the reader outlives this block, which closes ``fin``.
        raw = os.fdopen(os.dup(fin.fileno()), "rb", buffering=0)
    return EncryptedReader(raw, opened.file_key, layout, name=os.fspath(path))


def decrypt_range(
    src: StrPath,
    dst: StrPath | BinaryIO,
    *,
    kms: Kms,
    offset: int = 0,
    length: int | None = None,
    context: Mapping[str, str] | None = None,
    key_ids: Sequence[str] | None = None,
    discovery: bool = False,
    force: bool = False,
) -> int:
    """Write the plaintext bytes ``offset .. offset + length`` of the v1 file ``src`` to ``dst``.

    ``length`` None means to the end. Only the chunks in the range (and the final chunk, on
    open) are read and verified (see :func:`open_encrypted`). A range that does not lie within
    the plaintext is a UsageError, after the file opened (its size is known only then). ``dst``
    is a path (an atomic output, mode 0600, as :func:`decrypt_file`: nothing of it remains on
    any failure) or a binary stream (verified chunks are written as they come). Returns the
    number of bytes written.
    """
    if offset < 0 or (length is not None and length < 0):
        raise UsageError("offset and length must not be negative")
    if isinstance(dst, str | os.PathLike):
        with contextlib.suppress(OSError):  # open_encrypted reports the input's own problems
            _check_distinct(os.stat(src), dst)
        with AtomicOutput(dst, force=force, mode=PRIVATE_MODE) as out:
            return decrypt_range(
                src, out, kms=kms, offset=offset, length=length, context=context, key_ids=key_ids, discovery=discovery
            )
    with open_encrypted(src, kms=kms, context=context, key_ids=key_ids, discovery=discovery) as reader:
        size = reader.size
        if offset > size:
            raise UsageError(f"the offset {offset} is past the end of the plaintext ({size} bytes)")
        if length is None:
            length = size - offset
        elif offset + length > size:
            raise UsageError(
                f"the range {offset}+{length} ends past the end of the plaintext ({size} bytes)",
                hint="leave out --length to read to the end",
            )
        reader.seek(offset)
        buffer = memoryview(bytearray(min(length, reader.chunk_size)))
        done = 0
        with _os_errors():
            while done < length:
                n = reader.readinto(buffer[: min(len(buffer), length - done)])
                _write_all(dst, buffer[:n])
                done += n
        return done


def migrate_file(
    src: StrPath,
    dst: StrPath,
    *,
    kms: Kms,
    key_id: str | None = None,
    context: Mapping[str, str] | None = None,
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
    force: bool = False,
    threads: int = 2,
) -> int:
    """Rewrite the legacy file ``src`` as a v1 file ``dst``; return the plaintext byte count.

    The legacy data key is unwrapped (``Decrypt``, no context) and the payload verified; the v1
    file gets a *new* data key from ``GenerateDataKey`` under ``key_id`` (default: the CMK that
    wrapped the legacy data key) bound to ``context``. The plaintext exists only in memory (the
    legacy format is whole-file and bounded). FormatError if ``src`` is not a legacy file.
    """
    ctx = _context(context)
    _check_chunk_size(chunk_size)
    with _file_to_file(src, dst, force=force, mode=None) as (fin, out, _):
        head, reader = _sniff(fin)
        if not legacy.looks_like_legacy(head):
            if fmt.looks_like_v1(head):
                raise FormatError(
                    "the input is already a kmsenv v1 file", hint="migrate converts the reference sample's 4-line files"
                )
            raise FormatError(f"{_NOT_KMSENV}: not a legacy 4-line file", hint=_NOT_KMSENV_HINT)
        plaintext, legacy_key_id = _open_legacy(kms, legacy.read_legacy(reader))
        return encrypt_stream(
            io.BytesIO(plaintext),
            out,
            kms=kms,
            key_id=key_id or legacy_key_id,
            context=ctx,
            chunk_size=chunk_size,
            threads=threads,
        )


# ----------------------------------------------------------------------------- rewrap --


@dataclass(frozen=True, slots=True)
class RewrapResult:
    """What :func:`rewrap_file` changed: key ARNs before and after, and which were added,
    refreshed (re-wrapped under the key's current version) or removed."""

    before: tuple[str, ...]
    after: tuple[str, ...]
    added: tuple[str, ...]
    refreshed: tuple[str, ...]
    removed: tuple[str, ...]
    header_size: int
    file_size: int
    in_place: bool = False  # only the header's slots were written (no copy of the payload)

    def as_dict(self) -> dict[str, Any]:
        return {
            "wrapped_keys_before": list(self.before),
            "wrapped_keys": list(self.after),
            "added": list(self.added),
            "refreshed": list(self.refreshed),
            "removed": list(self.removed),
            "header_size": self.header_size,
            "file_size": self.file_size,
            "in_place": self.in_place,
        }


def rewrap_file(
    path: StrPath,
    *,
    kms: Kms,
    key_ids: Sequence[str] = (),
    remove_key_ids: Sequence[str] = (),
    context: Mapping[str, str] | None = None,
) -> RewrapResult:
    """Add, refresh or remove wrapped keys of the v1 file ``path`` in place; the payload is kept.

    First the file is verified as far as its header goes: one data key is unwrapped (as
    :func:`decrypt_file` would: every wrapped key of this KMS in order) and the commitment and
    header tag are checked, so a tampered header is an IntegrityError and the file is left
    untouched. ``context``: pairs that must be in the file's context (ContextError otherwise).

    * ``key_ids``: for each (id, ARN or alias), ``ReEncrypt`` of the wrapped key that opened into
      that CMK (the data key does not travel in plaintext for it); a key already in the file is
      replaced in place by the new wrapping (refresh after rotation: its current primary
      version), a new key is appended.
    * ``remove_key_ids`` (key ids or ARNs): their wrapped keys are dropped; UsageError if one is
      not in the file, or if no wrapped key would remain.

    The new header gets a new tag (docs/format.md §6); salt, commitment and payload are the same
    bytes. A v2 file whose header slots can hold the new wrapped keys is changed **in place**:
    the new keys are written into the header's spare slot and made durable, and, if a key was
    removed or re-wrapped, the old slot is overwritten after that (docs/format.md §5.1); an
    interrupted write leaves a file that opens with the old or the new keys. Otherwise (a v1
    file, or keys that outgrow the slots) the file is rewritten beside itself as v2 with a larger
    header (kernel-side copy of the payload with ``copy_file_range``/``sendfile``) and renamed
    over the original atomically, keeping its mode (and owner where permitted). Concurrent
    rewraps of one file are serialised (``flock``). A symbolic link is followed: the file it
    points to is rewritten.
    """
    required = _context(context)
    adds = tuple(key_ids)
    if len(set(adds)) != len(adds):
        raise UsageError("the same key id is given twice")
    removals = {key_ref(k): k for k in remove_key_ids}
    if not adds and not removals:
        raise UsageError("nothing to do", hint="name a key to add or refresh (--key-id) or to remove (--remove-key-id)")
    if removals.keys() & {key_ref_of_arn(k) for k in adds}:
        raise UsageError("the same key is both added and removed")
    target = os.path.realpath(path)
    with _locked_input(target) as (fin, before):
        if not stat.S_ISREG(before.st_mode):
            raise InputError(f"{os.fspath(path)} is not a regular file", hint="rewrap rewrites files in place")
        header = _read_v1_header(fin)
        refs = [key_ref_of_arn(s.key_arn) for s in header.stanzas]
        missing = [name for ref, name in removals.items() if ref not in refs]
        if missing:
            raise UsageError(f"the file has no wrapped key under {', '.join(missing)}")
        if not adds and all(ref in removals for ref in refs):
            raise UsageError("refusing to remove the last wrapped key: nobody could decrypt the file")
        _require_context(header.context, required)
        opened = _unwrap(kms, header)
        source = base64.b64encode(header.stanzas[opened.index].ciphertext_blob).decode("ascii")
        stanzas = [s for s, ref in zip(header.stanzas, refs, strict=True) if ref not in removals]
        added: list[str] = []
        refreshed: list[str] = []
        for key_id in adds:
            wrapped = kms.re_encrypt_data_key(
                source,
                destination_key_id=key_id,
                source_encryption_context=header.context,
                destination_encryption_context=header.context,
            )
            new = _stanza(kms, wrapped)
            same = [
                i
                for i, s in enumerate(stanzas)
                if s.provider == new.provider and key_ref_of_arn(s.key_arn) == wrapped.key_id
            ]
            if same:
                stanzas[same[0]] = new
                refreshed.append(new.key_arn)
            else:
                stanzas.append(new)
                added.append(new.key_arn)
        try:
            rewrapped = fmt.rewrap_header(header, opened.file_key, stanzas)
        except FormatError as exc:  # over 64 wrapped keys or 64 KiB of header
            raise UsageError(exc.message) from None
        finally:
            opened.file_key.wipe()  # the new header is sealed: no key is needed to write it
        payload = before.st_size - header.size
        writes = fmt.slot_writes(header, rewrapped)
        in_place = writes is not None and _write_in_place(target, fin, before, writes)
        if not in_place:
            with _os_errors(), AtomicOutput(target, force=True, mode=stat.S_IMODE(before.st_mode)) as out:
                out.write(rewrapped.encode())
                out.flush()
                _copy_range(fin.fileno(), out.fileno(), header.size, payload)
                with contextlib.suppress(OSError):  # only root may give a file away; others keep their own
                    os.fchown(out.fileno(), before.st_uid, before.st_gid)
                _check_unchanged(fin, before)
    return RewrapResult(
        before=tuple(s.key_arn for s in header.stanzas),
        after=tuple(s.key_arn for s in rewrapped.stanzas),
        added=tuple(added),
        refreshed=tuple(refreshed),
        removed=tuple(s.key_arn for s, ref in zip(header.stanzas, refs, strict=True) if ref in removals),
        header_size=rewrapped.size,
        file_size=rewrapped.size + payload,
        in_place=in_place,
    )


@contextmanager
def _locked_input(target: str) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """:func:`open_input` holding an exclusive ``flock`` on the file that ``target`` names now.

    Serialises concurrent rewraps: each reads the header only after the previous one finished.
    A rewrap that copies replaces the file (new inode), so a waiter re-opens the path if the
    file it locked is no longer the one there.
    """
    import fcntl

    while True:
        with open_input(target) as (fin, before):
            fcntl.flock(fin.fileno(), fcntl.LOCK_EX)
            try:
                now = os.stat(target)
            except OSError:
                now = None
            if now is None or same_file(now, before):
                yield fin, os.fstat(fin.fileno())
                return


def _write_in_place(target: str, fin: BinaryIO, before: os.stat_result, writes: list[tuple[int, bytes]]) -> bool:
    """Write the header slots in place, each made durable before the next; False if the file
    cannot be opened for writing (the caller then rewrites it beside itself, as for v1).

    Order matters for crash safety (docs/format.md §5.1): see :func:`kmsenv.format.slot_writes`.
    """
    try:
        fd = os.open(target, os.O_WRONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        if not same_file(os.fstat(fd), before):
            return False
        _check_unchanged(fin, before)
        for offset, data in writes:
            _pwrite_slot(fd, data, offset)
            os.fdatasync(fd)
    except OSError as exc:
        # The file still opens (the slot being written is ignored when torn), with the old keys
        # or, if the first write completed, the new ones: running the rewrap again finishes it.
        raise OutputError(
            f"cannot write the header of {target}: {exc.strerror or exc}",
            hint="the file still opens, with its old or its new keys; rewrap it again to finish",
        ) from None
    finally:
        os.close(fd)
    return True


def _pwrite_slot(fd: int, data: bytes, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def _read_v1_header(src: BinaryIO) -> fmt.Header:
    head, reader = _sniff(src)
    if fmt.looks_like_v1(head) or head.startswith(MAGIC_PREFIX):
        return fmt.read_header(reader)
    if legacy.looks_like_legacy(head):
        raise FormatError(
            "a legacy file has no wrapped keys to rewrap", hint="`kmsenv migrate` converts it to v1 first"
        )
    raise FormatError(_NOT_KMSENV, hint=_NOT_KMSENV_HINT)


def _copy_range(src_fd: int, dst_fd: int, offset: int, count: int) -> None:
    """Copy ``count`` bytes from ``src_fd`` at ``offset`` to ``dst_fd``'s position, in the kernel.

    ``copy_file_range`` (which may share extents on filesystems that can: no data moves at all),
    else ``sendfile``; no byte passes through Python.
    """
    copied = 0
    use_sendfile = False
    while copied < count:
        want = min(count - copied, _COPY_STEP)
        if not use_sendfile:
            try:
                n = os.copy_file_range(src_fd, dst_fd, want, offset + copied)
            except OSError as exc:
                if exc.errno not in _NO_COPY_RANGE:
                    raise
                use_sendfile = True
                continue
        else:
            n = os.sendfile(dst_fd, src_fd, offset + copied, want)
        if n == 0:
            raise InputError(
                "the input changed while it was being read", hint="run the command again when it is stable"
            )
        copied += n


# ---------------------------------------------------------------------------- inspect --


def _v1_facts(header: fmt.Header, file_size: int | None) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "format": "kmsenv",
        "format_version": header.version,
        "suite": _SUITE_NAMES.get(header.suite, str(header.suite)),
        "suite_id": header.suite,
        "chunk_size": header.chunk_size,
        "header_size": header.size,
        "context": dict(header.context),
        "wrapped_keys": [
            {
                "provider": s.provider,
                "key_arn": s.key_arn,
                "key_version_id": s.key_version_id,
                "blob_size": len(s.ciphertext_blob),
            }
            for s in header.stanzas
        ],
    }
    if header.version == 2:
        facts["key_slot"] = _slot_facts(header)
    if file_size is not None:
        payload = file_size - header.size
        facts.update(file_size=file_size, payload_size=payload, **_plaintext_layout(payload, header.chunk_size))
    return facts


def _slot_facts(header: fmt.Header) -> dict[str, Any]:
    """v2: the slot a reader selects, its generation, and the room a rewrap has in place.

    Both slots have the same capacity, so ``free`` says how much a rewrap can add without
    rewriting the file; ``more_keys`` turns it into a count of wrapped keys the size of the
    present ones (their mean, rounded up: ARNs and blobs of other CMKs may differ a little).
    """
    used = len(header.stanza_section())
    free = header.capacity - used
    typical = -(-(used - 1) // max(1, len(header.stanzas)))  # minus the count byte
    return {
        "active": "AB"[header.active],
        "generation": header.generation,
        "slot_size": header.slot_size,
        "capacity": header.capacity,
        "used": used,
        "free": free,
        "more_keys": min(free // max(1, typical), fmt.MAX_STANZAS - len(header.stanzas)),
    }


def _plaintext_layout(payload: int, chunk_size: int) -> dict[str, Any]:
    """Chunk count and plaintext size that a payload of this length must hold, if any.

    A length that fits no layout (:meth:`Layout.of_payload`) means the file was truncated or
    extended (decryption will fail; inspect does not decrypt).
    """
    layout = Layout.of_payload(0, chunk_size, payload)
    if layout is None:
        return {"chunks": None, "plaintext_size": None, "problem": "the payload length fits no valid chunk layout"}
    return {"chunks": layout.chunks, "plaintext_size": layout.plaintext_size}


def _legacy_facts(parsed: legacy.LegacyFile, file_size: int | None) -> dict[str, Any]:
    return {
        "format": legacy.LEGACY_FORMAT,
        "format_version": 0,
        "suite": "AES-EAX (reference sample, whole-file)",
        "context": {},
        "wrapped_keys": [
            {"provider": "acs-kms", "key_arn": None, "key_version_id": None, "blob_size": parsed.blob_size}
        ],
        "file_size": file_size,
        "payload_size": len(parsed.ciphertext),
        "plaintext_size": len(parsed.ciphertext),
    }


def inspect_file(path: StrPath) -> dict[str, Any]:
    """What a file's header says, without any KMS call or key: JSON-ready facts.

    For v1: ``format``, ``format_version``, ``suite``, ``chunk_size``, ``header_size``,
    ``context``, ``wrapped_keys`` (provider, key ARN, key version, blob size — never the blob),
    and for regular files ``file_size``, ``payload_size``, ``chunks`` and ``plaintext_size``
    computed from the file size (``None`` plus ``problem`` when the length is impossible); for
    v2 also ``key_slot`` (selected slot, generation, capacity, bytes free, wrapped keys that
    still fit in place). For legacy files the same keys where they can be known (the legacy blob names no key outside
    the KMS). Nothing is authenticated: a modified file can show modified facts.
    """
    with open_input(path) as (fin, st):
        size = st.st_size if stat.S_ISREG(st.st_mode) else None
        head, reader = _sniff(fin)
        if fmt.looks_like_v1(head) or head.startswith(MAGIC_PREFIX):
            return _v1_facts(fmt.read_header(reader), size)
        if legacy.looks_like_legacy(head):
            return _legacy_facts(legacy.read_legacy(reader), size)
    if not head:
        raise FormatError(f"{_NOT_KMSENV}: the input is empty", hint=_NOT_KMSENV_HINT)
    raise FormatError(_NOT_KMSENV, hint=_NOT_KMSENV_HINT)
