"""The data-key cache: one data key from the KMS serves many files, within limits.

Why it is safe: a file's payload key is HKDF(data key, 32-byte random salt, ...), fresh for every
file (docs/format.md §6), so files sharing a data key still never share a payload key, and chunk
nonces (which restart at 0 in every file) never repeat under one key. What sharing costs is blast
radius: whoever unwraps one file's data key can open every file encrypted while it was cached.
The limits bound that: a cached data key is used for at most ``max_files`` files, ``max_bytes``
bytes of plaintext and ``max_age`` seconds from the moment the KMS made it, whichever comes
first; then the next file gets a new one.

Entries are keyed by the caller (the envelope layer): the KMS object, the ordered CMK list and
the encryption context, so a file always carries exactly the wrapped keys and the context it was
asked for. Concurrent requests for a key that is not cached coalesce: one thread asks the KMS,
the others wait for its answer (or its error) instead of each making a call.

Decryption uses the same object the other way round (:meth:`DataKeyCache.unwrap`): the KMS's
answer to ``Decrypt`` of one wrapped data key (the same ``CiphertextBlob`` under the same
context) is kept for ``max_age`` seconds, at most :data:`MAX_UNWRAPPED` of them, so a folder
encrypted under one cached data key decrypts with one KMS call. That adds no exposure: every file
carrying that blob is already readable by whoever holds its data key, and each file's header is
still authenticated (commitment and tag) with it. The age limit bounds how long a key disabled
in the KMS meanwhile still opens files in a running process.

The cache lives in one process (a folder run, or a Python program holding a
:class:`DataKeyCache`); separate ``kmsenv`` processes share nothing (that needs an agent).
The plaintext data keys it holds are Python ``bytes`` and cannot be wiped; :meth:`clear` drops
them.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any, NoReturn, TypeVar

from kmsenv.errors import UsageError
from kmsenv.format.header import KeyStanza

__all__ = ["DEFAULT_MAX_AGE", "DEFAULT_MAX_BYTES", "DEFAULT_MAX_FILES", "MAX_UNWRAPPED", "DataKeyCache", "Lease"]

DEFAULT_MAX_AGE = 300.0
DEFAULT_MAX_FILES = 10_000
DEFAULT_MAX_BYTES = 64 << 30
#: Unwrapped data keys kept for decryption, least recently used dropped first: memory stays
#: bounded (a few hundred bytes each) in a run over files written under many data keys.
MAX_UNWRAPPED = 1024

_T = TypeVar("_T")

#: What the caller's ``make`` returns: the plaintext data key and its wrapped forms.
Made = tuple[bytes, tuple[KeyStanza, ...]]


@dataclass(eq=False)
class _Entry:
    data_key: bytes = field(repr=False)
    stanzas: tuple[KeyStanza, ...]
    owner: object
    created: float
    files: int = 0
    bytes: int = 0


class _Asking:
    """A KMS call in flight for one cache key: other threads wait for it instead of calling too."""

    __slots__ = ("done", "error")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.error: BaseException | None = None


class Lease:
    """One file's use of a data key: the key, its stanzas, and where to count the bytes."""

    __slots__ = ("_cache", "_entry", "_hint", "data_key", "stanzas")

    def __init__(self, cache: DataKeyCache | None, entry: _Entry, hint: int) -> None:
        self._cache = cache
        self._entry = entry
        self._hint = hint
        self.data_key = entry.data_key
        self.stanzas = entry.stanzas

    def __repr__(self) -> str:
        return "Lease(<hidden>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("Lease objects hold key material and cannot be pickled")

    def settle(self, plaintext_bytes: int) -> None:
        """Count the bytes actually encrypted beyond what was reserved when the lease was taken."""
        if self._cache is not None and plaintext_bytes > self._hint:
            self._cache._count(self._entry, plaintext_bytes - self._hint)


def _positive(name: str, option: str, value: float, kind: type) -> None:
    if isinstance(value, bool) or not isinstance(value, kind | int):
        raise UsageError(f"the data-key cache's {name} must be a number, not {value!r}")
    if not value > 0:
        raise UsageError(
            f"the data-key cache's {name} ({option}) must be positive, not {value}",
            hint="to encrypt every file under its own data key, turn the cache off (--no-cache, or cache=None)",
        )


class DataKeyCache:
    """Reuse data keys across files within ``max_age`` seconds, ``max_files`` files and
    ``max_bytes`` plaintext bytes per data key (each limit must be positive: UsageError).

    Thread-safe. Pass one to :func:`kmsenv.envelope.encrypt_file` (``cache=``) for every file of
    a batch. ``clock`` (monotonic seconds) is a seam for tests. The object refuses pickling and
    its repr shows only counters.
    """

    def __init__(
        self,
        *,
        max_age: float = DEFAULT_MAX_AGE,
        max_files: int = DEFAULT_MAX_FILES,
        max_bytes: int = DEFAULT_MAX_BYTES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        _positive("max_age", "--cache-max-age", max_age, float)
        _positive("max_files", "--cache-max-files", max_files, int)
        _positive("max_bytes", "--cache-max-bytes", max_bytes, int)
        self.max_age = float(max_age)
        self.max_files = int(max_files)
        self.max_bytes = int(max_bytes)
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: dict[Hashable, _Entry] = {}
        self._pending: dict[Hashable, _Asking] = {}
        self._unwrapped: OrderedDict[Hashable, tuple[float, object, Any]] = OrderedDict()
        self._unwrapping: dict[Hashable, _Asking] = {}
        self.hits = 0
        self.misses = 0
        self.unwrap_hits = 0
        self.unwrap_misses = 0

    def __repr__(self) -> str:
        return (
            f"DataKeyCache(max_age={self.max_age}, max_files={self.max_files}, max_bytes={self.max_bytes}, "
            f"entries={len(self._entries)}, hits={self.hits}, misses={self.misses})"
        )

    def __reduce__(self) -> NoReturn:
        raise TypeError("DataKeyCache objects hold key material and cannot be pickled")

    def clear(self) -> None:
        """Forget every cached data key, both directions (files already written are unaffected)."""
        with self._lock:
            self._entries.clear()
            self._unwrapped.clear()

    def stats(self) -> dict[str, Any]:
        """``{"hits": files served from the cache, "misses": data keys made, "entries": cached now}``,
        and for decryption ``unwrap_hits``, ``unwrap_misses`` (KMS ``Decrypt`` calls made through
        the cache) and ``unwrapped`` (kept now)."""
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "entries": len(self._entries),
                "unwrap_hits": self.unwrap_hits,
                "unwrap_misses": self.unwrap_misses,
                "unwrapped": len(self._unwrapped),
            }

    def unwrap(self, key: Hashable, make: Callable[[], _T], *, owner: object) -> _T:
        """The KMS's answer for unwrapping the data key ``key`` names: kept if younger than
        ``max_age``, else ``make()``'s (which is then kept; errors are not).

        ``key`` must identify the wrapped key exactly (KMS, blob, context): the envelope layer
        builds it. Concurrent misses on one key make one call; its error reaches every waiter.
        """
        while True:
            with self._lock:
                found = self._unwrapped.get(key)
                if found is not None:
                    created, entry_owner, value = found
                    if entry_owner is owner and self._clock() - created < self.max_age:
                        self._unwrapped.move_to_end(key)
                        self.unwrap_hits += 1
                        return value  # type: ignore[no-any-return]
                    del self._unwrapped[key]
                pending = self._unwrapping.get(key)
                asking = pending is None
                if pending is None:
                    pending = self._unwrapping[key] = _Asking()
            if not asking:
                pending.done.wait()
                if pending.error is not None:
                    raise pending.error
                continue
            try:
                value = make()
            except BaseException as exc:
                with self._lock:
                    del self._unwrapping[key]
                pending.error = exc
                pending.done.set()
                raise
            with self._lock:
                self.unwrap_misses += 1
                self._unwrapped[key] = (self._clock(), owner, value)
                while len(self._unwrapped) > MAX_UNWRAPPED:
                    self._unwrapped.popitem(last=False)
                del self._unwrapping[key]
            pending.done.set()
            return value

    def _usable(self, entry: _Entry, owner: object, size_hint: int) -> bool:
        return (
            entry.owner is owner
            and self._clock() - entry.created < self.max_age
            and entry.files < self.max_files
            and entry.bytes + size_hint <= self.max_bytes
        )

    def _count(self, entry: _Entry, extra: int) -> None:
        with self._lock:
            entry.bytes += extra

    def acquire(self, key: Hashable, make: Callable[[], Made], *, owner: object, size_hint: int = 0) -> Lease:
        """A data key for one more file under ``key``: cached if within limits, else ``make()``'s.

        ``size_hint``: the plaintext bytes the file will have if known (reserved now; the rest is
        counted by :meth:`Lease.settle`). A file larger than ``max_bytes`` gets a data key of its
        own that is not cached. Errors from ``make`` reach every thread waiting for that key.
        """
        if size_hint > self.max_bytes:
            data_key, stanzas = make()
            with self._lock:
                self.misses += 1
            return Lease(None, _Entry(data_key, stanzas, owner, self._clock(), 1, size_hint), size_hint)
        while True:
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None and self._usable(entry, owner, size_hint):
                    entry.files += 1
                    entry.bytes += size_hint
                    self.hits += 1
                    return Lease(self, entry, size_hint)
                if entry is not None:
                    del self._entries[key]  # expired or used up: the next file gets a new data key
                pending = self._pending.get(key)
                asking = pending is None
                if pending is None:
                    pending = self._pending[key] = _Asking()
            if not asking:
                pending.done.wait()
                if pending.error is not None:
                    raise pending.error  # the asking thread's error: one KMS refusal, not one per thread
                continue
            try:
                data_key, stanzas = make()
            except BaseException as exc:
                with self._lock:
                    del self._pending[key]
                pending.error = exc
                pending.done.set()
                raise
            with self._lock:
                self.misses += 1
                # This file is the new key's first use; waiting threads take the next ones.
                entry = self._entries[key] = _Entry(data_key, stanzas, owner, self._clock(), 1, size_hint)
                del self._pending[key]
            pending.done.set()
            return Lease(self, entry, size_hint)
