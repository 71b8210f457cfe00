"""Folder runs in batches: one worker task per batch of one output folder's files, committed by
that worker; reports still one per file, in walk order; small inputs read in one read(2)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmsenv import _atomic, envelope
from kmsenv.cli import files as cli_files
from kmsenv.clients import EmbeddedKms
from kmsenv.errors import InputError, OutputError, UsageError
from test_scale_support import cli, json_lines

BATCH = cli_files._BATCH_FILES


def _tree(root: Path, counts: dict[str, int]) -> list[str]:
    """``counts[folder]`` small files in each folder; their relative paths in walk order."""
    names = []
    for folder, count in counts.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            name = f"{folder}/f{i:04d}"
            (root / name).write_bytes(name.encode() * 3)
            names.append(name)
    return sorted(names)  # one level of folders: walk order is name order


@pytest.mark.parametrize("jobs", ["1", "3"])
def test_reports_follow_the_walk_across_batches(
    tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str], jobs: str
) -> None:
    """More files in a folder than a batch holds, and several folders: every file is reported
    once, in walk order, with its landed size, and decrypts back."""
    names = _tree(tmp_path / "in", {"a": BATCH + 3, "b": 2, "c": 2 * BATCH + 1})
    meta = tmp_path / "meta.jsonl"
    rc, _, err = cli(
        capsys,
        "encrypt", "-r", str(tmp_path / "in"), "-o", str(tmp_path / "enc"), "--key-id", key, "-j", jobs,
        "--metadata-output", str(meta),
    )  # fmt: skip
    assert rc == 0, err
    lines = json_lines(meta.read_text())
    assert [line["input"] for line in lines] == [str(tmp_path / "in" / n) for n in names]
    assert all(line["outcome"] == "ok" for line in lines)
    sizes = [(tmp_path / "enc" / f"{n}.cipher").stat().st_size for n in names]
    assert [line["output_size"] for line in lines] == sizes
    rc, _, err = cli(capsys, "decrypt", "-r", str(tmp_path / "enc"), "-o", str(tmp_path / "dec"), "-j", jobs)
    assert rc == 0, err
    assert all((tmp_path / "dec" / n).read_bytes() == n.encode() * 3 for n in names)


def test_one_folder_descriptor_per_batch(
    tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outputs of a batch are created through one open descriptor of their folder, not one each."""
    _tree(tmp_path / "in", {"a": BATCH + 1, "b": 3})
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: str, flags: int, *args: object, **kw: object) -> int:
        # An output folder, not an O_TMPFILE in one (os.open is patched for everyone: the KMS
        # store's opening lock on its home folder is not counted).
        if flags & os.O_DIRECTORY and not flags & os.O_WRONLY and os.fspath(path).startswith(str(tmp_path / "enc")):
            opened.append(os.fspath(path))
        return real_open(path, flags, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(_atomic.os, "open", counting_open)
    rc, _, err = cli(capsys, "encrypt", "-r", str(tmp_path / "in"), "-o", str(tmp_path / "enc"), "--key-id", key)
    assert rc == 0, err
    assert sorted(opened) == sorted([str(tmp_path / "enc" / "a")] * 2 + [str(tmp_path / "enc" / "b")])
    assert len(list((tmp_path / "enc").rglob("*.cipher"))) == BATCH + 4


def test_a_failure_inside_a_batch_is_that_file_s_alone(
    tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file that fails mid-batch (here: its output appeared meanwhile) fails alone; the files
    before and after it in the same batch land and are reported in order."""
    names = _tree(tmp_path / "in", {"a": 5})
    real = envelope.encrypt_file

    def racing(src: str, dst: str, **kw: object) -> int:
        if src.endswith("f0002"):
            Path(dst).write_bytes(b"someone else's")
        return real(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(envelope, "encrypt_file", racing)
    meta = tmp_path / "meta.jsonl"
    rc, _, err = cli(
        capsys,
        "encrypt", "-r", str(tmp_path / "in"), "-o", str(tmp_path / "enc"), "--key-id", key,
        "--metadata-output", str(meta),
    )  # fmt: skip
    assert rc == OutputError.exit_code
    assert "f0002" in err and "already exists" in err
    outcomes = [(Path(line["input"]).name, line["outcome"]) for line in json_lines(meta.read_text())]
    assert outcomes == [(Path(n).name, "failed" if n.endswith("f0002") else "ok") for n in names]
    assert (tmp_path / "enc" / "a" / "f0002.cipher").read_bytes() == b"someone else's"
    assert len(list((tmp_path / "enc" / "a").iterdir())) == 5


def test_an_interrupt_mid_batch_lands_and_reports_the_files_before_it(
    tmp_path: Path, key: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    names = _tree(tmp_path / "in", {"a": 6})
    real = envelope.encrypt_file

    def interrupted(src: str, dst: str, **kw: object) -> int:
        if src.endswith("f0003"):
            raise KeyboardInterrupt
        return real(src, dst, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(envelope, "encrypt_file", interrupted)
    meta = tmp_path / "meta.jsonl"
    rc, _, _ = cli(
        capsys,
        "encrypt", "-r", str(tmp_path / "in"), "-o", str(tmp_path / "enc"), "--key-id", key, "-j", "1",
        "--metadata-output", str(meta),
    )  # fmt: skip
    assert rc == 130
    reported = [Path(line["input"]).name for line in json_lines(meta.read_text())]
    assert reported == [Path(n).name for n in names[:3]]
    assert sorted(p.name for p in (tmp_path / "enc" / "a").iterdir()) == [f"f{i:04d}.cipher" for i in range(3)]


def test_run_tasks_batches_by_folder_and_size() -> None:
    """Consecutive tasks of one output folder share a batch, up to batch_size; skipped ones are
    reported without running; the exit code follows the failures."""
    seen: list[list[str]] = []

    def runner(batch: list[cli_files.Task]) -> cli_files._Outcomes:
        seen.append([t.input for t in batch])
        return cli_files._run_each(batch)

    def ok() -> dict[str, int]:
        return {}

    def bad() -> dict[str, int]:
        raise UsageError("no")

    tasks = [cli_files.Task(f"x{i}", f"out/x/{i}", ok) for i in range(5)]
    tasks += [cli_files.Task.skip("link", "symbolic link"), cli_files.Task("y0", "out/y/0", bad)]
    tasks += [cli_files.Task("y1", "out/y/1", ok), cli_files.Task("z0", "out/z/0", ok)]
    rc = cli_files.run_tasks(
        tasks, meta=cli_files.MetadataWriter(None), operation="t", verb="done", jobs=2, batch_size=2, runner=runner
    )
    assert rc == UsageError.exit_code
    assert sorted(seen) == sorted([["x0", "x1"], ["x2", "x3"], ["x4"], ["y0", "y1"], ["z0"]])


def test_small_inputs_are_read_in_one_read(
    tmp_path: Path, kms: EmbeddedKms, key: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "small"
    src.write_bytes(os.urandom(5000))
    reads: list[int] = []
    real_read = os.read

    def counting_read(fd: int, n: int) -> bytes:
        reads.append(n)
        return real_read(fd, n)

    monkeypatch.setattr(envelope.os, "read", counting_read)
    envelope.encrypt_file(src, tmp_path / "small.cipher", kms=kms, key_id=key, threads=1)
    assert reads == [5001]
    reads.clear()
    envelope.decrypt_file(tmp_path / "small.cipher", tmp_path / "back", kms=kms, threads=1)
    assert len(reads) == 1
    assert (tmp_path / "back").read_bytes() == src.read_bytes()


def test_an_input_that_grew_since_its_fstat_is_read_as_a_stream(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the one read returns more than the size fstat gave, the input is read from its start
    as a stream instead (whole-file reading is only a shortcut)."""
    src = tmp_path / "growing"
    src.write_bytes(b"0123456789" * 10)
    real_fstat = os.fstat
    calls = 0

    def shrunk(fd: int) -> os.stat_result:
        nonlocal calls
        calls += 1
        st = real_fstat(fd)
        if calls > 1:
            return st
        fields = list(st)
        fields[6] = 40  # st_size, as it was a moment ago
        return os.stat_result(fields, {"st_blksize": st.st_blksize})

    monkeypatch.setattr(envelope.os, "fstat", shrunk)
    with envelope.open_input(src, whole=True) as (f, st):
        assert st.st_size == 40
        assert f.read() == b"0123456789" * 10
    monkeypatch.undo()
    with pytest.raises(InputError, match="does not exist"), envelope.open_input(tmp_path / "nope", whole=True):
        pass


def test_large_inputs_get_a_batch_each() -> None:
    """Batches close by bytes too: files of a batch's worth of bytes each run side by side on
    several workers instead of one after another in one batch."""
    seen: list[list[str]] = []

    def runner(batch: list[cli_files.Task]) -> cli_files._Outcomes:
        seen.append([t.input for t in batch])
        return cli_files._run_each(batch)

    big = cli_files._BATCH_BYTES
    sizes = {"s0": 10, "s1": 10, "b0": big, "b1": big, "s2": 10, "b2": big + 1, "s3": 1}
    tasks = [cli_files.Task(name, f"out/{name}", dict, size=size) for name, size in sizes.items()]
    rc = cli_files.run_tasks(
        tasks,
        meta=cli_files.MetadataWriter(None),
        operation="t",
        verb="done",
        jobs=4,
        batch_size=64,
        batch_bytes=big,
        runner=runner,
    )
    assert rc == 0
    assert sorted(seen) == sorted([["s0", "s1", "b0"], ["b1"], ["s2", "b2"], ["s3"]])


def test_the_walk_reports_file_sizes(tmp_path: Path) -> None:
    from kmsenv import _tree

    _tree_files = {"a": 0, "sub/b": 5, "sub/c": 70_000}
    for name, size in _tree_files.items():
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "in" / name).write_bytes(b"x" * size)
    items = list(_tree.plan(str(tmp_path / "in"), str(tmp_path / "out"), decrypt=False))
    assert {os.path.relpath(i.input, tmp_path / "in"): i.size for i in items} == _tree_files


@pytest.mark.parametrize(
    ("soft", "jobs", "expected"),
    [(20_000, 2, 4 * BATCH), (20_000, 4, 8 * BATCH), (1024, 256, 512), (256, 4, 128), (10, 4, BATCH)],
)
def test_files_in_flight_stay_within_the_descriptor_limit(
    monkeypatch: pytest.MonkeyPatch, soft: int, jobs: int, expected: int
) -> None:
    """Two batches per worker, but never more files in flight (each may hold an open output)
    than half the process's descriptor limit, and at least one batch."""
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda _which: (soft, resource.RLIM_INFINITY))
    assert cli_files._window(jobs) == expected
