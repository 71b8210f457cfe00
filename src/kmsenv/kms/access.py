"""AccessKeys of the KMS server: creation, status, policies, deletion, and lookup for request auth.

An AccessKey is an id (``LTAI`` + 20 characters, like Alibaba's) and a 30-character secret shown
once at creation. The secret is stored only sealed under the root key (AAD binds the id), so a
copied database yields no usable credential. Each AccessKey may carry a RAM-style policy
(``policy``); none means full access. Every change is one store transaction, so a server reading
the store sees it without a restart: on the next request, or — the server's lookups are cached
for ``cache_s`` (1 s) per process — within that time. On a store that reports changes
(PostgreSQL's LISTEN/NOTIFY, ``Store.change_counter``) a cached lookup is kept while nothing in
the store has changed, and dropped within milliseconds of any change.
"""

from __future__ import annotations

import secrets
import string
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kmsenv.errors import KmsError
from kmsenv.kms.policy import Policy, parse_policy
from kmsenv.kms.store import AccessKeyRecord

if TYPE_CHECKING:
    from kmsenv.kms.service import KmsService

__all__ = ["AccessKeys", "Credential"]

_ALPHABET = string.ascii_letters + string.digits
#: At most this many credentials are cached (only AccessKeys that exist are, so unknown ids a
#: client makes up cannot grow it); beyond it the cache starts over.
_CACHE_MAX = 1024
#: With a store that reports changes, a credential is still re-read after this long: a safety net.
_KEEP_MAX_S = 60.0


def _random_text(n: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(n))


@dataclass(frozen=True, slots=True)
class Credential:
    """What request authentication needs to know about an AccessKey. The secret never shows in repr."""

    access_key_id: str
    secret: str = field(repr=False)
    active: bool
    policy: Policy | None

    def __reduce__(self) -> tuple[Any, ...]:
        raise TypeError("Credential holds a secret and cannot be pickled")


def _not_found(access_key_id: str) -> KmsError:
    return KmsError("InvalidAccessKeyId.NotFound", f"Specified access key is not found: {access_key_id}.")


class AccessKeys:
    """AccessKey management over a service's store and root key.

    ``cache_s`` > 0 caches what :meth:`lookup` found for that many seconds (monotonic) in this
    object: a status or policy change, or a deletion, made elsewhere (the CLI, another worker)
    then applies within ``cache_s``; one made through this object applies at once.
    """

    def __init__(self, service: KmsService, *, cache_s: float = 0.0) -> None:
        self._service = service
        self._cache_s = cache_s
        # access key id → (monotonic time read, store change counter before the read, credential)
        self._cache: dict[str, tuple[float, int | None, Credential]] = {}

    def _aad(self, access_key_id: str) -> bytes:
        return f"access-key:{access_key_id}".encode("ascii")

    def _public(self, rec: AccessKeyRecord) -> dict[str, Any]:
        return {
            "AccessKeyId": rec.access_key_id,
            "Status": rec.status,
            "Description": rec.description,
            "Policy": rec.policy,
            "CreationDate": rec.creation_date,
            "UpdateDate": rec.update_date,
        }

    def create(self, *, description: str = "", policy: str | None = None) -> dict[str, str]:
        """Create an AccessKey; the only time its secret is returned."""
        if len(description) > 1024:
            raise KmsError.invalid_parameter("Description", "It must be at most 1024 characters.")
        normalised = parse_policy(policy).source if policy is not None else None
        access_key_id = "LTAI" + _random_text(20)
        secret = _random_text(30)
        now = self._service.now()
        sealed = self._service.root_key.seal(secret.encode("ascii"), aad=self._aad(access_key_id))
        with self._service.store.transaction(write=True) as tx:
            tx.insert_access_key(AccessKeyRecord(access_key_id, sealed, "Active", description, normalised, now, now))
        return {"AccessKeyId": access_key_id, "AccessKeySecret": secret}

    def list(self) -> list[dict[str, Any]]:
        with self._service.store.transaction(write=False) as tx:
            return [self._public(r) for r in tx.list_access_keys()]

    def _update(self, access_key_id: str, **changes: Any) -> dict[str, Any]:
        self._cache.pop(access_key_id, None)
        with self._service.store.transaction(write=True) as tx:
            rec = tx.get_access_key(access_key_id)
            if rec is None:
                raise _not_found(access_key_id)
            for name, value in changes.items():
                setattr(rec, name, value)
            rec.update_date = self._service.now()
            tx.update_access_key(rec)
            return self._public(rec)

    def set_active(self, access_key_id: str, active: bool) -> dict[str, Any]:
        return self._update(access_key_id, status="Active" if active else "Inactive")

    def set_policy(self, access_key_id: str, policy: str | None) -> dict[str, Any]:
        return self._update(access_key_id, policy=parse_policy(policy).source if policy is not None else None)

    def delete(self, access_key_id: str) -> None:
        self._cache.pop(access_key_id, None)
        with self._service.store.transaction(write=True) as tx:
            if tx.get_access_key(access_key_id) is None:
                raise _not_found(access_key_id)
            tx.delete_access_key(access_key_id)

    def lookup(self, access_key_id: str) -> Credential | None:
        """The credential for request verification, or None if no such AccessKey exists."""
        marker = self._service.store.change_counter() if self._cache_s > 0 else None
        if self._cache_s > 0:
            hit = self._cache.get(access_key_id)
            if hit is not None:
                age = time.monotonic() - hit[0]
                if marker is None and age < self._cache_s:
                    return hit[2]
                if marker is not None and hit[1] == marker and age < _KEEP_MAX_S:
                    return hit[2]
        read_at = time.monotonic()  # the entry's age counts from before the read: never too young
        with self._service.store.transaction(write=False) as tx:
            rec = tx.get_access_key(access_key_id)
        if rec is None:
            self._cache.pop(access_key_id, None)
            return None
        secret = self._service.root_key.unseal(
            rec.sealed_secret, aad=self._aad(access_key_id), what="AccessKey secret"
        ).decode("ascii")
        policy = parse_policy(rec.policy) if rec.policy is not None else None
        credential = Credential(rec.access_key_id, secret, rec.status == "Active", policy)
        if self._cache_s > 0:
            if len(self._cache) >= _CACHE_MAX:
                self._cache.clear()
            self._cache[access_key_id] = (read_at, marker, credential)
        return credential
