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


def _v2(stanzas: tuple[H.KeyStanza, ...], tag: bytes = b"\x11" * 32) -> H.Header:
    size = H.slot_size_for(len(H.stanza_section(stanzas)))
    return H.Header(
        suite=1, chunk_size=4096, salt=b"\x01" * 32, context={"a": "1"}, stanzas=stanzas, commitment=b"\x02" * 32,
        tag=tag, version=2, slot_size=size, generation=1, active=0, standby=H.zero_slot(size),
    )  # fmt: skip


def test_with_tag_equals_the_header_built_with_that_tag() -> None:
    draft = _v2((STANZA,))
    sealed = draft.with_tag(b"\x33" * 32)
    assert sealed == _v2((STANZA,), tag=b"\x33" * 32)
    assert sealed.encode() == _v2((STANZA,), tag=b"\x33" * 32).encode()
    assert draft.tag == b"\x11" * 32  # the draft is unchanged
    with pytest.raises(FormatError):
        draft.with_tag(b"\x33" * 31)


def test_slot_parses_follow_the_bytes_not_an_earlier_file() -> None:
    other = H.KeyStanza("kmsenv-embedded", "acs:kms:cn-hangzhou:1:key/k", "v1", b"\x09" * 40)  # same length
    for stanzas in ((STANZA,), (other,), (STANZA,)):
        parsed, _ = H.parse_header(_v2(stanzas).encode())
        assert parsed.stanzas == stanzas


def test_a_slot_with_nonzero_padding_fails_every_time() -> None:
    header = _v2((STANZA,))
    raw = bytearray(header.encode())
    start = header.slot_offset(0)
    raw[start + header.slot_size - 49] = 1  # the last padding byte, just before the tag
    body = bytes(raw[start : start + header.slot_size - H.CHECK_SIZE])
    raw[start + header.slot_size - H.CHECK_SIZE : start + header.slot_size] = H.slot_check(body)
    for _ in range(3):
        with pytest.raises(FormatError, match="padding"):
            H.parse_header(bytes(raw))


def _with_context(context: dict[str, str]) -> H.Header:
    draft = _v2((STANZA,))
    return H.Header(
        suite=1, chunk_size=4096, salt=draft.salt, context=context, stanzas=(STANZA,), commitment=draft.commitment,
        tag=draft.tag, version=2, slot_size=draft.slot_size, generation=1, active=0, standby=draft.standby,
    )  # fmt: skip


def test_context_parses_follow_the_bytes_across_more_contexts_than_are_remembered() -> None:
    contexts = [{"a": str(i)} for i in range(6)] + [{"a": "0", "b": ""}, {}, {"a": "0"}]
    for _ in range(2):
        for context in contexts:
            parsed, _ = H.parse_header(_with_context(context).encode())
            assert dict(parsed.context) == context
            assert parsed.stanzas == (STANZA,)


def test_a_malformed_context_fails_every_time_after_a_valid_one_like_it() -> None:
    good = _with_context({"a": "1", "b": "2"}).encode()
    H.parse_header(good)
    swapped = good.replace(b"\x00\x01a\x00\x011\x00\x01b\x00\x012", b"\x00\x01b\x00\x012\x00\x01a\x00\x011")
    assert swapped != good
    for _ in range(3):
        with pytest.raises(FormatError, match="not sorted"):
            H.parse_header(swapped)
    assert dict(H.parse_header(good)[0].context) == {"a": "1", "b": "2"}


def test_a_header_copy_with_other_fields_encodes_its_own_sections() -> None:
    import dataclasses

    other = H.KeyStanza("kmsenv-embedded", "acs:kms:cn-hangzhou:1:key/other", "", b"\x02" * 8)
    first = _v2((STANZA,))
    second = dataclasses.replace(first, stanzas=(other,), context={"z": "9"})
    assert second.stanza_section() == H.stanza_section((other,))
    assert H.encode_context({"z": "9"}) in second.immutable_bytes()
    parsed, _ = H.parse_header(second.encode())
    assert parsed == second and parsed.stanzas == (other,) and dict(parsed.context) == {"z": "9"}
    assert first.stanza_section() == H.stanza_section((STANZA,))


def test_a_v2_header_with_an_invalid_context_cannot_be_built() -> None:
    with pytest.raises(FormatError):
        _with_context({"k": "x" * (H.MAX_CONTEXT_BYTES + 1)})
