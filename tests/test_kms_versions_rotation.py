"""Key versions (CreateKeyVersion, DescribeKeyVersion, ListKeyVersions), UpdateRotationPolicy and
automatic rotation driven by the injectable clock."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from conftest import START, Call, FakeClock
from kms_helpers import expect_error
from kmsenv.kms.actions import dispatch
from kmsenv.kms.service import open_service

DAY = 86400


def fmt(clock: FakeClock) -> str:
    return clock.now.strftime("%Y-%m-%dT%H:%M:%SZ")


def versions(call: Call, key: str) -> list[str]:
    listed = call("ListKeyVersions", KeyId=key, PageSize=100)
    assert listed["TotalCount"] == len(listed["KeyVersions"]["KeyVersion"])
    return [v["KeyVersionId"] for v in listed["KeyVersions"]["KeyVersion"]]


def primary(call: Call, key: str) -> str:
    return str(call("DescribeKey", KeyId=key)["KeyMetadata"]["PrimaryKeyVersion"])


def test_create_key_version(call: Call, key_id: str, clock: FakeClock) -> None:
    first = primary(call, key_id)
    old_blob = call("Encrypt", KeyId=key_id, Plaintext="old")["CiphertextBlob"]
    clock.advance(hours=1)
    response = call("CreateKeyVersion", KeyId=key_id)
    assert set(response) == {"KeyVersion", "RequestId"}
    version = response["KeyVersion"]
    assert set(version) == {"KeyId", "KeyVersionId", "CreationDate"}
    assert (version["KeyId"], version["CreationDate"]) == (key_id, fmt(clock))
    uuid.UUID(version["KeyVersionId"])
    assert version["KeyVersionId"] != first
    meta = call("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert (meta["PrimaryKeyVersion"], meta["LastRotationDate"]) == (version["KeyVersionId"], fmt(clock))
    # Encrypt and GenerateDataKey use the new primary; the old version still decrypts.
    assert call("Encrypt", KeyId=key_id, Plaintext="new")["KeyVersionId"] == version["KeyVersionId"]
    assert call("GenerateDataKey", KeyId=key_id)["KeyVersionId"] == version["KeyVersionId"]
    decrypted = call("Decrypt", CiphertextBlob=old_blob)
    assert (decrypted["KeyVersionId"], decrypted["Plaintext"]) == (first, "old")
    # ReEncrypt moves an old blob onto the primary version.
    moved = call("ReEncrypt", CiphertextBlob=old_blob, DestinationKeyId=key_id)
    assert moved["KeyVersionId"] == version["KeyVersionId"]
    assert versions(call, key_id) == [first, version["KeyVersionId"]]


def test_describe_and_list_key_versions(call: Call, key_id: str, clock: FakeClock) -> None:
    created = [primary(call, key_id)]
    for _ in range(11):
        clock.advance(minutes=1)
        created.append(call("CreateKeyVersion", KeyId=key_id)["KeyVersion"]["KeyVersionId"])
    listed = call("ListKeyVersions", KeyId=key_id)
    assert set(listed) == {"KeyVersions", "TotalCount", "PageNumber", "PageSize", "RequestId"}
    assert (listed["TotalCount"], listed["PageNumber"], listed["PageSize"]) == (12, 1, 10)
    page2 = call("ListKeyVersions", KeyId=key_id, PageNumber=2)["KeyVersions"]["KeyVersion"]
    assert [v["KeyVersionId"] for v in listed["KeyVersions"]["KeyVersion"] + page2] == created
    for entry in listed["KeyVersions"]["KeyVersion"][:3]:
        described = call("DescribeKeyVersion", KeyId=key_id, KeyVersionId=entry["KeyVersionId"])
        assert described["KeyVersion"] == entry
    other = call("CreateKey")["KeyMetadata"]
    expect_error(
        call, "Forbidden.KeyVersionNotFound", "DescribeKeyVersion", KeyId=key_id, KeyVersionId=str(uuid.uuid4())
    )
    expect_error(
        call,
        "Forbidden.KeyVersionNotFound",
        "DescribeKeyVersion",
        KeyId=key_id,
        KeyVersionId=other["PrimaryKeyVersion"],
        match=key_id,
    )
    expect_error(call, "MissingParameter", "DescribeKeyVersion", KeyId=key_id, match="KeyVersionId")
    expect_error(call, "Forbidden.KeyNotFound", "ListKeyVersions", KeyId=str(uuid.uuid4()))
    expect_error(call, "Forbidden.KeyNotFound", "CreateKeyVersion", KeyId=str(uuid.uuid4()))


@pytest.mark.parametrize(
    ("interval", "seconds"),
    [
        ("30d", 30 * DAY),
        ("2592000s", 30 * DAY),
        ("720h", 30 * DAY),
        ("7d", 7 * DAY),
        ("604800s", 7 * DAY),
        ("730d", 730 * DAY),
        ("1051200m", 730 * DAY),
        (" 30d ", 30 * DAY),
    ],
)
def test_rotation_interval_formats(call: Call, key_id: str, interval: str, seconds: int) -> None:
    assert set(call("UpdateRotationPolicy", KeyId=key_id, EnableAutomaticRotation=True, RotationInterval=interval)) == {
        "RequestId"
    }
    meta = call("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert (meta["AutomaticRotation"], meta["RotationInterval"]) == ("Enabled", f"{seconds}s")
    due = START.timestamp() + seconds
    assert meta["NextRotationDate"] == START.fromtimestamp(due, START.tzinfo).strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("interval", ["6d", "604799s", "731d", "63072001s", "0d", "30", "d", "30D", "1.5d", "-7d"])
def test_rotation_interval_out_of_range_or_malformed(call: Call, key_id: str, interval: str) -> None:
    expect_error(
        call,
        "InvalidParameter",
        "UpdateRotationPolicy",
        KeyId=key_id,
        EnableAutomaticRotation=True,
        RotationInterval=interval,
        match="RotationInterval",
    )
    assert call("DescribeKey", KeyId=key_id)["KeyMetadata"]["AutomaticRotation"] == "Disabled"


def test_update_rotation_policy_on_and_off(call: Call, key_id: str) -> None:
    expect_error(call, "MissingParameter", "UpdateRotationPolicy", KeyId=key_id, match="EnableAutomaticRotation")
    call("UpdateRotationPolicy", KeyId=key_id, EnableAutomaticRotation="True")
    meta = call("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert (meta["RotationInterval"], meta["NextRotationDate"]) == ("31536000s", "2027-01-01T00:00:00Z")
    call("UpdateRotationPolicy", KeyId=key_id, EnableAutomaticRotation="false")
    meta = call("DescribeKey", KeyId=key_id)["KeyMetadata"]
    assert (meta["AutomaticRotation"], meta["NextRotationDate"]) == ("Disabled", "")


def test_automatic_rotation_when_due(call: Call, clock: FakeClock) -> None:
    key = call("CreateKey", EnableAutomaticRotation=True, RotationInterval="7d")["KeyMetadata"]["KeyId"]
    first = primary(call, key)
    old_blob = call("Encrypt", KeyId=key, Plaintext="old", EncryptionContext={"c": "1"})["CiphertextBlob"]
    clock.advance(days=7, seconds=-1)
    assert versions(call, key) == [first]  # not yet due
    clock.advance(seconds=1)
    # Due now: the next Action (whatever it is) carries it out, nobody calls CreateKeyVersion.
    decrypted = call("Decrypt", CiphertextBlob=old_blob, EncryptionContext={"c": "1"})
    assert (decrypted["KeyVersionId"], decrypted["Plaintext"]) == (first, "old")
    all_versions = versions(call, key)
    assert len(all_versions) == 2
    second = all_versions[1]
    meta = call("DescribeKey", KeyId=key)["KeyMetadata"]
    assert meta["PrimaryKeyVersion"] == second
    assert meta["LastRotationDate"] == fmt(clock)
    assert meta["NextRotationDate"] == "2026-01-15T00:00:00Z"
    assert call("Encrypt", KeyId=key, Plaintext="new")["KeyVersionId"] == second
    # Long overdue: one rotation, then the schedule starts again from the rotation.
    clock.advance(days=30)
    assert len(versions(call, key)) == 3
    assert call("DescribeKey", KeyId=key)["KeyMetadata"]["NextRotationDate"] == "2026-02-14T00:00:00Z"
    assert call("Decrypt", CiphertextBlob=old_blob, EncryptionContext={"c": "1"})["Plaintext"] == "old"


def test_rotation_interval_change_reschedules_from_last_rotation(call: Call, key_id: str, clock: FakeClock) -> None:
    clock.advance(days=3)
    call("CreateKeyVersion", KeyId=key_id)  # last rotation: Jan 4
    call("UpdateRotationPolicy", KeyId=key_id, EnableAutomaticRotation=True, RotationInterval="10d")
    assert call("DescribeKey", KeyId=key_id)["KeyMetadata"]["NextRotationDate"] == "2026-01-14T00:00:00Z"


def test_no_rotation_while_disabled_or_turned_off(call: Call, clock: FakeClock) -> None:
    key = call("CreateKey", EnableAutomaticRotation=True, RotationInterval="7d")["KeyMetadata"]["KeyId"]
    call("DisableKey", KeyId=key)
    clock.advance(days=20)
    assert len(versions(call, key)) == 1
    call("EnableKey", KeyId=key)  # overdue: rotates on the next Action
    assert len(versions(call, key)) == 2
    call("UpdateRotationPolicy", KeyId=key, EnableAutomaticRotation=False)
    clock.advance(days=100)
    assert len(versions(call, key)) == 2


def test_manual_rotation_not_for_external_keys(call: Call) -> None:
    key = call("CreateKey", Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    expect_error(call, "Rejected.PendingImport", "CreateKeyVersion", KeyId=key)
    expect_error(call, "Rejected.PendingImport", "UpdateRotationPolicy", KeyId=key, EnableAutomaticRotation=True)


def test_rotation_is_done_once_by_whichever_service_calls(kms_home: Path, call: Call, clock: FakeClock) -> None:
    key = call("CreateKey", EnableAutomaticRotation=True, RotationInterval="7d")["KeyMetadata"]["KeyId"]
    clock.advance(days=8)
    other = open_service(kms_home, clock=clock, announce=False)
    try:
        dispatch(other, "ListKeys", {})  # the other service does the due rotation
        assert len(versions(call, key)) == 2  # this one finds it done and does not repeat it
        assert dispatch(other, "Encrypt", {"KeyId": key, "Plaintext": "p"})["KeyVersionId"] == primary(call, key)
    finally:
        other.close()
