"""EncryptionContext: parsing, validation and the canonical byte form bound into ciphertexts.

Alibaba compares contexts as maps: key order and JSON spacing do not matter, and SDKs send
different JSON for the same map (the Tea SDK compact with raw UTF-8, ``json.dumps`` with spaces and
``\\u`` escapes). So the blob binds a canonical form: keys sorted by code point, compact separators,
raw UTF-8. An absent context and an empty map are the same thing: no context.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from kmsenv.errors import KmsError

__all__ = ["MAX_CONTEXT_CHARS", "canonical_context", "parse_context"]

#: Alibaba's documented limit on the EncryptionContext JSON string.
MAX_CONTEXT_CHARS = 8192


def _reject_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    seen: dict[str, object] = {}
    for key, value in pairs:
        if key in seen:
            # Two values for one key would make "the" context ambiguous between parsers.
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def parse_context(value: Mapping[str, str] | str | None, *, param: str = "EncryptionContext") -> dict[str, str]:
    """Return the context as a plain ``dict[str, str]`` (empty for none), or raise InvalidParameter."""
    if value is None:
        return {}
    if isinstance(value, str):
        if value.strip() == "":
            return {}
        if len(value) > MAX_CONTEXT_CHARS:
            raise KmsError.invalid_parameter(param, f"It must be at most {MAX_CONTEXT_CHARS} characters.")
        try:
            parsed = json.loads(value, object_pairs_hook=_reject_duplicates)
        except (ValueError, RecursionError) as exc:
            raise KmsError.invalid_parameter(param, f"It must be a JSON object of strings ({exc}).") from None
    else:
        parsed = value
    if not isinstance(parsed, Mapping):
        raise KmsError.invalid_parameter(param, "It must be a JSON object of string keys and string values.")
    result: dict[str, str] = {}
    for key, item in parsed.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise KmsError.invalid_parameter(param, "Every key and value must be a string.")
        if key == "":
            raise KmsError.invalid_parameter(param, "Keys must not be empty.")
        try:
            key.encode("utf-8")
            item.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates ("\ud800") have no UTF-8 form, so no canonical form to bind.
            raise KmsError.invalid_parameter(param, "Keys and values must be valid Unicode text.") from None
        result[key] = item
    if len(canonical_context(result).decode("utf-8")) > MAX_CONTEXT_CHARS:
        raise KmsError.invalid_parameter(param, f"It must be at most {MAX_CONTEXT_CHARS} characters.")
    return result


def canonical_context(context: Mapping[str, str]) -> bytes:
    """The canonical UTF-8 JSON of a context (``b""`` for none): what ciphertexts are bound to."""
    if not context:
        return b""
    return json.dumps(dict(sorted(context.items())), ensure_ascii=False, separators=(",", ":")).encode("utf-8")
