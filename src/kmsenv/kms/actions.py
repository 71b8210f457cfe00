"""The table of supported Actions and their wire parameters, and the dispatcher that uses it.

Both doors onto the service (the CLI's ``kmsenv kms <Action> --<Param> v`` and, later, the HTTP
server) receive parameters as strings under the API's own names. This table says which names each
Action takes, which are required, and how each string becomes a typed value; ``dispatch`` applies
it and calls the typed handler, so both doors validate identically. Parameters an Action does not
declare are ignored, as Alibaba's gateway ignores unknown ones (common parameters like
``RegionId`` or ``Format`` arrive on every request).
"""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from kmsenv.errors import KmsError
from kmsenv.kms.blob import decode_blob

if TYPE_CHECKING:
    from kmsenv.kms.policy import Policy
    from kmsenv.kms.service import KmsService

__all__ = ["ACTIONS", "API_VERSION", "Action", "Param", "authorize", "dispatch", "new_request_id", "request_resources"]

API_VERSION = "2016-01-20"

Kind = Literal["str", "int", "bool", "json"]


@dataclass(frozen=True, slots=True)
class Param:
    name: str
    kind: Kind = "str"
    required: bool = False
    help: str = ""

    @property
    def attr(self) -> str:
        """The handler's keyword: ``KeyId`` → ``key_id``, ``PendingWindowInDays`` → ``pending_window_in_days``."""
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower()


@dataclass(frozen=True, slots=True)
class Action:
    name: str
    summary: str
    params: tuple[Param, ...]

    @property
    def method(self) -> str:
        return re.sub(r"(?<!^)(?=[A-Z])", "_", self.name).lower()


_KEY = Param("KeyId", required=True, help="key id, key ARN, alias name (alias/...) or alias ARN")
_CONTEXT = Param("EncryptionContext", "json", help='JSON object of strings, e.g. {"project":"apollo"}')
_DRY_RUN = Param("DryRun", "bool", help="true: check everything, use no key material (DryRunOperation)")
_PAGE = (Param("PageNumber", "int", help="page to return, from 1"), Param("PageSize", "int", help="1-100, default 10"))
_ROTATION = Param("RotationInterval", help="e.g. 30d or 2592000s; 7 to 730 days")

_TABLE: tuple[Action, ...] = (
    Action(
        "CreateKey",
        "Create a customer master key (CMK).",
        (
            Param("Description", help="up to 8192 characters"),
            Param("KeySpec", help="Aliyun_AES_256 (default), Aliyun_AES_192 or Aliyun_AES_128"),
            Param("KeyUsage", help="ENCRYPT/DECRYPT (default)"),
            Param("Origin", help="Aliyun_KMS (default) or EXTERNAL (key material to import: PendingImport)"),
            Param("ProtectionLevel", help="SOFTWARE (default)"),
            Param("EnableAutomaticRotation", "bool", help="true or false"),
            _ROTATION,
            Param("Tags", "json", help='JSON array, e.g. [{"TagKey":"team","TagValue":"apollo"}]'),
        ),
    ),
    Action("DescribeKey", "Show a CMK's metadata.", (_KEY,)),
    Action(
        "ListKeys",
        "List CMKs, a page at a time.",
        (*_PAGE, Param("Filters", "json", help='e.g. [{"Key":"KeyState","Values":["Enabled"]}]')),
    ),
    Action("UpdateKeyDescription", "Change a CMK's description.", (_KEY, Param("Description", required=True))),
    Action("EnableKey", "Enable a CMK.", (_KEY,)),
    Action("DisableKey", "Disable a CMK: no cryptographic use until it is enabled again.", (_KEY,)),
    Action(
        "ScheduleKeyDeletion",
        "Schedule a CMK's deletion after a waiting period; its material is destroyed then.",
        (_KEY, Param("PendingWindowInDays", "int", required=True, help="7 to 366")),
    ),
    Action("CancelKeyDeletion", "Cancel a scheduled deletion; the CMK becomes Enabled.", (_KEY,)),
    Action(
        "SetDeletionProtection",
        "Turn deletion protection of a CMK on or off.",
        (
            Param("ProtectedResourceArn", help="the CMK's ARN (or give KeyId)"),
            Param("KeyId", help="the CMK (instead of ProtectedResourceArn)"),
            Param("EnableDeletionProtection", "bool", required=True),
            Param("DeletionProtectionDescription"),
        ),
    ),
    Action(
        "CreateAlias",
        "Give a CMK an alias.",
        (Param("AliasName", required=True, help="alias/ followed by 1-255 characters"), _KEY),
    ),
    Action("UpdateAlias", "Point an alias at another CMK.", (Param("AliasName", required=True), _KEY)),
    Action("DeleteAlias", "Delete an alias (not the CMK).", (Param("AliasName", required=True),)),
    Action("ListAliases", "List aliases.", _PAGE),
    Action("ListAliasesByKeyId", "List the aliases of one CMK.", (_KEY, *_PAGE)),
    Action(
        "Encrypt",
        "Encrypt up to 6 KiB of text under a CMK's primary version.",
        (_KEY, Param("Plaintext", required=True), _CONTEXT, _DRY_RUN),
    ),
    Action(
        "Decrypt",
        "Decrypt a CiphertextBlob (it names its CMK and version).",
        (Param("CiphertextBlob", required=True), _CONTEXT, _DRY_RUN),
    ),
    Action(
        "GenerateDataKey",
        "Make a data key: its plaintext (base64) and its CiphertextBlob.",
        (
            _KEY,
            Param("KeySpec", help="AES_256 (default) or AES_128"),
            Param("NumberOfBytes", "int", help="1 to 1024; overrides KeySpec"),
            _CONTEXT,
            _DRY_RUN,
        ),
    ),
    Action(
        "GenerateDataKeyWithoutPlaintext",
        "Make a data key and return only its CiphertextBlob.",
        (_KEY, Param("KeySpec"), Param("NumberOfBytes", "int"), _CONTEXT, _DRY_RUN),
    ),
    Action(
        "ReEncrypt",
        "Re-encrypt a CiphertextBlob under another CMK (or a newer version) without exposing it.",
        (
            Param("CiphertextBlob", required=True),
            Param("DestinationKeyId", required=True),
            Param("SourceEncryptionContext", "json"),
            Param("DestinationEncryptionContext", "json"),
            Param("SourceKeyId"),
            Param("SourceKeyVersionId"),
            _DRY_RUN,
        ),
    ),
    Action("CreateKeyVersion", "Create a new primary version of a CMK (manual rotation).", (_KEY,)),
    Action("DescribeKeyVersion", "Show one version of a CMK.", (_KEY, Param("KeyVersionId", required=True))),
    Action("ListKeyVersions", "List the versions of a CMK.", (_KEY, *_PAGE)),
    Action(
        "UpdateRotationPolicy",
        "Turn automatic rotation of a CMK on or off.",
        (_KEY, Param("EnableAutomaticRotation", "bool", required=True), _ROTATION),
    ),
)

#: Action name → its definition.
ACTIONS: dict[str, Action] = {a.name: a for a in _TABLE}

_INT_RE = re.compile(r"^-?[0-9]{1,18}$")


def _convert(param: Param, raw: str) -> object:
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (undecodable bytes in a command-line argument): not text, and SQLite
        # or the JSON response would fail on them later with a traceback.
        raise KmsError.invalid_parameter(param.name, "It must be valid Unicode text.") from None
    if param.kind == "int":
        if not _INT_RE.match(raw.strip()):
            raise KmsError.invalid_parameter(param.name, "It must be an integer.")
        return int(raw)
    if param.kind == "bool":
        # Both official SDKs send Python's str(bool): "True"/"False".
        lowered = raw.strip().lower()
        if lowered not in ("true", "false"):
            raise KmsError.invalid_parameter(param.name, "It must be true or false.")
        return lowered == "true"
    return raw


def new_request_id() -> str:
    return str(uuid.uuid4())


def dispatch(service: KmsService, action_name: str, params: Mapping[str, str]) -> dict[str, Any]:
    """Validate string parameters for ``action_name``, call its handler, add ``RequestId``."""
    action = ACTIONS.get(action_name)
    if action is None:
        raise KmsError("InvalidApi.NotFound", f"The Action {action_name!r} is not supported by this KMS.")
    kwargs: dict[str, object] = {}
    for param in action.params:
        raw = params.get(param.name)
        if raw is None or (raw == "" and param.kind != "str"):
            if param.required:
                raise KmsError.missing_parameter(param.name)
            continue
        kwargs[param.attr] = _convert(param, raw)
    response: dict[str, Any] = getattr(service, action.method)(**kwargs)
    return {**response, "RequestId": new_request_id()}


_KEY_PARAMS = ("KeyId", "DestinationKeyId", "SourceKeyId", "ProtectedResourceArn")


def request_resources(service: KmsService, action: Action, params: Mapping[str, str]) -> list[str]:
    """The ARNs a request touches, as RAM policies name them."""
    arns: list[str] = []
    for name in _KEY_PARAMS:
        ident = params.get(name)
        if ident:
            arns.extend(service.resource_arns(ident))
    blob = params.get("CiphertextBlob")
    if blob:
        with contextlib.suppress(KmsError):  # a malformed blob is the handler's to report
            arns.append(service.key_arn(decode_blob(blob).key_id))
    alias = params.get("AliasName")
    if alias:
        arns.append(service.alias_arn(alias))
    if not arns:  # CreateKey, ListKeys, ListAliases: the account's key or alias collection
        kind = "alias" if action.name == "ListAliases" else "key"
        arns.append(f"acs:kms:{service.region}:{service.account_id}:{kind}")
    return list(dict.fromkeys(arns))


def authorize(service: KmsService, policy: Policy | None, action_name: str, params: Mapping[str, str]) -> None:
    """Raise Forbidden.NoPermission unless ``policy`` (None = full access) allows the request."""
    action = ACTIONS.get(action_name)
    if policy is None or action is None:
        return
    resources = request_resources(service, action, params)
    if not policy.allows(f"kms:{action.name}", resources):
        raise KmsError(
            "Forbidden.NoPermission",
            f"This action is forbidden: the AccessKey's policy does not allow kms:{action.name} "
            f"on {', '.join(resources)}.",
        )
