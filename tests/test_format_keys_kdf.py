"""The per-file keys equal the KDF of docs/format.md §6, computed here from its definition.

FileKey memoises the HKDF info strings per (suite, chunk size, context): these tests interleave
different settings so that a stale or shared info string would give a wrong key and fail.
"""

from __future__ import annotations

import os

from hypothesis import given, settings
from hypothesis import strategies as st

from kmsenv import _crypto
from kmsenv.format import KeyStanza, new_header, open_header, parse_header
from kmsenv.format.header import encode_context

STANZA = KeyStanza("acs-kms", "acs:kms:cn-hangzhou:1:key/k", "v1", b"\x05" * 64)
CONTEXTS = st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=8), max_size=3)


def _spec_key(data_key: bytes, salt: bytes, purpose: bytes, chunk_size: int, context: dict[str, str]) -> bytes:
    binding = b"\x00\x01" + bytes([chunk_size.bit_length() - 1]) + encode_context(context)
    info = b"kmsenv-v1\x00" + purpose + b"\x00" + binding
    return _crypto.hkdf_sha256(data_key, salt=salt, info=info, length=32)


@settings(max_examples=40, deadline=None)
@given(contexts=st.lists(CONTEXTS, min_size=2, max_size=4), log2s=st.lists(st.integers(12, 24), min_size=2, max_size=4))
def test_interleaved_settings_each_derive_the_specified_keys(contexts: list[dict[str, str]], log2s: list[int]) -> None:
    for context in contexts:
        for log2 in log2s:
            data_key = bytearray(os.urandom(32))
            header, file_key = new_header(data_key, stanzas=[STANZA], context=context, chunk_size=1 << log2)
            salt = header.salt
            commitment = _spec_key(bytes(data_key), salt, b"commitment", 1 << log2, context)
            mac_key = _spec_key(bytes(data_key), salt, b"header-mac", 1 << log2, context)
            payload = _spec_key(bytes(data_key), salt, b"payload", 1 << log2, context)
            assert header.commitment == commitment
            assert header.tag == _crypto.hmac_sha256(mac_key, header.authenticated_bytes())
            nonce = os.urandom(12)
            assert file_key.aead.encrypt(nonce, b"chunk", None) == _crypto.AesGcm(payload).encrypt(nonce, b"chunk")
            reopened = open_header(parse_header(header.encode())[0], data_key)
            assert reopened.aead.encrypt(nonce, b"chunk", None) == file_key.aead.encrypt(nonce, b"chunk", None)
            file_key.wipe()
            reopened.wipe()


def test_each_file_gets_its_own_salt_and_keys() -> None:
    data_key = bytearray(os.urandom(32))
    first, k1 = new_header(data_key, stanzas=[STANZA], context={"a": "1"}, chunk_size=4096)
    second, k2 = new_header(data_key, stanzas=[STANZA], context={"a": "1"}, chunk_size=4096)
    assert first.salt != second.salt
    assert first.commitment != second.commitment
    nonce = bytes(12)
    assert k1.aead.encrypt(nonce, b"x", None) != k2.aead.encrypt(nonce, b"x", None)
