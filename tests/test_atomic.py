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


# ------------------------------------------------------------------------- deferred folder sync --


def _record_fsyncs(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[int, int]]]:
    """Every fsync as ("dir" | "file", (st_dev, st_ino)), in order."""
    seen: list[tuple[str, tuple[int, int]]] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        seen.append(("dir" if stat.S_ISDIR(st.st_mode) else "file", (st.st_dev, st.st_ino)))
        real(fd)

    monkeypatch.setattr(_atomic.os, "fsync", fsync)
    return seen


def _inode(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_dev, st.st_ino


def test_without_deferral_every_output_syncs_its_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _record_fsyncs(monkeypatch)
    for i in range(3):
        with AtomicOutput(tmp_path / f"f{i}") as f:
            f.write(b"x")
    assert [kind for kind, _ in seen] == ["file", "dir"] * 3


def test_deferred_folder_sync_once_per_folder(tmp_path: Path, flavour: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Inside deferring(), each output is still synced and linked when its block ends; each folder
    is synced once, by sync(), after the files in it."""
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    seen = _record_fsyncs(monkeypatch)
    folders = _atomic.FolderSync()
    with folders.deferring():
        for i in range(3):
            for sub in ("a", "b"):
                with AtomicOutput(tmp_path / sub / f"f{i}", force=i == 2) as f:
                    f.write(b"data %d" % i)
                assert (tmp_path / sub / f"f{i}").read_bytes() == b"data %d" % i  # in place already
        with pytest.raises(RuntimeError), AtomicOutput(tmp_path / "a" / "failed") as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert [kind for kind, _ in seen] == ["file"] * 6  # no folder synced yet
    assert "pending=2" in repr(folders)
    folders.sync()
    assert sorted(seen[6:]) == sorted([("dir", _inode(tmp_path / "a")), ("dir", _inode(tmp_path / "b"))])
    assert len(seen) == 8
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["f0", "f1", "f2"]
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(TEMP_SUFFIX)]
    folders.sync()  # nothing left to do, nothing left open
    assert len(seen) == 8
    with AtomicOutput(tmp_path / "after") as f:  # outside the block: back to a sync per output
        f.write(b"x")
    assert [kind for kind, _ in seen[8:]] == ["file", "dir"]


def test_deferred_folders_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """At most max_open folder descriptors wait: the oldest is synced early, none is lost."""
    seen = _record_fsyncs(monkeypatch)
    folders = _atomic.FolderSync(max_open=2)
    names = [f"d{i}" for i in range(5)]
    with folders.deferring():
        for name in names:
            (tmp_path / name).mkdir()
            with AtomicOutput(tmp_path / name / "f") as f:
                f.write(b"x")
    folders.sync()
    synced = [inode for kind, inode in seen if kind == "dir"]
    assert sorted(synced) == sorted(_inode(tmp_path / n) for n in names)
    assert synced[:3] == [_inode(tmp_path / n) for n in names[:3]]  # evicted in order, before the end


def test_symlink_to_a_folder_as_target(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "d")
    with pytest.raises(OutputError, match="is a folder"), AtomicOutput(tmp_path / "link", force=True):
        pass
    assert (tmp_path / "link").is_symlink()


# ----------------------------------------------------------------------------- group commit --


def test_group_commit_links_only_after_the_batch_is_synced(
    tmp_path: Path, flavour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deferred outputs stay nameless until their batch is fsynced; then each is linked, and each
    folder synced once, at close."""
    synced: set[tuple[int, int]] = set()
    linked: list[tuple[int, int]] = []
    real_fsync, real_link = os.fsync, os.link

    def fsync(fd: int) -> None:
        real_fsync(fd)
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))

    def link(src: str, dst: str, **kw: object) -> None:
        real_link(src, dst, **kw)  # type: ignore[arg-type]
        linked.append(_inode(tmp_path / dst))

    monkeypatch.setattr(_atomic.os, "fsync", fsync)
    monkeypatch.setattr(_atomic.os, "link", link)
    group = _atomic.GroupCommit(max_pending=100)
    tickets = []
    for i in range(5):
        with group.deferring() as mine, AtomicOutput(tmp_path / f"f{i}", mode=PRIVATE_MODE) as f:
            f.write(b"data %d" % i)
        tickets += mine
    assert len(tickets) == 5
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(TEMP_SUFFIX)) == []  # nameless yet
    assert tickets[2].size == len(b"data 2")
    tickets[2].wait()  # waiting for one lands the whole batch
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"f{i}" for i in range(5)]
    assert linked and all(inode in synced for inode in linked)  # never a name before its data is durable
    for ticket in tickets:
        ticket.wait()
    assert "pending=0" in repr(group)
    group.close()
    assert _inode(tmp_path) in synced  # the folder, once, at the end
    assert all(_mode(tmp_path / f"f{i}") == PRIVATE_MODE for i in range(5))


def test_group_commit_flushes_when_full_and_on_close(tmp_path: Path) -> None:
    group = _atomic.GroupCommit(max_pending=3)
    for i in range(4):
        with group.deferring(), AtomicOutput(tmp_path / f"f{i}") as f:
            f.write(b"x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0", "f1", "f2"]  # the full batch landed
    group.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0", "f1", "f2", "f3"]


def test_group_commit_keeps_no_clobber(tmp_path: Path, flavour: str) -> None:
    """A target that appears while its file waits for the batch is not replaced: that file fails
    alone, leaves nothing behind, and the others land."""
    group = _atomic.GroupCommit()
    tickets = []
    for name in ("a", "b"):
        with group.deferring() as mine, AtomicOutput(tmp_path / name) as f:
            f.write(b"ours")
        tickets += mine
    (tmp_path / "a").write_bytes(b"theirs")
    with pytest.raises(OutputError, match="already exists"):
        tickets[0].wait()
    tickets[1].wait()
    group.close()
    assert (tmp_path / "a").read_bytes() == b"theirs"
    assert (tmp_path / "b").read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_group_commit_fsync_failure_leaves_nothing(
    tmp_path: Path, flavour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing(fd: int) -> None:
        raise OSError(5, "Input/output error")

    group = _atomic.GroupCommit()
    with group.deferring() as tickets, AtomicOutput(tmp_path / "out") as f:
        f.write(b"x")
    monkeypatch.setattr(_atomic.os, "fsync", failing)
    with pytest.raises(OutputError, match="Input/output error"):
        tickets[0].wait()
    group.close()
    assert list(tmp_path.iterdir()) == []


def test_group_commit_failed_body_defers_nothing(tmp_path: Path, flavour: str) -> None:
    group = _atomic.GroupCommit()
    with pytest.raises(RuntimeError), group.deferring() as tickets, AtomicOutput(tmp_path / "out") as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert tickets == []
    group.close()
    assert list(tmp_path.iterdir()) == []


def test_group_commit_strands_nothing_when_syncing_breaks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An unexpected failure of the batch's fsync step links nothing and leaves no waiter hanging."""
    group = _atomic.GroupCommit()
    tickets = []
    for name in ("a", "b"):
        with group.deferring() as mine, AtomicOutput(tmp_path / name) as f:
            f.write(b"x")
        tickets += mine

    def broken(fds: list[int]) -> list[OSError | None]:
        raise MemoryError

    monkeypatch.setattr(group, "_sync", broken)
    with pytest.raises(MemoryError):
        group.flush()
    for ticket in tickets:
        with pytest.raises(OutputError, match="fsync did not complete"):
            ticket.wait()
    group.close()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ batches of a folder run --


def test_a_batch_lands_exactly_its_tickets_after_their_fsync(
    tmp_path: Path, flavour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch (what a folder run's worker hands over) syncs and links its own tickets, and
    leaves other pending files alone."""
    synced: set[tuple[int, int]] = set()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        st = os.fstat(fd)
        synced.add((st.st_dev, st.st_ino))

    monkeypatch.setattr(_atomic.os, "fsync", fsync)
    group = _atomic.GroupCommit(max_pending=None)
    with group.deferring() as others, AtomicOutput(tmp_path / "other") as f:
        f.write(b"not this batch")
    with group.batch(str(tmp_path)) as mine:
        for name in ("a", "b", "c"):
            with group.deferring() as tickets, AtomicOutput(tmp_path / name) as f:
                f.write(name.encode() * 10)
            mine.extend(tickets)
    for ticket in mine:
        ticket.wait()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(TEMP_SUFFIX)) == ["a", "b", "c"]
    assert all(_inode(tmp_path / name) in synced for name in ("a", "b", "c"))
    assert [t.size for t in mine] == [10, 10, 10]
    assert "pending=1" in repr(group)
    group.close()
    assert (tmp_path / "other").read_bytes() == b"not this batch"
    assert others[0].size == len(b"not this batch")


def test_a_batch_reports_each_failure_on_its_own_ticket(tmp_path: Path, flavour: str) -> None:
    group = _atomic.GroupCommit(max_pending=None)
    with group.batch(str(tmp_path)) as tickets:
        for name in ("taken", "free"):
            with group.deferring() as mine, AtomicOutput(tmp_path / name) as f:
                f.write(b"ours")
            tickets.extend(mine)
        (tmp_path / "taken").write_bytes(b"theirs")
    with pytest.raises(OutputError, match="already exists"):
        tickets[0].wait()
    tickets[1].wait()
    group.close()
    assert (tmp_path / "taken").read_bytes() == b"theirs"
    assert (tmp_path / "free").read_bytes() == b"ours"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["free", "taken"]


def test_a_batch_shares_one_descriptor_of_its_folder(
    tmp_path: Path, flavour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Inside ``batch``, outputs in its folder do not open it themselves; outputs elsewhere
    still do; the shared descriptor is synced once at close, like any other folder."""
    (tmp_path / "elsewhere").mkdir()
    folder_opens: list[str] = []
    real_open = os.open

    def counting_open(path: str, flags: int, *args: object, **kw: object) -> int:
        if flags & os.O_DIRECTORY and not flags & os.O_WRONLY:  # a folder, not an O_TMPFILE in one
            folder_opens.append(os.fspath(path))
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(_atomic.os, "open", counting_open)
    group = _atomic.GroupCommit(max_pending=None)
    with group.batch(str(tmp_path)) as tickets:
        for i in range(5):
            with group.deferring() as mine, AtomicOutput(tmp_path / f"f{i}", mode=PRIVATE_MODE) as f:
                f.write(b"%d" % i)
            tickets.extend(mine)
        with group.deferring() as mine, AtomicOutput(tmp_path / "elsewhere" / "g") as f:
            f.write(b"g")
        tickets.extend(mine)
    for ticket in tickets:
        ticket.wait()
    assert folder_opens == [str(tmp_path), str(tmp_path / "elsewhere")]
    synced = _record_fsyncs(monkeypatch)
    group.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", *(f"f{i}" for i in range(5))]
    assert all(_mode(tmp_path / f"f{i}") == PRIVATE_MODE for i in range(5))
    assert (tmp_path / "elsewhere" / "g").read_bytes() == b"g"
    assert sorted(kind for kind, _ in synced) == ["dir", "dir"]  # each folder once, at the end


def test_a_batch_folder_that_cannot_be_opened_is_reported_per_file(tmp_path: Path) -> None:
    group = _atomic.GroupCommit(max_pending=None)
    with (
        group.batch(str(tmp_path / "missing")),
        pytest.raises(OutputError, match="cannot be used"),
        AtomicOutput(tmp_path / "missing" / "f") as f,
    ):
        f.write(b"x")
    group.close()


@pytest.mark.parametrize("sizes", [[], [0], [10, 20], [100_000], [10, 70_000, 5], [1] * 600])
def test_deferred_writes_reach_the_file_in_order(tmp_path: Path, sizes: list[int]) -> None:
    """The group's file object (one writev for small writes, large ones straight through, at
    most 256 pieces held) writes exactly the bytes given, and knows the size without asking."""
    pieces = [os.urandom(n) for n in sizes]
    group = _atomic.GroupCommit(max_pending=None)
    with group.deferring() as tickets, AtomicOutput(tmp_path / "out") as f:
        for piece in pieces:
            assert f.write(memoryview(bytearray(piece))) == len(piece)
    tickets[0].wait()
    assert tickets[0].size == sum(sizes)
    group.close()
    assert (tmp_path / "out").read_bytes() == b"".join(pieces)


def test_deferred_size_is_the_file_s_when_written_round_the_object(tmp_path: Path) -> None:
    """Once the descriptor was handed out (pwrite by chunk ranges), the size is asked of the file."""
    group = _atomic.GroupCommit(max_pending=None)
    with group.deferring() as tickets, AtomicOutput(tmp_path / "out") as f:
        f.write(b"head")
        f.flush()
        os.pwrite(f.fileno(), b"tail", 100)
    tickets[0].wait()
    assert tickets[0].size == 104
    group.close()
    assert (tmp_path / "out").read_bytes() == b"head" + bytes(96) + b"tail"


def test_a_batch_is_committed_behind_the_worker_s_back(
    tmp_path: Path, flavour: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GroupCommit.batch: the block ends without waiting for the disk; the commit thread fsyncs
    the batch, only then links each file (through the batch's folder descriptor) and then leaves
    the folder to the end-of-run sync; waiting for a ticket waits for exactly that."""
    import threading

    release = threading.Event()
    real_fsync = os.fsync
    synced: list[tuple[int, int]] = []

    def slow_fsync(fd: int) -> None:
        release.wait(10)
        real_fsync(fd)
        st = os.fstat(fd)
        synced.append((st.st_dev, st.st_ino))

    monkeypatch.setattr(_atomic.os, "fsync", slow_fsync)
    group = _atomic.GroupCommit(max_pending=None)
    with group.batch(str(tmp_path)) as tickets:
        for i in range(3):
            with group.deferring() as mine, AtomicOutput(tmp_path / f"f{i}") as f:
                f.write(b"%d" % i)
            tickets.extend(mine)
    assert [p.name for p in tmp_path.iterdir() if not p.name.endswith(TEMP_SUFFIX)] == []  # the disk is "slow"
    release.set()
    for ticket in tickets:
        ticket.wait()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f0", "f1", "f2"]
    assert all(_inode(tmp_path / f"f{i}") in synced for i in range(3))
    group.close()
    assert _inode(tmp_path) in synced  # the folder, at the end
    assert [(tmp_path / f"f{i}").read_bytes() for i in range(3)] == [b"0", b"1", b"2"]


def test_a_batch_s_failed_fsync_fails_its_files_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    group = _atomic.GroupCommit(max_pending=None)
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        st = os.fstat(fd)
        if not stat.S_ISDIR(st.st_mode) and st.st_size == 2:  # the first batch's file
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(_atomic.os, "fsync", fsync)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    with group.batch(str(tmp_path / "a")) as first:
        with group.deferring() as mine, AtomicOutput(tmp_path / "a" / "x") as f:
            f.write(b"xx")
        first.extend(mine)
    with group.batch(str(tmp_path / "b")) as second:
        with group.deferring() as mine, AtomicOutput(tmp_path / "b" / "y") as f:
            f.write(b"y")
        second.extend(mine)
    with pytest.raises(OutputError, match="Input/output error"):
        first[0].wait()
    second[0].wait()
    group.close()
    assert list((tmp_path / "a").iterdir()) == []
    assert (tmp_path / "b" / "y").read_bytes() == b"y"


def test_waiting_for_a_batch_s_file_leaves_other_files_alone(tmp_path: Path) -> None:
    """Waiting for a file handed to the commit thread only waits: it does not flush files that
    other workers are still writing (they are theirs to commit)."""
    group = _atomic.GroupCommit(max_pending=None)
    with group.deferring() as other, AtomicOutput(tmp_path / "other") as f:
        f.write(b"still someone's batch")
    with group.batch(str(tmp_path)) as tickets:
        with group.deferring() as mine, AtomicOutput(tmp_path / "mine") as f:
            f.write(b"mine")
        tickets.extend(mine)
    tickets[0].wait()
    assert (tmp_path / "mine").read_bytes() == b"mine"
    assert not (tmp_path / "other").exists()
    assert "pending=1" in repr(group)
    group.close()
    assert (tmp_path / "other").read_bytes() == b"still someone's batch"
    assert other[0].size == len(b"still someone's batch")
