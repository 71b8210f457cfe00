"""kmsenv: Alibaba Cloud KMS-compatible key management and envelope encryption of local files.

The public API is what this module lists in ``__all__``; everything else is private.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from kmsenv.errors import (
    ConfigError,
    ContextError,
    FormatError,
    InputError,
    IntegrityError,
    KmsenvError,
    KmsError,
    OutputError,
    UsageError,
)

if TYPE_CHECKING:
    from kmsenv.clients import AlibabaKms, EmbeddedKms, Kms
    from kmsenv.envelope import (
        DataKeyCache,
        DecryptResult,
        EncryptedReader,
        decrypt_file,
        decrypt_file_result,
        decrypt_stream,
        decrypt_stream_result,
        encrypt_file,
        encrypt_stream,
        inspect_file,
        migrate_file,
        open_encrypted,
        rewrap_file,
    )

__version__ = "0.1.0"

#: Public names loaded on first use: the envelope layer imports ``cryptography``, and
#: ``import kmsenv`` (every CLI start) must stay cheap.
_LAZY = {
    "AlibabaKms": "kmsenv.clients",
    "EmbeddedKms": "kmsenv.clients",
    "Kms": "kmsenv.clients",
    "DataKeyCache": "kmsenv.envelope",
    "DecryptResult": "kmsenv.envelope",
    "EncryptedReader": "kmsenv.envelope",
    "open_encrypted": "kmsenv.envelope",
    "decrypt_file": "kmsenv.envelope",
    "decrypt_file_result": "kmsenv.envelope",
    "decrypt_stream": "kmsenv.envelope",
    "decrypt_stream_result": "kmsenv.envelope",
    "rewrap_file": "kmsenv.envelope",
    "encrypt_file": "kmsenv.envelope",
    "encrypt_stream": "kmsenv.envelope",
    "inspect_file": "kmsenv.envelope",
    "migrate_file": "kmsenv.envelope",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kmsenv' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "AlibabaKms",
    "ConfigError",
    "ContextError",
    "DataKeyCache",
    "DecryptResult",
    "EmbeddedKms",
    "EncryptedReader",
    "FormatError",
    "InputError",
    "IntegrityError",
    "Kms",
    "KmsError",
    "KmsenvError",
    "OutputError",
    "UsageError",
    "__version__",
    "decrypt_file",
    "decrypt_file_result",
    "decrypt_stream",
    "decrypt_stream_result",
    "encrypt_file",
    "encrypt_stream",
    "inspect_file",
    "migrate_file",
    "open_encrypted",
    "rewrap_file",
]
