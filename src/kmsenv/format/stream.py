"""The v1 payload: a STREAM of AES-256-GCM chunks, encrypted and decrypted in constant memory.

This module owns the chunk framing (docs/format.md §7) and the engine that moves bytes:

* The plaintext is cut into ``chunk_size`` pieces; each is sealed under the payload key with the
  nonce ``counter (11 bytes, big-endian) || final flag (1 byte)``. The counter stops chunks being
  reordered, dropped or duplicated; the flag, set only on the last chunk, stops truncation at a
  chunk boundary and appended chunks (EOF without a final chunk, or bytes after it, fail).
* Whether a chunk is the last one is only known after trying to read the next, so the reader
  always looks one record ahead. Nothing ever seeks: ``src`` and ``dst`` may be pipes.
* Memory is a fixed set of reusable buffers (``readinto``, ``encrypt_into``/``decrypt_into``):
  no per-chunk allocation and nothing that grows with the file.
* ``threads=1`` runs everything in the calling thread. ``threads>=2`` adds one writer thread:
  the caller reads and seals/opens, the writer writes, in order, through a bounded queue of
  buffers, so the writes (which release the GIL) overlap the reads and the AEAD. More threads are
  not used: cryptography 48 holds the GIL inside AES-GCM, so AEAD workers only contend (measured;
  docs/format.md §9.8). Decryption currently runs inline for any ``threads`` (measured faster;
  see ``_DECRYPT_PIPELINE``). Both paths produce identical bytes.

Decryption writes a chunk's plaintext only after that chunk's tag verified, and stops at the
first failure: nothing of a bad chunk, or of any chunk after it, is ever released.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from kmsenv._crypto import GCM_TAG_SIZE
from kmsenv.errors import InputError, IntegrityError, OutputError
from kmsenv.format.keys import FileKey

__all__ = ["CHUNK_TAG_SIZE", "decrypt_stream", "encrypt_stream", "payload_size"]

CHUNK_TAG_SIZE = GCM_TAG_SIZE
_COUNTER_SIZE = 11
_FINAL = b"\x01"
_NOT_FINAL = b"\x00"
#: Buffers of the two-thread pipeline: about 4 MiB in flight, at least 4 records (one being read,
#: the look-ahead, one being written, one queued), at most 16 (small chunks gain nothing more).
_IN_FLIGHT_BYTES = 4 * 1024 * 1024
_MIN_SLOTS = 4
_MAX_SLOTS = 16
#: Whether decryption with threads>=2 uses the writer pipeline. Off: writing fsync'd output from a
#: second thread made decryption 2x slower than inline (2.1 s vs 1.0 s per GiB, six runs, low
#: spread) while it made encryption faster; the cause is not yet understood (docs/format.md §9.8).
#: The path stays tested with the flag on.
_DECRYPT_PIPELINE = False
_PAYLOAD_FAILED = "payload failed authentication"


def payload_size(plaintext_size: int, chunk_size: int) -> int:
    """Bytes of payload (chunks and tags) that ``plaintext_size`` bytes encrypt to."""
    chunks = max(1, -(-plaintext_size // chunk_size))
    return plaintext_size + chunks * CHUNK_TAG_SIZE


def _nonce(counter: int, final: bool) -> bytes:
    # to_bytes raises OverflowError at 2^88 chunks rather than ever reusing a nonce.
    return counter.to_bytes(_COUNTER_SIZE, "big") + (_FINAL if final else _NOT_FINAL)


class _Slot:
    """One record's reusable buffers: what was read, and what the AEAD wrote."""

    __slots__ = ("inp", "out")

    def __init__(self, size: int) -> None:
        self.inp = memoryview(bytearray(size))
        self.out = memoryview(bytearray(size))

    def grow(self, size: int, keep: int) -> None:
        """Enlarge both buffers to ``size`` bytes, keeping the first ``keep`` bytes read."""
        inp = memoryview(bytearray(size))
        inp[:keep] = self.inp[:keep]
        self.inp = inp
        self.out = memoryview(bytearray(size))


#: (counter, final, slot, bytes read into slot.inp) -> bytes written into slot.out
_Job = Callable[[int, bool, _Slot, int], int]


def _fill(src: BinaryIO, view: memoryview) -> int:
    """Read until ``view`` is full or EOF; return the count. Short reads (pipes) are normal."""
    readinto = getattr(src, "readinto", None)
    got = 0
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got:])
        else:
            part = src.read(len(view) - got)
            n = len(part)
            view[got : got + n] = part
        if n is None:
            # A non-blocking source with no data: treating it as EOF would silently truncate.
            raise InputError("the input is non-blocking and has no data ready")
        if n == 0:
            break
        got += n
    return got


def _write_all(dst: BinaryIO, data: memoryview) -> None:
    while data:
        n = dst.write(data)
        if n is None:
            raise OutputError("the output is non-blocking and cannot take data now")
        data = data[n:]


def _read_record(src: BinaryIO, slot: _Slot, size: int, buffer_size: int) -> int:
    """Read one record of at most ``size`` bytes into ``slot.inp``; return its length.

    A slot may start smaller than a record (sized to the input the caller expects): if the input
    fills it, the input is longer than expected, so the slot grows to ``buffer_size`` and the read
    goes on. Records therefore never depend on the buffer size, only on ``size``.
    """
    n = _fill(src, slot.inp[:size])
    if n == len(slot.inp) < size:
        slot.grow(buffer_size, n)
        n += _fill(src, slot.inp[n:size])
    return n


def _records(
    src: BinaryIO, size: int, acquire: Callable[[], _Slot], buffer_size: int = 0
) -> Iterator[tuple[int, bool, _Slot, int]]:
    """Yield (counter, final, slot, length) for each record of at most ``size`` bytes in ``src``.

    A full record is final only if nothing follows it, so the next one is read before yielding.
    Empty input yields one empty final record (an empty plaintext is one empty chunk).
    ``buffer_size``: what a slot grows to when the input outgrows it (see :func:`_read_record`).
    """
    buffer_size = buffer_size or size
    slot = acquire()
    n = _read_record(src, slot, size, buffer_size)
    for counter in itertools.count():
        nxt, m = slot, 0
        if n == size:
            nxt = acquire()
            m = _read_record(src, nxt, size, buffer_size)
        final = n < size or m == 0
        yield counter, final, slot, n
        if final:
            return
        slot, n = nxt, m


def _pump(
    src: BinaryIO, dst: BinaryIO, size: int, job: _Job, threads: int, *, expected: int | None = None
) -> tuple[int, int]:
    """Run ``job`` over every record of ``src`` and write the outputs to ``dst`` in order.

    ``expected``: how many bytes ``src`` should hold, if known (a regular file's size). Input
    that fits in one record then gets buffers of its own size rather than a whole record's: a
    4 KiB file does not pay for zeroing four 1 MiB buffers (measured: most of the time of a
    folder run of small files). It is only a hint: input that turns out longer is still read
    correctly (the buffers grow). Returns (bytes read, bytes written).
    """
    if not isinstance(threads, int) or threads < 1:
        raise ValueError("threads must be a positive integer")
    buffer_size = size + CHUNK_TAG_SIZE
    small = expected is not None and 0 <= expected < size
    if threads == 1 or small:
        # One record (small input) has nothing for a writer thread to overlap.
        first = min(buffer_size, expected + 1 + CHUNK_TAG_SIZE) if small and expected is not None else buffer_size
        read = written = 0
        pair = itertools.cycle((_Slot(first), _Slot(first)))
        for counter, final, slot, n in _records(src, size, pair.__next__, buffer_size):
            out = job(counter, final, slot, n)
            _write_all(dst, slot.out[:out])
            read += n
            written += out
        return read, written
    return _pump_with_writer(src, dst, size, job, buffer_size)


def _pump_with_writer(src: BinaryIO, dst: BinaryIO, size: int, job: _Job, buffer_size: int) -> tuple[int, int]:
    """The two-thread pipeline: this thread reads and runs ``job``; a writer thread writes.

    Why not a pool of AEAD workers: cryptography 48 holds the GIL inside AES-GCM, so AEAD calls on
    several threads only contend for it (measured slower than inline). Reads and writes do release
    the GIL, so overlapping the writes with the reads and the AEAD is what uses the second core.
    The writer only ever sees records whose ``job`` returned, i.e. verified plaintext in order.
    """
    slots = max(_MIN_SLOTS, min(_MAX_SLOTS, _IN_FLIGHT_BYTES // buffer_size))
    free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
    for _ in range(slots):
        free.put(_Slot(buffer_size))
    ready: queue.SimpleQueue[tuple[_Slot, int] | None] = queue.SimpleQueue()
    failed: list[BaseException] = []
    written = 0

    def writer() -> None:
        nonlocal written
        while (item := ready.get()) is not None:
            slot, out = item
            if not failed:
                try:
                    _write_all(dst, slot.out[:out])
                    written += out
                except BaseException as exc:  # handed to the caller's thread below
                    failed.append(exc)
            free.put(slot)  # always recycled, so the reader can never wait forever

    thread = threading.Thread(target=writer, name="kmsenv-writer", daemon=True)
    thread.start()
    read = 0
    try:
        for counter, final, slot, n in _records(src, size, free.get):
            if failed:
                break
            ready.put((slot, job(counter, final, slot, n)))
            read += n
    finally:
        # On a failed chunk, the verified chunks queued before it are still written, then the
        # writer stops: dst holds exactly the plaintext before the first bad chunk.
        ready.put(None)
        thread.join()
    if failed:
        raise failed[0]
    return read, written


def _checked(threads: int) -> int:
    if not isinstance(threads, int) or threads < 1:
        raise ValueError("threads must be a positive integer")
    return 1


def _check_chunk_size(file_key: FileKey, chunk_size: int) -> None:
    # The chunk size is KDF input, so a mismatch could only produce a file nobody can read.
    if chunk_size != file_key.chunk_size:
        raise ValueError("chunk_size differs from the chunk size in the header this key belongs to")


def encrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    file_key: FileKey,
    *,
    chunk_size: int,
    threads: int = 2,
    expected_size: int | None = None,
) -> int:
    """Encrypt ``src`` to EOF as v1 chunks onto ``dst`` (the caller already wrote the header).

    ``expected_size``: the plaintext size if known (a hint for sizing buffers; a wrong one costs
    speed, never correctness). Returns the number of plaintext bytes read.
    """
    _check_chunk_size(file_key, chunk_size)
    aead = file_key.aead

    def seal(counter: int, final: bool, slot: _Slot, n: int) -> int:
        aead.encrypt_into(_nonce(counter, final), slot.inp[:n], None, slot.out[: n + CHUNK_TAG_SIZE])
        return n + CHUNK_TAG_SIZE

    return _pump(src, dst, chunk_size, seal, threads, expected=expected_size)[0]


def decrypt_stream(
    src: BinaryIO,
    dst: BinaryIO,
    file_key: FileKey,
    *,
    chunk_size: int,
    threads: int = 2,
    expected_size: int | None = None,
) -> int:
    """Decrypt the v1 chunks from ``src`` (positioned just after the header) onto ``dst``.

    Each chunk's plaintext is written only after its tag verified. IntegrityError on any
    modification, reordering, truncation or trailing bytes; ``dst`` then holds the plaintext of
    the chunks before the first bad one, which the caller must discard. ``expected_size``: the
    payload bytes left in ``src`` if known (a buffer-sizing hint only). Returns the number of
    plaintext bytes written.
    """
    _check_chunk_size(file_key, chunk_size)
    aead = file_key.aead

    def open_(counter: int, final: bool, slot: _Slot, n: int) -> int:
        # A record too short for a tag is a truncation; an empty final chunk after other chunks
        # is an encoding the writer never produces (one plaintext, one ciphertext).
        if n < CHUNK_TAG_SIZE or (final and counter > 0 and n == CHUNK_TAG_SIZE):
            raise IntegrityError(_PAYLOAD_FAILED)
        aead.decrypt_into(_nonce(counter, final), slot.inp[:n], None, slot.out[: n - CHUNK_TAG_SIZE], what="payload")
        return n - CHUNK_TAG_SIZE

    threads = threads if _DECRYPT_PIPELINE else _checked(threads)
    return _pump(src, dst, chunk_size + CHUNK_TAG_SIZE, open_, threads, expected=expected_size)[1]
