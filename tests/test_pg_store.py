"""The PostgreSQL store: several nodes on one database, schema versions, failures, nonces.

A "node" here is a :class:`KmsService` with a store (and connection pool) of its own, all on one
database, as two ``kmsenv server`` machines would be. Races start the competitors together
behind a barrier and check the outcome the API promises, repeated to give the interleavings a
chance to differ.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import FakeClock
from kms_helpers import expect_error
from kmsenv.errors import ConfigError, KmsError
from kmsenv.kms import pg_store
from kmsenv.kms.access import AccessKeys
from kmsenv.kms.actions import dispatch
from kmsenv.kms.pg_nonces import PgNonceStore, open_nonce_store
from kmsenv.kms.pg_store import PostgresStore, migrate, pg_migrations, read_schema_version, redact
from kmsenv.kms.service import KmsService, open_service
from kmsenv.kms.store import SCHEMA_VERSION
from pg_harness import free_port, install_schema, pg_cluster, pg_url, pg_url_factory

__all__ = ["pg_cluster", "pg_url", "pg_url_factory"]

NODES = 4
ROUNDS = 5


@pytest.fixture
def shared(kms_home: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """``KMSENV_STORE`` set to a fresh database; returns its URL."""
    monkeypatch.setenv("KMSENV_STORE", pg_url)
    return pg_url


@pytest.fixture
def nodes(shared: str, kms_home: Path, clock: FakeClock) -> Iterator[list[KmsService]]:
    """``NODES`` services on one database and one root key, with one clock."""
    services = [open_service(kms_home, clock=clock, announce=False) for _ in range(NODES)]
    yield services
    for svc in services:
        svc.close()


def race(fns: list[Callable[[], Any]]) -> list[Any]:
    """Run the callables at once (released together by a barrier); their results or exceptions."""
    barrier = threading.Barrier(len(fns))

    def run(fn: Callable[[], Any]) -> Any:
        barrier.wait()
        try:
            return fn()
        except KmsError as exc:
            return exc

    with ThreadPoolExecutor(len(fns)) as pool:
        return list(pool.map(run, fns))


def rows(url: str, sql: str, *params: object) -> list[tuple[Any, ...]]:
    with psycopg.connect(url) as conn:
        return list(conn.execute(sql, params).fetchall())


def snapshot(url: str) -> dict[str, list[tuple[Any, ...]]]:
    tables = ["meta", "keys", "key_versions", "aliases", "deleted_keys", "access_keys"]
    return {t: sorted(rows(url, f"SELECT * FROM {t}"), key=repr) for t in tables}


# -- several nodes at once ---------------------------------------------------------------------


def test_alias_race_has_exactly_one_winner(nodes: list[KmsService]) -> None:
    keys = [svc.create_key()["KeyMetadata"]["KeyId"] for svc in nodes]
    for n in range(ROUNDS):
        name = f"alias/race{n}"
        results = race(
            [partial(svc.create_alias, alias_name=name, key_id=key) for svc, key in zip(nodes, keys, strict=True)]
        )
        errors = [r for r in results if isinstance(r, KmsError)]
        assert len(errors) == NODES - 1
        assert {e.code for e in errors} == {"AliasAlreadyExists"}
        winner = keys[next(i for i, r in enumerate(results) if not isinstance(r, KmsError))]
        assert nodes[0].describe_key(key_id=name)["KeyMetadata"]["KeyId"] == winner


def test_due_rotation_is_done_once_by_racing_nodes(nodes: list[KmsService], clock: FakeClock, shared: str) -> None:
    key = nodes[0].create_key(enable_automatic_rotation=True, rotation_interval="7d")["KeyMetadata"]["KeyId"]
    for n in range(1, ROUNDS + 1):
        clock.advance(days=8)
        race([svc.list_keys for svc in nodes])
        versions = rows(shared, "SELECT key_version_id FROM key_versions WHERE key_id = %s ORDER BY seq", key)
        assert len(versions) == 1 + n  # one rotation per due date, whichever node did it
        meta = nodes[1].describe_key(key_id=key)["KeyMetadata"]
        assert meta["PrimaryKeyVersion"] == versions[-1][0]


def test_racing_create_key_version_keeps_every_version_and_one_primary(nodes: list[KmsService], shared: str) -> None:
    key = nodes[0].create_key()["KeyMetadata"]["KeyId"]
    results = race([lambda svc=svc: svc.create_key_version(key_id=key) for svc in nodes])
    created = {r["KeyVersion"]["KeyVersionId"] for r in results}
    assert len(created) == NODES
    stored = [r[0] for r in rows(shared, "SELECT key_version_id FROM key_versions WHERE key_id = %s ORDER BY seq", key)]
    assert set(stored[1:]) == created
    # The primary is the version committed last: each writer saw the one before it under the row lock.
    assert nodes[2].describe_key(key_id=key)["KeyMetadata"]["PrimaryKeyVersion"] == stored[-1]


def test_concurrent_changes_to_one_key_lose_no_update(nodes: list[KmsService]) -> None:
    for _ in range(ROUNDS):
        key = nodes[0].create_key()["KeyMetadata"]["KeyId"]
        *_, rotation = race(
            [
                partial(nodes[0].update_key_description, key_id=key, description="new description"),
                partial(nodes[1].set_deletion_protection, key_id=key, enable_deletion_protection=True),
                partial(nodes[2].disable_key, key_id=key),
                partial(nodes[3].update_rotation_policy, key_id=key, enable_automatic_rotation=True),
            ]
        )
        meta = nodes[0].describe_key(key_id=key)["KeyMetadata"]
        assert meta["Description"] == "new description"
        assert meta["DeletionProtection"] == "Enabled"
        assert meta["KeyState"] == "Disabled"
        if isinstance(rotation, KmsError):  # the key was disabled first
            assert rotation.code == "Rejected.Disabled" and meta["AutomaticRotation"] == "Disabled"
        else:
            assert meta["AutomaticRotation"] == "Suspended"  # rotation on, key disabled


def test_racing_state_changes_end_in_a_consistent_state(nodes: list[KmsService]) -> None:
    for _ in range(ROUNDS):
        key = nodes[0].create_key()["KeyMetadata"]["KeyId"]
        results = race(
            [
                partial(nodes[0].enable_key, key_id=key),
                partial(nodes[1].disable_key, key_id=key),
                partial(nodes[2].schedule_key_deletion, key_id=key, pending_window_in_days=7),
                partial(nodes[3].disable_key, key_id=key),
            ]
        )
        meta = nodes[0].describe_key(key_id=key)["KeyMetadata"]
        refused = [r for r in results if isinstance(r, KmsError)]
        assert all(r.code == "Rejected.StateModifiedFailed" for r in refused)
        if meta["KeyState"] == "PendingDeletion":
            assert meta["DeleteDate"]
            # Enable/Disable after the scheduling are refused; before it, they succeed.
        else:
            pytest.fail(f"ScheduleKeyDeletion is allowed from Enabled and Disabled; got {meta['KeyState']}")
        assert isinstance(results[2], dict)  # scheduling never loses to Enable/Disable


def test_deletion_after_window_by_racing_nodes(nodes: list[KmsService], clock: FakeClock, shared: str) -> None:
    key = nodes[0].create_key()["KeyMetadata"]["KeyId"]
    blob = nodes[1].encrypt(key_id=key, plaintext="p")["CiphertextBlob"]
    nodes[2].schedule_key_deletion(key_id=key, pending_window_in_days=7)
    clock.advance(days=8)
    results = race([svc.list_keys for svc in nodes])
    assert not [r for r in results if isinstance(r, KmsError)]
    assert rows(shared, "SELECT count(*) FROM key_versions WHERE key_id = %s", key) == [(0,)]
    assert rows(shared, "SELECT key_id FROM deleted_keys") == [(key,)]
    for svc in nodes:  # including the node that had the material cached
        expect_error(svc.decrypt, "Forbidden.KeyNotFound", ciphertext_blob=blob, match="deleted")


def test_a_change_on_one_node_is_seen_by_the_others(nodes: list[KmsService]) -> None:
    key = nodes[0].create_key()["KeyMetadata"]["KeyId"]
    blob = nodes[1].encrypt(key_id=key, plaintext="secret")["CiphertextBlob"]
    assert nodes[2].decrypt(ciphertext_blob=blob)["Plaintext"] == "secret"
    nodes[3].disable_key(key_id=key)
    expect_error(nodes[2].decrypt, "Rejected.Disabled", ciphertext_blob=blob)


# -- store semantics -----------------------------------------------------------------------------


def test_duplicate_alias_and_failed_actions_change_nothing(service_pg: KmsService, shared: str) -> None:
    key = service_pg.create_key()["KeyMetadata"]["KeyId"]
    service_pg.create_alias(alias_name="alias/taken", key_id=key)
    before = snapshot(shared)
    expect_error(service_pg.create_alias, "AliasAlreadyExists", alias_name="alias/taken", key_id=key)
    expect_error(service_pg.schedule_key_deletion, "InvalidParameter", key_id=key, pending_window_in_days=3)
    with pytest.raises(RuntimeError), service_pg.store.transaction(write=True) as tx:
        tx.delete_alias("alias/taken")
        raise RuntimeError("rolled back")
    assert snapshot(shared) == before


def test_access_keys(service_pg: KmsService) -> None:
    access = AccessKeys(service_pg)
    created = access.create(description="ci", policy=None)
    credential = access.lookup(created["AccessKeyId"])
    assert credential is not None and credential.secret == created["AccessKeySecret"] and credential.active
    access.set_active(created["AccessKeyId"], False)
    assert access.lookup(created["AccessKeyId"]).active is False  # type: ignore[union-attr]
    policy = '{"Version":"1","Statement":[{"Effect":"Allow","Action":["kms:Encrypt"],"Resource":["*"]}]}'
    assert access.set_policy(created["AccessKeyId"], policy)["Policy"]
    assert [a["AccessKeyId"] for a in access.list()] == [created["AccessKeyId"]]
    access.delete(created["AccessKeyId"])
    assert access.lookup(created["AccessKeyId"]) is None
    expect_error(access.delete, "InvalidAccessKeyId.NotFound", created["AccessKeyId"])


def test_material_is_stored_sealed_as_bytea(service_pg: KmsService, shared: str) -> None:
    service_pg.create_key()
    ((sealed, kind),) = rows(shared, "SELECT sealed_material, pg_typeof(sealed_material)::text FROM key_versions")
    assert kind == "bytea" and isinstance(sealed, bytes) and len(sealed) == 1 + 12 + 32 + 16


def test_root_key_of_another_kms_is_refused(
    shared: str, kms_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    open_service(kms_home, announce=False).close()
    other = open_service(tmp_path / "other-home", store="", announce=False)  # makes another root key
    other.close()
    monkeypatch.setenv("KMSENV_ROOT_KEY_FILE", str(tmp_path / "other-home" / "root.key"))
    with pytest.raises(ConfigError, match="does not open the KMS store"):
        open_service(kms_home, announce=False)


def test_first_node_creates_the_root_key_and_says_so(
    shared: str, kms_home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    open_service(kms_home).close()
    err = capsys.readouterr().err
    assert "created a new KMS in postgresql://" in err and str(kms_home / "root.key") in err
    assert (kms_home / "root.key").stat().st_mode & 0o777 == 0o600
    open_service(kms_home).close()
    assert capsys.readouterr().err == ""


def test_a_second_node_without_the_root_key_is_refused(shared: str, kms_home: Path, tmp_path: Path) -> None:
    open_service(kms_home, announce=False).close()
    with pytest.raises(ConfigError, match="root key file"):
        open_service(tmp_path / "node2", announce=False)
    assert not (tmp_path / "node2").exists()  # no new root key for a database already in use


def test_store_setting_must_be_a_postgres_url(kms_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMSENV_STORE", "mysql://u:hunter2@db/kms")
    with pytest.raises(ConfigError, match="postgresql://") as info:
        open_service(kms_home, announce=False)
    assert "hunter2" not in str(info.value)


def test_password_never_shows() -> None:
    assert redact("postgresql://kms:hunter2@db:5432/kms?sslmode=require") == (
        "postgresql://kms:***@db:5432/kms?sslmode=require"
    )
    assert redact("postgresql://db/kms") == "postgresql://db/kms"


# -- failures ------------------------------------------------------------------------------------


def test_unreachable_database_fails_fast(kms_home: Path) -> None:
    port = free_port()
    started = time.monotonic()
    err = expect_error(
        open_service,
        "ServiceUnavailableTemporary",
        kms_home,
        store=f"postgresql://u:pw@127.0.0.1:{port}/kms",
        announce=False,
    )
    assert time.monotonic() - started < pg_store.CONNECT_TIMEOUT_S + 2
    assert "pw" not in err.message and "Cannot connect" in err.message


def test_lost_connections_are_replaced(service_pg: KmsService, shared: str) -> None:
    key = service_pg.create_key()["KeyMetadata"]["KeyId"]
    dbname = shared.rsplit("/", 1)[1]
    with psycopg.connect(shared, autocommit=True) as admin:
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        )
    assert service_pg.describe_key(key_id=key)["KeyMetadata"]["KeyId"] == key


def test_connection_lost_mid_transaction_commits_nothing(service_pg: KmsService, shared: str) -> None:
    key = service_pg.create_key()["KeyMetadata"]["KeyId"]
    with psycopg.connect(shared, autocommit=True) as admin:
        with pytest.raises(KmsError) as info, service_pg.store.transaction(write=True) as tx:
            record = tx.get_key(key)
            assert record is not None
            record.description = "never committed"
            tx.update_key(record)
            (pid,) = tx._c.execute("SELECT pg_backend_pid()").fetchone()
            admin.execute("SELECT pg_terminate_backend(%s)", (pid,))  # the database side goes away
        assert info.value.code == "ServiceUnavailableTemporary"
    assert service_pg.describe_key(key_id=key)["KeyMetadata"]["Description"] == ""


def test_lock_held_too_long_is_service_unavailable(
    service_pg: KmsService, shared: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = service_pg.create_key()["KeyMetadata"]["KeyId"]
    with psycopg.connect(shared) as blocker:
        blocker.execute("SELECT 1 FROM keys WHERE key_id = %s FOR UPDATE", (key,))
        with service_pg.store.transaction(write=True) as tx:
            tx._c.execute("SET LOCAL lock_timeout = '200ms'")
        started = time.monotonic()
        with pytest.raises(KmsError) as info, service_pg.store.transaction(write=True) as tx:
            tx._c.execute("SET LOCAL lock_timeout = '200ms'")
            tx.get_key(key)
        assert info.value.code == "ServiceUnavailableTemporary" and time.monotonic() - started < 5
        assert "lock" not in info.value.message  # details go to the log, not to clients
    # The refused Action changed nothing and the store works on.
    assert service_pg.describe_key(key_id=key)["KeyMetadata"]["KeyState"] == "Enabled"


# -- schema versions -----------------------------------------------------------------------------


def test_schema_created_on_first_open_with_the_current_version(shared: str) -> None:
    store = PostgresStore(shared)
    try:
        assert store.schema_version() == SCHEMA_VERSION == read_schema_version(shared)
    finally:
        store.close()
    assert [r[0] for r in rows(shared, "SELECT name FROM meta")] == ["schema_version"]


def test_schema_newer_than_the_code_is_refused(shared: str, kms_home: Path) -> None:
    open_service(kms_home, announce=False).close()
    with psycopg.connect(shared) as conn:
        conn.execute("UPDATE meta SET value = %s WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1).encode(),))
    with pytest.raises(ConfigError) as info:
        open_service(kms_home, announce=False)
    message = str(info.value)
    assert f"schema version {SCHEMA_VERSION + 1}" in message and f"({SCHEMA_VERSION})" in message
    assert "upgrade kmsenv" in (info.value.hint or "")
    with pytest.raises(ConfigError, match="newer"):
        migrate(shared)  # an older node cannot "migrate" a newer schema either


@pytest.mark.parametrize("start", range(1, SCHEMA_VERSION))
def test_older_schema_is_refused_until_migrated(shared: str, kms_home: Path, start: int) -> None:
    install_schema(shared, start)
    with pytest.raises(ConfigError) as info:
        open_service(kms_home, announce=False)
    assert f"schema version {start}" in str(info.value) and str(SCHEMA_VERSION) in str(info.value)
    assert "kmsenv store migrate" in (info.value.hint or "")
    assert migrate(shared) == (start, SCHEMA_VERSION)
    assert migrate(shared) == (SCHEMA_VERSION, SCHEMA_VERSION)  # idempotent
    svc = open_service(kms_home, announce=False)
    try:
        key = svc.create_key()["KeyMetadata"]["KeyId"]
        AccessKeys(svc).create()
        assert svc.describe_key(key_id=key)["KeyMetadata"]["KeyState"] == "Enabled"
    finally:
        svc.close()


def test_nodes_opening_a_new_database_at_once_create_one_schema(pg_url: str) -> None:
    results = race([lambda: PostgresStore(pg_url) for _ in range(NODES)])
    for store in results:
        assert isinstance(store, PostgresStore)
        store.close()
    assert read_schema_version(pg_url) == SCHEMA_VERSION


def test_listings_sort_as_in_sqlite_whatever_the_database_locale(
    pg_cluster: Any, kms_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A database whose default collation sorts "alias/B" after "alias/b" and ignores "-" and "_".
    url = pg_cluster.create_database("TEMPLATE template0 LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8'")
    monkeypatch.setenv("KMSENV_STORE", url)
    svc = open_service(kms_home, announce=False)
    try:
        key = svc.create_key()["KeyMetadata"]["KeyId"]
        names = ["alias/b", "alias/B", "alias/a-c", "alias/ab", "alias/_z", "alias/Z"]
        for name in names:
            svc.create_alias(alias_name=name, key_id=key)
        listed = [a["AliasName"] for a in svc.list_aliases(page_size=100)["Aliases"]["Alias"]]
        assert listed == sorted(names)  # code point order, as SQLite's BINARY collation
    finally:
        svc.close()


def test_translated_schema_has_no_sqlite_only_types() -> None:
    for sql in pg_migrations():
        assert "BLOB" not in sql and "AUTOINCREMENT" not in sql
    schema = " ".join(pg_migrations())
    assert "deletion_protection BOOLEAN NOT NULL DEFAULT FALSE" in schema
    assert "rotation_enabled BOOLEAN NOT NULL DEFAULT FALSE" in schema


# -- nonces --------------------------------------------------------------------------------------


def test_nonce_is_claimed_once_across_nodes(service_pg: KmsService, kms_home: Path) -> None:
    stores = [open_nonce_store(service_pg.store, kms_home) for _ in range(NODES)]
    try:
        assert all(isinstance(s, PgNonceStore) for s in stores)
        for n in range(ROUNDS * 4):
            results = race([partial(s.claim, "LTAIkey", f"nonce-{n}", window_s=900) for s in stores])
            assert results.count(True) == 1, results
        assert stores[0].claim("LTAIother", "nonce-0", window_s=900)  # nonces are per AccessKey
    finally:
        for s in stores:
            s.close()
    assert not (kms_home / "nonces.db").exists()


def test_expired_nonce_may_be_used_again(service_pg: KmsService, kms_home: Path) -> None:
    store = open_nonce_store(service_pg.store, kms_home)
    try:
        assert store.claim("LTAIkey", "n", window_s=900, now=1_000_000)
        assert not store.claim("LTAIkey", "n", window_s=900, now=1_000_000 + 1799)
        assert store.claim("LTAIkey", "n", window_s=900, now=1_000_000 + 1801)
        assert not store.claim("LTAIkey", "n", window_s=900, now=1_000_000 + 1802)
    finally:
        store.close()


@pytest.fixture
def service_pg(shared: str, kms_home: Path, clock: FakeClock) -> Iterator[KmsService]:
    svc = open_service(kms_home, clock=clock, announce=False)
    yield svc
    svc.close()


def test_dispatch_over_postgres(service_pg: KmsService) -> None:
    key = dispatch(service_pg, "CreateKey", {})["KeyMetadata"]["KeyId"]
    assert dispatch(service_pg, "DescribeKey", {"KeyId": key})["KeyMetadata"]["KeyState"] == "Enabled"
