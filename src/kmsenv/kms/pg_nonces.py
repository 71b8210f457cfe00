"""Request nonces in the PostgreSQL store, shared by every node: :class:`NonceStore`'s cluster twin.

With the KMS in PostgreSQL, a replayed request may reach any node, so the nonces live in the
store's ``nonces`` table, where the primary key (AccessKey id, nonce) makes "claim this nonce"
atomic across nodes: one ``INSERT ... ON CONFLICT`` that returns a row only if this call claimed
it. A nonce whose record has expired (older than twice the clock window) may be claimed again,
as with the SQLite store.

The nonces use a small connection pool of their own, so a request's nonce never waits behind
key-management transactions for a connection. Like the SQLite nonce file, their commits do not
wait for the disk (``synchronous_commit = off``, set once on these connections only): after a
database crash the last moments' nonces may be forgotten, which re-opens replay of those few
requests until their timestamps leave the window. Key data never goes through this path. A claim
is one autocommitted statement — one round trip to the database per request.
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
_POOL_MAX = 4
#: A pooled connection unused for longer than this is checked (a round trip) before a claim.
_CHECK_IDLE_S = 0.5

_CLAIM = (
    "INSERT INTO nonces(access_key_id, nonce, expires_at) VALUES (%s, %s, %s) "
    "ON CONFLICT (access_key_id, nonce) DO UPDATE SET expires_at = excluded.expires_at "
    "WHERE nonces.expires_at < %s RETURNING 1"
)


class PgNonceStore:
    def __init__(self, url: str, *, reachable: Callable[[], bool] | None = None) -> None:
        import psycopg_pool

        from kmsenv.kms.pg_store import CONNECT_TIMEOUT_S

        self._url = url
        # The key store's word on whether the database answers at all (its change listener):
        # while it does not, a claim fails at once rather than after the pool's timeout.
        self._reachable = reachable or (lambda: True)
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=_POOL_MAX,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
            check=self._check_if_idle,
            configure=_no_disk_wait,
            timeout=CONNECT_TIMEOUT_S,
            name="kmsenv-nonces",
            open=False,
        )
        self._pool.open(wait=False)
        self._lock = threading.Lock()
        self._last_purge = 0.0
        self._last_used: dict[int, float] = {}  # id(connection) → monotonic time of its last claim

    def close(self) -> None:
        self._pool.close()

    def _check_if_idle(self, conn: Any) -> None:
        """The pool's check before handing out a connection: a round trip, but only for one idle
        for a while (it may have broken meanwhile: a database restart). Under load connections
        come back within milliseconds, and a claim then costs one round trip, not two; one that
        broke since its last use fails its claim with 503, which clients retry."""
        import psycopg_pool

        if time.monotonic() - self._last_used.get(id(conn), 0.0) > _CHECK_IDLE_S:
            psycopg_pool.ConnectionPool.check_connection(conn)

    def claim(self, access_key_id: str, nonce: str, *, window_s: int, now: float | None = None) -> bool:
        """Record ``nonce`` for ``access_key_id``; False if it was already used within the window."""
        import psycopg

        from kmsenv.kms.pg_store import CONNECT_TIMEOUT_S, unavailable, wait_for_connection

        now = time.time() if now is None else now
        with self._lock:
            purge, self._last_purge = (
                (True, now) if now - self._last_purge > _PURGE_EVERY_S else (False, self._last_purge)
            )
        try:
            conn = wait_for_connection(self._pool, self._reachable, CONNECT_TIMEOUT_S)
            try:
                if purge:
                    conn.execute("DELETE FROM nonces WHERE expires_at < %s", (int(now),))
                row: Any = conn.execute(_CLAIM, (access_key_id, nonce, int(now) + 2 * window_s, int(now))).fetchone()
                self._last_used[id(conn)] = time.monotonic()
            finally:
                self._pool.putconn(conn)
        except psycopg.OperationalError as exc:
            raise unavailable("nonce claim failed on", self._url, exc) from None
        return row is not None


def _no_disk_wait(conn: Any) -> None:
    conn.execute("SET synchronous_commit = off")


def open_nonce_store(store: Store, home: Path) -> NonceStore | PgNonceStore:
    """The nonce store that goes with ``store``: its database for PostgreSQL, else ``home/nonces.db``."""
    url = getattr(store, "url", None)
    if isinstance(url, str):
        return PgNonceStore(url, reachable=getattr(store, "reachable", None))
    return NonceStore(home / "nonces.db")
