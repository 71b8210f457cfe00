"""``kmsenv store check``: verify a KMS store end to end, reading only.

What it checks, in one read transaction (so one consistent moment, also on a live PostgreSQL store):

* the store's root-key check value opens under the root key (``KMSENV_ROOT_KEY_FILE`` or
  ``root.key`` in the home): this is the right root key;
* every key version's sealed material opens under the root key with its own key id and version id
  as AAD (so no sealed value was modified or moved between rows) and is 32 bytes;
* every key's primary version exists and belongs to it;
* every alias points at a live key (not destroyed, not missing);
* every AccessKey secret opens under the root key with its id as AAD, and its policy parses;
* for SQLite stores, ``PRAGMA integrity_check`` (the file's b-trees and indexes);
* the server's audit log (``audit.jsonl`` in the home, or the given path), if there is one: the
  hash chain is whole (:func:`kmsenv.server.audit.verify`).

Problems are collected, not raised one by one, so one run lists everything wrong. Messages name
ids and paths only, never material, secrets or plaintext. It never writes: safe on a store in use.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from kmsenv.errors import IntegrityError, KmsError
from kmsenv.kms.policy import parse_policy
from kmsenv.kms.sealing import RootKey, load_or_create_root_key
from kmsenv.kms.store import SqliteStore, Store, Tx

__all__ = ["CheckReport", "check_store"]

_ALL = 2**62
_MATERIAL_SIZE = 32


@dataclass(slots=True)
class CheckReport:
    """What was checked and what is wrong (``problems`` empty: the store is sound)."""

    where: str
    keys: int = 0
    versions: int = 0
    aliases: int = 0
    access_keys: int = 0
    audit_records: int | None = None  # None: no audit log checked
    audit_head: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        parts = [
            f"{self.keys} keys",
            f"{self.versions} key versions",
            f"{self.aliases} aliases",
            f"{self.access_keys} AccessKeys",
        ]
        if self.audit_records is not None:
            parts.append(f"{self.audit_records} audit records (head {self.audit_head})")
        return ", ".join(parts)


def _check_records(tx: Tx, root_key: RootKey, report: CheckReport) -> None:
    check = tx.meta_get("root_key_check")
    if check is None:
        report.problems.append("the store has never been used (no root key check value)")
        return
    if not root_key.verify_check(check):
        report.problems.append(
            f"the root key (fingerprint {root_key.fingerprint}) does not open this store: wrong root key"
        )
        return  # every sealed value would fail the same way: one message is enough
    keys, _ = tx.list_keys([], 0, _ALL)
    live = {k.key_id for k in keys}
    report.keys = len(keys)
    for key in keys:
        versions, _ = tx.list_versions(key.key_id, 0, _ALL)
        report.versions += len(versions)
        ids = {v.key_version_id for v in versions}
        if key.primary_version_id is not None and key.primary_version_id not in ids:
            report.problems.append(f"key {key.key_id}: its primary version {key.primary_version_id} does not exist")
        if key.primary_version_id is None and key.origin != "EXTERNAL":
            report.problems.append(f"key {key.key_id}: no primary version")
        for v in versions:
            try:
                material = root_key.unseal(
                    v.sealed_material, aad=root_key.material_aad(v.key_id, v.key_version_id), what="key material"
                )
            except IntegrityError:
                report.problems.append(
                    f"key {v.key_id} version {v.key_version_id}: the sealed material does not open under the root key"
                )
                continue
            if len(material) != _MATERIAL_SIZE:
                report.problems.append(
                    f"key {v.key_id} version {v.key_version_id}: material is {len(material)} bytes, "
                    f"not {_MATERIAL_SIZE}"
                )
    aliases, _ = tx.list_aliases(None, 0, _ALL)
    report.aliases = len(aliases)
    for alias in aliases:
        if alias.key_id not in live:
            gone = "was destroyed" if tx.deleted_at(alias.key_id) else "does not exist"
            report.problems.append(f"alias {alias.alias_name}: its key {alias.key_id} {gone}")
    access_keys = tx.list_access_keys()
    report.access_keys = len(access_keys)
    for ak in access_keys:
        try:
            root_key.unseal(ak.sealed_secret, aad=f"access-key:{ak.access_key_id}".encode(), what="AccessKey secret")
        except IntegrityError:
            report.problems.append(f"AccessKey {ak.access_key_id}: the sealed secret does not open under the root key")
        if ak.policy is not None:
            try:
                parse_policy(ak.policy)
            except KmsError:
                report.problems.append(f"AccessKey {ak.access_key_id}: its policy document is not valid")


def _sqlite_integrity(path: Path, report: CheckReport) -> None:
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = [str(r[0]) for r in conn.execute("PRAGMA integrity_check").fetchall()]
        finally:
            conn.close()
    except sqlite3.DatabaseError as exc:
        report.problems.append(f"SQLite integrity check of {path} failed: {exc}")
        return
    if rows != ["ok"]:
        report.problems.extend(f"SQLite integrity check: {row}" for row in rows[:20])


def _check_audit(path: Path, report: CheckReport) -> None:
    from kmsenv.server.audit import verify

    try:
        summary = verify(path)
    except IntegrityError as exc:
        report.problems.append(f"audit log: {exc.message}")
        return
    report.audit_records, report.audit_head = summary.records, summary.head


def check_store(home: Path, *, store: str | None = None, audit_log: Path | None = None) -> CheckReport:
    """Check the store of ``home`` (or ``store``) and its audit log; never writes.

    ``audit_log``: the audit file to verify; default ``home/audit.jsonl`` when it exists.
    Raises ConfigError when the store or root key cannot be opened at all.
    """
    from kmsenv.kms.store_io import open_store

    root_key, _ = load_or_create_root_key(home, create=False)
    opened: Store = open_store(home, store)
    report = CheckReport(where=str(opened.path))
    try:
        if isinstance(opened, SqliteStore):
            _sqlite_integrity(Path(opened.path), report)
        with opened.transaction(write=False) as tx:
            try:
                _check_records(tx, root_key, report)
            except (ValueError, TypeError, UnicodeError) as exc:
                # A damaged row (a value of the wrong type or encoding) is a finding, not a crash.
                report.problems.append(f"the store's records cannot be read: {type(exc).__name__}")
    finally:
        opened.close()
    audit = audit_log if audit_log is not None else home / "audit.jsonl"
    if audit_log is not None or audit.exists():
        _check_audit(audit, report)
    return report
