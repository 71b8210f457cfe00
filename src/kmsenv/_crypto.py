"""Every cryptographic primitive kmsenv uses, and the only module that imports ``cryptography``.

Keeping the primitives behind this small surface means one place to audit: nothing else in kmsenv
touches a cipher, a MAC or a random-number source directly. ``pycryptodome`` is imported here too,
lazily and only for the AES-EAX of legacy files written by the reference document's sample code,
which ``cryptography`` does not offer.

Hashes and MACs come from ``cryptography`` too, not from ``hashlib``/``hmac``: those load CPython's
``_hashlib``, a second OpenSSL beside the one inside ``cryptography``, which alone took 3.7 MiB of a
``kmsenv encrypt`` process's peak RSS (docs/performance.md, "Peers"). The constant-time comparison
is ``_operator._compare_digest``, the C function ``hmac.compare_digest`` falls back to when
``_hashlib`` is absent (the same algorithm as ``_hashlib.compare_digest``).

Authentication failures surface as :class:`kmsenv.errors.IntegrityError` with a caller-chosen,
generic message: the caller decides what to tell the user, never the primitive.
"""

from __future__ import annotations

import os
from _operator import _compare_digest
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import hmac as _hmac
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from kmsenv.errors import IntegrityError

__all__ = [
    "GCM_NONCE_SIZE",
    "GCM_TAG_SIZE",
    "AesGcm",
    "constant_time_eq",
    "eax_decrypt",
    "eax_encrypt",
    "hkdf_sha256",
    "hkdf_sha256_into",
    "hmac_sha1",
    "hmac_sha256",
    "random_bytes",
    "scrypt",
    "sha256",
    "sha256_hex",
    "wipe",
]

GCM_NONCE_SIZE = 12
GCM_TAG_SIZE = 16
_SHA256 = hashes.SHA256()  # stateless: one instance serves every call


def random_bytes(n: int) -> bytes:
    """``n`` bytes from the operating system's CSPRNG."""
    return os.urandom(n)


def wipe(buf: bytearray | memoryview) -> None:
    """Overwrite a key buffer with zeros, in place.

    Only mutable buffers can be wiped: an equal-length slice assignment rewrites a ``bytearray``'s
    own storage (no reallocation), so the key bytes it held are gone from that allocation. Copies
    made elsewhere (``bytes`` from base64 decoding, JSON text, OpenSSL's key schedule inside an
    ``AESGCM`` object) are out of reach; docs/security.md ("Plaintext key buffers") lists them.
    """
    buf[:] = bytes(len(buf))


def constant_time_eq(a: bytes, b: bytes) -> bool:
    """Compare two byte strings in time that depends only on their lengths."""
    return _compare_digest(a, b)


def sha256(data: bytes) -> bytes:
    digest = hashes.Hash(_SHA256)
    digest.update(data)
    return digest.finalize()


def sha256_hex(data: bytes) -> str:
    return sha256(data).hex()


def _hmac_digest(key: bytes | bytearray, msg: bytes, algorithm: hashes.HashAlgorithm) -> bytes:
    mac = _hmac.HMAC(key, algorithm)
    mac.update(msg)
    return mac.finalize()


def hmac_sha256(key: bytes | bytearray, msg: bytes) -> bytes:
    return _hmac_digest(key, msg, _SHA256)


def hmac_sha1(key: bytes, msg: bytes) -> bytes:
    """Only for Alibaba's v1 request signatures, which are defined over HMAC-SHA1."""
    return _hmac_digest(key, msg, hashes.SHA1())  # noqa: S303 - fixed by the Alibaba v1 protocol


def hkdf_sha256(ikm: bytes | bytearray, *, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869) extract-and-expand.

    ``ikm`` may be a ``bytearray`` the caller wipes afterwards: it is read in place, not copied
    into a Python ``bytes`` first (OpenSSL's HMAC state holds its own copy until it is freed).
    """
    return HKDF(algorithm=_SHA256, length=length, salt=salt, info=info).derive(ikm)


def hkdf_sha256_into(ikm: bytes | bytearray, *, salt: bytes, info: bytes, out: bytearray) -> None:
    """HKDF-SHA256 writing ``len(out)`` bytes into ``out``: a derived key the caller can wipe.

    :func:`hkdf_sha256` returns immutable ``bytes``; this writes into the caller's buffer instead,
    so no copy of the derived key is left in a Python object kmsenv cannot overwrite.
    """
    HKDF(algorithm=_SHA256, length=len(out), salt=salt, info=info).derive_into(ikm, out)


def scrypt(passphrase: bytes, *, salt: bytes, n: int, r: int, p: int, length: int = 32) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=length, n=n, r=r, p=p).derive(passphrase)


class AesGcm:
    """AES-GCM under one key, with a 12-byte nonce and 16-byte tag.

    Build one per key and reuse it: constructing the OpenSSL context is the expensive part. One
    instance may be used from several threads. cryptography releases the GIL inside AEAD calls on
    inputs of 2 KiB or more from release 50 on (pyca/cryptography#15361; measured here: 2 threads
    1.4x one thread on 1 MiB chunks, where 48 gave 0.97x), hence the version floor. AES-GCM runs at
    ~9 GB/s per core here, so for files the cipher is rarely the bottleneck: I/O is.
    The repr never shows the key.
    """

    __slots__ = ("_aead",)

    def __init__(self, key: bytes | bytearray) -> None:
        # A bytearray key may be wiped by the caller once this object exists: OpenSSL keeps its own copy.
        if len(key) not in (16, 24, 32):
            raise ValueError("AES key must be 16, 24 or 32 bytes")
        self._aead = AESGCM(key)

    def __repr__(self) -> str:
        return "AesGcm(<key hidden>)"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("AesGcm objects hold key material and cannot be pickled")

    def encrypt(self, nonce: bytes, data: bytes, aad: bytes | None = None) -> bytes:
        """Return ciphertext || tag."""
        return self._aead.encrypt(nonce, data, aad)

    def encrypt_into(self, nonce: bytes, data: bytes | memoryview, aad: bytes | None, out: memoryview) -> None:
        """Write ciphertext || tag into ``out`` (exactly ``len(data) + 16`` bytes): no allocation."""
        self._aead.encrypt_into(nonce, data, aad, out)

    def decrypt(self, nonce: bytes, data: bytes | memoryview, aad: bytes | None, *, what: str) -> bytes:
        """Verify and decrypt ciphertext || tag; on failure raise IntegrityError naming ``what``."""
        try:
            return self._aead.decrypt(nonce, data, aad)
        except InvalidTag:
            raise IntegrityError(f"{what} failed authentication") from None

    def decrypt_into(
        self, nonce: bytes, data: bytes | memoryview, aad: bytes | None, out: memoryview, *, what: str
    ) -> None:
        """Verify and decrypt into ``out`` (exactly ``len(data) - 16`` bytes).

        On failure ``out`` may hold garbage; callers must not release it.
        """
        try:
            self._aead.decrypt_into(nonce, data, aad, out)
        except InvalidTag:
            raise IntegrityError(f"{what} failed authentication") from None


def eax_encrypt(key: bytes, plaintext: bytes, *, nonce: bytes | None = None) -> tuple[bytes, bytes, bytes]:
    """AES-EAX as the reference sample uses it (16-byte nonce, 16-byte tag): (nonce, ciphertext, tag).

    Only for tests and vectors that reproduce legacy files; kmsenv never writes this format itself.
    """
    from Crypto.Cipher import AES

    cipher = AES.new(key, AES.MODE_EAX, nonce=nonce)
    ciphertext, tag = cipher.encrypt_and_digest(plaintext)
    return bytes(cipher.nonce), ciphertext, tag


def eax_decrypt(key: bytes, nonce: bytes, ciphertext: bytes, tag: bytes, *, what: str) -> bytes:
    """Verify and decrypt AES-EAX; on failure raise IntegrityError naming ``what``."""
    from Crypto.Cipher import AES

    if len(key) not in (16, 24, 32):
        raise IntegrityError(f"{what} failed authentication: the data key has an invalid length")
    cipher = AES.new(key, AES.MODE_EAX, nonce=nonce)
    try:
        return bytes(cipher.decrypt_and_verify(ciphertext, tag))
    except ValueError:
        raise IntegrityError(f"{what} failed authentication") from None
