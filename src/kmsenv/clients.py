"""The ``Kms`` protocol the envelope layer talks to, and its implementations.

The envelope layer (files, streams) needs four things from a KMS: make a data key, unwrap one,
wrap an existing one under another CMK, and re-wrap one without exposing it. This module names
those four as a :class:`Kms` protocol. :class:`EmbeddedKms` calls the in-process service directly;
a remote implementation (official Alibaba SDK, any endpoint) comes with the server work.

Data keys travel through the KMS as base64 text, exactly as Alibaba does it: ``GenerateDataKey``
returns ``Plaintext`` as base64, and ``Decrypt`` of its blob returns that same string. So a data key
wrapped with :meth:`Kms.encrypt_data_key` is sent as base64 too, and every blob this protocol
produces decrypts to base64 text. The protocol hands callers raw bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from kmsenv.errors import KmsError

if TYPE_CHECKING:
    from kmsenv.kms.service import KmsService

__all__ = ["AlibabaKms", "DataKey", "EmbeddedKms", "Kms", "UnwrappedKey", "WrappedKey"]

#: Provider id written into file headers for any KMS speaking the Alibaba Cloud KMS 2016-01-20 API
#: (the embedded one, a kmsenv server, the real cloud): the key ARN says which one.
ACS_KMS_PROVIDER = "acs-kms"


@dataclass(frozen=True, slots=True)
class WrappedKey:
    """A data key wrapped under one CMK version: what a file keeps instead of the key."""

    key_id: str
    key_arn: str
    key_version_id: str
    ciphertext_blob: str


def _wipe(buf: bytes | bytearray) -> None:
    """Zero ``buf`` in place if it is mutable (``bytes`` cannot be: a caller's own Kms may return them).

    Written here rather than imported from ``kmsenv._crypto``: this module must stay importable
    without ``cryptography`` (the CLI imports it before it knows it needs a cipher).
    """
    if isinstance(buf, bytearray):
        buf[:] = bytes(len(buf))


@dataclass(frozen=True, slots=True)
class DataKey:
    """A fresh data key: its plaintext (never shown in repr) and its wrapped form.

    ``plaintext`` is ``bytes`` from the public ``Kms`` methods. The file commands get theirs
    from kmsenv's own clients in a ``bytearray`` instead (:func:`generate_wipeable`), so that
    :meth:`wipe` can zero it once the file's keys are derived; ``wipe`` leaves ``bytes`` alone.
    """

    wrapped: WrappedKey
    plaintext: bytes | bytearray = field(repr=False)

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("DataKey holds key material and cannot be pickled")

    def wipe(self) -> None:
        """Overwrite the plaintext with zeros, in place, if it is a ``bytearray``."""
        _wipe(self.plaintext)


@dataclass(frozen=True, slots=True)
class UnwrappedKey:
    """The result of unwrapping a blob: which CMK version did it, and the key (never in repr).

    ``plaintext`` is ``bytes`` from the public methods, a ``bytearray`` that :meth:`wipe` zeroes
    from :func:`decrypt_wipeable` (see :class:`DataKey`).
    """

    key_id: str
    key_version_id: str
    plaintext: bytes | bytearray = field(repr=False)

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("UnwrappedKey holds key material and cannot be pickled")

    def wipe(self) -> None:
        """Overwrite the plaintext with zeros, in place, if it is a ``bytearray``."""
        _wipe(self.plaintext)


@runtime_checkable
class Kms(Protocol):
    """What the envelope layer needs from a KMS.

    Contract, for every implementation:
    - ``key_id`` accepts a key id, key ARN, alias name (``alias/...``) or alias ARN;
    - ``encryption_context`` is bound to the blob and must be given again, equal as a map, to unwrap;
      an empty mapping means no context;
    - failures raise :class:`kmsenv.errors.KmsError` carrying the Alibaba error code;
    - a returned :class:`DataKey`/:class:`UnwrappedKey` is the caller's: if its plaintext is a
      ``bytearray`` the file commands zero it once the file's keys are derived, so an
      implementation returns a fresh buffer each time (kmsenv's own return ``bytes``).
    """

    @property
    def provider_id(self) -> str:
        """Identifies the kind of KMS in file headers (``acs-kms`` for Alibaba-compatible ones)."""
        ...

    def generate_data_key(
        self, key_id: str, *, encryption_context: Mapping[str, str], number_of_bytes: int = 32
    ) -> DataKey: ...

    def decrypt_data_key(self, ciphertext_blob: str, *, encryption_context: Mapping[str, str]) -> UnwrappedKey: ...

    def encrypt_data_key(
        self, key_id: str, plaintext: bytes, *, encryption_context: Mapping[str, str]
    ) -> WrappedKey: ...

    def re_encrypt_data_key(
        self,
        ciphertext_blob: str,
        *,
        destination_key_id: str,
        source_encryption_context: Mapping[str, str],
        destination_encryption_context: Mapping[str, str],
    ) -> WrappedKey: ...


def _b64_data_key(text: str) -> bytearray:
    """Decode the base64 ``Plaintext`` a KMS returned for a data key, into a wipeable buffer.

    (The ``bytes`` that ``b64decode`` returns is freed at once, but not zeroed: docs/security.md.)
    """
    try:
        return bytearray(base64.b64decode(text, validate=True))
    except (binascii.Error, ValueError):
        raise KmsError(
            "InvalidCiphertext", "The CiphertextBlob does not hold a data key (its plaintext is not base64)."
        ) from None


def _context_param(context: Mapping[str, str]) -> dict[str, str]:
    """Wire form of a context: absent when empty (an empty context is no context)."""
    if not context:
        return {}
    return {"EncryptionContext": json.dumps(dict(context), ensure_ascii=False, separators=(",", ":"))}


class _ActionKms:
    """The four ``Kms`` calls expressed as KMS Actions with wire (string) parameters.

    Subclasses say how an Action is carried out (in process, or over HTTP); the mapping from the
    protocol to Actions and back is written once, here.
    """

    @property
    def provider_id(self) -> str:
        return ACS_KMS_PROVIDER

    def call(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        """Run any KMS Action with wire (string) parameters; return the response body."""
        raise NotImplementedError

    def close(self) -> None:
        """Release what the client holds (a store, connections); nothing by default."""

    def _key_arn(self, key_id: str) -> str:
        raise NotImplementedError

    def _wrapped(self, r: Mapping[str, Any]) -> WrappedKey:
        return WrappedKey(r["KeyId"], self._key_arn(r["KeyId"]), r["KeyVersionId"], r["CiphertextBlob"])

    def generate_data_key(
        self, key_id: str, *, encryption_context: Mapping[str, str], number_of_bytes: int = 32
    ) -> DataKey:
        made = self._generate_wipeable(key_id, encryption_context=encryption_context, number_of_bytes=number_of_bytes)
        try:
            return DataKey(made.wrapped, bytes(made.plaintext))  # the public API returns bytes
        finally:
            made.wipe()

    def decrypt_data_key(self, ciphertext_blob: str, *, encryption_context: Mapping[str, str]) -> UnwrappedKey:
        got = self._decrypt_wipeable(ciphertext_blob, encryption_context=encryption_context)
        try:
            return UnwrappedKey(got.key_id, got.key_version_id, bytes(got.plaintext))
        finally:
            got.wipe()

    def _generate_wipeable(
        self, key_id: str, *, encryption_context: Mapping[str, str], number_of_bytes: int = 32
    ) -> DataKey:
        """:meth:`generate_data_key` with the plaintext in a ``bytearray`` the caller wipes."""
        r = self.call(
            "GenerateDataKey",
            {"KeyId": key_id, "NumberOfBytes": str(number_of_bytes), **_context_param(encryption_context)},
        )
        return DataKey(self._wrapped(r), _b64_data_key(r["Plaintext"]))

    def _decrypt_wipeable(self, ciphertext_blob: str, *, encryption_context: Mapping[str, str]) -> UnwrappedKey:
        """:meth:`decrypt_data_key` with the plaintext in a ``bytearray`` the caller wipes."""
        r = self.call("Decrypt", {"CiphertextBlob": ciphertext_blob, **_context_param(encryption_context)})
        return UnwrappedKey(r["KeyId"], r["KeyVersionId"], _b64_data_key(r["Plaintext"]))

    def encrypt_data_key(
        self, key_id: str, plaintext: bytes | bytearray, *, encryption_context: Mapping[str, str]
    ) -> WrappedKey:
        params = {"KeyId": key_id, "Plaintext": base64.b64encode(plaintext).decode("ascii")}
        return self._wrapped(self.call("Encrypt", {**params, **_context_param(encryption_context)}))

    def re_encrypt_data_key(
        self,
        ciphertext_blob: str,
        *,
        destination_key_id: str,
        source_encryption_context: Mapping[str, str],
        destination_encryption_context: Mapping[str, str],
    ) -> WrappedKey:
        params = {"CiphertextBlob": ciphertext_blob, "DestinationKeyId": destination_key_id}
        source = _context_param(source_encryption_context)
        if source:
            params["SourceEncryptionContext"] = source["EncryptionContext"]
        destination = _context_param(destination_encryption_context)
        if destination:
            params["DestinationEncryptionContext"] = destination["EncryptionContext"]
        return self._wrapped(self.call("ReEncrypt", params))


def generate_wipeable(
    kms: Kms, key_id: str, *, encryption_context: Mapping[str, str], number_of_bytes: int = 32
) -> DataKey:
    """``kms.generate_data_key``, with the plaintext in a ``bytearray`` (that the caller then owns
    and wipes) when ``kms`` is one of kmsenv's own clients; another ``Kms`` answers as it does."""
    if isinstance(kms, _ActionKms):
        return kms._generate_wipeable(key_id, encryption_context=encryption_context, number_of_bytes=number_of_bytes)
    return kms.generate_data_key(key_id, encryption_context=encryption_context, number_of_bytes=number_of_bytes)


def decrypt_wipeable(kms: Kms, ciphertext_blob: str, *, encryption_context: Mapping[str, str]) -> UnwrappedKey:
    """``kms.decrypt_data_key``, with a wipeable plaintext from kmsenv's own clients (see above)."""
    if isinstance(kms, _ActionKms):
        return kms._decrypt_wipeable(ciphertext_blob, encryption_context=encryption_context)
    return kms.decrypt_data_key(ciphertext_blob, encryption_context=encryption_context)


class EmbeddedKms(_ActionKms):
    """The in-process KMS over a KMS home (SQLite store + root key); no server involved.

    ``EmbeddedKms()`` uses ``KMSENV_HOME`` (default ``~/.kmsenv``), creating it on first use.
    Actions go through the same wire-parameter dispatcher as the CLI and the server, so the
    embedded KMS validates exactly like a remote one.
    """

    def __init__(self, home: Path | str | None = None, *, service: KmsService | None = None) -> None:
        if service is None:
            from kmsenv.kms.service import open_service

            service = open_service(Path(home) if home is not None else None)
        self.service = service

    def close(self) -> None:
        self.service.close()

    def __enter__(self) -> EmbeddedKms:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def call(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        from kmsenv.kms.actions import dispatch

        return dispatch(self.service, action, params)

    def _key_arn(self, key_id: str) -> str:
        return self.service.key_arn(key_id)


class AlibabaKms(_ActionKms):
    """A remote KMS speaking the Alibaba Cloud KMS API: a kmsenv server or Alibaba Cloud itself.

    Uses the official SDK and the standard Alibaba credential chain (see ``kmsenv._remote``).
    ``endpoint`` is ``host[:port]``; without it, ``kms.<region>.aliyuncs.com``.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        region: str | None = None,
        profile: str | None = None,
        insecure_http: bool = False,
    ) -> None:
        from kmsenv._remote import RemoteApi

        self.api = RemoteApi(endpoint, region=region, profile=profile, insecure_http=insecure_http)
        self._arns: dict[str, str] = {}

    def close(self) -> None:
        """Nothing to release: the SDK keeps no open resources between calls."""

    def call(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        return self.api.call(action, params)

    def _key_arn(self, key_id: str) -> str:
        """The key's ARN for file headers, from DescribeKey (once per key).

        A caller allowed to use a key may lack kms:DescribeKey; the ARN is then built from the
        region with the account left empty: the key id, which is what unwrapping needs, is exact.
        """
        arn = self._arns.get(key_id)
        if arn is None:
            try:
                arn = str(self.call("DescribeKey", {"KeyId": key_id})["KeyMetadata"]["Arn"])
            except KmsError as exc:
                if exc.code != "Forbidden.NoPermission":
                    raise
                arn = f"acs:kms:{self.api.region}::key/{key_id}"
            self._arns[key_id] = arn
        return arn
