"""The root key, and sealing of CMK version material at rest.

Key material is only ever stored sealed: AES-256-GCM under the root key, with the key id and
version id bound as AAD so a sealed value cannot be moved to another key or version row. The root
key never lives in the database: by default it is ``root.key`` in the KMS home (created 0600 on
first use), or the file named by ``KMSENV_ROOT_KEY_FILE``. A database copied without the root key
yields nothing.

A store remembers a *check value* sealed under its root key; opening it with another root key is
refused up front, instead of failing later on every key (or, worse, mixing two root keys in one
store).
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any

from kmsenv import _crypto
from kmsenv.errors import ConfigError, IntegrityError

__all__ = ["ROOT_KEY_ENV", "RootKey", "load_or_create_root_key"]

ROOT_KEY_ENV = "KMSENV_ROOT_KEY_FILE"
_FILE_PREFIX = "kmsenv-root-key-v1:"
_SEAL_VERSION = b"\x01"
_CHECK_PLAINTEXT = b"kmsenv root key check"


class RootKey:
    """The sealing key. Its repr never shows material and it refuses pickling."""

    __slots__ = ("_aead", "fingerprint")

    def __init__(self, material: bytes) -> None:
        if len(material) != 32:
            raise ConfigError("the root key must be 32 bytes (AES-256)")
        self._aead = _crypto.AesGcm(material)
        # A non-secret identifier to tell root keys apart in messages: HMAC, not a hash of the key.
        self.fingerprint = _crypto.hmac_sha256(material, b"kmsenv/root-key-fingerprint").hex()[:16]

    def __repr__(self) -> str:
        return f"RootKey(fingerprint={self.fingerprint})"

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("RootKey holds key material and cannot be pickled")

    def seal(self, plaintext: bytes, *, aad: bytes) -> bytes:
        nonce = _crypto.random_bytes(_crypto.GCM_NONCE_SIZE)
        return _SEAL_VERSION + nonce + self._aead.encrypt(nonce, plaintext, b"kmsenv/seal/v1" + aad)

    def unseal(self, sealed: bytes, *, aad: bytes, what: str) -> bytes:
        if len(sealed) < 1 + _crypto.GCM_NONCE_SIZE + _crypto.GCM_TAG_SIZE or sealed[:1] != _SEAL_VERSION:
            raise IntegrityError(f"{what} is not a sealed value of a known layout")
        nonce = sealed[1 : 1 + _crypto.GCM_NONCE_SIZE]
        return self._aead.decrypt(nonce, sealed[1 + _crypto.GCM_NONCE_SIZE :], b"kmsenv/seal/v1" + aad, what=what)

    def material_aad(self, key_id: str, key_version_id: str) -> bytes:
        return f"material:{key_id}:{key_version_id}".encode("ascii")

    def make_check(self) -> bytes:
        return self.seal(_CHECK_PLAINTEXT, aad=b"root-check")

    def verify_check(self, sealed: bytes) -> bool:
        try:
            return self.unseal(sealed, aad=b"root-check", what="root key check") == _CHECK_PLAINTEXT
        except IntegrityError:
            return False


def _write_new_key_file(path: Path) -> bytes:
    material = _crypto.random_bytes(32)
    text = _FILE_PREFIX + base64.b64encode(material).decode("ascii") + "\n"
    # Written complete to a private temporary name, then published with link(), which fails if
    # the name exists: two processes racing to create the home never both install a root key, and
    # the loser never reads a half-written one; it reads the winner's. Mode 0600 regardless of
    # umask (fchmod after open).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{_crypto.random_bytes(6).hex()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, text.encode("ascii"))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.link(tmp, path)
    finally:
        os.unlink(tmp)
    return material


def _read_key_file(path: Path) -> bytes:
    try:
        text = path.read_text("ascii").strip()
    except FileNotFoundError:
        raise ConfigError(f"root key file {path} does not exist", hint=f"check {ROOT_KEY_ENV}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read root key file {path}: {exc.__class__.__name__}") from None
    if not text.startswith(_FILE_PREFIX):
        raise ConfigError(f"{path} is not a kmsenv root key file")
    try:
        material = base64.b64decode(text[len(_FILE_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(f"{path} is not a kmsenv root key file (bad base64)") from None
    if len(material) != 32:
        raise ConfigError(f"{path} does not hold a 32-byte root key")
    return material


def load_or_create_root_key(home: Path, *, create: bool) -> tuple[RootKey, bool]:
    """Load the root key (``KMSENV_ROOT_KEY_FILE`` or ``home/root.key``); create the default one
    if allowed and absent. Returns the key and whether it was created now."""
    named = os.environ.get(ROOT_KEY_ENV)
    if named:
        return RootKey(_read_key_file(Path(named))), False
    path = home / "root.key"
    if create:
        try:
            return RootKey(_write_new_key_file(path)), True
        except FileExistsError:
            pass
    return RootKey(_read_key_file(path)), False
