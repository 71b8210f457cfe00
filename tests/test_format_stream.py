"""The chunk stream: round trips at every boundary, tamper/truncation/reordering detection, verified
release of plaintext, pipes and short reads, and identical output from the inline and parallel paths."""

from __future__ import annotations

import hashlib
import io
import os
import threading
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kmsenv.errors import FormatError, IntegrityError
from kmsenv.format import (
    CHUNK_TAG_SIZE,
    KeyStanza,
    decrypt_stream,
    encrypt_stream,
    new_header,
    open_header,
    payload_size,
    read_header,
)
from kmsenv.format import stream as stream_module
from kmsenv.format.keys import _new_header

KEY = hashlib.sha256(b"stream tests").digest()
CHUNK = 4096
REC = CHUNK + CHUNK_TAG_SIZE
STANZA = KeyStanza("acs-kms", "acs:kms:cn-hangzhou:1:key/k", "v1", b"blob")


@pytest.fixture(autouse=True)
def decrypt_pipeline_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """Decryption runs inline by default (measured faster); keep its pipelined path verified too."""
    monkeypatch.setattr(stream_module, "_DECRYPT_PIPELINE", True)


def data(n: int) -> bytes:
    return (hashlib.sha256(str(n).encode()).digest() * (n // 32 + 1))[:n]


def seal(plaintext: bytes, *, threads: int = 2, chunk: int = CHUNK, salt: bytes | None = None) -> bytes:
    """A whole file: header then payload."""
    if salt is None:
        header, file_key = new_header(KEY, stanzas=(STANZA,), context={"t": "1"}, chunk_size=chunk)
    else:
        header, file_key = _new_header(KEY, stanzas=(STANZA,), context={"t": "1"}, chunk_size=chunk, salt=salt)
    out = io.BytesIO()
    out.write(header.encode())
    assert encrypt_stream(io.BytesIO(plaintext), out, file_key, chunk_size=chunk, threads=threads) == len(plaintext)
    return out.getvalue()


def split(file: bytes) -> tuple[bytes, list[bytes]]:
    """(header bytes, chunk records)."""
    header = read_header(io.BytesIO(file))
    body = file[header.size :]
    return file[: header.size], [body[i : i + REC] for i in range(0, len(body), REC)]


def unseal(file: bytes, *, threads: int = 2, out: io.BytesIO | None = None) -> bytes:
    src = io.BytesIO(file)
    header = read_header(src)
    dst = io.BytesIO() if out is None else out
    n = decrypt_stream(src, dst, open_header(header, KEY), chunk_size=header.chunk_size, threads=threads)
    assert n == len(dst.getvalue())
    return dst.getvalue()


SIZES = sorted({0, 1, 15, 16, 17} | {k * CHUNK + d for k in range(1, 5) for d in (-1, 0, 1)})


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("size", SIZES)
def test_round_trip(size: int, threads: int) -> None:
    plaintext = data(size)
    file = seal(plaintext, threads=threads)
    head, records = split(file)
    assert len(file) - len(head) == payload_size(size, CHUNK)
    assert len(records) == max(1, -(-size // CHUNK))  # no empty chunk after a full final one
    assert unseal(file, threads=threads) == plaintext


@pytest.mark.parametrize("size", [0, 1, CHUNK, 3 * CHUNK + 5, 40 * CHUNK])
def test_parallel_output_is_identical(size: int) -> None:
    salt = bytes(range(32))
    outputs = {seal(data(size), threads=t, salt=salt) for t in (1, 2, 4)}
    assert len(outputs) == 1


def test_ciphertext_does_not_contain_plaintext() -> None:
    plaintext = b"secret!" * 2000
    assert b"secret!" not in seal(plaintext)


# --- tampering -----------------------------------------------------------------------------------


FILES = {n: seal(data(n)) for n in (0, 1, CHUNK, CHUNK + 1, 3 * CHUNK - 7)}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    size=st.sampled_from([0, 1, CHUNK, CHUNK + 1, 3 * CHUNK - 7]),
    where=st.floats(0, 1, exclude_max=True),
    bit=st.integers(0, 7),
    threads=st.sampled_from([1, 2]),
)
def test_any_bit_flip_fails(size: int, where: float, bit: int, threads: int) -> None:
    """Any flipped bit fails, except in the unused spare slot of the v2 header, which a reader
    ignores when damaged (it is the crash spare of in-place rewrap, docs/format.md §5)."""
    file = bytearray(FILES[size])
    at = int(where * len(file))
    file[at] ^= 1 << bit
    header = read_header(io.BytesIO(FILES[size]))
    spare = header.slot_offset(1 - header.active)
    if spare <= at < spare + header.slot_size:
        assert unseal(bytes(file), threads=threads) == data(size)
        return
    with pytest.raises((FormatError, IntegrityError)):
        unseal(bytes(file), threads=threads)


@pytest.mark.parametrize("threads", [1, 2])
def test_every_truncation_fails(threads: int) -> None:
    file = FILES[3 * CHUNK - 7]
    head = len(split(file)[0])
    cuts = set(range(head, head + 40)) | {head + k * REC + d for k in range(3) for d in (-1, 0, 1, 16, 17)}
    cuts |= set(range(len(file) - 40, len(file)))
    for cut in sorted(c for c in cuts if head <= c < len(file)):
        with pytest.raises(IntegrityError):
            unseal(file[:cut], threads=threads)


@pytest.mark.parametrize("extra", [b"\x00", b"\x00" * CHUNK_TAG_SIZE, b"\x00" * REC, b"\x00" * (REC + 1)])
@pytest.mark.parametrize("size", [0, CHUNK, CHUNK + 1])
def test_appended_bytes_fail(size: int, extra: bytes) -> None:
    with pytest.raises(IntegrityError):
        unseal(FILES[size] + extra)


def reorderings() -> Iterator[tuple[str, list[int]]]:
    yield "swap first two", [1, 0, 2]
    yield "swap last two", [0, 2, 1]
    yield "duplicate first", [0, 0, 1, 2]
    yield "duplicate middle", [0, 1, 1, 2]
    yield "duplicate final", [0, 1, 2, 2]
    yield "drop first", [1, 2]
    yield "drop middle", [0, 2]
    yield "drop final", [0, 1]
    yield "reverse", [2, 1, 0]


@pytest.mark.parametrize(("why", "order"), list(reorderings()))
@pytest.mark.parametrize("threads", [1, 2])
def test_reordered_chunks_fail(why: str, order: list[int], threads: int) -> None:
    head, records = split(FILES[3 * CHUNK - 7])
    with pytest.raises(IntegrityError):
        unseal(head + b"".join(records[i] for i in order), threads=threads)


def test_chunks_of_another_file_under_the_same_data_key_fail() -> None:
    """Per-file salts give per-file payload keys: splicing between files fails."""
    plaintext = data(3 * CHUNK - 7)
    head_a, recs_a = split(seal(plaintext))
    _, recs_b = split(seal(plaintext))
    with pytest.raises(IntegrityError):
        unseal(head_a + recs_a[0] + recs_b[1] + recs_a[2])


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_plaintext_is_released_only_up_to_the_first_bad_chunk(threads: int) -> None:
    plaintext = data(12 * CHUNK)
    head, records = split(seal(plaintext))
    records[2] = records[2][:-1] + bytes([records[2][-1] ^ 1])  # tamper the 3rd chunk's tag
    out = io.BytesIO()
    with pytest.raises(IntegrityError, match="payload failed authentication"):
        unseal(head + b"".join(records), threads=threads, out=out)
    assert out.getvalue() == plaintext[: 2 * CHUNK]


def test_failure_messages_are_one_opaque_text() -> None:
    """Truncation, extension, reordering and bit flips are indistinguishable to the caller."""
    file = FILES[3 * CHUNK - 7]
    head, recs = split(file)
    messages = set()
    for bad in (file[:-1], file + b"\x00", head + recs[1] + recs[0] + recs[2], file[:-3] + b"\x00\x00\x00"):
        with pytest.raises(IntegrityError) as info:
            unseal(bad)
        messages.add(str(info.value))
    assert messages == {"payload failed authentication"}


def test_empty_payload_fails() -> None:
    head, _ = split(FILES[0])
    with pytest.raises(IntegrityError):
        unseal(head)


# --- I/O shapes ----------------------------------------------------------------------------------


class Trickle(io.RawIOBase):
    """A readable that hands out 1000 bytes at most per call and has no seek (a pipe)."""

    def __init__(self, data: bytes) -> None:
        self._src = io.BytesIO(data)

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        return self._src.readinto(memoryview(buf)[:1000])


class ShortWriter(io.RawIOBase):
    """A writable that accepts at most 999 bytes per call, as a raw pipe may."""

    def __init__(self) -> None:
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        chunk = bytes(memoryview(b)[:999])
        self.data += chunk
        return len(chunk)


@pytest.mark.parametrize("threads", [1, 2])
def test_short_reads_and_short_writes(threads: int) -> None:
    plaintext = data(5 * CHUNK + 3)
    header, file_key = new_header(KEY, stanzas=(STANZA,), context={}, chunk_size=CHUNK)
    sink = ShortWriter()
    encrypt_stream(Trickle(plaintext), sink, file_key, chunk_size=CHUNK, threads=threads)  # type: ignore[arg-type]
    plain = ShortWriter()
    src = Trickle(header.encode() + bytes(sink.data))
    opened = open_header(read_header(src), KEY)  # type: ignore[arg-type]
    decrypt_stream(src, plain, opened, chunk_size=CHUNK, threads=threads)  # type: ignore[arg-type]
    assert bytes(plain.data) == plaintext


def test_real_pipes_both_ways() -> None:
    plaintext = data(7 * CHUNK + 100)
    header, file_key = new_header(KEY, stanzas=(STANZA,), context={}, chunk_size=CHUNK)
    r, w = os.pipe()

    def feed() -> None:
        with open(w, "wb") as sink:
            sink.write(header.encode())
            encrypt_stream(io.BytesIO(plaintext), sink, file_key, chunk_size=CHUNK)

    writer = threading.Thread(target=feed)
    writer.start()
    out = io.BytesIO()
    with open(r, "rb", buffering=0) as src:
        opened = open_header(read_header(src), KEY)
        decrypt_stream(src, out, opened, chunk_size=CHUNK)
    writer.join()
    assert out.getvalue() == plaintext


def test_arguments_are_checked() -> None:
    _, file_key = new_header(KEY, stanzas=(STANZA,), context={}, chunk_size=CHUNK)
    with pytest.raises(ValueError, match="chunk_size differs"):
        encrypt_stream(io.BytesIO(b""), io.BytesIO(), file_key, chunk_size=2 * CHUNK)
    with pytest.raises(ValueError, match="threads"):
        encrypt_stream(io.BytesIO(b""), io.BytesIO(), file_key, chunk_size=CHUNK, threads=0)


def test_memory_is_bounded_by_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    """Buffers are allocated once: a long stream never creates more slots than the window."""
    created = []
    original = stream_module._Slot.__init__

    def counting(self: object, size: int) -> None:
        created.append(size)
        original(self, size)  # type: ignore[arg-type]

    monkeypatch.setattr(stream_module._Slot, "__init__", counting)
    seal(data(200 * CHUNK), threads=2)
    assert len(created) <= stream_module._MAX_SLOTS < 200


class BrokenSink(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        raise OSError(28, "No space left on device")


class BrokenSource(Trickle):
    """Fails on the third read, like a disk error halfway through."""

    reads = 0

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        self.reads += 1
        if self.reads == 3:
            raise OSError(5, "Input/output error")
        return super().readinto(buf)


def writer_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "kmsenv-writer"]


@pytest.mark.parametrize("threads", [1, 2])
def test_io_errors_propagate_and_leave_no_thread(threads: int) -> None:
    _, file_key = new_header(KEY, stanzas=(STANZA,), context={}, chunk_size=CHUNK)
    with pytest.raises(OSError, match="No space"):
        encrypt_stream(io.BytesIO(data(40 * CHUNK)), BrokenSink(), file_key, chunk_size=CHUNK, threads=threads)  # type: ignore[arg-type]
    with pytest.raises(OSError, match="Input/output"):
        encrypt_stream(BrokenSource(data(40 * CHUNK)), io.BytesIO(), file_key, chunk_size=CHUNK, threads=threads)  # type: ignore[arg-type]
    assert writer_threads() == []
