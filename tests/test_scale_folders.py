"""``encrypt -r`` / ``decrypt -r``: mirrored trees, the cache on by default, --jobs, one JSON line
per file, per-file failures that do not stop the rest, and the exit code rule."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from files_helpers import flip
from kmsenv import envelope
from kmsenv.clients import EmbeddedKms
from test_scale_support import cli, json_lines, read_header

TREE = {
    "a.txt": b"alpha\n",
    "empty": b"",
    "sub/b.csv": b"x,y\n1,2\n" * 500,
    "sub/deeper/c.bin": bytes(range(256)) * 40,
    "sub/deeper/d": b"d",
}


def make_tree(root: Path, tree: dict[str, bytes] = TREE) -> Path:
    for name, data in tree.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def files_below(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and not p.is_symlink()
    }


def blobs(root: Path) -> set[bytes]:
    return {read_header(p).stanzas[0].ciphertext_blob for p in root.rglob("*.cipher")}


def leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".kmsenv-tmp")]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    return make_tree(tmp_path / "in")


@pytest.fixture
def encrypted(tree: Path, tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]) -> Path:
    rc, _, err = cli(capsys, "encrypt", "-r", str(tree), "-o", str(tmp_path / "enc"), "--key-id", key)
    assert rc == 0, err
    return tmp_path / "enc"


def test_round_trip_mirrors_the_tree(
    tree: Path, encrypted: Path, tmp_path: Path, kms: EmbeddedKms, capsys: pytest.CaptureFixture[str]
) -> None:
    assert sorted(files_below(encrypted)) == sorted(name + ".cipher" for name in TREE)
    assert len(blobs(encrypted)) == 1  # the cache is on by default: one GenerateDataKey for 5 files
    rc, _, err = cli(capsys, "decrypt", "-r", str(encrypted), "-o", str(tmp_path / "dec"), "--jobs", "3")
    assert rc == 0, err
    assert "5 file(s) decrypted, 0 failed, 0 skipped" in err
    assert files_below(tmp_path / "dec") == TREE
    for p in (tmp_path / "dec").rglob("*"):
        assert stat.S_IMODE(p.stat().st_mode) == (0o700 if p.is_dir() else 0o600)


@pytest.mark.parametrize(("options", "expected"), [(["--no-cache"], 5), (["--cache-max-files", "2"], 3), ([], 1)])
def test_cache_options(
    tree: Path, key: str, capsys: pytest.CaptureFixture[str], options: list[str], expected: int
) -> None:
    out = tree.parent / "enc"
    rc, _, err = cli(capsys, "encrypt", "-r", str(tree), "-o", str(out), "--key-id", key, "-v", "-j", "1", *options)
    assert rc == 0, err
    assert len(blobs(out)) == expected
    if "--no-cache" not in options:
        assert f"{expected} data key(s) from the KMS for 5 file(s)" in err


def test_metadata_lines(tree: Path, tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    (tree / "link").symlink_to(tree / "a.txt")
    meta = tmp_path / "meta.jsonl"
    rc, _, _ = cli(
        capsys, "encrypt", "-r", str(tree), "-o", str(tmp_path / "enc"), "--key-id", key,
        "--context", "team=data", "--metadata-output", str(meta),
    )  # fmt: skip
    assert rc == 0
    lines = {Path(line["input"]).name: line for line in json_lines(meta.read_text())}
    assert set(lines) == {"a.txt", "empty", "b.csv", "c.bin", "d", "link"}
    assert lines["link"]["outcome"] == "skipped"
    b = lines["b.csv"]
    assert b["outcome"] == "ok" and b["operation"] == "encrypt"
    assert b["key_ids"] == [key] and b["context"] == {"team": "data"}
    assert b["plaintext_size"] == len(TREE["sub/b.csv"])
    assert b["output"] == str(tmp_path / "enc" / "sub" / "b.csv.cipher")
    assert b["output_size"] == (tmp_path / "enc" / "sub" / "b.csv.cipher").stat().st_size
    rc, out, _ = cli(
        capsys, "decrypt", "-r", str(tmp_path / "enc"), "-o", str(tmp_path / "dec"), "--metadata-output", "-"
    )
    assert rc == 0
    decrypted = json_lines(out)
    assert len(decrypted) == 5
    assert all(line["decrypted_with"]["key_id"] == key and line["context"] == {"team": "data"} for line in decrypted)
    assert all(line["output_size"] == Path(line["output"]).stat().st_size for line in decrypted)


def test_symlinks_and_loops_are_skipped(
    tree: Path, tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tree / "sub" / "loop").symlink_to("..")
    (tree / "outside").symlink_to("/etc")
    (tree / "dangling").symlink_to(tmp_path / "nothing")
    os.mkfifo(tree / "fifo")
    rc, _, err = cli(capsys, "encrypt", "-r", str(tree), "-o", str(tmp_path / "enc"), "--key-id", key)
    assert rc == 0
    for name in ("sub/loop", "outside", "dangling"):
        assert f"skipped {tree / name}: symbolic link (not followed)" in err
    assert f"skipped {tree / 'fifo'}: not a regular file" in err
    assert "5 file(s) encrypted, 0 failed, 4 skipped" in err
    assert sorted(files_below(tmp_path / "enc")) == sorted(name + ".cipher" for name in TREE)


def test_one_bad_file_does_not_stop_the_others(
    encrypted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    flip(encrypted / "sub" / "b.csv.cipher", 200)
    (encrypted / "notes.txt").write_text("not encrypted")
    rc, _, err = cli(capsys, "decrypt", "-r", str(encrypted), "-o", str(tmp_path / "dec"), "-j", "2")
    assert rc == 7  # every failure is an integrity failure: its code
    assert f"kmsenv: error: {encrypted / 'sub' / 'b.csv.cipher'}:" in err
    assert f"skipped {encrypted / 'notes.txt'}: no .cipher suffix" in err
    assert "4 file(s) decrypted, 1 failed, 1 skipped" in err
    expected = dict(TREE)
    del expected["sub/b.csv"]
    assert files_below(tmp_path / "dec") == expected  # nothing half-written for the bad one
    assert leftovers(tmp_path / "dec") == []


def test_mixed_failures_exit_1(encrypted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flip(encrypted / "sub" / "b.csv.cipher", 200)
    dec = tmp_path / "dec"
    dec.mkdir()
    (dec / "a.txt").write_bytes(b"keep me")
    rc, _, err = cli(capsys, "decrypt", "-r", str(encrypted), "-o", str(dec))
    assert rc == 1  # an integrity failure (7) and an existing output (5)
    assert (dec / "a.txt").read_bytes() == b"keep me"
    assert "3 file(s) decrypted, 2 failed" in err
    rc, _, err = cli(capsys, "decrypt", "-r", str(encrypted), "-o", str(dec), "--force")
    assert rc == 7
    assert (dec / "a.txt").read_bytes() == TREE["a.txt"]


def test_existing_outputs_only_exit_5(
    encrypted: Path, tree: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    before = files_below(encrypted)
    rc, _, err = cli(capsys, "encrypt", "-r", str(tree), "-o", str(encrypted), "--key-id", key)
    assert rc == 5
    assert "0 file(s) encrypted, 5 failed" in err
    assert files_below(encrypted) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-o", "{in}/out"], "inside the input folder"),
        (["-o", "{in}"], "inside the input folder"),
        ([], "-r needs an output folder"),
        (["-o", "-"], "not stdin/stdout"),
    ],
)
def test_bad_folder_arguments(
    tree: Path, key: str, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    before = files_below(tree)
    rc, _, err = cli(capsys, "encrypt", "-r", str(tree), "--key-id", key, *[a.format(**{"in": tree}) for a in args])
    assert rc == 2
    assert message in err
    assert files_below(tree) == before


def test_output_inside_input_through_a_symlink(
    tree: Path, tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "alias").symlink_to(tree / "sub")
    rc, _, err = cli(capsys, "encrypt", "-r", str(tree), "-o", str(tmp_path / "alias" / "x"), "--key-id", key)
    assert (rc, "inside the input folder" in err) == (2, True)
    assert not (tree / "sub" / "x").exists()


def test_input_inside_output_never_writes_into_the_input(
    tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    src = make_tree(out / "d", {"d/f": b"f", "g": b"g"})  # out/d/d/f would go to out/d/f.cipher: inside out/d
    rc, _, err = cli(capsys, "encrypt", "-r", str(src), "-o", str(out), "--key-id", key)
    assert rc == 2
    assert "would be inside the input folder" in err
    assert (out / "g.cipher").exists()
    assert not (src / "f.cipher").exists()


def test_missing_or_file_input(tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "encrypt", "-r", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--key-id", key)
    assert (rc, "does not exist" in err) == (4, True)
    (tmp_path / "file").write_bytes(b"x")
    rc, _, err = cli(capsys, "encrypt", "-r", str(tmp_path / "file"), "-o", str(tmp_path / "o"), "--key-id", key)
    assert (rc, "is not a folder" in err) == (4, True)
    rc, _, err = cli(capsys, "encrypt", str(tmp_path), "--key-id", key)
    assert (rc, "pass -r" in err) == (4, True)


def test_unreadable_file_and_folder_are_reported(kms: EmbeddedKms, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """As an unprivileged user (root reads everything, so a forked child drops to nobody)."""
    base = Path(tempfile.mkdtemp(prefix="kmsenv-perm-"))
    try:
        base.chmod(0o755)
        src = make_tree(base / "in")
        for folder in [src, *[p for p in src.rglob("*") if p.is_dir()]]:
            folder.chmod(0o755)
        for f in src.rglob("*"):
            if f.is_file():
                f.chmod(0o644)
        (src / "a.txt").chmod(0)
        (src / "sub" / "deeper").chmod(0o700)  # nobody cannot list it
        out = base / "out"
        out.mkdir(mode=0o777)
        out.chmod(0o777)
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child
            code = 99
            try:
                if os.geteuid() == 0:
                    os.setgroups([])
                    os.setresgid(65534, 65534, 65534)
                    os.setresuid(65534, 65534, 65534)
                from kmsenv.cli import files, main

                monkeypatch.setattr(files, "open_kms", lambda _args: kms)  # the parent's open KMS

                code = main(["encrypt", "-r", str(src), "-o", str(out), "--key-id", key])
            except BaseException:
                import traceback

                traceback.print_exc()
                code = 98
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 4  # both failures are input errors
        assert sorted(files_below(out)) == ["empty.cipher", "sub/b.csv.cipher"]
        assert leftovers(out) == []
    finally:
        for p in [base, *base.rglob("*")]:
            if not p.is_symlink():
                p.chmod(0o700)
        import shutil

        shutil.rmtree(base)


def test_subprocess_folder_run(tree: Path, tmp_path: Path, kms_home: Path, key: str) -> None:
    env = {**os.environ, "KMSENV_HOME": str(kms_home)}
    base = [sys.executable, "-m", "kmsenv"]
    enc = subprocess.run(
        [*base, "encrypt", "-r", str(tree), "-o", str(tmp_path / "enc"), "--key-id", key, "-j", "4"],
        capture_output=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert enc.returncode == 0, enc.stderr
    dec = subprocess.run(
        [*base, "decrypt", "-r", str(tmp_path / "enc"), "-o", str(tmp_path / "dec"), "--metadata-output", "-"],
        capture_output=True, env=env, timeout=120, check=False,
    )  # fmt: skip
    assert dec.returncode == 0, dec.stderr
    assert len(json_lines(dec.stdout.decode())) == 5
    assert files_below(tmp_path / "dec") == TREE


def test_api_files_from_a_folder_run_decrypt_one_by_one(encrypted: Path, tmp_path: Path, kms: EmbeddedKms) -> None:
    assert envelope.decrypt_file(encrypted / "sub" / "deeper" / "d.cipher", tmp_path / "d", kms=kms) == 1


def test_progress_line(tree: Path, tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "encrypt", "-r", str(tree), "-o", str(tmp_path / "enc"), "--key-id", key, "--progress")
    assert rc == 0
    assert "\r\x1b[Kkmsenv: 1 file(s) encrypted, 0 failed, 0 skipped ..." in err  # the first redraw
    assert err.endswith("\r\x1b[Kkmsenv: 5 file(s) encrypted, 0 failed, 0 skipped\n")  # replaced by the summary


def test_interrupt_drops_pending_files_and_leaves_nothing_half_written(
    tree: Path, tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    real = envelope.encrypt_file
    seen: list[str] = []

    def interrupted(src: str, dst: str, **kw: object) -> int:
        seen.append(src)
        if len(seen) == 2:
            raise KeyboardInterrupt
        return real(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(envelope, "encrypt_file", interrupted)
    from kmsenv.cli import files as cli_files

    window = cli_files._BATCH_FILES
    make_tree(tree, {f"many/{i:03d}": b"x" for i in range(2 * window)})
    out = tmp_path / "enc"
    rc, _, err = cli(capsys, "encrypt", "-r", str(tree), "-o", str(out), "--key-id", key, "-j", "1")
    assert rc == 130
    assert "interrupted" in err
    assert len(seen) <= window + 2  # at most the window + 1 files are queued: the rest were never started
    assert len(files_below(out)) == len(seen) - 1  # the ones already finished landed, whole
    for path in out.rglob("*.cipher"):
        assert read_header(path).size < path.stat().st_size
    assert leftovers(out) == []


def test_alias_on_decrypt_is_one_usage_error(
    encrypted: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, _, err = cli(capsys, "decrypt", "-r", str(encrypted), "-o", str(tmp_path / "dec"), "--key-id", "alias/x")
    assert rc == 2
    assert err.count("alias") >= 1 and "failed" not in err
    assert not (tmp_path / "dec").exists()


# ---------------------------------------------------------------------- small-file buffers --


def _slot_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record the size of every chunk buffer pair the stream engine allocates."""
    from kmsenv.format import stream

    sizes: list[int] = []
    original = stream._Slot.__init__

    def recording(self: object, size: int) -> None:
        sizes.append(size)
        original(self, size)  # type: ignore[arg-type]

    monkeypatch.setattr(stream._Slot, "__init__", recording)
    return sizes


def test_small_files_get_small_buffers(
    tmp_path: Path, kms: EmbeddedKms, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 4 KiB file does not pay for 1 MiB chunk buffers, in either direction (the size is known)."""
    src = tmp_path / "small"
    src.write_bytes(os.urandom(4096))
    sizes = _slot_sizes(monkeypatch)
    envelope.encrypt_file(src, tmp_path / "small.cipher", kms=kms, key_id=key)
    envelope.decrypt_file(tmp_path / "small.cipher", tmp_path / "back", kms=kms)
    assert (tmp_path / "back").read_bytes() == src.read_bytes()
    assert sizes and max(sizes) < 8192, sizes


@pytest.mark.parametrize("hint", [0, 1, 4095, 4096, 4097, 3 * 4096 + 5, None])
@pytest.mark.parametrize("length", [0, 100, 4096, 4096 + 1, 3 * 4096 + 5])
def test_a_wrong_size_hint_never_changes_the_bytes(hint: int | None, length: int) -> None:
    """The buffer-size hint is only a hint: a file that grew or shrank since it was measured still
    encrypts to exactly the bytes it would without one, and decrypts back."""
    import io

    from kmsenv import format as fmt
    from kmsenv.format.keys import _new_header

    stanza = fmt.KeyStanza("acs-kms", "acs:kms:cn-hangzhou:1:key/k", "v1", b"blob")
    _, file_key = _new_header(b"k" * 32, stanzas=(stanza,), context={}, chunk_size=4096, salt=b"s" * 32)
    plaintext = os.urandom(length)
    outputs = []
    for expected in (None, hint):
        out = io.BytesIO()
        n = fmt.encrypt_stream(io.BytesIO(plaintext), out, file_key, chunk_size=4096, threads=1, expected_size=expected)
        assert n == length
        outputs.append(out.getvalue())
    assert outputs[0] == outputs[1]
    back = io.BytesIO()
    fmt.decrypt_stream(io.BytesIO(outputs[0]), back, file_key, chunk_size=4096, expected_size=hint)
    assert back.getvalue() == plaintext


def test_folder_run_syncs_each_output_folder_once(
    tree: Path, tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every output is fsynced; each output folder once, at the end (not once per file)."""
    from kmsenv import _atomic

    kinds: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        kinds.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real(fd)

    monkeypatch.setattr(_atomic.os, "fsync", fsync)
    rc, _, err = cli(capsys, "encrypt", "-r", str(tree), "-o", str(tmp_path / "enc"), "--key-id", key)
    assert rc == 0, err
    assert kinds.count("file") == len(TREE)
    assert kinds.count("dir") == 3  # enc, enc/sub, enc/sub/deeper
    assert kinds[-3:] == ["dir"] * 3


def test_plaintext_parent_folders_are_private_too(tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A folder created only as the parent of another (no file of its own) is 0700 as well."""
    src = make_tree(tmp_path / "in", {"only/deeper/still/c.bin": b"c"})
    rc, _, err = cli(capsys, "encrypt", "-r", str(src), "-o", str(tmp_path / "enc"), "--key-id", key)
    assert rc == 0, err
    rc, _, err = cli(capsys, "decrypt", "-r", str(tmp_path / "enc"), "-o", str(tmp_path / "dec"))
    assert rc == 0, err
    folders = [tmp_path / "dec", *[p for p in (tmp_path / "dec").rglob("*") if p.is_dir()]]
    assert len(folders) == 4
    assert {stat.S_IMODE(p.stat().st_mode) for p in folders} == {0o700}
