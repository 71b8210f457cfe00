"""Positional access to a v1 payload: the chunk layout, a seekable reader, parallel chunk ranges.

Every chunk of a v1 file sits at a computable offset (docs/format.md §7): chunk ``k`` starts at
``header_size + k * (chunk_size + 16)``, and every chunk but the final one holds exactly
``chunk_size`` bytes. So once the file's size is known, the plaintext size and the place of
every chunk are known too, and chunks can be read (``pread``), verified and written (``pwrite``)
in any order. This module builds two things on that:

* :class:`EncryptedReader`, a seekable, read-only file object over the plaintext that decrypts
  and verifies only the chunks a read touches. The final chunk is read and verified when the
  reader is made: it is the chunk whose nonce carries the final flag, so verifying it proves
  the file ends where its size says (truncation at a chunk boundary or appended bytes fail up
  front), and ``size``/``seek(0, SEEK_END)`` can be trusted before anything else is read.
* :func:`encrypt_ranges`/:func:`decrypt_ranges`, which split one file's chunks into ranges
  worked on by several threads, each with its own buffers, writing with ``pwrite`` at computed
  offsets so the order in which ranges finish does not matter. The bytes are identical to the
  streaming engine's (:mod:`.stream`), which still serves pipes and other unseekable inputs.

Nothing here releases plaintext of a chunk whose tag did not verify: a chunk is decrypted into a
private buffer and copied out (or written) only after ``decrypt_into`` returned.
"""

from __future__ import annotations

import errno
import functools
import io
import os
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from kmsenv import _atomic
from kmsenv.errors import InputError, IntegrityError
from kmsenv.format.keys import FileKey
from kmsenv.format.stream import _PAYLOAD_FAILED, CHUNK_TAG_SIZE, _nonce

__all__ = ["EncryptedReader", "Layout", "decrypt_ranges", "encrypt_ranges"]

#: Chunks a worker takes at a time in :func:`encrypt_ranges`/:func:`decrypt_ranges`: about
#: 8 MiB, so each thread reads and writes long sequential runs (readahead and writeback stay
#: effective) while the ranges stay small enough to balance two threads to the end.
_RANGE_BYTES = 8 * 1024 * 1024
#: Largest piece of plaintext one ``pwrite`` of :func:`decrypt_ranges` writes. Why: the page
#: cache gives a write folios as large as the write and as aligned as its offset, and on the test
#: machine (Linux 6.18, ext4, 2-vCPU VM) two threads writing whole 1 MiB-aligned chunks (1 MiB
#: folios) took 0.34-1.6 s per GiB, against 0.28-0.31 s in 256 KiB pieces, with 2-5x the CPU
#: (docs/scale.md, "Benchmark: one 1 GiB file"); the extra syscalls cost ~3 ms per GiB. Encrypted
#: records are not page-aligned (a 16-byte tag each), so their writes get smaller folios anyway:
#: cutting them did not measure faster, and they are written whole.
_WRITE_BYTES = 256 * 1024
_TRUNCATED = "the file ends before the size it had when it was opened"
_CHANGED = "the input changed while it was being read"
_CHANGED_HINT = "run the command again when it is stable"
#: Outputs from this size on are preallocated (:func:`_preallocate`); smaller ones gain nothing
#: measurable, and the first call imports ctypes (as the writeback hint does, at the same size).
_PREALLOCATE_BYTES = 8 * 1024 * 1024
#: fallocate failures that mean the output cannot hold the file: raised (the writes would fail
#: too, later). Any other failure (no fallocate on this file system, ...) leaves the writes to it.
_NO_ROOM = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@dataclass(frozen=True, slots=True)
class Layout:
    """Where the chunks of one v1 payload are: all of it follows from three numbers."""

    header_size: int
    chunk_size: int
    plaintext_size: int

    @classmethod
    def of_file(cls, header_size: int, chunk_size: int, file_size: int) -> Layout:
        """The layout a file of ``file_size`` bytes must have; IntegrityError if none fits.

        Every chunk but the last is ``chunk_size`` + tag; the last holds 0..chunk_size bytes plus
        its tag and is empty only when it is the only one. Any other length means the file was
        truncated or extended (the one payload error message: no oracle on how).
        """
        layout = cls.of_payload(header_size, chunk_size, file_size - header_size)
        if layout is None:
            raise IntegrityError(_PAYLOAD_FAILED)
        return layout

    @classmethod
    def of_payload(cls, header_size: int, chunk_size: int, payload: int) -> Layout | None:
        """:meth:`of_file` from the payload length, or None if that length fits no layout."""
        record = chunk_size + CHUNK_TAG_SIZE
        full, rest = divmod(payload, record) if payload >= 0 else (0, -1)
        if rest == 0 and full > 0:
            return cls(header_size, chunk_size, full * chunk_size)
        if rest >= CHUNK_TAG_SIZE and not (rest == CHUNK_TAG_SIZE and full > 0):
            return cls(header_size, chunk_size, full * chunk_size + rest - CHUNK_TAG_SIZE)
        return None

    @property
    def chunks(self) -> int:
        """Number of chunks (an empty plaintext is one empty chunk)."""
        return max(1, -(-self.plaintext_size // self.chunk_size))

    @property
    def file_size(self) -> int:
        return self.header_size + self.plaintext_size + self.chunks * CHUNK_TAG_SIZE

    def record_offset(self, k: int) -> int:
        """Where chunk ``k`` (ciphertext and tag) starts in the file."""
        return self.header_size + k * (self.chunk_size + CHUNK_TAG_SIZE)

    def plain_length(self, k: int) -> int:
        """Plaintext bytes in chunk ``k``."""
        return min(self.chunk_size, self.plaintext_size - k * self.chunk_size)

    def is_final(self, k: int) -> bool:
        return k == self.chunks - 1


def _pread_into(fd: int, view: memoryview, offset: int) -> int:
    """Fill ``view`` from ``fd`` at ``offset`` (short reads retried); return the count, less at EOF."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got)
        if n == 0:
            break
        got += n
    return got


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


class _Buffers:
    """One thread's reusable record buffers: what was read, and what the AEAD wrote."""

    __slots__ = ("inp", "out")

    def __init__(self, chunk_size: int) -> None:
        self.inp = memoryview(bytearray(chunk_size + CHUNK_TAG_SIZE))
        self.out = memoryview(bytearray(chunk_size + CHUNK_TAG_SIZE))


def _open_chunk(fd: int, file_key: FileKey, layout: Layout, k: int, bufs: _Buffers) -> memoryview:
    """Read and verify chunk ``k``; return a view of its plaintext in ``bufs.out``.

    IntegrityError on a bad tag (or a file shorter than the layout): ``bufs.out`` then holds
    unverified bytes, which no caller reads.
    """
    n = layout.plain_length(k)
    record = bufs.inp[: n + CHUNK_TAG_SIZE]
    if _pread_into(fd, record, layout.record_offset(k)) != len(record):
        raise IntegrityError(_PAYLOAD_FAILED, hint=_TRUNCATED)
    plain = bufs.out[:n]
    file_key.aead.decrypt_into(_nonce(k, layout.is_final(k)), record, None, plain, what="payload")
    return plain


# ------------------------------------------------------------------------------ reader --


class EncryptedReader(io.RawIOBase):
    """A seekable, read-only binary file over the plaintext of a v1 file; verifies what it reads.

    Made by :func:`kmsenv.open_encrypted` (which unwraps the data key and opens the header);
    supports ``read``, ``readinto``, ``readall``, ``seek``, ``tell``, ``size`` and the context
    manager protocol, and can be wrapped in :class:`io.BufferedReader` or
    :class:`io.TextIOWrapper`. Only the chunks a read touches are read and verified (one at a
    time; the last one stays cached); the final chunk was verified when the reader was made. A
    read that touches a chunk whose tag fails raises IntegrityError and returns no byte of it
    (bytes of earlier, verified chunks in the same call are not returned either); the position
    is left where the read started. Not safe for concurrent use from several threads.
    """

    def __init__(self, raw: io.FileIO | Any, file_key: FileKey, layout: Layout, *, name: str = "") -> None:
        super().__init__()
        self._raw = raw
        self._fd: int = raw.fileno()
        self._key = file_key
        self._layout = layout
        self._bufs = _Buffers(layout.chunk_size)
        self._cached = -1  # index of the verified chunk in self._plain, or -1
        self._plain = memoryview(b"")
        self._pos = 0
        self.name = name
        try:
            # Verified now, not on the first read near the end: the plaintext size comes from the
            # file size, and only the final-flagged chunk proves that size is the real one.
            self._chunk(layout.chunks - 1)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"EncryptedReader(name={self.name!r}, size={self._layout.plaintext_size}, closed={self.closed})"

    def __reduce__(self) -> Any:
        raise TypeError("EncryptedReader objects hold key material and cannot be pickled")

    @property
    def size(self) -> int:
        """The plaintext size in bytes (authenticated: the final chunk verified on open)."""
        return self._layout.plaintext_size

    @property
    def chunk_size(self) -> int:
        return self._layout.chunk_size

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def writable(self) -> bool:
        return False

    def fileno(self) -> int:
        # The descriptor holds ciphertext: handing it out as this object's would mislead callers.
        raise io.UnsupportedOperation("an EncryptedReader has no descriptor of its plaintext")

    def tell(self) -> int:
        self._check_open()
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        self._check_open()
        if whence == io.SEEK_SET:
            base = 0
        elif whence == io.SEEK_CUR:
            base = self._pos
        elif whence == io.SEEK_END:
            base = self._layout.plaintext_size
        else:
            raise ValueError(f"invalid whence ({whence})")
        target = base + offset
        if target < 0:
            raise ValueError(f"negative seek position {target}")
        self._pos = target  # past the end is allowed, as for files: reads there return b""
        return target

    def readinto(self, buffer: Any) -> int:
        self._check_open()
        view = memoryview(buffer).cast("B")
        pos, end = self._pos, min(self._pos + len(view), self._layout.plaintext_size)
        done = 0
        while pos < end:
            k, inner = divmod(pos, self._layout.chunk_size)
            plain = self._chunk(k)
            n = min(len(plain) - inner, end - pos)
            view[done : done + n] = plain[inner : inner + n]
            done += n
            pos += n
        self._pos = pos
        return done

    def readall(self) -> bytes:
        self._check_open()
        out = bytearray(max(0, self._layout.plaintext_size - self._pos))
        n = self.readinto(out)
        del out[n:]
        return bytes(out)

    def close(self) -> None:
        if not self.closed:
            try:
                self._raw.close()
            finally:
                self._cached = -1
                self._plain = memoryview(b"")
                super().close()

    def _check_open(self) -> None:
        if self.closed:
            raise ValueError("I/O operation on closed file")

    def _chunk(self, k: int) -> memoryview:
        """The verified plaintext of chunk ``k`` (from the cache, or read and verified now)."""
        if k != self._cached:
            self._cached = -1  # the buffer is about to hold unverified bytes
            self._plain = _open_chunk(self._fd, self._key, self._layout, k, self._bufs)
            self._cached = k
        return self._plain


# ------------------------------------------------------------------------------ ranges --


@functools.cache
def _libc_fallocate() -> Callable[..., int] | None:
    """libc's 64-bit ``fallocate``, or None where there is none (preallocation is then skipped).

    Not :func:`os.posix_fallocate`: where a file system has no fallocate, glibc's emulates it by
    writing into every block of the range, which would cost as much as the output itself. glibc
    has ``fallocate64``; musl only ``fallocate``, whose ``off_t`` is 64-bit anyway.
    """
    return _atomic.libc_function(("fallocate64", "fallocate"), "c_int", "c_int", "c_int64", "c_int64")


def _preallocate(fd: int, size: int) -> None:
    """Give the output ``fd`` its final ``size`` with its blocks allocated before any chunk is written.

    Why: without it every buffered ``pwrite`` reserves delayed-allocation blocks and the flusher
    allocates them while the threads write, under the same inode; with the blocks allocated in
    one call (unwritten extents, read as zeros until written) each of two threads spent ~0.11
    instead of ~0.17 s per GiB in ``pwrite`` on ext4 (docs/scale.md, "Benchmark: one 1 GiB
    file"). Durability is unchanged: the final fsync is still what makes the file durable.
    OSError (ENOSPC, EDQUOT, EFBIG) when the file cannot fit: before any work. Where fallocate is
    missing or refused for any other reason, nothing happens and the writes allocate as before.
    """
    fn = _libc_fallocate()
    if fn is None or size <= 0:
        return
    if fn(fd, 0, 0, size) != 0:
        err = _atomic.libc_errno()
        if err in _NO_ROOM:
            raise OSError(err, os.strerror(err))


#: (chunk index, the calling worker's buffers) -> None; raises to stop every worker.
_ChunkWork = Callable[[int, _Buffers], None]


def _run_ranges(layout: Layout, threads: int, work: _ChunkWork, dst_fd: int, where: Callable[[int], int]) -> None:
    """Run ``work`` on every chunk index, ``threads`` workers taking ranges of chunks in turn.

    ``where(k)``: the offset in ``dst_fd`` of chunk ``k``'s output. Each completed range (a few
    MiB, written once and never again) is handed to writeback at once, so that the final fsync
    does not find the whole output still dirty (docs/scale.md, "Benchmark: one 1 GiB file").

    The calling thread is one of the workers. The first exception stops the others after their
    current chunk and is raised here once every worker has ended (no thread is left behind).
    """
    if not isinstance(threads, int) or threads < 1:
        raise ValueError("threads must be a positive integer")
    per_range = max(1, _RANGE_BYTES // layout.chunk_size)
    starts: Iterator[int] = iter(range(0, layout.chunks, per_range))
    lock = threading.Lock()
    failed: list[BaseException] = []
    # Small files skip the hint: nothing to gain, and its first use imports ctypes.
    hint = layout.plaintext_size >= _atomic.WRITEBACK_BYTES

    def worker() -> None:
        bufs = _Buffers(layout.chunk_size)
        try:
            while not failed:
                with lock:
                    start = next(starts, None)
                if start is None:
                    return
                end = min(start + per_range, layout.chunks)
                for k in range(start, end):
                    if failed:
                        return
                    work(k, bufs)
                if hint:  # length 0: to EOF (the final chunk's end is not where(end))
                    length = where(end) - where(start) if end < layout.chunks else 0
                    _atomic.start_writeback(dst_fd, where(start), length)
        except BaseException as exc:  # handed to the calling thread below
            failed.append(exc)

    helpers = [
        threading.Thread(target=worker, name=f"kmsenv-range-{i}", daemon=True)
        for i in range(1, min(threads, layout.chunks))
    ]
    for t in helpers:
        t.start()
    try:
        worker()
    finally:
        for t in helpers:
            t.join()
    if failed:
        raise failed[0]


def encrypt_ranges(src_fd: int, dst_fd: int, file_key: FileKey, layout: Layout, *, threads: int) -> None:
    """Encrypt the ``layout.plaintext_size`` bytes at the start of ``src_fd`` into ``dst_fd``.

    Chunk ``k`` is read with ``pread`` at ``k * chunk_size`` and written with ``pwrite`` at
    ``layout.record_offset(k)``; the header (``layout.header_size`` bytes) is the caller's. The
    source must hold at least that many bytes (InputError otherwise: it shrank); a source that
    grew meanwhile is an InputError too (checked at the end: its tail would be lost).
    """
    aead, size = file_key.aead, layout.chunk_size

    def seal(k: int, bufs: _Buffers) -> None:
        n = layout.plain_length(k)
        if _pread_into(src_fd, bufs.inp[:n], k * size) != n:
            raise InputError(_CHANGED, hint=_CHANGED_HINT)
        out = bufs.out[: n + CHUNK_TAG_SIZE]
        aead.encrypt_into(_nonce(k, layout.is_final(k)), bufs.inp[:n], None, out)
        _pwrite_all(dst_fd, out, layout.record_offset(k))

    if layout.plaintext_size >= _PREALLOCATE_BYTES:
        _preallocate(dst_fd, layout.file_size)
    _run_ranges(layout, threads, seal, dst_fd, layout.record_offset)
    if os.pread(src_fd, 1, layout.plaintext_size):
        raise InputError(_CHANGED, hint=_CHANGED_HINT)


def decrypt_ranges(src_fd: int, dst_fd: int, file_key: FileKey, layout: Layout, *, threads: int) -> None:
    """Decrypt every chunk of ``src_fd`` (laid out as ``layout``) into ``dst_fd`` at ``k * chunk_size``.

    Each chunk is written only after its tag verified. On IntegrityError ``dst_fd`` holds the
    verified chunks written so far, in no particular order: the caller must discard it.
    """

    def open_(k: int, bufs: _Buffers) -> None:
        plain, at = _open_chunk(src_fd, file_key, layout, k, bufs), k * layout.chunk_size
        for i in range(0, len(plain), _WRITE_BYTES):  # pieces aligned as the chunk is
            _pwrite_all(dst_fd, plain[i : i + _WRITE_BYTES], at + i)

    if layout.plaintext_size >= _PREALLOCATE_BYTES:
        _preallocate(dst_fd, layout.plaintext_size)
    _run_ranges(layout, threads, open_, dst_fd, lambda k: k * layout.chunk_size)
