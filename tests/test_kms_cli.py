"""``kmsenv kms <Action> --<Param> value``: help, the reference flow, errors on stderr with exit 3,
the first-use notice. Run as real subprocesses (``python -m kmsenv``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from kms_helpers import kmsenv_env, run_kmsenv
from kmsenv.kms.actions import ACTIONS


def ok(home: Path, *args: str, **env: str) -> tuple[dict[str, Any], str]:
    result = run_kmsenv(home, "kms", *args, **env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout), result.stderr


def fails(home: Path, *args: str, code: str, exit_code: int = 3, **env: str) -> str:
    result = run_kmsenv(home, "kms", *args, **env)
    assert result.returncode == exit_code, (result.returncode, result.stderr)
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    assert code in result.stderr
    return result.stderr


def test_kms_help_lists_every_action(tmp_path: Path) -> None:
    result = run_kmsenv(tmp_path / "unused", "kms", "--help")
    assert result.returncode == 0
    for name in ACTIONS:
        assert name in result.stdout
    assert not (tmp_path / "unused").exists()  # help creates no KMS home


def test_action_help_lists_its_parameters(tmp_path: Path) -> None:
    for action in ("CreateKey", "GenerateDataKey", "ReEncrypt"):
        result = run_kmsenv(tmp_path / "unused", "kms", action, "--help")
        assert result.returncode == 0
        for param in ACTIONS[action].params:
            assert f"--{param.name}" in result.stdout
    assert not (tmp_path / "unused").exists()


def test_reference_flow(tmp_path: Path) -> None:
    home = tmp_path / "home"
    created, notice = ok(home, "CreateKey", "--Description", "Apollo work key")
    assert "created a new embedded KMS" in notice and str(home) in notice
    key = created["KeyMetadata"]["KeyId"]
    assert created["KeyMetadata"]["Description"] == "Apollo work key" and created["RequestId"]

    aliased, notice = ok(home, "CreateAlias", "--AliasName", "alias/Apollo/WorkKey", "--KeyId", key)
    assert set(aliased) == {"RequestId"}
    assert notice == ""  # the notice is printed once, on first use

    context = '{"project": "apollo", "file": "ünï"}'
    generated, _ = ok(
        home,
        "GenerateDataKey",
        "--KeyId",
        "alias/Apollo/WorkKey",
        "--KeySpec",
        "AES_256",
        "--EncryptionContext",
        context,
    )
    assert generated["KeyId"] == key
    decrypted, _ = ok(
        home,
        "Decrypt",
        "--CiphertextBlob",
        generated["CiphertextBlob"],
        "--EncryptionContext",
        '{"file":"ünï","project":"apollo"}',
    )
    assert decrypted["Plaintext"] == generated["Plaintext"]
    assert (decrypted["KeyId"], decrypted["KeyVersionId"]) == (key, generated["KeyVersionId"])

    encrypted, _ = ok(home, "Encrypt", "--KeyId", key, "--Plaintext", "héllo wörld")
    assert ok(home, "Decrypt", "--CiphertextBlob", encrypted["CiphertextBlob"])[0]["Plaintext"] == "héllo wörld"
    listed, _ = ok(home, "ListAliases", "--PageSize", "5")
    assert listed["Aliases"]["Alias"][0]["AliasName"] == "alias/Apollo/WorkKey"
    assert listed["PageSize"] == 5


def test_errors_go_to_stderr_with_code_and_message(tmp_path: Path) -> None:
    home = tmp_path / "home"
    stderr = fails(home, "DescribeKey", "--KeyId", "alias/missing", code="Forbidden.AliasNotFound")
    assert "The specified Alias is not found: alias/missing" in stderr
    key = ok(home, "CreateKey")[0]["KeyMetadata"]["KeyId"]
    stderr = fails(home, "GenerateDataKey", "--KeyId", key, "--NumberOfBytes", "2000", code="InvalidParameter")
    assert 'The specified parameter "NumberOfBytes" is not valid.' in stderr
    fails(home, "UpdateRotationPolicy", "--KeyId", key, "--EnableAutomaticRotation", "maybe", code="InvalidParameter")
    fails(home, "Decrypt", "--CiphertextBlob", "bm90IGEgYmxvYg==", code="InvalidCiphertext")
    ok(home, "DisableKey", "--KeyId", key)
    stderr = fails(home, "GenerateDataKey", "--KeyId", key, code="Rejected.Disabled")
    assert key in stderr


def test_missing_required_parameter_is_missing_parameter(tmp_path: Path) -> None:
    stderr = fails(tmp_path / "home", "ScheduleKeyDeletion", "--KeyId", "k", code="MissingParameter")
    assert 'The parameter "PendingWindowInDays" is needed but not provided.' in stderr
    help_text = run_kmsenv(tmp_path / "home", "kms", "ScheduleKeyDeletion", "--help").stdout
    assert "(required)" in help_text


@pytest.mark.parametrize(
    ("setup", "match"),
    [("missing-root-key", "root key"), ("newer-schema", "newer")],
)
def test_configuration_errors_exit_9(tmp_path: Path, setup: str, match: str) -> None:
    import sqlite3

    home = tmp_path / "home"
    ok(home, "CreateKey")
    if setup == "missing-root-key":
        (home / "root.key").unlink()
    else:
        conn = sqlite3.connect(home / "kms.db")
        with conn:
            conn.execute("UPDATE meta SET value = '999' WHERE name = 'schema_version'")
        conn.close()
    stderr = fails(home, "ListKeys", code="error", exit_code=9)
    assert match in stderr


def test_undecodable_plaintext_argument_is_refused(tmp_path: Path) -> None:
    home = tmp_path / "home"
    key = ok(home, "CreateKey")[0]["KeyMetadata"]["KeyId"]
    result = subprocess.run(
        [sys.executable, "-m", "kmsenv", "kms", "Encrypt", "--KeyId", key, "--Plaintext", b"a\xffb"],
        env=kmsenv_env(home, PYTHONIOENCODING="utf-8"),
        capture_output=True,
        check=False,
    )
    assert (result.returncode, result.stdout) == (3, b"")
    assert b"InvalidParameter" in result.stderr and b"Traceback" not in result.stderr
