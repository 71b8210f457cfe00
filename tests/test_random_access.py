"""Random access to v1 and v2 files: ``open_encrypted`` (a seekable reader), ``decrypt_range`` and
``kmsenv decrypt --offset/--length``. Chunks start at the header size (v2: the fixed header
region, which in-place rewrap never changes). Only touched chunks are verified; the final chunk is
verified on open; no byte of a chunk whose tag failed is ever returned or written."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from files_helpers import CHUNK, flip, names
from kmsenv import EncryptedReader, IntegrityError, envelope, open_encrypted
from kmsenv import format as fmt
from kmsenv.cli import main
from kmsenv.clients import EmbeddedKms
from kmsenv.errors import ContextError, FormatError, InputError, UsageError
from kmsenv.format.random_access import Layout

#: Sizes around chunk boundaries: empty, one byte, one chunk +-1, several chunks +-1.
SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK - 1, 3 * CHUNK, 3 * CHUNK + 1]


def data(n: int) -> bytes:
    # Position-dependent bytes: a read from the wrong offset cannot look right.
    return b"".join(i.to_bytes(4, "big") for i in range(n // 4 + 1))[:n]


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EmbeddedKms, dict[int, Path]]]:
    """One encrypted file per size in SIZES (module scope: hypothesis reuses them)."""
    from kmsenv.kms.service import open_service

    folder = tmp_path_factory.mktemp("ra")
    with EmbeddedKms(service=open_service(folder / "home", announce=False)) as kms:
        key = kms.call("CreateKey", {})["KeyMetadata"]["KeyId"]
        out: dict[int, Path] = {}
        for size in SIZES:
            src, enc = folder / f"p{size}", folder / f"p{size}.cipher"
            src.write_bytes(data(size))
            envelope.encrypt_file(src, enc, kms=kms, key_id=key, chunk_size=CHUNK, context={"k": "v"})
            out[size] = enc
        yield kms, out


def payload_offset(path: Path, k: int) -> int:
    """Where chunk ``k``'s record starts."""
    header = fmt.read_header(io.BytesIO(path.read_bytes()))
    return Layout(header.size, header.chunk_size, 0).record_offset(k)


def test_v1_files_and_rewrapped_v2_files_read_at_the_right_offsets(
    files: tuple[EmbeddedKms, dict[int, Path]], tmp_path: Path
) -> None:
    """The payload starts at the v1 header's end, or at the v2 region's end (before and after an
    in-place rewrap, which keeps it where it is); ranges and parallel decryption agree."""
    from kmsenv.format.keys import _new_header

    kms, paths = files
    size = 3 * CHUNK + 1
    original = paths[size].read_bytes()
    header = fmt.read_header(io.BytesIO(original))
    blob = base64.b64encode(header.stanzas[0].ciphertext_blob).decode()
    data_key = kms.decrypt_data_key(blob, encryption_context=header.context).plaintext
    v1, _ = _new_header(
        data_key, stanzas=header.stanzas, context=header.context, chunk_size=CHUNK, salt=header.salt, version=1
    )
    old = tmp_path / "v1.cipher"
    old.write_bytes(v1.encode() + original[header.size :])
    rewrapped = tmp_path / "v2.cipher"
    rewrapped.write_bytes(original)
    key = kms.call("CreateKey", {})["KeyMetadata"]["KeyId"]
    assert envelope.rewrap_file(rewrapped, kms=kms, key_ids=[key]).in_place
    assert fmt.read_header(io.BytesIO(rewrapped.read_bytes())).size == header.size != v1.size
    for path in (old, rewrapped):
        with open_encrypted(path, kms=kms) as r:
            r.seek(CHUNK - 3)
            assert r.read(7) == data(size)[CHUNK - 3 : CHUNK + 4]
            assert r.size == size
        out = tmp_path / f"{path.name}.plain"
        envelope.decrypt_file(path, out, kms=kms, threads=2)
        assert out.read_bytes() == data(size)


@pytest.mark.parametrize("size", SIZES)
def test_size_seek_end_and_readall(files: tuple[EmbeddedKms, dict[int, Path]], size: int) -> None:
    kms, paths = files
    with open_encrypted(paths[size], kms=kms) as r:
        assert isinstance(r, EncryptedReader) and isinstance(r, io.RawIOBase)
        assert (r.size, r.seekable(), r.readable(), r.writable()) == (size, True, True, False)
        assert r.seek(0, io.SEEK_END) == size and r.read(10) == b""
        assert r.seek(0) == 0 and r.read() == data(size)
        assert r.seek(size + 5) == size + 5 and r.read(1) == b""  # past the end: EOF, as for files
    assert r.closed


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    size=st.sampled_from(SIZES),
    offset=st.integers(0, 3 * CHUNK + 10),
    length=st.integers(0, 2 * CHUNK + 10),
    buffered=st.booleans(),
)
def test_any_range_matches_the_plaintext(
    files: tuple[EmbeddedKms, dict[int, Path]], size: int, offset: int, length: int, buffered: bool
) -> None:
    kms, paths = files
    expected = data(size)[offset : offset + length]
    with open_encrypted(paths[size], kms=kms) as raw:
        reader: io.RawIOBase | io.BufferedReader = io.BufferedReader(raw, 1000) if buffered else raw
        reader.seek(offset)
        got = reader.read(length)
        assert got == expected
        assert reader.tell() == max(offset, min(offset + length, size)) if offset <= size else offset
        # relative seeks and readinto agree with the same slice
        reader.seek(-len(got), io.SEEK_CUR)
        buf = bytearray(length)
        n = reader.readinto(buf)
        assert bytes(buf[:n]) == expected


def test_only_touched_chunks_are_read(
    files: tuple[EmbeddedKms, dict[int, Path]], monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsenv.format import random_access

    kms, paths = files
    opened: list[int] = []
    real = random_access._open_chunk

    def spy(fd: int, key: fmt.FileKey, layout: Layout, k: int, bufs: object) -> memoryview:
        opened.append(k)
        return real(fd, key, layout, k, bufs)  # type: ignore[arg-type]

    monkeypatch.setattr(random_access, "_open_chunk", spy)
    with open_encrypted(paths[3 * CHUNK + 1], kms=kms) as r:
        assert opened == [3]  # the final chunk, on open
        r.seek(CHUNK + 10)
        r.read(CHUNK)  # chunks 1 and 2
        r.read(5)  # still chunk 2: cached
    assert opened == [3, 1, 2]


def tampered(paths: dict[int, Path], tmp_path: Path, chunk: int) -> Path:
    """A copy of the 4-chunk file with one ciphertext bit of ``chunk`` flipped."""
    copy = tmp_path / "t.cipher"
    copy.write_bytes(paths[3 * CHUNK + 1].read_bytes())
    flip(copy, payload_offset(copy, chunk) + 7)
    return copy


def test_tampered_chunk_outside_the_range_is_not_noticed(
    files: tuple[EmbeddedKms, dict[int, Path]], tmp_path: Path
) -> None:
    kms, paths = files
    bad = tampered(paths, tmp_path, 1)
    with open_encrypted(bad, kms=kms) as r:
        r.seek(2 * CHUNK)
        assert r.read() == data(3 * CHUNK + 1)[2 * CHUNK :]
        assert r.seek(0) == 0 and r.read(CHUNK) == data(CHUNK)
    out = tmp_path / "range"
    n = envelope.decrypt_range(bad, out, kms=kms, offset=2 * CHUNK, length=100)
    assert n == 100 and out.read_bytes() == data(3 * CHUNK)[2 * CHUNK : 2 * CHUNK + 100]


def test_tampered_chunk_inside_the_range_fails_and_releases_nothing(
    files: tuple[EmbeddedKms, dict[int, Path]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    kms, paths = files
    bad = tampered(paths, tmp_path, 1)
    with open_encrypted(bad, kms=kms) as r:
        r.seek(CHUNK - 10)
        buf = bytearray(b"\xaa" * 100)
        with pytest.raises(IntegrityError):
            r.readinto(buf)  # 10 good bytes of chunk 0, then chunk 1 fails
        assert r.tell() == CHUNK - 10  # the position did not move
        assert bytes(buf[10:]) == b"\xaa" * 90  # nothing of chunk 1 reached the caller
        with pytest.raises(IntegrityError):
            r.read(1 + CHUNK)  # retried: still refused, never served from a half-filled cache
        assert r.read(10) == data(CHUNK)[-10:]
    out = tmp_path / "out"
    with pytest.raises(IntegrityError):
        envelope.decrypt_range(bad, out, kms=kms, offset=CHUNK + 1, length=10)
    assert not out.exists() and names(tmp_path) == ["t.cipher"]


@pytest.mark.parametrize("cut", [1, 16, CHUNK + 16])
def test_truncated_file_is_refused_at_open(
    files: tuple[EmbeddedKms, dict[int, Path]], tmp_path: Path, cut: int
) -> None:
    kms, paths = files
    short = tmp_path / "short.cipher"
    short.write_bytes(paths[3 * CHUNK].read_bytes()[:-cut])
    with pytest.raises(IntegrityError):
        open_encrypted(short, kms=kms)


@pytest.mark.parametrize("extra", [b"\x00", bytes(16), bytes(CHUNK + 16)])
def test_appended_bytes_are_refused_at_open(
    files: tuple[EmbeddedKms, dict[int, Path]], tmp_path: Path, extra: bytes
) -> None:
    kms, paths = files
    long = tmp_path / "long.cipher"
    long.write_bytes(paths[CHUNK + 1].read_bytes() + extra)
    with pytest.raises(IntegrityError):
        open_encrypted(long, kms=kms)


def test_open_checks_context_format_and_input(files: tuple[EmbeddedKms, dict[int, Path]], tmp_path: Path) -> None:
    kms, paths = files
    with pytest.raises(ContextError):
        open_encrypted(paths[1], kms=kms, context={"k": "other"})
    with open_encrypted(paths[1], kms=kms, context={"k": "v"}) as r:
        assert r.read() == data(1)
    not_ours = tmp_path / "plain.txt"
    not_ours.write_bytes(b"hello")
    with pytest.raises(FormatError):
        open_encrypted(not_ours, kms=kms)
    with pytest.raises(InputError):
        open_encrypted(tmp_path / "missing", kms=kms)
    with pytest.raises(UsageError):
        open_encrypted(paths[1], kms=kms, key_ids=["alias/x"])


def test_reader_hides_key_material_and_refuses_pickling(files: tuple[EmbeddedKms, dict[int, Path]]) -> None:
    import pickle

    kms, paths = files
    with open_encrypted(paths[CHUNK], kms=kms) as r:
        assert "key" not in repr(r).lower() or "hidden" in repr(r)
        assert data(CHUNK)[:8].hex() not in repr(r)
        with pytest.raises(TypeError):
            pickle.dumps(r)
        with pytest.raises(io.UnsupportedOperation):
            r.fileno()
    with pytest.raises(ValueError):
        r.read(1)


def test_text_wrapper_works(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    src, enc = tmp_path / "t.txt", tmp_path / "t.cipher"
    lines = [f"line {i}\n" for i in range(3000)]
    src.write_text("".join(lines))
    envelope.encrypt_file(src, enc, kms=kms, key_id=key, chunk_size=CHUNK)
    with open_encrypted(enc, kms=kms) as r, io.TextIOWrapper(io.BufferedReader(r), encoding="ascii") as text:
        assert text.readlines() == lines


# ---------------------------------------------------------------------------------- CLI --


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, bytes, str]:
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out.encode(), captured.err


@pytest.fixture
def cipher(tmp_path: Path, kms: EmbeddedKms, key: str) -> Path:
    src, enc = tmp_path / "p", tmp_path / "p.cipher"
    src.write_bytes(data(5 * CHUNK + 7))
    envelope.encrypt_file(src, enc, kms=kms, key_id=key, chunk_size=CHUNK)
    src.unlink()
    return enc


@pytest.mark.parametrize(
    ("offset", "length", "expected"),
    [
        ("4K", "1K", slice(CHUNK, CHUNK + 1024)),
        ("0", "0", slice(0, 0)),
        ("10", None, slice(10, None)),
        (None, "3", slice(0, 3)),
    ],
)
def test_cli_range_to_file(
    cipher: Path, capsys: pytest.CaptureFixture[str], offset: str | None, length: str | None, expected: slice
) -> None:
    out = cipher.with_name("range")
    args = ["decrypt", str(cipher), "-o", str(out)]
    args += ["--offset", offset] if offset is not None else []
    args += ["--length", length] if length is not None else []
    rc, _, err = cli(capsys, *args)
    assert (rc, err) == (0, "")
    assert out.read_bytes() == data(5 * CHUNK + 7)[expected]
    assert out.stat().st_mode & 0o777 == 0o600


def test_cli_range_to_stdout(cipher: Path, capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    rc = main(["decrypt", str(cipher), "--offset", "4097", "--length", "5000", "-o", "-"])
    out = capfdbinary.readouterr().out
    assert rc == 0 and out == data(5 * CHUNK + 7)[4097 : 4097 + 5000]


@pytest.mark.parametrize(("offset", "length"), [("1M", None), (str(5 * CHUNK + 8), "0"), ("20K", "1K")])
def test_cli_range_past_the_end_is_a_clear_error(
    cipher: Path, capsys: pytest.CaptureFixture[str], offset: str, length: str | None
) -> None:
    out = cipher.with_name("range")
    args = ["decrypt", str(cipher), "-o", str(out), "--offset", offset] + (["--length", length] if length else [])
    rc, _, err = cli(capsys, *args)
    assert rc == 2
    assert "past the end of the plaintext (20487 bytes)" in err
    assert not out.exists()


def test_cli_range_tampered_inside_writes_nothing(cipher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip(cipher, payload_offset(cipher, 2) + 3)
    out = cipher.with_name("range")
    rc, _, err = cli(capsys, "decrypt", str(cipher), "-o", str(out), "--offset", "8K", "--length", "100")
    assert rc == 7 and "payload failed authentication" in err
    assert not out.exists()
    rc, _, err = cli(capsys, "decrypt", str(cipher), "-o", str(out), "--offset", "12K", "--length", "100")
    assert (rc, err) == (0, "")


def test_cli_range_refuses_stdin_and_folders(cipher: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "decrypt", "-", "--offset", "1")
    assert rc == 2 and "not with -r or stdin" in err
    rc, _, err = cli(capsys, "decrypt", "-r", str(cipher.parent), "-o", str(cipher.parent / "o"), "--length", "1")
    assert rc == 2
    with pytest.raises(SystemExit) as exc:
        main(["decrypt", str(cipher), "--offset", "12Q"])
    assert exc.value.code == 2 and "not a size" in capsys.readouterr().err


def test_cli_range_on_a_legacy_file_says_why(
    tmp_path: Path, kms: EmbeddedKms, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from files_helpers import sample_encrypt

    legacy = sample_encrypt(kms, tmp_path)
    rc, _, err = cli(capsys, "decrypt", str(legacy), "-o", str(tmp_path / "o"), "--offset", "1")
    assert rc != 0 and "legacy" in err
    assert not (tmp_path / "o").exists()
