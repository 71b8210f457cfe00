"""ScheduleKeyDeletion / CancelKeyDeletion / deletion protection, and what happens when the pending
window has passed: the key is destroyed, its material erased, its ciphertexts dead."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from conftest import Call, FakeClock
from kms_helpers import expect_error, sealed_versions, snapshot, store_bytes
from kmsenv.kms.actions import dispatch
from kmsenv.kms.service import KmsService, open_service


def state(call: Call, key: str) -> tuple[str, str]:
    meta = call("DescribeKey", KeyId=key)["KeyMetadata"]
    return meta["KeyState"], meta["DeleteDate"]


@pytest.mark.parametrize("days", [7, 30, 366])
def test_schedule_key_deletion_window(call: Call, key_id: str, days: int) -> None:
    assert set(call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=days)) == {"RequestId"}
    expected = {7: "2026-01-08T00:00:00Z", 30: "2026-01-31T00:00:00Z", 366: "2027-01-02T00:00:00Z"}[days]
    assert state(call, key_id) == ("PendingDeletion", expected)


@pytest.mark.parametrize("days", ["6", "367", "0", "-7", "seven", "7.0"])
def test_schedule_key_deletion_window_bounds(call: Call, key_id: str, kms_home: Path, days: str) -> None:
    before = snapshot(kms_home)
    expect_error(
        call, "InvalidParameter", "ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=days, match="PendingWindow"
    )
    assert snapshot(kms_home) == before


def test_schedule_key_deletion_needs_a_window(call: Call, key_id: str) -> None:
    expect_error(call, "MissingParameter", "ScheduleKeyDeletion", KeyId=key_id, match="PendingWindowInDays")
    expect_error(call, "MissingParameter", "ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays="")


def test_deletion_protection_blocks_scheduling(call: Call, key_id: str, kms_home: Path) -> None:
    call("SetDeletionProtection", KeyId=key_id, EnableDeletionProtection=True, DeletionProtectionDescription="prod")
    before = snapshot(kms_home)
    expect_error(
        call, "Rejected.DeletionProtection", "ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7, match="protect"
    )
    assert snapshot(kms_home) == before
    assert state(call, key_id) == ("Enabled", "")
    call("SetDeletionProtection", KeyId=key_id, EnableDeletionProtection=False)
    call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    assert state(call, key_id)[0] == "PendingDeletion"


@pytest.mark.parametrize("before", ["Enabled", "Disabled"])
def test_cancel_key_deletion_restores_enabled(call: Call, key_id: str, clock: FakeClock, before: str) -> None:
    if before == "Disabled":
        call("DisableKey", KeyId=key_id)
    call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    clock.advance(days=7, seconds=-1)  # one second before the end of the window: not destroyed yet
    assert set(call("CancelKeyDeletion", KeyId=key_id)) == {"RequestId"}
    assert state(call, key_id) == ("Enabled", "")
    clock.advance(days=30)
    assert state(call, key_id) == ("Enabled", "")  # the cancelled date no longer applies


def test_cancel_deletion_of_key_without_material_returns_to_pending_import(call: Call) -> None:
    key = call("CreateKey", Origin="EXTERNAL")["KeyMetadata"]["KeyId"]
    call("ScheduleKeyDeletion", KeyId=key, PendingWindowInDays=7)
    call("CancelKeyDeletion", KeyId=key)
    assert state(call, key) == ("PendingImport", "")
    expect_error(call, "Rejected.PendingImport", "Encrypt", KeyId=key, Plaintext="p")


def sealed_rows(home: Path, key: str) -> list[bytes]:
    return [sealed for owner, _, sealed in sealed_versions(home) if owner == key]


def test_key_destroyed_after_window(call: Call, key_id: str, clock: FakeClock, kms_home: Path) -> None:
    keeper = call("CreateKey")["KeyMetadata"]["KeyId"]
    call("CreateAlias", AliasName="alias/doomed", KeyId=key_id)
    call("CreateAlias", AliasName="alias/keeper", KeyId=keeper)
    call("CreateKeyVersion", KeyId=key_id)
    blobs = [
        call("Encrypt", KeyId=key_id, Plaintext="p")["CiphertextBlob"],
        call("GenerateDataKey", KeyId=key_id, EncryptionContext={"a": "b"})["CiphertextBlob"],
    ]
    materials = sealed_rows(kms_home, key_id)
    assert len(materials) == 2
    assert all(m in store_bytes(kms_home) for m in materials)  # the search below can find them
    call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    clock.advance(days=7)

    err = expect_error(call, "Forbidden.KeyNotFound", "DescribeKey", KeyId=key_id, match="deleted")
    assert key_id in err.message and "2026-01-08T00:00:00Z" in err.message
    for blob, context in zip(blobs, [None, {"a": "b"}], strict=True):
        params = {"EncryptionContext": context} if context else {}
        expect_error(call, "Forbidden.KeyNotFound", "Decrypt", CiphertextBlob=blob, match="deleted", **params)
        expect_error(call, "Forbidden.KeyNotFound", "ReEncrypt", CiphertextBlob=blob, DestinationKeyId=keeper, **params)
    for action, extra in [("Encrypt", {"Plaintext": "p"}), ("CancelKeyDeletion", {}), ("ListKeyVersions", {})]:
        expect_error(call, "Forbidden.KeyNotFound", action, KeyId=key_id, match="deleted", **extra)
    expect_error(call, "Forbidden.AliasNotFound", "DescribeKey", KeyId="alias/doomed")
    assert [a["AliasName"] for a in call("ListAliases")["Aliases"]["Alias"]] == ["alias/keeper"]
    assert [k["KeyId"] for k in call("ListKeys")["Keys"]["Key"]] == [keeper]
    assert sealed_rows(kms_home, key_id) == []
    data = store_bytes(kms_home)
    assert not any(m in data for m in materials), "destroyed key material still in the SQLite files"
    # The alias name is free again; the other key is untouched.
    call("CreateAlias", AliasName="alias/doomed", KeyId=keeper)
    assert call("Encrypt", KeyId="alias/doomed", Plaintext="p")["KeyId"] == keeper


def test_destruction_is_carried_out_by_any_service(call: Call, key_id: str, clock: FakeClock, kms_home: Path) -> None:
    blob = call("Encrypt", KeyId=key_id, Plaintext="p")["CiphertextBlob"]
    assert call("Decrypt", CiphertextBlob=blob)["Plaintext"] == "p"  # this service caches the material
    call("ScheduleKeyDeletion", KeyId=key_id, PendingWindowInDays=7)
    clock.advance(days=8)
    other: KmsService = open_service(kms_home, clock=clock, announce=False)
    try:
        dispatch(other, "ListKeys", {})
        assert sealed_rows(kms_home, key_id) == []
    finally:
        other.close()
    expect_error(call, "Forbidden.KeyNotFound", "Decrypt", CiphertextBlob=blob, match="deleted")


def test_unknown_key_message_does_not_claim_deletion(call: Call) -> None:
    err = expect_error(call, "Forbidden.KeyNotFound", "DescribeKey", KeyId=str(uuid.uuid4()))
    assert "deleted" not in err.message
