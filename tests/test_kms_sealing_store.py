"""Sealing of key material under the root key, and the SQLite store: file modes, what the
database holds (never raw material), copies without the right root key, KMSENV_ROOT_KEY_FILE,
schema versions and migrations, transactions that roll back."""

from __future__ import annotations

import base64
import os
import pickle
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from conftest import Call, FakeClock
from kms_helpers import expect_error, sealed_versions, snapshot, store_bytes
from kmsenv import _crypto
from kmsenv.errors import ConfigError, IntegrityError, KmsError
from kmsenv.kms.blob import blob_aad, decode_blob
from kmsenv.kms.sealing import RootKey
from kmsenv.kms.service import KmsService, open_service
from kmsenv.kms.store import _MIGRATIONS, SCHEMA_VERSION, SqliteStore, Tx


def read_root_key(path: Path) -> RootKey:
    text = path.read_text("ascii").strip()
    assert text.startswith("kmsenv-root-key-v1:")
    return RootKey(base64.b64decode(text.split(":", 1)[1], validate=True))


@pytest.fixture
def umask_zero() -> Iterator[None]:
    old = os.umask(0)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.usefixtures("umask_zero")
def test_home_root_key_and_store_are_private(kms_home: Path) -> None:
    open_service(kms_home, announce=False).close()
    assert kms_home.stat().st_mode & 0o777 == 0o700
    assert (kms_home / "root.key").stat().st_mode & 0o777 == 0o600
    assert (kms_home / "kms.db").stat().st_mode & 0o777 == 0o600


def test_first_use_notice_once(kms_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    open_service(kms_home).close()
    notice = capsys.readouterr()
    assert notice.out == ""
    assert str(kms_home) in notice.err and "root key" in notice.err and notice.err.count("\n") == 1
    open_service(kms_home).close()
    assert capsys.readouterr() == ("", "")


def test_first_use_notice_with_a_named_root_key(
    tmp_path: Path, kms_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    key_file = make_root_key_file(tmp_path / "named.key")
    monkeypatch.setenv("KMSENV_ROOT_KEY_FILE", str(key_file))
    open_service(kms_home).close()
    notice = capsys.readouterr().err
    assert str(kms_home) in notice and str(key_file) in notice and notice.count("\n") == 1
    open_service(kms_home).close()
    assert capsys.readouterr().err == ""


def test_store_never_holds_raw_material(call: Call, key_id: str, kms_home: Path) -> None:
    generated = call("GenerateDataKey", KeyId=key_id, NumberOfBytes=32)
    data_key = base64.b64decode(generated["Plaintext"])
    call("Encrypt", KeyId=key_id, Plaintext="plaintext-marker-4f1b9c")
    call("CreateKeyVersion", KeyId=key_id)
    stored = store_bytes(kms_home)
    assert data_key not in stored and generated["Plaintext"].encode() not in stored
    assert b"plaintext-marker-4f1b9c" not in stored
    root = read_root_key(kms_home / "root.key")
    other_root = RootKey(os.urandom(32))
    versions = sealed_versions(kms_home)
    assert len(versions) == 2
    materials = []
    for i, (key, version, sealed) in enumerate(versions):
        material = root.unseal(sealed, aad=root.material_aad(key, version), what="material")
        assert len(material) == 32 and material not in stored
        materials.append(material)
        with pytest.raises(IntegrityError):
            other_root.unseal(sealed, aad=other_root.material_aad(key, version), what="material")
        with pytest.raises(IntegrityError):  # bound to its key and version
            root.unseal(sealed, aad=root.material_aad(key, versions[1 - i][1]), what="material")
    # What was unsealed is the real material: it opens the GenerateDataKey blob by hand.
    parsed = decode_blob(generated["CiphertextBlob"])
    aead = _crypto.AesGcm(materials[0])
    opened = aead.decrypt(parsed.nonce, parsed.sealed, blob_aad(parsed.prefix, b""), what="blob")
    assert opened == generated["Plaintext"].encode()


def test_swapped_sealed_material_is_refused(call: Call, key_id: str, kms_home: Path, service: KmsService) -> None:
    blob = call("Encrypt", KeyId=key_id, Plaintext="p")["CiphertextBlob"]
    other = call("CreateKey")["KeyMetadata"]["KeyId"]
    (_, v1, s1), (_, v2, s2) = sealed_versions(kms_home)
    conn = sqlite3.connect(kms_home / "kms.db")
    with conn:
        conn.execute("UPDATE key_versions SET sealed_material = ? WHERE key_version_id = ?", (s2, v1))
        conn.execute("UPDATE key_versions SET sealed_material = ? WHERE key_version_id = ?", (s1, v2))
    conn.close()
    fresh = open_service(kms_home, announce=False)  # no cached material
    try:
        with pytest.raises(KmsError) as info:
            fresh.decrypt(ciphertext_blob=blob)
        assert (info.value.code, info.value.http_status) == ("InternalFailure", 500)
        with pytest.raises(KmsError) as info:
            fresh.encrypt(key_id=other, plaintext="p")
        assert info.value.code == "InternalFailure"
    finally:
        fresh.close()


def make_store_with_blob(home: Path) -> str:
    svc = open_service(home, announce=False)
    try:
        key = svc.create_key()["KeyMetadata"]["KeyId"]
        return str(svc.generate_data_key(key_id=key)["CiphertextBlob"])
    finally:
        svc.close()


def test_copied_store_without_its_root_key_is_refused(tmp_path: Path, kms_home: Path) -> None:
    make_store_with_blob(kms_home)
    stolen = tmp_path / "stolen"
    stolen.mkdir(mode=0o700)
    shutil.copy(kms_home / "kms.db", stolen / "kms.db")
    with pytest.raises(ConfigError, match="root key"):
        open_service(stolen, announce=False)
    assert not (stolen / "root.key").exists()  # no new root key is made beside an existing store
    shutil.copy(make_root_key_file(tmp_path / "other.key"), stolen / "root.key")
    with pytest.raises(ConfigError, match="does not open"):
        open_service(stolen, announce=False)


def make_root_key_file(path: Path) -> Path:
    path.write_text("kmsenv-root-key-v1:" + base64.b64encode(os.urandom(32)).decode() + "\n")
    return path


def test_root_key_file_variable(tmp_path: Path, kms_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = make_root_key_file(tmp_path / "elsewhere.key")
    monkeypatch.setenv("KMSENV_ROOT_KEY_FILE", str(key_file))
    blob = make_store_with_blob(kms_home)
    assert not (kms_home / "root.key").exists()
    svc = open_service(kms_home, announce=False)
    try:
        assert svc.decrypt(ciphertext_blob=blob)["Plaintext"]
    finally:
        svc.close()
    # The store is sealed under that file: without it (default root.key absent) or with another, refused.
    monkeypatch.delenv("KMSENV_ROOT_KEY_FILE")
    with pytest.raises(ConfigError, match="does not exist"):
        open_service(kms_home, announce=False)
    monkeypatch.setenv("KMSENV_ROOT_KEY_FILE", str(make_root_key_file(tmp_path / "wrong.key")))
    with pytest.raises(ConfigError, match="does not open"):
        open_service(kms_home, announce=False)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "does not exist"),
        (b"", "not a kmsenv root key"),
        (b"-----BEGIN PRIVATE KEY-----\n", "not a kmsenv root key"),
        (b"kmsenv-root-key-v1:!!!", "bad base64"),
        (b"kmsenv-root-key-v1:" + base64.b64encode(b"short"), "32-byte"),
        (b"\xff\xfe", "cannot read"),
    ],
)
def test_bad_root_key_files(
    tmp_path: Path, kms_home: Path, monkeypatch: pytest.MonkeyPatch, content: bytes | None, match: str
) -> None:
    path = tmp_path / "root.key"
    if content is not None:
        path.write_bytes(content)
    monkeypatch.setenv("KMSENV_ROOT_KEY_FILE", str(path))
    with pytest.raises(ConfigError, match=match):
        open_service(kms_home, announce=False)


def test_root_key_never_shows_its_material() -> None:
    material = os.urandom(32)
    root = RootKey(material)
    assert material.hex() not in repr(root) and base64.b64encode(material).decode() not in repr(root)
    with pytest.raises(TypeError):
        pickle.dumps(root)


def test_unusable_home_or_store(tmp_path: Path) -> None:
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(ConfigError):
        open_service(not_a_dir, announce=False)
    garbage = tmp_path / "garbage"
    garbage.mkdir()
    make_root_key_file(garbage / "root.key")
    (garbage / "kms.db").write_bytes(os.urandom(4096))
    with pytest.raises(ConfigError, match=r"kms\.db"):
        open_service(garbage, announce=False)


# -- schema --------------------------------------------------------------------------------------


def meta_schema_version(home: Path) -> int:
    conn = sqlite3.connect(home / "kms.db")
    try:
        return int(conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()[0])
    finally:
        conn.close()


def test_schema_version_recorded_and_wal(service: KmsService, kms_home: Path) -> None:
    assert SCHEMA_VERSION >= 1
    assert meta_schema_version(kms_home) == SCHEMA_VERSION == service.store.schema_version()
    conn = sqlite3.connect(kms_home / "kms.db")
    try:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        conn.close()


def test_newer_schema_is_refused(kms_home: Path) -> None:
    open_service(kms_home, announce=False).close()
    conn = sqlite3.connect(kms_home / "kms.db")
    with conn:
        conn.execute("UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.close()
    with pytest.raises(ConfigError, match="newer"):
        open_service(kms_home, announce=False)


@pytest.mark.parametrize("start", range(SCHEMA_VERSION))
def test_forward_migration_from_every_older_schema(tmp_path: Path, start: int) -> None:
    path = tmp_path / "kms.db"
    conn = sqlite3.connect(path)
    for version in range(start):
        conn.executescript(_MIGRATIONS[version])
    if start:
        conn.execute("INSERT INTO meta(name, value) VALUES ('schema_version', ?)", (str(start),))
        conn.commit()
    conn.close()
    store = SqliteStore(path)
    try:
        assert store.schema_version() == SCHEMA_VERSION
    finally:
        store.close()
    reopened = SqliteStore(path)  # migrating again is a no-op
    try:
        assert reopened.schema_version() == SCHEMA_VERSION
    finally:
        reopened.close()


# -- transactions ----------------------------------------------------------------------------------


def test_failed_action_rolls_back_its_writes(
    call: Call, kms_home: Path, service: KmsService, monkeypatch: pytest.MonkeyPatch
) -> None:
    call("CreateKey")
    before = snapshot(kms_home)

    def broken(self: Tx, rec: object) -> None:
        raise KmsError("InternalFailure", "injected failure after the key and its version were inserted")

    monkeypatch.setattr(Tx, "update_key", broken)
    expect_error(call, "InternalFailure", "CreateKey")
    monkeypatch.undo()
    assert snapshot(kms_home) == before
    assert call("ListKeys")["TotalCount"] == 1


def test_store_transaction_commits_or_rolls_back(service: KmsService, kms_home: Path) -> None:
    with pytest.raises(RuntimeError), service.store.transaction(write=True) as tx:
        tx.meta_set("probe", b"1")
        raise RuntimeError("boom")
    with service.store.transaction(write=False) as tx:
        assert tx.meta_get("probe") is None
    with service.store.transaction(write=True) as tx:
        tx.meta_set("probe", b"2")
    with service.store.transaction(write=False) as tx:
        assert tx.meta_get("probe") == b"2"


def test_state_survives_reopening(call: Call, key_id: str, kms_home: Path, clock: FakeClock) -> None:
    call("CreateAlias", AliasName="alias/persist", KeyId=key_id)
    blob = call("Encrypt", KeyId="alias/persist", Plaintext="durable")["CiphertextBlob"]
    reopened = open_service(kms_home, clock=clock, announce=False)
    try:
        assert reopened.decrypt(ciphertext_blob=blob)["Plaintext"] == "durable"
        assert reopened.describe_key(key_id="alias/persist")["KeyMetadata"]["KeyId"] == key_id
    finally:
        reopened.close()


def test_store_busy_is_service_unavailable(kms_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(SqliteStore, "BUSY_TIMEOUT_MS", 50)
    svc = open_service(kms_home, announce=False)
    blocker = sqlite3.connect(kms_home / "kms.db", isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another process holds the write lock
        err = expect_error(svc.create_key, "ServiceUnavailableTemporary", match="busy")
        assert err.retryable
        assert svc.list_keys()["TotalCount"] == 0  # readers are not blocked (WAL)
        blocker.execute("ROLLBACK")
        assert svc.create_key()["KeyMetadata"]["KeyState"] == "Enabled"
    finally:
        blocker.close()
        svc.close()
