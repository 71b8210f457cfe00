"""The CiphertextBlob: kmsenv's own versioned binary layout, sent base64-encoded.

Layout of version 1 (all fields fixed size; docs/api.md is the normative description)::

    offset  size  field
    0       1     layout version = 0x01
    1       16    key id (UUID, binary)
    17      16    key version id (UUID, binary)
    33      12    AES-GCM nonce (random)
    45      n     ciphertext of the Plaintext string's UTF-8 bytes
    45+n    16    GCM tag

The AAD is ``b"kmsenv/blob/v1" || bytes[0:33] || canonical(EncryptionContext)``. Binding the key
id and version in the AAD (as well as using that version's own material) means a blob cannot be
relabelled to another key or version, and binding the context means it opens only with the
same context. Decrypt needs no KeyId: the blob says which key and version.
"""

from __future__ import annotations

import base64
import binascii
import uuid
from dataclasses import dataclass

from kmsenv.errors import KmsError

__all__ = ["BLOB_VERSION", "MAX_BLOB_BYTES", "ParsedBlob", "blob_aad", "blob_prefix", "decode_blob", "encode_blob"]

BLOB_VERSION = 1
_PREFIX = 1 + 16 + 16
_NONCE = 12
_TAG = 16
#: Upper bound on a decoded blob (Encrypt's Plaintext is at most 6 KiB); refuse larger input early.
MAX_BLOB_BYTES = 16 * 1024
_AAD_LABEL = b"kmsenv/blob/v1"


@dataclass(frozen=True, slots=True)
class ParsedBlob:
    key_id: str
    key_version_id: str
    prefix: bytes
    nonce: bytes
    sealed: bytes  # ciphertext || tag


def _invalid(why: str) -> KmsError:
    return KmsError("InvalidCiphertext", f"The specified CiphertextBlob is not valid: {why}.")


def blob_aad(prefix: bytes, context: bytes) -> bytes:
    return _AAD_LABEL + prefix + context


def encode_blob(prefix: bytes, nonce: bytes, sealed: bytes) -> str:
    return base64.b64encode(prefix + nonce + sealed).decode("ascii")


def blob_prefix(key_id: str, key_version_id: str) -> bytes:
    return bytes([BLOB_VERSION]) + uuid.UUID(key_id).bytes + uuid.UUID(key_version_id).bytes


def decode_blob(text: str) -> ParsedBlob:
    """Parse a base64 CiphertextBlob; raise InvalidCiphertext if it cannot be one of ours."""
    if len(text) > (MAX_BLOB_BYTES * 4) // 3 + 4:
        raise _invalid("it is too long")
    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, ValueError, UnicodeEncodeError):
        raise _invalid("it is not valid base64") from None
    if len(raw) < _PREFIX + _NONCE + _TAG:
        raise _invalid("it is too short")
    if raw[0] != BLOB_VERSION:
        raise _invalid("unknown layout version (not produced by this KMS)")
    key_id = str(uuid.UUID(bytes=raw[1:17]))
    version_id = str(uuid.UUID(bytes=raw[17:33]))
    return ParsedBlob(key_id, version_id, raw[:_PREFIX], raw[_PREFIX : _PREFIX + _NONCE], raw[_PREFIX + _NONCE :])
