"""Helpers for the KMS tests: expected error codes, store snapshots, forged blobs, the CLI."""

from __future__ import annotations

import base64
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from kmsenv.errors import KmsError

#: HTTP status of each Alibaba code, written from alibaba-kms-wire.md §7-§8 (not
#: read back from kmsenv.errors). Rejected.DeletionProtection is not in the reference; 409 is the
#: status of its sibling state conflicts.
EXPECTED_STATUS = {
    "Forbidden.KeyNotFound": 404,
    "Forbidden.AliasNotFound": 404,
    "Forbidden.KeyVersionNotFound": 404,
    "InvalidApi.NotFound": 404,
    "DryRunOperation": 412,
    "MissingParameter": 400,
    "InvalidParameter": 400,
    "InvalidCiphertext": 400,
    "AliasAlreadyExists": 400,
    "Unsupported.Origin": 400,
    "Unsupported.ProtectionLevel": 400,
    "Rejected.UnsupportedOperation": 400,
    "Rejected.Disabled": 409,
    "Rejected.PendingDeletion": 409,
    "Rejected.PendingImport": 409,
    "Rejected.StateModifiedFailed": 409,
    "Rejected.DeletionProtection": 409,
    "Rejected.Enabled": 409,
    "Rejected.LimitExceeded": 400,
    "Unsupported.Alias": 400,
    "Forbidden.NoPermission": 403,
    "Forbidden.AccessKey": 403,
    "UnsupportedHTTPMethod": 403,
    "InvalidAccessKeyId.NotFound": 404,
    "InvalidAccessKeyId.Inactive": 400,
    "ParseRequestParameterException": 400,
    "IncompleteSignature": 400,
    "IllegalTimestamp": 400,
    "SignatureDoesNotMatch": 400,
    "SignatureNonceUsed": 400,
    "InvalidTimeStamp.Expired": 400,
    "InvalidTimeStamp.Format": 400,
    "InvalidSignatureMethod": 400,
    "InternalFailure": 500,
    "ServiceUnavailableTemporary": 503,
}


def expect_error(fn: Callable[..., Any], code: str, *args: Any, match: str | None = None, **kwargs: Any) -> KmsError:
    """Call ``fn`` and assert it fails with ``code`` (and its HTTP status, and ``match`` in the message)."""
    with pytest.raises(KmsError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.code == code, f"expected {code}, got {err.code}: {err.message}"
    assert err.http_status == EXPECTED_STATUS[code]
    assert err.message and "Traceback" not in err.message
    if match is not None:
        assert match.lower() in err.message.lower(), err.message
    return err


def snapshot(home: Path) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table in the home's store, read through a separate read-only connection."""
    conn = sqlite3.connect(f"file:{home / 'kms.db'}?mode=ro", uri=True)
    try:
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        return {t: sorted(conn.execute(f"SELECT * FROM {t}").fetchall()) for t in tables}
    finally:
        conn.close()


def store_bytes(home: Path) -> bytes:
    """The raw bytes of the SQLite files (database, WAL, shared memory) of a KMS home."""
    return b"".join(p.read_bytes() for p in sorted(home.glob("kms.db*")))


def sealed_versions(home: Path) -> list[tuple[str, str, bytes]]:
    """(key id, version id, sealed material) of every stored key version, oldest first."""
    conn = sqlite3.connect(f"file:{home / 'kms.db'}?mode=ro", uri=True)
    try:
        rows = conn.execute("SELECT key_id, key_version_id, sealed_material FROM key_versions ORDER BY seq")
        return [(r[0], r[1], bytes(r[2])) for r in rows]
    finally:
        conn.close()


def forge_blob(key_id: str, version_id: str | None = None, body: bytes = b"\0" * 40) -> str:
    """A well-formed blob naming ``key_id`` (and a version) whose body is not a real ciphertext."""
    version = uuid.UUID(version_id) if version_id else uuid.uuid4()
    raw = b"\x01" + uuid.UUID(key_id).bytes + version.bytes + os.urandom(12) + body
    return base64.b64encode(raw).decode("ascii")


def kmsenv_env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSENV_")}
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["KMSENV_HOME"] = str(home)
    env.update(extra)
    return env


def run_kmsenv(home: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m kmsenv <args>`` with ``KMSENV_HOME=home``."""
    return subprocess.run(
        [sys.executable, "-m", "kmsenv", *args],
        env=kmsenv_env(home, **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_kmsenv_or_kill(args: list[str], home: Path, delay: float | None, **env: str) -> int | None:
    """Run ``python -m kmsenv <args>``; ``kill -9`` it after ``delay`` seconds (None: let it
    finish). Returns its exit code, or None if it was killed (the crash tests)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsenv", *args],
        env=kmsenv_env(home, **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    if delay is None:
        return proc.wait(timeout=120)
    try:
        return proc.wait(timeout=delay)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        return None
