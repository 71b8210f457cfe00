"""The error hierarchy of kmsenv, and the one place it maps to exit codes and Alibaba error codes.

Every failure a user can cause is one of the classes below. The CLI turns them into
``kmsenv: error: ...`` (+ ``kmsenv: hint: ...``) and the exit code of the class; the HTTP server
(later) turns :class:`KmsError` into the Alibaba error body with the status of its code.

Messages never contain key material, plaintext, CiphertextBlobs or secrets: they are shown to
users and written to logs as they are.
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "EXIT_CODES",
    "ConfigError",
    "ContextError",
    "FormatError",
    "InputError",
    "IntegrityError",
    "KmsError",
    "KmsenvError",
    "OutputError",
    "UsageError",
]


class KmsenvError(Exception):
    """Root of every error kmsenv raises on purpose.

    ``message`` is safe to show to the user; ``hint`` optionally says what to do about it.
    """

    exit_code: ClassVar[int] = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint


class UsageError(KmsenvError):
    """The command line or API call itself is wrong (unknown option, bad combination)."""

    exit_code = 2


class KmsError(KmsenvError):
    """A KMS Action failed with an Alibaba Cloud KMS error code (``Forbidden.KeyNotFound``, ...).

    The HTTP status is looked up from the code, so a code means the same everywhere.
    """

    exit_code = 3

    def __init__(self, code: str, message: str, *, hint: str | None = None) -> None:
        super().__init__(message, hint=hint)
        self.code = code

    @property
    def http_status(self) -> int:
        return HTTP_STATUS.get(self.code, 400)

    @property
    def retryable(self) -> bool:
        """Alibaba's own clients retry exactly these codes."""
        return self.code in {"Rejected.Throttling", "ServiceUnavailableTemporary", "InternalFailure"}

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"

    # Constructors for the codes whose message text Alibaba documents verbatim.
    @classmethod
    def missing_parameter(cls, name: str) -> KmsError:
        return cls("MissingParameter", f'The parameter "{name}" is needed but not provided.')

    @classmethod
    def invalid_parameter(cls, name: str, why: str = "") -> KmsError:
        text = f'The specified parameter "{name}" is not valid.'
        return cls("InvalidParameter", f"{text} {why}".strip())


class InputError(KmsenvError):
    """An input path cannot be used: missing, a directory, unreadable, or changed while read."""

    exit_code = 4


class OutputError(KmsenvError):
    """An output cannot be written: exists without --force, unwritable folder, disk full."""

    exit_code = 5


class FormatError(KmsenvError):
    """The data is not in a format kmsenv reads: wrong magic, unknown version or suite, a header that
    breaks the format's rules or limits. Raised before any key is unwrapped."""

    exit_code = 6


class IntegrityError(KmsenvError):
    """Authentication failed: the data was modified, truncated, extended, reordered, or the key is
    wrong. One opaque class on purpose: telling these apart would give an attacker an oracle."""

    exit_code = 7


class ContextError(KmsenvError):
    """The encryption context the caller requires is not the one the data is bound to."""

    exit_code = 8


class ConfigError(KmsenvError):
    """The KMS home, root key, store or another setting is unusable."""

    exit_code = 9


#: Exit code of each error class; documented in docs/cli.md. 0 is success, 1 an unexpected bug.
EXIT_CODES: dict[type[KmsenvError], int] = {
    cls: cls.exit_code
    for cls in (
        KmsenvError,
        UsageError,
        KmsError,
        InputError,
        OutputError,
        FormatError,
        IntegrityError,
        ContextError,
        ConfigError,
    )
}

#: HTTP status of every Alibaba error code kmsenv emits (reference: alibaba-kms-wire.md §8).
HTTP_STATUS: dict[str, int] = {
    "Forbidden.KeyNotFound": 404,
    "Forbidden.AliasNotFound": 404,
    "Forbidden.KeyVersionNotFound": 404,
    "Forbidden.ResourceNotFound": 404,
    "InvalidAccessKeyId.NotFound": 404,
    "InvalidApi.NotFound": 404,
    "Forbidden.NoPermission": 403,
    "Forbidden.AccessKey": 403,
    "UnsupportedHTTPMethod": 403,
    "MissingParameter": 400,
    "InvalidParameter": 400,
    "ParseRequestParameterException": 400,
    "IncompleteSignature": 400,
    "IllegalTimestamp": 400,
    "InvalidTimeStamp.Format": 400,
    "InvalidTimeStamp.Expired": 400,
    "SignatureDoesNotMatch": 400,
    "SignatureNonceUsed": 400,
    "InvalidAccessKeyId.Inactive": 400,
    "InvalidSignatureMethod": 400,
    "InvalidCiphertext": 400,
    "InvalidVersion": 400,
    "EntityTooLarge": 413,  # kmsenv server: request body over its limit (docs/server.md)
    "RequestTimeout": 408,  # kmsenv server: request head or body not received in time (docs/server.md)
    "RequestHeaderTooLarge": 431,  # kmsenv server: request head over its limit (docs/server.md)
    "Rejected.LimitExceeded": 400,
    "Rejected.UnsupportedOperation": 400,
    "Rejected.DeletionProtection": 409,
    "Unsupported.Origin": 400,
    "Unsupported.ProtectionLevel": 400,
    "Unsupported.KeySpec": 400,
    "AliasAlreadyExists": 400,
    "DryRunOperation": 412,
    "Rejected.Enabled": 409,
    "Rejected.Disabled": 409,
    "Rejected.PendingDeletion": 409,
    "Rejected.PendingImport": 409,
    "Rejected.StateModifiedFailed": 409,
    "Rejected.Throttling": 429,
    "InternalFailure": 500,
    "ServiceUnavailableTemporary": 503,
}
