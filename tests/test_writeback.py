"""Writeback hints: large outputs ask the kernel to start writing completed regions early.

The hint (``sync_file_range(SYNC_FILE_RANGE_WRITE)``) must be issued for large outputs of both
engines (the stream and chunk ranges), on the output's own descriptor, over regions that cover
the output; it must never change a byte written, and a failing or missing syscall must be
ignored. (Whether it saves time is the benchmark's business: docs/scale.md.)
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from files_helpers import CHUNK, fixed_header, range_encrypted, stream_encrypted
from kmsenv import _atomic
from kmsenv.format import random_access, stream
from kmsenv.format.random_access import Layout, decrypt_ranges

SIZE = 40 * CHUNK + 7
Call = tuple[int, int, int, int]


@pytest.fixture
def small_regions(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hints every 4 chunks (not every 8 MiB), so a test file of 40 chunks gets several."""
    monkeypatch.setattr(_atomic, "WRITEBACK_BYTES", 4 * CHUNK)
    monkeypatch.setattr(random_access, "_RANGE_BYTES", 4 * CHUNK)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch, small_regions: None) -> list[Call]:
    seen: list[Call] = []

    def fake(fd: int, offset: int, length: int, flags: int) -> int:
        seen.append((fd, offset, length, flags))
        return 0

    monkeypatch.setattr(_atomic, "_libc_sync_file_range", lambda: fake)
    return seen


def encrypted_by_stream(tmp_path: Path, plaintext: bytes, threads: int) -> tuple[bytes, int]:
    header, key = fixed_header()
    src, dst = tmp_path / "in", tmp_path / "out.enc"
    src.write_bytes(plaintext)
    with src.open("rb") as fin, dst.open("wb") as fout:
        fout.write(header.encode())
        stream.encrypt_stream(fin, fout, key, chunk_size=CHUNK, threads=threads, expected_size=len(plaintext))
        fd = fout.fileno()
    return dst.read_bytes(), fd


def encrypted_by_ranges(tmp_path: Path, plaintext: bytes, threads: int) -> tuple[bytes, int, int]:
    return range_encrypted(tmp_path, plaintext, threads)


def covered(hints: list[Call], size: int) -> list[tuple[int, int]]:
    """The merged [start, end) regions the hints asked for (length 0: to the end of the file)."""
    spans = sorted((off, size if length == 0 else off + length) for _, off, length, _ in hints)
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], end))
        else:
            merged.append((start, end))
    return merged


@pytest.mark.parametrize("threads", [1, 2])
def test_the_stream_hints_a_large_output_and_writes_the_same_bytes(
    tmp_path: Path, calls: list[Call], threads: int
) -> None:
    plaintext = os.urandom(SIZE)
    out, fd = encrypted_by_stream(tmp_path, plaintext, threads)
    assert out == stream_encrypted(plaintext)
    assert len(calls) >= 9  # 40 chunks, one hint per 4 written
    assert {(c[0], c[3]) for c in calls} == {(fd, 2)}  # the output's fd, SYNC_FILE_RANGE_WRITE
    offsets = [c[1] for c in calls]
    assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_ranges_hint_every_completed_range_and_write_the_same_bytes(
    tmp_path: Path, calls: list[Call], threads: int
) -> None:
    plaintext = os.urandom(SIZE)
    out, fd, header_size = encrypted_by_ranges(tmp_path, plaintext, threads)
    assert out == stream_encrypted(plaintext)
    assert {(c[0], c[3]) for c in calls} == {(fd, 2)}
    assert len(calls) == 11  # ceil(41 chunks / 4): one hint per range, none twice
    assert covered(calls, len(out)) == [(header_size, len(out))]


def test_decrypt_ranges_hint_the_plaintext_regions(tmp_path: Path, calls: list[Call]) -> None:
    plaintext = os.urandom(SIZE)
    enc = tmp_path / "in.enc"
    enc.write_bytes(stream_encrypted(plaintext))
    header, key = fixed_header()
    dst = tmp_path / "out"
    with enc.open("rb") as fin, dst.open("wb") as fout:
        layout = Layout.of_file(header.size, CHUNK, enc.stat().st_size)
        decrypt_ranges(fin.fileno(), fout.fileno(), key, layout, threads=2)
    assert dst.read_bytes() == plaintext
    assert covered(calls, SIZE) == [(0, SIZE)]


def test_small_outputs_are_not_hinted(tmp_path: Path, calls: list[Call]) -> None:
    plaintext = os.urandom(3 * CHUNK)
    assert encrypted_by_stream(tmp_path, plaintext, 1)[0] == stream_encrypted(plaintext)
    assert encrypted_by_ranges(tmp_path, plaintext, 2)[0] == stream_encrypted(plaintext)
    assert calls == []


def test_a_failing_syscall_is_ignored(tmp_path: Path, small_regions: None, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing(fd: int, offset: int, length: int, flags: int) -> int:
        failing.count += 1  # type: ignore[attr-defined]
        return -1  # what libc returns on EBADF/ESPIPE/EINVAL: nothing reads errno

    failing.count = 0  # type: ignore[attr-defined]
    monkeypatch.setattr(_atomic, "_libc_sync_file_range", lambda: failing)
    plaintext = os.urandom(SIZE)
    assert encrypted_by_stream(tmp_path, plaintext, 2)[0] == stream_encrypted(plaintext)
    assert failing.count >= 9  # type: ignore[attr-defined]


def test_the_real_syscall_on_a_pipe_fails_quietly() -> None:
    r, w = os.pipe()
    try:
        _atomic.start_writeback(w, 0, 0)  # ESPIPE from the kernel, ignored
        _atomic.start_writeback(r, 0, 4096)
    finally:
        os.close(r)
        os.close(w)


def test_no_sync_file_range_is_a_no_op(tmp_path: Path, small_regions: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_atomic.sys, "platform", "darwin")
    _atomic._libc_sync_file_range.cache_clear()
    try:
        assert _atomic._libc_sync_file_range() is None
        plaintext = os.urandom(SIZE)
        assert encrypted_by_ranges(tmp_path, plaintext, 2)[0] == stream_encrypted(plaintext)
    finally:
        _atomic._libc_sync_file_range.cache_clear()


def test_the_real_hint_on_a_file_keeps_the_bytes(tmp_path: Path, small_regions: None) -> None:
    assert _atomic._libc_sync_file_range() is not None  # Linux with glibc: the real call runs
    plaintext = os.urandom(SIZE)
    assert encrypted_by_stream(tmp_path, plaintext, 1)[0] == stream_encrypted(plaintext)
    assert encrypted_by_ranges(tmp_path, plaintext, 2)[0] == stream_encrypted(plaintext)
