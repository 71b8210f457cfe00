"""The header codec, format v1 and v2: byte layout, limits and the strict parser (docs/format.md §3–§5).

This module owns the header's *bytes* and nothing keyed: it turns a :class:`Header` into its one
canonical encoding and back, and refuses every input that breaks a rule or a limit with
:class:`~kmsenv.errors.FormatError` before any key is touched. Deriving keys, the commitment and
the header tags lives in :mod:`kmsenv.format.keys`.

Format v2 keeps v1's immutable part (magic to context) and moves the wrapped keys into two
fixed-size *slots* inside a header region whose size is fixed when the file is written, so that
``rewrap`` can rewrite one slot in place instead of copying the payload. Each slot ends in a
keyless check value (SHA-256 prefix) that tells a slot torn by an interrupted write from an
intact one before any KMS call; this module picks the slot a reader uses (the intact one with
the higher generation) and computes the in-place writes that turn one header into another.

Every length is checked against a hard limit before anything of that length is read or
allocated (a forged length field must not make us allocate gigabytes), and every accepted header
re-encodes to exactly the bytes it was parsed from (two encodings of one header would let an
attacker vary bytes a signature or a cache key does not see).
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, BinaryIO

from kmsenv import _crypto
from kmsenv.errors import FormatError, IntegrityError

__all__ = [
    "CHECK_SIZE",
    "COMMITMENT_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_BLOB_SIZE",
    "MAX_CHUNK_SIZE",
    "MAX_CONTEXT_BYTES",
    "MAX_HEADER_SIZE",
    "MAX_HEADER_SIZE_V2",
    "MAX_SLOT_CAPACITY",
    "MAX_STANZAS",
    "MIN_CHUNK_SIZE",
    "SALT_SIZE",
    "SLOT_OVERHEAD",
    "SUITE_AES256GCM_HKDF_SHA256",
    "TAG_SIZE",
    "VERSIONS",
    "Header",
    "KeyStanza",
    "encode_context",
    "looks_like_kmsenv",
    "looks_like_v1",
    "parse_header",
    "read_header",
    "slot_check",
    "slot_size_for",
    "slot_writes",
    "stanza_section",
    "zero_slot",
]

#: The version writers produce. Readers accept every version in VERSIONS, forever.
FORMAT_VERSION = 2
VERSIONS = frozenset({1, 2})
#: "KMSENV", a NUL that no text file starts its 7th byte with, then the version byte.
MAGIC_PREFIX = b"KMSENV\x00"
MAGIC_V1 = MAGIC_PREFIX + b"\x01"
MAGIC_V2 = MAGIC_PREFIX + b"\x02"
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

MAX_HEADER_SIZE = 64 * 1024  # v1
#: v2: checked on the first 12 bytes like v1's limit. The exact rules below (context, slot
#: capacity) keep a valid region under 170 KiB; this bound only has to be cheap and safe.
MAX_HEADER_SIZE_V2 = 256 * 1024
MAX_CONTEXT_BYTES = 8192
MAX_STANZAS = 64
MAX_PROVIDER_SIZE = 64
MAX_ARN_SIZE = 2048
MAX_VERSION_ID_SIZE = 256
MAX_BLOB_SIZE = 4096

# v2 slots: u64 generation ‖ stanza section ‖ zero padding ‖ tag (32) ‖ check (16).
GENERATION_SIZE = 8
CHECK_SIZE = 16
SLOT_OVERHEAD = GENERATION_SIZE + TAG_SIZE + CHECK_SIZE
_MIN_STANZA_SECTION = 1 + 10  # count byte + the smallest stanza (1+1, 2+1, 2+0, 2+1)
MIN_SLOT_SIZE = SLOT_OVERHEAD + _MIN_STANZA_SECTION
#: Stanza-section bytes one slot may hold: any v1 header's stanzas fit, so v1 files convert.
MAX_SLOT_CAPACITY = 64 * 1024
MAX_SLOT_SIZE = MAX_SLOT_CAPACITY + SLOT_OVERHEAD
#: Writer policy (docs/format.md §9.10): a new region gets slots of max(1 KiB, 2 × the stanza
#: section) capacity, rounded up to a multiple of 256, so a rewrap that adds a key or two, or
#: refreshes them all, fits in place.
MIN_WRITER_CAPACITY = 1024
_CAPACITY_STEP = 256
MAX_GENERATION = 2**64 - 1

_PREFIX = struct.Struct(">8sIHB")  # magic, header_len, suite, chunk_log2
PREFIX_SIZE = _PREFIX.size + SALT_SIZE + COMMITMENT_SIZE  # the fixed part before the context
_LEN_FIELD = 12  # magic + header_len: what must be read before the length can be checked
_MIN_HEADER_SIZE = PREFIX_SIZE + 2 + 1 + TAG_SIZE  # empty context, one stanza's count byte
_MIN_HEADER_SIZE_V2 = PREFIX_SIZE + 2 + 2 * MIN_SLOT_SIZE  # empty context, two smallest slots


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
    """A v1 or v2 header. Constructing one validates every field, so any Header can be encoded.

    ``context`` is stored as a read-only mapping sorted by the keys' UTF-8 bytes (the order it
    is encoded and authenticated in); ``stanzas`` as a tuple.

    For v2, ``stanzas``, ``tag`` and ``generation`` are those of the *selected* slot (index
    ``active``: 0 = slot A, 1 = slot B), the one a reader authenticates; ``standby`` holds the
    other slot's bytes exactly as stored (all zero if unused, a stale or torn slot otherwise),
    so that :meth:`encode` reproduces the region byte for byte. ``slot_size`` is the size of
    each slot; the header region (``size``) is fixed by it for the life of the file.
    """

    suite: int
    chunk_size: int
    salt: bytes
    context: Mapping[str, str]
    stanzas: tuple[KeyStanza, ...]
    commitment: bytes
    tag: bytes
    version: int = 1
    slot_size: int = 0
    generation: int = 0
    active: int = 1
    standby: bytes = b""
    # The context and stanza sections, encoded once when the header is built: every encoding of a
    # header (its tag, its size, its bytes) needs both, several times per file. Derived from the
    # fields above, so not compared, shown or accepted by __init__.
    _context_section: bytes = field(init=False, repr=False, compare=False)
    _stanza_section: bytes = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # Freeze copies: a caller mutating its dict afterwards must not change a header whose
        # tag was computed over the old contents.
        items = sorted(self.context.items(), key=lambda kv: str(kv[0]).encode("utf-8", "surrogatepass"))
        object.__setattr__(self, "context", MappingProxyType(dict(items)))
        object.__setattr__(self, "stanzas", tuple(self.stanzas))
        object.__setattr__(self, "salt", bytes(self.salt))
        object.__setattr__(self, "commitment", bytes(self.commitment))
        object.__setattr__(self, "tag", bytes(self.tag))
        object.__setattr__(self, "standby", bytes(self.standby))
        if self.version not in VERSIONS:
            raise FormatError(f"unsupported kmsenv format version {self.version}")
        if self.suite not in SUITES:
            raise FormatError(f"unsupported algorithm suite {self.suite}")
        chunk_log2(self.chunk_size)
        _check_size("salt", self.salt, SALT_SIZE)
        _check_size("commitment", self.commitment, COMMITMENT_SIZE)
        _check_size("header tag", self.tag, TAG_SIZE)
        if not 1 <= len(self.stanzas) <= MAX_STANZAS:
            raise FormatError(f"a header holds 1 to {MAX_STANZAS} wrapped keys, not {len(self.stanzas)}")
        object.__setattr__(self, "_stanza_section", stanza_section(self.stanzas))  # TypeError for a non-stanza
        object.__setattr__(self, "_context_section", encode_context(self.context))
        if self.version == 1:
            if (self.slot_size, self.generation, self.standby) != (0, 0, b""):
                raise ValueError("a v1 header has no slots")
            size = len(self.authenticated_bytes()) + TAG_SIZE
            if size > MAX_HEADER_SIZE:
                raise FormatError(f"the header would be {size} bytes, over the {MAX_HEADER_SIZE}-byte limit")
            return
        if not MIN_SLOT_SIZE <= self.slot_size <= MAX_SLOT_SIZE:
            raise FormatError(f"a slot must be {MIN_SLOT_SIZE} to {MAX_SLOT_SIZE} bytes, not {self.slot_size}")
        section = len(self.stanza_section())
        if section > self.capacity:
            raise FormatError(f"the wrapped keys take {section} bytes, over the slot's capacity of {self.capacity}")
        if not 1 <= self.generation <= MAX_GENERATION:
            raise FormatError(f"a slot generation must be 1 to 2^64-1, not {self.generation}")
        if self.active not in (0, 1):
            raise ValueError("active must be 0 (slot A) or 1 (slot B)")
        _check_size("standby slot", self.standby, self.slot_size)

    def __hash__(self) -> int:
        # The generated hash would fail on the read-only context mapping; the encoding is the identity.
        return hash(self.encode())

    def __repr__(self) -> str:
        slots = f", version=2, generation={self.generation}, slot_size={self.slot_size}" if self.version == 2 else ""
        return (
            f"Header(suite={self.suite}, chunk_size={self.chunk_size}, context={dict(self.context)!r}, "
            f"stanzas={self.stanzas!r}{slots})"
        )

    @property
    def size(self) -> int:
        """Encoded length in bytes (v2: the whole header region): where the payload starts."""
        if self.version == 1:
            return len(self.authenticated_bytes()) + TAG_SIZE
        return len(self._immutable_body()) + PREFIX_SIZE + 2 * self.slot_size

    @property
    def capacity(self) -> int:
        """v2: stanza-section bytes one slot can hold (0 for v1)."""
        return self.slot_size - SLOT_OVERHEAD if self.version == 2 else 0

    def encode(self) -> bytes:
        """The canonical bytes of this header, tag included (v2: the whole region, both slots)."""
        if self.version == 1:
            return self.authenticated_bytes() + self.tag
        active = self.slot_bytes()
        slots = (self.standby, active) if self.active == 1 else (active, self.standby)
        return b"".join((self.immutable_bytes(), *slots))

    def with_tag(self, tag: bytes) -> Header:
        """This header with ``tag`` as its tag (v2: the selected slot's), every other field shared.

        What sealing a header needs: the tag is computed over a draft's other fields, so a draft
        and its sealed copy differ only in the tag. Only the tag is checked here: every other
        field is this header's, already validated when it was built, and no rule involves the
        tag's value; building the copy through ``__init__`` would validate and encode it all again
        (about a third of a small file's header CPU).
        """
        tag = bytes(tag)
        _check_size("header tag", tag, TAG_SIZE)
        sealed: Header = object.__new__(type(self))
        for name in Header.__slots__:
            object.__setattr__(sealed, name, getattr(self, name))
        object.__setattr__(sealed, "tag", tag)
        return sealed

    def stanza_section(self) -> bytes:
        """u8 count ‖ stanzas: what a v2 slot holds after its generation."""
        return self._stanza_section

    def immutable_bytes(self) -> bytes:
        """Magic through context section: every byte before the first slot (v2) or the stanzas (v1)."""
        body = self._immutable_body()
        # Not self.size: that would encode the context a second time.
        section = 2 * self.slot_size if self.version == 2 else len(self.stanza_section()) + TAG_SIZE
        total = PREFIX_SIZE + len(body) + section
        prefix = _PREFIX.pack(MAGIC_PREFIX + bytes([self.version]), total, self.suite, chunk_log2(self.chunk_size))
        return b"".join((prefix, self.salt, self.commitment, body))

    def _immutable_body(self) -> bytes:
        return self._context_section

    def authenticated_bytes(self) -> bytes:
        """What the header tag is computed over.

        v1: every header byte before the tag. v2: the immutable part, then the selected slot's
        generation, stanza section and zero padding (everything of the slot before its tag).
        """
        if self.version == 1:
            return self.immutable_bytes() + self.stanza_section()
        return self.immutable_bytes() + self._slot_body()

    def _slot_body(self) -> bytes:
        section = self.stanza_section()
        pad = bytes(self.capacity - len(section))
        return b"".join((self.generation.to_bytes(GENERATION_SIZE, "big"), section, pad))

    def slot_bytes(self) -> bytes:
        """v2: the selected slot as stored: generation ‖ stanzas ‖ padding ‖ tag ‖ check."""
        if self.version != 2:
            raise ValueError("a v1 header has no slots")
        body = self._slot_body() + self.tag
        return body + slot_check(body)

    def slot_offset(self, index: int) -> int:
        """v2: where slot ``index`` (0 = A, 1 = B) starts in the file."""
        if self.version != 2 or index not in (0, 1):
            raise ValueError("only the two slots of a v2 header have offsets")
        return self.size - (2 - index) * self.slot_size


def stanza_section(stanzas: Sequence[KeyStanza]) -> bytes:
    """The stanza section of ``stanzas``: u8 count, then each stanza (no count limit checked here)."""
    if any(not isinstance(s, KeyStanza) for s in stanzas):
        raise TypeError("stanzas must be KeyStanza objects")
    if type(stanzas) is tuple and all(map(_plain, stanzas)):
        return _stanza_section(stanzas)
    return _stanza_section.__wrapped__(stanzas)


def _plain(s: KeyStanza) -> bool:
    """Whether a stanza's fields are exact str/bytes: they hash and compare by their value alone."""
    return (
        type(s.provider) is str
        and type(s.key_arn) is str
        and type(s.key_version_id) is str
        and type(s.ciphertext_blob) is bytes
    )


# Memoised by value: a folder run under one cached data key writes the same stanzas and the same
# context into every file's header, which is encoded several times per file (validation, the
# tag, the bytes written). The inputs are immutable and hold nothing secret (a header stores them
# in the clear); errors are never cached, so a bad value still fails every time.
_ENCODING_CACHE_SIZE = 32


@functools.lru_cache(maxsize=_ENCODING_CACHE_SIZE)
def _stanza_section(stanzas: Sequence[KeyStanza]) -> bytes:
    return b"".join((bytes([len(stanzas) & 0xFF]), *(_encode_stanza(s) for s in stanzas)))


def slot_check(body: bytes) -> bytes:
    """The keyless check value of a v2 slot: the first 16 bytes of SHA-256 over the slot before it.

    Not a MAC (anyone can compute it): it only tells an intact slot from one an interrupted
    write left half-old, half-new, so a reader can choose a slot before any key is unwrapped.
    """
    return _crypto.sha256(body)[:CHECK_SIZE]


def slot_size_for(section_size: int) -> int:
    """The slot size a writer gives a new v2 region for a stanza section of ``section_size`` bytes.

    max(1 KiB, 2 × section) of capacity, rounded up to 256 bytes, capped at the format limit.
    """
    capacity = max(MIN_WRITER_CAPACITY, 2 * section_size)
    capacity = -(-capacity // _CAPACITY_STEP) * _CAPACITY_STEP
    return min(capacity, MAX_SLOT_CAPACITY) + SLOT_OVERHEAD


def zero_slot(slot_size: int) -> bytes:
    """An unused slot: all zero (its check does not match, so no reader ever selects it)."""
    return bytes(slot_size)


def slot_writes(old: Header, new: Header) -> list[tuple[int, bytes]] | None:
    """The writes (offset, bytes), in order, that turn a file with header ``old`` into ``new`` in place.

    None if that is impossible (not both v2, another region size or immutable part, or a slot
    that would not outrank the selected one, as in a fresh region): the file must then be
    rewritten. Slots are written in increasing order of the generation they
    get, each to be made durable before the next: at every moment one intact slot is the
    highest-generation intact slot, so an interrupted write always leaves a file that opens.
    """
    if old.version != 2 or new.version != 2 or old.size != new.size or old.slot_size != new.slot_size:
        return None
    if old.immutable_bytes() != new.immutable_bytes():
        return None
    before, after = _slots(old), _slots(new)
    gens = [_generation_of(after[i]) for i in (0, 1)]
    order = sorted((0, 1), key=lambda i: gens[i])
    writes = [i for i in order if after[i] != before[i]]
    # Every slot written must outrank every intact slot already there (the selected one has the
    # highest generation), or a crash could leave an older slot selected over the newer one.
    if not writes or any(gens[i] <= old.generation for i in writes):
        return None
    return [(new.slot_offset(i), after[i]) for i in writes]


def _slots(h: Header) -> tuple[bytes, bytes]:
    active = h.slot_bytes()
    return (h.standby, active) if h.active == 1 else (active, h.standby)


def _generation_of(slot: bytes) -> int:
    """The generation of an intact slot; 0 for an unused or torn one (written first, if at all)."""
    if slot_check(slot[:-CHECK_SIZE]) != slot[-CHECK_SIZE:]:
        return 0
    return int.from_bytes(slot[:GENERATION_SIZE], "big")


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


def looks_like_kmsenv(prefix: bytes) -> bool:
    """Whether ``prefix`` (the first bytes of a file, 8 or more) starts a file of a version we read."""
    return prefix[: len(MAGIC_PREFIX)] == MAGIC_PREFIX and prefix[len(MAGIC_PREFIX) : len(MAGIC_PREFIX) + 1] in (
        MAGIC_V1[-1:],
        MAGIC_V2[-1:],
    )


#: The name predates v2; callers use it to mean "a kmsenv file this reader opens" (v1 or v2).
looks_like_v1 = looks_like_kmsenv


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
    items = tuple(context.items())
    # Only exact str keys and values are looked up: they hash and compare by their text alone
    # (anything else is refused below, every time).
    if all(type(k) is str and type(v) is str for k, v in items):
        return _encode_items(items)
    return _encode_items.__wrapped__(items)


@functools.lru_cache(maxsize=_ENCODING_CACHE_SIZE)
def _encode_items(items: tuple[tuple[Any, Any], ...]) -> bytes:
    pairs = sorted(
        (_utf8("context key", k, 1, MAX_CONTEXT_BYTES), _utf8("context value", v, 0, MAX_CONTEXT_BYTES))
        for k, v in items
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
    def position(self) -> int:
        return self._pos

    @property
    def remaining(self) -> int:
        return len(self._data) - self._pos

    def at(self, prefix: bytes) -> bool:
        """Whether the unread bytes start with ``prefix``."""
        return self._data.startswith(prefix, self._pos)

    def since(self, start: int) -> bytes:
        """The bytes read from ``start`` up to the cursor."""
        return self._data[start : self._pos]

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
    version = first[len(MAGIC_PREFIX)]
    if version not in VERSIONS:
        raise FormatError(f"unsupported kmsenv format version {version}")
    declared = int.from_bytes(first[8:12], "big")
    limit, minimum = (MAX_HEADER_SIZE, _MIN_HEADER_SIZE) if version == 1 else (MAX_HEADER_SIZE_V2, _MIN_HEADER_SIZE_V2)
    # Checked before reading or allocating the rest: a forged length must cost nothing.
    if declared > limit:
        raise FormatError(f"header length {declared} is over the {limit}-byte limit")
    if declared < minimum:
        raise FormatError(f"header length {declared} is below the {minimum}-byte minimum")
    return declared


def _parse_fixed(r: _Reader) -> dict[str, Any]:
    """Suite, chunk size, salt, commitment and context (as Header fields): the part v1 and v2 share."""
    suite = r.u16("suite")
    # The suite decides how everything after it is read: refuse unknown ones before reading on.
    if suite not in SUITES:
        raise FormatError(f"unsupported algorithm suite {suite}")
    log2 = r.u8("chunk size")
    if not MIN_CHUNK_LOG2 <= log2 <= MAX_CHUNK_LOG2:
        raise FormatError(f"chunk size 2^{log2} is outside 2^{MIN_CHUNK_LOG2}..2^{MAX_CHUNK_LOG2}")
    salt = r.take(SALT_SIZE, "salt")
    commitment = r.take(COMMITMENT_SIZE, "commitment")
    context = _read_context(r)
    return {"suite": suite, "chunk_size": 1 << log2, "salt": salt, "commitment": commitment, "context": context}


def _parse_stanzas(r: _Reader) -> tuple[KeyStanza, ...]:
    count = r.u8("wrapped key count")
    if not 1 <= count <= MAX_STANZAS:
        raise FormatError(f"a header holds 1 to {MAX_STANZAS} wrapped keys, not {count}")
    return tuple(_parse_stanza(r) for _ in range(count))


def _parse_body(data: bytes) -> Header:
    """Parse a whole header (``len(data)`` is the declared header length)."""
    r = _Reader(data, _LEN_FIELD)
    fixed = _parse_fixed(r)
    if data[len(MAGIC_PREFIX)] == 2:
        return _parse_slots(data, r.position, fixed)
    stanzas = _parse_stanzas(r)
    # Exactly the tag must remain: bytes between the last field and the tag would be an
    # unparsed, non-canonical region an attacker could use to vary the file.
    if r.remaining != TAG_SIZE:
        raise FormatError("header length does not match its contents")
    tag = r.take(TAG_SIZE, "header tag")
    return Header(stanzas=stanzas, tag=tag, **fixed)


_NO_INTACT_SLOT = "neither wrapped-key slot of the header is intact: the file was modified or damaged"


def _parse_slots(data: bytes, start: int, fixed: dict[str, Any]) -> Header:
    """v2: split the rest of the region into two slots and select one (docs/format.md §5)."""
    rest = len(data) - start
    slot_size = rest // 2
    if rest % 2 or not MIN_SLOT_SIZE <= slot_size <= MAX_SLOT_SIZE:
        raise FormatError(f"the {rest} bytes after the context are not two slots of {MIN_SLOT_SIZE} to {MAX_SLOT_SIZE}")
    raw = (data[start : start + slot_size], data[start + slot_size :])
    parsed = {i: slot for i in (0, 1) if (slot := _parse_slot(raw[i])) is not None}
    if not parsed:
        # Both torn, both unused or modified: nothing to authenticate. Keyless, so no oracle.
        raise IntegrityError(_NO_INTACT_SLOT)
    if len(parsed) == 2 and parsed[0][0] == parsed[1][0]:
        # No writer produces this (each write takes the highest generation + 1): refuse rather
        # than pick one by a rule another reader might not share.
        raise FormatError("both wrapped-key slots have the same generation")
    active = max(parsed, key=lambda i: parsed[i][0])
    generation, stanzas, tag = parsed[active]
    return Header(
        stanzas=stanzas,
        tag=tag,
        **fixed,
        version=2,
        slot_size=slot_size,
        generation=generation,
        active=active,
        standby=raw[1 - active],
    )


def _parse_slot(slot: bytes) -> tuple[int, tuple[KeyStanza, ...], bytes] | None:
    """(generation, stanzas, tag) of an intact slot; None if its check fails (torn or unused).

    A slot whose check matches was written whole by some writer, so it MUST be well-formed:
    FormatError otherwise (a non-conforming writer, never an interrupted write).
    """
    body, check = slot[:-CHECK_SIZE], slot[-CHECK_SIZE:]
    if slot_check(body) != check:
        return None
    generation = int.from_bytes(slot[:GENERATION_SIZE], "big")
    if generation == 0:
        raise FormatError("a wrapped-key slot has generation 0")
    return generation, _parse_slot_stanzas(body[GENERATION_SIZE:-TAG_SIZE]), body[-TAG_SIZE:]


# Memoised by value, like the encodings above: every file of a folder run under one cached data key
# has byte-identical slot contents between generation and tag (same stanzas, same padding), and
# parsing them is most of a small file's header parse. The key is the exact bytes, so a cached
# result is what parsing them again would return; the stanzas hold nothing secret and are
# immutable; errors are never cached, so a malformed slot fails every time.
@functools.lru_cache(maxsize=_ENCODING_CACHE_SIZE)
def _parse_slot_stanzas(section_and_padding: bytes) -> tuple[KeyStanza, ...]:
    r = _Reader(section_and_padding, 0)
    stanzas = _parse_stanzas(r)
    # Padding MUST be zero: one encoding per slot, and no hidden bytes an attacker could vary.
    if any(r.take(r.remaining, "padding")):
        raise FormatError("the padding after a slot's wrapped keys is not zero")
    return stanzas


# The context sections parsed last (exact bytes, items), newest first. Every file of a folder run
# has the same context, and parsing it is a good part of a small file's header parse. Reusing a
# result is exact: the section is self-delimiting and its parse reads nothing after it, so bytes
# that start with a section that parsed parse to the same items and end at the same place. A tuple
# rebound whole, never mutated, so threads reading headers at once need no lock. Only sections
# that parsed are kept: a malformed one fails every time.
_recent_contexts: tuple[tuple[bytes, tuple[tuple[str, str], ...]], ...] = ()
_RECENT_CONTEXTS = 4


def _read_context(r: _Reader) -> dict[str, str]:
    global _recent_contexts  # noqa: PLW0603 - the memo above, rebound whole
    recent = _recent_contexts
    for section, items in recent:
        if r.at(section):
            r.take(len(section), "context section")
            return dict(items)
    start = r.position
    items = tuple(_parse_context(r))
    _recent_contexts = ((r.since(start), items), *recent[: _RECENT_CONTEXTS - 1])
    return dict(items)


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

    FormatError if the bytes are not a well-formed, canonical, within-limits v1 or v2 header;
    IntegrityError for a v2 header neither of whose slots is intact. The tag is *not* checked
    here (that needs the data key): see :func:`open_header`.
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
