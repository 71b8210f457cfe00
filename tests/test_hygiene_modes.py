"""Files that hold secrets are private whatever the umask: the KMS home 0700, the root key, the
store (and its WAL), the nonce store, the audit log, store exports and decrypted outputs 0600."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsenv import envelope
from kmsenv.clients import EmbeddedKms
from kmsenv.kms.nonces import NonceStore
from kmsenv.kms.service import open_service
from kmsenv.kms.store_io import export_store
from kmsenv.server.audit import AuditLog, audit_record


@pytest.fixture(params=[0o000, 0o022, 0o077], ids=["umask-000", "umask-022", "umask-077"])
def umask(request: pytest.FixtureRequest) -> Iterator[int]:
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_kms_home_files_are_private(tmp_path: Path, umask: int) -> None:
    home = tmp_path / "deep" / "home"
    service = open_service(home, announce=False)
    key = service.create_key()["KeyMetadata"]["KeyId"]
    nonces = NonceStore(home / "nonces.db")
    nonces.claim("LTAIexample", "nonce-1", window_s=900)
    log = AuditLog(home / "audit.jsonl")
    log.append(audit_record(time="t", request_id="r", access_key_id=None, action="Encrypt", key_id=key,
                            alias=None, code="OK", client=None, latency_ms=0.0))
    kms = EmbeddedKms(service=service)
    plain, cipher, out = tmp_path / "p", tmp_path / "p.cipher", tmp_path / "p.out"
    plain.write_bytes(b"secret numbers")
    envelope.encrypt_file(plain, cipher, kms=kms, key_id=key)
    envelope.decrypt_file(cipher, out, kms=kms)
    export_store(home, tmp_path / "export.json")
    try:
        assert _mode(home) == 0o700
        private = ["root.key", "kms.db", "nonces.db", "audit.jsonl"]
        private += [p.name for p in home.iterdir() if p.name.endswith(("-wal", "-shm"))]
        for name in private:
            assert _mode(home / name) == 0o600, name
        assert not [p.name for p in home.iterdir() if _mode(p) & 0o077]
        assert _mode(out) == 0o600
        assert _mode(tmp_path / "export.json") == 0o600
    finally:
        log.close()
        nonces.close()
        service.close()


@pytest.mark.parametrize("first_use", [True, False], ids=["before-first-use", "existing-kms"])
def test_a_loose_existing_home_is_made_private(tmp_path: Path, first_use: bool) -> None:
    """A home made 0755 by hand, before or after the KMS was created in it, is 0700 once opened."""
    home = tmp_path / "home"
    if first_use:
        home.mkdir()
    else:
        open_service(home, announce=False).close()
    home.chmod(0o755)
    service = open_service(home, announce=False)
    try:
        assert _mode(home) == 0o700
    finally:
        service.close()
