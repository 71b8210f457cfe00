"""_tree.plan: the output-inside-input check per output folder (resolved once per folder)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kmsenv import _tree
from kmsenv.errors import UsageError


def _files(root: Path, names: list[str]) -> None:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"x")


def test_an_output_subfolder_that_links_into_the_input_is_refused_file_by_file(tmp_path: Path) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _files(src, ["a", "sub/b", "sub/c", "z"])
    out.mkdir()
    (out / "sub").symlink_to(src)  # out/sub/b.cipher would land in src/b.cipher
    items = {os.path.relpath(i.input, src): i for i in _tree.plan(str(src), str(out), decrypt=False)}
    assert sorted(items) == ["a", "sub/b", "sub/c", "z"]
    for name in ("sub/b", "sub/c"):
        assert isinstance(items[name].error, UsageError) and items[name].output is None
    assert items["a"].output == str(out / "a.cipher") and items["a"].error is None
    assert items["z"].output == str(out / "z.cipher") and items["z"].error is None


def test_decrypt_output_equal_to_the_input_folder_is_refused(tmp_path: Path) -> None:
    # src is out/d; its file d.cipher would decrypt to out/d, the input folder itself.
    out = tmp_path / "out"
    src = out / "d"
    _files(src, ["d.cipher", "e.cipher"])
    items = {os.path.basename(i.input): i for i in _tree.plan(str(src), str(out), decrypt=True)}
    assert isinstance(items["d.cipher"].error, UsageError)
    assert items["e.cipher"].output == str(out / "e") and items["e.cipher"].error is None


def test_each_output_folder_is_resolved_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src, out = tmp_path / "src", tmp_path / "out"
    _files(src, [f"d{i}/f{j}" for i in range(3) for j in range(10)])
    calls: list[str] = []
    real = os.path.realpath

    def counting(path: str) -> str:
        calls.append(path)
        return real(path)

    monkeypatch.setattr(os.path, "realpath", counting)
    items = list(_tree.plan(str(src), str(out), decrypt=False))
    assert len(items) == 30 and all(i.output and i.error is None for i in items)
    assert len(calls) == 1 + 3  # the input root, then one per output folder
