"""Regression tests for what fuzzing found (docs/security.md, "Fuzzing": findings)."""

from __future__ import annotations

import json
import time

import pytest

from kmsenv.kms.policy import parse_policy


def test_finding_policy_glob_is_not_exponential() -> None:
    """Resource globs compiled to regular expressions backtracked exponentially in the number of
    ``*``: a policy with 13 of them and a 40-character KeyId took ~110 s per request (the KeyId is
    the client's). Now a linear-space, quadratic-time matcher."""
    glob = "acs:kms:*:*:key/" + "*a" * 12 + "*b"
    policy = parse_policy(json.dumps({"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": glob}]}))
    started = time.perf_counter()
    assert not policy.allows("kms:Decrypt", ["acs:kms:cn-hangzhou:1:key/" + "a" * 4000])
    assert time.perf_counter() - started < 1.0


@pytest.mark.parametrize(
    ("glob", "value", "match"),
    [
        ("acs:kms:*:*:key/*", "acs:kms:cn:1:key/abc", True),
        ("acs:kms:*:*:alias/Apollo/*", "acs:kms:cn:1:alias/Apollo/WorkKey", True),
        ("acs:kms:*:*:alias/Apollo/*", "acs:kms:cn:1:alias/apollo/WorkKey", False),
        ("kms:Gen?rate*", "kms:GenerateDataKey", True),
        ("a*b*c", "aXbYc", True),
        ("a*b*c", "aXbY", False),
        ("*", "", True),
        ("?", "", False),
        ("a.b", "aXb", False),  # no regular-expression meaning leaks in
        ("a\nb*", "a\nbc", True),
    ],
)
def test_policy_glob_semantics(glob: str, value: str, match: bool) -> None:
    policy = parse_policy(json.dumps({"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": glob}]}))
    assert policy.allows("kms:Decrypt", [value]) is match


def test_policy_actions_compare_case_insensitively() -> None:
    policy = parse_policy(json.dumps({"Statement": [{"Effect": "Allow", "Action": "KMS:decrypt", "Resource": "*"}]}))
    assert policy.allows("kms:Decrypt", ["x"])
    assert not policy.allows("kms:Encrypt", ["x"])
