"""The envelope layer against the real embedded KMS: round trips, every bad input, no leftovers.

Shared fixtures live in conftest.py, shared helpers in files_helpers.py.
"""

from __future__ import annotations

import io
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from files_helpers import ALIAS, CHUNK, CONTEXT, digest, flip, names
from kmsenv import envelope
from kmsenv import format as fmt
from kmsenv.clients import EmbeddedKms
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
from kmsenv.kms.service import open_service


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    """3.5 chunks of recognisable plaintext."""
    path = tmp_path / "sales.csv"
    row = b"2026-01-01,apollo,SECRET-REVENUE,1234.50\n"
    path.write_bytes((row * (CHUNK * 4 // len(row)))[: CHUNK * 3 + CHUNK // 2])
    return path


@pytest.fixture
def cipher(plain: Path, kms: EmbeddedKms, key: str) -> Path:
    out = plain.with_name("sales.csv.cipher")
    envelope.encrypt_file(plain, out, kms=kms, key_id=ALIAS, context=CONTEXT, chunk_size=CHUNK)
    return out


def expect_failure(
    error: type[KmsenvError], cipher: Path, outdir: Path, kms: EmbeddedKms, **kwargs: Any
) -> KmsenvError:
    """Decrypt must fail with ``error``, leave ``outdir`` empty and ``cipher`` unchanged."""
    before = digest(cipher)
    with pytest.raises(error) as info:
        envelope.decrypt_file(cipher, outdir / "plain", kms=kms, **kwargs)
    assert names(outdir) == []
    assert digest(cipher) == before
    return info.value


# ------------------------------------------------------------------------ round trips --


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 5])
@pytest.mark.parametrize("threads", [1, 3])
def test_round_trip(tmp_path: Path, kms: EmbeddedKms, key: str, size: int, threads: int) -> None:
    data = os.urandom(size)
    src, enc, dec = tmp_path / "in", tmp_path / "in.cipher", tmp_path / "in.out"
    src.write_bytes(data)
    n = envelope.encrypt_file(src, enc, kms=kms, key_id=key, context=CONTEXT, chunk_size=CHUNK, threads=threads)
    assert n == size
    assert enc.read_bytes().startswith(fmt.MAGIC)
    assert enc.stat().st_size == fmt.read_header(io.BytesIO(enc.read_bytes())).size + fmt.payload_size(size, CHUNK)
    assert envelope.decrypt_file(enc, dec, kms=kms, threads=threads) == size
    assert dec.read_bytes() == data
    assert stat.S_IMODE(dec.stat().st_mode) == 0o600
    assert src.read_bytes() == data


def test_header_names_the_key_and_hides_the_plaintext(cipher: Path, plain: Path, kms: EmbeddedKms, key: str) -> None:
    data = cipher.read_bytes()
    header = fmt.read_header(io.BytesIO(data))
    assert dict(header.context) == CONTEXT
    (stanza,) = header.stanzas
    assert stanza.provider == "acs-kms"
    assert stanza.key_arn == kms.service.key_arn(key)
    assert b"SECRET-REVENUE" not in data


def test_each_encryption_uses_a_fresh_data_key(plain: Path, tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    for out in (a, b):
        envelope.encrypt_file(plain, out, kms=kms, key_id=key, chunk_size=CHUNK)
    blob = [fmt.read_header(io.BytesIO(p.read_bytes())).stanzas[0].ciphertext_blob for p in (a, b)]
    assert blob[0] != blob[1]
    assert a.read_bytes()[-100:] != b.read_bytes()[-100:]


def test_streams_work_over_pipes(plain: Path, kms: EmbeddedKms, key: str) -> None:
    """Non-seekable input: the format sniffing must put the bytes it read back."""
    encrypted = io.BytesIO()
    with plain.open("rb") as src:
        envelope.encrypt_stream(src, encrypted, kms=kms, key_id=key, context=CONTEXT, chunk_size=CHUNK)
    r, w = os.pipe()

    def feed() -> None:
        with os.fdopen(w, "wb") as pipe:
            pipe.write(encrypted.getvalue())

    feeder = threading.Thread(target=feed)
    feeder.start()
    out = io.BytesIO()
    with os.fdopen(r, "rb") as pipe:
        assert not pipe.seekable()
        envelope.decrypt_stream(pipe, out, kms=kms, context={"project": "apollo"})
    feeder.join()
    assert out.getvalue() == plain.read_bytes()


# ---------------------------------------------------------------------------- context --


@pytest.mark.parametrize("required", [{}, {"project": "apollo"}, CONTEXT])
def test_required_context_present(cipher: Path, outdir: Path, kms: EmbeddedKms, required: dict[str, str]) -> None:
    envelope.decrypt_file(cipher, outdir / "plain", kms=kms, context=required)
    assert (outdir / "plain").exists()


@pytest.mark.parametrize(
    ("required", "why"),
    [({"project": "hermes"}, "another value for 'project'"), ({"owner": "bob"}, "no key 'owner'")],
)
def test_required_context_absent(
    cipher: Path, outdir: Path, kms: EmbeddedKms, required: dict[str, str], why: str
) -> None:
    error = expect_failure(ContextError, cipher, outdir, kms, context=required)
    assert why in error.message
    assert error.exit_code == 8


def test_bad_context_is_a_usage_error(plain: Path, outdir: Path, kms: EmbeddedKms, key: str) -> None:
    with pytest.raises(UsageError):
        envelope.encrypt_file(plain, outdir / "x", kms=kms, key_id=key, context={"": "v"})
    assert names(outdir) == []


# -------------------------------------------------------------------------- tampering --


def _header_offsets(cipher: Path) -> dict[str, int]:
    """Byte offsets (one inside each field) of a v1 file with the fixture's context."""
    header = fmt.read_header(io.BytesIO(cipher.read_bytes()))
    raw = header.encode()
    stanza = header.stanzas[0]
    return {
        "salt": 15,
        "commitment": 15 + 32,
        "context value": raw.index(b"apollo"),
        "blob tail": raw.index(stanza.ciphertext_blob) + len(stanza.ciphertext_blob) - 1,
        "header tag": raw.index(header.tag) + len(header.tag) - 1,
    }


@pytest.mark.parametrize("field", ["salt", "commitment", "context value", "blob tail", "header tag"])
def test_flipped_header_bit_fails_integrity(cipher: Path, outdir: Path, kms: EmbeddedKms, field: str) -> None:
    flip(cipher, _header_offsets(cipher)[field])
    assert expect_failure(IntegrityError, cipher, outdir, kms).exit_code == 7


def test_every_header_bit_flip_is_refused(cipher: Path, outdir: Path, kms: EmbeddedKms) -> None:
    """No single-bit change in the header decrypts, except in the spare v2 slot; each fails with a
    defined error. The spare slot (unused in a new file) is the crash spare of in-place rewrap: a
    reader must ignore it when it is damaged, so a change there changes nothing (docs/format.md §5)."""
    original = cipher.read_bytes()
    header = fmt.read_header(io.BytesIO(original))
    spare = range(header.slot_offset(1 - header.active), header.slot_offset(1 - header.active) + header.slot_size)
    seen: set[type[KmsenvError]] = set()
    for offset in range(header.size):
        cipher.write_bytes(original)
        flip(cipher, offset, bit=offset % 8)
        if offset in spare:
            continue  # checked below, once: decrypting here ~1000 times would only repeat it
        # FormatError: structure (magic, lengths); KmsError: the blob now names another key;
        # ConfigError: the provider id now names a KMS this one is not.
        with pytest.raises((FormatError, IntegrityError, KmsError, ConfigError)) as info:
            envelope.decrypt_file(cipher, outdir / "plain", kms=kms)
        seen.add(type(info.value))
        assert names(outdir) == []
    assert IntegrityError in seen and FormatError in seen
    for offset in (spare[0], spare[len(spare) // 2], spare[-1]):
        cipher.write_bytes(original)
        flip(cipher, offset)
        plain = outdir / f"spare{offset}"
        envelope.decrypt_file(cipher, plain, kms=kms)
        assert plain.read_bytes() == (cipher.parent / "sales.csv").read_bytes()


@pytest.mark.parametrize("where", ["first chunk", "middle chunk", "last chunk", "last tag byte"])
def test_flipped_chunk_bit_fails_integrity(cipher: Path, outdir: Path, kms: EmbeddedKms, where: str) -> None:
    header_size = fmt.read_header(io.BytesIO(cipher.read_bytes())).size
    record = CHUNK + fmt.CHUNK_TAG_SIZE
    offset = {
        "first chunk": header_size,
        "middle chunk": header_size + record + 100,
        "last chunk": header_size + 3 * record + 5,
        "last tag byte": cipher.stat().st_size - 1,
    }[where]
    flip(cipher, offset, bit=3)
    assert expect_failure(IntegrityError, cipher, outdir, kms).exit_code == 7


def test_swapped_chunks_fail(cipher: Path, outdir: Path, kms: EmbeddedKms) -> None:
    data = cipher.read_bytes()
    h, r = fmt.read_header(io.BytesIO(data)).size, CHUNK + fmt.CHUNK_TAG_SIZE
    cipher.write_bytes(data[:h] + data[h + r : h + 2 * r] + data[h : h + r] + data[h + 2 * r :])
    expect_failure(IntegrityError, cipher, outdir, kms)


@pytest.mark.parametrize("cut", ["inside header", "after header", "chunk boundary", "mid chunk", "last byte"])
def test_truncation_fails(cipher: Path, outdir: Path, kms: EmbeddedKms, cut: str) -> None:
    data = cipher.read_bytes()
    h, r = fmt.read_header(io.BytesIO(data)).size, CHUNK + fmt.CHUNK_TAG_SIZE
    keep = {
        "inside header": h // 2,
        "after header": h,
        "chunk boundary": h + 3 * r,
        "mid chunk": h + r + 7,
        "last byte": len(data) - 1,
    }[cut]
    cipher.write_bytes(data[:keep])
    expect_failure(FormatError if cut == "inside header" else IntegrityError, cipher, outdir, kms)


@pytest.mark.parametrize("extra", [b"\x00", b"x" * 100, b"y" * (CHUNK + fmt.CHUNK_TAG_SIZE)])
def test_appended_bytes_fail(cipher: Path, outdir: Path, kms: EmbeddedKms, extra: bytes) -> None:
    cipher.write_bytes(cipher.read_bytes() + extra)
    expect_failure(IntegrityError, cipher, outdir, kms)


def test_another_kms_cannot_decrypt(cipher: Path, outdir: Path, tmp_path: Path) -> None:
    other = EmbeddedKms(service=open_service(tmp_path / "other-home", announce=False))
    try:
        error = expect_failure(KmsError, cipher, outdir, other)
    finally:
        other.close()
    assert isinstance(error, KmsError) and error.code == "Forbidden.KeyNotFound"


# ------------------------------------------------------------------------- KMS states --


def test_disabled_cmk_refuses_decrypt(cipher: Path, outdir: Path, kms: EmbeddedKms, key: str) -> None:
    kms.service.disable_key(key_id=key)
    error = expect_failure(KmsError, cipher, outdir, kms)
    assert isinstance(error, KmsError) and error.code == "Rejected.Disabled"
    assert error.exit_code == 3


def test_disabled_cmk_refuses_encrypt(plain: Path, outdir: Path, kms: EmbeddedKms, key: str) -> None:
    kms.service.disable_key(key_id=key)
    with pytest.raises(KmsError) as info:
        envelope.encrypt_file(plain, outdir / "c", kms=kms, key_id=ALIAS)
    assert info.value.code == "Rejected.Disabled"
    assert names(outdir) == []


def test_unknown_key_id(plain: Path, outdir: Path, kms: EmbeddedKms, key: str) -> None:
    with pytest.raises(KmsError) as info:
        envelope.encrypt_file(plain, outdir / "c", kms=kms, key_id="alias/nope")
    assert info.value.code == "Forbidden.AliasNotFound"
    assert names(outdir) == []


# ------------------------------------------------------------------------- bad inputs --


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "not a kmsenv encrypted file: the input is empty"),
        (b"date,amount\n2026-01-01,12\n", "not a kmsenv encrypted file"),
        (b"\x89PNG\r\n\x1a\n" + bytes(200), "not a kmsenv encrypted file"),
        (fmt.MAGIC[:7] + b"\x09" + bytes(100), "unsupported kmsenv format version 9"),
    ],
)
def test_not_a_kmsenv_file(tmp_path: Path, outdir: Path, kms: EmbeddedKms, content: bytes, message: str) -> None:
    path = tmp_path / "input"
    path.write_bytes(content)
    error = expect_failure(FormatError, path, outdir, kms)
    assert error.message.startswith(message)
    assert error.exit_code == 6


def test_folder_as_input(tmp_path: Path, outdir: Path, kms: EmbeddedKms) -> None:
    with pytest.raises(InputError, match="is a folder"):
        envelope.decrypt_file(tmp_path, outdir / "x", kms=kms)
    with pytest.raises(InputError, match="is a folder"):
        envelope.encrypt_file(tmp_path, outdir / "x", kms=kms, key_id="k")
    assert names(outdir) == []


def test_missing_input(tmp_path: Path, outdir: Path, kms: EmbeddedKms) -> None:
    with pytest.raises(InputError, match="does not exist"):
        envelope.encrypt_file(tmp_path / "nope", outdir / "x", kms=kms, key_id="k")
    assert names(outdir) == []


def test_unreadable_input(plain: Path, outdir: Path, kms: EmbeddedKms) -> None:
    plain.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(InputError, match="cannot read"):
            envelope.encrypt_file(plain, outdir / "x", kms=kms, key_id="k")
        return
    # Root reads any file (CI runs as root): check in a forked child that drops to nobody, so
    # the permission error is real. Exit 42 = the expected InputError was raised.
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        code = 1
        try:
            os.setgroups([])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            envelope.encrypt_file(plain, outdir / "x", kms=kms, key_id="k")
        except InputError as exc:
            code = 42 if "cannot read" in exc.message else 2
        except BaseException:
            code = 3
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 42
    assert names(outdir) == []


def test_existing_output_is_kept(cipher: Path, plain: Path, kms: EmbeddedKms) -> None:
    before = digest(plain)
    with pytest.raises(OutputError, match="already exists"):
        envelope.decrypt_file(cipher, plain, kms=kms)
    assert digest(plain) == before
    envelope.decrypt_file(cipher, plain, kms=kms, force=True)  # and --force does replace it
    assert digest(plain) == before


@pytest.mark.parametrize("how", ["same path", "hard link"])
def test_output_is_input_even_with_force(plain: Path, kms: EmbeddedKms, key: str, how: str) -> None:
    target = plain
    if how == "hard link":
        target = plain.with_name("alias.csv")
        os.link(plain, target)
    before = digest(plain)
    with pytest.raises(UsageError, match="is the input"):
        envelope.encrypt_file(plain, target, kms=kms, key_id=key, force=True)
    assert digest(plain) == before


def test_bad_chunk_size(plain: Path, outdir: Path, kms: EmbeddedKms, key: str) -> None:
    with pytest.raises(UsageError, match="power of two"):
        envelope.encrypt_file(plain, outdir / "c", kms=kms, key_id=key, chunk_size=5000)
    assert names(outdir) == []


def test_input_changing_while_read_is_refused(
    plain: Path, outdir: Path, kms: EmbeddedKms, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = fmt.encrypt_stream

    def growing(src: Any, dst: Any, file_key: Any, **kw: Any) -> int:
        n = real(src, dst, file_key, **kw)
        with plain.open("ab") as f:  # another writer appends while we work
            f.write(b"late row\n")
        return n

    monkeypatch.setattr(envelope.fmt, "encrypt_stream", growing)
    with pytest.raises(InputError, match="changed while"):
        envelope.encrypt_file(plain, outdir / "c", kms=kms, key_id=key, chunk_size=CHUNK)
    assert names(outdir) == []


# ---------------------------------------------------------------------------- inspect --


def test_inspect_reports_header_facts(cipher: Path, plain: Path, kms: EmbeddedKms, key: str) -> None:
    facts = envelope.inspect_file(cipher)
    header = fmt.read_header(io.BytesIO(cipher.read_bytes()))
    assert facts["format"] == "kmsenv" and facts["format_version"] == 2  # what encrypt writes
    assert facts["chunk_size"] == CHUNK
    assert facts["context"] == CONTEXT
    assert facts["header_size"] == header.size
    assert facts["file_size"] == cipher.stat().st_size
    assert facts["payload_size"] == cipher.stat().st_size - header.size
    assert facts["plaintext_size"] == plain.stat().st_size
    assert facts["chunks"] == 4
    (wrapped,) = facts["wrapped_keys"]
    assert wrapped == {
        "provider": "acs-kms",
        "key_arn": kms.service.key_arn(key),
        "key_version_id": header.stanzas[0].key_version_id,
        "blob_size": len(header.stanzas[0].ciphertext_blob),
    }


@pytest.mark.parametrize("size", [0, 1, CHUNK, CHUNK + 1, 2 * CHUNK])
def test_inspect_plaintext_size_matches_what_decrypt_returns(
    tmp_path: Path, kms: EmbeddedKms, key: str, size: int
) -> None:
    src, enc = tmp_path / "p", tmp_path / "c"
    src.write_bytes(b"z" * size)
    envelope.encrypt_file(src, enc, kms=kms, key_id=key, chunk_size=CHUNK)
    assert envelope.inspect_file(enc)["plaintext_size"] == size


def test_inspect_flags_an_impossible_length(cipher: Path) -> None:
    data = cipher.read_bytes()
    keep = fmt.read_header(io.BytesIO(data)).size + CHUNK + fmt.CHUNK_TAG_SIZE + 5
    cipher.write_bytes(data[:keep])  # a 5-byte last record cannot even hold a tag
    facts = envelope.inspect_file(cipher)
    assert facts["plaintext_size"] is None
    assert "payload length" in facts["problem"]


def test_inspect_shows_the_v2_key_slot_and_the_room_left_in_place(cipher: Path, kms: EmbeddedKms) -> None:
    first = envelope.inspect_file(cipher)["key_slot"]
    header = fmt.read_header(io.BytesIO(cipher.read_bytes()))
    used = len(header.stanza_section())
    assert first == {
        "active": "A",
        "generation": 1,
        "slot_size": header.slot_size,
        "capacity": header.capacity,
        "used": used,
        "free": header.capacity - used,
        "more_keys": (header.capacity - used) // (used - 1),
    }
    assert first["more_keys"] >= 1  # the writer leaves room for at least one more key
    other = str(kms.service.create_key()["KeyMetadata"]["KeyId"])
    assert envelope.rewrap_file(cipher, kms=kms, key_ids=[other]).in_place
    second = envelope.inspect_file(cipher)["key_slot"]
    assert (second["active"], second["generation"]) == ("B", 2)  # an addition: the spare slot
    assert second["capacity"] == first["capacity"] and second["used"] > used
    assert second["free"] == first["free"] - (second["used"] - used)
    assert envelope.rewrap_file(cipher, kms=kms, remove_key_ids=[other]).in_place
    third = envelope.inspect_file(cipher)["key_slot"]
    assert third["generation"] == 4 and third["used"] == used  # a removal purges the old slot too


def test_inspect_needs_no_kms(cipher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fresh_home = tmp_path / "no-kms-here"
    monkeypatch.setenv("KMSENV_HOME", str(fresh_home))
    assert envelope.inspect_file(cipher)["context"] == CONTEXT
    assert not fresh_home.exists()


class Trickle:
    """A reader like a slow pipe: not seekable, at most a few bytes per read, no readinto."""

    def __init__(self, data: bytes, step: int) -> None:
        self._data = memoryview(data)
        self._step = step

    def read(self, n: int = -1) -> bytes:
        take = self._step if n < 0 else min(n, self._step)
        part, self._data = self._data[:take], self._data[take:]
        return bytes(part)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.binary(max_size=3 * 4096 + 100),
    shape=st.tuples(st.integers(min_value=12, max_value=13), st.integers(min_value=1, max_value=5000)),
    context=st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=5), max_size=3),
)
def test_streams_round_trip_through_short_reads(
    kms: EmbeddedKms, key: str, data: bytes, shape: tuple[int, int], context: dict[str, str]
) -> None:
    """Any data, chunk size and read size: pipes that return a few bytes at a time round-trip."""
    log2, step = shape
    encrypted = io.BytesIO()
    src: Any = Trickle(data, step)
    envelope.encrypt_stream(src, encrypted, kms=kms, key_id=key, context=context, chunk_size=1 << log2)
    assert len(encrypted.getvalue()) == fmt.read_header(io.BytesIO(encrypted.getvalue())).size + fmt.payload_size(
        len(data), 1 << log2
    )
    out = io.BytesIO()
    reader: Any = Trickle(encrypted.getvalue(), step)
    assert envelope.decrypt_stream(reader, out, kms=kms, context=context) == len(data)
    assert out.getvalue() == data
