"""AtomicOutput: nothing at the path until a clean exit; no clobbering; nothing left on failure."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kmsenv import _atomic
from kmsenv._atomic import PRIVATE_MODE, TEMP_SUFFIX, AtomicOutput
from kmsenv.errors import OutputError


@pytest.fixture(params=["anonymous", "named"])
def flavour(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test with O_TMPFILE and with the named-temp-file fallback."""
    if request.param == "named":
        monkeypatch.setattr(_atomic, "_O_TMPFILE", 0)
    elif not getattr(os, "O_TMPFILE", 0):
        pytest.skip("no O_TMPFILE on this platform")
    return str(request.param)


@pytest.fixture
def umask() -> Iterator[None]:
    old = os.umask(0o027)
    yield
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_commit_writes_the_file_and_leaves_nothing_else(tmp_path: Path, flavour: str) -> None:
    target = tmp_path / "out.bin"
    with AtomicOutput(target) as f:
        f.write(b"hello ")
        f.write(b"world")
    assert target.read_bytes() == b"hello world"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.bin"]


def test_private_mode_is_exact_whatever_the_umask(tmp_path: Path, flavour: str, umask: None) -> None:
    target = tmp_path / "plain.txt"
    with AtomicOutput(target, mode=PRIVATE_MODE) as f:
        f.write(b"secret")
    assert _mode(target) == 0o600


def test_default_mode_follows_the_umask(tmp_path: Path, flavour: str, umask: None) -> None:
    target = tmp_path / "c.cipher"
    with AtomicOutput(target) as f:
        f.write(b"x")
    assert _mode(target) == 0o640  # 0666 minus umask 027


def test_anonymous_file_has_no_name_while_written(tmp_path: Path) -> None:
    if not getattr(os, "O_TMPFILE", 0):
        pytest.skip("no O_TMPFILE on this platform")
    with AtomicOutput(tmp_path / "out") as f:
        f.write(b"partial plaintext")
        f.flush()
        assert list(tmp_path.iterdir()) == []
    assert (tmp_path / "out").read_bytes() == b"partial plaintext"


def test_named_fallback_temp_is_private_while_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_atomic, "_O_TMPFILE", 0)
    with AtomicOutput(tmp_path / "out", mode=PRIVATE_MODE) as f:
        f.write(b"x")
        (temp,) = tmp_path.iterdir()
        assert temp.name.startswith(".out.") and temp.name.endswith(TEMP_SUFFIX)
        assert _mode(temp) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_exception_in_body_leaves_nothing(tmp_path: Path, flavour: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), AtomicOutput(tmp_path / "out") as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_existing_target_is_refused_before_anything_is_written(tmp_path: Path, flavour: str) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"keep me")
    with pytest.raises(OutputError, match="already exists") as info, AtomicOutput(target):
        pytest.fail("the body must not run")
    assert info.value.hint is not None and "--force" in info.value.hint
    assert target.read_bytes() == b"keep me"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_target_appearing_during_the_write_is_not_clobbered(tmp_path: Path, flavour: str) -> None:
    """The no-clobber check is the link itself: a file created meanwhile survives."""
    target = tmp_path / "out"
    with pytest.raises(OutputError, match="already exists"), AtomicOutput(target) as f:
        f.write(b"ours")
        target.write_bytes(b"theirs")
    assert target.read_bytes() == b"theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_force_replaces_atomically(tmp_path: Path, flavour: str) -> None:
    target = tmp_path / "out"
    target.write_bytes(b"old")
    old_inode = target.stat().st_ino
    with AtomicOutput(target, force=True) as f:
        f.write(b"new")
        assert target.read_bytes() == b"old"  # untouched until commit
    assert target.read_bytes() == b"new"
    assert target.stat().st_ino != old_inode  # replaced by rename, not rewritten in place
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_symlink_target_is_an_existing_output(tmp_path: Path, flavour: str) -> None:
    elsewhere = tmp_path / "elsewhere"
    (tmp_path / "out").symlink_to(elsewhere)
    with pytest.raises(OutputError, match="already exists"), AtomicOutput(tmp_path / "out"):
        pass
    assert not elsewhere.exists()


def test_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(OutputError, match="cannot be used"), AtomicOutput(tmp_path / "nope" / "out"):
        pass


def test_folder_as_target(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    with pytest.raises(OutputError, match="is a folder"), AtomicOutput(tmp_path / "d", force=True):
        pass


def test_unwritable_folder(readonly_dir: Path, flavour: str) -> None:
    with pytest.raises(OutputError, match="cannot write in the output folder"), AtomicOutput(readonly_dir / "out"):
        pass
    assert list(readonly_dir.iterdir()) == []
