"""The v1 header codec: byte layout, limits and the strict canonical parser (docs/format.md §3–§5).

This module owns the header's *bytes* and nothing cryptographic: it turns a :class:`Header` into
its one canonical encoding and back, and refuses every input that breaks a rule or a limit with
:class:`~kmsenv.errors.FormatError` before any key is touched. Deriving keys, the commitment and
the header tag lives in :mod:`kmsenv.format.keys`.

Every length is checked against a hard limit before anything of that length is read or
allocated (a forged length field must not make us allocate gigabytes), and every accepted header
re-encodes to exactly the bytes it was parsed from (two encodings of one header would let an
attacker vary bytes a signature or a cache key does not see).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import BinaryIO

from kmsenv.errors import FormatError

__all__ = [
    "COMMITMENT_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_BLOB_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_CONTEXT_BYTES",
    "MAX_HEADER_SIZE",
    "MAX_STANZAS",
    "MIN_CHUNK_SIZE",
    "SALT_SIZE",
    "SUITE_AES256GCM_HKDF_SHA256",
    "TAG_SIZE",
    "Header",
    "KeyStanza",
    "encode_context",
    "looks_like_v1",
    "parse_header",
    "read_header",
]

FORMAT_VERSION = 1
#: "KMSENV", a NUL that no text file starts its 7th byte with, then the version byte.
MAGIC_PREFIX = b"KMSENV\x00"
MAGIC = MAGIC_PREFIX + bytes([FORMAT_VERSION])

SUITE_AES256GCM_HKDF_SHA256 = 1
SUITES = frozenset({SUITE_AES256GCM_HKDF_SHA256})

SALT_SIZE = 32
COMMITMENT_SIZE = 32
TAG_SIZE = 32

MIN_CHUNK_LOG2 = 12  # 4 KiB
MAX_CHUNK_LOG2 = 24  # 16 MiB
MIN_CHUNK_SIZE = 1 << MIN_CHUNK_LOG2
MAX_CHUNK_SIZE = 1 << MAX_CHUNK_LOG2
#: Chosen by measurement; see docs/format.md §9 (rationale).
DEFAULT_CHUNK_SIZE = 1 << 20

MAX_HEADER_SIZE = 64 * 1024
MAX_CONTEXT_BYTES = 8192
MAX_STANZAS = 64
MAX_PROVIDER_SIZE = 64
MAX_ARN_SIZE = 2048
MAX_VERSION_ID_SIZE = 256
MAX_BLOB_SIZE = 4096

_PREFIX = struct.Struct(">8sIHB")  # magic, header_len, suite, chunk_log2
PREFIX_SIZE = _PREFIX.size + SALT_SIZE + COMMITMENT_SIZE  # the fixed part before the context
_LEN_FIELD = 12  # magic + header_len: what must be read before the length can be checked
_MIN_HEADER_SIZE = PREFIX_SIZE + 2 + 1 + TAG_SIZE  # empty context, one stanza's count byte


@dataclass(frozen=True, slots=True)
class KeyStanza:
    """One wrapped copy of the file's data key: who wrapped it, under which key, and the blob.

    ``ciphertext_blob`` is opaque to the format; only its provider can unwrap it.
    """

    provider: str
    key_arn: str
    key_version_id: str
    ciphertext_blob: bytes

    def __post_init__(self) -> None:
        _encode_stanza(self)  # validates; a KeyStanza that exists can always be written

    def __repr__(self) -> str:
        # The blob is not secret, but it is long and users paste reprs into tickets.
        return (
            f"KeyStanza(provider={self.provider!r}, key_arn={self.key_arn!r}, "
            f"key_version_id={self.key_version_id!r}, ciphertext_blob=<{len(self.ciphertext_blob)} bytes>)"
        )


@dataclass(frozen=True, slots=True)
class Header:
    """A v1 header. Constructing one validates every field, so any Header can be encoded.

    ``context`` is stored as a read-only mapping sorted by the keys' UTF-8 bytes (the order it
    is encoded and authenticated in); ``stanzas`` as a tuple.
    """

    suite: int
    chunk_size: int
    salt: bytes
    context: Mapping[str, str]
    stanzas: tuple[KeyStanza, ...]
    commitment: bytes
    tag: bytes

    def __post_init__(self) -> None:
        # Freeze copies: a caller mutating its dict afterwards must not change a header whose
        # tag was computed over the old contents.
        items = sorted(self.context.items(), key=lambda kv: str(kv[0]).encode("utf-8", "surrogatepass"))
        object.__setattr__(self, "context", MappingProxyType(dict(items)))
        object.__setattr__(self, "stanzas", tuple(self.stanzas))
        object.__setattr__(self, "salt", bytes(self.salt))
        object.__setattr__(self, "commitment", bytes(self.commitment))
        object.__setattr__(self, "tag", bytes(self.tag))
        if self.suite not in SUITES:
            raise FormatError(f"unsupported algorithm suite {self.suite}")
        chunk_log2(self.chunk_size)
        _check_size("salt", self.salt, SALT_SIZE)
        _check_size("commitment", self.commitment, COMMITMENT_SIZE)
        _check_size("header tag", self.tag, TAG_SIZE)
        if not 1 <= len(self.stanzas) <= MAX_STANZAS:
            raise FormatError(f"a header holds 1 to {MAX_STANZAS} wrapped keys, not {len(self.stanzas)}")
        if any(not isinstance(s, KeyStanza) for s in self.stanzas):
            raise TypeError("stanzas must be KeyStanza objects")
        size = len(self.authenticated_bytes()) + TAG_SIZE
        if size > MAX_HEADER_SIZE:
            raise FormatError(f"the header would be {size} bytes, over the {MAX_HEADER_SIZE}-byte limit")

    def __hash__(self) -> int:
        # The generated hash would fail on the read-only context mapping; the encoding is the identity.
        return hash(self.encode())

    def __repr__(self) -> str:
        return (
            f"Header(suite={self.suite}, chunk_size={self.chunk_size}, context={dict(self.context)!r}, "
            f"stanzas={self.stanzas!r})"
        )

    @property
    def size(self) -> int:
        """Encoded length in bytes, tag included: where the payload starts."""
        return len(self.authenticated_bytes()) + TAG_SIZE

    def encode(self) -> bytes:
        """The canonical bytes of this header, tag included."""
        return self.authenticated_bytes() + self.tag

    def authenticated_bytes(self) -> bytes:
        """Every header byte before the tag: what the header tag is computed over."""
        body = b"".join(
            (
                encode_context(self.context),
                bytes([len(self.stanzas)]),
                *(_encode_stanza(s) for s in self.stanzas),
            )
        )
        total = PREFIX_SIZE + len(body) + TAG_SIZE
        prefix = _PREFIX.pack(MAGIC, total, self.suite, chunk_log2(self.chunk_size))
        return b"".join((prefix, self.salt, self.commitment, body))


def chunk_log2(chunk_size: int) -> int:
    """log2 of a valid chunk size; FormatError for anything not a power of two within limits."""
    if (
        not isinstance(chunk_size, int)
        or chunk_size < MIN_CHUNK_SIZE
        or chunk_size > MAX_CHUNK_SIZE
        or chunk_size & (chunk_size - 1)
    ):
        raise FormatError(f"chunk size must be a power of two from {MIN_CHUNK_SIZE} to {MAX_CHUNK_SIZE} bytes")
    return chunk_size.bit_length() - 1


def looks_like_v1(prefix: bytes) -> bool:
    """Whether ``prefix`` (the first bytes of a file, 8 or more) starts a v1 file."""
    return prefix[: len(MAGIC)] == MAGIC


# --- encoding ----------------------------------------------------------------------------------


def _utf8(what: str, text: str, lo: int, hi: int) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be str")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise FormatError(f"{what} is not valid Unicode text (lone surrogate)") from None
    if not lo <= len(raw) <= hi:
        raise FormatError(f"{what} must be {lo} to {hi} bytes of UTF-8, not {len(raw)}")
    return raw


def _check_size(what: str, value: bytes, size: int) -> None:
    if len(value) != size:
        raise FormatError(f"{what} must be {size} bytes, not {len(value)}")


def _check_provider(raw: bytes) -> None:
    if not all(0x21 <= b <= 0x7E for b in raw):
        raise FormatError("a wrapped key's provider id must be visible ASCII")


def encode_context(context: Mapping[str, str]) -> bytes:
    """The context section: u16 count, then (u16 len, key, u16 len, value) sorted by key bytes.

    Also the context's binding into the key derivation (docs/format.md §6).
    """
    pairs = sorted(
        (_utf8("context key", k, 1, MAX_CONTEXT_BYTES), _utf8("context value", v, 0, MAX_CONTEXT_BYTES))
        for k, v in context.items()
    )
    total = sum(len(k) + len(v) for k, v in pairs)
    if total > MAX_CONTEXT_BYTES:
        raise FormatError(f"the encryption context is {total} bytes of UTF-8, over the {MAX_CONTEXT_BYTES}-byte limit")
    out = [struct.pack(">H", len(pairs))]
    for k, v in pairs:
        out += (struct.pack(">H", len(k)), k, struct.pack(">H", len(v)), v)
    return b"".join(out)


def _encode_stanza(s: KeyStanza) -> bytes:
    provider = _utf8("provider id", s.provider, 1, MAX_PROVIDER_SIZE)
    _check_provider(provider)
    arn = _utf8("key ARN", s.key_arn, 1, MAX_ARN_SIZE)
    version = _utf8("key version id", s.key_version_id, 0, MAX_VERSION_ID_SIZE)
    if not isinstance(s.ciphertext_blob, bytes):
        raise TypeError("ciphertext_blob must be bytes")
    if not 1 <= len(s.ciphertext_blob) <= MAX_BLOB_SIZE:
        raise FormatError(f"a CiphertextBlob must be 1 to {MAX_BLOB_SIZE} bytes, not {len(s.ciphertext_blob)}")
    return b"".join(
        (
            bytes([len(provider)]),
            provider,
            struct.pack(">H", len(arn)),
            arn,
            struct.pack(">H", len(version)),
            version,
            struct.pack(">H", len(s.ciphertext_blob)),
            s.ciphertext_blob,
        )
    )


# --- parsing -----------------------------------------------------------------------------------


class _Reader:
    """A cursor over the header bytes that can never read past them (FormatError instead)."""

    __slots__ = ("_data", "_pos")

    def __init__(self, data: bytes, pos: int) -> None:
        self._data = data
        self._pos = pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def take(self, n: int, what: str) -> bytes:
        if n > self.remaining:
            raise FormatError(f"header truncated inside the {what}")
        self._pos += n
        return self._data[self._pos - n : self._pos]

    def u8(self, what: str) -> int:
        return self.take(1, what)[0]

    def u16(self, what: str) -> int:
        return int.from_bytes(self.take(2, what), "big")

    def text(self, what: str, width: int, lo: int, hi: int) -> str:
        n = self.u8(what) if width == 1 else self.u16(what)
        # Bounds before slicing: the length field is attacker-chosen.
        if not lo <= n <= hi:
            raise FormatError(f"{what} must be {lo} to {hi} bytes, not {n}")
        raw = self.take(n, what)
        try:
            # Python's strict decoder rejects overlong forms and surrogates, so each string has
            # exactly one encoding (canonical round trip).
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise FormatError(f"{what} is not valid UTF-8") from None


def _parse_prefix(first: bytes) -> int:
    """Check magic and version in the first 12 bytes; return the declared header length."""
    if len(first) < _LEN_FIELD:
        raise FormatError("truncated header" if first else "empty input: not a kmsenv file")
    if first[: len(MAGIC_PREFIX)] != MAGIC_PREFIX:
        raise FormatError("not a kmsenv file (bad magic)")
    if first[len(MAGIC_PREFIX)] != FORMAT_VERSION:
        raise FormatError(f"unsupported kmsenv format version {first[len(MAGIC_PREFIX)]}")
    declared = int.from_bytes(first[8:12], "big")
    # Checked before reading or allocating the rest: a forged length must cost nothing.
    if declared > MAX_HEADER_SIZE:
        raise FormatError(f"header length {declared} is over the {MAX_HEADER_SIZE}-byte limit")
    if declared < _MIN_HEADER_SIZE:
        raise FormatError(f"header length {declared} is below the {_MIN_HEADER_SIZE}-byte minimum")
    return declared


def _parse_body(data: bytes) -> Header:
    """Parse a whole header (``len(data)`` is the declared header length)."""
    r = _Reader(data, _LEN_FIELD)
    suite = r.u16("suite")
    # The suite decides how everything after it is read: refuse unknown ones before reading on.
    if suite not in SUITES:
        raise FormatError(f"unsupported algorithm suite {suite}")
    log2 = r.u8("chunk size")
    if not MIN_CHUNK_LOG2 <= log2 <= MAX_CHUNK_LOG2:
        raise FormatError(f"chunk size 2^{log2} is outside 2^{MIN_CHUNK_LOG2}..2^{MAX_CHUNK_LOG2}")
    salt = r.take(SALT_SIZE, "salt")
    commitment = r.take(COMMITMENT_SIZE, "commitment")
    context = dict(_parse_context(r))
    count = r.u8("wrapped key count")
    if not 1 <= count <= MAX_STANZAS:
        raise FormatError(f"a header holds 1 to {MAX_STANZAS} wrapped keys, not {count}")
    stanzas = tuple(_parse_stanza(r) for _ in range(count))
    # Exactly the tag must remain: bytes between the last field and the tag would be an
    # unparsed, non-canonical region an attacker could use to vary the file.
    if r.remaining != TAG_SIZE:
        raise FormatError("header length does not match its contents")
    tag = r.take(TAG_SIZE, "header tag")
    return Header(
        suite=suite,
        chunk_size=1 << log2,
        salt=salt,
        context=context,
        stanzas=stanzas,
        commitment=commitment,
        tag=tag,
    )


def _parse_context(r: _Reader) -> Iterator[tuple[str, str]]:
    count = r.u16("context count")
    total = 0
    previous: bytes | None = None
    for _ in range(count):
        key = r.text("context key", 2, 1, MAX_CONTEXT_BYTES)
        value = r.text("context value", 2, 0, MAX_CONTEXT_BYTES)
        raw_key = key.encode()
        # Strictly increasing keys: one encoding per context, and no duplicate key whose two
        # values different readers would resolve differently.
        if previous is not None and raw_key <= previous:
            raise FormatError("context keys are duplicated" if raw_key == previous else "context keys are not sorted")
        previous = raw_key
        total += len(raw_key) + len(value.encode())
        if total > MAX_CONTEXT_BYTES:
            raise FormatError(f"the encryption context is over the {MAX_CONTEXT_BYTES}-byte limit")
        yield key, value


def _parse_stanza(r: _Reader) -> KeyStanza:
    provider = r.text("provider id", 1, 1, MAX_PROVIDER_SIZE)
    _check_provider(provider.encode())
    arn = r.text("key ARN", 2, 1, MAX_ARN_SIZE)
    version = r.text("key version id", 2, 0, MAX_VERSION_ID_SIZE)
    n = r.u16("CiphertextBlob length")
    if not 1 <= n <= MAX_BLOB_SIZE:
        raise FormatError(f"a CiphertextBlob must be 1 to {MAX_BLOB_SIZE} bytes, not {n}")
    blob = r.take(n, "CiphertextBlob")
    return KeyStanza(provider=provider, key_arn=arn, key_version_id=version, ciphertext_blob=blob)


def parse_header(data: bytes) -> tuple[Header, int]:
    """Parse the header at the start of ``data``; return it and the number of bytes it took.

    FormatError if the bytes are not a well-formed, canonical, within-limits v1 header. The
    tag is *not* checked here (that needs the data key): see :func:`open_header`.
    """
    declared = _parse_prefix(bytes(data[:_LEN_FIELD]))
    if len(data) < declared:
        raise FormatError("truncated header")
    return _parse_body(bytes(data[:declared])), declared


def read_header(src: BinaryIO) -> Header:
    """Read exactly the header's bytes from ``src`` (never more, never seeking) and parse them."""
    first = _read_exactly(src, _LEN_FIELD)
    declared = _parse_prefix(first)
    rest = _read_exactly(src, declared - _LEN_FIELD)
    if len(rest) != declared - _LEN_FIELD:
        raise FormatError("truncated header")
    return _parse_body(first + rest)


def _read_exactly(src: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes: fewer only at end of input. ``src`` may be a pipe returning short reads."""
    parts: list[bytes] = []
    want = n
    while want:
        part = src.read(want)
        if not part:
            break
        parts.append(part)
        want -= len(part)
    return b"".join(parts)
