"""kmsenv: Alibaba Cloud KMS-compatible key management and envelope encryption of local files.

The public API is what this module lists in ``__all__``; everything else is private.
"""

from __future__ import annotations

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

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "ContextError",
    "FormatError",
    "InputError",
    "IntegrityError",
    "KmsError",
    "KmsenvError",
    "OutputError",
    "UsageError",
    "__version__",
]
