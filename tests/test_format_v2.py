"""Format v2 at the codec level: the region layout and writer policy, slot selection, in-place
rewrap writes, and crash simulation (every byte boundary of every slot write, torn and garbled)."""

from __future__ import annotations

import dataclasses

import pytest

from kmsenv.errors import FormatError, IntegrityError
from kmsenv.format import Header, KeyStanza, open_header, parse_header, rewrap_header, slot_writes
from kmsenv.format.header import (
    MAX_GENERATION,
    MAX_SLOT_CAPACITY,
    SLOT_OVERHEAD,
    slot_check,
    slot_size_for,
    stanza_section,
)
from kmsenv.format.keys import _new_header

KEY = bytes(range(32))
SALT = bytes(range(32, 64))
ARN = "acs:kms:cn-hangzhou:1234567890123456:key/key-"


def stanza(i: int, blob_size: int = 40) -> KeyStanza:
    return KeyStanza("acs-kms", f"{ARN}{i}", f"v{i}", bytes([i + 1]) * blob_size)


def fresh(*stanzas: KeyStanza, version: int = 2) -> Header:
    return _new_header(KEY, stanzas=stanzas, context={"app": "v2"}, chunk_size=4096, salt=SALT, version=version)[0]


def apply(region: bytes, writes: list[tuple[int, bytes]]) -> bytes:
    out = bytearray(region)
    for offset, slot in writes:
        out[offset : offset + len(slot)] = slot
    return bytes(out)


def rewrap(header: Header, *stanzas: KeyStanza) -> Header:
    return rewrap_header(header, open_header(header, KEY), stanzas)


# --- layout and writer policy ---------------------------------------------------------------------


def test_new_file_layout() -> None:
    header = fresh(stanza(1))
    region = header.encode()
    assert region[:8] == b"KMSENV\x00\x02"
    assert int.from_bytes(region[8:12], "big") == header.size == len(region)
    a, b = header.slot_offset(0), header.slot_offset(1)
    assert b - a == header.slot_size and header.size - b == header.slot_size
    assert (header.active, header.generation) == (0, 1)
    assert region[b:] == bytes(header.slot_size)  # slot B unused: zeros
    slot_a = region[a:b]
    assert slot_a[:8] == (1).to_bytes(8, "big")
    assert slot_a[-16:] == slot_check(slot_a[:-16])
    section = header.stanza_section()
    assert slot_a[8 : 8 + len(section)] == section
    assert not any(slot_a[8 + len(section) : -48])  # zero padding


@pytest.mark.parametrize(
    ("section", "capacity"),
    [(11, 1024), (233, 1024), (512, 1024), (513, 1024 + 256), (600, 1280), (5000, 10240), (40000, MAX_SLOT_CAPACITY)],
)
def test_slot_capacity_policy(section: int, capacity: int) -> None:
    """max(1 KiB, 2 x section), rounded up to 256 bytes, capped at 64 KiB (docs/format.md §9.10)."""
    assert slot_size_for(section) == capacity + SLOT_OVERHEAD


def real(i: int) -> KeyStanza:
    """A stanza of real proportions: a key ARN with a UUID, a UUID version id, a 105-byte blob."""
    uuid = f"{i:08x}-0000-4000-8000-000000000000"
    return KeyStanza("acs-kms", f"acs:kms:cn-hangzhou:1234567890123456:key/{uuid}", uuid, bytes([i]) * 105)


def test_a_typical_one_key_file_can_take_three_more_keys_in_place() -> None:
    header = fresh(real(1))
    assert len(header.stanza_section()) == 233
    for n in range(2, 5):
        nxt = rewrap(header, *header.stanzas, real(n))
        assert slot_writes(header, nxt) is not None, n
        header = parse_header(apply(header.encode(), slot_writes(header, nxt) or []))[0]
    assert len(header.stanzas) == 4
    grown = rewrap(header, *header.stanzas, real(5))
    assert slot_writes(header, grown) is None and grown.size > header.size


# --- selection -------------------------------------------------------------------------------------


def test_higher_generation_is_selected_and_the_other_kept_verbatim() -> None:
    first = fresh(stanza(1))
    second = rewrap(first, stanza(1), stanza(2))
    assert (second.generation, second.active) == (2, 1)
    region = apply(first.encode(), slot_writes(first, second) or [])
    parsed = parse_header(region)[0]
    assert parsed == second
    assert parsed.standby == first.slot_bytes()  # the old slot, as the fallback
    assert parsed.encode() == region


def test_equal_generations_are_refused() -> None:
    header = fresh(stanza(1))
    twin = dataclasses.replace(header, active=1, standby=header.slot_bytes())
    with pytest.raises(FormatError, match="same generation"):
        parse_header(twin.encode())


def test_no_intact_slot_is_an_integrity_error() -> None:
    header = fresh(stanza(1))
    region = bytearray(header.encode())
    region[header.slot_offset(0) + 20] ^= 1
    with pytest.raises(IntegrityError, match="neither wrapped-key slot"):
        parse_header(bytes(region))


def test_a_damaged_selected_slot_falls_back_keylessly_but_a_bad_tag_does_not() -> None:
    first = fresh(stanza(1))
    second = rewrap(first, stanza(1), stanza(2))
    region = bytearray(apply(first.encode(), slot_writes(first, second) or []))
    b = second.slot_offset(1)
    damaged = bytearray(region)
    damaged[b + 30] ^= 1  # check no longer matches: slot B is not intact, slot A is used
    assert parse_header(bytes(damaged))[0].stanzas == (stanza(1),)
    forged = bytearray(region)
    end = b + second.slot_size
    forged[end - 17] ^= 1  # the tag, with the check recomputed: slot B intact but not authentic
    forged[end - 16 : end] = slot_check(bytes(forged[b : end - 16]))
    parsed = parse_header(bytes(forged))[0]
    assert parsed.generation == 2
    with pytest.raises(IntegrityError, match="header failed authentication"):
        open_header(parsed, KEY)  # no fallback to slot A after an authentication failure


# --- rewrap ------------------------------------------------------------------------------------------


def test_additions_write_one_slot_removals_two() -> None:
    first = fresh(stanza(1))
    added = rewrap(first, stanza(1), stanza(2))
    (only,) = slot_writes(first, added) or []
    assert only[0] == first.slot_offset(1)
    removed = rewrap(added, stanza(2))
    writes = slot_writes(added, removed) or []
    assert [w[0] for w in writes] == [added.slot_offset(0), added.slot_offset(1)]
    assert [int.from_bytes(w[1][:8], "big") for w in writes] == [3, 4]  # increasing generations
    region = apply(apply(first.encode(), [only]), writes)
    assert stanza(1).ciphertext_blob not in region
    assert parse_header(region)[0] == removed


def test_refresh_purges_the_old_wrapping() -> None:
    first = fresh(stanza(1))
    refreshed = rewrap(first, dataclasses.replace(stanza(1), key_version_id="v2", ciphertext_blob=b"\x77" * 40))
    region = apply(first.encode(), slot_writes(first, refreshed) or [])
    assert stanza(1).ciphertext_blob not in region
    assert len(slot_writes(first, refreshed) or []) == 2


def test_v1_converts_to_v2_with_the_same_payload_key() -> None:
    v1 = fresh(stanza(1), version=1)
    file_key = open_header(v1, KEY)
    v2 = rewrap_header(v1, file_key, (stanza(2),))
    assert v2.version == 2 and slot_writes(v1, v2) is None
    nonce = bytes(12)
    assert open_header(parse_header(v2.encode())[0], KEY).aead.encrypt(nonce, b"p") == file_key.aead.encrypt(
        nonce, b"p"
    )


def test_generation_exhaustion_rewrites_the_region() -> None:
    header = fresh(stanza(1))
    old = dataclasses.replace(header, generation=MAX_GENERATION - 1)
    old = dataclasses.replace(old, tag=open_header(header, KEY).tag(old))
    nxt = rewrap(old, stanza(1), stanza(2))
    assert nxt.generation == 1 and slot_writes(old, nxt) is None


def test_rewrap_beyond_the_format_limit_is_refused() -> None:
    big = [KeyStanza("acs-kms", "a" * 2048, "v" * 256, bytes([i]) * 4096) for i in range(1, 12)]
    with pytest.raises(FormatError, match="capacity of 65536"):
        rewrap(fresh(stanza(1)), *big)


# --- crash simulation ---------------------------------------------------------------------------------


def _crash_states(before: Header, after: Header, garble: bytes | None) -> list[tuple[int, int, bytes]]:
    """(write index, cut, region) for an interruption of each write at every byte boundary."""
    writes = slot_writes(before, after) or []
    states = []
    region = before.encode()
    for i, (offset, slot) in enumerate(writes):
        for cut in range(len(slot) + 1):
            torn = bytearray(region)
            torn[offset : offset + cut] = slot[:cut]
            if garble is not None and cut < len(slot):  # the rest of the slot is garbage, not old bytes
                rest = len(slot) - cut
                torn[offset + cut : offset + len(slot)] = (garble * (rest // len(garble) + 1))[:rest]
            states.append((i, cut, bytes(torn)))
        region = apply(region, [(offset, slot)])
    return states


@pytest.mark.parametrize("garble", [None, b"\xff", b"\x00", bytes(range(7, 256, 13))])
@pytest.mark.parametrize("change", ["add", "remove", "refresh"])
def test_a_write_interrupted_at_any_byte_leaves_a_file_that_opens(garble: bytes | None, change: str) -> None:
    base = fresh(stanza(1))
    base = parse_header(apply(base.encode(), slot_writes(base, rewrap(base, stanza(1), stanza(2))) or []))[0]
    new = {
        "add": (*base.stanzas, stanza(3)),
        "remove": (stanza(2),),
        "refresh": (stanza(1), dataclasses.replace(stanza(2), ciphertext_blob=b"\x55" * 40)),
    }[change]
    after = rewrap(base, *new)
    states = _crash_states(base, after, garble)
    assert len(states) == (1 if change == "add" else 2) * (base.slot_size + 1)
    for i, cut, region in states:
        header = parse_header(region)[0]
        open_header(header, KEY)
        # The first slot written is not intact until its last byte is (then it is selected);
        # once it is durable, the new stanzas are read from either slot.
        expected = base.stanzas if i == 0 and cut < after.slot_size else after.stanzas
        assert header.stanzas == expected, (i, cut)


def test_stanza_section_helper_matches_the_header() -> None:
    header = fresh(stanza(1), stanza(2))
    assert stanza_section(header.stanzas) == header.stanza_section()
    with pytest.raises(TypeError):
        stanza_section(["not a stanza"])  # type: ignore[list-item]
