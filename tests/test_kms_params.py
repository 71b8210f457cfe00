"""The wire door: the Action table, ``dispatch`` string parsing (ints, booleans, JSON, missing and
unknown parameters), RequestId, and the HTTP status of every error code the service emits."""

from __future__ import annotations

import base64
import inspect
import re
import uuid
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import Call
from kms_helpers import EXPECTED_STATUS, expect_error
from kmsenv.errors import KmsError
from kmsenv.kms.actions import ACTIONS, dispatch
from kmsenv.kms.service import KmsService

#: The Actions the issue asks for.
REQUIRED_ACTIONS = {
    "CreateKey", "DescribeKey", "ListKeys", "UpdateKeyDescription", "EnableKey", "DisableKey",
    "ScheduleKeyDeletion", "CancelKeyDeletion", "SetDeletionProtection", "CreateAlias", "UpdateAlias",
    "DeleteAlias", "ListAliases", "ListAliasesByKeyId", "Encrypt", "Decrypt", "GenerateDataKey",
    "GenerateDataKeyWithoutPlaintext", "ReEncrypt", "CreateKeyVersion", "DescribeKeyVersion", "ListKeyVersions",
    "UpdateRotationPolicy",
}  # fmt: skip


def test_every_action_is_in_the_table_with_a_handler() -> None:
    assert set(ACTIONS) >= REQUIRED_ACTIONS
    for action in ACTIONS.values():
        handler = getattr(KmsService, action.method)
        keywords = set(inspect.signature(handler).parameters) - {"self"}
        assert {p.attr for p in action.params} == keywords, action.name


def test_reference_parameter_names() -> None:
    """Request parameter names from alibaba-kms-wire.md §9 (core operations)."""
    expected = {
        "CreateKey": {"Description", "KeySpec", "KeyUsage", "Origin", "ProtectionLevel", "EnableAutomaticRotation"}
        | {"RotationInterval", "Tags"},
        "CreateAlias": {"AliasName", "KeyId"},
        "UpdateAlias": {"AliasName", "KeyId"},
        "GenerateDataKey": {"KeyId", "KeySpec", "NumberOfBytes", "EncryptionContext", "DryRun"},
        "Encrypt": {"KeyId", "Plaintext", "EncryptionContext", "DryRun"},
        "Decrypt": {"CiphertextBlob", "EncryptionContext", "DryRun"},
        "ReEncrypt": {"CiphertextBlob", "SourceEncryptionContext", "DestinationKeyId", "DryRun"}
        | {"DestinationEncryptionContext", "SourceKeyId", "SourceKeyVersionId"},
        "DescribeKey": {"KeyId"},
        "ListKeys": {"PageNumber", "PageSize", "Filters"},
        "ScheduleKeyDeletion": {"KeyId", "PendingWindowInDays"},
        "UpdateRotationPolicy": {"KeyId", "EnableAutomaticRotation", "RotationInterval"},
    }
    for name, params in expected.items():
        assert {p.name for p in ACTIONS[name].params} == params, name
    assert "KeyId" not in {p.name for p in ACTIONS["Decrypt"].params}


def test_unknown_action(call: Call) -> None:
    expect_error(call, "InvalidApi.NotFound", "AsymmetricSign", match="AsymmetricSign")
    expect_error(call, "InvalidApi.NotFound", "createkey")


def test_request_ids_are_fresh_uuids(call: Call) -> None:
    ids = {call("ListKeys")["RequestId"] for _ in range(5)}
    assert len(ids) == 5
    for request_id in ids:
        uuid.UUID(request_id)


def test_unknown_and_common_parameters_are_ignored(call: Call) -> None:
    response = call("CreateKey", RegionId="cn-hangzhou", Format="JSON", Version="2016-01-20", Bogus="x", DryRun="x")
    assert response["KeyMetadata"]["KeyState"] == "Enabled"


@pytest.mark.parametrize(("text", "value"), [("True", True), ("true", True), ("FALSE", False), (" false ", False)])
def test_booleans_are_case_insensitive(call: Call, key_id: str, text: str, value: bool) -> None:
    call("SetDeletionProtection", KeyId=key_id, EnableDeletionProtection=text)
    expected = "Enabled" if value else "Disabled"
    assert call("DescribeKey", KeyId=key_id)["KeyMetadata"]["DeletionProtection"] == expected


@pytest.mark.parametrize("text", ["1", "0", "yes", "no", "t", "Truee", "none"])
def test_bad_booleans(call: Call, key_id: str, text: str) -> None:
    expect_error(
        call,
        "InvalidParameter",
        "UpdateRotationPolicy",
        KeyId=key_id,
        EnableAutomaticRotation=text,
        match='"EnableAutomaticRotation"',
    )


@pytest.mark.parametrize("text", ["32", " 32", "032"])
def test_integers(call: Call, key_id: str, text: str) -> None:
    assert len(call("GenerateDataKey", KeyId=key_id, NumberOfBytes=text)["Plaintext"]) == 44


@pytest.mark.parametrize("text", ["0x20", "1e3", "32.0", "+32", "3 2", "1_0", "٣٢", "9" * 19])
def test_bad_integers(call: Call, key_id: str, text: str) -> None:
    err = expect_error(call, "InvalidParameter", "GenerateDataKey", KeyId=key_id, NumberOfBytes=text)
    assert err.message.startswith('The specified parameter "NumberOfBytes" is not valid.')


def test_empty_typed_values_count_as_absent(call: Call, key_id: str) -> None:
    assert len(call("GenerateDataKey", KeyId=key_id, NumberOfBytes="", EncryptionContext="")["Plaintext"]) == 44
    assert call("ListKeys", PageNumber="", PageSize="", Filters="")["PageSize"] == 10
    expect_error(call, "MissingParameter", "UpdateRotationPolicy", KeyId=key_id, EnableAutomaticRotation="")


@pytest.mark.parametrize("action", sorted(ACTIONS))
def test_every_required_parameter_is_enforced(service: KmsService, kms_home: Path, action: str) -> None:
    from kms_helpers import snapshot

    required = [p.name for p in ACTIONS[action].params if p.required]
    before = snapshot(kms_home)
    for name in required:
        # Everything else present (with junk values), just this one missing.
        params = {p.name: "x" for p in ACTIONS[action].params if p.required and p.name != name}
        with pytest.raises(KmsError) as info:
            dispatch(service, action, params)
        assert info.value.code == "MissingParameter", (name, info.value)
        assert info.value.message == f'The parameter "{name}" is needed but not provided.'
        assert info.value.http_status == 400
    assert snapshot(kms_home) == before


def test_typed_methods_take_python_values(service: KmsService) -> None:
    tags = [{"TagKey": "team", "TagValue": "apollo"}]
    key = service.create_key(tags=tags, enable_automatic_rotation=False)["KeyMetadata"]["KeyId"]
    blob = service.encrypt(key_id=key, plaintext="p", encryption_context={"b": "2", "a": "1"})["CiphertextBlob"]
    assert service.decrypt(ciphertext_blob=blob, encryption_context='{"a":"1","b":"2"}')["Plaintext"] == "p"
    assert "RequestId" not in service.describe_key(key_id=key)  # the door adds it, not the handler
    with pytest.raises(KmsError) as info:
        service.encrypt(key_id=key, plaintext="p", encryption_context={"a": 1})  # type: ignore[dict-item]
    assert info.value.code == "InvalidParameter"


def emitted_codes() -> set[str]:
    source_dir = Path(__import__("kmsenv.kms", fromlist=["x"]).__file__).parent
    codes = set()
    for path in source_dir.glob("*.py"):
        text = path.read_text("utf-8")
        codes |= set(re.findall(r'KmsError\(\s*"([A-Za-z][A-Za-z.]+)"', text))
        codes |= set(re.findall(r'^\s*"[A-Za-z]+": "(Rejected\.[A-Za-z]+)"', text, re.MULTILINE))
    return codes


def test_every_emitted_code_has_the_reference_http_status() -> None:
    codes = emitted_codes() | {"MissingParameter", "InvalidParameter"}
    assert {"Forbidden.KeyNotFound", "InvalidCiphertext", "Rejected.Disabled", "AliasAlreadyExists"} <= codes
    for code in codes:
        assert code in EXPECTED_STATUS, f"{code} is not a code the reference lists"
        assert KmsError(code, "m").http_status == EXPECTED_STATUS[code], code


def test_retryable_codes_are_the_ones_alibaba_clients_retry() -> None:
    retried = {"Rejected.Throttling", "ServiceUnavailableTemporary", "InternalFailure"}
    for code in [*EXPECTED_STATUS, "Rejected.Throttling"]:
        assert KmsError(code, "m").retryable == (code in retried)


JUNK = {"int": "1", "bool": "true", "str": "x", "json": "x"}
PARAMS = [(a.name, p.name) for a in ACTIONS.values() for p in a.params]


@pytest.mark.parametrize(("action", "param"), PARAMS, ids=[f"{a}.{p}" for a, p in PARAMS])
def test_values_that_are_not_text_are_invalid(service: KmsService, action: str, param: str) -> None:
    """A lone surrogate (an undecodable byte in a command-line argument) in any parameter."""
    params = {p.name: JUNK[p.kind] for p in ACTIONS[action].params}
    params[param] = "a\udcffb"
    with pytest.raises(KmsError) as info:
        dispatch(service, action, params)
    assert (info.value.code, info.value.message) == (
        "InvalidParameter",
        f'The specified parameter "{param}" is not valid. It must be valid Unicode text.',
    )


@pytest.mark.parametrize(
    ("action", "param"), [("ListKeys", "Filters"), ("CreateKey", "Tags"), ("Decrypt", "EncryptionContext")]
)
def test_deeply_nested_json_is_invalid(call: Call, action: str, param: str) -> None:
    extra = {"CiphertextBlob": "QUJD"} if action == "Decrypt" else {}
    expect_error(call, "InvalidParameter", action, match=param, **{param: "[" * 100_000}, **extra)
    expect_error(call, "InvalidParameter", action, match=param, **{param: '{"a":' * 50_000}, **extra)


INTERESTING = st.sampled_from(
    [
        *("", " ", "0", "-1", "7", "1025", "9" * 30, "true", "False", "{}", "[]", "null", '{"a":"b"}', "7d"),
        *("alias/x", "acs:kms:cn-hangzhou:1:key/x", "acs:kms:::", "QUJD", "\x00", "é", "\ud800"),
        base64.b64encode(b"\x01" * 60).decode(),
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_string_parameters_give_a_result_or_a_kms_error(service: KmsService, data: st.DataObject) -> None:
    action = data.draw(st.sampled_from(sorted(ACTIONS)))
    names = [p.name for p in ACTIONS[action].params]
    params = (
        data.draw(st.dictionaries(st.sampled_from(names), st.one_of(INTERESTING, st.text(max_size=40))))
        if names
        else {}
    )
    try:
        response = dispatch(service, action, params)
    except KmsError as exc:
        assert exc.code in EXPECTED_STATUS and exc.message
    else:
        uuid.UUID(response["RequestId"])
