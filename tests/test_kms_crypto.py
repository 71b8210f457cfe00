"""Crypto Actions: Encrypt, Decrypt, GenerateDataKey(WithoutPlaintext), ReEncrypt; the
EncryptionContext as a map; the CiphertextBlob against tampering, relabelling and garbage."""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path

import pytest

from conftest import Call
from kms_helpers import expect_error, forge_blob
from kmsenv.kms.service import open_service

BLOB_FAILURES = {"InvalidCiphertext", "Forbidden.KeyNotFound", "Forbidden.KeyVersionNotFound"}


def decrypt_fails(call: Call, blob: str, **params: object) -> str:
    """Decrypt must fail with a blob error; returns the code."""
    try:
        response = call("Decrypt", CiphertextBlob=blob, **params)
    except Exception as exc:
        code = getattr(exc, "code", None)
        assert code in BLOB_FAILURES, repr(exc)
        return str(code)
    raise AssertionError(f"Decrypt succeeded: {response}")


def test_encrypt_decrypt_round_trip(call: Call, key_id: str) -> None:
    version = call("DescribeKey", KeyId=key_id)["KeyMetadata"]["PrimaryKeyVersion"]
    for text in ("hello", "ünïcödé ✓ 🔑", "x" * 6144, "é" * 3072, " leading and trailing "):
        encrypted = call("Encrypt", KeyId=key_id, Plaintext=text)
        assert set(encrypted) == {"KeyId", "KeyVersionId", "CiphertextBlob", "RequestId"}
        assert (encrypted["KeyId"], encrypted["KeyVersionId"]) == (key_id, version)
        base64.b64decode(encrypted["CiphertextBlob"], validate=True)
        decrypted = call("Decrypt", CiphertextBlob=encrypted["CiphertextBlob"])
        assert set(decrypted) == {"KeyId", "KeyVersionId", "Plaintext", "RequestId"}
        assert (decrypted["KeyId"], decrypted["KeyVersionId"], decrypted["Plaintext"]) == (key_id, version, text)
    # Same plaintext twice: different blobs (random nonce).
    first = call("Encrypt", KeyId=key_id, Plaintext="same")["CiphertextBlob"]
    assert call("Encrypt", KeyId=key_id, Plaintext="same")["CiphertextBlob"] != first


def test_encrypt_limits_and_missing(call: Call, key_id: str) -> None:
    expect_error(call, "InvalidParameter", "Encrypt", KeyId=key_id, Plaintext="x" * 6145, match="Plaintext")
    expect_error(call, "InvalidParameter", "Encrypt", KeyId=key_id, Plaintext="é" * 3073)  # 6146 UTF-8 bytes
    expect_error(call, "MissingParameter", "Encrypt", KeyId=key_id, match="Plaintext")
    expect_error(call, "MissingParameter", "Encrypt", KeyId=key_id, Plaintext="")
    expect_error(call, "MissingParameter", "Encrypt", Plaintext="p", match="KeyId")
    expect_error(call, "MissingParameter", "Decrypt", match="CiphertextBlob")
    expect_error(call, "MissingParameter", "Decrypt", CiphertextBlob="")


def test_generate_data_key_sizes(call: Call, key_id: str) -> None:
    cases = [({}, 32), ({"KeySpec": "AES_256"}, 32), ({"KeySpec": "AES_128"}, 16), ({"NumberOfBytes": 1}, 1)]
    cases += [({"NumberOfBytes": 1024}, 1024), ({"NumberOfBytes": 24, "KeySpec": "AES_128"}, 24)]
    seen = set()
    for params, size in cases:
        response = call("GenerateDataKey", KeyId=key_id, **params)
        assert set(response) == {"KeyId", "KeyVersionId", "CiphertextBlob", "Plaintext", "RequestId"}
        assert response["KeyId"] == key_id
        assert len(base64.b64decode(response["Plaintext"], validate=True)) == size
        decrypted = call("Decrypt", CiphertextBlob=response["CiphertextBlob"])
        assert decrypted["Plaintext"] == response["Plaintext"]  # exactly the base64 string
        assert decrypted["KeyVersionId"] == response["KeyVersionId"]
        seen.add(response["Plaintext"])
    assert len(seen) == len(cases)


def test_generate_data_key_without_plaintext(call: Call, key_id: str) -> None:
    for params, size in (({}, 32), ({"KeySpec": "AES_128"}, 16), ({"NumberOfBytes": 7}, 7)):
        response = call("GenerateDataKeyWithoutPlaintext", KeyId=key_id, EncryptionContext={"a": "b"}, **params)
        assert set(response) == {"KeyId", "KeyVersionId", "CiphertextBlob", "RequestId"}
        plaintext = call("Decrypt", CiphertextBlob=response["CiphertextBlob"], EncryptionContext={"a": "b"})
        assert len(base64.b64decode(plaintext["Plaintext"], validate=True)) == size


@pytest.mark.parametrize("action", ["GenerateDataKey", "GenerateDataKeyWithoutPlaintext"])
@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"NumberOfBytes": "0"}, "NumberOfBytes"),
        ({"NumberOfBytes": "1025"}, "NumberOfBytes"),
        ({"NumberOfBytes": "-5"}, "NumberOfBytes"),
        ({"NumberOfBytes": "32 bytes"}, "NumberOfBytes"),
        ({"NumberOfBytes": "3.5"}, "NumberOfBytes"),
        ({"KeySpec": "AES_192"}, "KeySpec"),
        ({"KeySpec": "Aliyun_AES_256"}, "KeySpec"),
        ({"EncryptionContext": "[1]"}, "EncryptionContext"),
    ],
)
def test_generate_data_key_bad_parameters(
    call: Call, key_id: str, action: str, params: dict[str, str], param: str
) -> None:
    expect_error(call, "InvalidParameter", action, KeyId=key_id, match=param, **params)


def test_generate_data_key_unknown_key(call: Call) -> None:
    expect_error(call, "Forbidden.KeyNotFound", "GenerateDataKey", KeyId=str(uuid.uuid4()))
    expect_error(call, "Forbidden.AliasNotFound", "GenerateDataKey", KeyId="alias/nope")
    expect_error(call, "MissingParameter", "GenerateDataKeyWithoutPlaintext", match="KeyId")


# -- EncryptionContext ------------------------------------------------------------------------

CONTEXT = {"project": "apollo", "file": "ünï/✓", "a": "1"}
SAME_CONTEXT_SPELLINGS = [
    json.dumps(CONTEXT),  # json.dumps: spaces and \u escapes
    json.dumps(CONTEXT, ensure_ascii=False, separators=(",", ":")),  # Tea SDK: compact, raw UTF-8
    json.dumps(dict(reversed(list(CONTEXT.items())))),  # another key order
    '{\n  "a" : "1",\n\t"file":"\\u00fcn\\u00ef/\\u2713",  "project":"apollo"}',
]


@pytest.mark.parametrize("encrypt_with", SAME_CONTEXT_SPELLINGS)
@pytest.mark.parametrize("decrypt_with", SAME_CONTEXT_SPELLINGS)
def test_context_compared_as_a_map(call: Call, key_id: str, encrypt_with: str, decrypt_with: str) -> None:
    blob = call("Encrypt", KeyId=key_id, Plaintext="secret", EncryptionContext=encrypt_with)["CiphertextBlob"]
    assert call("Decrypt", CiphertextBlob=blob, EncryptionContext=decrypt_with)["Plaintext"] == "secret"


@pytest.mark.parametrize(
    "wrong",
    [
        None,  # missing
        {"project": "apollo", "file": "ünï/✓"},  # a key missing
        {**CONTEXT, "extra": "x"},  # an extra key
        {**CONTEXT, "a": "2"},  # a different value
        {**CONTEXT, "a": "1 "},
        {"Project": "apollo", "file": "ünï/✓", "a": "1"},  # key case
    ],
)
def test_wrong_context_is_invalid_ciphertext(call: Call, key_id: str, wrong: dict[str, str] | None) -> None:
    for action in ("Encrypt", "GenerateDataKey"):
        params = {"Plaintext": "p"} if action == "Encrypt" else {}
        blob = call(action, KeyId=key_id, EncryptionContext=CONTEXT, **params)["CiphertextBlob"]
        extra = {} if wrong is None else {"EncryptionContext": wrong}
        expect_error(call, "InvalidCiphertext", "Decrypt", CiphertextBlob=blob, match="EncryptionContext", **extra)


def test_context_given_only_on_decrypt_fails(call: Call, key_id: str) -> None:
    blob = call("Encrypt", KeyId=key_id, Plaintext="p")["CiphertextBlob"]
    expect_error(call, "InvalidCiphertext", "Decrypt", CiphertextBlob=blob, EncryptionContext={"a": "b"})
    # An empty map is no context at all, on either side.
    assert call("Decrypt", CiphertextBlob=blob, EncryptionContext="{}")["Plaintext"] == "p"
    blob = call("Encrypt", KeyId=key_id, Plaintext="p", EncryptionContext="{}")["CiphertextBlob"]
    assert call("Decrypt", CiphertextBlob=blob)["Plaintext"] == "p"


@pytest.mark.parametrize(
    "context",
    [
        "not json",
        "[]",
        '"a string"',
        "null",
        "42",
        '{"a": 1}',
        '{"a": null}',
        '{"a": ["b"]}',
        '{"a": {"b": "c"}}',
        '{"": "empty key"}',
        '{"a": "1", "a": "2"}',  # duplicate key: ambiguous
        '{"a": "\\ud800"}',  # a lone surrogate has no UTF-8 form
        json.dumps({"k": "v" * 8200}),
    ],
)
def test_malformed_context_is_invalid_parameter(call: Call, key_id: str, context: str) -> None:
    expect_error(call, "InvalidParameter", "Encrypt", KeyId=key_id, Plaintext="p", EncryptionContext=context)
    blob = call("Encrypt", KeyId=key_id, Plaintext="p")["CiphertextBlob"]
    expect_error(call, "InvalidParameter", "Decrypt", CiphertextBlob=blob, EncryptionContext=context)


# -- CiphertextBlob ---------------------------------------------------------------------------


def test_every_flipped_byte_fails(call: Call, key_id: str) -> None:
    blob = call("Encrypt", KeyId=key_id, Plaintext="hi", EncryptionContext={"c": "d"})["CiphertextBlob"]
    raw = base64.b64decode(blob)
    assert len(raw) == 1 + 16 + 16 + 12 + 2 + 16
    codes = set()
    for position in range(len(raw)):
        for mask in (0x01, 0x80):
            tampered = bytearray(raw)
            tampered[position] ^= mask
            codes.add(decrypt_fails(call, base64.b64encode(tampered).decode(), EncryptionContext={"c": "d"}))
    assert "InvalidCiphertext" in codes
    assert call("Decrypt", CiphertextBlob=blob, EncryptionContext={"c": "d"})["Plaintext"] == "hi"


def test_relabelled_blob_fails(call: Call, key_id: str) -> None:
    other = call("CreateKey")["KeyMetadata"]["KeyId"]
    old_version = call("DescribeKey", KeyId=key_id)["KeyMetadata"]["PrimaryKeyVersion"]
    blob = base64.b64decode(call("Encrypt", KeyId=key_id, Plaintext="p")["CiphertextBlob"])
    new_version = call("CreateKeyVersion", KeyId=key_id)["KeyVersion"]["KeyVersionId"]
    other_version = call("DescribeKey", KeyId=other)["KeyMetadata"]["PrimaryKeyVersion"]

    def relabel(key: str, version: str) -> str:
        return base64.b64encode(b"\x01" + uuid.UUID(key).bytes + uuid.UUID(version).bytes + blob[33:]).decode()

    assert call("Decrypt", CiphertextBlob=relabel(key_id, old_version))["Plaintext"] == "p"
    expect_error(call, "InvalidCiphertext", "Decrypt", CiphertextBlob=relabel(key_id, new_version))
    expect_error(call, "InvalidCiphertext", "Decrypt", CiphertextBlob=relabel(other, other_version))
    # A version of another key named under this key: that version is not this key's.
    expect_error(call, "Forbidden.KeyVersionNotFound", "Decrypt", CiphertextBlob=relabel(key_id, other_version))
    expect_error(call, "Forbidden.KeyVersionNotFound", "Decrypt", CiphertextBlob=relabel(other, old_version))
    expect_error(call, "Forbidden.KeyVersionNotFound", "Decrypt", CiphertextBlob=forge_blob(key_id))


@pytest.mark.parametrize(
    "blob",
    [
        "!!!not base64!!!",
        "QUJD",  # valid base64, 3 bytes
        "QUJD\n",
        "ü",
        base64.b64encode(b"\x01" * 44).decode(),  # one byte short of the smallest blob
        base64.b64encode(b"\x02" + bytes(60)).decode(),  # unknown layout version
        base64.b64encode(bytes(61)).decode(),
        "A" * 30000,  # far too long
    ],
)
def test_garbage_blobs(call: Call, blob: str) -> None:
    expect_error(call, "InvalidCiphertext", "Decrypt", CiphertextBlob=blob, match="CiphertextBlob")


def test_truncated_and_extended_blobs(call: Call, key_id: str) -> None:
    raw = base64.b64decode(call("Encrypt", KeyId=key_id, Plaintext="some text")["CiphertextBlob"])
    for cut in (1, 5, 16, len(raw) - 45, len(raw) - 1):
        expect_error(call, "InvalidCiphertext", "Decrypt", CiphertextBlob=base64.b64encode(raw[:-cut]).decode())
    expect_error(call, "InvalidCiphertext", "Decrypt", CiphertextBlob=base64.b64encode(raw + b"\0").decode())


def test_blob_from_another_kms_is_unknown(call: Call, tmp_path: Path) -> None:
    other = open_service(tmp_path / "elsewhere", announce=False)
    try:
        foreign_key = other.create_key()["KeyMetadata"]["KeyId"]
        blob = other.encrypt(key_id=foreign_key, plaintext="p")["CiphertextBlob"]
    finally:
        other.close()
    expect_error(call, "Forbidden.KeyNotFound", "Decrypt", CiphertextBlob=blob, match=foreign_key)


# -- ReEncrypt --------------------------------------------------------------------------------


def test_re_encrypt(call: Call, key_id: str) -> None:
    destination = call("CreateKey")["KeyMetadata"]
    call("CreateAlias", AliasName="alias/dest", KeyId=destination["KeyId"])
    generated = call("GenerateDataKey", KeyId=key_id, EncryptionContext={"s": "1"})
    response = call(
        "ReEncrypt",
        CiphertextBlob=generated["CiphertextBlob"],
        DestinationKeyId="alias/dest",
        SourceEncryptionContext='{"s":"1"}',
        DestinationEncryptionContext={"d": "2"},
        SourceKeyId=key_id,
        SourceKeyVersionId=generated["KeyVersionId"],
    )
    assert set(response) == {"KeyId", "KeyVersionId", "CiphertextBlob", "RequestId"}
    assert (response["KeyId"], response["KeyVersionId"]) == (destination["KeyId"], destination["PrimaryKeyVersion"])
    decrypted = call("Decrypt", CiphertextBlob=response["CiphertextBlob"], EncryptionContext={"d": "2"})
    assert decrypted["Plaintext"] == generated["Plaintext"]
    assert decrypted["KeyId"] == destination["KeyId"]
    expect_error(call, "InvalidCiphertext", "Decrypt", CiphertextBlob=response["CiphertextBlob"])
    expect_error(
        call, "InvalidCiphertext", "Decrypt", CiphertextBlob=response["CiphertextBlob"], EncryptionContext={"s": "1"}
    )
    # To the same key (e.g. onto a newer version), without contexts.
    plain = call("Encrypt", KeyId=key_id, Plaintext="p")["CiphertextBlob"]
    again = call("ReEncrypt", CiphertextBlob=plain, DestinationKeyId=key_id)
    assert call("Decrypt", CiphertextBlob=again["CiphertextBlob"])["Plaintext"] == "p"


def test_re_encrypt_errors(call: Call, key_id: str) -> None:
    other = call("CreateKey")["KeyMetadata"]["KeyId"]
    blob = call("Encrypt", KeyId=key_id, Plaintext="p", EncryptionContext={"s": "1"})["CiphertextBlob"]
    ok = {"CiphertextBlob": blob, "DestinationKeyId": other, "SourceEncryptionContext": {"s": "1"}}
    expect_error(call, "InvalidCiphertext", "ReEncrypt", **{**ok, "SourceEncryptionContext": {"s": "2"}})
    expect_error(call, "InvalidCiphertext", "ReEncrypt", CiphertextBlob=blob, DestinationKeyId=other)
    expect_error(call, "InvalidParameter", "ReEncrypt", **ok, SourceKeyId=other, match="SourceKeyId")
    expect_error(call, "InvalidParameter", "ReEncrypt", **ok, SourceKeyVersionId=str(uuid.uuid4()))
    expect_error(call, "Forbidden.KeyNotFound", "ReEncrypt", **{**ok, "DestinationKeyId": str(uuid.uuid4())})
    expect_error(call, "MissingParameter", "ReEncrypt", CiphertextBlob=blob, match="DestinationKeyId")
    expect_error(call, "MissingParameter", "ReEncrypt", DestinationKeyId=other, match="CiphertextBlob")
    expect_error(call, "InvalidParameter", "ReEncrypt", **ok, DestinationEncryptionContext="[]")
    expect_error(call, "InvalidCiphertext", "ReEncrypt", **{**ok, "CiphertextBlob": "QUJD"})


def test_plaintext_must_be_text(call: Call, key_id: str) -> None:
    for bad in ("\ud800", "a\udcffb"):  # a lone surrogate; an undecodable argv byte (surrogateescape)
        expect_error(call, "InvalidParameter", "Encrypt", KeyId=key_id, Plaintext=bad, match="Plaintext")


# -- DryRun -----------------------------------------------------------------------------------


def test_dry_run_checks_everything_and_uses_no_key(call: Call, key_id: str) -> None:
    blob = call("GenerateDataKey", KeyId=key_id)["CiphertextBlob"]
    for action, params in (
        ("Encrypt", {"KeyId": key_id, "Plaintext": "secret"}),
        ("GenerateDataKey", {"KeyId": key_id}),
        ("GenerateDataKeyWithoutPlaintext", {"KeyId": key_id}),
        ("Decrypt", {"CiphertextBlob": blob}),
        ("ReEncrypt", {"CiphertextBlob": blob, "DestinationKeyId": key_id}),
    ):
        err = expect_error(call, "DryRunOperation", action, DryRun="true", **params)
        assert err.http_status == 412
        # DryRun=false is an ordinary call.
        assert "RequestId" in call(action, DryRun="false", **params)
    # The checks still run before the dry-run stop: parameters, key, state.
    expect_error(call, "InvalidParameter", "GenerateDataKey", KeyId=key_id, NumberOfBytes="0", DryRun="true")
    expect_error(call, "Forbidden.KeyNotFound", "Encrypt", KeyId=str(uuid.uuid4()), Plaintext="x", DryRun="true")
    call("DisableKey", KeyId=key_id)
    expect_error(call, "Rejected.Disabled", "Decrypt", CiphertextBlob=blob, DryRun="true")


def test_invalid_key_spec_is_refused_even_with_number_of_bytes(call: Call, key_id: str) -> None:
    expect_error(call, "InvalidParameter", "GenerateDataKey", KeyId=key_id, KeySpec="AES_512", NumberOfBytes="16")
