"""Request nonces seen within the clock window, shared by every server process on one KMS home.

Alibaba's gateway refuses a ``SignatureNonce`` reused by the same AccessKey inside the 15-minute
timestamp window (``SignatureNonceUsed``). Replay protection must hold whichever worker process
receives the replay, so the nonces live in SQLite (``nonces.db`` beside the store), where the
primary key makes "claim this nonce" atomic across processes.

It is a separate file from ``kms.db`` on purpose: every request writes a nonce, and those writes
must not queue behind (or block) key-management transactions. Its commits skip fsync
(``synchronous=NORMAL`` in WAL mode): after a power loss, the last moments' nonces may be
forgotten, which re-opens replay of those few requests until their timestamps expire — a bounded
risk traded for not paying a disk flush per request. Key data never goes through this file.

Claims from several processes (the server's workers) take turns under an ``flock`` on
``nonces.lock`` beside the file. Without it, two processes inserting at once make SQLite answer
"busy" to one of them, whose busy handler then *sleeps* (1, 2, 5, 10 ... ms) before retrying:
with 2 workers ~10 % of claims waited > 1 ms (p99 6-8 ms, max 0.3 s). A kernel lock wakes the
waiter as soon as it is released, so SQLite never finds the file busy (p99 0.2-1.2 ms). Replay
protection itself is the table's primary key, lock or not.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import threading
import time
from pathlib import Path

from kmsenv.errors import KmsError

__all__ = ["NonceStore"]

_PURGE_EVERY_S = 30.0


class NonceStore:
    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
        os.close(fd)
        # flock is per open file: each store (each process) opens its own; threads share _lock.
        self._gate = os.open(path.with_name(path.stem + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        self._conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        # Under the gate: workers starting together on a new file would otherwise meet in its
        # rollback-journal mode (before WAL), where SQLite fails a lock upgrade at once
        # ("database is locked") instead of waiting (as for the KMS store: kms/store.py _opening).
        fcntl.flock(self._gate, fcntl.LOCK_EX)
        try:
            self._conn.execute("PRAGMA busy_timeout = 30000")
            self._conn.execute("PRAGMA journal_mode = WAL")
            self._conn.execute("PRAGMA synchronous = NORMAL")
            self._conn.execute(
                "CREATE TABLE IF NOT EXISTS nonces (access_key_id TEXT NOT NULL, nonce TEXT NOT NULL, "
                "expires_at INTEGER NOT NULL, PRIMARY KEY (access_key_id, nonce))"
            )
            self._conn.execute("CREATE INDEX IF NOT EXISTS nonces_expiry ON nonces(expires_at)")
        finally:
            fcntl.flock(self._gate, fcntl.LOCK_UN)
        self._lock = threading.Lock()
        self._last_purge = 0.0

    def close(self) -> None:
        with self._lock:
            self._conn.close()
            if self._gate >= 0:
                os.close(self._gate)
                self._gate = -1

    def claim(self, access_key_id: str, nonce: str, *, window_s: int, now: float | None = None) -> bool:
        """Record ``nonce`` for ``access_key_id``; False if it was already used within the window."""
        now = time.time() if now is None else now
        with self._lock:
            fcntl.flock(self._gate, fcntl.LOCK_EX)
            try:
                if now - self._last_purge > _PURGE_EVERY_S:
                    self._conn.execute("DELETE FROM nonces WHERE expires_at < ?", (int(now),))
                    self._last_purge = now
                self._conn.execute(
                    "INSERT INTO nonces(access_key_id, nonce, expires_at) VALUES (?, ?, ?)",
                    (access_key_id, nonce, int(now) + 2 * window_s),
                )
            except sqlite3.IntegrityError:
                return False
            except sqlite3.OperationalError as exc:
                raise KmsError("ServiceUnavailableTemporary", f"The nonce store is busy; try again ({exc}).") from None
            finally:
                fcntl.flock(self._gate, fcntl.LOCK_UN)
        return True
