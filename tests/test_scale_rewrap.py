"""``rewrap``: wrapped keys are added (ReEncrypt), refreshed after rotation or removed; the header
is verified first and only the header changes: in place for v2 files (one header slot written,
the payload never read or copied; a removed key's blob overwritten), by a kernel-side copy into a
new v2 file for v1 files and keys that outgrow the slots. A file that does not verify is left
exactly as it was, and an interrupted in-place write leaves a file that opens."""

from __future__ import annotations

import base64
import errno
import os
import stat
from pathlib import Path

import pytest

from files_helpers import CHUNK, CONTEXT, SALES, digest, flip, sample_encrypt
from kmsenv import envelope
from kmsenv.clients import EmbeddedKms
from kmsenv.errors import ContextError, FormatError, IntegrityError, OutputError, UsageError
from kmsenv.format.keys import _new_header
from test_scale_support import CountingKms, cli, json_lines, new_key, read_header


@pytest.fixture
def cipher(tmp_path: Path, kms: EmbeddedKms, key: str) -> Path:
    plain = tmp_path / "sales.csv"
    plain.write_bytes(SALES * 40)
    out = tmp_path / "sales.csv.cipher"
    envelope.encrypt_file(plain, out, kms=kms, key_id=key, context=CONTEXT, chunk_size=CHUNK)
    return out


def payload(path: Path) -> bytes:
    return path.read_bytes()[read_header(path).size :]


def untouched(path: Path) -> tuple[str, int]:
    return digest(path), path.stat().st_ino


def test_add_key_by_reencrypt(cipher: Path, tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    new = new_key(kms)
    before = read_header(cipher)
    body = payload(cipher)
    counting = CountingKms(kms)
    result = envelope.rewrap_file(cipher, kms=counting, key_ids=[new])
    # One Decrypt to verify the header, one ReEncrypt: the data key is never sent to Encrypt.
    assert [name for name, _ in counting.calls] == ["Decrypt", "ReEncrypt"]
    after = read_header(cipher)
    assert [s.key_arn for s in after.stanzas] == [kms.service.key_arn(key), kms.service.key_arn(new)]
    assert (after.salt, after.commitment, dict(after.context)) == (before.salt, before.commitment, CONTEXT)
    assert payload(cipher) == body
    assert result.added == (kms.service.key_arn(new),)
    assert result.file_size == cipher.stat().st_size
    kms.service.disable_key(key_id=key)
    assert envelope.decrypt_file(cipher, tmp_path / "p", kms=kms, key_ids=[new]) == len(SALES * 40)


def test_remove_key(cipher: Path, tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    new = new_key(kms)
    envelope.rewrap_file(cipher, kms=kms, key_ids=[new], remove_key_ids=[key])
    (stanza,) = read_header(cipher).stanzas
    assert stanza.key_arn == kms.service.key_arn(new)
    envelope.decrypt_file(cipher, tmp_path / "p", kms=kms)
    assert (tmp_path / "p").read_bytes() == SALES * 40


def test_refresh_after_rotation(cipher: Path, kms: EmbeddedKms, key: str) -> None:
    old_version = read_header(cipher).stanzas[0].key_version_id
    kms.service.create_key_version(key_id=key)
    result = envelope.rewrap_file(cipher, kms=kms, key_ids=["alias/Apollo/WorkKey"])
    (stanza,) = read_header(cipher).stanzas
    assert result.refreshed == (kms.service.key_arn(key),)
    assert result.added == ()
    assert stanza.key_version_id != old_version
    primary = kms.service.describe_key(key_id=key)["KeyMetadata"]["PrimaryKeyVersion"]
    assert stanza.key_version_id == primary


def as_v1(path: Path, kms: EmbeddedKms) -> None:
    """Rewrite ``path`` (v2) as the v1 file with the same data key, salt and payload bytes."""
    data = path.read_bytes()
    header = read_header(path)
    blob = base64.b64encode(header.stanzas[0].ciphertext_blob).decode()
    data_key = kms.decrypt_data_key(blob, encryption_context=header.context).plaintext
    v1, _ = _new_header(
        data_key,
        stanzas=header.stanzas,
        context=header.context,
        chunk_size=header.chunk_size,
        salt=header.salt,
        version=1,
    )
    path.write_bytes(v1.encode() + data[header.size :])


def test_v2_rewrap_is_in_place(cipher: Path, kms: EmbeddedKms, monkeypatch: pytest.MonkeyPatch) -> None:
    cipher.chmod(0o640)
    before, body, st = read_header(cipher), payload(cipher), cipher.stat()
    copies: list[str] = []
    monkeypatch.setattr(os, "copy_file_range", lambda *a: copies.append("copy_file_range"))
    monkeypatch.setattr(os, "sendfile", lambda *a: copies.append("sendfile"))
    result = envelope.rewrap_file(cipher, kms=kms, key_ids=[new_key(kms)])
    after = cipher.stat()
    assert result.in_place and copies == []
    assert (after.st_ino, stat.S_IMODE(after.st_mode), after.st_size) == (st.st_ino, 0o640, st.st_size)
    assert read_header(cipher).size == before.size == result.header_size
    assert payload(cipher) == body
    data = cipher.read_bytes()
    # Only the spare slot was written: everything else is byte-identical.
    spare = before.slot_offset(1 - before.active)
    original = before.encode()
    assert (
        data[:spare] == original[:spare]
        and data[spare + before.slot_size : before.size] == original[spare + before.slot_size :]
    )


def test_v1_file_is_converted_by_copying(cipher: Path, kms: EmbeddedKms) -> None:
    as_v1(cipher, kms)
    cipher.chmod(0o640)
    inode, body = cipher.stat().st_ino, payload(cipher)
    assert read_header(cipher).version == 1
    result = envelope.rewrap_file(cipher, kms=kms, key_ids=[new_key(kms)])
    st = cipher.stat()
    assert not result.in_place
    assert stat.S_IMODE(st.st_mode) == 0o640
    assert st.st_ino != inode  # a new file renamed over the old one
    assert not any(p.name.endswith(".kmsenv-tmp") for p in cipher.parent.iterdir())
    header = read_header(cipher)
    assert header.version == 2 and len(header.stanzas) == 2
    assert payload(cipher) == body  # the same payload key in v1 and v2: the bytes are copied as they are
    assert envelope.rewrap_file(cipher, kms=kms, key_ids=[new_key(kms)]).in_place  # v2 now


def test_keys_that_outgrow_the_slots_get_a_larger_header(cipher: Path, tmp_path: Path, kms: EmbeddedKms) -> None:
    capacity, body = read_header(cipher).capacity, payload(cipher)
    results: list[envelope.RewrapResult] = []
    while len(results) < 20:
        results.append(envelope.rewrap_file(cipher, kms=kms, key_ids=[new_key(kms)]))
        if not results[-1].in_place:
            break
    assert results[0].in_place and not results[-1].in_place
    header = read_header(cipher)
    assert header.capacity > capacity >= len(header.stanza_section()) - 300
    assert payload(cipher) == body
    assert envelope.decrypt_file(cipher, tmp_path / "p", kms=kms) == len(SALES * 40)


@pytest.mark.parametrize("change", ["remove", "refresh"])
def test_replaced_wrapped_key_is_gone_from_the_file(
    cipher: Path, tmp_path: Path, kms: EmbeddedKms, key: str, change: str
) -> None:
    other = new_key(kms)
    envelope.rewrap_file(cipher, kms=kms, key_ids=[other])  # slot B: both keys; slot A: the first
    old_blob = read_header(cipher).stanzas[0].ciphertext_blob
    assert cipher.read_bytes().count(old_blob) == 2
    if change == "remove":
        result = envelope.rewrap_file(cipher, kms=kms, remove_key_ids=[key])
    else:
        kms.service.create_key_version(key_id=key)
        result = envelope.rewrap_file(cipher, kms=kms, key_ids=[key])
    assert result.in_place
    data = cipher.read_bytes()
    assert old_blob not in data  # in neither slot
    header = read_header(cipher)
    section = header.stanza_section()
    assert header.standby[8 : 8 + len(section)] == section  # both slots hold the new keys
    assert len(header.stanzas) == (1 if change == "remove" else 2)
    assert envelope.decrypt_file(cipher, tmp_path / "p", kms=kms) == len(SALES * 40)


def test_added_key_leaves_the_old_slot_as_fallback(cipher: Path, kms: EmbeddedKms) -> None:
    first = read_header(cipher)
    envelope.rewrap_file(cipher, kms=kms, key_ids=[new_key(kms)])
    header = read_header(cipher)
    assert header.generation == 2 and header.active == 1 - first.active
    assert header.standby == first.slot_bytes()  # the old slot, untouched


@pytest.mark.parametrize("which", [0, 1])
def test_interrupted_in_place_write_leaves_a_file_that_opens(
    cipher: Path, kms: EmbeddedKms, key: str, monkeypatch: pytest.MonkeyPatch, which: int
) -> None:
    """A crash in the first write (new slot) or the second (purge of the old slot) of a rewrap that
    adds one key and removes the other: the file opens, with the old keys or the new ones."""
    other = new_key(kms)
    envelope.rewrap_file(cipher, kms=kms, key_ids=[other])
    original = cipher.read_bytes()
    third = new_key(kms)
    real = os.pwrite
    header = read_header(cipher)
    plain = cipher.with_name("plain")
    for cut in range(0, header.slot_size + 1, 97):
        cipher.write_bytes(original)
        writes: list[int] = []

        def torn(fd: int, data: bytes, offset: int, *, cut: int = cut, writes: list[int] = writes) -> int:
            writes.append(offset)
            if len(writes) - 1 == which:
                real(fd, bytes(data)[:cut], offset)
                raise OSError(errno.EIO, "simulated crash")
            return real(fd, data, offset)

        monkeypatch.setattr(os, "pwrite", torn)
        with pytest.raises(OutputError, match=r"simulated crash|I/O"):
            envelope.rewrap_file(cipher, kms=kms, key_ids=[third], remove_key_ids=[key])
        monkeypatch.setattr(os, "pwrite", real)
        assert len(writes) == which + 1
        keys = {s.key_arn for s in read_header(cipher).stanzas}
        assert keys in (
            {kms.service.key_arn(key), kms.service.key_arn(other)},
            {kms.service.key_arn(other), kms.service.key_arn(third)},
        )
        assert envelope.decrypt_file(cipher, plain, kms=kms, force=True) == len(SALES * 40)


def test_symlink_rewraps_its_target(cipher: Path, tmp_path: Path, kms: EmbeddedKms) -> None:
    link = tmp_path / "link.cipher"
    link.symlink_to(cipher)
    envelope.rewrap_file(link, kms=kms, key_ids=[new_key(kms)])
    assert link.is_symlink()
    assert len(read_header(cipher).stanzas) == 2


@pytest.mark.parametrize("where", ["salt", "context", "stanza", "tag"])
def test_tampered_header_leaves_file_untouched(cipher: Path, kms: EmbeddedKms, where: str) -> None:
    header = read_header(cipher)
    data = cipher.read_bytes()
    offsets = {
        "salt": 20,
        "context": data.index(b"apollo"),
        "stanza": data.index(header.stanzas[0].ciphertext_blob) + 40,
        "tag": data.index(header.tag) + len(header.tag) - 1,
    }
    flip(cipher, offsets[where])
    before = untouched(cipher)
    counting = CountingKms(kms)
    with pytest.raises(IntegrityError):
        envelope.rewrap_file(cipher, kms=counting, key_ids=[new_key(kms)])
    assert counting.count("ReEncrypt") == 0
    assert untouched(cipher) == before


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"remove": "self"}, (UsageError, "last wrapped key")),
        ({"remove": "other"}, (UsageError, "no wrapped key under")),
        ({}, (UsageError, "nothing to do")),
        ({"add": "self", "remove": "self"}, (UsageError, "both added and removed")),
        ({"add": "other", "context": {"project": "x"}}, (ContextError, "another value")),
    ],
)
def test_refusals_leave_file_untouched(
    cipher: Path, kms: EmbeddedKms, key: str, kwargs: dict[str, object], expected: tuple[type[Exception], str]
) -> None:
    error, match = expected
    other = new_key(kms)
    pick = {"self": key, "other": other}
    before = untouched(cipher)
    with pytest.raises(error, match=match):
        envelope.rewrap_file(
            cipher,
            kms=kms,
            key_ids=[pick[str(kwargs["add"])]] if "add" in kwargs else [],
            remove_key_ids=[pick[str(kwargs["remove"])]] if "remove" in kwargs else [],
            context=kwargs.get("context"),  # type: ignore[arg-type]
        )
    assert untouched(cipher) == before


def test_legacy_file_is_refused(tmp_path: Path, kms: EmbeddedKms, key: str) -> None:
    legacy = sample_encrypt(kms, tmp_path)
    with pytest.raises(FormatError, match="legacy"):
        envelope.rewrap_file(legacy, kms=kms, key_ids=[new_key(kms)])


def test_payload_is_copied_in_the_kernel(cipher: Path, kms: EmbeddedKms, monkeypatch: pytest.MonkeyPatch) -> None:
    as_v1(cipher, kms)  # copying is for v1 files (and keys that outgrow the slots)
    body = payload(cipher)
    calls: list[int] = []
    real = os.copy_file_range

    def spy(src: int, dst: int, count: int, offset_src: int | None = None, offset_dst: int | None = None) -> int:
        calls.append(count)
        return real(src, dst, count, offset_src, offset_dst)

    monkeypatch.setattr(os, "copy_file_range", spy)
    envelope.rewrap_file(cipher, kms=kms, key_ids=[new_key(kms)])
    assert calls and calls[0] == len(body)
    assert payload(cipher) == body


def test_sendfile_when_copy_file_range_cannot(cipher: Path, kms: EmbeddedKms, monkeypatch: pytest.MonkeyPatch) -> None:
    as_v1(cipher, kms)
    body = payload(cipher)

    def cross_device(*_: object) -> int:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "copy_file_range", cross_device)
    envelope.rewrap_file(cipher, kms=kms, key_ids=[new_key(kms)])
    assert payload(cipher) == body


# -------------------------------------------------------------------------------- CLI --


def test_cli_rewrap_many_files_one_bad(
    cipher: Path, tmp_path: Path, kms: EmbeddedKms, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    second = tmp_path / "second.cipher"
    second.write_bytes(cipher.read_bytes())
    bad = tmp_path / "bad.cipher"
    bad.write_bytes(cipher.read_bytes())
    flip(bad, 20)
    bad_before = untouched(bad)
    new = new_key(kms)
    meta = tmp_path / "meta.jsonl"
    rc, _, err = cli(
        capsys, "rewrap", "-v", "--key-id", new, "--metadata-output", str(meta), str(cipher), str(bad), str(second)
    )
    assert rc == 7
    assert f"kmsenv: error: {bad}: header failed authentication" in err
    assert f"{cipher}: added {kms.service.key_arn(new)}" in err
    assert "2 file(s) rewrapped, 1 failed, 0 skipped" in err
    assert untouched(bad) == bad_before
    for good in (cipher, second):
        assert len(read_header(good).stanzas) == 2
    lines = {line["input"]: line for line in json_lines(meta.read_text())}
    assert lines[str(bad)]["outcome"] == "failed"
    assert lines[str(bad)]["error"]["class"] == "IntegrityError"
    assert lines[str(second)]["added"] == [kms.service.key_arn(new)]
    rc, _, err = cli(capsys, "rewrap", "--remove-key-id", key, "--remove-key-id", new, str(cipher))
    assert rc == 2
    assert "last wrapped key" in err


@pytest.mark.parametrize("version", [1, 2])
def test_concurrent_rewraps_of_one_file_lose_nothing(cipher: Path, kms: EmbeddedKms, version: int) -> None:
    """Rewraps of one file are serialised (flock): each reads the header the previous one wrote.
    From v1, the first one replaces the file (a new inode), so the others re-open the path."""
    import threading

    if version == 1:
        as_v1(cipher, kms)
    keys = [new_key(kms) for _ in range(3)]
    errors: list[BaseException] = []

    def add(key_id: str) -> None:
        try:
            envelope.rewrap_file(cipher, kms=kms, key_ids=[key_id])
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=add, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    arns = {s.key_arn for s in read_header(cipher).stanzas}
    assert {kms.service.key_arn(k) for k in keys} <= arns and len(arns) == 4
