"""The remote KMS path (official Tea SDK + Alibaba credential chain) against a real kmsenv server:
``AlibabaKms`` implements the ``Kms`` protocol, ``kmsenv kms --endpoint`` runs any Action, error
codes arrive unchanged, and plain http is refused off loopback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsenv.clients import AlibabaKms, EmbeddedKms, Kms
from kmsenv.errors import ConfigError, KmsError, UsageError
from test_server_harness import Server, shared_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server() -> Server:
    return shared_server()


@pytest.fixture
def remote(server: Server, monkeypatch: pytest.MonkeyPatch) -> Iterator[AlibabaKms]:
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", server.access_key_id)
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", server.secret)
    kms = AlibabaKms(server.endpoint, insecure_http=True)
    yield kms
    kms.close()


def new_key(kms: AlibabaKms) -> str:
    return str(kms.call("CreateKey", {"Description": "remote test"})["KeyMetadata"]["KeyId"])


def test_protocol_round_trip(remote: AlibabaKms, server: Server) -> None:
    assert isinstance(remote, Kms)
    key_id, other = new_key(remote), new_key(remote)
    context = {"project": "apollo", "file": "ünï ✓"}
    data_key = remote.generate_data_key(key_id, encryption_context=context)
    assert len(data_key.plaintext) == 32
    arn = remote.call("DescribeKey", {"KeyId": key_id})["KeyMetadata"]["Arn"]
    assert data_key.wrapped.key_arn == arn and data_key.wrapped.key_id == key_id
    assert data_key.plaintext.hex() not in repr(data_key)

    unwrapped = remote.decrypt_data_key(data_key.wrapped.ciphertext_blob, encryption_context=context)
    assert (unwrapped.key_id, unwrapped.plaintext) == (key_id, data_key.plaintext)

    # Wrap the same data key under a second CMK, and re-wrap the first blob to it.
    second = remote.encrypt_data_key(other, data_key.plaintext, encryption_context=context)
    assert remote.decrypt_data_key(second.ciphertext_blob, encryption_context=context).plaintext == data_key.plaintext
    moved = remote.re_encrypt_data_key(
        data_key.wrapped.ciphertext_blob,
        destination_key_id=other,
        source_encryption_context=context,
        destination_encryption_context={"moved": "yes"},
    )
    assert moved.key_id == other
    back = remote.decrypt_data_key(moved.ciphertext_blob, encryption_context={"moved": "yes"})
    assert back.plaintext == data_key.plaintext

    # The server's own embedded KMS opens what the remote path wrapped: one key model.
    with EmbeddedKms(server.home) as local:
        assert local.decrypt_data_key(second.ciphertext_blob, encryption_context=context).plaintext == (
            data_key.plaintext
        )


def test_error_codes_arrive_unchanged(remote: AlibabaKms) -> None:
    key_id = new_key(remote)
    blob = remote.generate_data_key(key_id, encryption_context={"a": "b"}).wrapped.ciphertext_blob
    with pytest.raises(KmsError) as info:
        remote.decrypt_data_key(blob, encryption_context={"a": "c"})
    assert info.value.code == "InvalidCiphertext"
    remote.call("DisableKey", {"KeyId": key_id})
    with pytest.raises(KmsError) as info:
        remote.generate_data_key(key_id, encryption_context={})
    assert info.value.code == "Rejected.Disabled"
    with pytest.raises(KmsError) as info:
        remote.call("DescribeKey", {"KeyId": "alias/does-not-exist"})
    assert info.value.code == "Forbidden.AliasNotFound"
    assert "alias/does-not-exist" in info.value.message


def test_wrong_secret_is_an_auth_error(server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", server.access_key_id)
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "not-the-secret")
    with pytest.raises(KmsError) as info:
        AlibabaKms(server.endpoint, insecure_http=True).call("ListKeys", {})
    assert info.value.code == "SignatureDoesNotMatch"


def test_plain_http_only_to_loopback() -> None:
    with pytest.raises(UsageError, match="loopback"):
        AlibabaKms("192.0.2.1:8080", insecure_http=True)
    with pytest.raises(UsageError, match="plain http") as info:
        AlibabaKms("http://127.0.0.1:8080")
    assert "--insecure-http" in (info.value.hint or "")


def test_no_credentials_is_a_config_error(server: Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("ALIBABA_CLOUD_ACCESS_KEY_ID", "ALIBABA_CLOUD_ACCESS_KEY_SECRET", "ALIBABA_CLOUD_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.aliyun/config.json, no credentials file
    with pytest.raises(ConfigError, match="credentials"):
        AlibabaKms(server.endpoint, insecure_http=True).call("ListKeys", {})


def test_cli_kms_endpoint_runs_actions_remotely(server: Server, tmp_path: Path) -> None:
    env = {
        **os.environ,
        "KMSENV_HOME": str(tmp_path / "unused"),
        "ALIBABA_CLOUD_ACCESS_KEY_ID": server.access_key_id,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": server.secret,
    }
    remote = ["--endpoint", server.endpoint, "--insecure-http"]

    def kms(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kmsenv", "kms", *args, *remote],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    created = kms("CreateKey", "--Description", "via cli")
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout)["KeyMetadata"]["KeyId"]
    alias = f"alias/remote/{key_id[:8]}"
    assert kms("CreateAlias", "--AliasName", alias, "--KeyId", key_id).returncode == 0
    generated = json.loads(kms("GenerateDataKey", "--KeyId", alias, "--EncryptionContext", '{"k":"v"}').stdout)
    decrypted = kms("Decrypt", "--CiphertextBlob", generated["CiphertextBlob"], "--EncryptionContext", '{ "k": "v" }')
    assert json.loads(decrypted.stdout)["Plaintext"] == generated["Plaintext"]
    # Errors: the server's Code and Message on stderr, exit 3, nothing on stdout.
    failed = kms("DescribeKey", "--KeyId", "alias/nope")
    assert (failed.returncode, failed.stdout) == (3, "")
    assert "Forbidden.AliasNotFound" in failed.stderr and "Traceback" not in failed.stderr
    # The local home was never touched.
    assert not (tmp_path / "unused").exists()


def test_region_alone_selects_alibaba_cloud(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import argparse

    from kmsenv.cli._kms_options import add_kms_options, open_kms

    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("ALIBABA_CLOUD_ACCESS_KEY_SECRET", "secret")
    monkeypatch.setenv("KMSENV_HOME", str(tmp_path / "home"))
    parser = argparse.ArgumentParser()
    add_kms_options(parser)
    kms = open_kms(parser.parse_args(["--region", "cn-shanghai"]))  # builds the client; no call is made
    assert isinstance(kms, AlibabaKms)
    assert kms.api.endpoint == "kms.cn-shanghai.aliyuncs.com"
    local = open_kms(parser.parse_args([]))
    assert isinstance(local, EmbeddedKms)
    local.close()
