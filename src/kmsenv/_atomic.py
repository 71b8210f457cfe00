"""Atomic, no-clobber file output: a file appears at its path complete and synced, or not at all.

This module owns how kmsenv creates output files. :class:`AtomicOutput` writes into an anonymous
temporary file in the target's folder (Linux ``O_TMPFILE``): it has no name until it is linked
into place, so a crash, an exception or ``kill -9`` part-way leaves nothing behind, above all no
partial plaintext. On a clean exit it is flushed, fsynced, given its final mode, then linked:

* without ``force``, by ``link(2)`` to the target itself, which fails with ``EEXIST`` if anything
  is there: the no-clobber check and the commit are one atomic step (no check-then-create race);
* with ``force``, by linking to a random temporary name and ``rename(2)`` over the target;

then the folder is fsynced so the new entry survives a power cut.

Runs over many files may share that last step: inside ``with folders.deferring():`` (a
:class:`FolderSync`), each output is still fsynced and linked before its ``with`` block returns,
but its folder is fsynced once for all outputs in it, by :meth:`FolderSync.sync`, which the run
calls before it reports success. The crash guarantee is unchanged (a name appears only for a
complete, synced file); until ``sync`` a power cut may lose names, never leave partial files.

A :class:`GroupCommit` goes further for runs of many small files, where two fsyncs per file
are most of the time: inside ``with group.deferring():`` an output's block ends with the file
complete but still anonymous; the group makes a batch of such files durable together (writeback
of all of them is started, then each is fsynced: the first journal commit carries the others'
metadata), only then links each into place, and leaves the folders to its :class:`FolderSync`.
A folder run's worker creates a batch's outputs through one descriptor of their folder and hands
the batch to the group's commit thread (:meth:`GroupCommit.batch`). Each output's
:class:`Ticket` says when it is in place (or why not); :meth:`GroupCommit.close` finishes
everything. Again a name only ever appears for a complete, synced file, and a killed run leaves
no file behind.

Where ``O_TMPFILE`` is unsupported (some filesystems answer ``EOPNOTSUPP``/``EISDIR``; or
``/proc`` is not mounted, which linking an anonymous file needs), a named temporary file is used
instead: mode 0600 from creation, removed on any failure that Python sees. Only a ``kill -9`` in
that fallback can leave a ``.<name>.*.kmsenv-tmp`` file behind.

It also owns the writeback hint for large outputs (:func:`start_writeback`, :class:`Writeback`):
``sync_file_range(SYNC_FILE_RANGE_WRITE)`` on each completed multi-MiB region, so the disk writes
while the output is still being produced rather than all at the final fsync. A hint only: the
fsync above is still what makes a file durable, and where the call fails or does not exist
nothing happens.
"""

from __future__ import annotations

import contextlib
import contextvars
import errno
import functools
import io
import os
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, BinaryIO, cast

from kmsenv.errors import OutputError

if TYPE_CHECKING:
    from concurrent.futures import ThreadPoolExecutor

__all__ = [
    "PRIVATE_MODE",
    "TEMP_SUFFIX",
    "WRITEBACK_BYTES",
    "AtomicOutput",
    "FolderSync",
    "GroupCommit",
    "Ticket",
    "Writeback",
    "same_file",
    "start_writeback",
]

#: Mode of outputs that hold plaintext: readable by the owner only.
PRIVATE_MODE = 0o600
#: Suffix of named temporary files (the fallback, and the force path's link-then-rename step).
TEMP_SUFFIX = ".kmsenv-tmp"
_DEFAULT_CREATE_MODE = 0o666  # the kernel applies the umask, as for any new file
_O_TMPFILE = getattr(os, "O_TMPFILE", 0)
#: Errors with which a filesystem or kernel says "no O_TMPFILE here" (not "you may not write").
_NO_TMPFILE = {errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL, errno.ENOTSUP}
#: Whether /proc/self/fd exists (linking an anonymous file needs it); looked up once.
_proc_fd: bool | None = None


def _have_proc_fd() -> bool:
    global _proc_fd  # noqa: PLW0603 - a fact about this process, computed once
    if _proc_fd is None:
        _proc_fd = os.path.isdir("/proc/self/fd")
    return _proc_fd


class FolderSync:
    """Folder fsyncs deferred and shared by the outputs of a run (see the module docstring).

    Thread-safe. Holds one descriptor per distinct folder (at most ``max_open``; beyond that
    the oldest is synced and closed early). :meth:`sync` fsyncs and closes them all; call it
    before reporting success, also after failures (files already linked deserve durability).
    """

    def __init__(self, *, max_open: int = 64) -> None:
        self._max_open = max_open
        self._lock = threading.Lock()
        self._folders: dict[tuple[int, int], int] = {}

    def __repr__(self) -> str:
        return f"FolderSync(pending={len(self._folders)})"

    @contextlib.contextmanager
    def deferring(self) -> Iterator[None]:
        """Outputs committed in this block (in this thread) leave their folder's fsync to us."""
        token = _DEFERRED.set(self)
        try:
            yield
        finally:
            _DEFERRED.reset(token)

    def adopt(self, dir_fd: int) -> None:
        """Take ``dir_fd`` (an open folder, now ours to close) for the next :meth:`sync`."""
        try:
            st = os.fstat(dir_fd)
        except OSError:
            os.close(dir_fd)
            return
        key = (st.st_dev, st.st_ino)
        oldest: int | None = None
        with self._lock:
            duplicate = key in self._folders  # already pending: one descriptor per folder is enough
            if not duplicate:
                self._folders[key] = dir_fd
                if len(self._folders) > self._max_open:
                    oldest = self._folders.pop(next(iter(self._folders)))
        if duplicate:
            os.close(dir_fd)
        if oldest is not None:
            _sync_and_close(oldest)

    def sync(self) -> None:
        """fsync every pending folder once and close it."""
        with self._lock:
            folders, self._folders = list(self._folders.values()), {}
        for fd in folders:
            _sync_and_close(fd)


def _sync_and_close(dir_fd: int) -> None:
    # Some filesystems refuse to fsync a folder: that costs durability, not correctness (below).
    with contextlib.suppress(OSError):
        os.fsync(dir_fd)
    os.close(dir_fd)


_DEFERRED: contextvars.ContextVar[FolderSync | None] = contextvars.ContextVar("kmsenv_folder_sync", default=None)


class Ticket:
    """One output waiting in a :class:`GroupCommit`: :meth:`wait` returns once it is in place."""

    __slots__ = ("_done", "_group", "_output", "_queued", "error", "size")

    def __init__(self, group: GroupCommit, output: AtomicOutput, size: int) -> None:
        self._group = group
        self._output: AtomicOutput | None = output
        # A flag under the group's condition, not an Event per file (an Event is a lock and a
        # condition of its own: measurable over thousands of small files).
        self._done = False
        self._queued = False  # handed to the commit thread (GroupCommit.batch): waiting is all there is to do
        self.error: OutputError | None = None
        #: The file's size when its writer finished (it is not reachable by name before wait()).
        self.size = size

    def __repr__(self) -> str:
        return f"Ticket(done={self._done}, failed={self.error is not None})"

    @property
    def path(self) -> Path | None:
        return None if self._output is None else self._output.path

    def wait(self) -> None:
        """Block until the file is synced and linked (flushing the group if need be);
        OutputError if that failed (then nothing of it remains)."""
        if not self._done and not self._queued:
            self._group.flush()
        self._group._await(self)
        if self.error is not None:
            raise self.error

    def _finish(self, synced: OSError | None) -> None:
        output = self._output
        try:
            if output is not None:
                output._finish_deferred(synced, self._group.folders)
        except OutputError as exc:
            self.error = exc
        except Exception as exc:  # one file's surprise must not strand the rest of the batch
            self.error = OutputError(f"cannot create the output {self.path}: {type(exc).__name__}")
        finally:
            self._output = None
            self._group._mark_done(self)


class GroupCommit:
    """Durability for a run of many outputs, a batch at a time (see the module docstring).

    Thread-safe. A batch is made durable when ``max_pending`` files wait (None: never for that
    reason), when a :class:`Ticket` is waited for, at the end of a :meth:`batch` block (on the
    group's commit thread), or on :meth:`close`: writeback of all its files is started, then
    each is fsynced, then linked, in order. ``close`` (also after failures) finishes every
    pending file and syncs the folders; call it before reporting success.
    """

    def __init__(self, *, max_pending: int | None = 64) -> None:
        self.folders = FolderSync()
        self._max_pending = max_pending
        self._lock = threading.Lock()  # guards _pending
        self._flushing = threading.Lock()  # one batch at a time, so links happen in batch order
        self._pending: dict[Ticket, int] = {}  # in arrival order
        self._landed = threading.Condition(threading.Lock())  # a ticket is done (Ticket._done)
        self._committer: ThreadPoolExecutor | None = None  # batch() commits on this thread

    def __repr__(self) -> str:
        return f"GroupCommit(pending={len(self._pending)})"

    @contextlib.contextmanager
    def deferring(self) -> Iterator[list[Ticket]]:
        """Outputs committed in this block (in this thread) are left to the group; the list
        receives their tickets."""
        tickets: list[Ticket] = []
        token = _GROUP.set((self, tickets))
        try:
            yield tickets
        finally:
            _GROUP.reset(token)

    @contextlib.contextmanager
    def batch(self, folder: str) -> Iterator[list[Ticket]]:
        """A worker's batch of outputs in ``folder``, committed behind its back.

        Outputs created in the block (in this thread) directly in ``folder`` share one open
        descriptor of it, instead of opening the folder once per file; if it cannot be opened
        here, each output opens it itself (and reports why it cannot). Add the tickets of the
        block's outputs to the list it gets (each :meth:`deferring` list); at its end (also on an
        exception) they go to the group's commit thread, which fsyncs them together, links each
        into place and then leaves the folder to :attr:`folders`. The worker goes on with its
        next batch at once instead of waiting for the disk; whoever reports a file waits for its
        ticket (:meth:`Ticket.wait`).
        """
        tickets: list[Ticket] = []
        try:
            fd: int | None = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            fd = None  # each output opens it, and says why it cannot
        token = None if fd is None else _FOLDER.set((folder, os.path.abspath(folder), fd))
        try:
            yield tickets
        finally:
            if token is not None:
                _FOLDER.reset(token)
            with self._lock:
                taken = [(t, f) for t in tickets if (f := self._pending.pop(t, None)) is not None]
                for t, _ in taken:
                    t._queued = True  # so that waiting for it never flushes other workers' files
                if self._committer is None:
                    from concurrent.futures import ThreadPoolExecutor

                    self._committer = ThreadPoolExecutor(1, thread_name_prefix="kmsenv-commit")
                committer = self._committer
            try:
                committer.submit(self._commit_batch, taken, tickets, fd)
            except RuntimeError:  # shut down already (close() ran): commit here
                self._commit_batch(taken, tickets, fd)

    def _commit_batch(self, taken: list[tuple[Ticket, int]], tickets: list[Ticket], dir_fd: int | None) -> None:
        try:
            self._land(taken)
        finally:
            for ticket in tickets:
                self._await(ticket)
            if dir_fd is not None:
                self.folders.adopt(dir_fd)  # only now: the links above went through it

    def _add(self, output: AtomicOutput, fd: int, size: int) -> Ticket:
        ticket = Ticket(self, output, size)
        with self._lock:
            self._pending[ticket] = fd
            full = self._max_pending is not None and len(self._pending) >= self._max_pending
        if full:
            self.flush()
        return ticket

    def flush(self) -> None:
        """Make every file waiting now durable, then link each into place."""
        with self._flushing:
            with self._lock:
                batch, self._pending = list(self._pending.items()), {}
            self._land(batch)

    def _mark_done(self, ticket: Ticket) -> None:
        with self._landed:
            ticket._done = True
            self._landed.notify_all()

    def _await(self, ticket: Ticket) -> None:
        if not ticket._done:  # set under the condition's lock, read without it first: the common case
            with self._landed:
                self._landed.wait_for(lambda: ticket._done)

    def _land(self, batch: list[tuple[Ticket, int]]) -> None:
        if not batch:
            return
        try:
            results = self._sync([fd for _, fd in batch])
        except BaseException:
            # Nothing of this batch may be linked unsynced, and no waiter may wait forever.
            for ticket, _ in batch:
                ticket._finish(OSError(errno.EIO, "the batch's fsync did not complete"))
            raise
        for (ticket, _), synced in zip(batch, results, strict=True):
            ticket._finish(synced)

    def _sync(self, fds: list[int]) -> list[OSError | None]:
        """fsync every descriptor; each one's error (or None), in order.

        Writeback of every file is started first (a hint each), then they are fsynced one
        after the other in this thread: the first fsync waits for its data and the journal
        commit that also carries the other files' new blocks, and each later one finds its
        data already on its way. One thread did this as fast as eight threads fsyncing in
        parallel did (a batch of 64 files of 6 KiB: 55-60 vs 63-77 us per file, ext4 on
        virtio; docs/scale.md), without waking a pool of threads for every batch.
        """
        if len(fds) > 1:
            for fd in fds:
                start_writeback(fd, 0, 0)
        return [_fsync_result(fd) for fd in fds]

    def close(self) -> None:
        """Finish every pending file, sync the folders, stop the commit thread."""
        try:
            self.flush()
        finally:
            with self._lock:
                committer, self._committer = self._committer, None
            if committer is not None:
                committer.shutdown()  # every batch handed over is in place (or failed) after this
            self.folders.sync()


def _fsync_result(fd: int) -> OSError | None:
    try:
        os.fsync(fd)
    except OSError as exc:
        return exc
    return None


#: Output bytes between two writeback hints: long enough for the disk to get large sequential
#: writes, short enough that little is left dirty for the final fsync of a large file.
WRITEBACK_BYTES = 8 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of dirty pages, do not wait


def libc_function(names: tuple[str, ...], *argtypes: str) -> Callable[..., int] | None:
    """The first of ``names`` that this process's libc has, taking the ``ctypes`` types named by
    ``argtypes`` and returning a C int (``errno`` kept for :func:`libc_errno`); None off Linux or
    where libc has none of them (callers then skip what it would do: hints, preallocation).

    ctypes is imported only here, on first use by a large output: it is not a cheap import.
    """
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    for name in names:
        fn = getattr(libc, name, None)
        if fn is not None:
            fn.argtypes = [getattr(ctypes, t) for t in argtypes]
            fn.restype = ctypes.c_int
            return cast("Callable[..., int]", fn)
    return None


def libc_errno() -> int:
    """``errno`` of the last :func:`libc_function` call in this thread."""
    import ctypes

    return ctypes.get_errno()


@functools.cache
def _libc_sync_file_range() -> Callable[..., int] | None:
    """libc's ``sync_file_range``, or None where there is none (the hint is then a no-op)."""
    return libc_function(("sync_file_range",), "c_int", "c_int64", "c_int64", "c_uint")


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing ``length`` bytes of ``fd`` at ``offset`` to disk (0: to EOF).

    Only a hint, and never a durability step (the output's final fsync is): without it a large
    output reaches its fsync with everything still dirty, and the fsync then waits for the whole
    writeback (~0.3 s per GiB here, docs/scale.md). Returns at once (ctypes releases the GIL
    around the call); any failure (pipes, filesystems or systems without ``sync_file_range``)
    is ignored: the call returns -1 with errno set, which nothing reads.
    """
    fn = _libc_sync_file_range()
    if fn is not None:
        fn(fd, offset, length, _SYNC_FILE_RANGE_WRITE)


class Writeback:
    """Hints writeback of a sequentially written output every :data:`WRITEBACK_BYTES`.

    ``wrote(n)`` after each write of ``n`` bytes; the region since the previous hint is then
    handed to :func:`start_writeback` (from the previous mark to EOF, so bytes still in a user
    space buffer, or a header written before, are simply covered by a later hint or the fsync).
    """

    __slots__ = ("_fd", "_mark", "_pending")

    def __init__(self, fd: int | None) -> None:
        self._fd, self._mark, self._pending = fd, 0, 0

    @classmethod
    def of(cls, f: object) -> Writeback:
        """A Writeback for file object ``f``; inert if it has no file descriptor."""
        try:
            fd = f.fileno()  # type: ignore[attr-defined]
        except (AttributeError, OSError, ValueError):
            fd = None
        return cls(fd if isinstance(fd, int) else None)

    def wrote(self, n: int) -> None:
        self._pending += n
        if self._pending >= WRITEBACK_BYTES and self._fd is not None:
            start_writeback(self._fd, self._mark, 0)
            self._mark += self._pending
            self._pending = 0


_GROUP: contextvars.ContextVar[tuple[GroupCommit, list[Ticket]] | None] = contextvars.ContextVar(
    "kmsenv_group_commit", default=None
)
#: The folder a batch of outputs is being created in (as named, and absolute), and its open
#: descriptor (GroupCommit.batch).
_FOLDER: contextvars.ContextVar[tuple[str, str, int] | None] = contextvars.ContextVar(
    "kmsenv_batch_folder", default=None
)


def _describe(exc: OSError) -> str:
    return exc.strerror or type(exc).__name__


def same_file(a: os.stat_result, b: os.stat_result) -> bool:
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


class _GroupFile:
    """The file object of an output left to a :class:`GroupCommit`: a plain descriptor that
    collects small writes and hands them to the kernel in one ``writev`` at :meth:`flush`.

    Why not ``BufferedWriter(FileIO(fd))``: setting those up costs an ``fstat`` and an
    ``lseek`` per file, and the size the group needs another ``fstat``; a folder run of small
    files pays every syscall per file (and each one lets another thread take the GIL). Writes of
    :data:`_WRITE_THROUGH` bytes or more (the chunks of large files) go straight to the kernel.
    Only what the envelope layer uses: ``write``, ``flush``, ``fileno``, ``close``.
    """

    __slots__ = ("_exposed", "_fd", "_parts", "_pending", "_written", "closed")

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._parts: list[bytes] = []
        self._pending = 0
        self._written = 0
        self._exposed = False  # the descriptor was handed out: writes may bypass us (pwrite)
        self.closed = False

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = memoryview(data).nbytes
        if n >= _WRITE_THROUGH and not self._parts:
            self._write_all([data])
        else:
            self._parts.append(bytes(data))  # a copy: callers reuse their buffers
            self._pending += n
            if self._pending >= _WRITE_THROUGH or len(self._parts) >= _MAX_PARTS:  # writev takes <= 1024
                self.flush()
        return n

    def flush(self) -> None:
        if self._parts:
            parts, self._parts, self._pending = self._parts, [], 0
            self._write_all(parts)

    def _write_all(self, parts: list[Any]) -> None:
        total = sum(memoryview(p).nbytes for p in parts)
        done = os.writev(self._fd, parts)
        if done < total:  # short write (rare on files): write the rest one piece at a time
            rest = memoryview(b"".join(bytes(p) for p in parts))[done:]
            while rest:
                rest = rest[os.write(self._fd, rest) :]
        self._written += total

    def fileno(self) -> int:
        self._exposed = True
        return self._fd

    @property
    def size(self) -> int | None:
        """Bytes written, if every byte went through this object (else None: ask the file)."""
        return None if self._exposed else self._written + self._pending

    def close(self) -> None:
        """Close the descriptor; buffered bytes are dropped (commit flushes before closing)."""
        if not self.closed:
            self.closed = True
            self._parts = []
            os.close(self._fd)


#: Writes of at least this size bypass _GroupFile's buffer (a large file's chunks).
_WRITE_THROUGH = 64 * 1024
_MAX_PARTS = 256


class AtomicOutput:
    """Context manager for one output file, committed only if the ``with`` body ends cleanly.

    ``with AtomicOutput(path) as f: f.write(...)`` — ``f`` is a binary file object. ``mode`` is the
    final permission bits (exactly, regardless of the umask); ``None`` means what any new file
    gets (0666 minus the umask), which suits ciphertext. Plaintext outputs pass
    :data:`PRIVATE_MODE`. Raises :class:`OutputError` if the folder is missing or unwritable, the
    target exists and ``force`` is false, or writing, syncing or linking fails; in every failure
    no output and no temporary file remain (except after ``kill -9`` in the named fallback).
    """

    def __init__(self, path: str | os.PathLike[str], *, force: bool = False, mode: int | None = None) -> None:
        # Strings, not a Path: building a Path per output was ~10 % of a small file's CPU time.
        name = os.fspath(path)
        shared = _FOLDER.get()
        if shared is not None and os.path.dirname(name) == shared[0]:
            self._folder, self._name = shared[1], os.path.basename(name)  # the batch's folder, made absolute once
        else:
            self._folder, self._name = os.path.split(os.path.abspath(name))
        self.force = force
        self.mode = mode
        self._file: BinaryIO | None = None
        self._dir_fd: int | None = None
        self._own_dir = True  # False: the descriptor is a batch's (GroupCommit.batch), not ours to close
        self._temp_name: str | None = None  # a name in the folder while one exists

    def __repr__(self) -> str:
        return f"AtomicOutput({str(self.path)!r}, force={self.force})"

    @property
    def path(self) -> Path:
        """The target's absolute path."""
        return Path(self._folder, self._name)

    def _exists_error(self) -> OutputError:
        return OutputError(
            f"the output {self.path} already exists", hint="pass --force to replace it, or choose another -o"
        )

    # ------------------------------------------------------------------------------ open --
    def __enter__(self) -> BinaryIO:
        folder = self._folder
        shared = _FOLDER.get()
        if shared is not None and shared[1] == folder:
            self._dir_fd, self._own_dir = shared[2], False
        try:
            # One call for the common case: nothing there yet (relative to the folder when it is
            # open already: no walk of the whole path).
            st = os.lstat(os.path.join(folder, self._name) if self._dir_fd is None else self._name, dir_fd=self._dir_fd)
        except OSError:
            st = None
        if st is not None:
            if stat.S_ISDIR(st.st_mode) or (stat.S_ISLNK(st.st_mode) and os.path.isdir(self.path)):
                raise OutputError(f"the output {self.path} is a folder")
            # Early, friendly refusal before any work is done; the link in commit() is what makes
            # no-clobber hold even if the target appears in the meantime.
            if not self.force:
                raise self._exists_error()
        try:
            # Every later step is relative to this descriptor, so a rename of the folder (or of
            # a symlink on its path) mid-way cannot send the output somewhere else.
            if self._dir_fd is None:
                self._dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as exc:
            raise OutputError(f"the output folder {folder} cannot be used: {_describe(exc)}") from None
        try:
            create_mode = _DEFAULT_CREATE_MODE if self.mode is None else PRIVATE_MODE
            fd = self._open_anonymous(create_mode)
            if fd is None:
                fd = self._open_named(create_mode)
            try:
                if self.mode is not None:
                    os.fchmod(fd, self.mode)
                if _GROUP.get() is not None:
                    self._file = cast(BinaryIO, _GroupFile(fd))
                else:
                    # Not os.fdopen: that also asks whether the file is a terminal (an ioctl per
                    # output, which adds up over thousands of small files).
                    self._file = io.BufferedWriter(io.FileIO(fd, "wb"))
            except OSError as exc:
                os.close(fd)
                raise OutputError(f"cannot set up the output {self.path}: {_describe(exc)}") from None
        except BaseException:
            self.abort()
            raise
        return self._file

    def _open_anonymous(self, create_mode: int) -> int | None:
        """An O_TMPFILE descriptor in the folder, or None if this system cannot give one."""
        if not _O_TMPFILE or not _have_proc_fd():
            return None
        try:
            return os.open(".", _O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, create_mode, dir_fd=self._dir_fd)
        except OSError as exc:
            if exc.errno in _NO_TMPFILE:
                return None
            raise OutputError(f"cannot write in the output folder {self._folder}: {_describe(exc)}") from None

    def _open_named(self, create_mode: int) -> int:
        name = self._random_name()
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | getattr(os, "O_NOFOLLOW", 0)
        try:
            # Plaintext is never readable by others, not even for the instant before fchmod.
            fd = os.open(name, flags, create_mode, dir_fd=self._dir_fd)
        except OSError as exc:
            raise OutputError(f"cannot write in the output folder {self._folder}: {_describe(exc)}") from None
        self._temp_name = name
        return fd

    def _random_name(self) -> str:
        return f".{self._name}.{os.urandom(8).hex()}{TEMP_SUFFIX}"

    # ------------------------------------------------------------------------- finish --
    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def abort(self) -> None:
        """Drop everything written: close the file and remove any named temporary file."""
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None
        self._discard()
        self._close_dir()

    def _discard(self) -> None:
        if self._temp_name is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._temp_name, dir_fd=self._dir_fd)
            self._temp_name = None

    def _close_dir(self) -> None:
        if self._dir_fd is not None and self._own_dir:
            os.close(self._dir_fd)
        self._dir_fd = None

    def _hand_dir(self, folders: FolderSync) -> None:
        """Leave the folder's fsync (and closing its descriptor) to ``folders``."""
        if self._dir_fd is not None and self._own_dir:
            folders.adopt(self._dir_fd)  # fsynced once per folder by the run, closed there
        self._dir_fd = None  # a batch's descriptor goes to the same place when the batch ends

    def commit(self) -> None:
        """Flush, fsync and link the file into place (see the module docstring)."""
        f = self._file
        if f is None:
            raise RuntimeError("AtomicOutput.commit() outside its with block")
        group = _GROUP.get()
        if group is not None:
            self._defer(f, *group)
            return
        try:
            try:
                f.flush()
                os.fsync(f.fileno())
            except OSError as exc:
                raise OutputError(f"cannot write the output {self.path}: {_describe(exc)}") from None
            self._link(f.fileno())
            f.close()
            self._file = None
            deferred = _DEFERRED.get()
            if deferred is None:
                self._sync_folder()
            else:
                self._hand_dir(deferred)
        except BaseException:
            self.abort()
            raise
        self._close_dir()

    def _defer(self, f: BinaryIO, group: GroupCommit, tickets: list[Ticket]) -> None:
        """Hand the complete (flushed, still nameless) file to ``group``."""
        try:
            try:
                f.flush()
                size = f.size if isinstance(f, _GroupFile) and f.size is not None else os.fstat(f.fileno()).st_size
            except OSError as exc:
                raise OutputError(f"cannot write the output {self.path}: {_describe(exc)}") from None
        except BaseException:
            self.abort()
            raise
        tickets.append(group._add(self, f.fileno(), size))

    def _finish_deferred(self, synced: OSError | None, folders: FolderSync) -> None:
        """The group's second half of :meth:`commit`: ``synced`` is the fsync's error, if any."""
        f = self._file
        try:
            if f is None:
                raise RuntimeError("nothing to finish")
            if synced is not None:
                raise OutputError(f"cannot write the output {self.path}: {_describe(synced)}")
            self._link(f.fileno())
            f.close()
            self._file = None
            self._hand_dir(folders)
        except BaseException:
            self.abort()
            raise

    def _link(self, fd: int) -> None:
        # os.link follows the /proc symlink only through linkat(), which CPython uses when a
        # dir_fd is given (plain link(2) would try to hard-link the symlink itself: EXDEV).
        anonymous = f"/proc/self/fd/{fd}"
        here = self._dir_fd
        name = self._name
        try:
            if not self.force:
                # link(2) never replaces: EEXIST is the atomic no-clobber check.
                if self._temp_name is None:
                    os.link(anonymous, name, dst_dir_fd=here, follow_symlinks=True)
                else:
                    os.link(self._temp_name, name, src_dir_fd=here, dst_dir_fd=here)
                    self._discard()
                return
            if self._temp_name is None:
                # rename(2) cannot take an anonymous file: give it a random name first.
                temp = self._random_name()
                os.link(anonymous, temp, dst_dir_fd=here, follow_symlinks=True)
                self._temp_name = temp
            os.replace(self._temp_name, name, src_dir_fd=here, dst_dir_fd=here)
            self._temp_name = None
        except FileExistsError:
            raise self._exists_error() from None
        except OSError as exc:
            raise OutputError(f"cannot create the output {self.path}: {_describe(exc)}") from None

    def _sync_folder(self) -> None:
        # The file is complete and in place by now: a folder that cannot be synced (some
        # filesystems refuse) costs durability across a power cut, not correctness, and turning
        # it into an error would report failure for an output that exists.
        if self._dir_fd is not None:
            with contextlib.suppress(OSError):
                os.fsync(self._dir_fd)
