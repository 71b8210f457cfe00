"""Which Action may run in which key state (alibaba-kms-wire.md §8, "Impact of CMK states").

``EXPECTED`` is written independently from the reference, not read from ``STATE_RULES``: the tests
run every keyed Action on a key in every state and compare the outcome with it, and compare
``STATE_RULES`` with it, so a wrong table fails either way. Entries the reference states outright:
crypto needs Enabled (Rejected.<State>); CreateAlias on PendingDeletion → StateModifiedFailed;
UpdateAlias to a PendingDeletion key → Rejected.PendingDeletion; ScheduleKeyDeletion from Enabled,
Disabled, PendingImport; CancelKeyDeletion only from PendingDeletion; EnableKey on PendingDeletion →
StateModifiedFailed. The rest follow Alibaba's table as kmsenv documents it (see the report).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conftest import Call
from kms_helpers import expect_error, forge_blob, snapshot
from kmsenv.kms.service import STATE_RULES

STATES = ("Enabled", "Disabled", "PendingDeletion", "PendingImport")
SMF = "Rejected.StateModifiedFailed"
CRYPTO = {
    "Disabled": "Rejected.Disabled",
    "PendingDeletion": "Rejected.PendingDeletion",
    "PendingImport": "Rejected.PendingImport",
}
ANY = dict[str, str]()  # allowed in every state

#: Action → {state: error code}; a state not listed is allowed.
EXPECTED: dict[str, dict[str, str]] = {
    "Encrypt": CRYPTO,
    "Decrypt": CRYPTO,
    "GenerateDataKey": CRYPTO,
    "GenerateDataKeyWithoutPlaintext": CRYPTO,
    "ReEncrypt": CRYPTO,  # source and destination key alike
    "CreateKeyVersion": CRYPTO,
    "UpdateRotationPolicy": CRYPTO,
    "DescribeKey": ANY,
    "ListAliasesByKeyId": ANY,
    "ListKeyVersions": ANY,
    "DescribeKeyVersion": ANY,
    "DeleteAlias": ANY,
    "UpdateKeyDescription": {"PendingDeletion": "Rejected.PendingDeletion"},
    "SetDeletionProtection": {"PendingDeletion": "Rejected.PendingDeletion"},
    "UpdateAlias": {"PendingDeletion": "Rejected.PendingDeletion"},
    "CreateAlias": {"PendingDeletion": SMF},
    "EnableKey": {"PendingDeletion": SMF, "PendingImport": SMF},
    "DisableKey": {"PendingDeletion": SMF, "PendingImport": SMF},
    "ScheduleKeyDeletion": {"PendingDeletion": SMF},
    "CancelKeyDeletion": {"Enabled": SMF, "Disabled": SMF, "PendingImport": SMF},
}

#: State a key is in after the Action succeeds from each state (unchanged if not listed).
TRANSITIONS = {
    "EnableKey": {"Enabled": "Enabled", "Disabled": "Enabled"},
    "DisableKey": {"Enabled": "Disabled", "Disabled": "Disabled"},
    "ScheduleKeyDeletion": {s: "PendingDeletion" for s in ("Enabled", "Disabled", "PendingImport")},
    "CancelKeyDeletion": {"PendingDeletion": "Enabled"},
}


@dataclass
class Subject:
    """A key in a given state, with what the Actions need to be called on it."""

    key: str
    state: str
    helper: str  # an Enabled key
    blob: str  # a blob under ``key`` (forged for a key without material)
    helper_blob: str  # a blob under ``helper``
    version: str | None


def make_subject(call: Call, state: str) -> Subject:
    helper = call("CreateKey")["KeyMetadata"]["KeyId"]
    call("CreateAlias", AliasName="alias/helper", KeyId=helper)
    meta = call("CreateKey", Origin="EXTERNAL" if state == "PendingImport" else "Aliyun_KMS")["KeyMetadata"]
    key = meta["KeyId"]
    call("CreateAlias", AliasName="alias/subject", KeyId=key)
    blob = forge_blob(key) if state == "PendingImport" else call("Encrypt", KeyId=key, Plaintext="p")["CiphertextBlob"]
    if state == "Disabled":
        call("DisableKey", KeyId=key)
    if state == "PendingDeletion":
        call("ScheduleKeyDeletion", KeyId=key, PendingWindowInDays=7)
    helper_blob = call("Encrypt", KeyId=helper, Plaintext="h")["CiphertextBlob"]
    subject = Subject(key, state, helper, blob, helper_blob, meta["PrimaryKeyVersion"] or None)
    assert call("DescribeKey", KeyId=key)["KeyMetadata"]["KeyState"] == state
    return subject


#: How to call each Action on the subject key: (Action, parameters).
INVOCATIONS: dict[str, Callable[[Subject], tuple[str, dict[str, Any]]]] = {
    "Encrypt": lambda s: ("Encrypt", {"KeyId": s.key, "Plaintext": "p"}),
    "Decrypt": lambda s: ("Decrypt", {"CiphertextBlob": s.blob}),
    "GenerateDataKey": lambda s: ("GenerateDataKey", {"KeyId": s.key}),
    "GenerateDataKeyWithoutPlaintext": lambda s: ("GenerateDataKeyWithoutPlaintext", {"KeyId": s.key}),
    "ReEncrypt(source)": lambda s: ("ReEncrypt", {"CiphertextBlob": s.blob, "DestinationKeyId": s.helper}),
    "ReEncrypt(destination)": lambda s: ("ReEncrypt", {"CiphertextBlob": s.helper_blob, "DestinationKeyId": s.key}),
    "CreateKeyVersion": lambda s: ("CreateKeyVersion", {"KeyId": s.key}),
    "UpdateRotationPolicy": lambda s: (
        "UpdateRotationPolicy",
        {"KeyId": s.key, "EnableAutomaticRotation": "true", "RotationInterval": "7d"},
    ),
    "DescribeKey": lambda s: ("DescribeKey", {"KeyId": s.key}),
    "ListAliasesByKeyId": lambda s: ("ListAliasesByKeyId", {"KeyId": s.key}),
    "ListKeyVersions": lambda s: ("ListKeyVersions", {"KeyId": s.key}),
    "DescribeKeyVersion": lambda s: ("DescribeKeyVersion", {"KeyId": s.key, "KeyVersionId": s.version}),
    "DeleteAlias": lambda s: ("DeleteAlias", {"AliasName": "alias/subject"}),
    "UpdateKeyDescription": lambda s: ("UpdateKeyDescription", {"KeyId": s.key, "Description": "changed"}),
    "SetDeletionProtection": lambda s: ("SetDeletionProtection", {"KeyId": s.key, "EnableDeletionProtection": "true"}),
    "UpdateAlias": lambda s: ("UpdateAlias", {"AliasName": "alias/helper", "KeyId": s.key}),
    "CreateAlias": lambda s: ("CreateAlias", {"AliasName": "alias/new", "KeyId": s.key}),
    "EnableKey": lambda s: ("EnableKey", {"KeyId": s.key}),
    "DisableKey": lambda s: ("DisableKey", {"KeyId": s.key}),
    "ScheduleKeyDeletion": lambda s: ("ScheduleKeyDeletion", {"KeyId": s.key, "PendingWindowInDays": "10"}),
    "CancelKeyDeletion": lambda s: ("CancelKeyDeletion", {"KeyId": s.key}),
}

CASES = [
    (name, state)
    for name in INVOCATIONS
    for state in STATES
    if not (name == "DescribeKeyVersion" and state == "PendingImport")  # such a key has no version to name
]


def expected_code(name: str, state: str) -> str | None:
    return EXPECTED[name.partition("(")[0]].get(state)


@pytest.mark.parametrize(("name", "state"), CASES, ids=[f"{n}-{s}" for n, s in CASES])
def test_action_in_state(call: Call, kms_home: Path, name: str, state: str) -> None:
    subject = make_subject(call, state)
    action, params = INVOCATIONS[name](subject)
    code = expected_code(name, state)
    if code is None:
        call(action, **params)
        after = call("DescribeKey", KeyId=subject.key)["KeyMetadata"]["KeyState"]
        assert after == TRANSITIONS.get(action, {}).get(state, state)
    else:
        before = snapshot(kms_home)
        err = expect_error(call, code, action, **params)
        assert subject.key in err.message
        assert snapshot(kms_home) == before  # a refused Action changes nothing


def test_every_keyed_action_is_covered() -> None:
    from kmsenv.kms.actions import ACTIONS

    keyed = {a.name for a in ACTIONS.values() if {"KeyId", "CiphertextBlob", "AliasName"} & {p.name for p in a.params}}
    assert keyed - {"ListAliases"} == set(EXPECTED)
    assert set(STATE_RULES) <= set(EXPECTED)


@pytest.mark.parametrize("action", sorted(EXPECTED))
def test_state_rules_table_matches_reference(action: str) -> None:
    rules = STATE_RULES.get(action, {})
    assert {s: rules.get(s) for s in STATES} == {s: EXPECTED[action].get(s) for s in STATES}


def test_state_error_names_action_and_state(call: Call) -> None:
    subject = make_subject(call, "PendingDeletion")
    err = expect_error(call, "Rejected.PendingDeletion", "GenerateDataKey", KeyId=subject.key)
    assert "pending deletion" in err.message and "GenerateDataKey" in err.message
