"""Folder trees for ``encrypt -r`` / ``decrypt -r``: which files, where their outputs go, what is skipped.

This module owns the walk and the name mapping, nothing cryptographic:

* the walk never follows a symbolic link (below the folder named on the command line), so a link
  loop or a link out of the tree cannot make it wander; links are reported as skipped, and so
  are devices, FIFOs and sockets (reading a FIFO could block forever);
* a folder that cannot be listed is reported as a failure of its own and the walk goes on;
* the output tree mirrors the input tree: ``encrypt`` adds ``.cipher`` to every file name,
  ``decrypt`` takes it off (files without it are skipped);
* an output folder inside the input folder is refused before anything is done (the walk would
  otherwise meet its own outputs), and so is any single output that would land inside the input.

The walk is lazy (a generator, folders listed one at a time, entries sorted by name), so a tree
of millions of files is never held in memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

from kmsenv.errors import InputError, KmsenvError, OutputError, UsageError

__all__ = ["CIPHER_SUFFIX", "TreeItem", "check_roots", "plan"]

CIPHER_SUFFIX = ".cipher"


@dataclass(frozen=True, slots=True)
class TreeItem:
    """One entry of a folder run: a file to process (``output`` set), or one skipped or failed.

    ``size``: the file's size when the walk saw it (only a hint, for sharing out the work).
    """

    input: str
    output: str | None = None
    skipped: str | None = None
    error: KmsenvError | None = None
    size: int = 0


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_roots(src_dir: str, out_dir: str) -> tuple[str, str]:
    """Validate the two folders of a ``-r`` run; return their real paths.

    InputError: the input is missing or not a folder. UsageError: the output is the input or
    inside it. OutputError: the output exists and is not a folder. The output folder is created
    later, when the first file is written.
    """
    if not os.path.isdir(src_dir):
        what = "does not exist" if not os.path.lexists(src_dir) else "is not a folder"
        raise InputError(f"the input {src_dir} {what}", hint="-r takes a folder; without -r, one file")
    src_real = os.path.realpath(src_dir)
    out_real = os.path.realpath(out_dir)
    if _inside(out_real, src_real):
        raise UsageError(
            f"the output folder {out_dir} is inside the input folder {src_dir}",
            hint="choose an output folder outside the input tree",
        )
    if os.path.lexists(out_dir) and not os.path.isdir(out_dir):
        raise OutputError(f"the output {out_dir} exists and is not a folder")
    return src_real, out_real


def _walk(root: str) -> Iterator[tuple[str, str, str | None, KmsenvError | None, int]]:
    """(path, relative path, skip reason, error, size) for every non-folder entry below ``root``."""
    stack = [(root, "")]
    while stack:
        folder, rel = stack.pop()
        try:
            with os.scandir(folder) as listing:
                entries = sorted(listing, key=lambda e: e.name)
        except OSError as exc:
            yield folder, rel, None, InputError(f"cannot read the folder {folder}: {exc.strerror or exc}"), 0
            continue
        subfolders: list[tuple[str, str]] = []
        for entry in entries:
            path, relative = entry.path, os.path.join(rel, entry.name)
            try:
                if entry.is_symlink():
                    yield path, relative, "symbolic link (not followed)", None, 0
                elif entry.is_dir(follow_symlinks=False):
                    subfolders.append((path, relative))
                elif entry.is_file(follow_symlinks=False):
                    # The size (an lstat) lets the run give large files a worker each.
                    yield path, relative, None, None, entry.stat(follow_symlinks=False).st_size
                else:
                    yield path, relative, "not a regular file (device, FIFO or socket)", None, 0
            except OSError as exc:
                yield path, relative, None, InputError(f"cannot examine {path}: {exc.strerror or exc}"), 0
        stack.extend(reversed(subfolders))  # depth first, in name order


def plan(src_dir: str, out_dir: str, *, decrypt: bool) -> Iterator[TreeItem]:
    """Every file below ``src_dir`` with its output below ``out_dir`` (see the module docstring).

    Call :func:`check_roots` first; this does not create anything.
    """
    src_real = os.path.realpath(src_dir)
    # The walk yields a folder's files together, so one resolved output folder serves them all
    # (os.path.realpath costs an lstat per path component: per file, that was ~10 % of a run).
    folder, folder_real = "", ""
    for path, relative, skipped, error, size in _walk(src_dir):
        if skipped is not None or error is not None:
            yield TreeItem(path, skipped=skipped, error=error)
            continue
        if not decrypt:
            target = relative + CIPHER_SUFFIX
        elif relative.endswith(CIPHER_SUFFIX) and len(os.path.basename(relative)) > len(CIPHER_SUFFIX):
            target = relative[: -len(CIPHER_SUFFIX)]
        else:
            yield TreeItem(path, skipped=f"no {CIPHER_SUFFIX} suffix")
            continue
        output = os.path.join(out_dir, target)
        head, name = os.path.split(output)
        if head != folder:
            folder, folder_real = head, os.path.realpath(head)
        # The last component is joined, not resolved: an output name that is already a symbolic
        # link is never written through (the writer links or renames onto the name itself, and
        # without --force an existing name fails that file), so only its folder must be real.
        if _inside(os.path.join(folder_real, name), src_real):
            # Possible when the input folder is inside the output folder: never write into the
            # tree being read.
            yield TreeItem(path, error=UsageError(f"the output {output} would be inside the input folder"))
            continue
        yield TreeItem(path, output, size=size)
