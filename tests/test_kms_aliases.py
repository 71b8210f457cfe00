"""Aliases (CreateAlias, UpdateAlias, DeleteAlias, ListAliases, ListAliasesByKeyId) and how every
Action that takes a KeyId resolves a key id, key ARN, alias name or alias ARN."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from conftest import Call
from kms_helpers import expect_error, snapshot


def aliases_of(call: Call, key: str) -> list[str]:
    return [a["AliasName"] for a in call("ListAliasesByKeyId", KeyId=key)["Aliases"]["Alias"]]


def test_create_alias_and_list(call: Call, key_id: str) -> None:
    assert set(call("CreateAlias", AliasName="alias/Apollo/WorkKey", KeyId=key_id)) == {"RequestId"}
    arn = call("DescribeKey", KeyId=key_id)["KeyMetadata"]["Arn"]
    expected_alias_arn = arn.replace(f"key/{key_id}", "alias/Apollo/WorkKey")
    listed = call("ListAliases")
    assert set(listed) == {"Aliases", "TotalCount", "PageNumber", "PageSize", "RequestId"}
    assert listed["Aliases"]["Alias"] == [
        {"AliasName": "alias/Apollo/WorkKey", "AliasArn": expected_alias_arn, "KeyId": key_id}
    ]
    assert (listed["TotalCount"], listed["PageNumber"], listed["PageSize"]) == (1, 1, 10)
    assert call("ListAliasesByKeyId", KeyId=key_id)["Aliases"] == listed["Aliases"]


def test_alias_listing_pages_and_per_key(call: Call, key_id: str) -> None:
    other = call("CreateKey")["KeyMetadata"]["KeyId"]
    mine = [f"alias/k{i:02d}" for i in range(13)]
    for name in mine:
        call("CreateAlias", AliasName=name, KeyId=key_id)
    call("CreateAlias", AliasName="alias/other", KeyId=other)
    pages = [call("ListAliases", PageNumber=n, PageSize=5) for n in (1, 2, 3)]
    assert all(p["TotalCount"] == 14 for p in pages)
    assert [a["AliasName"] for p in pages for a in p["Aliases"]["Alias"]] == sorted([*mine, "alias/other"])
    by_key = call("ListAliasesByKeyId", KeyId=key_id, PageSize=100)
    assert by_key["TotalCount"] == 13
    assert [a["AliasName"] for a in by_key["Aliases"]["Alias"]] == mine
    assert aliases_of(call, other) == ["alias/other"]
    expect_error(call, "InvalidParameter", "ListAliases", PageSize=101)
    expect_error(call, "InvalidParameter", "ListAliasesByKeyId", KeyId=key_id, PageNumber=0)


@pytest.mark.parametrize(
    "name",
    [
        "Apollo",  # no alias/ prefix
        "alias/",  # nothing after the prefix
        "alias/" + "a" * 256,
        "alias/has space",
        "alias/ünïcode",
        "alias/acs/reserved",
        "ALIAS/upper",
    ],
)
def test_alias_name_validation(call: Call, key_id: str, kms_home: Path, name: str) -> None:
    before = snapshot(kms_home)
    expect_error(call, "InvalidParameter", "CreateAlias", AliasName=name, KeyId=key_id, match="AliasName")
    assert snapshot(kms_home) == before


def test_alias_name_limits_accepted(call: Call, key_id: str) -> None:
    for name in ("alias/" + "a" * 255, "alias/a", "alias/A-b_c:d/e"):
        call("CreateAlias", AliasName=name, KeyId=key_id)
    assert len(aliases_of(call, key_id)) == 3


def test_duplicate_alias_changes_nothing(call: Call, key_id: str, kms_home: Path) -> None:
    other = call("CreateKey")["KeyMetadata"]["KeyId"]
    call("CreateAlias", AliasName="alias/dup", KeyId=key_id)
    before = snapshot(kms_home)
    expect_error(call, "AliasAlreadyExists", "CreateAlias", AliasName="alias/dup", KeyId=other, match="alias/dup")
    assert snapshot(kms_home) == before
    assert call("DescribeKey", KeyId="alias/dup")["KeyMetadata"]["KeyId"] == key_id


def test_update_alias_moves_it(call: Call, key_id: str) -> None:
    other = call("CreateKey")["KeyMetadata"]["KeyId"]
    call("CreateAlias", AliasName="alias/moving", KeyId=key_id)
    blob = call("Encrypt", KeyId="alias/moving", Plaintext="before")["CiphertextBlob"]
    assert set(call("UpdateAlias", AliasName="alias/moving", KeyId=other)) == {"RequestId"}
    assert call("DescribeKey", KeyId="alias/moving")["KeyMetadata"]["KeyId"] == other
    assert aliases_of(call, key_id) == []
    assert aliases_of(call, other) == ["alias/moving"]
    assert call("Encrypt", KeyId="alias/moving", Plaintext="x")["KeyId"] == other
    # Blobs made through the alias still name the old key.
    decrypted = call("Decrypt", CiphertextBlob=blob)
    assert (decrypted["KeyId"], decrypted["Plaintext"]) == (key_id, "before")


def test_update_and_delete_unknown_alias(call: Call, key_id: str) -> None:
    expect_error(call, "Forbidden.AliasNotFound", "UpdateAlias", AliasName="alias/none", KeyId=key_id)
    expect_error(call, "Forbidden.AliasNotFound", "DeleteAlias", AliasName="alias/none", match="alias/none")
    call("CreateAlias", AliasName="alias/x", KeyId=key_id)
    expect_error(call, "Forbidden.KeyNotFound", "UpdateAlias", AliasName="alias/x", KeyId=str(uuid.uuid4()))
    expect_error(call, "Forbidden.KeyNotFound", "CreateAlias", AliasName="alias/y", KeyId=str(uuid.uuid4()))
    expect_error(call, "MissingParameter", "CreateAlias", KeyId=key_id, match="AliasName")
    expect_error(call, "MissingParameter", "CreateAlias", AliasName="alias/z", match="KeyId")
    expect_error(call, "MissingParameter", "DeleteAlias")


def test_delete_alias_keeps_the_key(call: Call, key_id: str) -> None:
    call("CreateAlias", AliasName="alias/gone", KeyId=key_id)
    assert set(call("DeleteAlias", AliasName="alias/gone")) == {"RequestId"}
    expect_error(call, "Forbidden.AliasNotFound", "DescribeKey", KeyId="alias/gone")
    assert call("DescribeKey", KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
    call("CreateAlias", AliasName="alias/gone", KeyId=key_id)  # the name is free again


# -- KeyId resolution -----------------------------------------------------------------------


@pytest.fixture
def names(call: Call, key_id: str) -> dict[str, str]:
    """The four ways to name ``key_id``."""
    call("CreateAlias", AliasName="alias/Apollo/WorkKey", KeyId=key_id)
    arn = call("DescribeKey", KeyId=key_id)["KeyMetadata"]["Arn"]
    return {
        "key id": key_id,
        "key ARN": arn,
        "alias": "alias/Apollo/WorkKey",
        "alias ARN": arn.replace(f"key/{key_id}", "alias/Apollo/WorkKey"),
    }


#: Every Action taking a KeyId, with the other parameters it needs (``KEY`` stands for the name).
KEYED_ACTIONS: list[tuple[str, dict[str, Any]]] = [
    ("DescribeKey", {}),
    ("UpdateKeyDescription", {"Description": "d"}),
    ("DisableKey", {}),
    ("EnableKey", {}),
    ("ListAliasesByKeyId", {}),
    ("Encrypt", {"Plaintext": "p"}),
    ("GenerateDataKey", {}),
    ("GenerateDataKeyWithoutPlaintext", {}),
    ("ListKeyVersions", {}),
    ("CreateKeyVersion", {}),
    ("UpdateRotationPolicy", {"EnableAutomaticRotation": "false"}),
    ("SetDeletionProtection", {"EnableDeletionProtection": "false"}),
    ("CreateAlias", {"AliasName": "alias/second"}),
    ("ScheduleKeyDeletion", {"PendingWindowInDays": "7"}),
]


@pytest.mark.parametrize("form", ["key id", "key ARN", "alias", "alias ARN"])
@pytest.mark.parametrize(("action", "extra"), KEYED_ACTIONS, ids=[a for a, _ in KEYED_ACTIONS])
def test_every_keyed_action_accepts_every_name_form(
    call: Call, names: dict[str, str], form: str, action: str, extra: dict[str, Any]
) -> None:
    key_id = names["key id"]
    response = call(action, KeyId=names[form], **extra)
    if "KeyId" in response:
        assert response["KeyId"] == key_id  # the resolved real id, never the alias
    if "KeyMetadata" in response:
        assert response["KeyMetadata"]["KeyId"] == key_id
    if action == "ScheduleKeyDeletion":
        assert call("DescribeKey", KeyId=key_id)["KeyMetadata"]["KeyState"] == "PendingDeletion"
    if action == "CreateAlias":
        assert "alias/second" in aliases_of(call, key_id)


@pytest.mark.parametrize("form", ["key id", "key ARN", "alias", "alias ARN"])
def test_name_forms_in_other_key_parameters(call: Call, key_id: str, names: dict[str, str], form: str) -> None:
    other = call("CreateKey")["KeyMetadata"]["KeyId"]
    call("CreateAlias", AliasName="alias/moving", KeyId=other)
    call("UpdateAlias", AliasName="alias/moving", KeyId=names[form])
    assert aliases_of(call, key_id) == sorted(["alias/Apollo/WorkKey", "alias/moving"])
    blob = call("Encrypt", KeyId=other, Plaintext="p")["CiphertextBlob"]
    re_encrypted = call("ReEncrypt", CiphertextBlob=blob, DestinationKeyId=names[form], SourceKeyId=other)
    assert re_encrypted["KeyId"] == key_id
    version = call("DescribeKey", KeyId=key_id)["KeyMetadata"]["PrimaryKeyVersion"]
    assert call("DescribeKeyVersion", KeyId=names[form], KeyVersionId=version)["KeyVersion"]["KeyId"] == key_id
    call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    call("CancelKeyDeletion", KeyId=names[form])
    assert call("DescribeKey", KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
    call("SetDeletionProtection", ProtectedResourceArn=names[form], EnableDeletionProtection=True)
    assert call("DescribeKey", KeyId=key_id)["KeyMetadata"]["DeletionProtection"] == "Enabled"


def test_foreign_and_malformed_arns(call: Call, names: dict[str, str]) -> None:
    key_arn, alias_arn = names["key ARN"], names["alias ARN"]
    _, _, region, uid, resource = key_arn.split(":", 4)
    other_uid = "1" + uid[1:] if uid[0] != "1" else "2" + uid[1:]
    for foreign in (
        key_arn.replace(f":{region}:", ":cn-shanghai:"),
        key_arn.replace(f":{uid}:", f":{other_uid}:"),
    ):
        expect_error(call, "Forbidden.KeyNotFound", "DescribeKey", KeyId=foreign)
    for foreign in (
        alias_arn.replace(f":{region}:", ":cn-shanghai:"),
        alias_arn.replace(f":{uid}:", f":{other_uid}:"),
    ):
        expect_error(call, "Forbidden.AliasNotFound", "Encrypt", KeyId=foreign, Plaintext="p")
    for malformed in (
        f"acs:ecs:{region}:{uid}:{resource}",
        f"acs:kms:{region}:{uid}",
        f"acs:kms:{region}:{uid}:secret/abc",
    ):
        expect_error(call, "InvalidParameter", "DescribeKey", KeyId=malformed, match="KeyId")
    expect_error(call, "Forbidden.AliasNotFound", "DescribeKey", KeyId=alias_arn + "x")
    near_miss = key_arn[:-1] + ("1" if key_arn[-1] == "0" else "0")
    expect_error(call, "Forbidden.KeyNotFound", "DescribeKey", KeyId=near_miss)
    expect_error(call, "Forbidden.AliasNotFound", "DescribeKey", KeyId="alias/apollo/workkey")  # case matters
