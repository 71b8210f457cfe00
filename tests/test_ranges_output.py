"""How chunk ranges write their output: preallocated, and decrypted chunks in aligned pieces.

Large outputs of :func:`encrypt_ranges`/:func:`decrypt_ranges` get their blocks allocated up front
(a speed measure: docs/scale.md). It must ask for exactly the final size, on the output's own
descriptor, before any chunk is written; it must never change a byte written; a file system
without fallocate must be fine; and an output that cannot fit (ENOSPC) must fail before any work,
leaving nothing behind when it comes through ``encrypt_file``/``decrypt_file``.

Decrypted chunks are written in pieces of at most ``_WRITE_BYTES``, each starting at a multiple of
it (another speed measure), still only once verified, and the bytes must be the same; the stream
engine's decryption writes in such pieces too, and both engines write encrypted records whole.
"""

from __future__ import annotations

import errno
import io
import os
import sys
from pathlib import Path
from typing import Any

import pytest

from files_helpers import CHUNK, fixed_header, range_encrypted, stream_encrypted
from kmsenv import envelope
from kmsenv.clients import EmbeddedKms
from kmsenv.errors import IntegrityError, OutputError
from kmsenv.format import random_access, stream
from kmsenv.format.random_access import Layout, decrypt_ranges

SIZE = 40 * CHUNK + 7
Call = tuple[int, int, int, int]


@pytest.fixture
def small_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    """Preallocate from 4 chunks on (not 8 MiB), so that small test files take the path."""
    monkeypatch.setattr(random_access, "_PREALLOCATE_BYTES", 4 * CHUNK)


def recording(monkeypatch: pytest.MonkeyPatch, result: int = 0, err: int = 0) -> list[Call]:
    """Replace libc's fallocate with a recorder that returns ``result`` and sets errno ``err``."""
    import ctypes

    seen: list[Call] = []

    def fake(fd: int, mode: int, offset: int, length: int) -> int:
        seen.append((fd, mode, offset, length))
        # The file's size at this point tells whether any chunk was written before the call.
        seen.append((fd, -1, os.fstat(fd).st_size, 0))
        ctypes.set_errno(err)
        return result

    monkeypatch.setattr(random_access, "_libc_fallocate", lambda: fake)
    return seen


def encrypt(tmp_path: Path, plaintext: bytes) -> tuple[bytes, int, int]:
    return range_encrypted(tmp_path, plaintext, 2)


def decrypt(tmp_path: Path, file: bytes) -> tuple[bytes, int]:
    header, key = fixed_header()
    enc, dst = tmp_path / "in.enc", tmp_path / "out"
    enc.write_bytes(file)
    with enc.open("rb") as fin, dst.open("wb") as fout:
        layout = Layout.of_file(header.size, CHUNK, len(file))
        decrypt_ranges(fin.fileno(), fout.fileno(), key, layout, threads=2)
        fd = fout.fileno()
    return dst.read_bytes(), fd


def test_encrypt_preallocates_the_final_size_first(
    tmp_path: Path, small_threshold: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = recording(monkeypatch)
    plaintext = os.urandom(SIZE)
    out, fd, header_size = encrypt(tmp_path, plaintext)
    assert out == stream_encrypted(plaintext)
    # One call, mode 0 (allocate and extend), from 0 to the final size; only the header before it.
    assert calls == [(fd, 0, 0, len(out)), (fd, -1, header_size, 0)]


def test_decrypt_preallocates_the_plaintext_size_first(
    tmp_path: Path, small_threshold: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    plaintext = os.urandom(SIZE)
    file = stream_encrypted(plaintext)
    calls = recording(monkeypatch)
    out, fd = decrypt(tmp_path, file)
    assert out == plaintext
    assert calls == [(fd, 0, 0, SIZE), (fd, -1, 0, 0)]


def test_small_outputs_are_not_preallocated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = recording(monkeypatch)
    plaintext = os.urandom(SIZE)  # below the real 8 MiB threshold
    assert encrypt(tmp_path, plaintext)[0] == stream_encrypted(plaintext)
    assert decrypt(tmp_path, stream_encrypted(plaintext))[0] == plaintext
    assert calls == []


@pytest.mark.parametrize("err", [errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF])
def test_a_refused_fallocate_is_ignored(
    tmp_path: Path, small_threshold: None, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    calls = recording(monkeypatch, result=-1, err=err)
    plaintext = os.urandom(SIZE)
    assert encrypt(tmp_path, plaintext)[0] == stream_encrypted(plaintext)
    assert decrypt(tmp_path, stream_encrypted(plaintext))[0] == plaintext
    assert len(calls) == 4  # it was asked, twice, and its failure changed nothing


def test_no_fallocate_on_this_system_is_a_no_op(
    tmp_path: Path, small_threshold: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    random_access._libc_fallocate.cache_clear()
    try:
        assert random_access._libc_fallocate() is None
        plaintext = os.urandom(SIZE)
        assert encrypt(tmp_path, plaintext)[0] == stream_encrypted(plaintext)
        assert decrypt(tmp_path, stream_encrypted(plaintext))[0] == plaintext
    finally:
        random_access._libc_fallocate.cache_clear()


def test_the_real_fallocate_keeps_the_bytes(tmp_path: Path, small_threshold: None) -> None:
    assert random_access._libc_fallocate() is not None  # Linux with glibc: the real call runs
    plaintext = os.urandom(SIZE)
    out, _, _ = encrypt(tmp_path, plaintext)
    assert out == stream_encrypted(plaintext)
    assert decrypt(tmp_path, out)[0] == plaintext


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_no_room_fails_before_any_chunk(
    tmp_path: Path, small_threshold: None, monkeypatch: pytest.MonkeyPatch, err: int
) -> None:
    calls = recording(monkeypatch, result=-1, err=err)
    with pytest.raises(OSError) as raised:
        encrypt(tmp_path, os.urandom(SIZE))
    assert raised.value.errno == err
    size_before = calls[1][2]
    assert (tmp_path / "out.enc").stat().st_size == size_before  # the header only: no chunk written


def test_no_room_through_the_files_api_is_an_output_error_and_leaves_nothing(
    tmp_path: Path, small_threshold: None, monkeypatch: pytest.MonkeyPatch, kms: EmbeddedKms, key: str
) -> None:
    src = tmp_path / "big"
    src.write_bytes(os.urandom(SIZE))
    ok = tmp_path / "ok.cipher"
    envelope.encrypt_file(src, ok, kms=kms, key_id=key, chunk_size=CHUNK, threads=2)
    recording(monkeypatch, result=-1, err=errno.ENOSPC)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(OutputError, match="No space left"):
        envelope.encrypt_file(src, tmp_path / "x.cipher", kms=kms, key_id=key, chunk_size=CHUNK, threads=2)
    with pytest.raises(OutputError, match="No space left"):
        envelope.decrypt_file(ok, tmp_path / "x.plain", kms=kms, threads=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_decrypted_chunks_are_written_in_aligned_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random_access, "_WRITE_BYTES", 1024)  # 4 pieces per 4 KiB chunk
    plaintext = os.urandom(SIZE)
    file = stream_encrypted(plaintext)
    writes: list[tuple[int, int]] = []
    real = os.pwrite

    def recording_pwrite(fd: int, data: memoryview, offset: int) -> int:
        writes.append((offset, len(data)))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    assert decrypt(tmp_path, file)[0] == plaintext
    assert all(length <= 1024 and offset % 1024 == 0 for offset, length in writes)
    assert sorted(writes) == [(at, min(1024, SIZE - at)) for at in range(0, SIZE, 1024)]  # each byte once


def test_encrypted_records_are_written_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(random_access, "_WRITE_BYTES", 1024)
    writes: list[int] = []
    real = os.pwrite

    def recording_pwrite(fd: int, data: memoryview, offset: int) -> int:
        writes.append(len(data))
        return real(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", recording_pwrite)
    plaintext = os.urandom(SIZE)
    assert encrypt(tmp_path, plaintext)[0] == stream_encrypted(plaintext)
    assert sorted(writes) == sorted([CHUNK + 16] * (SIZE // CHUNK) + [SIZE % CHUNK + 16])


class Recorder(io.BytesIO):
    """An output that remembers the length of every write it was handed."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: list[int] = []

    def write(self, data: Any) -> int:
        self.sizes.append(len(data))
        return super().write(data)


@pytest.mark.parametrize(("threads", "pipeline"), [(1, False), (2, False), (2, True)])
def test_the_stream_decrypts_in_pieces_and_encrypts_whole_records(
    monkeypatch: pytest.MonkeyPatch, threads: int, pipeline: bool
) -> None:
    monkeypatch.setattr(stream, "_PLAINTEXT_WRITE_BYTES", 1024)
    monkeypatch.setattr(stream, "_DECRYPT_PIPELINE", pipeline)
    plaintext = os.urandom(SIZE)
    _, key = fixed_header()
    sealed = Recorder()
    stream.encrypt_stream(io.BytesIO(plaintext), sealed, key, chunk_size=CHUNK, threads=threads)
    assert sorted(sealed.sizes) == sorted([CHUNK + 16] * (SIZE // CHUNK) + [SIZE % CHUNK + 16])
    opened = Recorder()
    stream.decrypt_stream(io.BytesIO(sealed.getvalue()), opened, key, chunk_size=CHUNK, threads=threads)
    assert opened.getvalue() == plaintext
    assert opened.sizes == [min(1024, SIZE - at) for at in range(0, SIZE, 1024)]  # in order, each byte once


def test_a_bad_chunk_still_releases_no_piece_of_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stream, "_PLAINTEXT_WRITE_BYTES", 1024)
    plaintext = os.urandom(SIZE)
    _, key = fixed_header()
    sealed = io.BytesIO()
    stream.encrypt_stream(io.BytesIO(plaintext), sealed, key, chunk_size=CHUNK, threads=1)
    damaged = bytearray(sealed.getvalue())
    damaged[7 * (CHUNK + 16) + 100] ^= 1  # inside chunk 7
    opened = Recorder()
    with pytest.raises(IntegrityError):
        stream.decrypt_stream(io.BytesIO(bytes(damaged)), opened, key, chunk_size=CHUNK, threads=1)
    assert opened.getvalue() == plaintext[: 7 * CHUNK]  # the verified chunks before it, nothing of it
