"""Crash safety of the in-place rewrap of v2 files: ``kill -9`` during ``kmsenv rewrap``.

``tests/test_crash_matrix.py`` kills ``rewrap`` too, but only checks that the file decrypts
afterwards; it does not check that the rewrap took the in-place path (docs/format.md §5.1,
§9.10: the new wrapped keys are written into the header's spare slot, fsynced, and for a removal
the old slot is overwritten after that). This file does, for adding a key and for removing one.
Each trial copies a v2 file (what ``encrypt`` writes), runs the real CLI as a subprocess and
SIGKILLs it after a random delay (half the trials in [0, 1.2 × its uninterrupted run time], half
in [0.7, 1.05] × that, where the slots are written), then checks:

* the file is the same inode (the in-place path never replaces it) and no other file exists in
  its folder (no temporary file: the in-place path makes none);
* its header has the same size and every payload byte is unchanged;
* its wrapped keys are exactly the old key set or exactly the new one, and the file decrypts to
  the original plaintext with *each* key of that set alone;
* after a removal that completed, the removed key's blob is nowhere in the file; after a kill
  between the two slot writes the new set is selected and the old slot still holds the removed
  key (counted as "new, old slot not yet purged": the documented order of writes).

Trials per operation: ``KMSENV_CRASH_TRIALS`` (default 6, as the matrix); seed
``KMSENV_CRASH_SEED``. Each test prints its tally.
"""

from __future__ import annotations

import hashlib
import io
import os
import random
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kms_helpers import run_kmsenv_or_kill
from kmsenv import envelope
from kmsenv import format as fmt
from kmsenv.clients import EmbeddedKms
from kmsenv.kms.check import check_store
from kmsenv.kms.service import open_service

pytestmark = pytest.mark.slow

TRIALS = int(os.environ.get("KMSENV_CRASH_TRIALS", "6"))
SIZE = 1024 * 1024 + 123


@dataclass
class World:
    home: Path
    plain_sha: str
    first: str  # key ids
    second: str
    one_key: bytes  # a v2 file wrapped under ``first``
    two_keys: bytes  # a v2 file wrapped under ``first`` and ``second``


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("crash-rewrap")
    home = base / "home"
    service = open_service(home, announce=False)
    first = str(service.create_key()["KeyMetadata"]["KeyId"])
    second = str(service.create_key()["KeyMetadata"]["KeyId"])
    kms = EmbeddedKms(service=service)
    plain = base / "plain.bin"
    plain.write_bytes(os.urandom(SIZE))
    one, two = base / "one.cipher", base / "two.cipher"
    envelope.encrypt_file(plain, one, kms=kms, key_id=first, chunk_size=64 * 1024)
    envelope.encrypt_file(plain, two, kms=kms, key_id=[first, second], chunk_size=64 * 1024)
    service.close()
    world = World(home, _sha(plain.read_bytes()), first, second, one.read_bytes(), two.read_bytes())
    for data in (world.one_key, world.two_keys):
        assert fmt.read_header(io.BytesIO(data)).version == 2  # encrypt writes v2 by default
    yield world


def _key_set(header: fmt.Header) -> frozenset[str]:
    return frozenset(envelope.key_ref_of_arn(s.key_arn) for s in header.stanzas)


def _blob_of(data: bytes, key_id: str) -> bytes:
    header = fmt.read_header(io.BytesIO(data))
    (blob,) = [s.ciphertext_blob for s in header.stanzas if envelope.key_ref_of_arn(s.key_arn) == key_id]
    return blob


def _check(world: World, d: Path, ino: int, original: bytes, *, old: frozenset[str], new: frozenset[str]) -> str:
    target = d / "file.cipher"
    assert sorted(p.name for p in d.iterdir()) == ["file.cipher"]  # no temporary file, nothing else
    assert target.stat().st_ino == ino  # changed in place, never replaced
    data = target.read_bytes()
    before = fmt.read_header(io.BytesIO(original))
    after = fmt.read_header(io.BytesIO(data))
    assert (after.version, after.size, after.slot_size) == (2, before.size, before.slot_size)
    assert data[after.size :] == original[before.size :]  # payload bytes unchanged
    keys = _key_set(after)
    assert keys in (old, new), keys
    kms = EmbeddedKms(world.home)
    try:
        for key_id in sorted(keys):  # opens with each key of the set alone
            out = d.parent / f"verify-{random.getrandbits(32):08x}"
            envelope.decrypt_file(target, out, kms=kms, key_ids=[key_id])
            assert _sha(out.read_bytes()) == world.plain_sha
            out.unlink()
    finally:
        kms.close()
    if keys == old:
        return "old" if data == original else "old, spare slot written"
    removed = old - new
    if removed and any(_blob_of(original, k) in data for k in removed):
        return "new, old slot not yet purged"
    return "new"


def _trials(
    name: str, world: World, tmp: Path, original: bytes, *, args: list[str], new: frozenset[str]
) -> Counter[str]:
    old = _key_set(fmt.read_header(io.BytesIO(original)))
    rng = random.Random(os.environ.get("KMSENV_CRASH_SEED", name))

    def prepare(d: Path) -> tuple[list[str], int]:
        d.mkdir()
        target = d / "file.cipher"
        target.write_bytes(original)
        return [*args, str(target)], target.stat().st_ino

    full = 0.0
    for n in range(2):  # the slower of two uninterrupted runs
        d = tmp / f"timing{n}"
        argv, ino = prepare(d)
        started = time.perf_counter()
        assert run_kmsenv_or_kill(argv, world.home, None) == 0
        full = max(full, time.perf_counter() - started)
        assert _check(world, d, ino, original, old=old, new=new) == "new"  # complete, in place, purged
    tally: Counter[str] = Counter()
    for trial in range(TRIALS):
        d = tmp / f"t{trial}"
        argv, ino = prepare(d)
        # Half the trials anywhere in the run; half in its last part, where the slots are written
        # (most of a run is Python start-up and opening the KMS).
        delay = rng.uniform(0, 1.2 * full) if trial % 2 else rng.uniform(0.7 * full, 1.05 * full)
        rc = run_kmsenv_or_kill(argv, world.home, delay)
        outcome = _check(world, d, ino, original, old=old, new=new)
        assert rc is None or outcome == "new"  # a run that finished finished the job
        tally[outcome] += 1
    report = check_store(world.home)
    assert report.ok, report.problems
    print(f"\n{name}: {TRIALS} trials, full run {full:.2f} s: {dict(tally)}")
    return tally


def test_kill_during_in_place_add(world: World, tmp_path: Path) -> None:
    new = frozenset({world.first, world.second})
    args = ["rewrap", "--key-id", world.second]
    _trials("rewrap add (in place)", world, tmp_path, world.one_key, args=args, new=new)


def test_kill_during_in_place_remove(world: World, tmp_path: Path) -> None:
    new = frozenset({world.first})
    args = ["rewrap", "--remove-key-id", world.second]
    _trials("rewrap remove (in place)", world, tmp_path, world.two_keys, args=args, new=new)
