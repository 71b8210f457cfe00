"""The v1 payload: a STREAM of AES-256-GCM chunks, encrypted and decrypted in constant memory.

This module owns the chunk framing (docs/format.md §7) and the engine that moves bytes:

* The plaintext is cut into ``chunk_size`` pieces; each is sealed under the payload key with the
  nonce ``counter (11 bytes, big-endian) || final flag (1 byte)``. The counter stops chunks being
  reordered, dropped or duplicated; the flag, set only on the last chunk, stops truncation at a
  chunk boundary and appended chunks (EOF without a final chunk, or bytes after it, fail).
* Whether a chunk is the last one is only known after trying to read the next, so the reader
  always reads one byte past a full record. Nothing ever seeks: ``src`` and ``dst`` may be pipes.
* Memory is a fixed set of reusable buffers (``readinto``, ``encrypt_into``/``decrypt_into``):
  no per-chunk allocation and nothing that grows with the file. Input needs one record buffer
  (the look-ahead is one byte, not a record); output needs one in this thread, two with a writer
  thread. With 1 MiB chunks that is 2 MiB inline and 3 MiB pipelined (it was 4 and 8: each
  in-flight record had its own input and output buffers; peak RSS matters, docs/performance.md,
  "Peers").
* ``threads=1`` runs everything in the calling thread. ``threads>=2`` adds one writer thread:
  the caller reads and seals/opens, the writer writes, in order, through a bounded queue of
  buffers, so the writes (which release the GIL) overlap the reads and the AEAD. More threads are
  not used: cryptography 48 holds the GIL inside AES-GCM, so AEAD workers only contend (measured;
  docs/format.md §9.8). Decryption currently runs inline for any ``threads`` (measured faster;
  see ``_DECRYPT_PIPELINE``). Both paths produce identical bytes.
* Whoever writes also hints writeback of every few MiB written (:class:`kmsenv._atomic.Writeback`):
  the disk then works while the stream runs instead of all at the caller's final fsync.

Decryption writes a chunk's plaintext only after that chunk's tag verified, and stops at the
first failure: nothing of a bad chunk, or of any chunk after it, is ever released.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterator
from typing import BinaryIO

from kmsenv._atomic import Writeback
from kmsenv._crypto import GCM_TAG_SIZE
from kmsenv.errors import InputError, IntegrityError, OutputError
from kmsenv.format.keys import FileKey

__all__ = ["CHUNK_TAG_SIZE", "decrypt_stream", "encrypt_stream", "payload_size"]

CHUNK_TAG_SIZE = GCM_TAG_SIZE
_COUNTER_SIZE = 11
_FINAL = b"\x01"
_NOT_FINAL = b"\x00"
#: Output buffers of the two-thread pipeline: about 2 MiB, at least 2 (one being sealed while the
#: writer writes the other), and _MAX_SLOTS buffers in all with the one input buffer (small chunks
#: gain nothing more). On 1 GiB, 2 outputs measured no slower than 3 or the former 4 records
#: (8 runs each, load 4-7: within the noise; docs/performance.md, "Peers").
_IN_FLIGHT_BYTES = 2 * 1024 * 1024
_MIN_SLOTS = 2
_MAX_SLOTS = 16
#: Whether decryption with threads>=2 uses the writer pipeline. Off: writing fsync'd output from a
#: second thread made decryption 2x slower than inline (2.1 s vs 1.0 s per GiB, six runs, low
#: spread) while it made encryption faster; the cause is not yet understood (docs/format.md §9.8).
#: The path stays tested with the flag on.
_DECRYPT_PIPELINE = False
_PAYLOAD_FAILED = "payload failed authentication"
#: Largest piece of plaintext one write hands to the output when decrypting (chunks are cut into
#: pieces of this size, which stay aligned as the chunk is). Why: the page cache gives a write
#: folios as large as the write and as aligned as its offset, and on the test machine (Linux 6.18,
#: ext4, 2-vCPU VM) writing whole 1 MiB-aligned chunks (1 MiB folios) was 2-10x slower, in CPU
#: too, than the same bytes in 256 KiB pieces (docs/scale.md, "Benchmark: one 1 GiB file"); the
#: extra syscalls cost ~3 ms per GiB. Ciphertext records are not page-aligned (a 16-byte tag
#: each), so their writes get smaller folios anyway and are written whole.
_PLAINTEXT_WRITE_BYTES = 256 * 1024


def payload_size(plaintext_size: int, chunk_size: int) -> int:
    """Bytes of payload (chunks and tags) that ``plaintext_size`` bytes encrypt to."""
    chunks = max(1, -(-plaintext_size // chunk_size))
    return plaintext_size + chunks * CHUNK_TAG_SIZE


def _nonce(counter: int, final: bool) -> bytes:
    # to_bytes raises OverflowError at 2^88 chunks rather than ever reusing a nonce.
    return counter.to_bytes(_COUNTER_SIZE, "big") + (_FINAL if final else _NOT_FINAL)


class _Slot:
    """One reusable record buffer: the reader's input, or an output the AEAD writes into."""

    __slots__ = ("buf",)

    def __init__(self, size: int) -> None:
        self.buf = memoryview(bytearray(size))

    def grow(self, size: int, keep: int) -> None:
        """Enlarge the buffer to ``size`` bytes, keeping its first ``keep`` bytes."""
        buf = memoryview(bytearray(size))
        buf[:keep] = self.buf[:keep]
        self.buf = buf


#: (counter, final, record, output buffer) -> bytes written into the output buffer. The output
#: buffer is at least ``len(record) + CHUNK_TAG_SIZE`` bytes.
_Job = Callable[[int, bool, memoryview, memoryview], int]


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


def _write_all(dst: BinaryIO, data: memoryview, piece: int = 0) -> None:
    """Write all of ``data``, in writes of at most ``piece`` bytes if ``piece``."""
    while data:
        n = dst.write(data[:piece] if piece else data)
        if n is None:
            raise OutputError("the output is non-blocking and cannot take data now")
        data = data[n:]


def _read_record(src: BinaryIO, slot: _Slot, size: int, have: int) -> int:
    """Read one record of at most ``size`` bytes into ``slot.buf``, after the ``have`` bytes
    already at its start; return its length.

    The buffer may start smaller than a record (sized to the input the caller expects): if the
    input fills it, the input is longer than expected, so it grows to ``size`` and the read goes
    on. Records therefore never depend on the buffer size, only on ``size``.
    """
    n = have + _fill(src, slot.buf[have:size])
    if n == len(slot.buf) < size:
        slot.grow(size, n)
        n += _fill(src, slot.buf[n:size])
    return n


def _records(src: BinaryIO, size: int, slot: _Slot) -> Iterator[tuple[int, bool, memoryview]]:
    """Yield (counter, final, record) for each record of at most ``size`` bytes in ``src``.

    Every record is read into ``slot``, so a record is valid only until the next one is asked
    for. A full record is final only if nothing follows it: one byte is read ahead to know, and
    it becomes the first byte of the next record (a look-ahead of one byte, not of one record,
    keeps a single input buffer). Empty input yields one empty final record (an empty plaintext
    is one empty chunk).
    """
    peek = memoryview(bytearray(1))
    have = 0
    for counter in itertools.count():
        n = _read_record(src, slot, size, have)
        final = n < size or _fill(src, peek) == 0
        yield counter, final, slot.buf[:n]
        if final:
            return
        slot.buf[0] = peek[0]  # only now: the caller is done with the record this overwrites
        have = 1


def _pump(
    src: BinaryIO,
    dst: BinaryIO,
    size: int,
    job: _Job,
    threads: int,
    *,
    expected: int | None = None,
    piece: int = 0,
) -> tuple[int, int]:
    """Run ``job`` over every record of ``src`` and write the outputs to ``dst`` in order.

    ``expected``: how many bytes ``src`` should hold, if known (a regular file's size). Input
    that fits in one record then gets buffers of its own size rather than a whole record's: a
    4 KiB file does not pay for zeroing four 1 MiB buffers (measured: most of the time of a
    folder run of small files). It is only a hint: input that turns out longer is still read
    correctly (the buffers grow). ``piece``: the largest single write (0: a whole output at once).
    Returns (bytes read, bytes written).
    """
    if not isinstance(threads, int) or threads < 1:
        raise ValueError("threads must be a positive integer")
    small = expected is not None and 0 <= expected < size
    if threads == 1 or small:
        # One record (small input) has nothing for a writer thread to overlap. The +1: input of
        # exactly the expected size leaves the buffer not full, so it is known to have ended.
        first = expected + 1 if small and expected is not None else size
        inp, out = _Slot(first), _Slot(first + CHUNK_TAG_SIZE)
        read = written = 0
        # Small input never reaches a hint; skipping it keeps fileno() off the small-file path.
        wb = Writeback(None) if small else Writeback.of(dst)
        for counter, final, record in _records(src, size, inp):
            if len(out.buf) < len(record) + CHUNK_TAG_SIZE:
                out = _Slot(len(inp.buf) + CHUNK_TAG_SIZE)  # the input outgrew the hint
            n = job(counter, final, record, out.buf)
            _write_all(dst, out.buf[:n], piece)
            wb.wrote(n)
            read += len(record)
            written += n
        return read, written
    return _pump_with_writer(src, dst, size, job, piece)


def _pump_with_writer(src: BinaryIO, dst: BinaryIO, size: int, job: _Job, piece: int = 0) -> tuple[int, int]:
    """The two-thread pipeline: this thread reads and runs ``job``; a writer thread writes.

    Why not a pool of AEAD workers: cryptography 48 holds the GIL inside AES-GCM, so AEAD calls on
    several threads only contend for it (measured slower than inline). Reads and writes do release
    the GIL, so overlapping the writes with the reads and the AEAD is what uses the second core.
    The writer only ever sees records whose ``job`` returned, i.e. verified plaintext in order.
    """
    buffer_size = size + CHUNK_TAG_SIZE
    outputs = max(_MIN_SLOTS, min(_MAX_SLOTS - 1, _IN_FLIGHT_BYTES // buffer_size))
    free: queue.SimpleQueue[_Slot] = queue.SimpleQueue()
    for _ in range(outputs):
        free.put(_Slot(buffer_size))
    ready: queue.SimpleQueue[tuple[_Slot, int] | None] = queue.SimpleQueue()
    failed: list[BaseException] = []
    written = 0
    wb = Writeback.of(dst)

    def writer() -> None:
        nonlocal written
        while (item := ready.get()) is not None:
            slot, out = item
            if not failed:
                try:
                    _write_all(dst, slot.buf[:out], piece)
                    wb.wrote(out)
                    written += out
                except BaseException as exc:  # handed to the caller's thread below
                    failed.append(exc)
            free.put(slot)  # always recycled, so the reader can never wait forever

    thread = threading.Thread(target=writer, name="kmsenv-writer", daemon=True)
    thread.start()
    read = 0
    try:
        for counter, final, record in _records(src, size, _Slot(size)):
            if failed:
                break
            slot = free.get()  # the writer is done with it: at most one record ahead of the writer
            ready.put((slot, job(counter, final, record, slot.buf)))
            read += len(record)
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

    def seal(counter: int, final: bool, record: memoryview, out: memoryview) -> int:
        n = len(record) + CHUNK_TAG_SIZE
        aead.encrypt_into(_nonce(counter, final), record, None, out[:n])
        return n

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

    def open_(counter: int, final: bool, record: memoryview, out: memoryview) -> int:
        # A record too short for a tag is a truncation; an empty final chunk after other chunks
        # is an encoding the writer never produces (one plaintext, one ciphertext).
        n = len(record) - CHUNK_TAG_SIZE
        if n < 0 or (final and counter > 0 and n == 0):
            raise IntegrityError(_PAYLOAD_FAILED)
        aead.decrypt_into(_nonce(counter, final), record, None, out[:n], what="payload")
        return n

    threads = threads if _DECRYPT_PIPELINE else _checked(threads)
    return _pump(
        src, dst, chunk_size + CHUNK_TAG_SIZE, open_, threads, expected=expected_size, piece=_PLAINTEXT_WRITE_BYTES
    )[1]
