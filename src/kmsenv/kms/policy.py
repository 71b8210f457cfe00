"""RAM-style policy documents: parsing (strict, bounded) and evaluation.

A policy is ``{"Version": "1", "Statement": [{"Effect": "Allow"|"Deny", "Action": [...],
"Resource": [...]}]}``. ``Action`` entries look like ``kms:Decrypt`` or ``kms:*``; ``Resource``
entries are ARNs such as ``acs:kms:*:*:key/<id>`` or ``acs:kms:*:*:alias/Apollo/*``. ``*`` matches
any run of characters and ``?`` one character. Actions compare case-insensitively (as RAM does);
resources case-sensitively.

Evaluation follows RAM: an explicit Deny matching the action and any of the request's resources
wins; otherwise the request is allowed if an Allow statement matches the action and one of the
resources; otherwise it is denied (implicit deny). An AccessKey with no policy at all has full
access — the documented default for kmsenv AccessKeys.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass

from kmsenv.errors import KmsError

__all__ = ["MAX_POLICY_CHARS", "Policy", "Statement", "parse_policy"]

MAX_POLICY_CHARS = 32 * 1024
_MAX_STATEMENTS = 100
_MAX_ENTRIES = 200


def _glob_match(glob: str, value: str) -> bool:
    """Whether ``value`` matches ``glob`` (``*`` any run, ``?`` one character), in O(len × len).

    Not a regular expression: ``.*`` groups backtrack exponentially in their number, and the
    value is the request's KeyId (client-chosen), so a policy with a dozen ``*`` and a long KeyId
    took minutes per request with ``re`` (found writing the policy fuzz target;
    tests/test_fuzz_findings.py). This is the
    classic greedy matcher: on a mismatch, retry from the last ``*`` one character further on.
    """
    g = v = 0
    star, mark = -1, 0
    while v < len(value):
        if g < len(glob) and glob[g] == "*":
            star, mark = g, v
            g += 1
        elif g < len(glob) and (glob[g] == "?" or glob[g] == value[v]):
            g += 1
            v += 1
        elif star >= 0:
            g, mark = star + 1, mark + 1
            v = mark
        else:
            return False
    while g < len(glob) and glob[g] == "*":
        g += 1
    return g == len(glob)


def _matches(globs: Sequence[str], value: str, *, ignore_case: bool) -> bool:
    if ignore_case:
        value = value.lower()
        return any(_glob_match(g.lower(), value) for g in globs)
    return any(_glob_match(g, value) for g in globs)


@dataclass(frozen=True, slots=True)
class Statement:
    effect: str  # "Allow" | "Deny"
    actions: tuple[str, ...]
    resources: tuple[str, ...]

    def applies(self, action: str, resources: Sequence[str]) -> bool:
        return _matches(self.actions, action, ignore_case=True) and any(
            _matches(self.resources, r, ignore_case=False) for r in resources
        )


@dataclass(frozen=True, slots=True)
class Policy:
    statements: tuple[Statement, ...]
    source: str  # the normalised JSON document, for display

    def allows(self, action: str, resources: Sequence[str]) -> bool:
        """``action`` like ``kms:Decrypt``; ``resources`` the ARNs the request touches."""
        if any(s.effect == "Deny" and s.applies(action, resources) for s in self.statements):
            return False
        return any(s.effect == "Allow" and s.applies(action, resources) for s in self.statements)


def _invalid(why: str) -> KmsError:
    return KmsError("InvalidParameter", f'The specified parameter "Policy" is not valid. {why}')


def _string_list(value: object, field: str) -> tuple[str, ...]:
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not items or len(items) > _MAX_ENTRIES:
        raise _invalid(f"{field} must be a string or a non-empty list of at most {_MAX_ENTRIES} strings.")
    if not all(isinstance(i, str) and i for i in items):
        raise _invalid(f"{field} entries must be non-empty strings.")
    return tuple(items)


def parse_policy(text: str) -> Policy:
    """Parse and validate a policy document; raise InvalidParameter naming what is wrong."""
    if len(text) > MAX_POLICY_CHARS:
        raise _invalid(f"It must be at most {MAX_POLICY_CHARS} characters.")
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise _invalid(f"It is not JSON ({exc.__class__.__name__}).") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("Statement"), list):
        raise _invalid('It must be an object with a "Statement" list.')
    unknown = set(doc) - {"Version", "Statement"}
    if unknown:
        raise _invalid(f"Unknown field(s): {', '.join(sorted(unknown))}.")
    raw_statements = doc["Statement"]
    if not raw_statements or len(raw_statements) > _MAX_STATEMENTS:
        raise _invalid(f"It needs 1 to {_MAX_STATEMENTS} statements.")
    statements = []
    for raw in raw_statements:
        if not isinstance(raw, dict):
            raise _invalid("Each statement must be an object.")
        unknown = set(raw) - {"Effect", "Action", "Resource", "Sid"}
        if unknown:
            # Condition, NotAction, NotResource are not implemented: refusing them beats
            # silently granting more than the author meant.
            raise _invalid(f"Unsupported statement field(s): {', '.join(sorted(unknown))}.")
        effect = raw.get("Effect")
        if effect not in ("Allow", "Deny"):
            raise _invalid('Effect must be "Allow" or "Deny".')
        actions = _string_list(raw.get("Action"), "Action")
        for action in actions:
            if action != "*" and not action.lower().startswith("kms:"):
                raise _invalid(f"Action {action!r} is not a kms: action.")
        resources = _string_list(raw.get("Resource"), "Resource")
        statements.append(Statement(effect, actions, resources))
    return Policy(tuple(statements), json.dumps(doc, separators=(",", ":"), sort_keys=True))
