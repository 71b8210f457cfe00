"""Header codec and per-file keys: canonical round trips, limits before allocation, authentication."""

from __future__ import annotations

import dataclasses
import io
import pickle
import struct
from typing import BinaryIO, cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kmsenv.errors import FormatError, IntegrityError
from kmsenv.format import (
    DEFAULT_CHUNK_SIZE,
    MAGIC,
    MAX_HEADER_SIZE,
    FileKey,
    Header,
    KeyStanza,
    looks_like_v1,
    new_header,
    open_header,
    parse_header,
    read_header,
    rewrap_header,
)
from kmsenv.format.header import MAX_BLOB_SIZE, MAX_CONTEXT_BYTES, MAX_HEADER_SIZE_V2, MAX_STANZAS, slot_check
from kmsenv.format.keys import _new_header

KEY = bytes(range(32))
ARN = "acs:kms:cn-hangzhou:1234567890123456:key/key-hzz6f8a9e1b2c3d4e5f60"
STANZA = KeyStanza("acs-kms", ARN, "key-version-1", b"\x07" * 80)
OTHER = KeyStanza("acs-kms", ARN.replace("hangzhou", "beijing"), "key-version-9", b"\x09" * 96)


def make(context: dict[str, str] | None = None, stanzas: tuple[KeyStanza, ...] = (STANZA,)) -> tuple[Header, FileKey]:
    return new_header(KEY, stanzas=stanzas, context=context or {"app": "test"}, chunk_size=4096)


def make_v1(
    context: dict[str, str] | None = None, stanzas: tuple[KeyStanza, ...] = (STANZA,)
) -> tuple[Header, FileKey]:
    """A v1 header, as files written before v2 have (readers accept them forever)."""
    return _new_header(
        KEY, stanzas=stanzas, context=context or {"app": "test"}, chunk_size=4096, salt=bytes(32), version=1
    )


class Feeder(io.RawIOBase):
    """A source that records every read size and hands out at most 7 bytes per read (like a pipe)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.requests: list[int] = []

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        self.requests.append(len(buf))
        n = min(len(buf), 7, len(self.data) - self.pos)
        buf[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def as_binary(raw: io.RawIOBase) -> BinaryIO:
    """Raw streams are what pipes are; the API's BinaryIO annotation does not list them."""
    return cast(BinaryIO, raw)


# --- canonical encoding --------------------------------------------------------------------------

text = st.text(st.characters(exclude_categories=["Cs"]), max_size=12)
contexts = st.dictionaries(text.filter(bool), text, max_size=6)
stanzas = st.builds(
    KeyStanza,
    provider=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=10),
    key_arn=text.filter(bool),
    key_version_id=text,
    ciphertext_blob=st.binary(min_size=1, max_size=64),
)


@settings(max_examples=200, deadline=None)
@given(context=contexts, wrapped=st.lists(stanzas, min_size=1, max_size=4), log2=st.integers(12, 24))
def test_parse_of_encode_is_identity(context: dict[str, str], wrapped: list[KeyStanza], log2: int) -> None:
    header, _ = new_header(KEY, stanzas=wrapped, context=context, chunk_size=1 << log2)
    data = header.encode()
    parsed, used = parse_header(data + b"payload follows")
    assert used == len(data) == header.size
    assert parsed == header
    assert parsed.encode() == data
    assert list(parsed.context) == sorted(context, key=lambda k: k.encode())
    assert read_header(as_binary(Feeder(data + b"rest"))).encode() == data


def test_context_is_a_frozen_sorted_copy() -> None:
    source = {"b": "2", "a": "1", "B": "0"}
    header, _ = make(source)
    source["c"] = "3"
    assert list(header.context) == ["B", "a", "b"]
    with pytest.raises(TypeError):
        header.context["z"] = "x"  # type: ignore[index]


def test_read_header_reads_exactly_the_header() -> None:
    header, _ = make()
    src = io.BytesIO(header.encode() + b"NEXT")
    read_header(src)
    assert src.read() == b"NEXT"


def test_magic_and_detection() -> None:
    header, _ = make()
    assert MAGIC == b"KMSENV\x00\x02"  # writers produce v2
    assert header.encode().startswith(MAGIC)
    assert looks_like_v1(header.encode()[:8])  # the old name: "a kmsenv file this reader opens"
    assert looks_like_v1(make_v1()[0].encode()[:8])
    assert not looks_like_v1(b"KMSENV\x00\x03")
    assert not looks_like_v1(b"KMSENV")
    assert not looks_like_v1(b'{"json": 1}')


# --- limits, before allocation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("magic", "declared", "limit"),
    [
        (b"KMSENV\x00\x01", MAX_HEADER_SIZE + 1, MAX_HEADER_SIZE),
        (b"KMSENV\x00\x01", 2**32 - 1, MAX_HEADER_SIZE),
        (MAGIC, MAX_HEADER_SIZE_V2 + 1, MAX_HEADER_SIZE_V2),
        (MAGIC, 2**32 - 1, MAX_HEADER_SIZE_V2),
    ],
)
def test_header_length_over_limit_is_refused_after_reading_12_bytes(magic: bytes, declared: int, limit: int) -> None:
    src = Feeder(magic + struct.pack(">I", declared) + b"\x00" * 100)
    with pytest.raises(FormatError, match=f"over the {limit}-byte limit"):
        read_header(as_binary(src))
    assert src.pos == 12  # nothing past the length field was consumed
    assert max(src.requests) <= 12


def test_declared_length_bounds_every_read() -> None:
    header, _ = make()
    data = header.encode()
    src = Feeder(data + b"\x00" * 10_000)
    read_header(as_binary(src))
    assert sum(min(r, 7) for r in src.requests) == len(data)  # nothing read beyond the header
    assert max(src.requests) <= len(data)


@pytest.mark.parametrize("version", [1, 2])
def test_field_lengths_are_bounded_by_the_header(version: int) -> None:
    """A length prefix pointing past the header (v2: past its slot) raises FormatError, never IndexError."""
    header, _ = make() if version == 2 else make_v1()
    data = bytearray(header.encode())
    blob_len_at = data.index(STANZA.ciphertext_blob) - 2
    data[blob_len_at : blob_len_at + 2] = struct.pack(">H", MAX_BLOB_SIZE)
    if version == 2:  # an intact slot (check recomputed) that is malformed
        end = header.slot_offset(header.active) + header.slot_size
        data[end - 16 : end] = slot_check(bytes(data[end - header.slot_size : end - 16]))
    with pytest.raises(FormatError, match="truncated inside the CiphertextBlob"):
        parse_header(bytes(data))


def test_truncated_header_is_format_error_at_every_length() -> None:
    data = make()[0].encode()
    for n in range(len(data)):
        with pytest.raises(FormatError):
            read_header(io.BytesIO(data[:n]))
        with pytest.raises(FormatError):
            parse_header(data[:n])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stanzas": ()}, "1 to 64 wrapped keys"),
        ({"stanzas": (STANZA,) * (MAX_STANZAS + 1)}, "1 to 64 wrapped keys"),
        ({"context": {"k": "v" * MAX_CONTEXT_BYTES}}, "over the 8192-byte limit"),
        ({"context": {"": "v"}}, "context key must be 1 to"),
        ({"context": {"k": "\ud800"}}, "lone surrogate"),
        ({"chunk_size": 4096 * 3}, "power of two"),
        ({"chunk_size": 2048}, "power of two"),
        ({"chunk_size": 32 * 1024 * 1024}, "power of two"),
    ],
)
def test_writer_refuses_what_the_reader_would(kwargs: dict[str, object], match: str) -> None:
    args: dict[str, object] = {"stanzas": (STANZA,), "context": {}, "chunk_size": 4096} | kwargs
    with pytest.raises(FormatError, match=match):
        new_header(KEY, **args)  # type: ignore[arg-type]


def test_max_context_and_stanzas_fit() -> None:
    header, _ = new_header(KEY, stanzas=(STANZA,) * MAX_STANZAS, context={"k": "v" * (MAX_CONTEXT_BYTES - 1)})
    assert parse_header(header.encode())[0] == header
    assert header.size <= MAX_HEADER_SIZE_V2


def test_total_header_size_limit() -> None:
    big = KeyStanza("acs-kms", "a" * 2048, "v" * 256, b"\x00" * MAX_BLOB_SIZE)
    with pytest.raises(FormatError, match="over the 65536-byte limit"):
        make_v1(stanzas=(big,) * 20)
    with pytest.raises(FormatError, match="over the slot's capacity of 65536"):
        new_header(KEY, stanzas=(big,) * 20, context={})


@pytest.mark.parametrize(
    "bad",
    [
        {"provider": ""},
        {"provider": "acs kms"},
        {"provider": "ács"},
        {"provider": "p" * 65},
        {"key_arn": ""},
        {"key_version_id": "v" * 257},
        {"ciphertext_blob": b""},
        {"ciphertext_blob": b"\x00" * (MAX_BLOB_SIZE + 1)},
    ],
)
def test_stanza_validation(bad: dict[str, object]) -> None:
    fields: dict[str, object] = {"provider": "acs-kms", "key_arn": ARN, "key_version_id": "v", "ciphertext_blob": b"x"}
    with pytest.raises(FormatError):
        KeyStanza(**(fields | bad))  # type: ignore[arg-type]


@pytest.mark.parametrize("size", [0, 16, 31, 33, 64])
def test_data_key_must_be_32_bytes(size: int) -> None:
    with pytest.raises(FormatError, match="32-byte data key"):
        new_header(bytes(size), stanzas=(STANZA,), context={})
    header, _ = make()
    with pytest.raises(FormatError, match="32-byte data key"):
        open_header(header, bytes(size))


# --- authentication ------------------------------------------------------------------------------


def test_open_header_returns_a_key_and_rejects_another() -> None:
    header, _ = make()
    assert isinstance(open_header(header, KEY), FileKey)
    with pytest.raises(IntegrityError, match="header failed authentication"):
        open_header(header, bytes(reversed(KEY)))


@pytest.mark.parametrize("version", [1, 2])
def test_every_header_bit_is_authenticated(version: int) -> None:
    """Flip each bit of the header: parsing or opening must fail (no byte is unauthenticated),
    except in v2's spare slot, which is ignored when damaged and selects nothing."""
    header = (make if version == 2 else make_v1)({"app": "test", "tenant": "t1"}, (STANZA, OTHER))[0]
    data = header.encode()
    spare = range(0) if version == 1 else range(header.slot_offset(1), header.size)
    for bit in range(len(data) * 8):
        mutated = bytearray(data)
        mutated[bit // 8] ^= 1 << (bit % 8)
        if bit // 8 in spare:
            parsed = parse_header(bytes(mutated))[0]
            assert (parsed.stanzas, parsed.tag) == (header.stanzas, header.tag)
            open_header(parsed, KEY)
            continue
        with pytest.raises((FormatError, IntegrityError)):
            open_header(parse_header(bytes(mutated))[0], KEY)


def test_commitment_is_checked_even_with_a_valid_tag() -> None:
    """A header whose tag matches but whose commitment is not the key's is refused."""
    header, file_key = make()
    forged = dataclasses.replace(header, commitment=bytes(32))
    forged = dataclasses.replace(forged, tag=file_key.tag(forged))
    with pytest.raises(IntegrityError, match="header failed authentication"):
        open_header(forged, KEY)


def test_rewrap_replaces_stanzas_and_keeps_the_payload_key() -> None:
    header, file_key = make()
    rewrapped = rewrap_header(header, file_key, (OTHER, STANZA))
    assert rewrapped.stanzas == (OTHER, STANZA)
    assert (rewrapped.salt, rewrapped.commitment, rewrapped.context) == (header.salt, header.commitment, header.context)
    assert rewrapped.tag != header.tag
    reopened = open_header(parse_header(rewrapped.encode())[0], KEY)
    nonce = bytes(12)
    assert reopened.aead.encrypt(nonce, b"same key") == file_key.aead.encrypt(nonce, b"same key")


def test_rewrap_refuses_another_files_key() -> None:
    header, _ = make()
    _, other_key = make()
    with pytest.raises(IntegrityError):
        rewrap_header(header, other_key, (OTHER,))


def test_stanza_swap_without_retag_fails() -> None:
    """Stanzas are not KDF input but are tag input: replacing them needs the file key."""
    header, _ = make()
    swapped = dataclasses.replace(header, stanzas=(OTHER,))
    with pytest.raises(IntegrityError):
        open_header(swapped, KEY)


# --- handles leak nothing ------------------------------------------------------------------------


def test_file_key_is_opaque() -> None:
    header, file_key = make()
    assert repr(file_key) == "FileKey(<hidden>)"
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(file_key)
    assert KEY.hex() not in repr(header)
    assert STANZA.ciphertext_blob.hex() not in repr(header)
    assert "80 bytes" in repr(STANZA)


def test_default_chunk_size() -> None:
    header, file_key = new_header(KEY, stanzas=(STANZA,), context={})
    assert header.chunk_size == file_key.chunk_size == DEFAULT_CHUNK_SIZE
