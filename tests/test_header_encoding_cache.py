"""The header codec memoises the context and stanza encodings by value: results never go stale."""

from __future__ import annotations

import pytest

from kmsenv.errors import FormatError
from kmsenv.format import header as H

STANZA = H.KeyStanza("kmsenv-embedded", "acs:kms:cn-hangzhou:1:key/k", "v1", b"\x01" * 40)


def test_a_context_changed_after_encoding_encodes_anew() -> None:
    ctx = {"b": "2", "a": "1"}
    first = H.encode_context(ctx)
    assert first == b"\x00\x02\x00\x01a\x00\x011\x00\x01b\x00\x012"
    ctx["a"] = "9"
    assert H.encode_context(ctx) == b"\x00\x02\x00\x01a\x00\x019\x00\x01b\x00\x012"
    assert H.encode_context({"a": "1", "b": "2"}) == first  # order of the mapping does not matter


def test_an_invalid_context_fails_every_time() -> None:
    for _ in range(3):
        with pytest.raises(FormatError):
            H.encode_context({"k": "x" * (H.MAX_CONTEXT_BYTES + 1)})
        with pytest.raises(FormatError):
            H.encode_context({"": "v"})


def test_str_subclasses_are_encoded_by_their_text() -> None:
    class Loud(str):
        def __eq__(self, other: object) -> bool:
            return True

        def __hash__(self) -> int:
            return hash("a")  # collides with the entry below on purpose

    H.encode_context({"a": "1"})
    assert H.encode_context({Loud("z"): "1"}) == b"\x00\x01\x00\x01z\x00\x011"


def test_stanza_sections_of_tuples_and_lists_agree() -> None:
    other = H.KeyStanza("kmsenv-embedded", "acs:kms:cn-hangzhou:1:key/other", "", b"\x02" * 8)
    one = H.stanza_section((STANZA,))
    assert H.stanza_section([STANZA]) == one
    assert one[0] == 1 and one.endswith(b"\x01" * 40)
    two = H.stanza_section((STANZA, other))
    assert two[0] == 2 and two.startswith(b"\x02" + one[1:]) and two.endswith(b"\x02" * 8)
    with pytest.raises(TypeError):
        H.stanza_section((STANZA, "not a stanza"))  # type: ignore[arg-type]
