"""Per-file keys of formats v1 and v2: the KDF, the key commitment and the header tags (docs/format.md §6).

This module owns everything in the header that needs the data key. From one data key and the
header's random salt it derives three values, each under its own HKDF label:

* the payload key (AES-256-GCM for the chunks),
* the commitment, stored in the header: GCM is not key-committing, so without it one file could
  decrypt to different plaintexts under two data keys wrapped for two recipients ("invisible
  salamanders", partitioning oracles);
* the header MAC key, for the HMAC-SHA256 tag over every header byte before the tag.

The wrapped-key stanzas are deliberately *not* KDF input, only tag input: ``rewrap`` replaces
them and recomputes the tag without touching the payload. Everything else in the header (suite,
chunk size, context) is bound into the KDF as well as the tag. v2 derives exactly as v1 (same
label): a v1 file converts to v2 by rewriting its header only, the payload bytes unchanged; the
tags of the two versions cannot be swapped because each covers the magic with its version byte.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from kmsenv import _crypto
from kmsenv.errors import FormatError, IntegrityError
from kmsenv.format.header import (
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    MAX_GENERATION,
    SALT_SIZE,
    SUITE_AES256GCM_HKDF_SHA256,
    Header,
    KeyStanza,
    chunk_log2,
    encode_context,
    slot_size_for,
    stanza_section,
    zero_slot,
)

__all__ = ["DATA_KEY_SIZE", "FileKey", "new_header", "open_header", "rewrap_header"]

DATA_KEY_SIZE = 32
KDF_LABEL = b"kmsenv-v1"
_PURPOSES = (b"payload", b"commitment", b"header-mac")
#: The one message for every header authentication failure: wrong key and modified header must
#: look the same to whoever is probing.
_HEADER_FAILED = "header failed authentication: the file was modified or the data key is wrong"


# Memoised: every file of a folder run has the same suite, chunk size and context, so the same
# three HKDF info strings. They are public (built from header fields); the salt, the only per-file
# KDF input besides the data key, is not part of them.
@functools.lru_cache(maxsize=32)
def _kdf_infos(suite: int, log2: int, context_section: bytes) -> tuple[bytes, ...]:
    """The HKDF info of each purpose: label ‖ 0 ‖ purpose ‖ 0 ‖ suite ‖ chunk_log2 ‖ context section."""
    binding = b"".join((suite.to_bytes(2, "big"), bytes([log2]), context_section))
    return tuple(KDF_LABEL + b"\x00" + purpose + b"\x00" + binding for purpose in _PURPOSES)


class FileKey:
    """The keys derived for one file. A handle: its repr shows nothing and it refuses pickling.

    Only :mod:`kmsenv.format` builds these (via :func:`new_header` or :func:`open_header`).
    The data key is read in place, never copied; the payload key is derived into a buffer that is
    zeroed as soon as the cipher holds it; the header MAC key stays in a ``bytearray`` until
    :meth:`wipe` (or the end of a ``with`` block) zeroes it and drops the cipher, after which the
    handle refuses to be used. The commitment is not secret (it is stored in the header).
    """

    __slots__ = ("_aead", "_chunk_size", "_commitment", "_mac_key")

    def __init__(
        self,
        data_key: bytes | bytearray,
        *,
        suite: int,
        chunk_size: int,
        context: Mapping[str, str],
        salt: bytes,
    ) -> None:
        if suite != SUITE_AES256GCM_HKDF_SHA256:
            raise FormatError(f"unsupported algorithm suite {suite}")
        if not isinstance(data_key, bytes | bytearray) or len(data_key) != DATA_KEY_SIZE:
            raise FormatError(f"suite {suite} needs a {DATA_KEY_SIZE}-byte data key")
        payload, commitment, mac_key = bytearray(32), bytearray(32), bytearray(32)
        infos = _kdf_infos(suite, chunk_log2(chunk_size), encode_context(context))
        # Three full HKDFs, not one Extract shared by three Expands: the same bytes (RFC 5869) and
        # measured ~1.7 us less per file, but cryptography returns the shared PRK (enough to derive
        # all three keys) as immutable bytes that could never be wiped.
        for info, out in zip(infos, (payload, commitment, mac_key), strict=True):
            _crypto.hkdf_sha256_into(data_key, salt=salt, info=info, out=out)
        try:
            self._aead: _crypto.AesGcm | None = _crypto.AesGcm(payload)
        finally:
            _crypto.wipe(payload)  # OpenSSL keeps its own copy inside the cipher context
        self._commitment = bytes(commitment)
        _crypto.wipe(commitment)  # public (in the header); wiped so that every KDF output buffer ends zeroed
        self._mac_key = mac_key
        self._chunk_size = chunk_size

    @property
    def aead(self) -> _crypto.AesGcm:
        """The payload cipher (AES-256-GCM under the payload key)."""
        if self._aead is None:
            raise ValueError("this FileKey was wiped")
        return self._aead

    @property
    def chunk_size(self) -> int:
        """The chunk size this key was derived for (it is KDF input)."""
        return self._chunk_size

    def __repr__(self) -> str:
        return "FileKey(<hidden>)"

    def __reduce__(self) -> NoReturn:
        raise TypeError("FileKey objects hold key material and cannot be pickled")

    def __enter__(self) -> FileKey:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()

    def wipe(self) -> None:
        """Zero the header MAC key and drop the payload cipher; idempotent.

        The cipher's OpenSSL context (which holds the expanded payload key) is cleared by OpenSSL
        when it is freed: at once if nothing else still refers to :attr:`aead`.
        """
        _crypto.wipe(self._mac_key)
        self._aead = None

    @property
    def wiped(self) -> bool:
        return self._aead is None

    def tag(self, header: Header) -> bytes:
        if self._aead is None:
            raise ValueError("this FileKey was wiped")
        return _crypto.hmac_sha256(self._mac_key, header.authenticated_bytes())

    def commitment(self) -> bytes:
        return self._commitment


def _seal(draft: Header, file_key: FileKey) -> Header:
    """``draft`` with its tag computed (the tag field is excluded from what it covers)."""
    return draft.with_tag(file_key.tag(draft))


def new_header(
    data_key: bytes | bytearray,
    *,
    stanzas: Sequence[KeyStanza],
    context: Mapping[str, str],
    chunk_size: int = DEFAULT_CHUNK_SIZE,
) -> tuple[Header, FileKey]:
    """A fresh v2 header (random salt, commitment, tag) and the file key to encrypt the payload with.

    The stanzas go into slot A with generation 1; slot B is left unused (zero), ready for the
    first in-place rewrap. Slots get :func:`~kmsenv.format.header.slot_size_for` capacity.
    """
    return _new_header(
        data_key,
        stanzas=stanzas,
        context=context,
        chunk_size=chunk_size,
        salt=_crypto.random_bytes(SALT_SIZE),
    )


def _new_header(
    data_key: bytes | bytearray,
    *,
    stanzas: Sequence[KeyStanza],
    context: Mapping[str, str],
    chunk_size: int,
    salt: bytes,
    version: int = FORMAT_VERSION,
) -> tuple[Header, FileKey]:
    """:func:`new_header` with the salt (and version) passed in: the deterministic seam for tests."""
    suite = SUITE_AES256GCM_HKDF_SHA256
    stanzas = tuple(stanzas)  # a tuple of stanzas hits the header codec's encoding cache; a list does not
    file_key = FileKey(data_key, suite=suite, chunk_size=chunk_size, context=context, salt=salt)
    fields: dict[str, Any] = {}
    if version == 2:
        slot_size = slot_size_for(len(stanza_section(stanzas)))
        fields = {"version": 2, "slot_size": slot_size, "generation": 1, "active": 0, "standby": zero_slot(slot_size)}
    draft = Header(
        suite=suite,
        chunk_size=chunk_size,
        salt=salt,
        context=context,
        stanzas=stanzas,
        commitment=file_key.commitment(),
        tag=bytes(32),
        **fields,
    )
    return _seal(draft, file_key), file_key


def _fresh_region(header: Header, stanzas: tuple[KeyStanza, ...]) -> Header:
    """``header`` (v1 or v2) with ``stanzas`` in a new v2 region sized for them: slot A, generation 1.

    Not yet sealed (the tag is the old one): pass it to :func:`_seal`.
    """
    slot_size = slot_size_for(len(stanza_section(stanzas)))
    return dataclasses.replace(
        header, stanzas=stanzas, version=2, slot_size=slot_size, generation=1, active=0, standby=zero_slot(slot_size)
    )


def open_header(header: Header, data_key: bytes | bytearray) -> FileKey:
    """Check the commitment, then the header tag, both in constant time; return the file key.

    IntegrityError (one message for both checks) if either fails. Call this before decrypting any
    chunk: an unauthenticated header could carry an attacker's chunk size or context.
    """
    file_key = FileKey(
        data_key, suite=header.suite, chunk_size=header.chunk_size, context=header.context, salt=header.salt
    )
    # Commitment first: it is what makes a second data key (a malicious second stanza) fail
    # here instead of decrypting the payload to other plaintext.
    committed = _crypto.constant_time_eq(file_key.commitment(), header.commitment)
    tagged = _crypto.constant_time_eq(file_key.tag(header), header.tag)
    if not (committed and tagged):
        file_key.wipe()
        raise IntegrityError(_HEADER_FAILED)
    return file_key


def rewrap_header(header: Header, file_key: FileKey, stanzas: Sequence[KeyStanza]) -> Header:
    """``header`` with new wrapped keys: same salt, context and commitment, a new tag. Always v2.

    The payload stays valid because stanzas are not KDF input. ``file_key`` must be the one
    :func:`open_header` returned for this header (checked: a mismatched key would produce a
    header that no holder of the data key could open).

    For a v2 header whose slots can hold the new stanzas, the result has the same region: the
    new stanzas go into the other slot with the next generation (so :func:`slot_writes` can
    write them in place). If the old slot holds a wrapped key the new set does not (a key was
    removed or re-wrapped), it is overwritten too, with the same new stanzas and the generation
    after that, so no removed wrapped key survives in the file. Otherwise (a v1 header, or too
    many stanzas for the slots) the result is a fresh, larger v2 region: the file must be
    rewritten (its payload copied unchanged after the new region).
    """
    if not _crypto.constant_time_eq(file_key.commitment(), header.commitment):
        raise IntegrityError(_HEADER_FAILED)
    stanzas = tuple(stanzas)
    fits = header.version == 2 and len(stanza_section(stanzas)) <= header.capacity
    if fits and header.generation + 2 <= MAX_GENERATION:
        old_slot = header.slot_bytes()
        nxt = dataclasses.replace(
            header, stanzas=stanzas, generation=header.generation + 1, active=1 - header.active, standby=old_slot
        )
        nxt = _seal(nxt, file_key)
        if set(header.stanzas) <= set(stanzas):
            return nxt  # only additions: the old slot may stay, as the fallback
        purged = dataclasses.replace(nxt, generation=nxt.generation + 1, active=header.active, standby=nxt.slot_bytes())
        return _seal(purged, file_key)
    return _seal(_fresh_region(header, stanzas), file_key)
