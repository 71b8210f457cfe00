"""``kmsenv store check``: a sound store passes; each kind of damage is named; nothing is written."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from kms_helpers import run_kmsenv
from kmsenv.kms.access import AccessKeys
from kmsenv.kms.check import check_store
from kmsenv.kms.service import KmsService
from kmsenv.server.audit import AuditLog, audit_record

Call = object


def _db(home: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(home / "kms.db", isolation_level=None)
    conn.execute("PRAGMA foreign_keys = OFF")
    return conn


@pytest.fixture
def populated(service: KmsService, kms_home: Path) -> KmsService:
    key = service.create_key(description="check me")["KeyMetadata"]["KeyId"]
    service.create_alias(alias_name="alias/Apollo/WorkKey", key_id=key)
    service.create_key_version(key_id=key)
    AccessKeys(service).create(
        policy='{"Statement":[{"Effect":"Allow","Action":"kms:Decrypt","Resource":"*"}]}'
    )
    log = AuditLog(kms_home / "audit.jsonl")
    for i in range(3):
        log.append(
            audit_record(time="t", request_id=str(i), access_key_id=None, action="Encrypt", key_id=key,
                         alias=None, code="OK", client=None, latency_ms=1.0)
        )
    log.close()
    return service


def test_sound_store_passes(populated: KmsService, kms_home: Path) -> None:
    before = (kms_home / "kms.db").read_bytes()
    report = check_store(kms_home)
    assert report.ok, report.problems
    assert (report.keys, report.versions, report.aliases, report.access_keys, report.audit_records) == (1, 2, 1, 1, 3)
    assert (kms_home / "kms.db").read_bytes() == before  # read only


def test_cli_exit_codes(populated: KmsService, kms_home: Path) -> None:
    populated.close()
    ok = run_kmsenv(kms_home, "store", "check")
    assert ok.returncode == 0, ok.stderr
    assert "1 keys, 2 key versions, 1 aliases, 1 AccessKeys, 3 audit records" in ok.stdout
    conn = _db(kms_home)
    sealed = bytearray(conn.execute("SELECT sealed_material FROM key_versions WHERE seq = 1").fetchone()[0])
    sealed[20] ^= 1
    conn.execute("UPDATE key_versions SET sealed_material = ? WHERE seq = 1", (bytes(sealed),))
    conn.close()
    bad = run_kmsenv(kms_home, "store", "check")
    assert bad.returncode == 7, bad.stderr
    assert "does not open under the root key" in bad.stdout
    assert "failed 1 check(s)" in bad.stderr


def test_tampered_material_and_swapped_rows(populated: KmsService, kms_home: Path) -> None:
    conn = _db(kms_home)
    rows = conn.execute("SELECT key_version_id, sealed_material FROM key_versions ORDER BY seq").fetchall()
    # Swap the two versions' sealed values: each still a valid seal, under the other row's AAD.
    conn.execute("UPDATE key_versions SET sealed_material = ? WHERE key_version_id = ?", (rows[1][1], rows[0][0]))
    conn.execute("UPDATE key_versions SET sealed_material = ? WHERE key_version_id = ?", (rows[0][1], rows[1][0]))
    conn.close()
    problems = check_store(kms_home).problems
    assert len(problems) == 2 and all("does not open under the root key" in p for p in problems)


def test_alias_to_a_missing_key_and_lost_primary(populated: KmsService, kms_home: Path) -> None:
    conn = _db(kms_home)
    conn.execute("UPDATE aliases SET key_id = 'no-such-key'")
    conn.execute("UPDATE keys SET primary_version_id = 'gone'")
    conn.close()
    problems = check_store(kms_home).problems
    assert any("alias alias/Apollo/WorkKey: its key no-such-key does not exist" in p for p in problems)
    assert any("primary version gone does not exist" in p for p in problems)


def test_access_key_secret_and_policy(populated: KmsService, kms_home: Path) -> None:
    conn = _db(kms_home)
    conn.execute("UPDATE access_keys SET sealed_secret = ?, policy = '{not json'", (b"\x01" + bytes(40),))
    conn.close()
    problems = check_store(kms_home).problems
    assert any("sealed secret does not open" in p for p in problems)
    assert any("policy document is not valid" in p for p in problems)


def test_broken_audit_chain(populated: KmsService, kms_home: Path) -> None:
    path = kms_home / "audit.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + lines[2])
    problems = check_store(kms_home).problems
    assert len(problems) == 1 and problems[0].startswith("audit log:") and "chain is broken" in problems[0]


def test_wrong_root_key(populated: KmsService, kms_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import base64
    import os

    other = tmp_path / "other.key"
    other.write_text("kmsenv-root-key-v1:" + base64.b64encode(os.urandom(32)).decode() + "\n")
    monkeypatch.setenv("KMSENV_ROOT_KEY_FILE", str(other))
    problems = check_store(kms_home).problems
    assert len(problems) == 1 and "wrong root key" in problems[0]


def test_messages_carry_no_secret_material(populated: KmsService, kms_home: Path) -> None:
    root = (kms_home / "root.key").read_text().split(":", 1)[1].strip()
    conn = _db(kms_home)
    sealed = [bytes(r[0]) for r in conn.execute("SELECT sealed_material FROM key_versions")]
    conn.execute("UPDATE key_versions SET sealed_material = ?", (b"\x01" + bytes(60),))
    conn.close()
    text = "\n".join(check_store(kms_home).problems)
    assert root not in text
    assert not any(s.hex() in text for s in sealed)


def test_unreadable_records_are_a_problem_not_a_crash(populated: KmsService, kms_home: Path) -> None:
    conn = _db(kms_home)
    conn.execute("UPDATE key_versions SET sealed_material = 'text, not a blob'")
    conn.close()
    problems = check_store(kms_home).problems
    assert len(problems) == 1 and "cannot be read" in problems[0]
