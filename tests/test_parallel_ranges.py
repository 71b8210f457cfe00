"""One file, several threads: chunk ranges encrypted/decrypted with pread/pwrite.

The output must be byte-identical to the streaming engine's, memory bounded by the thread count,
every failure (tampering, truncation, an input that changes) must leave nothing, and unseekable
inputs must fall back to the stream."""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from files_helpers import CHUNK, flip, names
from kmsenv import envelope
from kmsenv import format as fmt
from kmsenv.cli import main
from kmsenv.clients import EmbeddedKms
from kmsenv.errors import InputError, IntegrityError
from kmsenv.format import random_access, stream
from kmsenv.format.header import KeyStanza
from kmsenv.format.keys import _new_header
from kmsenv.format.random_access import Layout, decrypt_ranges, encrypt_ranges

KEY = bytes(range(32))
SALT = bytes(32)
STANZA = KeyStanza(provider="acs-kms", key_arn="acs:kms:r:1:key/k", key_version_id="v", ciphertext_blob=b"b")
SIZES = [1, CHUNK, CHUNK + 1, 5 * CHUNK, 5 * CHUNK - 1, 37 * CHUNK + 5]


def data(n: int) -> bytes:
    return os.urandom(n)


def streamed(plaintext: bytes, chunk: int = CHUNK) -> bytes:
    header, key = _new_header(KEY, stanzas=[STANZA], context={}, chunk_size=chunk, salt=SALT)
    out = io.BytesIO()
    out.write(header.encode())
    stream.encrypt_stream(io.BytesIO(plaintext), out, key, chunk_size=chunk, threads=1)
    return out.getvalue()


def ranged(tmp_path: Path, plaintext: bytes, threads: int, chunk: int = CHUNK) -> bytes:
    header, key = _new_header(KEY, stanzas=[STANZA], context={}, chunk_size=chunk, salt=SALT)
    src, dst = tmp_path / "in", tmp_path / "out"
    src.write_bytes(plaintext)
    with src.open("rb") as fin, dst.open("wb") as fout:
        fout.write(header.encode())
        fout.flush()
        encrypt_ranges(fin.fileno(), fout.fileno(), key, Layout(header.size, chunk, len(plaintext)), threads=threads)
    return dst.read_bytes()


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("threads", [1, 2, 3, 8])
def test_ranges_are_byte_identical_to_the_stream(tmp_path: Path, size: int, threads: int) -> None:
    plaintext = data(size)
    assert ranged(tmp_path, plaintext, threads) == streamed(plaintext)


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_decrypt_ranges_round_trip(tmp_path: Path, threads: int) -> None:
    plaintext = data(37 * CHUNK + 5)
    file = streamed(plaintext)
    header, key = _new_header(KEY, stanzas=[STANZA], context={}, chunk_size=CHUNK, salt=SALT)
    enc, dec = tmp_path / "enc", tmp_path / "dec"
    enc.write_bytes(file)
    layout = Layout.of_file(header.size, CHUNK, len(file))
    assert layout.plaintext_size == len(plaintext)
    with enc.open("rb") as fin, dec.open("wb") as fout:
        decrypt_ranges(fin.fileno(), fout.fileno(), key, layout, threads=threads)
    assert dec.read_bytes() == plaintext


def test_memory_is_two_buffers_per_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[int] = []
    real = random_access._Buffers.__init__

    def counting(self: Any, chunk_size: int) -> None:
        made.append(chunk_size)
        real(self, chunk_size)

    monkeypatch.setattr(random_access._Buffers, "__init__", counting)
    ranged(tmp_path, data(200 * CHUNK), 3)
    assert made == [CHUNK] * 3  # one pair per thread, whatever the file size


def test_a_failing_worker_stops_all_and_leaves_no_thread(tmp_path: Path) -> None:
    plaintext = data(100 * CHUNK)
    file = bytearray(streamed(plaintext))
    header, key = _new_header(KEY, stanzas=[STANZA], context={}, chunk_size=CHUNK, salt=SALT)
    layout = Layout.of_file(header.size, CHUNK, len(file))
    file[layout.record_offset(57) + 3] ^= 1
    enc, dec = tmp_path / "enc", tmp_path / "dec"
    enc.write_bytes(bytes(file))
    before = threading.active_count()
    with enc.open("rb") as fin, dec.open("wb") as fout, pytest.raises(IntegrityError):
        decrypt_ranges(fin.fileno(), fout.fileno(), key, layout, threads=4)
    assert threading.active_count() == before
    # Whatever was written is verified plaintext at its own offset, never the bad chunk's bytes.
    got = dec.read_bytes()
    bad = slice(57 * CHUNK, 58 * CHUNK)
    assert got[bad] in (b"", bytes(len(got[bad])))


# ------------------------------------------------------------------------- envelope --


@pytest.fixture
def big(tmp_path: Path) -> Path:
    path = tmp_path / "big.bin"
    path.write_bytes(data(300 * CHUNK + 123))
    return path


@pytest.mark.parametrize("threads", [2, 3])
def test_files_round_trip_with_threads(tmp_path: Path, big: Path, kms: EmbeddedKms, key: str, threads: int) -> None:
    enc, dec, ref = tmp_path / "e", tmp_path / "d", tmp_path / "r"
    n = envelope.encrypt_file(big, enc, kms=kms, key_id=key, chunk_size=CHUNK, threads=threads)
    assert n == big.stat().st_size
    assert envelope.decrypt_file(enc, dec, kms=kms, threads=threads) == n
    assert dec.read_bytes() == big.read_bytes()
    assert envelope.decrypt_file(enc, ref, kms=kms, threads=1) == n  # the stream reads it too
    assert ref.read_bytes() == big.read_bytes()
    header = fmt.read_header(io.BytesIO(enc.read_bytes()))
    assert (dec.stat().st_mode & 0o777, enc.stat().st_size) == (0o600, header.size + n + 301 * 16)


@pytest.mark.parametrize(
    "damage",
    ["flip_middle", "flip_last", "truncate_boundary", "truncate_mid", "append_byte"],
)
def test_damaged_files_fail_with_threads_and_leave_nothing(
    tmp_path: Path, big: Path, kms: EmbeddedKms, key: str, damage: str
) -> None:
    enc = tmp_path / "e"
    envelope.encrypt_file(big, enc, kms=kms, key_id=key, chunk_size=CHUNK, threads=2)
    size = enc.stat().st_size
    if damage == "flip_middle":
        flip(enc, size // 2)
    elif damage == "flip_last":
        flip(enc, size - 1)
    elif damage.startswith("truncate"):
        cut = 123 + 16 if damage == "truncate_boundary" else 500
        with enc.open("r+b") as f:
            f.truncate(size - cut)
    else:
        with enc.open("ab") as f:
            f.write(b"\0")
    out = tmp_path / "out"
    os.mkdir(out)
    with pytest.raises(IntegrityError):
        envelope.decrypt_file(enc, out / "d", kms=kms, threads=2)
    assert names(out) == []


@pytest.mark.parametrize("change", ["grow", "shrink"])
def test_input_changing_during_ranges_is_refused(
    tmp_path: Path, big: Path, kms: EmbeddedKms, key: str, monkeypatch: pytest.MonkeyPatch, *, change: str
) -> None:
    real = envelope.encrypt_ranges

    def changing(src_fd: int, *args: Any, **kw: Any) -> None:
        if change == "grow":
            with big.open("ab") as f:
                f.write(b"late")
        else:
            os.truncate(big, big.stat().st_size - 10)
        real(src_fd, *args, **kw)

    monkeypatch.setattr(envelope, "encrypt_ranges", changing)
    out = tmp_path / "out"
    os.mkdir(out)
    with pytest.raises(InputError, match="changed while"):
        envelope.encrypt_file(big, out / "e", kms=kms, key_id=key, chunk_size=CHUNK, threads=2)
    assert names(out) == []


def test_default_and_small_inputs_stream(
    tmp_path: Path, kms: EmbeddedKms, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    used: list[str] = []
    monkeypatch.setattr(envelope, "encrypt_ranges", lambda *a, **k: used.append("ranges"))
    small = tmp_path / "small"
    small.write_bytes(data(CHUNK))  # one chunk: nothing to split
    envelope.encrypt_file(small, tmp_path / "s1", kms=kms, key_id=key, chunk_size=CHUNK, threads=4)
    big = tmp_path / "big"
    big.write_bytes(data(3 * CHUNK))
    envelope.encrypt_file(big, tmp_path / "b1", kms=kms, key_id=key, chunk_size=CHUNK)  # default: stream
    assert used == []
    assert envelope.decrypt_file(tmp_path / "b1", tmp_path / "b2", kms=kms) == 3 * CHUNK


# ------------------------------------------------------------------------------ CLI --


def test_cli_jobs_on_one_file(tmp_path: Path, big: Path, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    enc, dec = tmp_path / "big.bin.cipher", tmp_path / "big.out"
    assert main(["encrypt", "--key-id", key, "--chunk-size", "4K", "--jobs", "2", str(big)]) == 0
    assert main(["decrypt", str(enc), "--jobs", "2", "-o", str(dec)]) == 0
    assert dec.read_bytes() == big.read_bytes()
    assert capsys.readouterr().err == ""


def test_cli_jobs_with_a_pipe_streams(big: Path, key: str, kms_home: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "KMSENV_HOME": str(kms_home)}
    run = [sys.executable, "-m", "kmsenv"]
    enc = subprocess.run(
        [*run, "encrypt", "--key-id", key, "--jobs", "2", "-"],
        input=big.read_bytes(),
        capture_output=True,
        env=env,
        check=False,
    )
    assert enc.returncode == 0, enc.stderr
    dec = subprocess.run(
        [*run, "decrypt", "--jobs", "2", "-"], input=enc.stdout, capture_output=True, env=env, check=False
    )
    assert (dec.returncode, dec.stdout == big.read_bytes()) == (0, True)


def test_decrypt_uses_ranges_only_when_asked(
    tmp_path: Path, big: Path, kms: EmbeddedKms, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    enc = tmp_path / "e"
    envelope.encrypt_file(big, enc, kms=kms, key_id=key, chunk_size=CHUNK)
    workers: list[int] = []
    real = envelope.decrypt_ranges

    def spy(*args: Any, threads: int) -> None:
        workers.append(threads)
        real(*args, threads=threads)

    monkeypatch.setattr(envelope, "decrypt_ranges", spy)
    for name, threads in (("d0", None), ("d1", 1), ("d3", 3)):
        envelope.decrypt_file(enc, tmp_path / name, kms=kms, threads=threads)
        assert (tmp_path / name).read_bytes() == big.read_bytes()
    assert workers == [3]  # None and 1 stream (the measured-no-slower, simpler path)
    with enc.open("rb") as piped:  # a stream (what a pipe gives) never takes this path
        envelope.decrypt_stream(piped, io.BytesIO(), kms=kms, threads=3)
    assert workers == [3]
