"""Generate the kmsenv format v1 and v2 test vectors: ``python tests/vectors/generate.py``.

An independent, deliberately naive writer of the format as docs/format.md specifies it. It does not
use :mod:`kmsenv.format` (only the primitives of :mod:`kmsenv._crypto`), so the vectors check the
implementation against the spec rather than against itself, and it can write every malformed
variant the real writer refuses to produce. Everything is deterministic: the data key, salts and
plaintexts derive from fixed labels, so regenerating gives byte-identical files (a test checks).

Each vector is one JSON file named after its scenario; see the index in docs/format.md §10.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import struct
import sys
from collections.abc import Callable
from pathlib import Path

from kmsenv import _crypto

HERE = Path(__file__).resolve().parent

DATA_KEY = hashlib.sha256(b"kmsenv v1 test vectors: data key").digest()
OTHER_KEY = hashlib.sha256(b"kmsenv v1 test vectors: another data key").digest()
CHUNK = 4096  # the smallest chunk size keeps multi-chunk vectors small
ARN = "acs:kms:cn-hangzhou:1234567890123456:key/key-hzz6f8a9e1b2c3d4e5f60"
STANZA = (b"acs-kms", ARN.encode(), b"key-version-0001", b"\x01" * 48 + b"wrapped data key")
STANZA_2 = (b"acs-kms", ARN.replace("cn-hangzhou", "cn-shanghai").encode(), b"key-version-0002", b"\x02" * 64)
CONTEXT = ((b"app", b"kmsenv-vectors"), (b"purpose", b"test"))


def u8(n: int) -> bytes:
    return struct.pack(">B", n)


def u16(n: int) -> bytes:
    return struct.pack(">H", n)


def u16_prefixed(raw: bytes) -> bytes:
    return u16(len(raw)) + raw


def pattern(n: int, label: str = "plaintext") -> bytes:
    """``n`` deterministic bytes that look random (SHA-256 in counter mode)."""
    blocks = (hashlib.sha256(f"{label}:{i}".encode()).digest() for i in range(-(-n // 32)))
    return b"".join(blocks)[:n]


@dataclasses.dataclass
class Spec:
    """The fields of one file, each overridable to make it malformed."""

    plaintext: bytes = b""
    magic: bytes = b"KMSENV\x00\x01"
    suite: int = 1
    log2: int = 12
    salt_label: str = "salt"
    context: tuple[tuple[bytes, bytes], ...] = CONTEXT
    context_count: int | None = None
    stanzas: tuple[tuple[bytes, bytes, bytes, bytes], ...] = (STANZA,)
    stanza_count: int | None = None
    padding: bytes = b""  # bytes between the last stanza and the tag (never valid)
    length_delta: int = 0  # added to the true header length

    @property
    def salt(self) -> bytes:
        return hashlib.sha256(self.salt_label.encode()).digest()

    def context_section(self) -> bytes:
        count = len(self.context) if self.context_count is None else self.context_count
        return u16(count) + b"".join(u16_prefixed(k) + u16_prefixed(v) for k, v in self.context)

    def stanza_section(self) -> bytes:
        count = len(self.stanzas) if self.stanza_count is None else self.stanza_count
        parts = [u8(count)]
        for provider, arn, version, blob in self.stanzas:
            parts += [u8(len(provider)), provider, u16_prefixed(arn), u16_prefixed(version), u16_prefixed(blob)]
        return b"".join(parts)


def derive(key: bytes, spec: Spec, purpose: bytes) -> bytes:
    """docs/format.md §6: HKDF-SHA256(data key, salt, "kmsenv-v1" 0 purpose 0 suite log2 context)."""
    info = b"kmsenv-v1\x00" + purpose + b"\x00" + u16(spec.suite) + u8(spec.log2) + spec.context_section()
    return _crypto.hkdf_sha256(key, salt=spec.salt, info=info, length=32)


def header(spec: Spec, key: bytes = DATA_KEY, commitment: bytes | None = None) -> tuple[bytes, bytes]:
    """(header bytes without the tag, header MAC key)."""
    if commitment is None:
        commitment = derive(key, spec, b"commitment")
    body = spec.context_section() + spec.stanza_section() + spec.padding
    length = 8 + 4 + 2 + 1 + 32 + 32 + len(body) + 32 + spec.length_delta
    fixed = spec.magic + struct.pack(">IHB", length, spec.suite, spec.log2) + spec.salt + commitment
    return fixed + body, derive(key, spec, b"header-mac")


def tagged(unsigned: bytes, mac_key: bytes) -> bytes:
    return unsigned + _crypto.hmac_sha256(mac_key, unsigned)


def seal(key: bytes, spec: Spec, counter: int, final: bool, data: bytes) -> bytes:
    nonce = counter.to_bytes(11, "big") + (b"\x01" if final else b"\x00")
    return _crypto.AesGcm(derive(key, spec, b"payload")).encrypt(nonce, data)


def chunks(spec: Spec, key: bytes = DATA_KEY) -> list[bytes]:
    """The canonical chunk records of ``spec.plaintext``."""
    size = 1 << spec.log2
    pieces = [spec.plaintext[i : i + size] for i in range(0, len(spec.plaintext), size)] or [b""]
    return [seal(key, spec, i, i == len(pieces) - 1, p) for i, p in enumerate(pieces)]


def file_bytes(spec: Spec, key: bytes = DATA_KEY) -> bytes:
    unsigned, mac_key = header(spec, key)
    return tagged(unsigned, mac_key) + b"".join(chunks(spec, key))


def flip(data: bytes, index: int, bit: int = 0) -> bytes:
    out = bytearray(data)
    out[index] ^= 1 << bit
    return bytes(out)


# --- the scenarios --------------------------------------------------------------------------------

Vector = dict[str, object]
_VECTORS: dict[str, Callable[[], Vector]] = {}


def vector(fn: Callable[[], Vector]) -> Callable[[], Vector]:
    _VECTORS[fn.__name__] = fn
    return fn


def ok(description: str, spec: Spec) -> Vector:
    return {
        "description": description,
        "file": file_bytes(spec),
        "expect": "success",
        "plaintext_size": len(spec.plaintext),
        "plaintext_sha256": hashlib.sha256(spec.plaintext).hexdigest(),
    }


def fail(error: str, stage: str, reason: str, file: bytes, key: bytes = DATA_KEY) -> Vector:
    return {"description": reason, "file": file, "expect": error, "stage": stage, "data_key": key}


def bad_header(reason: str, file: bytes) -> Vector:
    return fail("FormatError", "header", reason, file)


def bad_open(reason: str, file: bytes, key: bytes = DATA_KEY) -> Vector:
    return fail("IntegrityError", "open", reason, file, key)


def bad_payload(reason: str, file: bytes) -> Vector:
    return fail("IntegrityError", "payload", reason, file)


def three_chunks() -> tuple[Spec, bytes, list[bytes]]:
    """A file of two full chunks and a short final one, as (spec, header, chunk records)."""
    spec = Spec(plaintext=pattern(2 * CHUNK + 100))
    unsigned, mac_key = header(spec)
    return spec, tagged(unsigned, mac_key), chunks(spec)


def malformed(**changes: object) -> bytes:
    """A file whose header breaks one rule but is otherwise correct (tag computed over it)."""
    return file_bytes(dataclasses.replace(Spec(plaintext=b"x"), **changes))  # type: ignore[arg-type]


@vector
def ok_empty() -> Vector:
    return ok("empty plaintext: one empty final chunk", Spec())


@vector
def ok_one_byte() -> Vector:
    return ok("one byte: one short final chunk", Spec(plaintext=b"\x2a"))


@vector
def ok_exact_chunk() -> Vector:
    return ok("exactly one chunk: the full chunk is the final one", Spec(plaintext=pattern(CHUNK)))


@vector
def ok_chunk_plus_one() -> Vector:
    return ok("one full chunk, then a 1-byte final chunk", Spec(plaintext=pattern(CHUNK + 1)))


@vector
def ok_two_chunks_exact() -> Vector:
    return ok("two full chunks, the second final; no empty chunk after", Spec(plaintext=pattern(2 * CHUNK)))


@vector
def ok_three_chunks_short_final() -> Vector:
    return ok("two full chunks and a short final chunk", three_chunks()[0])


@vector
def ok_two_wrapped_keys() -> Vector:
    return ok("two stanzas (two CMKs wrapping the same data key)", Spec(b"two", stanzas=(STANZA, STANZA_2)))


@vector
def ok_64_wrapped_keys() -> Vector:
    stanzas = tuple((b"acs-kms", f"{ARN}-{i}".encode(), b"v", bytes([i + 1]) * 32) for i in range(64))
    return ok("the maximum of 64 stanzas", Spec(b"many", stanzas=stanzas))


@vector
def ok_context_empty() -> Vector:
    return ok("no encryption context pairs", Spec(b"no context", context=()))


@vector
def ok_context_unicode() -> Vector:
    context = (
        ("Zone", "上海"),
        ("app", ""),
        ("café", "naïve"),
        ("日本", "東京 🗼"),
    )
    spec = Spec(b"unicode", context=tuple((k.encode(), v.encode()) for k, v in context))
    return ok("UTF-8 context sorted by key bytes (uppercase < lowercase < non-ASCII), empty value", spec)


@vector
def ok_context_max_size() -> Vector:
    spec = Spec(b"big context", context=((b"k", b"v" * 8191),))
    return ok("context of exactly 8192 key+value bytes", spec)


@vector
def ok_chunk_size_16mib() -> Vector:
    return ok("largest chunk size (2^24), short plaintext", Spec(pattern(100), log2=24))


@vector
def ok_rewrapped() -> Vector:
    """The header of ok_chunk_plus_one's payload with other stanzas and a recomputed tag."""
    spec = Spec(plaintext=pattern(CHUNK + 1), stanzas=(STANZA_2,))
    return ok("stanzas replaced after encryption (rewrap): same salt, commitment, payload", spec)


@vector
def empty_file() -> Vector:
    return bad_header("zero bytes: not a kmsenv file", b"")


@vector
def truncated_header_length_field() -> Vector:
    return bad_header("input ends inside the header length field", file_bytes(Spec())[:10])


@vector
def truncated_header() -> Vector:
    return bad_header("input ends inside the stanzas", file_bytes(Spec())[:150])


@vector
def bad_magic() -> Vector:
    return bad_header("magic is not KMSENV NUL", malformed(magic=b"KMSENW\x00\x01"))


@vector
def bad_version() -> Vector:
    return bad_header("format version 3 is unknown", malformed(magic=b"KMSENV\x00\x03"))


@vector
def bad_suite() -> Vector:
    return bad_header("algorithm suite 2 is unknown", malformed(suite=2))


@vector
def header_length_over_limit() -> Vector:
    data = bytearray(file_bytes(Spec()))
    data[8:12] = struct.pack(">I", 64 * 1024 + 1)
    return bad_header("declared header length over 64 KiB, refused before reading on", bytes(data))


@vector
def header_length_huge() -> Vector:
    return bad_header("declared header length 2^32-1 with nothing after it", b"KMSENV\x00\x01\xff\xff\xff\xff")


@vector
def header_length_under_minimum() -> Vector:
    data = bytearray(file_bytes(Spec()))
    data[8:12] = struct.pack(">I", 100)
    return bad_header("declared header length below the smallest possible header", bytes(data))


@vector
def header_length_too_short() -> Vector:
    return bad_header("declared length one byte short of the fields", malformed(length_delta=-1))


@vector
def noncanonical_header_padding() -> Vector:
    return bad_header("zero bytes between the stanzas and the tag", malformed(padding=b"\x00" * 4, length_delta=0))


@vector
def chunk_size_too_large() -> Vector:
    return bad_header("chunk size 2^25 over the 16 MiB limit", malformed(log2=25))


@vector
def chunk_size_too_small() -> Vector:
    return bad_header("chunk size 2^11 under the 4 KiB limit", malformed(log2=11))


@vector
def no_wrapped_keys() -> Vector:
    return bad_header("zero stanzas", malformed(stanzas=()))


@vector
def too_many_wrapped_keys() -> Vector:
    return bad_header("65 stanzas, over the limit of 64", malformed(stanzas=(STANZA,) * 65))


@vector
def stanza_count_overruns_header() -> Vector:
    return bad_header("stanza count says 2, one stanza present", malformed(stanza_count=2))


@vector
def stanza_provider_empty() -> Vector:
    return bad_header("empty provider id", malformed(stanzas=((b"", *STANZA[1:]),)))


@vector
def stanza_provider_not_ascii() -> Vector:
    return bad_header("provider id with a space", malformed(stanzas=((b"acs kms", *STANZA[1:]),)))


@vector
def stanza_arn_empty() -> Vector:
    return bad_header("empty key ARN", malformed(stanzas=((STANZA[0], b"", *STANZA[2:]),)))


@vector
def stanza_blob_empty() -> Vector:
    return bad_header("empty CiphertextBlob", malformed(stanzas=((*STANZA[:3], b""),)))


@vector
def stanza_blob_too_large() -> Vector:
    return bad_header("CiphertextBlob of 4097 bytes", malformed(stanzas=((*STANZA[:3], b"\x00" * 4097),)))


@vector
def context_count_overruns_header() -> Vector:
    return bad_header("context count larger than the pairs present", malformed(context_count=40000))


@vector
def context_not_sorted() -> Vector:
    return bad_header("context keys out of byte order", malformed(context=tuple(reversed(CONTEXT))))


@vector
def context_duplicate_key() -> Vector:
    return bad_header("the same context key twice", malformed(context=((b"app", b"a"), (b"app", b"b"))))


@vector
def context_empty_key() -> Vector:
    return bad_header("an empty context key", malformed(context=((b"", b"v"),)))


@vector
def context_too_large() -> Vector:
    return bad_header("8193 context key+value bytes", malformed(context=((b"k", b"v" * 8192),)))


@vector
def context_invalid_utf8() -> Vector:
    return bad_header("context value is not UTF-8", malformed(context=((b"app", b"\xff"),)))


@vector
def noncanonical_utf8_overlong() -> Vector:
    return bad_header("context key with an overlong UTF-8 form of '/'", malformed(context=((b"\xc0\xaf", b"v"),)))


@vector
def noncanonical_utf8_surrogate() -> Vector:
    return bad_header(
        "key ARN with a UTF-8-encoded surrogate (CESU-8)",
        malformed(stanzas=((STANZA[0], b"\xed\xa0\x80", *STANZA[2:]),)),
    )


@vector
def bad_header_tag() -> Vector:
    data = file_bytes(Spec(plaintext=b"x"))
    header_size = len(data) - (1 + 16)
    return bad_open("last bit of the header tag flipped", flip(data, header_size - 1, 7))


@vector
def bad_commitment() -> Vector:
    spec = Spec(plaintext=b"x")
    right = derive(DATA_KEY, spec, b"commitment")
    unsigned, mac_key = header(spec, commitment=flip(right, 0))
    # The tag is valid for the altered bytes: only the commitment check can catch this.
    return bad_open("commitment altered, tag recomputed to match", tagged(unsigned, mac_key) + b"".join(chunks(spec)))


@vector
def wrong_data_key() -> Vector:
    return bad_open("a valid file opened with another 32-byte data key", file_bytes(Spec(plaintext=b"x")), OTHER_KEY)


@vector
def data_key_wrong_length() -> Vector:
    return fail("FormatError", "open", "a 16-byte data key for suite 1", file_bytes(Spec(b"x")), DATA_KEY[:16])


@vector
def context_modified() -> Vector:
    data = file_bytes(Spec(plaintext=b"x"))
    at = data.index(b"kmsenv-vectors")
    return bad_open("one context value byte changed, tag not recomputed", flip(data, at))


@vector
def stanza_modified() -> Vector:
    data = file_bytes(Spec(plaintext=b"x"))
    at = data.index(b"wrapped data key")
    return bad_open("one CiphertextBlob byte changed: stanzas are authenticated", flip(data, at))


@vector
def chunk_size_modified() -> Vector:
    data = file_bytes(Spec(plaintext=b"x"))
    return bad_open("chunk size byte changed from 2^12 to 2^13", flip(data, 14, 0))


@vector
def bad_chunk_tag() -> Vector:
    _spec, head, recs = three_chunks()
    recs[1] = flip(recs[1], len(recs[1]) - 1)
    return bad_payload("tag of the second chunk altered", head + b"".join(recs))


@vector
def bad_chunk_ciphertext() -> Vector:
    _spec, head, recs = three_chunks()
    recs[0] = flip(recs[0], 100, 3)
    return bad_payload("one ciphertext bit of the first chunk flipped", head + b"".join(recs))


@vector
def header_only() -> Vector:
    return bad_payload("a valid header and no chunks at all", three_chunks()[1])


@vector
def truncated_at_chunk_boundary() -> Vector:
    _spec, head, recs = three_chunks()
    return bad_payload("ends after the first full chunk", head + recs[0])


@vector
def truncated_mid_chunk() -> Vector:
    _spec, head, recs = three_chunks()
    return bad_payload("ends in the middle of the second chunk", head + recs[0] + recs[1][:2000])


@vector
def truncated_mid_tag() -> Vector:
    _spec, head, recs = three_chunks()
    return bad_payload("ends inside the final chunk's tag", (head + b"".join(recs))[:-5])


@vector
def truncated_to_tag_fragment() -> Vector:
    _spec, head, recs = three_chunks()
    return bad_payload(
        "after two full chunks only 10 bytes: shorter than a tag", head + recs[0] + recs[1] + recs[2][:10]
    )


@vector
def trailing_bytes() -> Vector:
    _spec, head, recs = three_chunks()
    return bad_payload("one byte after the final chunk", head + b"".join(recs) + b"\x00")


@vector
def appended_chunk() -> Vector:
    spec, head, recs = three_chunks()
    extra = seal(DATA_KEY, spec, 3, True, b"more")
    return bad_payload("a validly sealed 4th chunk after the final one", head + b"".join(recs) + extra)


@vector
def swapped_chunks() -> Vector:
    _spec, head, recs = three_chunks()
    return bad_payload("first and second chunks swapped", head + recs[1] + recs[0] + recs[2])


@vector
def duplicate_chunk() -> Vector:
    _spec, head, recs = three_chunks()
    return bad_payload("first chunk repeated", head + recs[0] + recs[0] + recs[1] + recs[2])


@vector
def dropped_middle_chunk() -> Vector:
    _spec, head, recs = three_chunks()
    return bad_payload("second chunk removed", head + recs[0] + recs[2])


@vector
def dropped_final_chunk() -> Vector:
    spec = Spec(plaintext=pattern(2 * CHUNK))
    unsigned, mac_key = header(spec)
    return bad_payload("two-chunk file without its (full) final chunk", tagged(unsigned, mac_key) + chunks(spec)[0])


@vector
def final_flag_on_middle_chunk() -> Vector:
    spec, head, recs = three_chunks()
    recs[1] = seal(DATA_KEY, spec, 1, True, spec.plaintext[CHUNK : 2 * CHUNK])
    return bad_payload("second chunk sealed as final but followed by a third", head + b"".join(recs))


@vector
def missing_final_flag() -> Vector:
    spec, head, recs = three_chunks()
    recs[2] = seal(DATA_KEY, spec, 2, False, spec.plaintext[2 * CHUNK :])
    return bad_payload("last chunk sealed without the final flag", head + b"".join(recs))


@vector
def noncanonical_empty_final_chunk() -> Vector:
    spec = Spec(plaintext=pattern(2 * CHUNK))
    unsigned, mac_key = header(spec)
    recs = [
        seal(DATA_KEY, spec, 0, False, spec.plaintext[:CHUNK]),
        seal(DATA_KEY, spec, 1, False, spec.plaintext[CHUNK:]),
    ]
    recs.append(seal(DATA_KEY, spec, 2, True, b""))
    return bad_payload(
        "two full chunks then an empty final chunk (valid tags)", tagged(unsigned, mac_key) + b"".join(recs)
    )


@vector
def chunk_from_other_file() -> Vector:
    spec, head, recs = three_chunks()
    other = dataclasses.replace(spec, salt_label="another file")
    recs[1] = chunks(other)[1]
    return bad_payload("second chunk taken from a file with the same data key, other salt", head + b"".join(recs))


# --- format v2: the same immutable part, wrapped keys in two slots -------------------------------

V2_MAGIC = b"KMSENV\x00\x02"
SLOT_OVERHEAD = 8 + 32 + 16  # generation, tag, check


def v2_capacity(section_size: int) -> int:
    """docs/format.md §9.10: max(1024, 2 x stanza section), rounded up to 256, at most 65536."""
    capacity = max(1024, 2 * section_size)
    return min(-(-capacity // 256) * 256, 65536)


@dataclasses.dataclass
class Slot:
    """One v2 slot: generation and stanzas (in a Spec, for its stanza section), padding override."""

    generation: int
    stanzas: tuple[tuple[bytes, bytes, bytes, bytes], ...] = (STANZA,)
    stanza_count: int | None = None
    pad: bytes | None = None  # None: zeros up to the capacity
    spec: Spec | None = None  # another file's immutable fields (salt...), for a transplanted slot


def v2_immutable(
    spec: Spec, capacity: int, key: bytes = DATA_KEY, length_delta: int = 0, commitment: bytes | None = None
) -> bytes:
    if commitment is None:
        commitment = derive(key, spec, b"commitment")
    context = spec.context_section()
    slot_size = capacity + SLOT_OVERHEAD
    length = 8 + 4 + 2 + 1 + 32 + 32 + len(context) + 2 * slot_size + length_delta
    return V2_MAGIC + struct.pack(">IHB", length, spec.suite, spec.log2) + spec.salt + commitment + context


def v2_slot(spec: Spec, slot: Slot, capacity: int, key: bytes = DATA_KEY, immutable: bytes | None = None) -> bytes:
    """generation ‖ stanza section ‖ zero padding ‖ HMAC(mac key, immutable ‖ those) ‖ SHA-256 check."""
    own = slot.spec or spec
    if immutable is None:
        immutable = v2_immutable(own, capacity, key)
    section = dataclasses.replace(own, stanzas=slot.stanzas, stanza_count=slot.stanza_count).stanza_section()
    pad = bytes(capacity - len(section)) if slot.pad is None else slot.pad
    body = struct.pack(">Q", slot.generation) + section + pad
    tag = _crypto.hmac_sha256(derive(key, own, b"header-mac"), immutable + body)
    return body + tag + hashlib.sha256(body + tag).digest()[:16]


def v2_header(
    spec: Spec,
    slots: tuple[Slot | bytes | None, Slot | bytes | None],
    capacity: int | None = None,
    key: bytes = DATA_KEY,
    **immutable_args: object,
) -> bytes:
    """The v2 header region: immutable part, slot A, slot B (None: an unused, all-zero slot)."""
    if capacity is None:
        capacity = v2_capacity(len(spec.stanza_section()))
    immutable = v2_immutable(spec, capacity, key, **immutable_args)  # type: ignore[arg-type]
    out = [immutable]
    for slot in slots:
        if slot is None:
            out.append(bytes(capacity + SLOT_OVERHEAD))
        elif isinstance(slot, bytes):
            out.append(slot)
        else:
            out.append(v2_slot(spec, slot, capacity, key, immutable if slot.spec is None else None))
    return b"".join(out)


def v2_file(spec: Spec, slots: tuple[Slot | bytes | None, Slot | bytes | None] | None = None, **kw: object) -> bytes:
    """A v2 file; by default as a writer creates it: the stanzas in slot A, generation 1, B unused."""
    return v2_header(spec, slots or (Slot(1, spec.stanzas), None), **kw) + b"".join(chunks(spec))  # type: ignore[arg-type]


def v2_ok(description: str, spec: Spec, data: bytes, generation: int, rewrap_of: str | None = None) -> Vector:
    v = ok(description, spec)
    v["file"] = data
    v["selected_generation"] = generation
    if rewrap_of is not None:
        v["rewrap_of"] = rewrap_of
    return v


def torn(new: bytes, old: bytes, cut: int) -> bytes:
    """A slot whose write of ``new`` over ``old`` stopped after ``cut`` bytes."""
    return new[:cut] + old[cut:]


ONE_BYTE = Spec(plaintext=b"\x2a")
TWO_KEYS = (STANZA, STANZA_2)
CAP = v2_capacity(len(ONE_BYTE.stanza_section()))


def slot_of(spec: Spec, generation: int, stanzas: tuple[tuple[bytes, bytes, bytes, bytes], ...]) -> bytes:
    return v2_slot(spec, Slot(generation, stanzas), CAP, immutable=v2_immutable(spec, CAP))


@vector
def v2_ok_empty() -> Vector:
    spec = Spec()
    return v2_ok(
        "v2, as written: empty plaintext, stanzas in slot A (generation 1), slot B unused", spec, v2_file(spec), 1
    )


@vector
def v2_ok_one_byte() -> Vector:
    return v2_ok("v2, as written: one byte", ONE_BYTE, v2_file(ONE_BYTE), 1)


@vector
def v2_ok_three_chunks_short_final() -> Vector:
    spec = three_chunks()[0]
    return v2_ok(
        "v2, as written: two full chunks and a short final one after the header region", spec, v2_file(spec), 1
    )


@vector
def v2_ok_two_wrapped_keys() -> Vector:
    spec = Spec(b"two", stanzas=TWO_KEYS)
    return v2_ok("v2, as written: two stanzas", spec, v2_file(spec), 1)


@vector
def v2_ok_context_empty() -> Vector:
    spec = Spec(b"no context", context=())
    return v2_ok("v2, as written: no encryption context pairs", spec, v2_file(spec), 1)


@vector
def v2_ok_64_wrapped_keys() -> Vector:
    stanzas = tuple((b"acs-kms", f"{ARN}-{i}".encode(), b"v", bytes([i + 1]) * 32) for i in range(64))
    spec = Spec(b"many", stanzas=stanzas)
    return v2_ok("v2, as written: 64 stanzas; the slots are twice the stanza section", spec, v2_file(spec), 1)


def added_key_state() -> bytes:
    return v2_header(ONE_BYTE, (Slot(1), Slot(2, TWO_KEYS)), CAP)


@vector
def v2_rewrap_added_key() -> Vector:
    data = added_key_state() + b"".join(chunks(ONE_BYTE))
    return v2_ok(
        "rewrap in place adding a key: slot B written with generation 2; slot A (generation 1) kept as it was",
        ONE_BYTE,
        data,
        2,
        "v2_ok_one_byte",
    )


@vector
def v2_rewrap_removed_key() -> Vector:
    only = (STANZA_2,)
    data = v2_header(ONE_BYTE, (Slot(3, only), Slot(4, only)), CAP) + b"".join(chunks(ONE_BYTE))
    return v2_ok(
        "rewrap in place removing a key: slot A written (generation 3), then slot B overwritten (generation 4)",
        ONE_BYTE,
        data,
        4,
        "v2_rewrap_added_key",
    )


@vector
def v2_rewrap_from_v1() -> Vector:
    spec = Spec(plaintext=pattern(CHUNK + 1), stanzas=(STANZA_2,))
    return v2_ok(
        "rewrap of the v1 file ok_chunk_plus_one: a new v2 region, the same payload bytes",
        spec,
        v2_file(spec),
        1,
        "ok_chunk_plus_one",
    )


@vector
def v2_torn_new_slot() -> Vector:
    new = slot_of(ONE_BYTE, 2, TWO_KEYS)
    data = v2_header(ONE_BYTE, (Slot(1), torn(new, bytes(len(new)), len(new) // 2)), CAP)
    return v2_ok(
        "slot B torn halfway through its first write: slot A (generation 1) is used",
        ONE_BYTE,
        data + b"".join(chunks(ONE_BYTE)),
        1,
    )


@vector
def v2_torn_after_generation() -> Vector:
    new = slot_of(ONE_BYTE, 2, TWO_KEYS)
    data = v2_header(ONE_BYTE, (Slot(1), torn(new, bytes(len(new)), 8)), CAP)
    return v2_ok(
        "only slot B's new generation was written: its check fails, slot A is used",
        ONE_BYTE,
        data + b"".join(chunks(ONE_BYTE)),
        1,
    )


@vector
def v2_torn_purge() -> Vector:
    only = (STANZA_2,)
    old_b = slot_of(ONE_BYTE, 2, TWO_KEYS)
    new_b = slot_of(ONE_BYTE, 4, only)
    data = v2_header(ONE_BYTE, (Slot(3, only), torn(new_b, old_b, 100)), CAP)
    return v2_ok(
        "interrupted overwrite of the old slot after a removal: the new slot A (generation 3) is used",
        ONE_BYTE,
        data + b"".join(chunks(ONE_BYTE)),
        3,
    )


@vector
def v2_garbled_spare_slot() -> Vector:
    data = v2_header(ONE_BYTE, (Slot(1), b"\xff" * (CAP + SLOT_OVERHEAD)), CAP)
    return v2_ok(
        "slot B is garbage (not intact): ignored, slot A is used", ONE_BYTE, data + b"".join(chunks(ONE_BYTE)), 1
    )


@vector
def v2_generation_not_position() -> Vector:
    data = v2_header(ONE_BYTE, (Slot(7, (STANZA_2,)), Slot(6, TWO_KEYS)), CAP)
    return v2_ok(
        "both slots intact: the higher generation wins (slot A, 7, over slot B, 6)",
        ONE_BYTE,
        data + b"".join(chunks(ONE_BYTE)),
        7,
    )


def v2_bad(
    error: str, stage: str, reason: str, header_bytes: bytes, *, spec: Spec = ONE_BYTE, key: bytes = DATA_KEY
) -> Vector:
    return fail(error, stage, reason, header_bytes + b"".join(chunks(spec)), key)


@vector
def v2_both_slots_torn() -> Vector:
    new_b = slot_of(ONE_BYTE, 2, TWO_KEYS)
    a = slot_of(ONE_BYTE, 1, (STANZA,))
    data = v2_header(ONE_BYTE, (torn(b"\x00" * len(a), a, 40), torn(new_b, bytes(len(new_b)), 300)), CAP)
    return v2_bad("IntegrityError", "header", "neither slot intact (both torn): nothing to authenticate", data)


@vector
def v2_no_slot_written() -> Vector:
    return v2_bad("IntegrityError", "header", "both slots all zero", v2_header(ONE_BYTE, (None, None), CAP))


@vector
def v2_nonzero_padding() -> Vector:
    section = len(ONE_BYTE.stanza_section())
    pad = bytes(CAP - section - 1) + b"\x01"
    data = v2_header(ONE_BYTE, (Slot(1, pad=pad), None), CAP)
    return v2_bad(
        "FormatError", "header", "slot A intact (check and tag recomputed) but its padding ends in 0x01", data
    )


@vector
def v2_equal_generations() -> Vector:
    data = v2_header(ONE_BYTE, (Slot(2), Slot(2, TWO_KEYS)), CAP)
    return v2_bad("FormatError", "header", "both slots intact with generation 2", data)


@vector
def v2_generation_zero() -> Vector:
    data = v2_header(ONE_BYTE, (Slot(0), None), CAP)
    return v2_bad("FormatError", "header", "an intact slot with generation 0", data)


@vector
def v2_no_wrapped_keys() -> Vector:
    return v2_bad(
        "FormatError", "header", "an intact slot with zero stanzas", v2_header(ONE_BYTE, (Slot(1, ()), None), CAP)
    )


@vector
def v2_stanza_count_overruns() -> Vector:
    data = v2_header(ONE_BYTE, (Slot(1, stanza_count=2), None), CAP)
    return v2_bad("FormatError", "header", "stanza count says 2, one stanza present (then zero padding)", data)


@vector
def v2_stanzas_overrun_slot() -> Vector:
    """A slot whose stanza section is 20 bytes longer than its capacity: the cursor stops at the tag."""
    big = (b"acs-kms", ARN.encode(), b"v", b"\x03" * 40)
    spec = dataclasses.replace(ONE_BYTE, stanzas=(big,))
    section = spec.stanza_section()
    capacity = len(section) - 20
    immutable = v2_immutable(spec, capacity)
    body = struct.pack(">Q", 1) + section[:capacity]
    tag = _crypto.hmac_sha256(derive(DATA_KEY, spec, b"header-mac"), immutable + body)
    a = body + tag + hashlib.sha256(body + tag).digest()[:16]
    return v2_bad(
        "FormatError",
        "header",
        "a stanza runs past the slot's capacity into its tag",
        v2_header(spec, (a, None), capacity),
        spec=spec,
    )


@vector
def v2_odd_slot_region() -> Vector:
    data = v2_header(ONE_BYTE, (Slot(1), None), CAP, length_delta=1) + b"\x00"
    return v2_bad("FormatError", "header", "one byte more after the context than two equal slots", data)


@vector
def v2_slot_too_small() -> Vector:
    data = v2_header(ONE_BYTE, (None, None), 10)
    return v2_bad("FormatError", "header", "slots of 66 bytes, under the 67-byte minimum", data)


@vector
def v2_slot_too_large() -> Vector:
    data = v2_header(ONE_BYTE, (Slot(1), None), 65537)
    return v2_bad("FormatError", "header", "slots with capacity 65537, over the 65536 limit", data)


@vector
def v2_header_length_over_limit() -> Vector:
    head = V2_MAGIC + struct.pack(">I", 256 * 1024 + 1)
    return bad_header("v2 header length 256 KiB + 1, refused before reading on", head + bytes(200))


@vector
def v2_truncated_region() -> Vector:
    data = v2_header(ONE_BYTE, (Slot(1), None), CAP)
    return bad_header("input ends inside slot B", data[:-10])


@vector
def v2_bad_slot_tag() -> Vector:
    a = slot_of(ONE_BYTE, 1, (STANZA,))
    b = bytearray(slot_of(ONE_BYTE, 2, TWO_KEYS))
    tag_at = len(b) - 16 - 1
    b[tag_at] ^= 1
    b[-16:] = hashlib.sha256(bytes(b[:-16])).digest()[:16]
    data = v2_header(ONE_BYTE, (a, bytes(b)), CAP)
    return v2_bad(
        "IntegrityError", "open", "slot B intact (check recomputed) but its tag is wrong: no fallback to slot A", data
    )


@vector
def v2_wrong_data_key() -> Vector:
    return v2_bad(
        "IntegrityError",
        "open",
        "a valid v2 file opened with another data key",
        v2_header(ONE_BYTE, (Slot(1), None), CAP),
        key=OTHER_KEY,
    )


@vector
def v2_context_modified() -> Vector:
    data = v2_header(ONE_BYTE, (Slot(1), None), CAP)
    return v2_bad(
        "IntegrityError",
        "open",
        "one context byte changed: the immutable part is under every slot tag",
        flip(data, data.index(b"kmsenv-vectors")),
    )


@vector
def v2_commitment_modified() -> Vector:
    right = derive(DATA_KEY, ONE_BYTE, b"commitment")
    data = v2_header(ONE_BYTE, (Slot(1), None), CAP, commitment=flip(right, 0))
    return v2_bad("IntegrityError", "open", "commitment altered, slot tag and check recomputed to match", data)


@vector
def v2_slot_from_other_file() -> Vector:
    other = dataclasses.replace(ONE_BYTE, salt_label="another file")
    data = v2_header(ONE_BYTE, (Slot(1, spec=other), None), CAP)
    return v2_bad("IntegrityError", "open", "slot A taken from a file with the same data key and another salt", data)


@vector
def v2_header_only() -> Vector:
    return fail(
        "IntegrityError", "payload", "a valid v2 header region and no chunks", v2_header(ONE_BYTE, (Slot(1), None), CAP)
    )


@vector
def v2_payload_truncated() -> Vector:
    spec = three_chunks()[0]
    return fail(
        "IntegrityError",
        "payload",
        "v2 file cut at the first chunk boundary after the region",
        v2_file(spec)[: -(REC_FINAL + REC)],
    )


REC = CHUNK + 16
REC_FINAL = 100 + 16


# --- output ----------------------------------------------------------------------------------------


def render(name: str, v: Vector) -> str:
    """One vector as the JSON text stored in ``<name>.json``."""
    record: dict[str, object] = {"name": name, "data_key": DATA_KEY.hex()}
    for field, value in v.items():
        record[field] = value.hex() if field == "data_key" and isinstance(value, bytes) else value
    data = v["file"]
    del record["file"]
    if not isinstance(data, bytes):
        raise TypeError(name)
    record["file_base64"] = base64.b64encode(data).decode()
    record["file_size"] = len(data)
    return json.dumps(record, indent=2, ensure_ascii=False) + "\n"


def vectors() -> dict[str, str]:
    """File name -> contents, for every vector."""
    return {f"{name}.json": render(name, fn()) for name, fn in sorted(_VECTORS.items())}


def main() -> int:
    wanted = vectors()
    for stale in HERE.glob("*.json"):
        if stale.name not in wanted:
            stale.unlink()
    for name, text in wanted.items():
        (HERE / name).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
