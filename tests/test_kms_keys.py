"""Key Actions: CreateKey, DescribeKey, ListKeys, UpdateKeyDescription, EnableKey, DisableKey,
SetDeletionProtection — success shapes (alibaba-kms-wire.md §6) and parameter validation."""

from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

import pytest

from conftest import START, Call, FakeClock
from kms_helpers import expect_error, snapshot

DATE_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
METADATA_FIELDS = {
    "KeyId", "Arn", "KeyState", "KeyUsage", "KeySpec", "CreationDate", "Creator", "Description", "Origin",
    "ProtectionLevel", "PrimaryKeyVersion", "AutomaticRotation", "RotationInterval", "LastRotationDate",
    "NextRotationDate", "DeleteDate", "MaterialExpireTime", "DeletionProtection", "DeletionProtectionDescription",
}  # fmt: skip


def test_create_key_defaults_and_metadata_shape(call: Call) -> None:
    response = call("CreateKey")
    assert set(response) == {"KeyMetadata", "RequestId"}
    uuid.UUID(response["RequestId"])
    meta = response["KeyMetadata"]
    assert set(meta) >= METADATA_FIELDS
    uuid.UUID(meta["KeyId"])
    assert re.fullmatch(rf"acs:kms:cn-hangzhou:\d{{16}}:key/{meta['KeyId']}", meta["Arn"])
    assert meta["Creator"] == meta["Arn"].split(":")[3]
    assert meta["KeyState"] == "Enabled"
    assert meta["KeySpec"] == "Aliyun_AES_256"
    assert meta["KeyUsage"] == "ENCRYPT/DECRYPT"
    assert meta["Origin"] == "Aliyun_KMS"
    assert meta["ProtectionLevel"] == "SOFTWARE"
    assert meta["Description"] == ""
    assert meta["CreationDate"] == START.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert DATE_RE.match(meta["CreationDate"])
    uuid.UUID(meta["PrimaryKeyVersion"])
    assert meta["AutomaticRotation"] == "Disabled"
    assert meta["NextRotationDate"] == meta["DeleteDate"] == ""
    assert meta["DeletionProtection"] == "Disabled"
    # DescribeKey shows the same key; RequestIds differ per request.
    described = call("DescribeKey", KeyId=meta["KeyId"])
    assert described["KeyMetadata"] == meta
    assert described["RequestId"] != response["RequestId"]


def test_region_comes_from_environment_at_creation(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kmsenv.kms.service import open_service

    monkeypatch.setenv("KMSENV_REGION", "eu-central-1")
    svc = open_service(tmp_path / "h", announce=False)
    try:
        assert svc.create_key()["KeyMetadata"]["Arn"].startswith("acs:kms:eu-central-1:")
    finally:
        svc.close()


def test_create_key_accepts_every_documented_parameter(call: Call, clock: FakeClock) -> None:
    tags = [{"TagKey": "team", "TagValue": "apollo"}, {"TagKey": "env", "TagValue": ""}]
    meta = call(
        "CreateKey",
        Description="work key ✓",
        KeySpec="Aliyun_AES_128",
        KeyUsage="ENCRYPT/DECRYPT",
        Origin="Aliyun_KMS",
        ProtectionLevel="SOFTWARE",
        EnableAutomaticRotation=True,
        RotationInterval="30d",
        Tags=tags,
    )["KeyMetadata"]
    assert meta["Description"] == "work key ✓"
    assert meta["KeySpec"] == "Aliyun_AES_128"
    assert meta["AutomaticRotation"] == "Enabled"
    assert meta["RotationInterval"] == f"{30 * 86400}s"
    assert meta["NextRotationDate"] == "2026-01-31T00:00:00Z"
    # The 128-bit key works for crypto.
    blob = call("Encrypt", KeyId=meta["KeyId"], Plaintext="hi")["CiphertextBlob"]
    assert call("Decrypt", CiphertextBlob=blob)["Plaintext"] == "hi"


def test_create_key_rotation_defaults_to_one_year(call: Call) -> None:
    meta = call("CreateKey", EnableAutomaticRotation="true")["KeyMetadata"]
    assert meta["RotationInterval"] == "31536000s"
    assert meta["NextRotationDate"] == "2027-01-01T00:00:00Z"


def test_create_external_key_is_pending_import(call: Call) -> None:
    meta = call("CreateKey", Origin="EXTERNAL")["KeyMetadata"]
    assert meta["KeyState"] == "PendingImport"
    assert meta["Origin"] == "EXTERNAL"
    assert meta["PrimaryKeyVersion"] == ""
    assert call("ListKeyVersions", KeyId=meta["KeyId"])["TotalCount"] == 0


@pytest.mark.parametrize(
    ("params", "code", "param"),
    [
        ({"KeySpec": "AES_256"}, "InvalidParameter", "KeySpec"),
        ({"KeySpec": "aliyun_aes_256"}, "InvalidParameter", "KeySpec"),
        ({"KeySpec": "RSA_2048"}, "Rejected.UnsupportedOperation", "RSA_2048"),
        ({"KeySpec": "Aliyun_SM4"}, "Rejected.UnsupportedOperation", "Aliyun_SM4"),
        ({"KeyUsage": "SIGN/VERIFY"}, "InvalidParameter", "KeyUsage"),
        ({"KeyUsage": "ENCRYPT"}, "InvalidParameter", "KeyUsage"),
        ({"Origin": "Imported"}, "InvalidParameter", "Origin"),
        ({"ProtectionLevel": "HSM"}, "Unsupported.ProtectionLevel", "HSM"),
        ({"ProtectionLevel": "software"}, "InvalidParameter", "ProtectionLevel"),
        ({"Description": "x" * 8193}, "InvalidParameter", "Description"),
        ({"EnableAutomaticRotation": "yes"}, "InvalidParameter", "EnableAutomaticRotation"),
        ({"EnableAutomaticRotation": "true", "RotationInterval": "6d"}, "InvalidParameter", "RotationInterval"),
        ({"RotationInterval": "731d"}, "InvalidParameter", "RotationInterval"),
        ({"RotationInterval": "30 days"}, "InvalidParameter", "RotationInterval"),
        ({"Origin": "EXTERNAL", "EnableAutomaticRotation": "true"}, "Unsupported.Origin", "imported"),
        ({"Tags": "not json"}, "InvalidParameter", "Tags"),
        ({"Tags": '{"TagKey": "a", "TagValue": "b"}'}, "InvalidParameter", "Tags"),
        ({"Tags": '[{"TagKey": "", "TagValue": "b"}]'}, "InvalidParameter", "Tags"),
        ({"Tags": '[{"TagKey": "a"}]'}, "InvalidParameter", "Tags"),
        ({"Tags": '[{"TagKey": "a", "TagValue": 1}]'}, "InvalidParameter", "Tags"),
        ({"Tags": json.dumps([{"TagKey": f"k{i}", "TagValue": "v"} for i in range(21)])}, "InvalidParameter", "Tags"),
    ],
)
def test_create_key_rejects_bad_parameters(
    call: Call, kms_home: Path, params: dict[str, str], code: str, param: str
) -> None:
    before = snapshot(kms_home)
    expect_error(call, code, "CreateKey", match=param, **params)
    assert snapshot(kms_home) == before


def test_create_key_description_limit_is_inclusive(call: Call) -> None:
    assert call("CreateKey", Description="x" * 8192)["KeyMetadata"]["Description"] == "x" * 8192


def test_describe_key_unknown_and_missing(call: Call) -> None:
    unknown = str(uuid.uuid4())
    expect_error(call, "Forbidden.KeyNotFound", "DescribeKey", KeyId=unknown, match=unknown)
    expect_error(call, "Forbidden.KeyNotFound", "DescribeKey", KeyId="not-a-uuid")
    expect_error(call, "MissingParameter", "DescribeKey", match='"KeyId"')
    expect_error(call, "MissingParameter", "DescribeKey", KeyId="")


def test_list_keys_pages_and_totals(call: Call, clock: FakeClock) -> None:
    created = []
    for _ in range(12):
        created.append(call("CreateKey")["KeyMetadata"])
        clock.advance(seconds=1)
    first = call("ListKeys")
    assert set(first) == {"Keys", "TotalCount", "PageNumber", "PageSize", "RequestId"}
    assert (first["TotalCount"], first["PageNumber"], first["PageSize"]) == (12, 1, 10)
    assert len(first["Keys"]["Key"]) == 10
    second = call("ListKeys", PageNumber=2)
    assert len(second["Keys"]["Key"]) == 2
    listed = first["Keys"]["Key"] + second["Keys"]["Key"]
    assert listed == [{"KeyId": m["KeyId"], "KeyArn": m["Arn"]} for m in created]
    small = [call("ListKeys", PageNumber=n, PageSize=5)["Keys"]["Key"] for n in (1, 2, 3, 4)]
    assert [len(p) for p in small] == [5, 5, 2, 0]
    assert [k for page in small for k in page] == listed
    assert call("ListKeys", PageSize=100)["PageSize"] == 100
    far = call("ListKeys", PageNumber=2**31 - 1, PageSize=100)  # the largest Integer PageNumber: an empty page
    assert (far["Keys"]["Key"], far["TotalCount"]) == ([], 12)


@pytest.mark.parametrize(
    ("params", "param"),
    [
        ({"PageNumber": "0"}, "PageNumber"),
        ({"PageNumber": "-1"}, "PageNumber"),
        ({"PageNumber": "one"}, "PageNumber"),
        ({"PageSize": "0"}, "PageSize"),
        ({"PageSize": "101"}, "PageSize"),
        ({"PageSize": "1.5"}, "PageSize"),
        ({"PageNumber": str(2**31), "PageSize": "100"}, "PageNumber"),
        ({"PageNumber": "999999999999999999", "PageSize": "100"}, "PageNumber"),
        ({"Filters": "KeyState=Enabled"}, "Filters"),
        ({"Filters": '{"Key": "KeyState", "Values": ["Enabled"]}'}, "Filters"),
        ({"Filters": '[{"Key": "Color", "Values": ["red"]}]'}, "Filters"),
        ({"Filters": '[{"Key": "KeyState", "Values": []}]'}, "Filters"),
        ({"Filters": '[{"Key": "KeyState", "Values": ["Gone"]}]'}, "Filters"),
        ({"Filters": '[{"Key": "KeyState", "Values": "Enabled"}]'}, "Filters"),
        ({"Filters": '[{"Key": "KeyState"}]'}, "Filters"),
    ],
)
def test_list_keys_rejects_bad_paging_and_filters(call: Call, params: dict[str, str], param: str) -> None:
    expect_error(call, "InvalidParameter", "ListKeys", match=param, **params)


def test_list_keys_filters(call: Call, key_id: str) -> None:
    disabled = call("CreateKey", KeySpec="Aliyun_AES_128")["KeyMetadata"]["KeyId"]
    call("DisableKey", KeyId=disabled)
    external = call("CreateKey", Origin="EXTERNAL")["KeyMetadata"]["KeyId"]

    def ids(filters: list[dict[str, object]]) -> set[str]:
        response = call("ListKeys", Filters=filters, PageSize=100)
        assert response["TotalCount"] == len(response["Keys"]["Key"])
        return {k["KeyId"] for k in response["Keys"]["Key"]}

    assert ids([{"Key": "KeyState", "Values": ["Enabled"]}]) == {key_id}
    assert ids([{"Key": "KeyState", "Values": ["Enabled", "Disabled"]}]) == {key_id, disabled}
    assert ids([{"Key": "KeySpec", "Values": ["Aliyun_AES_256"]}]) == {key_id, external}
    assert ids([{"Key": "Origin", "Values": ["EXTERNAL"]}]) == {external}
    assert ids([{"Key": "KeySpec", "Values": ["Aliyun_AES_256"]}, {"Key": "KeyState", "Values": ["Enabled"]}]) == {
        key_id
    }
    assert ids([{"Key": "ProtectionLevel", "Values": ["HSM"]}]) == set()
    assert ids([]) == {key_id, disabled, external}


def test_update_key_description(call: Call, key_id: str) -> None:
    assert set(call("UpdateKeyDescription", KeyId=key_id, Description="new text")) == {"RequestId"}
    assert call("DescribeKey", KeyId=key_id)["KeyMetadata"]["Description"] == "new text"
    call("UpdateKeyDescription", KeyId=key_id, Description="")
    assert call("DescribeKey", KeyId=key_id)["KeyMetadata"]["Description"] == ""
    expect_error(call, "MissingParameter", "UpdateKeyDescription", KeyId=key_id, match="Description")
    expect_error(call, "InvalidParameter", "UpdateKeyDescription", KeyId=key_id, Description="d" * 8193)


def test_disable_and_enable_key(call: Call, key_id: str) -> None:
    assert set(call("DisableKey", KeyId=key_id)) == {"RequestId"}
    assert call("DescribeKey", KeyId=key_id)["KeyMetadata"]["KeyState"] == "Disabled"
    call("DisableKey", KeyId=key_id)  # idempotent
    assert set(call("EnableKey", KeyId=key_id)) == {"RequestId"}
    assert call("DescribeKey", KeyId=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
    call("EnableKey", KeyId=key_id)


def test_rotation_shows_suspended_while_disabled(call: Call) -> None:
    key = call("CreateKey", EnableAutomaticRotation=True, RotationInterval="7d")["KeyMetadata"]["KeyId"]
    call("DisableKey", KeyId=key)
    meta = call("DescribeKey", KeyId=key)["KeyMetadata"]
    assert meta["AutomaticRotation"] == "Suspended"
    assert meta["NextRotationDate"] == ""


def test_set_deletion_protection(call: Call, key_id: str) -> None:
    arn = call("DescribeKey", KeyId=key_id)["KeyMetadata"]["Arn"]
    response = call(
        "SetDeletionProtection",
        ProtectedResourceArn=arn,
        EnableDeletionProtection=True,
        DeletionProtectionDescription="prod",
    )
    assert set(response) == {"RequestId"}
    meta = call("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert (meta["DeletionProtection"], meta["DeletionProtectionDescription"]) == ("Enabled", "prod")
    call("SetDeletionProtection", KeyId=key_id, EnableDeletionProtection="False")
    meta = call("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert (meta["DeletionProtection"], meta["DeletionProtectionDescription"]) == ("Disabled", "")
    expect_error(call, "MissingParameter", "SetDeletionProtection", KeyId=key_id, match="EnableDeletionProtection")
    expect_error(call, "MissingParameter", "SetDeletionProtection", EnableDeletionProtection=True)
    expect_error(call, "InvalidParameter", "SetDeletionProtection", KeyId=key_id, EnableDeletionProtection="on")
