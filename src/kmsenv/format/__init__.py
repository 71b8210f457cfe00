"""kmsenv file formats v1 and v2: the header codec, per-file keys and the chunked payload stream.

The normative specification is docs/format.md; this package is its implementation and the
package-internal API the file-level layer (:mod:`kmsenv.envelope`) is written against:

* :mod:`.header` — byte layout, limits, the strict canonical parser, v2 slot selection and
  in-place slot writes (nothing keyed);
* :mod:`.keys` — the KDF, key commitment and header tag (:class:`FileKey` handles);
* :mod:`.stream` — the chunk framing and the constant-memory, optionally parallel engine.

Legacy (pre-v1) files are read by :mod:`kmsenv.format.legacy`, which is not re-exported here.
"""

from __future__ import annotations

from kmsenv.format.header import (
    DEFAULT_CHUNK_SIZE,
    FORMAT_VERSION,
    MAGIC,
    MAX_CHUNK_SIZE,
    MAX_HEADER_SIZE,
    MAX_HEADER_SIZE_V2,
    MAX_STANZAS,
    MIN_CHUNK_SIZE,
    SUITE_AES256GCM_HKDF_SHA256,
    VERSIONS,
    Header,
    KeyStanza,
    looks_like_kmsenv,
    looks_like_v1,
    parse_header,
    read_header,
    slot_writes,
)
from kmsenv.format.keys import DATA_KEY_SIZE, FileKey, new_header, open_header, rewrap_header
from kmsenv.format.stream import CHUNK_TAG_SIZE, decrypt_stream, encrypt_stream, payload_size

__all__ = [
    "CHUNK_TAG_SIZE",
    "DATA_KEY_SIZE",
    "DEFAULT_CHUNK_SIZE",
    "FORMAT_VERSION",
    "MAGIC",
    "MAX_CHUNK_SIZE",
    "MAX_HEADER_SIZE",
    "MAX_HEADER_SIZE_V2",
    "MAX_STANZAS",
    "MIN_CHUNK_SIZE",
    "SUITE_AES256GCM_HKDF_SHA256",
    "VERSIONS",
    "FileKey",
    "Header",
    "KeyStanza",
    "decrypt_stream",
    "encrypt_stream",
    "looks_like_kmsenv",
    "looks_like_v1",
    "new_header",
    "open_header",
    "parse_header",
    "payload_size",
    "read_header",
    "rewrap_header",
    "slot_writes",
]
