"""The KMS store: schema, forward migrations, transactions and records (SQLite, embedded).

The service never writes SQL; it asks a transaction (:class:`Tx`) for records and changes. Every
Action runs in one transaction, so a failed Action changes nothing. Write transactions start with
``BEGIN IMMEDIATE``: SQLite then takes the write lock up front, so two processes using one KMS
home serialise instead of failing half-way with "database is locked" on upgrade. WAL mode lets
readers proceed during a write, and ``synchronous=FULL`` makes a commit that returned durable.
Opening a store is serialised between processes (an ``flock`` on its folder): a brand-new file is
still in rollback-journal mode until one of them switches it to WAL, and in that mode SQLite
answers a lock upgrade that could deadlock with "database is locked" at once, without waiting.

Key material appears here only sealed (see ``sealing``).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from kmsenv.errors import ConfigError, KmsError

__all__ = [
    "SCHEMA_VERSION",
    "AccessKeyRecord",
    "AliasRecord",
    "KeyRecord",
    "SqliteStore",
    "Store",
    "Tx",
    "VersionRecord",
    "is_postgres_url",
    "redact_url",
]

# The schema is written once, in SQLite's dialect; the PostgreSQL store (``pg_store``) translates
# these same migrations, so both stores always have one schema and one version number.

_MIGRATIONS: tuple[str, ...] = (
    # 1: keys, versions, aliases, tombstones of destroyed keys.
    """
    CREATE TABLE meta (name TEXT PRIMARY KEY, value BLOB NOT NULL);
    CREATE TABLE keys (
        key_id TEXT PRIMARY KEY,
        description TEXT NOT NULL,
        key_spec TEXT NOT NULL,
        key_usage TEXT NOT NULL,
        origin TEXT NOT NULL,
        protection_level TEXT NOT NULL,
        key_state TEXT NOT NULL,
        creation_date TEXT NOT NULL,
        delete_date TEXT,
        deletion_protection INTEGER NOT NULL DEFAULT 0,
        deletion_protection_description TEXT NOT NULL DEFAULT '',
        rotation_enabled INTEGER NOT NULL DEFAULT 0,
        rotation_interval INTEGER,
        last_rotation_date TEXT,
        next_rotation_date TEXT,
        primary_version_id TEXT,
        tags TEXT NOT NULL DEFAULT '[]',
        creator TEXT NOT NULL
    );
    CREATE INDEX keys_next_rotation ON keys(next_rotation_date) WHERE next_rotation_date IS NOT NULL;
    CREATE INDEX keys_delete_date ON keys(delete_date) WHERE delete_date IS NOT NULL;
    CREATE TABLE key_versions (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        key_version_id TEXT NOT NULL UNIQUE,
        key_id TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
        creation_date TEXT NOT NULL,
        sealed_material BLOB NOT NULL
    );
    CREATE INDEX key_versions_key ON key_versions(key_id, seq);
    CREATE TABLE aliases (
        alias_name TEXT PRIMARY KEY,
        key_id TEXT NOT NULL REFERENCES keys(key_id) ON DELETE CASCADE,
        creation_date TEXT NOT NULL,
        update_date TEXT NOT NULL
    );
    CREATE INDEX aliases_key ON aliases(key_id);
    CREATE TABLE deleted_keys (key_id TEXT PRIMARY KEY, deleted_at TEXT NOT NULL);
    """,
    # 2: AccessKeys for the HTTP server; the secret is sealed under the root key.
    """
    CREATE TABLE access_keys (
        access_key_id TEXT PRIMARY KEY,
        sealed_secret BLOB NOT NULL,
        status TEXT NOT NULL,
        description TEXT NOT NULL DEFAULT '',
        policy TEXT,
        creation_date TEXT NOT NULL,
        update_date TEXT NOT NULL
    );
    """,
)

#: The schema version this code writes and understands.
SCHEMA_VERSION = len(_MIGRATIONS)

#: URL schemes naming a PostgreSQL store (``KMSENV_STORE``, ``--store``, the ``store`` setting).
POSTGRES_SCHEMES = ("postgresql", "postgres")


def is_postgres_url(text: str) -> bool:
    return urlsplit(text).scheme in POSTGRES_SCHEMES


def redact_url(url: str) -> str:
    """A store URL without its password (in the user part or a ``password=`` parameter), for
    messages, logs and reprs. Here rather than in ``pg_store`` so that callers which only
    print a URL (the server's settings) need not import psycopg."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rsplit('@', 1)[1]}"
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(name == "password" for name, _ in pairs):
        query = urlencode([(n, "***" if n == "password" else v) for n, v in pairs], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


@dataclass(slots=True)
class KeyRecord:
    key_id: str
    description: str
    key_spec: str
    key_usage: str
    origin: str
    protection_level: str
    key_state: str
    creation_date: str
    creator: str
    delete_date: str | None = None
    deletion_protection: bool = False
    deletion_protection_description: str = ""
    rotation_enabled: bool = False
    rotation_interval: int | None = None
    last_rotation_date: str | None = None
    next_rotation_date: str | None = None
    primary_version_id: str | None = None
    tags: str = "[]"


_KEY_COLUMNS = tuple(f.name for f in fields(KeyRecord))


@dataclass(frozen=True, slots=True)
class VersionRecord:
    key_id: str
    key_version_id: str
    creation_date: str
    sealed_material: bytes


@dataclass(frozen=True, slots=True)
class AliasRecord:
    alias_name: str
    key_id: str
    creation_date: str
    update_date: str


@dataclass(slots=True)
class AccessKeyRecord:
    access_key_id: str
    sealed_secret: bytes
    status: str  # "Active" | "Inactive"
    description: str
    policy: str | None  # JSON policy document; None = full access
    creation_date: str
    update_date: str


_AK_COLUMNS = tuple(f.name for f in fields(AccessKeyRecord))


class _Cursor(Protocol):
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class Connection(Protocol):
    """What :class:`Tx` needs of a connection: ``execute`` with ``?`` placeholders, whose rows
    read by position and by column name (``sqlite3.Row``-like)."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> _Cursor: ...


def _key_from_row(row: Any) -> KeyRecord:
    values: dict[str, Any] = {name: row[name] for name in _KEY_COLUMNS}
    values["deletion_protection"] = bool(values["deletion_protection"])
    values["rotation_enabled"] = bool(values["rotation_enabled"])
    return KeyRecord(**values)


class Tx:
    """One transaction's view of the store. Obtained from :meth:`Store.transaction`.

    The SQL is shared by both stores; what differs lives in the two class attributes a store's
    subclass sets: the driver's unique-violation error, and the row lock taken when a write
    transaction reads a key or AccessKey row (none in SQLite, whose writers are serialised).
    """

    _unique_violation: tuple[type[Exception], ...] = (sqlite3.IntegrityError,)
    _lock_rows = ""

    def __init__(self, conn: Connection) -> None:
        self._c = conn

    # -- meta ------------------------------------------------------------------------------
    def meta_get(self, name: str) -> bytes | None:
        row = self._c.execute("SELECT value FROM meta WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        value = row[0]
        return value.encode("utf-8") if isinstance(value, str) else bytes(value)

    def meta_set(self, name: str, value: bytes) -> None:
        self._c.execute(
            "INSERT INTO meta(name, value) VALUES (?, ?) ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (name, value),
        )

    # -- keys ------------------------------------------------------------------------------
    def get_key(self, key_id: str) -> KeyRecord | None:
        row = self._c.execute(f"SELECT * FROM keys WHERE key_id = ?{self._lock_rows}", (key_id,)).fetchone()  # noqa: S608
        return None if row is None else _key_from_row(row)

    def insert_key(self, rec: KeyRecord) -> None:
        cols = ", ".join(_KEY_COLUMNS)
        marks = ", ".join("?" for _ in _KEY_COLUMNS)
        self._c.execute(f"INSERT INTO keys({cols}) VALUES ({marks})", [getattr(rec, c) for c in _KEY_COLUMNS])  # noqa: S608 (column names are ours)

    def update_key(self, rec: KeyRecord) -> None:
        cols = [c for c in _KEY_COLUMNS if c != "key_id"]
        assignments = ", ".join(f"{c} = ?" for c in cols)
        self._c.execute(
            f"UPDATE keys SET {assignments} WHERE key_id = ?",  # noqa: S608 (column names are ours)
            [*(getattr(rec, c) for c in cols), rec.key_id],
        )

    def destroy_key(self, key_id: str, when: str) -> None:
        """Erase a key: its versions (material) and aliases go with it; a tombstone remains."""
        self._c.execute("DELETE FROM aliases WHERE key_id = ?", (key_id,))
        self._c.execute("DELETE FROM key_versions WHERE key_id = ?", (key_id,))
        self._c.execute("DELETE FROM keys WHERE key_id = ?", (key_id,))
        self._c.execute(
            "INSERT INTO deleted_keys(key_id, deleted_at) VALUES (?, ?) "
            "ON CONFLICT(key_id) DO UPDATE SET deleted_at = excluded.deleted_at",
            (key_id, when),
        )

    def deleted_at(self, key_id: str) -> str | None:
        row = self._c.execute("SELECT deleted_at FROM deleted_keys WHERE key_id = ?", (key_id,)).fetchone()
        return None if row is None else str(row[0])

    def list_deleted_keys(self) -> list[tuple[str, str]]:
        """(key id, deleted at) of every tombstone, for export."""
        rows = self._c.execute("SELECT key_id, deleted_at FROM deleted_keys ORDER BY key_id").fetchall()
        return [(str(r[0]), str(r[1])) for r in rows]

    def list_keys(
        self, filters: Sequence[tuple[str, Sequence[str]]], offset: int, limit: int
    ) -> tuple[list[KeyRecord], int]:
        where: list[str] = []
        args: list[object] = []
        for column, values in filters:
            if column not in _KEY_COLUMNS:
                raise ValueError(column)
            where.append(f"{column} IN ({', '.join('?' for _ in values)})")
            args.extend(values)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = self._c.execute(f"SELECT count(*) FROM keys {clause}", args).fetchone()[0]  # noqa: S608
        rows = self._c.execute(
            f"SELECT * FROM keys {clause} ORDER BY creation_date, key_id LIMIT ? OFFSET ?",  # noqa: S608
            [*args, limit, offset],
        ).fetchall()
        return [_key_from_row(r) for r in rows], int(total)

    def due_key_ids(self, now: str) -> list[str]:
        """Keys with a deletion or an automatic rotation due at ``now``, in key id order (so
        writers locking them one by one always lock in the same order and cannot deadlock)."""
        rows = self._c.execute(
            "SELECT key_id FROM keys WHERE delete_date IS NOT NULL AND delete_date <= ? "
            "UNION SELECT key_id FROM keys WHERE next_rotation_date IS NOT NULL AND next_rotation_date <= ? "
            "AND key_state = 'Enabled' ORDER BY key_id",
            (now, now),
        ).fetchall()
        return [str(r[0]) for r in rows]

    # -- versions --------------------------------------------------------------------------
    def insert_version(self, rec: VersionRecord) -> None:
        self._c.execute(
            "INSERT INTO key_versions(key_version_id, key_id, creation_date, sealed_material) VALUES (?, ?, ?, ?)",
            (rec.key_version_id, rec.key_id, rec.creation_date, rec.sealed_material),
        )

    def get_version(self, key_version_id: str) -> VersionRecord | None:
        row = self._c.execute(
            "SELECT key_id, key_version_id, creation_date, sealed_material FROM key_versions WHERE key_version_id = ?",
            (key_version_id,),
        ).fetchone()
        return None if row is None else VersionRecord(row[0], row[1], row[2], bytes(row[3]))

    def list_versions(self, key_id: str, offset: int, limit: int) -> tuple[list[VersionRecord], int]:
        total = self._c.execute("SELECT count(*) FROM key_versions WHERE key_id = ?", (key_id,)).fetchone()[0]
        rows = self._c.execute(
            "SELECT key_id, key_version_id, creation_date, sealed_material FROM key_versions "
            "WHERE key_id = ? ORDER BY seq LIMIT ? OFFSET ?",
            (key_id, limit, offset),
        ).fetchall()
        return [VersionRecord(r[0], r[1], r[2], bytes(r[3])) for r in rows], int(total)

    # -- aliases ---------------------------------------------------------------------------
    def get_alias(self, alias_name: str) -> AliasRecord | None:
        row = self._c.execute(
            "SELECT alias_name, key_id, creation_date, update_date FROM aliases WHERE alias_name = ?",
            (alias_name,),
        ).fetchone()
        return None if row is None else AliasRecord(*row)

    def insert_alias(self, rec: AliasRecord) -> None:
        try:
            self._c.execute(
                "INSERT INTO aliases(alias_name, key_id, creation_date, update_date) VALUES (?, ?, ?, ?)",
                (rec.alias_name, rec.key_id, rec.creation_date, rec.update_date),
            )
        except self._unique_violation:
            # The primary key is the arbiter of uniqueness, also between processes racing.
            raise KmsError("AliasAlreadyExists", f"The alias {rec.alias_name} already exists.") from None

    def update_alias(self, alias_name: str, key_id: str, when: str) -> None:
        self._c.execute(
            "UPDATE aliases SET key_id = ?, update_date = ? WHERE alias_name = ?", (key_id, when, alias_name)
        )

    def delete_alias(self, alias_name: str) -> None:
        self._c.execute("DELETE FROM aliases WHERE alias_name = ?", (alias_name,))

    def list_aliases(self, key_id: str | None, offset: int, limit: int) -> tuple[list[AliasRecord], int]:
        clause, args = ("WHERE key_id = ?", [key_id]) if key_id is not None else ("", [])
        total = self._c.execute(f"SELECT count(*) FROM aliases {clause}", args).fetchone()[0]  # noqa: S608
        rows = self._c.execute(
            f"SELECT alias_name, key_id, creation_date, update_date FROM aliases {clause} "  # noqa: S608
            "ORDER BY alias_name LIMIT ? OFFSET ?",
            [*args, limit, offset],
        ).fetchall()
        return [AliasRecord(*r) for r in rows], int(total)


    # -- access keys -----------------------------------------------------------------------
    def insert_access_key(self, rec: AccessKeyRecord) -> None:
        cols = ", ".join(_AK_COLUMNS)
        marks = ", ".join("?" for _ in _AK_COLUMNS)
        self._c.execute(
            f"INSERT INTO access_keys({cols}) VALUES ({marks})",  # noqa: S608 (column names are ours)
            [getattr(rec, c) for c in _AK_COLUMNS],
        )

    def get_access_key(self, access_key_id: str) -> AccessKeyRecord | None:
        row = self._c.execute(
            f"SELECT * FROM access_keys WHERE access_key_id = ?{self._lock_rows}", (access_key_id,)  # noqa: S608
        ).fetchone()
        return None if row is None else AccessKeyRecord(*(row[c] for c in _AK_COLUMNS))

    def update_access_key(self, rec: AccessKeyRecord) -> None:
        cols = [c for c in _AK_COLUMNS if c != "access_key_id"]
        self._c.execute(
            f"UPDATE access_keys SET {', '.join(f'{c} = ?' for c in cols)} WHERE access_key_id = ?",  # noqa: S608
            [*(getattr(rec, c) for c in cols), rec.access_key_id],
        )

    def delete_access_key(self, access_key_id: str) -> None:
        self._c.execute("DELETE FROM access_keys WHERE access_key_id = ?", (access_key_id,))

    def list_access_keys(self) -> list[AccessKeyRecord]:
        rows = self._c.execute("SELECT * FROM access_keys ORDER BY creation_date, access_key_id").fetchall()
        return [AccessKeyRecord(*(r[c] for c in _AK_COLUMNS)) for r in rows]


class Store(Protocol):
    """What the service asks of a store. :class:`SqliteStore` (embedded) and
    ``pg_store.PostgresStore`` (shared by several nodes) implement it with the same semantics:
    every transaction is all-or-nothing, and concurrent writers never lose an update."""

    @property
    def path(self) -> Path | str:
        """Where the store is, for messages (a file path, or a URL without its password)."""
        ...

    def transaction(self, *, write: bool) -> contextlib.AbstractContextManager[Tx]: ...

    def erase_history(self) -> None:
        """Best effort to leave no copy of just-deleted rows behind (e.g. in a write-ahead log)."""
        ...

    def schema_version(self) -> int: ...

    def change_counter(self) -> int | None:
        """A number that moves whenever any process may have committed a change to the store;
        None when the store cannot tell, and then nothing read from it may be reused outside
        the transaction that read it (the service's key cache, docs/cluster.md "Caches")."""
        ...

    def close(self) -> None: ...


def _create_private_file(path: Path) -> None:
    """Create ``path`` 0600 if absent, whatever the umask: the store holds sealed material and
    metadata nobody else needs to read."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return
    os.fchmod(fd, 0o600)
    os.close(fd)


@contextlib.contextmanager
def _opening(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path``'s folder while the store file is opened and migrated.

    Why: 8 processes opening one new home at once failed 41 times in 200 trials with "database is
    locked" (``PRAGMA journal_mode = WAL`` and the first migration meet while the file is still in
    rollback-journal mode, where SQLite refuses a possibly deadlocking lock upgrade at once instead
    of calling the busy handler). The folder, not the database file: closing any descriptor of
    the database would drop the POSIX locks SQLite holds on it. Once a file is in WAL mode the
    wait is only for other processes' opening, microseconds each.
    """
    import fcntl

    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


class SqliteStore:
    """The embedded store: one SQLite file, safe for several processes and threads at once."""

    BUSY_TIMEOUT_MS = 30_000

    def __init__(self, path: Path) -> None:
        self.path = path
        with _opening(path):
            self._open(path)

    def _open(self, path: Path) -> None:
        _create_private_file(path)
        try:
            conn = sqlite3.connect(
                path, isolation_level=None, check_same_thread=False, timeout=self.BUSY_TIMEOUT_MS / 1000
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {self.BUSY_TIMEOUT_MS}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            # Deleted rows (destroyed key material) are zeroed, not left in free pages; the
            # compile-time default differs between SQLite builds.
            conn.execute("PRAGMA secure_delete = ON")
            conn.execute("PRAGMA foreign_keys = ON")
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"cannot open the KMS store {path}: {exc}") from None
        self._conn = conn
        # One connection per store object; the lock keeps threads from interleaving transactions.
        self._lock = threading.RLock()
        self._migrate()
        for suffix in ("-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.chmod(f"{path}{suffix}", 0o600)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def transaction(self, *, write: bool) -> Iterator[Tx]:
        """Run the block in one transaction: committed if it returns, rolled back if it raises."""
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            except sqlite3.OperationalError as exc:
                raise KmsError("ServiceUnavailableTemporary", f"The KMS store is busy; try again ({exc}).") from None
            try:
                yield Tx(self._conn)
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise
            try:
                self._conn.execute("COMMIT")
            except sqlite3.OperationalError as exc:
                self._conn.execute("ROLLBACK")
                raise KmsError("ServiceUnavailableTemporary", f"Could not commit; try again ({exc}).") from None

    def erase_history(self) -> None:
        """Checkpoint and truncate the WAL, so rows just deleted survive in no old page image.

        Best effort: if other connections keep the WAL busy past the timeout, it is truncated by
        a later call (or when the last connection closes)."""
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()

    def change_counter(self) -> int | None:
        """None: the embedded store keeps reading every record in every Action (a read costs
        microseconds here), so other processes' changes apply on their next request."""
        return None

    def schema_version(self) -> int:
        with self.transaction(write=False) as tx:
            raw = self._meta_or_none(tx, "schema_version")
        return int(raw) if raw is not None else 0

    @staticmethod
    def _meta_or_none(tx: Tx, name: str) -> bytes | None:
        try:
            return tx.meta_get(name)
        except sqlite3.OperationalError as exc:
            if "no such table" not in str(exc):  # a busy or broken file is not a new one
                raise
            return None  # no meta table yet: a brand-new file

    def _migrate(self) -> None:
        with self.transaction(write=True) as tx:
            raw = self._meta_or_none(tx, "schema_version")
            current = int(raw) if raw is not None else 0
            if current > SCHEMA_VERSION:
                raise ConfigError(
                    f"the KMS store {self.path} has schema version {current}, newer than this kmsenv "
                    f"understands ({SCHEMA_VERSION})",
                    hint="upgrade kmsenv to use this store",
                )
            for version in range(current, SCHEMA_VERSION):
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        self._conn.execute(statement)
                tx.meta_set("schema_version", str(version + 1).encode("ascii"))


def dumps_tags(tags: list[dict[str, str]]) -> str:
    return json.dumps(tags, ensure_ascii=False, separators=(",", ":"))
