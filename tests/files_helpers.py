"""Helpers shared by the file-encryption tests (envelope, legacy, CLI): constants, file probes,
the reference document's sample code ported to Python 3 (to produce legacy files), and a fixed
file key for the chunk-engine tests."""

from __future__ import annotations

import base64
import hashlib
import io
from pathlib import Path

from kmsenv import _crypto
from kmsenv.clients import EmbeddedKms
from kmsenv.format import random_access, stream
from kmsenv.format.header import Header, KeyStanza
from kmsenv.format.keys import FileKey, _new_header

ALIAS = "alias/Apollo/WorkKey"
CHUNK = 4096  # small chunks: multi-chunk files stay small
CONTEXT = {"project": "apollo", "dept": "sales"}


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def names(folder: Path) -> list[str]:
    """Every entry in ``folder``, hidden ones (named temporary files) included."""
    return sorted(p.name for p in folder.iterdir())


def flip(path: Path, offset: int, bit: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


SALES = b"date,region,amount\n2026-01-01,hangzhou,1200.50\n2026-01-02,beijing,880.00\n" * 50


# --- the reference sample, ported -------------------------------------------------------------


def KmsGenerateDataKey(kms: EmbeddedKms, key_alias: str) -> tuple[str, str]:
    response = kms.service.generate_data_key(key_id=key_alias, number_of_bytes=32)
    return response["Plaintext"], response["CiphertextBlob"]


def ReadTextFile(in_file: Path) -> bytes:
    with open(in_file, "rb") as file:  # Python 2's str was bytes
        return file.read()


def WriteTextFile(out_file: Path, lines: list[str]) -> None:
    with open(out_file, "w") as file:
        for ln in lines:
            file.write(ln)
            file.write("\n")


def LocalEncrypt(datakey_plaintext: str, datakey_encrypted: str, in_file: Path, out_file: Path) -> None:
    data_key_binary = base64.b64decode(datakey_plaintext)
    nonce, ciphertext, tag = _crypto.eax_encrypt(data_key_binary, ReadTextFile(in_file))
    lines = [
        datakey_encrypted,
        base64.b64encode(nonce).decode(),
        base64.b64encode(ciphertext).decode(),
        base64.b64encode(tag).decode(),
    ]
    WriteTextFile(out_file, lines)


def sample_encrypt(kms: EmbeddedKms, folder: Path, content: bytes = SALES) -> Path:
    in_file, out_file = folder / "sales.csv", folder / "sales.csv.cipher"
    in_file.write_bytes(content)
    datakey = KmsGenerateDataKey(kms, ALIAS)
    LocalEncrypt(datakey[0], datakey[1], in_file, out_file)
    in_file.unlink()
    return out_file


# -- a fixed file key, for tests of the chunk engines that need no KMS -----------------------

FIXED_KEY = bytes(range(32))
FIXED_SALT = bytes(32)
FIXED_STANZA = KeyStanza(provider="acs-kms", key_arn="acs:kms:r:1:key/k", key_version_id="v", ciphertext_blob=b"b")


def fixed_header() -> tuple[Header, FileKey]:
    """A v2 header and its file key from FIXED_KEY and FIXED_SALT: the same bytes every time."""
    return _new_header(FIXED_KEY, stanzas=[FIXED_STANZA], context={}, chunk_size=CHUNK, salt=FIXED_SALT)


def stream_encrypted(plaintext: bytes) -> bytes:
    """The reference bytes of ``plaintext`` under :func:`fixed_header`: the stream engine into a
    BytesIO (no descriptor: no writeback hint, no preallocation)."""
    header, key = fixed_header()
    out = io.BytesIO()
    out.write(header.encode())
    stream.encrypt_stream(io.BytesIO(plaintext), out, key, chunk_size=CHUNK, threads=1)
    return out.getvalue()


def range_encrypted(tmp_path: Path, plaintext: bytes, threads: int) -> tuple[bytes, int, int]:
    """``plaintext`` under :func:`fixed_header` through the chunk-range engine, file to file:
    (the file's bytes, the output descriptor it had, the header size)."""
    header, key = fixed_header()
    src, dst = tmp_path / "in", tmp_path / "out.enc"
    src.write_bytes(plaintext)
    with src.open("rb") as fin, dst.open("wb") as fout:
        fout.write(header.encode())
        fout.flush()
        layout = random_access.Layout(header.size, CHUNK, len(plaintext))
        random_access.encrypt_ranges(fin.fileno(), fout.fileno(), key, layout, threads=threads)
        fd = fout.fileno()
    return dst.read_bytes(), fd, header.size
