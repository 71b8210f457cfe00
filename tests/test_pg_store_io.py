"""Backup and restore: ``kmsenv store export`` / ``import`` between SQLite and PostgreSQL stores,
and the ``kmsenv store migrate|check-version`` commands."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import FakeClock
from kms_helpers import run_kmsenv
from kmsenv.errors import ConfigError, InputError, IntegrityError
from kmsenv.kms.access import AccessKeys
from kmsenv.kms.pg_store import read_schema_version
from kmsenv.kms.service import KmsService, open_service
from kmsenv.kms.store import SCHEMA_VERSION
from kmsenv.kms.store_io import export_store, import_store
from pg_harness import install_schema, pg_cluster, pg_url, pg_url_factory

__all__ = ["pg_cluster", "pg_url", "pg_url_factory"]

POLICY = '{"Version":"1","Statement":[{"Effect":"Allow","Action":["kms:Decrypt"],"Resource":["*"]}]}'


@dataclass
class Kms:
    """A populated KMS and what must survive a move: blobs by plaintext, an AccessKey, metadata."""

    blobs: dict[str, str]
    access_key: dict[str, str]
    metadata: dict[str, Any]
    destroyed: str
    disabled: str
    pending: str


def populate(svc: KmsService, clock: FakeClock) -> Kms:
    """Keys in every state, rotated versions, aliases, a destroyed key, an AccessKey with a policy."""
    blobs: dict[str, str] = {}
    rotating = svc.create_key(enable_automatic_rotation=True, rotation_interval="7d")["KeyMetadata"]["KeyId"]
    svc.create_alias(alias_name="alias/rotating", key_id=rotating)
    for n in range(3):
        context = json.dumps({"n": str(n)})
        blobs[f"rotating-{n}"] = svc.encrypt(
            key_id="alias/rotating", plaintext=f"rotating-{n}", encryption_context=context
        )["CiphertextBlob"]
        clock.advance(days=8)
        svc.list_keys()  # the due rotation
    disabled = svc.create_key(description="disabled one")["KeyMetadata"]["KeyId"]
    blobs["disabled"] = svc.encrypt(key_id=disabled, plaintext="disabled")["CiphertextBlob"]
    svc.disable_key(key_id=disabled)
    pending = svc.create_key()["KeyMetadata"]["KeyId"]
    blobs["pending"] = svc.encrypt(key_id=pending, plaintext="pending")["CiphertextBlob"]
    svc.schedule_key_deletion(key_id=pending, pending_window_in_days=30)
    destroyed = svc.create_key()["KeyMetadata"]["KeyId"]
    svc.schedule_key_deletion(key_id=destroyed, pending_window_in_days=7)
    clock.advance(days=8)
    svc.list_keys()
    svc.create_key(origin="EXTERNAL")
    access_key = AccessKeys(svc).create(description="backup test", policy=POLICY)
    keys = svc.list_keys(page_size=100)["Keys"]["Key"]
    metadata = {k["KeyId"]: svc.describe_key(key_id=k["KeyId"])["KeyMetadata"] for k in keys}
    metadata["aliases"] = svc.list_aliases()
    metadata["versions"] = svc.list_key_versions(key_id=rotating)
    return Kms(blobs, access_key, metadata, destroyed, disabled, pending)


def check_moved(svc: KmsService, kms: Kms) -> None:
    """Everything of ``kms`` is in ``svc``: metadata, ARNs, versions, aliases, every blob, the AccessKey."""
    for key_id, meta in kms.metadata.items():
        if key_id == "aliases":
            assert svc.list_aliases() == meta
        elif key_id == "versions":
            assert svc.list_key_versions(key_id=meta["KeyVersions"]["KeyVersion"][0]["KeyId"]) == meta
        else:
            assert svc.describe_key(key_id=key_id)["KeyMetadata"] == meta
    svc.enable_key(key_id=kms.disabled)  # so that their blobs can be opened
    svc.cancel_key_deletion(key_id=kms.pending)
    for plaintext, blob in kms.blobs.items():
        context = {"n": plaintext.rsplit("-", 1)[1]} if plaintext.startswith("rotating") else None
        assert (
            svc.decrypt(ciphertext_blob=blob, encryption_context=json.dumps(context) if context else None)["Plaintext"]
            == plaintext
        )
    with pytest.raises(Exception, match="deleted"):
        svc.describe_key(key_id=kms.destroyed)
    credential = AccessKeys(svc).lookup(kms.access_key["AccessKeyId"])
    assert credential is not None and credential.secret == kms.access_key["AccessKeySecret"]
    assert credential.policy is not None


@pytest.fixture
def sqlite_kms(tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Kms]:
    for name in ("KMSENV_STORE", "KMSENV_ROOT_KEY_FILE", "KMSENV_REGION"):
        monkeypatch.delenv(name, raising=False)
    home = tmp_path / "sqlite-home"
    svc = open_service(home, clock=clock, announce=False)
    try:
        kms = populate(svc, clock)
    finally:
        svc.close()
    return home, kms


@pytest.fixture
def exported(sqlite_kms: tuple[Path, Kms], tmp_path: Path) -> tuple[Path, Path]:
    """(home of the populated SQLite KMS, its export file)."""
    home, _ = sqlite_kms
    path = tmp_path / "kms.export"
    export_store(home, path)
    return home, path


def test_sqlite_to_postgres_and_back(
    sqlite_kms: tuple[Path, Kms], pg_url: str, tmp_path: Path, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, kms = sqlite_kms
    exported = tmp_path / "kms.export"
    counts = export_store(home, exported)
    # Rotating: the first version and 4 rotations (3 + 1 in the deletion window); disabled, pending:
    # 1 each; destroyed, external: none.
    assert counts == {"keys": 4, "key_versions": 7, "aliases": 1, "deleted_keys": 1, "access_keys": 1}
    assert exported.stat().st_mode & 0o777 == 0o600
    text = exported.read_text()
    assert "root.key" not in text and (home / "root.key").read_text().split(":", 1)[1].strip() not in text

    node_home = tmp_path / "node"  # a node: its own home, the root key named by KMSENV_ROOT_KEY_FILE
    monkeypatch.setenv("KMSENV_ROOT_KEY_FILE", str(home / "root.key"))
    import_store(node_home, exported, store=pg_url)
    monkeypatch.setenv("KMSENV_STORE", pg_url)
    svc = open_service(node_home, clock=clock, announce=False)
    try:
        check_moved(svc, kms)
    finally:
        svc.close()

    # And back into a new SQLite home: the PostgreSQL export is the same KMS.
    again = tmp_path / "again.export"
    export_store(node_home, again, store=pg_url)
    back = tmp_path / "back-home"
    import_store(back, again, store="")
    monkeypatch.delenv("KMSENV_STORE")
    svc = open_service(back, clock=clock, announce=False)
    try:
        assert svc.describe_key(key_id="alias/rotating")["KeyMetadata"]["KeyState"] == "Enabled"
        assert AccessKeys(svc).lookup(kms.access_key["AccessKeyId"]) is not None
    finally:
        svc.close()


def test_wrong_root_key_is_refused_before_anything_is_written(
    exported: tuple[Path, Path], pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, export = exported
    other = open_service(tmp_path / "other", announce=False)  # another KMS, another root key
    other.close()
    monkeypatch.setenv("KMSENV_ROOT_KEY_FILE", str(tmp_path / "other" / "root.key"))
    with pytest.raises(ConfigError, match="does not open the KMS exported") as info:
        import_store(tmp_path / "node", export, store=pg_url)
    assert "nothing was imported" in (info.value.hint or "")
    assert read_schema_version(pg_url) == 0  # not even the schema was created
    with pytest.raises(ConfigError):
        import_store(tmp_path / "sqlite-target", export, store="")
    assert not (tmp_path / "sqlite-target").exists()


def test_modified_sealed_value_is_refused_before_anything_is_written(
    exported: tuple[Path, Path], pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, export = exported
    document = json.loads(export.read_text())
    sealed = bytearray(base64.b64decode(document["key_versions"][-1]["sealed_material"]))
    sealed[-1] ^= 1
    document["key_versions"][-1]["sealed_material"] = base64.b64encode(bytes(sealed)).decode()
    export.write_text(json.dumps(document))
    monkeypatch.setenv("KMSENV_ROOT_KEY_FILE", str(home / "root.key"))
    with pytest.raises(IntegrityError, match="modified"):
        import_store(tmp_path / "node", export, store=pg_url)
    assert read_schema_version(pg_url) == 0


def test_import_needs_an_empty_store(
    exported: tuple[Path, Path], pg_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home, export = exported
    monkeypatch.setenv("KMSENV_ROOT_KEY_FILE", str(home / "root.key"))
    import_store(tmp_path / "node", export, store=pg_url)
    with psycopg.connect(pg_url) as conn:
        before = conn.execute("SELECT count(*) FROM key_versions").fetchone()
    with pytest.raises(ConfigError, match="not empty"):
        import_store(tmp_path / "node", export, store=pg_url)
    with psycopg.connect(pg_url) as conn:
        assert conn.execute("SELECT count(*) FROM key_versions").fetchone() == before
    with pytest.raises(ConfigError, match="not empty"):
        import_store(home, export, store="")  # into the very store it came from


@pytest.mark.parametrize(
    ("content", "error"),
    [
        (b"not json", "not JSON"),
        (b'{"format": "something-else"}', "no format"),
        (b'{"format": "kmsenv-store-export", "version": 2}', "export version 2"),
    ],
)
def test_malformed_exports(tmp_path: Path, content: bytes, error: str) -> None:
    path = tmp_path / "bad.export"
    path.write_bytes(content)
    with pytest.raises(InputError, match=error):
        import_store(tmp_path / "home", path, store="")


def test_export_from_a_newer_schema_is_refused(exported: tuple[Path, Path], tmp_path: Path) -> None:
    _, export = exported
    document = json.loads(export.read_text())
    document["schema_version"] = SCHEMA_VERSION + 1
    export.write_text(json.dumps(document))
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}"):
        import_store(tmp_path / "node", export, store="")


# -- the commands ----------------------------------------------------------------------------------


def test_cli_export_import_migrate_check_version(
    sqlite_kms: tuple[Path, Kms], pg_url: str, pg_url_factory: Callable[[], str], tmp_path: Path
) -> None:
    home, _ = sqlite_kms
    out = tmp_path / "cli.export"
    result = run_kmsenv(home, "store", "export", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "exported" in result.stderr and "no root key" in result.stderr
    assert run_kmsenv(home, "store", "export", "-o", str(out)).returncode == 5  # no clobber without --force

    node = tmp_path / "node"
    env = {"KMSENV_STORE": pg_url, "KMSENV_ROOT_KEY_FILE": str(home / "root.key")}
    result = run_kmsenv(node, "store", "check-version", **env)
    assert result.returncode == 0 and f"schema version 0; this kmsenv: {SCHEMA_VERSION}" in result.stdout
    result = run_kmsenv(node, "store", "import", str(out), **env)
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stderr
    result = run_kmsenv(node, "store", "check-version", **env)
    assert result.returncode == 0, result.stderr
    result = run_kmsenv(node, "kms", "DescribeKey", "--KeyId", "alias/rotating", **env)
    assert result.returncode == 0, result.stderr

    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE meta SET value = %s WHERE name = 'schema_version'", (str(SCHEMA_VERSION + 1).encode(),))
    result = run_kmsenv(node, "store", "check-version", **env)
    assert result.returncode == 9 and "newer than this kmsenv" in result.stderr

    older = pg_url_factory()
    install_schema(older, 1)
    env["KMSENV_STORE"] = older
    result = run_kmsenv(node, "store", "check-version", **env)
    assert result.returncode == 9 and "kmsenv store migrate" in result.stderr
    result = run_kmsenv(node, "store", "migrate", **env)
    assert result.returncode == 0 and f"from schema version 1 to {SCHEMA_VERSION}" in result.stderr
    result = run_kmsenv(node, "store", "migrate", **env)
    assert result.returncode == 0 and "nothing to do" in result.stderr

    result = run_kmsenv(home, "store", "migrate")  # SQLite: already current
    assert result.returncode == 0 and "nothing to do" in result.stderr
    result = run_kmsenv(tmp_path / "nowhere", "store", "migrate")
    assert result.returncode == 9 and "no KMS store" in result.stderr
