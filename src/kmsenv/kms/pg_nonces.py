"""Request nonces in the PostgreSQL store, shared by every node: :class:`NonceStore`'s cluster twin.

With the KMS in PostgreSQL, a replayed request may reach any node, so the nonces live in the
store's ``nonces`` table, where the primary key (AccessKey id, nonce) makes "claim this nonce"
atomic across nodes: one ``INSERT ... ON CONFLICT`` that returns a row only if this call claimed
it. A nonce whose record has expired (older than twice the clock window) may be claimed again,
as with the SQLite store.

This is the one database round trip of every request on the data path, so it is kept lean:
each thread that claims nonces (a server worker's few request threads) has a connection of its
own, used through libpq directly (``psycopg.pq``) with the claim prepared once per connection —
no pool, no cursor, no per-call parsing or planning. Measured per claim, one thread on a loopback
database: 22 µs of client CPU, against 87 µs through a psycopg pool and cursor. The nonces never
wait behind key-management transactions for a connection. Like the SQLite nonce file, their
commits do not wait for the disk (``synchronous_commit = off``, set on these connections only):
after a database crash the last moments' nonces may be forgotten, which re-opens replay of those
few requests until their timestamps leave the window. Key data never goes through this path.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kmsenv.kms.nonces import NonceStore

if TYPE_CHECKING:
    from kmsenv.kms.store import Store

__all__ = ["PgNonceStore", "open_nonce_store"]

_PURGE_EVERY_S = 30.0
#: A connection unused for longer than this may have broken meanwhile (a database restart): if
#: its claim then fails, the claim is retried once on a new connection (the statement cannot have
#: run on a server that was gone). A busy connection's failure is answered 503 instead.
_RETRY_IDLE_S = 0.5

_CLAIM_NAME = b"kmsenv_claim_nonce"
_CLAIM = (
    b"INSERT INTO nonces(access_key_id, nonce, expires_at) VALUES ($1, $2, $3) "
    b"ON CONFLICT (access_key_id, nonce) DO UPDATE SET expires_at = excluded.expires_at "
    b"WHERE nonces.expires_at < $4 RETURNING 1"
)
_PURGE = b"DELETE FROM nonces WHERE expires_at < $1"


class _ClaimFailed(Exception):
    """A claim's statement failed on its connection (the message is for the operator's log)."""


class _Connection:
    """One thread's connection, with the claim prepared on it."""

    def __init__(self, url: str, connect_timeout: int) -> None:
        import psycopg

        self.conn = psycopg.connect(url, autocommit=True, connect_timeout=connect_timeout)
        try:
            self.conn.execute("SET synchronous_commit = off")
            self.pg = self.conn.pgconn
            self._check(self.pg.prepare(_CLAIM_NAME, _CLAIM))
        except BaseException:
            self.conn.close()
            raise
        self.last_used = time.monotonic()

    def _check(self, result: Any, tuples: bool = False) -> Any:
        from psycopg import pq

        expected = pq.ExecStatus.TUPLES_OK if tuples else pq.ExecStatus.COMMAND_OK
        if result.status != expected:
            raise _ClaimFailed(result.get_error_message() or self.pg.get_error_message())
        return result

    def claim(self, access_key_id: str, nonce: str, expires_at: int, now: int, *, purge: bool) -> bool:
        params = [access_key_id.encode("utf-8"), nonce.encode("utf-8"), str(expires_at).encode(), str(now).encode()]
        try:
            if purge:
                self._check(self.pg.exec_params(_PURGE, [params[3]]))
            result = self._check(self.pg.exec_prepared(_CLAIM_NAME, params), tuples=True)
        except Exception as exc:  # psycopg.OperationalError from a dead socket, or _ClaimFailed
            raise _ClaimFailed(str(exc)) from None
        finally:
            self.last_used = time.monotonic()
        return bool(result.ntuples)

    def close(self) -> None:
        self.conn.close()


class PgNonceStore:
    def __init__(self, url: str, *, reachable: Callable[[], bool] | None = None) -> None:
        from kmsenv.kms.pg_store import CONNECT_TIMEOUT_S

        self._url = url
        self._connect_timeout = CONNECT_TIMEOUT_S
        # The key store's word on whether the database answers at all (its change listener):
        # while it does not, a claim fails at once rather than after a connect timeout.
        self._reachable = reachable or (lambda: True)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._last_purge = 0.0
        self._open: set[_Connection] = set()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True
            connections, self._open = self._open, set()
        for conn in connections:
            conn.close()

    def _connection(self) -> _Connection:
        conn: _Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = _Connection(self._url, self._connect_timeout)
            with self._lock:
                if self._closed:
                    conn.close()
                    raise RuntimeError("the nonce store is closed")
                self._open.add(conn)
            self._local.conn = conn
        return conn

    def _drop(self, conn: _Connection) -> None:
        self._local.conn = None
        with self._lock:
            self._open.discard(conn)
        conn.close()

    def claim(self, access_key_id: str, nonce: str, *, window_s: int, now: float | None = None) -> bool:
        """Record ``nonce`` for ``access_key_id``; False if it was already used within the window."""
        import psycopg

        from kmsenv.errors import KmsError
        from kmsenv.kms.pg_store import unavailable

        now = time.time() if now is None else now
        with self._lock:
            purge, self._last_purge = (
                (True, now) if now - self._last_purge > _PURGE_EVERY_S else (False, self._last_purge)
            )
        for attempt in (1, 2):
            if not self._reachable():  # already logged, once, by the store's change listener
                raise KmsError("ServiceUnavailableTemporary", "The KMS store is unavailable; try again.")
            try:
                conn = self._connection()
            except (psycopg.Error, _ClaimFailed) as exc:
                raise unavailable("nonce claim failed on", self._url, exc) from None
            idle = time.monotonic() - conn.last_used > _RETRY_IDLE_S
            try:
                return conn.claim(access_key_id, nonce, int(now) + 2 * window_s, int(now), purge=purge)
            except _ClaimFailed as exc:
                self._drop(conn)
                if attempt == 2 or not idle:
                    raise unavailable("nonce claim failed on", self._url, exc) from None
        raise AssertionError("unreachable")  # pragma: no cover


def open_nonce_store(store: Store, home: Path) -> NonceStore | PgNonceStore:
    """The nonce store that goes with ``store``: its database for PostgreSQL, else ``home/nonces.db``."""
    url = getattr(store, "url", None)
    if isinstance(url, str):
        return PgNonceStore(url, reachable=getattr(store, "reachable", None))
    return NonceStore(home / "nonces.db")
