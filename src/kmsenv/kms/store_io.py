"""Backup and restore of a whole KMS: one export file, any store to any store (SQLite ↔ PostgreSQL).

An export holds every record of the store — keys, their versions' **sealed** material, aliases,
tombstones of destroyed keys, AccessKeys (secrets sealed), the region and account id (so ARNs stay
the same) and the root key check value — read in one transaction, so it is one consistent moment.
It holds no root key and no plaintext: the root key travels separately, and the importing side
names it (``KMSENV_ROOT_KEY_FILE``, or ``root.key`` in its home). Request nonces are not exported:
they only matter within the clock window.

Import checks everything before it writes anything: the file's format, that the root key opens
the store's check value *and every sealed value in the file*, that the target store is empty. Then
it writes all records in one transaction: a failed import leaves the target as it was.

The file is JSON (``format: kmsenv-store-export``, ``version: 1``), sealed values in base64,
written 0600 through an atomic output: it is as sensitive as the database itself.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import sqlite3
from collections.abc import Iterable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from kmsenv._atomic import PRIVATE_MODE, AtomicOutput
from kmsenv.errors import ConfigError, InputError, IntegrityError
from kmsenv.kms.sealing import RootKey, load_or_create_root_key
from kmsenv.kms.store import (
    SCHEMA_VERSION,
    AccessKeyRecord,
    AliasRecord,
    KeyRecord,
    SqliteStore,
    Store,
    Tx,
    VersionRecord,
)

__all__ = ["FORMAT", "export_store", "import_store", "migrate_store", "open_store", "read_all", "store_schema_version"]

FORMAT = "kmsenv-store-export"
VERSION = 1
_ALL = 2**62  # "no limit" for the paged record listings
_META = ("root_key_check", "region", "account_id")
_SEALED = {"key_versions": "sealed_material", "access_keys": "sealed_secret"}


# -- which store -----------------------------------------------------------------------------------
def _target(home: Path, store: str | None) -> str:
    from kmsenv.kms.service import STORE_ENV

    return store if store is not None else os.environ.get(STORE_ENV, "")


def open_store(home: Path, store: str | None = None, *, create: bool = False) -> Store:
    """The store a KMS in ``home`` uses: ``store``/``KMSENV_STORE`` (PostgreSQL) or ``home/kms.db``.

    Without ``create``, a missing SQLite store is an error instead of a new empty one."""
    target = _target(home, store)
    if target:
        from kmsenv.kms.pg_store import PostgresStore, require_postgres_url

        return PostgresStore(require_postgres_url(target))
    path = home / "kms.db"
    if not path.exists():
        if not create:
            raise ConfigError(f"there is no KMS store in {home}", hint="set KMSENV_HOME or KMSENV_STORE")
        from kmsenv.kms.service import make_home

        make_home(home)
    return SqliteStore(path)


def store_schema_version(home: Path, store: str | None = None) -> tuple[str, int]:
    """(where, schema version) of the store, read without migrating it (0: no kmsenv schema)."""
    target = _target(home, store)
    if target:
        from kmsenv.kms.pg_store import read_schema_version, redact, require_postgres_url

        return redact(target), read_schema_version(require_postgres_url(target))
    path = home / "kms.db"
    if not path.exists():
        return str(path), 0
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        raise ConfigError(f"cannot read the KMS store {path}: {exc}") from None
    return str(path), int(row[0]) if row is not None else 0


def migrate_store(home: Path, store: str | None = None) -> tuple[str, int, int]:
    """Apply forward migrations; returns (where, version before, version after)."""
    target = _target(home, store)
    if target:
        from kmsenv.kms.pg_store import migrate, redact, require_postgres_url

        before, after = migrate(require_postgres_url(target))
        return redact(target), before, after
    where, before = store_schema_version(home)
    open_store(home).close()  # the SQLite store migrates itself as it opens
    return where, before, SCHEMA_VERSION


# -- export --------------------------------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _records(items: Iterable[Any], sealed: str | None = None) -> list[dict[str, Any]]:
    out = []
    for item in items:
        record = asdict(item)
        if sealed is not None:
            record[sealed] = _b64(record[sealed])
        out.append(record)
    return out


def read_all(tx: Tx) -> dict[str, Any]:
    """Every record of the store, as the export's JSON document."""
    meta = {name: tx.meta_get(name) for name in _META}
    if meta["root_key_check"] is None:
        raise ConfigError("the KMS store has never been used: there is nothing to export")
    keys, _ = tx.list_keys([], 0, _ALL)
    versions = [v for key in keys for v in tx.list_versions(key.key_id, 0, _ALL)[0]]
    aliases, _ = tx.list_aliases(None, 0, _ALL)
    return {
        "format": FORMAT,
        "version": VERSION,
        "schema_version": SCHEMA_VERSION,
        "meta": {
            "root_key_check": _b64(meta["root_key_check"]),
            "region": (meta["region"] or b"").decode("utf-8"),
            "account_id": (meta["account_id"] or b"").decode("ascii"),
        },
        "keys": _records(keys),
        "key_versions": _records(versions, "sealed_material"),
        "aliases": _records(aliases),
        "deleted_keys": [{"key_id": k, "deleted_at": when} for k, when in tx.list_deleted_keys()],
        "access_keys": _records(tx.list_access_keys(), "sealed_secret"),
    }


def export_store(home: Path, output: Path, *, store: str | None = None, force: bool = False) -> dict[str, int]:
    """Write the whole store to ``output`` (0600, atomic); returns record counts."""
    source = open_store(home, store)
    try:
        with source.transaction(write=False) as tx:
            document = read_all(tx)
    finally:
        source.close()
    with AtomicOutput(output, force=force, mode=PRIVATE_MODE) as fh:
        fh.write(json.dumps(document, ensure_ascii=False, indent=1).encode("utf-8"))
        fh.write(b"\n")
    return _counts(document)


def _counts(document: dict[str, Any]) -> dict[str, int]:
    return {name: len(document[name]) for name in ("keys", "key_versions", "aliases", "deleted_keys", "access_keys")}


# -- import --------------------------------------------------------------------------------------
def _bad(path: Path, why: str) -> InputError:
    return InputError(f"{path} is not a kmsenv store export: {why}")


def _build(path: Path, cls: type[Any], items: Any, sealed: str | None = None) -> list[Any]:
    names = [f.name for f in fields(cls)]
    if not isinstance(items, list):
        raise _bad(path, f"{cls.__name__} records are not a list")
    out = []
    for item in items:
        if not isinstance(item, dict) or sorted(item) != sorted(names):
            raise _bad(path, f"a {cls.__name__} record has fields other than {', '.join(names)}")
        values = dict(item)
        if sealed is not None:
            values[sealed] = _unb64(path, values[sealed])
        out.append(cls(**values))
    return out


def _unb64(path: Path, text: object) -> bytes:
    if not isinstance(text, str):
        raise _bad(path, "a sealed value is not base64 text")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise _bad(path, "a sealed value is not valid base64") from None


class _Export:
    """A parsed, structurally checked export file."""

    def __init__(self, path: Path) -> None:
        try:
            document = json.loads(path.read_bytes())
        except OSError as exc:
            raise InputError(f"cannot read {path}: {exc.strerror or exc.__class__.__name__}") from None
        except (ValueError, RecursionError):
            raise _bad(path, "not JSON") from None
        if not isinstance(document, dict) or document.get("format") != FORMAT:
            raise _bad(path, f"no format {FORMAT!r}")
        if document.get("version") != VERSION:
            raise _bad(path, f"export version {document.get('version')!r}; this kmsenv reads version {VERSION}")
        schema = document.get("schema_version")
        if not isinstance(schema, int) or schema > SCHEMA_VERSION:
            raise ConfigError(
                f"{path} was exported from a store of schema version {schema}, newer than this kmsenv "
                f"understands ({SCHEMA_VERSION})",
                hint="import it with a kmsenv at least as new as the one that exported it",
            )
        meta = document.get("meta")
        if not isinstance(meta, dict) or not all(isinstance(meta.get(n), str) for n in _META):
            raise _bad(path, "meta is incomplete")
        self.root_key_check = _unb64(path, meta["root_key_check"])
        self.region: str = meta["region"]
        self.account_id: str = meta["account_id"]
        self.keys: list[KeyRecord] = _build(path, KeyRecord, document.get("keys"))
        self.versions: list[VersionRecord] = _build(
            path, VersionRecord, document.get("key_versions"), "sealed_material"
        )
        self.aliases: list[AliasRecord] = _build(path, AliasRecord, document.get("aliases"))
        self.access_keys: list[AccessKeyRecord] = _build(
            path, AccessKeyRecord, document.get("access_keys"), "sealed_secret"
        )
        deleted = document.get("deleted_keys")
        if not isinstance(deleted, list) or not all(
            isinstance(d, dict) and sorted(d) == ["deleted_at", "key_id"] for d in deleted
        ):
            raise _bad(path, "deleted_keys is malformed")
        self.deleted: list[tuple[str, str]] = [(d["key_id"], d["deleted_at"]) for d in deleted]
        self.counts = _counts(document)

    def check_root_key(self, root_key: RootKey, path: Path) -> None:
        """Refuse unless ``root_key`` opens the check value and every sealed value in the file."""
        if not root_key.verify_check(self.root_key_check):
            raise ConfigError(
                f"the root key (fingerprint {root_key.fingerprint}) does not open the KMS exported in {path}",
                hint="set KMSENV_ROOT_KEY_FILE to the root key of the exported KMS; nothing was imported",
            )
        try:
            for v in self.versions:
                root_key.unseal(
                    v.sealed_material, aad=root_key.material_aad(v.key_id, v.key_version_id), what="key material"
                )
            for ak in self.access_keys:
                root_key.unseal(
                    ak.sealed_secret, aad=f"access-key:{ak.access_key_id}".encode("ascii"), what="AccessKey secret"
                )
        except IntegrityError:
            raise IntegrityError(
                f"{path}: a sealed value does not open under the root key: the file was modified; nothing was imported"
            ) from None


def _ensure_empty(tx: Tx, root_key: RootKey, where: object) -> None:
    check = tx.meta_get("root_key_check")
    if check is not None and not root_key.verify_check(check):
        raise ConfigError(f"the target KMS store {where} belongs to another root key; nothing was imported")
    if tx.list_keys([], 0, 1)[1] or tx.list_aliases(None, 0, 1)[1] or tx.list_access_keys() or tx.list_deleted_keys():
        raise ConfigError(
            f"the target KMS store {where} is not empty; nothing was imported",
            hint="import into a new KMSENV_HOME or an empty PostgreSQL database",
        )


def import_store(home: Path, source: Path, *, store: str | None = None) -> dict[str, int]:
    """Import the export ``source`` into the (empty) store of ``home``/``store``; returns counts.

    The root key is the importing side's (``KMSENV_ROOT_KEY_FILE`` or ``home/root.key``); it must be
    the one the export was made under. Nothing is written unless every check passes."""
    export = _Export(source)
    root_key, _ = load_or_create_root_key(home, create=False)
    export.check_root_key(root_key, source)
    target = open_store(home, store, create=True)
    try:
        with target.transaction(write=True) as tx:
            _ensure_empty(tx, root_key, target.path)
            tx.meta_set("root_key_check", export.root_key_check)
            tx.meta_set("region", export.region.encode("utf-8"))
            tx.meta_set("account_id", export.account_id.encode("ascii"))
            for key in export.keys:
                tx.insert_key(key)
            for version in export.versions:
                tx.insert_version(version)
            for alias in export.aliases:
                tx.insert_alias(alias)
            for key_id, when in export.deleted:
                tx.destroy_key(key_id, when)
            for ak in export.access_keys:
                tx.insert_access_key(ak)
    finally:
        target.close()
    return export.counts
