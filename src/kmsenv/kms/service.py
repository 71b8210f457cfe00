"""The KMS service: one typed handler per Alibaba Cloud KMS (2016-01-20) Action.

Handlers take keyword arguments named after the API's parameters (``KeyId`` → ``key_id``) and
return the response body as Alibaba shapes it (``KeyMetadata``, ``Keys: {Key: [...]}``, ...) minus
``RequestId``, which the door adds (``actions.dispatch``). Every handler validates its input, runs
in one store transaction (so a failed Action changes nothing) and raises :class:`KmsError` with the
Alibaba error code. Which Action may run in which key state is one table, ``STATE_RULES``.

Time comes from an injectable clock, so rotation and deletion windows are testable without sleeps:
due rotations and deletions are carried out at the start of the next Action, by whoever calls.
That check (a store read) is skipped while nothing can have fallen due since the last one — see
:meth:`KmsService._housekeeping` for exactly when.

The crypto Actions (Encrypt, GenerateDataKey, Decrypt, ReEncrypt) read their alias, key and
version through a record cache (:class:`_CachedReads`) when the store can say that nothing has
changed since (``Store.change_counter``: PostgreSQL's LISTEN/NOTIFY, within milliseconds); then
they touch no database at all. Every other Action, and every Action on a store that cannot say
(SQLite), reads the store in its own transaction.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kmsenv import _crypto
from kmsenv.errors import ConfigError, IntegrityError, KmsError
from kmsenv.kms.blob import blob_aad, blob_prefix, decode_blob, encode_blob
from kmsenv.kms.context import canonical_context, parse_context
from kmsenv.kms.sealing import ROOT_KEY_ENV, RootKey, load_or_create_root_key
from kmsenv.kms.store import AliasRecord, KeyRecord, SqliteStore, Store, Tx, VersionRecord, dumps_tags

__all__ = ["STATE_RULES", "KmsService", "default_home", "open_service"]

Clock = Callable[[], datetime]
Response = dict[str, Any]

HOME_ENV = "KMSENV_HOME"
STORE_ENV = "KMSENV_STORE"
REGION_ENV = "KMSENV_REGION"
DEFAULT_REGION = "cn-hangzhou"

_KEY_SPECS = {"Aliyun_AES_256": 32, "Aliyun_AES_192": 24, "Aliyun_AES_128": 16}
#: Specs Alibaba has that this KMS does not implement: a clear "unsupported", not "invalid".
_OTHER_KEY_SPECS = {"Aliyun_SM4", "RSA_2048", "RSA_3072", "EC_P256", "EC_P256K", "EC_SM2"}
_ORIGINS = {"Aliyun_KMS", "EXTERNAL"}
_DATA_KEY_SPECS = {"AES_256": 32, "AES_128": 16}
_ALIAS_RE = re.compile(r"^alias/[a-zA-Z0-9:/_-]{1,255}$")
_INTERVAL_RE = re.compile(r"^([0-9]{1,12})([dhms])$")
_INTERVAL_UNITS = {"d": 86400, "h": 3600, "m": 60, "s": 1}
_MIN_ROTATION = 7 * 86400
_MAX_ROTATION = 730 * 86400
_DEFAULT_ROTATION = 365 * 86400
MAX_ENCRYPT_PLAINTEXT = 6144
MAX_DESCRIPTION = 8192
MAX_PAGE_SIZE = 100
MAX_PAGE_NUMBER = 2**31 - 1
#: A housekeeping check stays good for at most this long (monotonic seconds) within one process:
#: the bound on how late this process notices a rotation another process made due right away.
HOUSEKEEPING_RECHECK_S = 1.0
#: A cached key, alias or version record is reused for at most this long, even while the store's
#: change counter stands still: a safety net, since the counter moves on any change.
RECORD_CACHE_MAX_S = 60.0
_RECORD_CACHE_MAX = 4096

_CRYPTO = {
    "Disabled": "Rejected.Disabled",
    "PendingDeletion": "Rejected.PendingDeletion",
    "PendingImport": "Rejected.PendingImport",
}
_ONLY_PENDING_DELETION_REJECTED = {"PendingDeletion": "Rejected.PendingDeletion"}
_MODIFY = {"PendingDeletion": "Rejected.StateModifiedFailed", "PendingImport": "Rejected.StateModifiedFailed"}

#: Action → {key state: error code}; a state not listed means the Action is allowed in it.
#: Source: Alibaba's "Impact of CMK status on API operations" table (alibaba-kms-wire.md §8).
STATE_RULES: dict[str, dict[str, str]] = {
    "GenerateDataKey": _CRYPTO,
    "GenerateDataKeyWithoutPlaintext": _CRYPTO,
    "Encrypt": _CRYPTO,
    "Decrypt": _CRYPTO,
    "ReEncrypt": _CRYPTO,
    "UpdateRotationPolicy": _CRYPTO,
    "CreateKeyVersion": _CRYPTO,
    "UpdateKeyDescription": _ONLY_PENDING_DELETION_REJECTED,
    "SetDeletionProtection": _ONLY_PENDING_DELETION_REJECTED,
    "UpdateAlias": _ONLY_PENDING_DELETION_REJECTED,
    "EnableKey": _MODIFY,
    "DisableKey": _MODIFY,
    "ScheduleKeyDeletion": {"PendingDeletion": "Rejected.StateModifiedFailed"},
    "CancelKeyDeletion": {
        "Enabled": "Rejected.StateModifiedFailed",
        "Disabled": "Rejected.StateModifiedFailed",
        "PendingImport": "Rejected.StateModifiedFailed",
    },
    "CreateAlias": {"PendingDeletion": "Rejected.StateModifiedFailed"},
}

_STATE_WORDS = {
    "Enabled": "enabled",
    "Disabled": "disabled",
    "PendingDeletion": "pending deletion",
    "PendingImport": "pending import of key material",
}


def utc_now() -> datetime:
    return datetime.now(UTC)


def fmt_time(dt: datetime) -> str:
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)


def default_home() -> Path:
    return Path(os.environ.get(HOME_ENV) or Path.home() / ".kmsenv")


def _not_found(key_id: str, deleted_at: str | None = None) -> KmsError:
    if deleted_at is not None:
        return KmsError(
            "Forbidden.KeyNotFound",
            f"The specified Key is not found: key {key_id} was deleted at {deleted_at}; its key material "
            "is destroyed and ciphertexts under it can no longer be decrypted.",
        )
    return KmsError("Forbidden.KeyNotFound", f"The specified Key is not found: {key_id}.")


def _require_text(value: str | None, name: str) -> str:
    if value is None or value == "":
        raise KmsError.missing_parameter(name)
    return value


def _paging(page_number: int | None, page_size: int | None) -> tuple[int, int]:
    number = 1 if page_number is None else page_number
    size = 10 if page_size is None else page_size
    if not 1 <= number <= MAX_PAGE_NUMBER:
        # Alibaba's PageNumber is an Integer; without a bound the row offset overflows SQLite's int64.
        raise KmsError.invalid_parameter("PageNumber", f"It must be between 1 and {MAX_PAGE_NUMBER}.")
    if not 1 <= size <= MAX_PAGE_SIZE:
        raise KmsError.invalid_parameter("PageSize", f"It must be between 1 and {MAX_PAGE_SIZE}.")
    return number, size


def parse_rotation_interval(text: str) -> int:
    """``"30d"``, ``"720h"``, ``"2592000s"`` → seconds, within Alibaba's 7–730 days."""
    match = _INTERVAL_RE.match(text.strip())
    if not match:
        raise KmsError.invalid_parameter(
            "RotationInterval", 'Use an integer with a unit d, h, m or s, e.g. "30d" or "2592000s".'
        )
    seconds = int(match.group(1)) * _INTERVAL_UNITS[match.group(2)]
    if not _MIN_ROTATION <= seconds <= _MAX_ROTATION:
        raise KmsError.invalid_parameter("RotationInterval", "It must be between 7 and 730 days.")
    return seconds


def _parse_tags(tags: str | list[dict[str, str]] | None) -> list[dict[str, str]]:
    if tags is None or tags == "":
        return []
    if isinstance(tags, str):
        try:
            parsed = json.loads(tags)
        except (ValueError, RecursionError):
            raise KmsError.invalid_parameter("Tags", 'Use a JSON array like [{"TagKey":"k","TagValue":"v"}].') from None
    else:
        parsed = tags
    if not isinstance(parsed, list) or len(parsed) > 20:
        raise KmsError.invalid_parameter("Tags", "Use a JSON array of at most 20 {TagKey, TagValue} objects.")
    result = []
    for item in parsed:
        if (
            not isinstance(item, dict)
            or set(item) != {"TagKey", "TagValue"}
            or not all(isinstance(v, str) for v in item.values())
            or not 1 <= len(item["TagKey"]) <= 128
            or len(item["TagValue"]) > 256
        ):
            raise KmsError.invalid_parameter("Tags", "Each tag is {TagKey (1-128 chars), TagValue (≤256 chars)}.")
        result.append({"TagKey": item["TagKey"], "TagValue": item["TagValue"]})
    return result


class KmsService:
    """The key management service over one store and one root key."""

    def __init__(
        self, store: Store, root_key: RootKey, *, region: str, account_id: str, clock: Clock = utc_now
    ) -> None:
        self.store = store
        self.region = region
        self.account_id = account_id
        self.clock = clock
        self._root = root_key
        # Unsealed version material, as ready AEAD objects. Safe to cache: material never changes,
        # and every use re-reads the key row in its transaction, so a destroyed key fails there.
        self._aeads: dict[str, _crypto.AesGcm] = {}
        # Housekeeping cache: (service-clock second, monotonic time, write generation) of the
        # last check that found nothing due; ``_writes`` counts this service's write transactions.
        self._kept: tuple[str, float, int] | None = None
        self._writes = 0
        self._kept_lock = threading.Lock()
        # Crypto Actions' record cache: (kind, name) → (monotonic time read, store change counter
        # and ``_writes`` before the read, record). Valid while both counters are unchanged.
        self._records: dict[tuple[str, str], tuple[float, int, int, Any]] = {}

    def __repr__(self) -> str:
        return f"KmsService(store={self.store.path}, region={self.region})"

    def close(self) -> None:
        self._aeads.clear()
        self._records.clear()
        self.store.close()

    # ---------------------------------------------------------------------------- plumbing --
    def now(self) -> str:
        """The service clock's current time in Alibaba's format (``YYYY-MM-DDThh:mm:ssZ``)."""
        return fmt_time(self.clock())

    @property
    def root_key(self) -> RootKey:
        return self._root

    def key_arn(self, key_id: str) -> str:
        return f"acs:kms:{self.region}:{self.account_id}:key/{key_id}"

    def alias_arn(self, alias_name: str) -> str:
        return f"acs:kms:{self.region}:{self.account_id}:{alias_name}"

    def resource_arns(self, ident: str) -> list[str]:
        """ARNs a request naming ``ident`` (key id/ARN, alias/alias ARN) touches, for policy checks:
        the key's ARN and, when an alias was named, the alias's ARN. An unknown key or alias still
        yields its would-be ARN, so a policy decides before "not found" is revealed."""
        arns: list[str] = []
        alias_name = None
        if ident.startswith("acs:kms:"):
            arns.append(ident)
            resource = ident.split(":", 4)[-1]
            alias_name = resource if resource.startswith("alias/") else None
        elif ident.startswith("alias/"):
            alias_name = ident
            arns.append(self.alias_arn(ident))
        else:
            arns.append(self.key_arn(ident))
        if alias_name is not None:
            with self._reads() as tx:
                alias = tx.get_alias(alias_name)
            if alias is not None:
                arns.append(self.key_arn(alias.key_id))
        return arns

    @contextmanager
    def _tx(self, *, write: bool) -> Iterator[Tx]:
        self._housekeeping()
        try:
            with self.store.transaction(write=write) as tx:
                yield tx
        except _OverdueKey as overdue:
            # Defence in depth: the Action met a key past its DeleteDate (only possible with a
            # clock that jumped, or nodes whose clocks disagree by days). It was not used: destroy
            # it now, before answering, and answer as if it had been destroyed first.
            self._kept = None
            self._housekeeping()
            raise overdue.error from None
        finally:
            if write:  # committed or not: this process may have made something due
                with self._kept_lock:
                    self._writes += 1

    @contextmanager
    def _reads(self) -> Iterator[Tx]:
        """The read-only view of a crypto Action: cached records while the store can vouch for
        them (see :class:`_CachedReads`), else a read transaction as in :meth:`_tx`."""
        marker = self.store.change_counter()
        if marker is None:
            with self._tx(write=False) as tx:
                yield tx
            return
        self._housekeeping()
        reads = _CachedReads(self, marker)
        try:
            with reads.stack:
                yield reads
        except _OverdueKey as overdue:
            self._kept = None
            self._housekeeping()
            raise overdue.error from None

    def _cached(self, kind: str, name: str, marker: int, writes: int, load: Callable[[], Any]) -> Any:
        """A record from the cache if read under the same counters, else ``load()`` (cached if found)."""
        entry = (kind, name)
        hit = self._records.get(entry)
        now = time.monotonic()
        if hit is not None and hit[1] == marker and hit[2] == writes and now - hit[0] < RECORD_CACHE_MAX_S:
            return hit[3]
        value = load()
        if value is not None:
            if len(self._records) >= _RECORD_CACHE_MAX:
                self._records.clear()
            self._records[entry] = (now, marker, writes, value)
        return value

    def _housekeeping(self) -> None:
        """Carry out deletions and automatic rotations that have fallen due.

        Runs before every Action, but skips its store read when the previous check found nothing
        due, in the same second of the service clock (due times have one-second resolution), less
        than ``HOUSEKEEPING_RECHECK_S`` ago, with no write transaction of this service since. So:

        - a clock that moves (a real one each second, an injected one when a test advances it)
          and any write by this service (which may set a due time in the past) force a check;
        - another process's change is seen within ``HOUSEKEEPING_RECHECK_S``. For deletion that
          is always in time: a DeleteDate is at least 7 days after it is set. A rotation another
          process makes due at once (UpdateRotationPolicy or EnableKey on a key whose rotation is
          overdue) may be carried out up to that long later by this process;
        - whatever the cache says, an Action never uses a key past its DeleteDate (``_usable``).
        """
        now = self.now()
        kept = self._kept
        if (
            kept is not None
            and kept[0] == now
            and kept[2] == self._writes
            and time.monotonic() - kept[1] < HOUSEKEEPING_RECHECK_S
        ):
            return
        writes, started = self._writes, time.monotonic()
        with self.store.transaction(write=False) as tx:
            due = tx.due_key_ids(now)
        if not due:
            with self._kept_lock:
                if writes == self._writes:  # no write of ours raced the read: the result stands
                    self._kept = (now, started, writes)
            return
        destroyed = False
        with self._kept_lock:
            self._writes += 1  # a rotation changes a key's primary version: cached records are stale
        with self.store.transaction(write=True) as tx:
            for key_id in tx.due_key_ids(now):  # re-read under the write lock: another process may have done it
                key = tx.get_key(key_id)
                if key is None:
                    continue
                if key.delete_date is not None and key.delete_date <= now:
                    tx.destroy_key(key_id, key.delete_date)
                    self._forget_versions(key_id)
                    destroyed = True
                elif key.key_state == "Enabled" and key.next_rotation_date and key.next_rotation_date <= now:
                    self._new_version(tx, key, now)
                    key.last_rotation_date = now
                    tx.update_key(key)
        if destroyed:
            # The WAL still holds page images with the sealed material until it is checkpointed.
            self.store.erase_history()

    def _forget_versions(self, key_id: str) -> None:
        prefix = f"{key_id}/"
        for cache_key in [k for k in self._aeads if k.startswith(prefix)]:
            del self._aeads[cache_key]

    def _resolve(self, tx: Tx, key_id: str | None, *, param: str = "KeyId") -> KeyRecord:
        """Key id, key ARN, alias name or alias ARN → the key record."""
        ident = _require_text(key_id, param)
        if ident.startswith("acs:"):
            parts = ident.split(":", 4)
            if len(parts) != 5 or parts[1] != "kms":
                raise KmsError.invalid_parameter(param, "It is not a KMS ARN (acs:kms:<region>:<uid>:key/<id>).")
            resource = parts[4]
            foreign = parts[2] != self.region or parts[3] != self.account_id
            if resource.startswith("key/"):
                if foreign:
                    raise _not_found(ident)
                ident = resource[len("key/") :]
            elif resource.startswith("alias/"):
                if foreign:
                    raise KmsError("Forbidden.AliasNotFound", f"The specified Alias is not found: {ident}.")
                ident = resource
            else:
                raise KmsError.invalid_parameter(param, "The ARN names neither a key nor an alias.")
        alias_name = None
        if ident.startswith("alias/"):
            alias = tx.get_alias(ident)
            if alias is None:
                raise KmsError("Forbidden.AliasNotFound", f"The specified Alias is not found: {ident}.")
            alias_name, ident = ident, alias.key_id
        key = tx.get_key(ident)
        if key is None:
            raise _not_found(ident, tx.deleted_at(ident))
        self._usable(key, alias_name)
        return key

    def _usable(self, key: KeyRecord, alias_name: str | None = None) -> None:
        """Refuse a key whose DeleteDate has passed though housekeeping has not destroyed it yet."""
        if key.delete_date is not None and key.delete_date <= self.now():
            # What the Action would have met had the key been destroyed first (its aliases go with it).
            error = (
                KmsError("Forbidden.AliasNotFound", f"The specified Alias is not found: {alias_name}.")
                if alias_name is not None
                else _not_found(key.key_id, key.delete_date)
            )
            raise _OverdueKey(error)

    @staticmethod
    def _check_state(action: str, key: KeyRecord) -> None:
        code = STATE_RULES.get(action, {}).get(key.key_state)
        if code is not None:
            raise KmsError(
                code,
                f"{action} is not allowed: the key {key.key_id} is {_STATE_WORDS.get(key.key_state, key.key_state)}.",
            )

    def _new_version(self, tx: Tx, key: KeyRecord, now: str) -> VersionRecord:
        """Create a version with fresh material, make it primary, and advance the rotation clock."""
        version_id = str(uuid.uuid4())
        material = _crypto.random_bytes(_KEY_SPECS[key.key_spec])
        sealed = self._root.seal(material, aad=self._root.material_aad(key.key_id, version_id))
        record = VersionRecord(key.key_id, version_id, now, sealed)
        tx.insert_version(record)
        key.primary_version_id = version_id
        if key.rotation_enabled and key.rotation_interval:
            key.next_rotation_date = fmt_time(parse_time(now) + timedelta(seconds=key.rotation_interval))
        return record

    def _aead(self, tx: Tx, key_id: str, version_id: str) -> _crypto.AesGcm:
        cache_key = f"{key_id}/{version_id}"
        aead = self._aeads.get(cache_key)
        if aead is None:
            version = tx.get_version(version_id)
            if version is None or version.key_id != key_id:
                raise KmsError(
                    "Forbidden.KeyVersionNotFound", f"The key version {version_id} of key {key_id} is not found."
                )
            try:
                material = self._root.unseal(
                    version.sealed_material, aad=self._root.material_aad(key_id, version_id), what="key material"
                )
            except IntegrityError:
                # The store and the root key disagree: tampering or a mixed-up store, never a user error.
                raise KmsError(
                    "InternalFailure", f"The key material of {key_id} does not open under the root key."
                ) from None
            aead = _crypto.AesGcm(material)
            if len(self._aeads) > 4096:
                self._aeads.clear()
            self._aeads[cache_key] = aead
        return aead

    def _seal(self, tx: Tx, key: KeyRecord, plaintext: bytes, context: Mapping[str, str]) -> tuple[str, str]:
        version_id = key.primary_version_id
        if version_id is None:  # only EXTERNAL keys lack material, and they are PendingImport
            raise KmsError("Rejected.PendingImport", f"The key {key.key_id} has no key material.")
        prefix = blob_prefix(key.key_id, version_id)
        nonce = _crypto.random_bytes(_crypto.GCM_NONCE_SIZE)
        sealed = self._aead(tx, key.key_id, version_id).encrypt(
            nonce, plaintext, blob_aad(prefix, canonical_context(context))
        )
        return version_id, encode_blob(prefix, nonce, sealed)

    def _open(
        self,
        tx: Tx,
        action: str,
        ciphertext_blob: str | None,
        context: Mapping[str, str],
        *,
        param: str,
        dry_run: bool | None = None,
    ) -> tuple[KeyRecord, str, bytes]:
        parsed = decode_blob(_require_text(ciphertext_blob, param))
        key = tx.get_key(parsed.key_id)
        if key is None:
            raise _not_found(parsed.key_id, tx.deleted_at(parsed.key_id))
        self._usable(key)
        self._check_state(action, key)
        aead = self._aead(tx, key.key_id, parsed.key_version_id)
        _stop_if_dry_run(dry_run, action)
        try:
            plaintext = aead.decrypt(
                parsed.nonce, parsed.sealed, blob_aad(parsed.prefix, canonical_context(context)), what="blob"
            )
        except IntegrityError:
            raise KmsError(
                "InvalidCiphertext",
                "The CiphertextBlob cannot be decrypted: it was modified, or the EncryptionContext is not "
                "the one it was encrypted with.",
            ) from None
        return key, parsed.key_version_id, plaintext

    # ------------------------------------------------------------------------ metadata --
    def _metadata(self, tx: Tx, key: KeyRecord) -> Response:
        if key.origin == "Aliyun_KMS" and key.rotation_enabled:
            rotation = "Enabled" if key.key_state == "Enabled" else "Suspended"
        else:
            rotation = "Disabled"
        return {
            "KeyId": key.key_id,
            "Arn": self.key_arn(key.key_id),
            "KeyState": key.key_state,
            "KeySpec": key.key_spec,
            "KeyUsage": key.key_usage,
            "Origin": key.origin,
            "ProtectionLevel": key.protection_level,
            "Description": key.description,
            "CreationDate": key.creation_date,
            "Creator": key.creator,
            "PrimaryKeyVersion": key.primary_version_id or "",
            "AutomaticRotation": rotation,
            "RotationInterval": f"{key.rotation_interval}s" if key.rotation_interval else "",
            "LastRotationDate": key.last_rotation_date or "",
            "NextRotationDate": key.next_rotation_date if rotation == "Enabled" and key.next_rotation_date else "",
            "DeleteDate": key.delete_date or "",
            "MaterialExpireTime": "",
            "DeletionProtection": "Enabled" if key.deletion_protection else "Disabled",
            "DeletionProtectionDescription": key.deletion_protection_description,
        }

    # ---------------------------------------------------------------------------- keys --
    def create_key(
        self,
        *,
        description: str | None = None,
        key_spec: str | None = None,
        key_usage: str | None = None,
        origin: str | None = None,
        protection_level: str | None = None,
        enable_automatic_rotation: bool | None = None,
        rotation_interval: str | None = None,
        tags: str | list[dict[str, str]] | None = None,
    ) -> Response:
        description = description or ""
        if len(description) > MAX_DESCRIPTION:
            raise KmsError.invalid_parameter("Description", f"It must be at most {MAX_DESCRIPTION} characters.")
        key_spec = key_spec or "Aliyun_AES_256"
        if key_spec not in _KEY_SPECS:
            if key_spec in _OTHER_KEY_SPECS:
                raise KmsError(
                    "Rejected.UnsupportedOperation",
                    f"KeySpec {key_spec} is not supported by kmsenv; use Aliyun_AES_256, Aliyun_AES_192 or "
                    "Aliyun_AES_128.",
                )
            raise KmsError.invalid_parameter("KeySpec", f"Unknown key spec {key_spec!r}.")
        key_usage = key_usage or "ENCRYPT/DECRYPT"
        if key_usage != "ENCRYPT/DECRYPT":
            raise KmsError.invalid_parameter("KeyUsage", "Symmetric keys only support ENCRYPT/DECRYPT.")
        origin = origin or "Aliyun_KMS"
        if origin not in _ORIGINS:
            raise KmsError.invalid_parameter("Origin", "It must be Aliyun_KMS or EXTERNAL.")
        protection_level = protection_level or "SOFTWARE"
        if protection_level == "HSM":
            raise KmsError("Unsupported.ProtectionLevel", "kmsenv has no HSM; use ProtectionLevel SOFTWARE.")
        if protection_level != "SOFTWARE":
            raise KmsError.invalid_parameter("ProtectionLevel", "It must be SOFTWARE or HSM.")
        interval = parse_rotation_interval(rotation_interval) if rotation_interval else None
        if enable_automatic_rotation and origin == "EXTERNAL":
            raise KmsError("Unsupported.Origin", "Automatic rotation is not supported for keys with imported material.")
        parsed_tags = _parse_tags(tags)
        now = self.now()
        key = KeyRecord(
            key_id=str(uuid.uuid4()),
            description=description,
            key_spec=key_spec,
            key_usage=key_usage,
            origin=origin,
            protection_level=protection_level,
            key_state="Enabled" if origin == "Aliyun_KMS" else "PendingImport",
            creation_date=now,
            creator=self.account_id,
            rotation_enabled=bool(enable_automatic_rotation),
            rotation_interval=(interval or _DEFAULT_ROTATION) if enable_automatic_rotation else interval,
            tags=dumps_tags(parsed_tags),
        )
        with self._tx(write=True) as tx:
            tx.insert_key(key)
            if origin == "Aliyun_KMS":
                self._new_version(tx, key, now)
                tx.update_key(key)
            return {"KeyMetadata": self._metadata(tx, key)}

    def describe_key(self, *, key_id: str | None = None) -> Response:
        with self._tx(write=False) as tx:
            key = self._resolve(tx, key_id)
            return {"KeyMetadata": self._metadata(tx, key)}

    def list_keys(
        self, *, page_number: int | None = None, page_size: int | None = None, filters: str | None = None
    ) -> Response:
        number, size = _paging(page_number, page_size)
        parsed_filters = _parse_filters(filters)
        with self._tx(write=False) as tx:
            keys, total = tx.list_keys(parsed_filters, (number - 1) * size, size)
        return {
            "Keys": {"Key": [{"KeyId": k.key_id, "KeyArn": self.key_arn(k.key_id)} for k in keys]},
            "TotalCount": total,
            "PageNumber": number,
            "PageSize": size,
        }

    def _change_key(self, action: str, key_id: str | None, change: Callable[[KeyRecord, str], None]) -> Response:
        with self._tx(write=True) as tx:
            key = self._resolve(tx, key_id)
            self._check_state(action, key)
            change(key, self.now())
            tx.update_key(key)
        return {}

    def update_key_description(self, *, key_id: str | None = None, description: str | None = None) -> Response:
        if description is None:
            raise KmsError.missing_parameter("Description")
        if len(description) > MAX_DESCRIPTION:
            raise KmsError.invalid_parameter("Description", f"It must be at most {MAX_DESCRIPTION} characters.")

        def change(key: KeyRecord, now: str) -> None:
            key.description = description

        return self._change_key("UpdateKeyDescription", key_id, change)

    def enable_key(self, *, key_id: str | None = None) -> Response:
        def change(key: KeyRecord, now: str) -> None:
            key.key_state = "Enabled"

        return self._change_key("EnableKey", key_id, change)

    def disable_key(self, *, key_id: str | None = None) -> Response:
        def change(key: KeyRecord, now: str) -> None:
            key.key_state = "Disabled"

        return self._change_key("DisableKey", key_id, change)

    def schedule_key_deletion(
        self, *, key_id: str | None = None, pending_window_in_days: int | None = None
    ) -> Response:
        if pending_window_in_days is None:
            raise KmsError.missing_parameter("PendingWindowInDays")
        if not 7 <= pending_window_in_days <= 366:
            raise KmsError.invalid_parameter("PendingWindowInDays", "It must be between 7 and 366 days.")

        def change(key: KeyRecord, now: str) -> None:
            if key.deletion_protection:
                raise KmsError(
                    "Rejected.DeletionProtection",
                    f"The key {key.key_id} has deletion protection enabled; disable it with "
                    "SetDeletionProtection before scheduling deletion.",
                )
            key.key_state = "PendingDeletion"
            key.delete_date = fmt_time(parse_time(now) + timedelta(days=pending_window_in_days))

        return self._change_key("ScheduleKeyDeletion", key_id, change)

    def cancel_key_deletion(self, *, key_id: str | None = None) -> Response:
        def change(key: KeyRecord, now: str) -> None:
            # A key that never got material (EXTERNAL, PendingImport when scheduled) cannot be Enabled.
            key.key_state = "Enabled" if key.primary_version_id is not None else "PendingImport"
            key.delete_date = None

        return self._change_key("CancelKeyDeletion", key_id, change)

    def set_deletion_protection(
        self,
        *,
        protected_resource_arn: str | None = None,
        key_id: str | None = None,
        enable_deletion_protection: bool | None = None,
        deletion_protection_description: str | None = None,
    ) -> Response:
        if enable_deletion_protection is None:
            raise KmsError.missing_parameter("EnableDeletionProtection")
        target = protected_resource_arn or key_id
        if not target:
            raise KmsError.missing_parameter("ProtectedResourceArn")

        def change(key: KeyRecord, now: str) -> None:
            key.deletion_protection = enable_deletion_protection
            key.deletion_protection_description = (
                (deletion_protection_description or "") if enable_deletion_protection else ""
            )

        return self._change_key("SetDeletionProtection", target, change)

    # ------------------------------------------------------------------------- aliases --
    def create_alias(self, *, alias_name: str | None = None, key_id: str | None = None) -> Response:
        name = _check_alias_name(alias_name)
        with self._tx(write=True) as tx:
            key = self._resolve(tx, key_id)
            self._check_state("CreateAlias", key)
            now = self.now()
            tx.insert_alias(AliasRecord(name, key.key_id, now, now))
        return {}

    def update_alias(self, *, alias_name: str | None = None, key_id: str | None = None) -> Response:
        name = _check_alias_name(alias_name)
        with self._tx(write=True) as tx:
            if tx.get_alias(name) is None:
                raise KmsError("Forbidden.AliasNotFound", f"The specified Alias is not found: {name}.")
            key = self._resolve(tx, key_id)
            self._check_state("UpdateAlias", key)
            tx.update_alias(name, key.key_id, self.now())
        return {}

    def delete_alias(self, *, alias_name: str | None = None) -> Response:
        name = _check_alias_name(alias_name)
        with self._tx(write=True) as tx:
            if tx.get_alias(name) is None:
                raise KmsError("Forbidden.AliasNotFound", f"The specified Alias is not found: {name}.")
            tx.delete_alias(name)
        return {}

    def _alias_page(self, tx: Tx, key_id: str | None, page_number: int | None, page_size: int | None) -> Response:
        number, size = _paging(page_number, page_size)
        aliases, total = tx.list_aliases(key_id, (number - 1) * size, size)
        return {
            "Aliases": {
                "Alias": [
                    {"AliasName": a.alias_name, "AliasArn": self.alias_arn(a.alias_name), "KeyId": a.key_id}
                    for a in aliases
                ]
            },
            "TotalCount": total,
            "PageNumber": number,
            "PageSize": size,
        }

    def list_aliases(self, *, page_number: int | None = None, page_size: int | None = None) -> Response:
        with self._tx(write=False) as tx:
            return self._alias_page(tx, None, page_number, page_size)

    def list_aliases_by_key_id(
        self, *, key_id: str | None = None, page_number: int | None = None, page_size: int | None = None
    ) -> Response:
        with self._tx(write=False) as tx:
            key = self._resolve(tx, key_id)
            return self._alias_page(tx, key.key_id, page_number, page_size)

    # -------------------------------------------------------------------------- crypto --
    def encrypt(
        self,
        *,
        key_id: str | None = None,
        plaintext: str | None = None,
        encryption_context: Mapping[str, str] | str | None = None,
        dry_run: bool | None = None,
    ) -> Response:
        if plaintext is None or plaintext == "":
            raise KmsError.missing_parameter("Plaintext")
        try:
            data = plaintext.encode("utf-8")
        except UnicodeEncodeError:
            # Lone surrogates (e.g. undecodable bytes on a command line) are not text: Decrypt
            # could only hand them back as a string no JSON response or terminal can carry.
            raise KmsError.invalid_parameter("Plaintext", "It must be valid Unicode text.") from None
        if len(data) > MAX_ENCRYPT_PLAINTEXT:
            raise KmsError.invalid_parameter("Plaintext", f"It must be at most {MAX_ENCRYPT_PLAINTEXT} bytes.")
        context = parse_context(encryption_context)
        with self._reads() as tx:
            key = self._resolve(tx, key_id)
            self._check_state("Encrypt", key)
            _stop_if_dry_run(dry_run, "Encrypt")
            version_id, blob = self._seal(tx, key, data, context)
        return {"KeyId": key.key_id, "KeyVersionId": version_id, "CiphertextBlob": blob}

    def _data_key(
        self,
        *,
        action: str,
        key_id: str | None,
        key_spec: str | None,
        number_of_bytes: int | None,
        encryption_context: Mapping[str, str] | str | None,
        dry_run: bool | None,
    ) -> tuple[Response, str]:
        if key_spec and key_spec not in _DATA_KEY_SPECS:
            raise KmsError.invalid_parameter("KeySpec", "It must be AES_256 or AES_128.")
        if number_of_bytes is not None:
            if not 1 <= number_of_bytes <= 1024:
                raise KmsError.invalid_parameter("NumberOfBytes", "It must be between 1 and 1024.")
            size = number_of_bytes
        elif key_spec:
            size = _DATA_KEY_SPECS[key_spec]
        else:
            size = 32
        context = parse_context(encryption_context)
        # Alibaba wraps the *base64 text* of the data key, so Decrypt returns exactly the string
        # GenerateDataKey returned as Plaintext.
        plaintext = base64.b64encode(_crypto.random_bytes(size)).decode("ascii")
        with self._reads() as tx:
            key = self._resolve(tx, key_id)
            self._check_state(action, key)
            _stop_if_dry_run(dry_run, action)
            version_id, blob = self._seal(tx, key, plaintext.encode("ascii"), context)
        return {"KeyId": key.key_id, "KeyVersionId": version_id, "CiphertextBlob": blob}, plaintext

    def generate_data_key(
        self,
        *,
        key_id: str | None = None,
        key_spec: str | None = None,
        number_of_bytes: int | None = None,
        encryption_context: Mapping[str, str] | str | None = None,
        dry_run: bool | None = None,
    ) -> Response:
        response, plaintext = self._data_key(
            action="GenerateDataKey",
            key_id=key_id,
            key_spec=key_spec,
            number_of_bytes=number_of_bytes,
            encryption_context=encryption_context,
            dry_run=dry_run,
        )
        response["Plaintext"] = plaintext
        return response

    def generate_data_key_without_plaintext(
        self,
        *,
        key_id: str | None = None,
        key_spec: str | None = None,
        number_of_bytes: int | None = None,
        encryption_context: Mapping[str, str] | str | None = None,
        dry_run: bool | None = None,
    ) -> Response:
        response, _ = self._data_key(
            action="GenerateDataKeyWithoutPlaintext",
            key_id=key_id,
            key_spec=key_spec,
            number_of_bytes=number_of_bytes,
            encryption_context=encryption_context,
            dry_run=dry_run,
        )
        return response

    def decrypt(
        self,
        *,
        ciphertext_blob: str | None = None,
        encryption_context: Mapping[str, str] | str | None = None,
        dry_run: bool | None = None,
    ) -> Response:
        context = parse_context(encryption_context)
        with self._reads() as tx:
            key, version_id, plaintext = self._open(
                tx, "Decrypt", ciphertext_blob, context, param="CiphertextBlob", dry_run=dry_run
            )
        return {
            "KeyId": key.key_id,
            "KeyVersionId": version_id,
            "Plaintext": plaintext.decode("utf-8", "surrogatepass"),
        }

    def re_encrypt(
        self,
        *,
        ciphertext_blob: str | None = None,
        destination_key_id: str | None = None,
        source_encryption_context: Mapping[str, str] | str | None = None,
        destination_encryption_context: Mapping[str, str] | str | None = None,
        source_key_id: str | None = None,
        source_key_version_id: str | None = None,
        dry_run: bool | None = None,
    ) -> Response:
        source_context = parse_context(source_encryption_context, param="SourceEncryptionContext")
        destination_context = parse_context(destination_encryption_context, param="DestinationEncryptionContext")
        with self._reads() as tx:
            destination = self._resolve(tx, destination_key_id, param="DestinationKeyId")
            source, version_id, plaintext = self._open(
                tx, "ReEncrypt", ciphertext_blob, source_context, param="CiphertextBlob"
            )
            # SourceKeyId/SourceKeyVersionId are for asymmetric ciphertexts; when given for a
            # symmetric blob they must agree with what the blob says.
            if source_key_id and self._resolve(tx, source_key_id, param="SourceKeyId").key_id != source.key_id:
                raise KmsError.invalid_parameter("SourceKeyId", "It does not match the key of the CiphertextBlob.")
            if source_key_version_id and source_key_version_id != version_id:
                raise KmsError.invalid_parameter(
                    "SourceKeyVersionId", "It does not match the key version of the CiphertextBlob."
                )
            self._check_state("ReEncrypt", destination)
            _stop_if_dry_run(dry_run, "ReEncrypt")
            new_version, blob = self._seal(tx, destination, plaintext, destination_context)
        return {"KeyId": destination.key_id, "KeyVersionId": new_version, "CiphertextBlob": blob}

    # ------------------------------------------------------------------------ versions --
    def _version_out(self, v: VersionRecord) -> dict[str, str]:
        return {"KeyId": v.key_id, "KeyVersionId": v.key_version_id, "CreationDate": v.creation_date}

    def create_key_version(self, *, key_id: str | None = None) -> Response:
        with self._tx(write=True) as tx:
            key = self._resolve(tx, key_id)
            self._check_state("CreateKeyVersion", key)
            if key.origin != "Aliyun_KMS":
                raise KmsError("Unsupported.Origin", "Keys with imported material cannot get new versions.")
            now = self.now()
            version = self._new_version(tx, key, now)
            key.last_rotation_date = now
            tx.update_key(key)
        return {"KeyVersion": self._version_out(version)}

    def describe_key_version(self, *, key_id: str | None = None, key_version_id: str | None = None) -> Response:
        version_id = _require_text(key_version_id, "KeyVersionId")
        with self._tx(write=False) as tx:
            key = self._resolve(tx, key_id)
            version = tx.get_version(version_id)
            if version is None or version.key_id != key.key_id:
                raise KmsError(
                    "Forbidden.KeyVersionNotFound", f"The key version {version_id} of key {key.key_id} is not found."
                )
        return {"KeyVersion": self._version_out(version)}

    def list_key_versions(
        self, *, key_id: str | None = None, page_number: int | None = None, page_size: int | None = None
    ) -> Response:
        number, size = _paging(page_number, page_size)
        with self._tx(write=False) as tx:
            key = self._resolve(tx, key_id)
            versions, total = tx.list_versions(key.key_id, (number - 1) * size, size)
        return {
            "KeyVersions": {"KeyVersion": [self._version_out(v) for v in versions]},
            "TotalCount": total,
            "PageNumber": number,
            "PageSize": size,
        }

    def update_rotation_policy(
        self,
        *,
        key_id: str | None = None,
        enable_automatic_rotation: bool | None = None,
        rotation_interval: str | None = None,
    ) -> Response:
        if enable_automatic_rotation is None:
            raise KmsError.missing_parameter("EnableAutomaticRotation")
        interval = parse_rotation_interval(rotation_interval) if rotation_interval else None

        def change(key: KeyRecord, now: str) -> None:
            if key.origin != "Aliyun_KMS":
                raise KmsError("Unsupported.Origin", "Keys with imported material cannot rotate automatically.")
            key.rotation_enabled = enable_automatic_rotation
            if interval is not None:
                key.rotation_interval = interval
            if enable_automatic_rotation:
                key.rotation_interval = key.rotation_interval or _DEFAULT_ROTATION
                since = parse_time(key.last_rotation_date or key.creation_date)
                key.next_rotation_date = fmt_time(since + timedelta(seconds=key.rotation_interval))
            else:
                key.next_rotation_date = None

        return self._change_key("UpdateRotationPolicy", key_id, change)


class _LazyConnection:
    """Stands in for a connection until a query needs one: then opens the read transaction."""

    def __init__(self, reads: _CachedReads) -> None:
        self._reads = reads

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        return self._reads.real()._c.execute(sql, parameters)


class _CachedReads(Tx):
    """A crypto Action's reads: alias, key and version records from the service's cache when
    they were read under the store change counter the Action started with (and no write by
    this service since); otherwise from a read transaction opened on the first miss, which
    lasts until the Action ends. Records are shared, never modified: crypto Actions only read.
    """

    def __init__(self, service: KmsService, marker: int) -> None:
        super().__init__(_LazyConnection(self))
        self._service = service
        self._marker = marker
        self._writes = service._writes
        self.stack = ExitStack()
        self._real: Tx | None = None

    def real(self) -> Tx:
        if self._real is None:
            self._real = self.stack.enter_context(self._service.store.transaction(write=False))
        return self._real

    def _cached(self, kind: str, name: str, load: Callable[[], Any]) -> Any:
        return self._service._cached(kind, name, self._marker, self._writes, load)

    def get_alias(self, alias_name: str) -> AliasRecord | None:
        record: AliasRecord | None = self._cached("alias", alias_name, lambda: self.real().get_alias(alias_name))
        return record

    def get_key(self, key_id: str) -> KeyRecord | None:
        record: KeyRecord | None = self._cached("key", key_id, lambda: self.real().get_key(key_id))
        return record

    def get_version(self, key_version_id: str) -> VersionRecord | None:
        record: VersionRecord | None = self._cached(
            "version", key_version_id, lambda: self.real().get_version(key_version_id)
        )
        return record


class _OverdueKey(Exception):
    """An Action met a key past its DeleteDate; ``error`` is what it answers once it is destroyed."""

    def __init__(self, error: KmsError) -> None:
        super().__init__(error.code)
        self.error = error


def _stop_if_dry_run(dry_run: bool | None, action: str) -> None:
    """DryRun: every check has passed; stop before any key material is used or returned."""
    if dry_run:
        raise KmsError(
            "DryRunOperation", f"{action} would have succeeded: parameters, key and key state are valid (DryRun)."
        )


def _check_alias_name(alias_name: str | None) -> str:
    name = _require_text(alias_name, "AliasName")
    if not _ALIAS_RE.match(name):
        raise KmsError.invalid_parameter(
            "AliasName", "It must start with alias/ followed by 1-255 of a-z A-Z 0-9 _ - / : characters."
        )
    if name.startswith("alias/acs/"):
        raise KmsError.invalid_parameter("AliasName", "The prefix alias/acs/ is reserved for cloud services.")
    return name


_FILTER_COLUMNS = {
    "KeyState": ("key_state", {"Enabled", "Disabled", "PendingDeletion", "PendingImport"}),
    "KeySpec": ("key_spec", set(_KEY_SPECS) | _OTHER_KEY_SPECS),
    "KeyUsage": ("key_usage", {"ENCRYPT/DECRYPT", "SIGN/VERIFY"}),
    "ProtectionLevel": ("protection_level", {"SOFTWARE", "HSM"}),
    "Origin": ("origin", _ORIGINS),
}


def _parse_filters(filters: str | None) -> list[tuple[str, list[str]]]:
    """``[{"Key": "KeyState", "Values": ["Enabled"]}]`` → column filters (values OR-ed, keys AND-ed)."""
    if not filters:
        return []
    try:
        parsed = json.loads(filters)
    except (ValueError, RecursionError):
        raise KmsError.invalid_parameter(
            "Filters", 'Use JSON like [{"Key":"KeyState","Values":["Enabled"]}].'
        ) from None
    if not isinstance(parsed, list) or len(parsed) > 10:
        raise KmsError.invalid_parameter("Filters", "It must be a JSON array of at most 10 filters.")
    result = []
    for item in parsed:
        if not isinstance(item, dict) or set(item) != {"Key", "Values"}:
            raise KmsError.invalid_parameter("Filters", "Each filter is an object {Key, Values}.")
        spec = _FILTER_COLUMNS.get(item["Key"]) if isinstance(item["Key"], str) else None
        if spec is None:
            raise KmsError.invalid_parameter("Filters", f"Supported filter keys: {', '.join(sorted(_FILTER_COLUMNS))}.")
        values = item["Values"]
        if not isinstance(values, list) or not values or not all(isinstance(v, str) and v in spec[1] for v in values):
            raise KmsError.invalid_parameter(
                "Filters", f"Values of {item['Key']} must be a non-empty list of known values."
            )
        result.append((spec[0], values))
    return result


def make_home(home: Path) -> None:
    """Create the KMS home (and its parents), mode 0700; an existing one is made private too."""
    try:
        home.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the KMS home {home}: {exc.strerror}") from None
    private_home(home)


def private_home(home: Path) -> None:
    """Make an existing KMS home of ours 0700 (a folder the user made 0755 before first use).

    Its files are 0600 whatever the folder's mode; a group- or world-readable home still shows
    who has a KMS, its file names and sizes, and lets others watch them change. Like ssh with
    ~/.ssh, but fixing rather than refusing: the home is ours and only loses access bits.
    A home owned by another user (root operating on it) is left as it is.
    """
    try:
        info = home.stat()
        if info.st_uid == os.geteuid() and info.st_mode & 0o077:
            os.chmod(home, 0o700)
    except OSError as exc:
        raise ConfigError(f"cannot make the KMS home {home} private: {exc.strerror}") from None


def open_service(
    home: Path | None = None, *, clock: Clock = utc_now, announce: bool = True, store: str | None = None
) -> KmsService:
    """Open (creating on first use) the KMS whose root key is in ``home`` (default: ``KMSENV_HOME``
    or ~/.kmsenv). Its store is ``store`` or ``KMSENV_STORE`` when set (a ``postgresql://`` URL,
    shared by several nodes; see docs/cluster.md), else the embedded ``kms.db`` in ``home``."""
    home = home or default_home()
    target = store if store is not None else os.environ.get(STORE_ENV, "")
    if target:
        return _open_shared_service(home, target, clock=clock, announce=announce)
    db_path = home / "kms.db"
    new_home = not db_path.exists()
    if new_home:
        make_home(home)
    elif not home.is_dir():
        raise ConfigError(f"the KMS home {home} is not a folder")
    else:
        private_home(home)
    # A root key is only ever created together with a new store: creating one beside an existing
    # store would silently make every key in it unreadable.
    root_key, created_root = load_or_create_root_key(home, create=new_home)
    store_ = SqliteStore(db_path)
    try:
        initialized, region, account_id = _bind_root_key(store_, root_key)
    except BaseException:
        store_.close()
        raise
    if created_root and announce:
        print(
            f"kmsenv: created a new embedded KMS in {home} (root key {home / 'root.key'}, mode 0600); "
            "back up the root key: without it nothing in this KMS can be decrypted",
            file=sys.stderr,
        )
    elif initialized and announce and os.environ.get(ROOT_KEY_ENV):
        # A new store sealed under a root key named by KMSENV_ROOT_KEY_FILE: still a first use.
        print(
            f"kmsenv: created a new embedded KMS in {home} (root key {os.environ[ROOT_KEY_ENV]}); "
            "keep that root key: without it nothing in this KMS can be decrypted",
            file=sys.stderr,
        )
    return KmsService(store_, root_key, region=region, account_id=account_id, clock=clock)


def _bind_root_key(store: Store, root_key: RootKey) -> tuple[bool, str, str]:
    """Seal a new store to ``root_key`` (and fix its region and account id), or check that an
    existing one was sealed to it. Returns (newly initialised, region, account id)."""
    with store.transaction(write=True) as tx:
        check = tx.meta_get("root_key_check")
        initialized = check is None
        if check is None:
            import secrets  # here, not at the top: it loads a second OpenSSL (_hashlib) every KMS open would pay for

            tx.meta_set("root_key_check", root_key.make_check())
            tx.meta_set("region", os.environ.get(REGION_ENV, DEFAULT_REGION).encode("utf-8"))
            tx.meta_set("account_id", str(secrets.randbelow(9 * 10**15) + 10**15).encode("ascii"))
        elif not root_key.verify_check(check):
            raise ConfigError(
                f"the root key (fingerprint {root_key.fingerprint}) does not open the KMS store {store.path}",
                hint="set KMSENV_ROOT_KEY_FILE to the root key this store was created with",
            )
        region = (tx.meta_get("region") or b"").decode("utf-8")
        account_id = (tx.meta_get("account_id") or b"").decode("ascii")
    return initialized, region, account_id


def _open_shared_service(home: Path, target: str, *, clock: Clock, announce: bool) -> KmsService:
    """A KMS over a PostgreSQL store. The root key is ``KMSENV_ROOT_KEY_FILE`` or ``home/root.key``;
    one is created in ``home`` only for a database no node has used yet."""
    from kmsenv.kms.pg_store import PostgresStore, require_postgres_url

    store = PostgresStore(require_postgres_url(target))
    try:
        with store.transaction(write=False) as tx:
            fresh = tx.meta_get("root_key_check") is None
        if fresh and not os.environ.get(ROOT_KEY_ENV):
            make_home(home)
        root_key, created_root = load_or_create_root_key(home, create=fresh)
        initialized, region, account_id = _bind_root_key(store, root_key)
    except BaseException:
        store.close()
        raise
    if initialized and announce:
        print(
            f"kmsenv: created a new KMS in {store.path} (root key "
            f"{os.environ.get(ROOT_KEY_ENV) or home / 'root.key'}{', new, mode 0600' if created_root else ''}); "
            "every node needs this root key (KMSENV_ROOT_KEY_FILE): back it up",
            file=sys.stderr,
        )
    return KmsService(store, root_key, region=region, account_id=account_id, clock=clock)
