"""Legacy files: the four-line base64 AES-EAX text files of the reference document's sample code.

This module owns reading that format, which kmsenv never writes. The sample wrote, one per line:

1. the KMS ``CiphertextBlob`` of the data key (as ``GenerateDataKey`` returned it),
2. the base64 EAX nonce (16 bytes: pycryptodome's default),
3. the base64 ciphertext (as long as the plaintext: EAX is a counter mode),
4. the base64 EAX tag (16 bytes).

The parser is tolerant only where the sample's environment varied — ``\\n`` or ``\\r\\n`` line
ends, a missing final newline — and strict everywhere else: exactly four lines, each valid
base64 with nothing around it, sizes as the sample produces them. Line 3 may be empty: that is
how the sample encrypts an empty file. A file is recognised by its content, never its name.

The format is whole-file by nature (one nonce, one tag over everything), so a legacy file is
read into memory in full and refused above :data:`MAX_LEGACY_FILE_SIZE`. Decrypting it needs a
KMS ``Decrypt`` of line 1 without encryption context (the sample used none), then AES-EAX.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from typing import BinaryIO

from kmsenv.errors import FormatError

__all__ = [
    "LEGACY_FORMAT",
    "MAX_LEGACY_FILE_SIZE",
    "LegacyFile",
    "looks_like_legacy",
    "open_legacy",
    "parse_legacy",
    "read_legacy",
]

LEGACY_FORMAT = "legacy-aes-eax"
#: Whole-file format, held in memory twice (base64 and binary) while decrypting: bounded.
MAX_LEGACY_FILE_SIZE = 256 * 1024 * 1024
MAX_LEGACY_BLOB_CHARS = 8192
EAX_NONCE_SIZE = 16
EAX_TAG_SIZE = 16
#: Shortest first line we accept as a CiphertextBlob: real ones are far longer, and requiring
#: some length keeps short base64-looking text files from being mistaken for legacy files.
_MIN_BLOB_CHARS = 24
_B64_LINE = re.compile(rb"[A-Za-z0-9+/]*={0,2}")
_B64_CHARS = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")
_LINE_ENDS = frozenset(b"\r\n")


@dataclass(frozen=True, slots=True)
class LegacyFile:
    """A parsed legacy file. ``ciphertext_blob`` is the base64 text KMS ``Decrypt`` takes."""

    ciphertext_blob: str
    nonce: bytes
    ciphertext: bytes
    tag: bytes

    def __repr__(self) -> str:
        return f"LegacyFile(<blob {len(self.ciphertext_blob)} chars>, <ciphertext {len(self.ciphertext)} bytes>)"

    @property
    def blob_size(self) -> int:
        """Bytes of the decoded CiphertextBlob."""
        return len(base64.b64decode(self.ciphertext_blob))


def looks_like_legacy(prefix: bytes) -> bool:
    """Whether ``prefix`` (the first bytes of a file; 512 is plenty) starts a legacy file.

    True when the bytes are only base64 characters and line ends and the first line is long
    enough to be a CiphertextBlob. A heuristic for choosing a reader: :func:`parse_legacy`
    still checks everything.
    """
    first = prefix.split(b"\n", 1)[0].rstrip(b"\r")
    if len(first) < _MIN_BLOB_CHARS or not set(first) <= _B64_CHARS:
        return False
    return set(prefix) <= _B64_CHARS | _LINE_ENDS


def _lines(data: bytes) -> list[bytes]:
    if data.endswith(b"\n"):
        data = data[:-1]
    lines = data.split(b"\n")
    return [line[:-1] if line.endswith(b"\r") else line for line in lines]


def _b64(line: bytes, what: str) -> bytes:
    # validate=True refuses characters outside the alphabet; the regex also refuses anything
    # b64decode would skip or accept oddly, so each line has one reading.
    if _B64_LINE.fullmatch(line) is None or len(line) % 4:
        raise FormatError(f"legacy file: the {what} line is not valid base64")
    try:
        return base64.b64decode(line, validate=True)
    except (binascii.Error, ValueError):
        raise FormatError(f"legacy file: the {what} line is not valid base64") from None


def parse_legacy(data: bytes) -> LegacyFile:
    """Parse a whole legacy file; FormatError if it breaks any rule in the module docstring."""
    if len(data) > MAX_LEGACY_FILE_SIZE:
        raise FormatError(
            f"legacy file is over the {MAX_LEGACY_FILE_SIZE // (1024 * 1024)} MiB limit of this whole-file format"
        )
    lines = _lines(data)
    if len(lines) != 4:
        raise FormatError(f"legacy file must have exactly 4 lines, not {len(lines)}")
    blob_line, nonce_line, ciphertext_line, tag_line = lines
    for what, line in (("CiphertextBlob", blob_line), ("nonce", nonce_line), ("tag", tag_line)):
        if not line:
            raise FormatError(f"legacy file: the {what} line is empty")
    if len(blob_line) > MAX_LEGACY_BLOB_CHARS:
        raise FormatError(f"legacy file: the CiphertextBlob line is over {MAX_LEGACY_BLOB_CHARS} characters")
    _b64(blob_line, "CiphertextBlob")
    nonce = _b64(nonce_line, "nonce")
    ciphertext = _b64(ciphertext_line, "ciphertext")
    tag = _b64(tag_line, "tag")
    if len(nonce) != EAX_NONCE_SIZE:
        raise FormatError(f"legacy file: the nonce must be {EAX_NONCE_SIZE} bytes, not {len(nonce)}")
    if len(tag) != EAX_TAG_SIZE:
        raise FormatError(f"legacy file: the tag must be {EAX_TAG_SIZE} bytes, not {len(tag)}")
    return LegacyFile(blob_line.decode("ascii"), nonce, ciphertext, tag)


def read_legacy(src: BinaryIO) -> LegacyFile:
    """Read ``src`` to EOF (at most the size limit, plus one byte to notice more) and parse it."""
    data = src.read(MAX_LEGACY_FILE_SIZE + 1)
    return parse_legacy(data)


def open_legacy(legacy: LegacyFile, data_key: bytes) -> bytes:
    """Verify and decrypt the payload under the unwrapped data key; IntegrityError on any change."""
    from kmsenv import _crypto

    return _crypto.eax_decrypt(
        data_key, legacy.nonce, legacy.ciphertext, legacy.tag, what="legacy file"
    )
