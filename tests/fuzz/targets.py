"""Fuzz targets: one function per parser, each taking arbitrary bytes.

The contract every target checks (docs/security.md, "Fuzzing"): the parser returns a valid result
or raises the project's documented error class for that input — :class:`FormatError`,
:class:`IntegrityError`, or :class:`KmsError` with one of its documented codes — and nothing else.
Any other exception escapes the target and is a finding. A target that accepts an input also
checks what it can about the result (a parsed header re-encodes to the exact bytes it came from).

Each target has seeds built from the committed test vectors (``tests/vectors/*.json`` and
``tests/vectors/signature/*.json``), so mutation starts from valid and nearly-valid inputs.

Used by ``tests/test_fuzz.py`` (hypothesis, bounded) and ``tests/fuzz/run.py`` (atheris).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import io
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

from kmsenv import _crypto
from kmsenv.errors import HTTP_STATUS, FormatError, IntegrityError, KmsError
from kmsenv.format.header import KeyStanza, parse_header, read_header, slot_check, slot_writes
from kmsenv.format.keys import open_header, rewrap_header
from kmsenv.format.legacy import open_legacy, parse_legacy
from kmsenv.format.stream import decrypt_stream
from kmsenv.kms.blob import blob_aad, blob_prefix, decode_blob, encode_blob
from kmsenv.kms.policy import parse_policy
from kmsenv.server import signature
from kmsenv.server.app import _parse_pairs, _refuse_duplicates

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
#: The data key of every format vector (tests/vectors/generate.py, ``DATA_KEY``).
DATA_KEY = hashlib.sha256(b"kmsenv v1 test vectors: data key").digest()
#: Secret of the signature vectors.
SECRET = "testsecret"


class Finding(AssertionError):
    """A target saw a result that breaks its contract (not an exception class it may raise)."""


@dataclass(frozen=True)
class Target:
    name: str
    run: Callable[[bytes], None]
    seeds: Callable[[], list[bytes]]
    doc: str


def _format_vectors() -> Iterator[tuple[str, dict[str, object]]]:
    for path in sorted(VECTORS.glob("*.json")):
        yield path.stem, json.loads(path.read_text("utf-8"))


def _file_seeds() -> list[bytes]:
    return [base64.b64decode(str(v["file_base64"])) for _, v in _format_vectors() if "file_base64" in v]


# -- header ----------------------------------------------------------------------------------------
def fuzz_header(data: bytes) -> None:
    """parse_header and read_header agree; an accepted header re-encodes byte for byte.

    IntegrityError is allowed only for a v2 header neither of whose slots is intact.
    """
    try:
        header, size = parse_header(data)
    except (FormatError, IntegrityError) as exc:
        if isinstance(exc, IntegrityError) and data[7:8] != b"\x02":
            raise Finding("a v1 header parse raised IntegrityError") from exc
        try:
            read_header(io.BytesIO(data))
        except (FormatError, IntegrityError) as again:
            if type(again) is not type(exc):
                raise Finding("read_header and parse_header fail differently") from again
            return
        raise Finding("read_header accepted what parse_header refused") from None
    if header.encode() != data[:size]:
        raise Finding("an accepted header does not re-encode to its bytes")
    if read_header(io.BytesIO(data)) != header:
        raise Finding("read_header and parse_header disagree")


# -- v2 slots: selection, in-place rewrap, torn writes ---------------------------------------------
def _v2_base() -> bytes:
    return next(base64.b64decode(str(v["file_base64"])) for n, v in _format_vectors() if n == "v2_ok_one_byte")


_V2_STANZA = KeyStanza("acs-kms", "acs:kms:cn-beijing:1234567890123456:key/fuzz", "v-fuzz", b"\x05" * 40)


def fuzz_header_v2(data: bytes) -> None:
    """``data`` is the two-slot region after the immutable part of vector ``v2_ok_one_byte``.

    Whatever the slots hold, parsing either fails with FormatError/IntegrityError or selects the
    intact slot of the highest generation (the other is not intact, or lower) and re-encodes
    byte for byte. If the selected slot also opens under the vectors' data key, an in-place
    rewrap (add a key, or remove one) is applied with its last write torn at a point chosen by
    ``data``: the file must still parse and open, with the old or the new stanzas.
    """
    base = _v2_base()
    fixed = parse_header(base)[0]
    immutable_size = fixed.slot_offset(0)
    total = immutable_size + len(data)
    if total > 0xFFFFFFFF:
        return
    region = base[:8] + total.to_bytes(4, "big") + base[12:immutable_size] + data
    try:
        header, size = parse_header(region)
    except (FormatError, IntegrityError):
        return
    if header.encode() != region[:size] or header.version != 2:
        raise Finding("an accepted v2 region does not re-encode to its bytes")
    other = region[header.slot_offset(1 - header.active) :][: header.slot_size]
    if slot_check(other[:-16]) == other[-16:] and int.from_bytes(other[:8], "big") >= header.generation:
        raise Finding("the selected slot is not the intact slot of the highest generation")
    try:
        file_key = open_header(header, DATA_KEY)
    except IntegrityError:
        return
    new = (*header.stanzas, _V2_STANZA) if len(data) % 2 or len(header.stanzas) == 1 else header.stanzas[1:]
    try:
        rewrapped = rewrap_header(header, file_key, new)
    except FormatError:
        return  # 65 stanzas
    writes = slot_writes(header, rewrapped)
    if writes is None:
        return  # outgrew the slots: the copying path
    file = bytearray(region)
    for i, (offset, slot) in enumerate(writes):
        cut = len(slot) if i < len(writes) - 1 else (data[0] if data else 0) * len(slot) // 256
        file[offset : offset + cut] = slot[:cut]
    after = parse_header(bytes(file))[0]
    open_header(after, DATA_KEY)
    if after.stanzas not in (header.stanzas, rewrapped.stanzas):
        raise Finding("a torn in-place rewrap selected neither the old nor the new stanzas")


def _v2_slot_seeds() -> list[bytes]:
    fixed = parse_header(_v2_base())[0]
    seeds = []
    for _, v in _format_vectors():
        file = base64.b64decode(str(v["file_base64"]))
        if file[:8] == b"KMSENV\x00\x02" and file[12:15] == _v2_base()[12:15]:
            with contextlib.suppress(FormatError, IntegrityError):
                header = parse_header(file)[0]
                if header.salt == fixed.salt and header.context == fixed.context:
                    seeds.append(file[header.slot_offset(0) : header.size])
    return seeds


# -- chunk stream (whole v1 or v2 file under the vectors' data key) --------------------------------
def fuzz_stream(data: bytes) -> None:
    """Header, commitment and tag, then the chunk decoder; FormatError/IntegrityError only."""
    src = io.BytesIO(data)
    try:
        header = read_header(src)
        file_key = open_header(header, DATA_KEY)
        out = io.BytesIO()
        decrypt_stream(src, out, file_key, chunk_size=header.chunk_size, threads=1)
    except (FormatError, IntegrityError):
        return
    if src.read(1):
        raise Finding("the decoder accepted a file with bytes left over")


# -- legacy ----------------------------------------------------------------------------------------
_LEGACY_KEY = hashlib.sha256(b"kmsenv fuzz: legacy data key").digest()


def fuzz_legacy(data: bytes) -> None:
    try:
        legacy = parse_legacy(data)
    except FormatError:
        return
    if not legacy.ciphertext_blob or len(legacy.nonce) != 16 or len(legacy.tag) != 16:
        raise Finding("parse_legacy accepted a file breaking its own rules")
    try:
        open_legacy(legacy, _LEGACY_KEY)
    except IntegrityError:
        return


def _legacy_seeds() -> list[bytes]:
    blob = base64.b64encode(b"\x01" * 32 + b"fuzz seed blob" * 4).decode()
    seeds = []
    for plaintext in (b"", b"x", b"date,amount\n2026-01-01,1.00\n" * 8):
        nonce, ciphertext, tag = _crypto.eax_encrypt(_LEGACY_KEY, plaintext, nonce=bytes(16))
        lines = [blob, *(base64.b64encode(x).decode() for x in (nonce, ciphertext, tag))]
        seeds.append(("\n".join(lines) + "\n").encode())
        seeds.append("\r\n".join(lines).encode())
    return seeds


# -- CiphertextBlob --------------------------------------------------------------------------------
_BLOB_KEY = _crypto.AesGcm(hashlib.sha256(b"kmsenv fuzz: CMK").digest())


def _blob_code(exc: KmsError) -> None:
    if exc.code != "InvalidCiphertext":
        raise Finding(f"decode_blob raised {exc.code}, not InvalidCiphertext") from exc


def fuzz_blob(data: bytes) -> None:
    for text in (data.decode("latin-1"), data.decode("utf-8", "replace")):
        try:
            parsed = decode_blob(text)
        except KmsError as exc:
            _blob_code(exc)
            continue
        if blob_prefix(parsed.key_id, parsed.key_version_id) != parsed.prefix:
            raise Finding("the parsed key id/version do not re-encode to the blob's prefix")
        with contextlib.suppress(IntegrityError):
            _BLOB_KEY.decrypt(parsed.nonce, parsed.sealed, blob_aad(parsed.prefix, b""), what="blob")


def _blob_seeds() -> list[bytes]:
    key_id, version = uuid.UUID(int=1), uuid.UUID(int=2)
    prefix = blob_prefix(str(key_id), str(version))
    seeds = []
    for plaintext in (b"", b"hello", bytes(32), b"x" * 6144):
        nonce = bytes(12)
        blob = encode_blob(prefix, nonce, _BLOB_KEY.encrypt(nonce, plaintext, blob_aad(prefix, b"")))
        seeds.append(blob.encode())
    return seeds


# -- server request parsing and signature canonicalisation -----------------------------------------
#: The serialised request a fuzz input stands for: method, query string, headers ("name: value"
#: lines), body, separated by a blank-line-NUL marker that does not occur in the seeds.
_SEP = b"\n\x00\n"
_NOW = datetime(2024, 1, 1, tzinfo=UTC)


def _split_request(data: bytes) -> tuple[str, bytes, list[tuple[str, str]], bytes]:
    parts = [*data.split(_SEP, 3), b"", b"", b""][:4]
    method = parts[0].decode("latin-1")[:16] or "POST"
    headers = []
    for line in parts[2].split(b"\n"):
        name, sep, value = line.decode("latin-1").partition(":")
        if sep:
            headers.append((name.strip().lower(), value.lstrip(" ")))
    return method, parts[1], headers, parts[3]


def fuzz_request(data: bytes) -> None:
    """The server's parsing (server/app.py) then parse_auth/verify/check_timestamp."""
    method, query_text, headers, body = _split_request(data)
    try:
        query = _parse_pairs(query_text, "query string")
        form = _parse_pairs(body, "body") if body else []
        _refuse_duplicates([*query, *form])
        req = signature.Request(method, query, form, headers, body)
        req.params()
        signed = signature.parse_auth(req)
        repr(signed)
        signature.check_timestamp(signed.timestamp, _NOW)
        signature.verify(signed, SECRET)
    except KmsError as exc:
        if exc.code not in HTTP_STATUS:
            raise Finding(f"undocumented error code {exc.code!r}") from exc


def _request_bytes(v: dict[str, object]) -> bytes:
    def pairs(items: object) -> str:
        assert isinstance(items, list)
        return "&".join(f"{quote(str(k), safe='')}={quote(str(val), safe='')}" for k, val in items)

    headers = "\n".join(f"{k}: {val}" for k, val in v["headers"])  # type: ignore[attr-defined]
    body = str(v.get("body") or "") or pairs(v["form"])
    return _SEP.join((str(v["method"]).encode(), pairs(v["query"]).encode(), headers.encode("latin-1"), body.encode()))


def _request_seeds() -> list[bytes]:
    return [_request_bytes(json.loads(p.read_text("utf-8"))) for p in sorted((VECTORS / "signature").glob("*.json"))]


# -- policy documents ------------------------------------------------------------------------------
_ARNS = (
    "acs:kms:cn-hangzhou:1234567890123456:key/2a3b4c5d-0000-4000-8000-000000000001",
    "acs:kms:cn-hangzhou:1234567890123456:alias/Apollo/WorkKey",
)


def fuzz_policy(data: bytes) -> None:
    try:
        policy = parse_policy(data.decode("utf-8", "replace"))
    except KmsError as exc:
        if exc.code != "InvalidParameter":
            raise Finding(f"parse_policy raised {exc.code}, not InvalidParameter") from exc
        return
    if parse_policy(policy.source).source != policy.source:
        raise Finding("a policy's normalised source does not parse to itself")
    for action in ("kms:Decrypt", "kms:GenerateDataKey", "KMS:CREATEKEY"):
        policy.allows(action, _ARNS)


def _policy_seeds() -> list[bytes]:
    docs = [
        {"Version": "1", "Statement": [{"Effect": "Allow", "Action": ["kms:Decrypt"], "Resource": [_ARNS[0]]}]},
        {"Statement": [{"Effect": "Deny", "Action": "kms:*", "Resource": "acs:kms:*:*:alias/Apollo/*"}]},
        {"Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*", "Sid": "all"}]},
        {"Statement": [{"Effect": "Allow", "Action": ["kms:Gen?rateDataKey"], "Resource": ["acs:kms:*:*:key/*"]}]},
    ]
    return [json.dumps(d).encode() for d in docs]


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("header", fuzz_header, _file_seeds, "v1/v2 header parser (format/header.py)"),
        Target("header_v2", fuzz_header_v2, _v2_slot_seeds, "v2 slot selection, in-place rewrap, torn writes"),
        Target("stream", fuzz_stream, _file_seeds, "v1/v2 header + commitment/tag + chunk stream decoder"),
        Target("legacy", fuzz_legacy, _legacy_seeds, "legacy AES-EAX file reader (format/legacy.py)"),
        Target("blob", fuzz_blob, _blob_seeds, "CiphertextBlob parser (kms/blob.py)"),
        Target("request", fuzz_request, _request_seeds, "server request parsing + signature canonicalisation"),
        Target("policy", fuzz_policy, _policy_seeds, "RAM-style policy document parser (kms/policy.py)"),
    )
}
