"""Crash-safety matrix: ``kill -9`` at random moments during every command that writes.

For each operation, many trials: run the real CLI as a subprocess, SIGKILL it after a random delay
drawn from [0, 1.2 × its uninterrupted run time] (so kills land in start-up, mid-work and around the
commit), then check the invariants of docs/security.md, "Crash safety":

* the target path holds nothing, or the complete, correct result (it decrypts/verifies);
* no temporary file survives (except the one documented window, counted and checked complete);
* the source is intact (same bytes);
* the KMS store passes ``kmsenv store check`` (:func:`kmsenv.kms.check.check_store`).

Trials per operation: ``KMSENV_CRASH_TRIALS`` (default 6, keeping the set within ~60 s on CI; the
longer run of docs/security.md used 40). Each test prints its tally (nothing / complete outcomes).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from kms_helpers import run_kmsenv_or_kill
from kmsenv import envelope
from kmsenv._atomic import TEMP_SUFFIX
from kmsenv.clients import EmbeddedKms
from kmsenv.kms.check import check_store
from kmsenv.kms.service import open_service

pytestmark = pytest.mark.slow

TRIALS = int(os.environ.get("KMSENV_CRASH_TRIALS", "6"))
SIZE = 3 * 1024 * 1024
ALIAS = "alias/Crash/Key"


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(folder: Path, expected: set[str]) -> list[str]:
    """Entries of ``folder`` (recursively) that are neither expected nor a store file."""
    found = []
    for p in folder.rglob("*"):
        rel = str(p.relative_to(folder))
        if rel not in expected and not p.is_dir():
            found.append(rel)
    return sorted(found)


@dataclass
class World:
    home: Path
    plain: Path
    cipher: Path
    legacy: Path
    export: Path
    digest: str
    key_id: str

    def kms(self) -> EmbeddedKms:
        return EmbeddedKms(self.home)

    def decrypts_to_plain(self, cipher: Path, tmp: Path) -> bool:
        out = tmp / f"verify-{random.getrandbits(32):08x}"
        kms = self.kms()
        try:
            envelope.decrypt_file(cipher, out, kms=kms)
            return _sha(out) == self.digest
        finally:
            kms.service.close()
            out.unlink(missing_ok=True)

    def assert_store_sound(self, home: Path | None = None) -> None:
        report = check_store(home or self.home)
        assert report.ok, report.problems


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    base = tmp_path_factory.mktemp("crash")
    home = base / "home"
    old = os.environ.get("KMSENV_HOME")
    service = open_service(home, announce=False)
    key_id = service.create_key()["KeyMetadata"]["KeyId"]
    service.create_alias(alias_name=ALIAS, key_id=key_id)
    kms = EmbeddedKms(service=service)
    plain = base / "plain.bin"
    plain.write_bytes(os.urandom(SIZE))
    cipher = base / "plain.bin.cipher"
    envelope.encrypt_file(plain, cipher, kms=kms, key_id=ALIAS, chunk_size=64 * 1024)
    # A legacy file as the reference sample writes it.
    from files_helpers import KmsGenerateDataKey, LocalEncrypt

    legacy = base / "legacy.txt"
    data_key, blob = KmsGenerateDataKey(kms, ALIAS)
    LocalEncrypt(data_key, blob, plain, legacy)
    service.close()
    export = base / "export.json"
    from kmsenv.kms.store_io import export_store

    export_store(home, export)
    yield World(home, plain, cipher, legacy, export, _sha(plain), key_id)
    if old is not None:
        os.environ["KMSENV_HOME"] = old


def _matrix(
    name: str,
    world: World,
    tmp: Path,
    prepare: Callable[[Path], list[str]],
    check: Callable[[Path, int | None], str],
    *,
    env: Callable[[Path], dict[str, str]] | None = None,
) -> Counter[str]:
    """``prepare(trial_dir)`` returns the CLI arguments; ``check(trial_dir, rc)`` the outcome name."""
    rng = random.Random(os.environ.get("KMSENV_CRASH_SEED", name))
    full = 0.0
    for n in range(2):  # the slower of two uninterrupted runs: one can be lucky on a busy machine
        timing = tmp / f"timing{n}"
        timing.mkdir()
        started = time.perf_counter()
        rc = run_kmsenv_or_kill(prepare(timing), world.home, None, **(env(timing) if env else {}))
        full = max(full, time.perf_counter() - started)
        assert rc == 0, f"{name}: the uninterrupted run failed ({rc})"
        check(timing, rc)
    tally: Counter[str] = Counter()
    for trial in range(TRIALS):
        where = tmp / f"t{trial}"
        where.mkdir()
        args = prepare(where)
        rc = run_kmsenv_or_kill(args, world.home, rng.uniform(0, 1.2 * full), **(env(where) if env else {}))
        tally[check(where, rc)] += 1
    world.assert_store_sound()
    print(f"\n{name}: {TRIALS} trials, full run {full:.2f} s: {dict(tally)}")
    return tally


# ---------------------------------------------------------------------------------------- files --
def _cipher_outcome(world: World, d: Path, rc: int | None, source: Path, source_sha: str) -> str:
    """``d/out.cipher`` is absent (and the run was killed) or decrypts to the plaintext; the
    source is unchanged; nothing else is in ``d``."""
    assert _sha(source) == source_sha
    assert _leftovers(d, {"out.cipher"}) == []
    out = d / "out.cipher"
    if not out.exists():
        assert rc is None
        return "nothing"
    assert world.decrypts_to_plain(out, d.parent)
    return "complete"


def test_encrypt(world: World, tmp_path: Path) -> None:
    def prepare(d: Path) -> list[str]:
        return ["encrypt", "--key-id", ALIAS, "--chunk-size", "65536", str(world.plain), "-o", str(d / "out.cipher")]

    def check(d: Path, rc: int | None) -> str:
        return _cipher_outcome(world, d, rc, world.plain, world.digest)

    _matrix("encrypt", world, tmp_path, prepare, check)


def test_decrypt(world: World, tmp_path: Path) -> None:
    before = _sha(world.cipher)

    def prepare(d: Path) -> list[str]:
        return ["decrypt", str(world.cipher), "-o", str(d / "out")]

    def check(d: Path, rc: int | None) -> str:
        assert _sha(world.cipher) == before
        assert _leftovers(d, {"out"}) == []
        out = d / "out"
        if not out.exists():
            assert rc is None
            return "nothing"
        assert _sha(out) == world.digest
        assert out.stat().st_mode & 0o777 == 0o600
        return "complete"

    _matrix("decrypt", world, tmp_path, prepare, check)


def test_folder_encrypt(world: World, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    files = {f"f{i}.bin": os.urandom(256 * 1024) for i in range(4)} | {"sub/g.bin": os.urandom(512 * 1024)}
    for rel, data in files.items():
        (tree / rel).write_bytes(data)

    def prepare(d: Path) -> list[str]:
        return ["encrypt", "-r", "--key-id", ALIAS, "--chunk-size", "65536", str(tree), "-o", str(d / "out")]

    def check(d: Path, rc: int | None) -> str:
        expected = {f"{rel}.cipher" for rel in files}
        out = d / "out"
        present = set()
        if out.exists():
            assert _leftovers(out, expected) == []
            present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
        for rel, data in files.items():
            assert (tree / rel).read_bytes() == data
            if f"{rel}.cipher" in present:
                plain = d / "check.bin"
                kms = world.kms()
                try:
                    envelope.decrypt_file(out / f"{rel}.cipher", plain, kms=kms)
                finally:
                    kms.service.close()
                assert plain.read_bytes() == data
                plain.unlink()
        if rc is None:
            return "complete" if present == expected else ("nothing" if not present else "some files")
        assert rc == 0 and present == expected
        return "complete"

    _matrix("folder encrypt", world, tmp_path, prepare, check)


def test_rewrap(world: World, tmp_path: Path) -> None:
    """In place: the file is the old one, byte for byte, or a new one that decrypts the same."""
    service = open_service(world.home, announce=False)
    second = service.create_key()["KeyMetadata"]["KeyId"]
    service.close()
    original = world.cipher.read_bytes()
    windows = 0

    def prepare(d: Path) -> list[str]:
        target = d / "file.cipher"
        target.write_bytes(original)
        return ["rewrap", "--key-id", second, str(target)]

    def check(d: Path, rc: int | None) -> str:
        nonlocal windows
        target = d / "file.cipher"
        extra = _leftovers(d, {"file.cipher"})
        # The documented window (_atomic.py, force path): the complete new file linked under its
        # temporary name, not yet renamed. It must be complete and valid, never partial.
        for name in extra:
            assert name.startswith(".file.cipher.") and name.endswith(TEMP_SUFFIX), extra
            assert world.decrypts_to_plain(d / name, d.parent)
            windows += 1
        data = target.read_bytes()
        if data == original:
            assert rc is None
            return "old"
        assert world.decrypts_to_plain(target, d.parent)
        return "new"

    tally = _matrix("rewrap", world, tmp_path, prepare, check)
    print(f"rewrap: temporary file left in the link-then-rename window: {windows} of {sum(tally.values())}")


def test_legacy_migrate(world: World, tmp_path: Path) -> None:
    before = _sha(world.legacy)

    def prepare(d: Path) -> list[str]:
        return ["migrate", str(world.legacy), "-o", str(d / "out.cipher")]

    def check(d: Path, rc: int | None) -> str:
        return _cipher_outcome(world, d, rc, world.legacy, before)

    _matrix("migrate", world, tmp_path, prepare, check)


# ------------------------------------------------------------------------------------ the store --
def _versions(home: Path, key_id: str) -> int:
    service = open_service(home, announce=False)
    try:
        return int(service.list_key_versions(key_id=key_id, page_size=100)["TotalCount"])
    finally:
        service.close()


def test_key_rotation(world: World, tmp_path: Path) -> None:
    """CreateKeyVersion killed: zero or one new version, the store sound, old files still open."""
    count = [_versions(world.home, world.key_id)]

    def prepare(d: Path) -> list[str]:
        count[0] = _versions(world.home, world.key_id)
        return ["kms", "CreateKeyVersion", "--KeyId", world.key_id]

    def check(d: Path, rc: int | None) -> str:
        now = _versions(world.home, world.key_id)
        assert now in (count[0], count[0] + 1)
        world.assert_store_sound()
        assert world.decrypts_to_plain(world.cipher, d)
        return "rotated" if now == count[0] + 1 else "nothing"

    _matrix("key rotation", world, tmp_path, prepare, check)


def test_store_import(world: World, tmp_path: Path) -> None:
    """Import killed: the target store is empty (and a re-run imports) or complete and sound."""
    root_key = str(world.home / "root.key")

    def prepare(d: Path) -> list[str]:
        return ["store", "import", str(world.export)]

    def env(d: Path) -> dict[str, str]:
        return {"KMSENV_HOME": str(d / "home"), "KMSENV_ROOT_KEY_FILE": root_key}

    def keys_in(home: Path) -> int:
        service = open_service(home, announce=False)
        try:
            return int(service.list_keys(page_size=100)["TotalCount"])
        finally:
            service.close()

    expected = len(json.loads(world.export.read_text())["keys"])

    def check(d: Path, rc: int | None) -> str:
        home = d / "home"
        # kms.db-journal: SQLite's own rollback journal, left when the kill lands while the new
        # store is created (before WAL mode is on); the next open rolls it back (checked below).
        store_files = {"home/kms.db", "home/kms.db-wal", "home/kms.db-shm", "home/kms.db-journal"}
        assert _leftovers(d, store_files) == []
        db = home / "kms.db"
        os.environ["KMSENV_ROOT_KEY_FILE"] = root_key
        try:
            if db.exists() and check_store(home).ok:
                assert keys_in(home) == expected
                return "complete"
            assert rc is None
            # Nothing usable was written: the import can simply be run again.
            assert run_kmsenv_or_kill(prepare(d), world.home, None, **env(d)) == 0
            assert check_store(home).ok and keys_in(home) == expected
            return "nothing"
        finally:
            del os.environ["KMSENV_ROOT_KEY_FILE"]
            shutil.rmtree(home, ignore_errors=True)

    _matrix("store import", world, tmp_path, prepare, check, env=env)


# ------------------------------------------------------------------------- schema migration --
def _schema_v1_sqlite(home: Path) -> None:
    """Turn the store in ``home`` back into what schema version 1 left (no AccessKey table)."""
    import sqlite3

    conn = sqlite3.connect(home / "kms.db", isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("DROP TABLE access_keys")
        conn.execute("UPDATE meta SET value = '1' WHERE name = 'schema_version'")
        conn.execute("COMMIT")
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _keys_in(home: Path, store: str | None = None) -> int:
    service = open_service(home, announce=False, store=store)
    try:
        return int(service.list_keys(page_size=100)["TotalCount"])
    finally:
        service.close()


def test_store_migrate_sqlite(world: World, tmp_path: Path) -> None:
    """`kmsenv store migrate` killed: schema version 1 (and a re-run migrates) or 2, never between."""
    from kmsenv.kms.store import SCHEMA_VERSION
    from kmsenv.kms.store_io import migrate_store, store_schema_version

    assert SCHEMA_VERSION == 2  # the trial downgrades to 1: revisit when the schema grows
    expected = _keys_in(world.home)

    def prepare(d: Path) -> list[str]:
        home = d / "home"
        home.mkdir(mode=0o700)
        shutil.copy2(world.home / "root.key", home / "root.key")
        shutil.copy2(world.home / "kms.db", home / "kms.db")
        _schema_v1_sqlite(home)
        return ["store", "migrate"]

    def env(d: Path) -> dict[str, str]:
        return {"KMSENV_HOME": str(d / "home")}

    def check(d: Path, rc: int | None) -> str:
        home = d / "home"
        _, version = store_schema_version(home)
        assert version in (1, 2)
        outcome = "migrated"
        if version == 1:
            assert rc is None
            assert migrate_store(home)[1:] == (1, 2)
            outcome = "version 1 (re-run migrated)"
        report = check_store(home)
        assert report.ok, report.problems
        assert _keys_in(home) == expected
        shutil.rmtree(home)
        return outcome

    _matrix("store migrate (SQLite)", world, tmp_path, prepare, check, env=env)


def test_store_migrate_postgresql(world: World, tmp_path: Path) -> None:
    """The same on PostgreSQL: the whole migration is one transaction (DDL included)."""
    import psycopg

    from kmsenv.kms.pg_store import migrate, read_schema_version
    from kmsenv.kms.store_io import import_store
    from pg_harness import cluster

    pg = cluster()
    urls: dict[Path, str] = {}
    os.environ["KMSENV_ROOT_KEY_FILE"] = str(world.home / "root.key")
    try:
        expected = len(json.loads(world.export.read_text())["keys"])

        def prepare(d: Path) -> list[str]:
            url = urls[d] = pg.create_database()
            import_store(world.home, world.export, store=url)
            with psycopg.connect(url) as conn:
                conn.execute("DROP TABLE access_keys")
                conn.execute("UPDATE meta SET value = '1' WHERE name = 'schema_version'")
            return ["store", "migrate", "--store", url]

        def check(d: Path, rc: int | None) -> str:
            url = urls[d]
            version = read_schema_version(url)
            assert version in (1, 2)
            outcome = "migrated"
            if version == 1:
                assert rc is None
                assert migrate(url) == (1, 2)
                outcome = "version 1 (re-run migrated)"
            report = check_store(world.home, store=url)
            assert report.ok, report.problems
            assert _keys_in(world.home, url) == expected
            return outcome

        _matrix("store migrate (PostgreSQL)", world, tmp_path, prepare, check)
    finally:
        del os.environ["KMSENV_ROOT_KEY_FILE"]


# ---------------------------------------------------------------------- a server under load --
def test_sqlite_server_under_load(world: World, tmp_path: Path) -> None:
    """``kill -9`` of a ``kmsenv server --workers 2`` (SQLite) at a random moment of signed load:
    every acknowledged CreateKey, CreateAlias, Encrypt and GenerateDataKey survives, the store
    passes ``kmsenv store check`` (audit chain included), and every answered request was audited."""
    from kmsenv.kms.access import AccessKeys
    from pg_harness import NO_RATE_LIMIT, Load, start_node

    rng = random.Random(os.environ.get("KMSENV_CRASH_SEED", "server"))
    tally: Counter[str] = Counter()
    for trial in range(TRIALS):
        root = tmp_path / f"t{trial}"
        home = root / "home"
        home.mkdir(parents=True, mode=0o700)
        shutil.copy2(world.home / "root.key", home / "root.key")
        shutil.copy2(world.home / "kms.db", home / "kms.db")
        service = open_service(home, announce=False)
        created = AccessKeys(service).create()
        service.close()
        node = start_node(root, "--workers", "2", *NO_RATE_LIMIT)
        load = Load([node], (created["AccessKeyId"], created["AccessKeySecret"]), world.key_id)
        try:
            time.sleep(rng.uniform(0.1, 1.5))
            node.kill()
        finally:
            ledger = load.stop()
            node.kill()
        service = open_service(home, announce=False)
        try:
            ledger.assert_acknowledged(service)
        finally:
            service.close()
        assert set(ledger.codes) <= {"OK"}, ledger.codes
        report = check_store(home)
        assert report.ok, report.problems
        answered = sum(ledger.codes.values())
        assert report.audit_records is not None and report.audit_records >= answered
        tally["acknowledged writes"] += len(ledger.keys) + len(ledger.aliases) + len(ledger.blobs)
        tally["requests cut off"] += ledger.no_answer
        tally["audit records"] += report.audit_records
    print(f"\nSQLite server kill -9 under load: {TRIALS} trials: {dict(tally)}")
