"""Legacy files written by the reference document's sample code: parse, decrypt, migrate, inspect.

The files are made the way the sample makes them: its functions ported to Python 3 line by line,
with ``GenerateDataKey`` on the embedded KMS and ``AES.new(key, AES.MODE_EAX)`` (pycryptodome,
via ``_crypto.eax_encrypt``).
"""

from __future__ import annotations

import base64
import io
import stat
from pathlib import Path

import pytest

from files_helpers import SALES, digest, names, sample_encrypt
from kmsenv import envelope
from kmsenv import format as fmt
from kmsenv.clients import EmbeddedKms
from kmsenv.errors import ContextError, FormatError, IntegrityError, KmsError, OutputError
from kmsenv.format import legacy
from kmsenv.format.legacy import looks_like_legacy, parse_legacy


@pytest.fixture
def legacy_file(tmp_path: Path, kms: EmbeddedKms, key: str) -> Path:
    return sample_encrypt(kms, tmp_path)


def edit_line(path: Path, index: int, new: str) -> None:
    lines = path.read_text().split("\n")
    lines[index] = new
    path.write_text("\n".join(lines))


# --- parsing ----------------------------------------------------------------------------------

NONCE, TAG = base64.b64encode(bytes(16)).decode(), base64.b64encode(bytes(range(16))).decode()
BLOB = base64.b64encode(bytes(range(60))).decode()
GOOD = f"{BLOB}\n{NONCE}\naGVsbG8=\n{TAG}\n"


@pytest.mark.parametrize(
    "text",
    [GOOD, GOOD.replace("\n", "\r\n"), GOOD.rstrip("\n"), GOOD.rstrip("\n").replace("\n", "\r\n")],
    ids=["lf", "crlf", "no-final-newline", "crlf-no-final-newline"],
)
def test_parse_accepts_the_line_ends_the_sample_produced(text: str) -> None:
    parsed = parse_legacy(text.encode())
    assert parsed.ciphertext_blob == BLOB
    assert parsed.nonce == bytes(16) and parsed.tag == bytes(range(16))
    assert parsed.ciphertext == b"hello"


def test_parse_accepts_an_empty_ciphertext_line() -> None:
    """The sample encrypting an empty file writes an empty third line."""
    assert parse_legacy(f"{BLOB}\n{NONCE}\n\n{TAG}\n".encode()).ciphertext == b""


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"{BLOB}\n{NONCE}\naGVsbG8=\n", "exactly 4 lines, not 3"),
        (GOOD + "\n", "exactly 4 lines, not 5"),
        (GOOD + "extra\n", "exactly 4 lines, not 5"),
        (f"\n{NONCE}\naGVsbG8=\n{TAG}\n", "CiphertextBlob line is empty"),
        (f"{BLOB}\n\naGVsbG8=\n{TAG}\n", "nonce line is empty"),
        (f"{BLOB}\n{NONCE}\naGVsbG8=\n\n", "tag line is empty"),
        (f"{BLOB}\n{NONCE}\naGVsbG8\n{TAG}\n", "ciphertext line is not valid base64"),
        (f"{BLOB}\n{NONCE}\naGVs bG8=\n{TAG}\n", "ciphertext line is not valid base64"),
        (f"{BLOB}\n{NONCE} \naGVsbG8=\n{TAG}\n", "nonce line is not valid base64"),
        (f"{BLOB}!\n{NONCE}\naGVsbG8=\n{TAG}\n", "CiphertextBlob line is not valid base64"),
        (f"{BLOB}\n{NONCE[:-4]}\naGVsbG8=\n{TAG}\n", "nonce must be 16 bytes"),
        (f"{BLOB}\n{NONCE}\naGVsbG8=\n{base64.b64encode(bytes(32)).decode()}\n", "tag must be 16 bytes"),
        ("A" * 9000 + f"\n{NONCE}\naGVsbG8=\n{TAG}\n", "over 8192 characters"),
    ],
)
def test_parse_is_strict(text: str, message: str) -> None:
    with pytest.raises(FormatError, match=message):
        parse_legacy(text.encode())


def test_parse_bounds_the_size(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(legacy, "MAX_LEGACY_FILE_SIZE", 100)
    with pytest.raises(FormatError, match="limit of this whole-file format"):
        legacy.read_legacy(io.BytesIO(GOOD.encode() + b"A" * 100))


def test_detection_is_by_content(legacy_file: Path, tmp_path: Path) -> None:
    head = legacy_file.read_bytes()[:512]
    assert looks_like_legacy(head) and not fmt.looks_like_v1(head)
    assert not looks_like_legacy(b"")
    assert not looks_like_legacy(b"date,amount\n2026,1\n")
    assert not looks_like_legacy(b"abcd\n")  # base64-ish but far too short for a blob
    assert not looks_like_legacy(fmt.MAGIC + bytes(100))
    renamed = tmp_path / "report.txt"
    renamed.write_bytes(legacy_file.read_bytes())
    assert envelope.inspect_file(renamed)["format"] == "legacy-aes-eax"


# --- decrypting -------------------------------------------------------------------------------


def test_sample_file_decrypts(legacy_file: Path, outdir: Path, kms: EmbeddedKms) -> None:
    assert envelope.decrypt_file(legacy_file, outdir / "sales.csv", kms=kms) == len(SALES)
    assert (outdir / "sales.csv").read_bytes() == SALES
    assert stat.S_IMODE((outdir / "sales.csv").stat().st_mode) == 0o600


def test_sample_file_with_crlf_line_ends_decrypts(legacy_file: Path, outdir: Path, kms: EmbeddedKms) -> None:
    legacy_file.write_bytes(legacy_file.read_bytes().replace(b"\n", b"\r\n"))
    envelope.decrypt_file(legacy_file, outdir / "p", kms=kms)
    assert (outdir / "p").read_bytes() == SALES


def test_sample_file_of_an_empty_plaintext(tmp_path: Path, outdir: Path, kms: EmbeddedKms, key: str) -> None:
    path = sample_encrypt(kms, tmp_path, b"")
    assert envelope.decrypt_file(path, outdir / "p", kms=kms) == 0
    assert (outdir / "p").read_bytes() == b""


@pytest.mark.parametrize("line", [0, 1, 2, 3], ids=["blob", "nonce", "ciphertext", "tag"])
def test_tampered_legacy_file_fails_integrity(legacy_file: Path, outdir: Path, kms: EmbeddedKms, line: int) -> None:
    text = legacy_file.read_text().split("\n")[line]
    # Change one base64 character in the middle: still valid base64, different bytes.
    i = len(text) // 2
    edit_line(legacy_file, line, text[:i] + ("B" if text[i] != "B" else "C") + text[i + 1 :])
    before = digest(legacy_file)
    with pytest.raises(IntegrityError) as info:
        envelope.decrypt_file(legacy_file, outdir / "p", kms=kms)
    assert info.value.exit_code == 7
    assert names(outdir) == []
    assert digest(legacy_file) == before


def test_legacy_file_has_no_context(legacy_file: Path, outdir: Path, kms: EmbeddedKms) -> None:
    with pytest.raises(ContextError, match="no key 'project'"):
        envelope.decrypt_file(legacy_file, outdir / "p", kms=kms, context={"project": "apollo"})
    assert names(outdir) == []


def test_legacy_file_under_a_disabled_cmk(legacy_file: Path, outdir: Path, kms: EmbeddedKms, key: str) -> None:
    kms.service.disable_key(key_id=key)
    with pytest.raises(KmsError) as info:
        envelope.decrypt_file(legacy_file, outdir / "p", kms=kms)
    assert info.value.code == "Rejected.Disabled"
    assert names(outdir) == []


# --- migrating --------------------------------------------------------------------------------


def test_migrate_produces_an_equivalent_v1_file(legacy_file: Path, outdir: Path, kms: EmbeddedKms, key: str) -> None:
    before = digest(legacy_file)
    v1 = outdir / "sales.csv.v1.cipher"
    assert envelope.migrate_file(legacy_file, v1, kms=kms) == len(SALES)
    assert digest(legacy_file) == before
    assert v1.read_bytes().startswith(fmt.MAGIC)
    header = fmt.read_header(io.BytesIO(v1.read_bytes()))
    assert header.stanzas[0].key_arn == kms.service.key_arn(key)  # default: the legacy file's CMK
    assert dict(header.context) == {}
    envelope.decrypt_file(v1, outdir / "plain", kms=kms)
    assert (outdir / "plain").read_bytes() == SALES


def test_migrate_to_another_key_with_context(legacy_file: Path, outdir: Path, kms: EmbeddedKms, key: str) -> None:
    other = str(kms.service.create_key()["KeyMetadata"]["KeyId"])
    v1 = outdir / "v1"
    envelope.migrate_file(legacy_file, v1, kms=kms, key_id=other, context={"project": "apollo"})
    header = fmt.read_header(io.BytesIO(v1.read_bytes()))
    assert header.stanzas[0].key_arn == kms.service.key_arn(other)
    envelope.decrypt_file(v1, outdir / "plain", kms=kms, context={"project": "apollo"})
    assert (outdir / "plain").read_bytes() == SALES


def test_migrate_refuses_what_is_not_legacy(tmp_path: Path, outdir: Path, kms: EmbeddedKms, key: str) -> None:
    src = tmp_path / "p"
    src.write_bytes(SALES)
    v1 = tmp_path / "p.cipher"
    envelope.encrypt_file(src, v1, kms=kms, key_id=key)
    with pytest.raises(FormatError, match="already a kmsenv v1 file"):
        envelope.migrate_file(v1, outdir / "x", kms=kms)
    with pytest.raises(FormatError, match="not a kmsenv encrypted file"):
        envelope.migrate_file(src, outdir / "x", kms=kms)
    assert names(outdir) == []


def test_migrate_of_a_tampered_file_leaves_nothing(legacy_file: Path, outdir: Path, kms: EmbeddedKms) -> None:
    edit_line(legacy_file, 3, NONCE)  # a valid tag line, but not this file's tag
    with pytest.raises(IntegrityError):
        envelope.migrate_file(legacy_file, outdir / "v1", kms=kms)
    assert names(outdir) == []


def test_migrate_keeps_an_existing_output(legacy_file: Path, outdir: Path, kms: EmbeddedKms) -> None:
    (outdir / "v1").write_bytes(b"keep")
    with pytest.raises(OutputError, match="already exists"):
        envelope.migrate_file(legacy_file, outdir / "v1", kms=kms)
    assert (outdir / "v1").read_bytes() == b"keep"


# --- inspecting -------------------------------------------------------------------------------


def test_inspect_legacy(legacy_file: Path) -> None:
    facts = envelope.inspect_file(legacy_file)
    blob = base64.b64decode(legacy_file.read_text().split("\n")[0])
    assert facts["format"] == "legacy-aes-eax"
    assert facts["plaintext_size"] == len(SALES)
    assert facts["file_size"] == legacy_file.stat().st_size
    assert facts["context"] == {}
    (wrapped,) = facts["wrapped_keys"]
    assert wrapped == {"provider": "acs-kms", "key_arn": None, "key_version_id": None, "blob_size": len(blob)}
