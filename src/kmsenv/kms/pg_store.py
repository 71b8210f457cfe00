"""The PostgreSQL store: the SQLite store's records and semantics, shared by several KMS nodes.

Selected by a ``postgresql://`` URL in ``KMSENV_STORE`` (or ``open_service(store=...)``). The
records, the SQL of :class:`~kmsenv.kms.store.Tx` and the schema's migrations are the SQLite
store's; what differs between the two dialects lives here:

- **Schema**: the shared migrations translated (``BLOB`` → ``BYTEA``, flag columns → ``BOOLEAN``,
  the version sequence → an identity column), plus the PostgreSQL-only ``nonces`` table.
- **Concurrency**: a write transaction runs at READ COMMITTED and locks every key or AccessKey
  row it reads (``SELECT ... FOR UPDATE``). Each Action changes at most one key, which it reads
  first, so writers on one key queue behind each other and each sees the other's committed row:
  no lost update, no two nodes both rotating a due key (the rotation is re-checked under the
  lock), no two primary versions. Housekeeping locks due keys in key id order, so it cannot
  deadlock with itself. The alias primary key decides alias races (a unique violation is
  ``AliasAlreadyExists``). Read transactions are REPEATABLE READ READ ONLY: one snapshot, never
  a serialisation failure.
- **Durability**: ``synchronous_commit = on`` per session (whatever the server default), so a
  commit that returned is on disk (and on synchronous standbys, if configured).
- **Failures**: a node that cannot reach the database fails fast (``connect_timeout``), and a
  lost connection, lock timeout or deadlock surfaces as ``ServiceUnavailableTemporary``; the
  details go to the log, not to clients.
- **Change notices**: every write transaction ends in ``NOTIFY kmsenv_changes`` (delivered at
  commit), and each store LISTENs on its own connection (:class:`_ChangeListener`, started by the
  first :meth:`PostgresStore.change_counter` call): nodes drop what they cached from the store
  within milliseconds of another node's commit (docs/cluster.md, "Caches").
- **Schema versions**: a database no node has used is created on first open; an older schema is
  refused until ``kmsenv store migrate`` upgrades it (an operator's decision: nodes still running
  the older code will then refuse the newer schema); a schema newer than this code is refused,
  naming both versions.

psycopg is imported only here, and this module only when a PostgreSQL store is used.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import fields
from typing import Any

import psycopg
import psycopg_pool
from psycopg import errors as pg_errors

from kmsenv.errors import ConfigError, KmsError
from kmsenv.kms.store import _MIGRATIONS, POSTGRES_SCHEMES, SCHEMA_VERSION, KeyRecord, Tx, is_postgres_url, redact_url

__all__ = [
    "PostgresStore",
    "is_postgres_url",
    "migrate",
    "pg_migrations",
    "read_schema_version",
    "redact",
    "require_postgres_url",
    "unavailable",
]

_log = logging.getLogger("kmsenv.store")

URL_SCHEMES = POSTGRES_SCHEMES
CONNECT_TIMEOUT_S = 5
#: How long an Action waits for a row lock or a pooled connection before it is told to retry;
#: SQLite's busy timeout is the same 30 s.
LOCK_TIMEOUT_S = 30
POOL_MAX = 10
#: The channel every write transaction notifies, and every node listens on.
CHANGES_CHANNEL = "kmsenv_changes"
#: The listener proves its connection alive this often (a round trip answered after every
#: notification sent before it), and its word is trusted for at most ``LISTEN_TRUST_S`` after
#: the last proof: a hung or half-open listener connection turns caching off within that time.
LISTEN_HEARTBEAT_S = 0.2
LISTEN_TRUST_S = 0.6
#: Connection failures that mean the database is down: no answer at all (refused, timed out,
#: reset: no SQLSTATE), starting up or shutting down (57P03), shut down by the operator (57P01).
_DOWN_STATES = (None, "57P03", "57P01")
#: pg_advisory_xact_lock id serialising schema creation and migration across nodes ("kmsenv").
_SCHEMA_LOCK = 0x6B6D73656E76

#: PostgreSQL-only statements, applied with the shared migration of the same number.
_PG_EXTRA: dict[int, str] = {
    # Request nonces of every node (see pg_nonces); no table in SQLite's kms.db.
    1: """
    CREATE TABLE nonces (
        access_key_id TEXT NOT NULL,
        nonce TEXT NOT NULL,
        expires_at BIGINT NOT NULL,
        PRIMARY KEY (access_key_id, nonce)
    );
    CREATE INDEX nonces_expiry ON nonces(expires_at);
    """,
}


def require_postgres_url(text: str) -> str:
    if not is_postgres_url(text):
        raise ConfigError(
            f"KMSENV_STORE must be a postgresql:// URL, not {redact(text)!r}",
            hint="unset KMSENV_STORE to use the embedded SQLite store in KMSENV_HOME",
        )
    return text


#: The URL without its password, for messages and logs (:func:`kmsenv.kms.store.redact_url`).
redact = redact_url


def _flag_columns() -> set[str]:
    return {f.name for f in fields(KeyRecord) if f.type in ("bool", bool)}


def _translate(sql: str) -> str:
    """One shared (SQLite-dialect) migration in PostgreSQL's dialect.

    Text compares byte by byte (``COLLATE "C"``), as in SQLite, whatever the database's locale:
    listings come in the same order from both stores, and date strings compare as dates."""
    sql = sql.replace("INTEGER PRIMARY KEY AUTOINCREMENT", "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY")
    sql = re.sub(r"\bBLOB\b", "BYTEA", sql)
    sql = re.sub(r"\bTEXT\b", 'TEXT COLLATE "C"', sql)
    flags = "|".join(sorted(_flag_columns()))
    return re.sub(rf"\b({flags}) INTEGER NOT NULL DEFAULT 0\b", r"\1 BOOLEAN NOT NULL DEFAULT FALSE", sql)


@functools.cache
def pg_migrations() -> tuple[str, ...]:
    """The schema's migrations as PostgreSQL runs them; index ``n`` upgrades version n to n+1."""
    return tuple(_translate(sql + _PG_EXTRA.get(n + 1, "")) for n, sql in enumerate(_MIGRATIONS))


@functools.cache
def _pg_sql(sql: str) -> str:
    # The shared SQL uses qmark placeholders and no literal '?' or '%'.
    return sql.replace("?", "%s")


class _Row:
    """A row readable by position and by column name, like ``sqlite3.Row``."""

    __slots__ = ("_names", "_values")

    def __init__(self, names: dict[str, int], values: Sequence[Any]) -> None:
        self._names = names
        self._values = values

    def __getitem__(self, item: int | str) -> Any:
        return self._values[self._names[item] if isinstance(item, str) else item]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)


def _row_factory(cursor: Any) -> Callable[[Sequence[Any]], _Row]:
    names = {column.name: i for i, column in enumerate(cursor.description or ())}
    return functools.partial(_Row, names)


class _Connection:
    """A psycopg connection speaking the shared SQL (``?`` placeholders, ``sqlite3.Row``-like rows)."""

    def __init__(self, conn: psycopg.Connection[Any]) -> None:
        self._conn = conn

    def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Any:
        cursor = self._conn.cursor(row_factory=_row_factory)
        return cursor.execute(_pg_sql(sql), parameters)


class PgTx(Tx):
    """A :class:`Tx` over PostgreSQL: write transactions lock the rows they read."""

    _unique_violation = (pg_errors.UniqueViolation,)

    def __init__(self, conn: psycopg.Connection[Any], *, write: bool) -> None:
        super().__init__(_Connection(conn))
        self._lock_rows = " FOR UPDATE" if write else ""


def unavailable(what: str, url: str, exc: BaseException) -> KmsError:
    # Connection details (host names, server messages) are for the operator's log, not for clients.
    _log.warning("%s %s: %s", what, redact(url), exc)
    return KmsError("ServiceUnavailableTemporary", "The KMS store is unavailable; try again.")


def _connect(url: str) -> psycopg.Connection[Any]:
    try:
        return psycopg.connect(url, connect_timeout=CONNECT_TIMEOUT_S)
    except psycopg.OperationalError as exc:
        _log.warning("cannot connect to %s: %s", redact(url), exc)
        raise KmsError(
            "ServiceUnavailableTemporary", f"Cannot connect to the KMS store {redact(url)}; try again."
        ) from None


def _current_version(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute("SELECT to_regclass('meta') IS NOT NULL").fetchone()
    if row is None or not row[0]:
        return 0
    row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
    return 0 if row is None else int(bytes(row[0]))


def _prepare_schema(url: str, *, migrate: bool) -> tuple[int, int]:
    """Check (and create or, with ``migrate``, upgrade) the schema; returns (before, after)."""
    with _connect(url) as conn, conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SCHEMA_LOCK,))
        current = _current_version(conn)
        if current > SCHEMA_VERSION:
            raise ConfigError(
                f"the KMS store {redact(url)} has schema version {current}, newer than this kmsenv "
                f"understands ({SCHEMA_VERSION})",
                hint="upgrade kmsenv on this node to use this store",
            )
        if 0 < current < SCHEMA_VERSION and not migrate:
            raise ConfigError(
                f"the KMS store {redact(url)} has schema version {current}; this kmsenv needs {SCHEMA_VERSION}",
                hint="run `kmsenv store migrate` once (nodes still running the older kmsenv will then refuse it)",
            )
        for version in range(current, SCHEMA_VERSION):
            for statement in pg_migrations()[version].split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute(
                "INSERT INTO meta(name, value) VALUES ('schema_version', %s) "
                "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
                (str(version + 1).encode("ascii"),),
            )
    return current, SCHEMA_VERSION


def read_schema_version(url: str) -> int:
    """The schema version of the database at ``url`` (0: no kmsenv schema yet)."""
    with _connect(url) as conn:
        return _current_version(conn)


def migrate(url: str) -> tuple[int, int]:
    """Apply the forward migrations this code has; returns (version before, version after)."""
    return _prepare_schema(url, migrate=True)


_BEGIN_WRITE = "BEGIN ISOLATION LEVEL READ COMMITTED"
_BEGIN_READ = "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY"


def _configure(conn: psycopg.Connection[Any]) -> None:
    conn.execute(f"SET lock_timeout = '{LOCK_TIMEOUT_S}s'")
    conn.execute("SET synchronous_commit = on")


class _ChangeListener:
    """LISTENs for ``kmsenv_changes`` on a connection of its own, in a daemon thread.

    :meth:`counter` moves on every notification, and on every (re)connection (anything may have
    changed while it was not listening); it is None while the listener is not known to be live
    (not yet connected, connection lost, no heartbeat answered within ``LISTEN_TRUST_S``), and
    then nothing may be cached. The heartbeat matters because PostgreSQL delivers pending
    notifications before it answers a query: once a ``SELECT 1`` sent at time *h* is answered,
    every commit before *h* has been seen. So what a cache holds is at most
    ``LISTEN_HEARTBEAT_S`` + ``LISTEN_TRUST_S`` behind the database, and usually milliseconds.
    """

    def __init__(self, url: str) -> None:
        self._url = url
        self._count = 0
        self._proved = 0.0  # monotonic time of the last answered heartbeat; 0: not live
        self._lock = threading.Lock()
        self._stop = threading.Event()
        #: Set while the database refuses or does not answer new connections (a connection
        #: attempt failed; not merely a dropped connection): callers then fail at once.
        self.down = False
        self._thread = threading.Thread(target=self._run, name="kmsenv-store-listen", daemon=True)
        self._thread.start()

    def counter(self) -> int | None:
        with self._lock:
            if self._proved == 0.0 or time.monotonic() - self._proved > LISTEN_TRUST_S:
                return None
            return self._count

    def close(self) -> None:
        # No join: the thread notices within one heartbeat and closes its connection; a CLI
        # command must not wait for it.
        self._stop.set()

    def _bump(self, *, proved: float | None) -> None:
        with self._lock:
            self._count += 1
            self._proved = 0.0 if proved is None else proved

    def _run(self) -> None:
        while not self._stop.is_set():
            connected = False
            try:
                with psycopg.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=CONNECT_TIMEOUT_S,
                    # A dead peer must fail a heartbeat, not hang it (the trust window then
                    # lapses anyway; this bounds how long until the listener reconnects).
                    tcp_user_timeout=int(LISTEN_TRUST_S * 1000),
                    keepalives=1,
                    keepalives_idle=1,
                    keepalives_interval=1,
                    keepalives_count=2,
                ) as conn:
                    connected = True
                    conn.execute(f"LISTEN {CHANGES_CHANNEL}")
                    self._bump(proved=time.monotonic())  # anything may have changed while away
                    if self.down:
                        _log.warning("the KMS store %s answers again", redact(self._url))
                        self.down = False
                    while not self._stop.is_set():
                        for _ in conn.notifies(timeout=LISTEN_HEARTBEAT_S):
                            self._bump(proved=time.monotonic())
                        sent = time.monotonic()
                        conn.execute("SELECT 1")
                        # Notifications that arrived with the answer are queued: count them first.
                        for _ in conn.notifies(timeout=0):
                            self._bump(proved=sent)
                        with self._lock:
                            self._proved = sent
            except psycopg.Error as exc:
                self._bump(proved=None)
                if connected:
                    # Dropped (a restart, a terminated backend): reconnect at once; only a
                    # failed attempt says the database is down.
                    _log.warning("change listener on %s lost its connection: %s", redact(self._url), exc)
                    self._stop.wait(0.05)
                    continue
                if exc.sqlstate not in _DOWN_STATES:
                    # The server answered, and refused this one connection (too many clients, a
                    # login problem): connections already open may still work, so no fast 503s.
                    _log.warning("change listener cannot connect to %s: %s", redact(self._url), exc)
                elif not self.down:
                    _log.warning("the KMS store %s is unreachable: %s", redact(self._url), exc)
                    self.down = True
                self._stop.wait(0.5)
            except BaseException:  # never let a cache trust a dead listener
                self._bump(proved=None)
                raise
        self._bump(proved=None)


#: How often a caller waiting for a pooled connection asks whether the database is down.
POOL_WAIT_STEP_S = 0.1


def wait_for_connection(
    pool: psycopg_pool.ConnectionPool[Any], reachable: Callable[[], bool], timeout: float
) -> psycopg.Connection[Any]:
    """A connection from ``pool`` within ``timeout``, in short waits: when the database turns out
    to be down meanwhile (``reachable()``), give up at once rather than wait out the timeout —
    an outage must cost callers a quick 503, not a 30 s hang."""
    deadline = time.monotonic() + timeout
    while True:
        if not reachable():
            raise psycopg.OperationalError("the database is unreachable (its connections are refused)")
        left = deadline - time.monotonic()
        try:
            conn: psycopg.Connection[Any] = pool.getconn(timeout=max(0.001, min(POOL_WAIT_STEP_S, left)))
            return conn
        except psycopg_pool.PoolTimeout:
            if left <= POOL_WAIT_STEP_S:
                raise


class PostgresStore:
    """A pooled PostgreSQL store, safe for many threads and many nodes at once."""

    def __init__(self, url: str, *, max_connections: int = POOL_MAX) -> None:
        self.url = url
        self.path = redact(url)
        self._max_connections = max_connections
        _prepare_schema(url, migrate=False)
        self._pool = psycopg_pool.ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"autocommit": True, "connect_timeout": CONNECT_TIMEOUT_S},
            configure=_configure,
            timeout=LOCK_TIMEOUT_S,
            name="kmsenv-store",
            open=False,
        )
        self._pool.open(wait=False)
        self._listener: _ChangeListener | None = None
        self._listener_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"PostgresStore({self.path})"

    def close(self) -> None:
        with self._listener_lock:
            if self._listener is not None:
                self._listener.close()
                self._listener = None
        self._pool.close()

    def reachable(self) -> bool:
        """False while the change listener finds the database refusing connections: callers
        answer ``ServiceUnavailableTemporary`` at once instead of waiting for a pooled
        connection that cannot come (up to the pool's 30 s). Rechecked every 0.5 s."""
        listener = self._listener
        return listener is None or not listener.down

    def change_counter(self) -> int | None:
        """Moves whenever any node (this one included) may have committed a change; None while
        that cannot be told (see :class:`_ChangeListener`). The first call starts listening."""
        listener = self._listener
        if listener is None:
            with self._listener_lock:
                if self._listener is None:
                    self._listener = _ChangeListener(self.url)
                listener = self._listener
        return listener.counter()

    @contextlib.contextmanager
    def transaction(self, *, write: bool) -> Iterator[Tx]:
        """Run the block in one transaction: committed if it returns, rolled back if it raises."""
        if not self.reachable():
            raise KmsError("ServiceUnavailableTemporary", "The KMS store is unavailable; try again.")
        try:
            with self._begin(_BEGIN_WRITE if write else _BEGIN_READ) as conn:
                try:
                    yield PgTx(conn, write=write)
                except BaseException:
                    with contextlib.suppress(psycopg.Error):
                        conn.execute("ROLLBACK")
                    raise
                # One round trip: the notice is delivered to every listener at commit, not before.
                conn.execute(f"NOTIFY {CHANGES_CHANNEL}; COMMIT" if write else "COMMIT")
        except psycopg.OperationalError as exc:
            # Connection lost or refused, pool exhausted, lock timeout, deadlock: all retryable.
            raise unavailable("store transaction failed on", self.url, exc) from None

    @contextlib.contextmanager
    def _begin(self, begin: str) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection in a new transaction.

        A connection that broke while idle in the pool (a database restart, an idle timeout on
        the way) fails at BEGIN, before anything happened: it is discarded (the pool drops broken
        connections) and BEGIN is tried on the next one, so a restart costs no failed request and
        no Action pays a check query for it."""
        for _ in range(self._max_connections + 1):
            with self._pooled() as conn:
                try:
                    conn.execute(begin)
                except psycopg.OperationalError:
                    if not conn.broken:
                        raise
                    continue
                yield conn
                return
        raise psycopg.OperationalError("every pooled connection was broken")

    @contextlib.contextmanager
    def _pooled(self) -> Iterator[psycopg.Connection[Any]]:
        conn = wait_for_connection(self._pool, self.reachable, LOCK_TIMEOUT_S)
        try:
            yield conn
        finally:
            self._pool.putconn(conn)  # rolls back what is left open; drops a broken connection

    def erase_history(self) -> None:
        """Nothing to do: PostgreSQL has no secure delete. Deleted rows stay in table pages until
        vacuumed and overwritten, and in WAL archives and backups; they hold only material
        sealed under the root key (docs/cluster.md)."""

    def schema_version(self) -> int:
        with self.transaction(write=False) as tx:
            raw = tx.meta_get("schema_version")
        return int(raw) if raw is not None else 0
