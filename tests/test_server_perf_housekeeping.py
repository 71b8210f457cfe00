"""The housekeeping cache (``KmsService._housekeeping``): due rotations and deletions are still
carried out before any Action that could observe them, while most Actions skip the store read.

- within one second of the service clock, with no write of this service in between, the check
  is done once, not once per Action;
- a clock that moves, and any write of this service, force a check;
- another process's change is seen within ``HOUSEKEEPING_RECHECK_S``;
- whatever the cache says, an Action never uses a key past its DeleteDate.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import Call, FakeClock
from kms_helpers import expect_error, sealed_versions
from kmsenv.kms import service as service_module
from kmsenv.kms.actions import dispatch
from kmsenv.kms.service import KmsService, open_service


class ReadCounter:
    """Counts the read transactions a service opens (housekeeping checks are read transactions)."""

    def __init__(self, svc: KmsService, monkeypatch: pytest.MonkeyPatch) -> None:
        self.reads = 0
        original = svc.store.transaction

        @contextlib.contextmanager
        def counting(*, write: bool) -> Iterator[Any]:
            if not write:
                self.reads += 1
            with original(write=write) as tx:
                yield tx

        monkeypatch.setattr(svc.store, "transaction", counting)


def versions(call: Call, key: str) -> int:
    return int(call("ListKeyVersions", KeyId=key)["TotalCount"])


def test_one_check_per_clock_second(
    service: KmsService, call: Call, key_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    call("Encrypt", KeyId=key_id, Plaintext="warm")  # the check after CreateKey's write
    counter = ReadCounter(service, monkeypatch)
    for _ in range(20):
        call("Encrypt", KeyId=key_id, Plaintext="p")
    assert counter.reads == 20  # the Actions' own transactions only: no housekeeping read


def test_a_moving_clock_forces_a_check(service: KmsService, call: Call, clock: FakeClock) -> None:
    key = call("CreateKey", EnableAutomaticRotation=True, RotationInterval="7d")["KeyMetadata"]["KeyId"]
    first = call("Encrypt", KeyId=key, Plaintext="p")["KeyVersionId"]
    clock.advance(days=7)
    assert call("Encrypt", KeyId=key, Plaintext="p")["KeyVersionId"] != first
    assert versions(call, key) == 2


def test_a_write_of_this_service_forces_a_check(call: Call, clock: FakeClock) -> None:
    key = call("CreateKey")["KeyMetadata"]["KeyId"]
    clock.advance(days=30)
    first = call("Encrypt", KeyId=key, Plaintext="p")["KeyVersionId"]  # checked: nothing due
    # Rotation counted from the key's creation, 30 days ago: due at once, in this very second.
    call("UpdateRotationPolicy", KeyId=key, EnableAutomaticRotation=True, RotationInterval="7d")
    assert call("Encrypt", KeyId=key, Plaintext="p")["KeyVersionId"] != first


def test_another_process_change_is_seen_within_the_recheck_interval(
    kms_home: Path, service: KmsService, call: Call, clock: FakeClock, monkeypatch: pytest.MonkeyPatch
) -> None:
    key = call("CreateKey")["KeyMetadata"]["KeyId"]
    clock.advance(days=30)
    first = call("Encrypt", KeyId=key, Plaintext="p")["KeyVersionId"]  # checked: nothing due
    other = open_service(kms_home, clock=clock, announce=False)
    try:
        dispatch(
            other, "UpdateRotationPolicy", {"KeyId": key, "EnableAutomaticRotation": "true", "RotationInterval": "7d"}
        )
    finally:
        other.close()
    # The same clock second, at once: this process may still rely on its last check ...
    assert call("Encrypt", KeyId=key, Plaintext="p")["KeyVersionId"] == first
    # ... but not once HOUSEKEEPING_RECHECK_S has passed.
    later = service_module.time.monotonic() + service_module.HOUSEKEEPING_RECHECK_S
    monkeypatch.setattr(service_module.time, "monotonic", lambda: later)
    assert call("Encrypt", KeyId=key, Plaintext="p")["KeyVersionId"] != first


@pytest.mark.parametrize("named", ["id", "alias", "blob"])
def test_a_key_past_its_delete_date_is_never_used_even_with_a_stale_check(
    kms_home: Path, call: Call, clock: FakeClock, named: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    frozen = service_module.time.monotonic()
    monkeypatch.setattr(service_module.time, "monotonic", lambda: frozen)  # the cached check never ages
    key = call("CreateKey")["KeyMetadata"]["KeyId"]
    call("CreateAlias", AliasName="alias/doomed", KeyId=key)
    blob = call("Encrypt", KeyId=key, Plaintext="p")["CiphertextBlob"]
    clock.advance(days=8)
    call("ListKeys")  # checked at day 8: nothing due, and the result is kept for this second
    # A node whose clock is 8 days behind schedules the deletion: already overdue here.
    behind = FakeClock(clock.now.replace(day=1))
    other = open_service(kms_home, clock=behind, announce=False)
    try:
        dispatch(other, "ScheduleKeyDeletion", {"KeyId": key, "PendingWindowInDays": "7"})
    finally:
        other.close()
    if named == "blob":
        expect_error(call, "Forbidden.KeyNotFound", "Decrypt", CiphertextBlob=blob, match="deleted")
    elif named == "alias":
        expect_error(call, "Forbidden.AliasNotFound", "Encrypt", KeyId="alias/doomed", Plaintext="p")
    else:
        expect_error(call, "Forbidden.KeyNotFound", "Encrypt", KeyId=key, Plaintext="p", match="deleted")
    # Destroyed before the answer, not merely refused.
    assert not [v for v in sealed_versions(kms_home) if v[0] == key]
    expect_error(call, "Forbidden.KeyNotFound", "DescribeKey", KeyId=key, match="deleted")
