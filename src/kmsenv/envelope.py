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
import errno
import io
import os
import stat
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any, BinaryIO

from kmsenv import format as fmt
from kmsenv._atomic import PRIVATE_MODE, AtomicOutput, same_file
from kmsenv.clients import Kms, UnwrappedKey
from kmsenv.errors import (
    ConfigError,
    ContextError,
    FormatError,
    InputError,
    IntegrityError,
    KmsError,
    OutputError,
    UsageError,
)
from kmsenv.format import legacy
from kmsenv.format.header import MAGIC_PREFIX, chunk_log2, encode_context

__all__ = [
    "decrypt_file",
    "decrypt_stream",
    "encrypt_file",
    "encrypt_stream",
    "inspect_file",
    "migrate_file",
]

StrPath = str | os.PathLike[str]

#: Enough of a file to tell the formats apart (legacy detection looks at the first line).
_SNIFF_SIZE = 512
_SUITE_NAMES = {fmt.SUITE_AES256GCM_HKDF_SHA256: "AES-256-GCM, HKDF-SHA256"}
_CONTEXT_HINT = "`kmsenv inspect FILE` shows the encryption context a file is bound to"
_NOT_KMSENV = "not a kmsenv encrypted file"
_NOT_KMSENV_HINT = "kmsenv decrypts files written by `kmsenv encrypt` and the reference sample's 4-line files"
#: errnos that mean "the output cannot take the data", whichever call noticed.
_OUTPUT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS}


# ----------------------------------------------------------------------------- inputs --


@contextmanager
def open_input(path: StrPath) -> Iterator[tuple[BinaryIO, os.stat_result]]:
    """Open ``path`` read-only; InputError for missing, folder, unreadable.

    Package-internal (the CLI uses it for the stream variants); not part of the public API.
    """
    name = os.fspath(path)
    try:
        f = open(name, "rb")  # noqa: SIM115 - closed by the with below, after the checks
    except FileNotFoundError:
        raise InputError(f"the input {name} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"the input {name} is a folder", hint="kmsenv works on one file at a time") from None
    except OSError as exc:
        raise InputError(f"cannot read the input {name}: {exc.strerror or exc}") from None
    with f:
        st = os.fstat(f.fileno())
        if stat.S_ISDIR(st.st_mode):
            raise InputError(f"the input {name} is a folder", hint="kmsenv works on one file at a time")
        yield f, st


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
def _file_to_file(src: StrPath, dst: StrPath, *, force: bool, mode: int | None) -> Iterator[tuple[BinaryIO, BinaryIO]]:
    """The input opened read-only and the atomic output, for a body that reads one into the other.

    The output is committed only if the body succeeds and the input did not change meanwhile.
    """
    with open_input(src) as (fin, before):
        _check_distinct(before, dst)
        with AtomicOutput(dst, force=force, mode=mode) as out:
            yield fin, out
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


def _new_file_key(kms: Kms, key_id: str, context: Mapping[str, str], chunk_size: int) -> tuple[fmt.Header, fmt.FileKey]:
    """GenerateDataKey under ``key_id`` and build the header around its wrapped form."""
    data_key = kms.generate_data_key(key_id, encryption_context=context, number_of_bytes=fmt.DATA_KEY_SIZE)
    wrapped = data_key.wrapped
    stanza = fmt.KeyStanza(
        provider=kms.provider_id,
        key_arn=wrapped.key_arn,
        key_version_id=wrapped.key_version_id,
        ciphertext_blob=base64.b64decode(wrapped.ciphertext_blob),
    )
    try:
        return fmt.new_header(data_key.plaintext, stanzas=[stanza], context=context, chunk_size=chunk_size)
    finally:
        # The plaintext data key is immutable bytes (that is what the Kms protocol returns), so it
        # cannot be zeroed; dropping the last reference as soon as the FileKey exists is what
        # Python allows. From here on only derived keys exist.
        del data_key


def _unwrap_blob(kms: Kms, blob: str, context: Mapping[str, str]) -> UnwrappedKey:
    """KMS ``Decrypt`` of a data key blob taken from a file.

    ``InvalidCiphertext`` here means the KMS could not open the blob with the context the file
    carries: the file was modified (its context or wrapped key), or the key was wrapped by
    another KMS. Either way the file as it is does not authenticate, so it is an IntegrityError;
    every other KMS answer (disabled key, no permission, key not found) is passed on as-is.
    """
    try:
        return kms.decrypt_data_key(blob, encryption_context=context)
    except KmsError as exc:
        if exc.code != "InvalidCiphertext":
            raise
        raise IntegrityError(
            "the file's wrapped data key does not open: the file was modified or belongs to another KMS",
            hint=f"the KMS said: {exc}",
        ) from None


def _unwrap(kms: Kms, header: fmt.Header) -> fmt.FileKey:
    """Unwrap the data key from the first stanza the KMS can open, and authenticate the header."""
    failures: list[KmsError | IntegrityError] = []
    for stanza in header.stanzas:
        if stanza.provider != kms.provider_id:
            continue
        blob = base64.b64encode(stanza.ciphertext_blob).decode("ascii")
        try:
            unwrapped = _unwrap_blob(kms, blob, header.context)
        except (KmsError, IntegrityError) as exc:
            failures.append(exc)
            continue
        # A stanza that unwraps but fails the commitment or tag is tampering: stop, one error.
        return fmt.open_header(header, unwrapped.plaintext)
    if not failures:
        providers = ", ".join(sorted({s.provider for s in header.stanzas}))
        raise ConfigError(
            f"the file's data key is wrapped only for KMS provider(s) {providers}, not {kms.provider_id}"
        )
    # A real KMS refusal says more (and is actionable) than "does not open".
    raise next((exc for exc in failures if isinstance(exc, KmsError)), failures[0])


def _open_legacy(kms: Kms, parsed: legacy.LegacyFile) -> tuple[bytes, str]:
    """Unwrap (no context: the reference sample used none) and verify a legacy file.

    Returns the plaintext and the id of the CMK that wrapped its data key.
    """
    unwrapped = _unwrap_blob(kms, parsed.ciphertext_blob, {})
    return legacy.open_legacy(parsed, unwrapped.plaintext), unwrapped.key_id


# ---------------------------------------------------------------------------- streams --


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    kms: Kms,
    key_id: str,
    context: Mapping[str, str] | None = None,
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
    threads: int = 2,
) -> int:
    """Encrypt ``src`` (read to EOF) into ``dst`` as a v1 file: header, then chunks.

    ``key_id`` is a key id, key ARN, alias (``alias/...``) or alias ARN; ``context`` is bound to
    the file (KMS blob, key derivation, header tag) and stored in the header in the clear, so it
    must not hold secrets. ``chunk_size`` is a power of two from 4 KiB to 16 MiB (UsageError
    otherwise). One ``GenerateDataKey`` call. Returns the number of plaintext bytes read.
    ``dst`` receives bytes as they are produced; on failure it holds a partial file.
    """
    ctx = _context(context)
    _check_chunk_size(chunk_size)
    header, file_key = _new_file_key(kms, key_id, ctx, chunk_size)
    with _os_errors():
        dst.write(header.encode())
        return fmt.encrypt_stream(src, dst, file_key, chunk_size=chunk_size, threads=threads)


def decrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    *,
    kms: Kms,
    context: Mapping[str, str] | None = None,
    threads: int = 2,
) -> int:
    """Decrypt a v1 or legacy file from ``src`` into ``dst``; return the plaintext byte count.

    ``context`` lists pairs that must be in the file's encryption context (ContextError
    otherwise, checked before any KMS call); the file's own context is used to unwrap. v1 chunks
    go to ``dst`` one by one, each only after its tag verified; a legacy file is verified whole
    first. On IntegrityError ``dst`` may already hold verified chunks from before the failure:
    the caller must discard them (:func:`decrypt_file` does).
    """
    required = _context(context)
    head, src = _sniff(src)
    if fmt.looks_like_v1(head) or head.startswith(MAGIC_PREFIX):
        header = fmt.read_header(src)  # also words an unknown version or a bad header precisely
        _require_context(header.context, required)
        file_key = _unwrap(kms, header)
        with _os_errors():
            return fmt.decrypt_stream(src, dst, file_key, chunk_size=header.chunk_size, threads=threads)
    if legacy.looks_like_legacy(head):
        parsed = legacy.read_legacy(src)
        _require_context({}, required)  # the sample bound no context
        plaintext, _ = _open_legacy(kms, parsed)
        with _os_errors():
            dst.write(plaintext)
        return len(plaintext)
    if not head:
        raise FormatError(f"{_NOT_KMSENV}: the input is empty", hint=_NOT_KMSENV_HINT)
    raise FormatError(_NOT_KMSENV, hint=_NOT_KMSENV_HINT)


# ------------------------------------------------------------------------------ files --


def encrypt_file(
    src: StrPath,
    dst: StrPath,
    *,
    kms: Kms,
    key_id: str,
    context: Mapping[str, str] | None = None,
    chunk_size: int = fmt.DEFAULT_CHUNK_SIZE,
    force: bool = False,
    threads: int = 2,
) -> int:
    """Encrypt the file ``src`` into a new file ``dst`` (see :func:`encrypt_stream`).

    ``dst`` appears complete or not at all; an existing ``dst`` is replaced only with ``force``
    (OutputError otherwise, and it is left unchanged). ``dst`` may not be ``src``. Returns the
    number of plaintext bytes.
    """
    ctx = _context(context)
    _check_chunk_size(chunk_size)
    with _file_to_file(src, dst, force=force, mode=None) as (fin, out):
        return encrypt_stream(fin, out, kms=kms, key_id=key_id, context=ctx, chunk_size=chunk_size, threads=threads)


def decrypt_file(
    src: StrPath,
    dst: StrPath,
    *,
    kms: Kms,
    context: Mapping[str, str] | None = None,
    force: bool = False,
    threads: int = 2,
) -> int:
    """Decrypt the file ``src`` (v1 or legacy) into a new file ``dst``, mode 0600.

    ``context``: pairs that must be in the file's context (ContextError otherwise). ``dst``
    appears only after every byte authenticated, never replaces an existing file without
    ``force``, and nothing remains of it on failure. Returns the number of plaintext bytes.
    """
    required = _context(context)
    with _file_to_file(src, dst, force=force, mode=PRIVATE_MODE) as (fin, out):
        return decrypt_stream(fin, out, kms=kms, context=required, threads=threads)


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
    with _file_to_file(src, dst, force=force, mode=None) as (fin, out):
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


# ---------------------------------------------------------------------------- inspect --


def _v1_facts(header: fmt.Header, file_size: int | None) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "format": "kmsenv",
        "format_version": fmt.FORMAT_VERSION,
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
    if file_size is not None:
        payload = file_size - header.size
        facts.update(file_size=file_size, payload_size=payload, **_plaintext_layout(payload, header.chunk_size))
    return facts


def _plaintext_layout(payload: int, chunk_size: int) -> dict[str, Any]:
    """Chunk count and plaintext size that a payload of this length must hold, if any.

    Every chunk but the last is full (``chunk_size`` + tag); the last has 0..chunk_size bytes
    plus its tag, and is empty only when it is the only one. A length that fits no such layout
    means the file was truncated or extended (decryption will fail; inspect does not decrypt).
    """
    record = chunk_size + fmt.CHUNK_TAG_SIZE
    full, rest = divmod(payload, record)
    if rest == 0 and full > 0:
        chunks, plain = full, full * chunk_size
    elif rest >= fmt.CHUNK_TAG_SIZE and not (rest == fmt.CHUNK_TAG_SIZE and full > 0):
        chunks, plain = full + 1, full * chunk_size + rest - fmt.CHUNK_TAG_SIZE
    else:
        return {"chunks": None, "plaintext_size": None, "problem": "the payload length fits no valid chunk layout"}
    return {"chunks": chunks, "plaintext_size": plain}


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
    computed from the file size (``None`` plus ``problem`` when the length is impossible). For
    legacy files the same keys where they can be known (the legacy blob names no key outside
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
