"""Several real processes using one KMS home at once, including the first-use creation race.

Workers wait on a "go" file after importing, so they hit the home at (nearly) the same moment."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kms_helpers import kmsenv_env
from kmsenv.kms.service import open_service

pytestmark = pytest.mark.slow

WORKER = r"""
import json, os, sys, time
from datetime import datetime
from kmsenv.errors import KmsError
from kmsenv.kms.actions import dispatch
from kmsenv.kms.service import open_service

home, go, me, mode = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
while not os.path.exists(go):
    time.sleep(0.002)
clock_arg = sys.argv[5] if len(sys.argv) > 5 else None
kwargs = {"clock": (lambda: datetime.fromisoformat(clock_arg))} if clock_arg else {}
svc = open_service(__import__("pathlib").Path(home), **kwargs)
out = {"keys": [], "pairs": [], "won": False}
if mode == "work":
    for _ in range(4):
        key = dispatch(svc, "CreateKey", {"Description": f"worker {me}"})["KeyMetadata"]["KeyId"]
        out["keys"].append(key)
        dispatch(svc, "CreateAlias", {"AliasName": f"alias/worker/{me}/{key[:8]}", "KeyId": key})
    try:
        dispatch(svc, "CreateAlias", {"AliasName": "alias/shared", "KeyId": out["keys"][0]})
        out["won"] = True
    except KmsError as exc:
        assert exc.code == "AliasAlreadyExists", exc
    for i in range(6):
        ctx = json.dumps({"worker": str(me), "i": str(i)})
        r = dispatch(svc, "GenerateDataKey", {"KeyId": "alias/shared", "EncryptionContext": ctx})
        back = dispatch(svc, "Decrypt", {"CiphertextBlob": r["CiphertextBlob"], "EncryptionContext": ctx})
        assert back["Plaintext"] == r["Plaintext"]
        out["pairs"].append([r["CiphertextBlob"], ctx, r["Plaintext"]])
else:
    dispatch(svc, "ListKeys", {})
svc.close()
print(json.dumps(out))
"""


def run_workers(tmp_path: Path, home: Path, count: int, mode: str, *extra: str) -> list[tuple[dict[str, Any], str]]:
    go = tmp_path / "go"
    env = kmsenv_env(home)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(home), str(go), str(i), mode, *extra],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(count)
    ]
    time.sleep(0.3)  # let every worker import and reach the barrier
    go.touch()
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert "Traceback" not in err
        results.append((json.loads(out), err))
    go.unlink()
    return results


def test_many_processes_on_a_brand_new_home(tmp_path: Path) -> None:
    home = tmp_path / "new-home"
    results = run_workers(tmp_path, home, 8, "work")
    outputs = [out for out, _ in results]
    notices = [err for _, err in results if err]
    assert len(notices) == 1 and "created a new embedded KMS" in notices[0]  # one creator, one notice
    assert sum(out["won"] for out in outputs) == 1  # exactly one winner for the same alias name
    winner = next(out for out in outputs if out["won"])

    svc = open_service(home, announce=False)
    try:
        listed = svc.list_keys(page_size=100)
        created = {key for out in outputs for key in out["keys"]}
        assert len(created) == 32
        assert {k["KeyId"] for k in listed["Keys"]["Key"]} == created and listed["TotalCount"] == 32
        assert svc.describe_key(key_id="alias/shared")["KeyMetadata"]["KeyId"] == winner["keys"][0]
        assert svc.list_aliases(page_size=100)["TotalCount"] == 33
        pairs = [pair for out in outputs for pair in out["pairs"]]
        assert len(pairs) == 48
        for blob, context, plaintext in pairs:  # every blob made by any process decrypts here
            assert svc.decrypt(ciphertext_blob=blob, encryption_context=context)["Plaintext"] == plaintext
    finally:
        svc.close()
    assert sorted(p.name for p in home.iterdir() if not p.name.startswith("kms.db-")) == ["kms.db", "root.key"]


def test_due_rotation_happens_once_when_many_processes_find_it_due(tmp_path: Path) -> None:
    home = tmp_path / "home"
    created = datetime(2026, 1, 1, tzinfo=UTC)
    svc = open_service(home, clock=lambda: created, announce=False)
    try:
        key = svc.create_key(enable_automatic_rotation=True, rotation_interval="7d")["KeyMetadata"]["KeyId"]
    finally:
        svc.close()
    run_workers(tmp_path, home, 6, "list", "2026-01-09T00:00:00+00:00")
    svc = open_service(home, clock=lambda: datetime(2026, 1, 9, tzinfo=UTC), announce=False)
    try:
        assert svc.list_key_versions(key_id=key)["TotalCount"] == 2
    finally:
        svc.close()


def test_parallel_cli_commands_on_a_new_home(tmp_path: Path) -> None:
    home = tmp_path / "cli-home"
    env = kmsenv_env(home)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "kmsenv", "kms", "CreateKey", "--Description", f"cli {i}"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(6)
    ]
    outputs = [(*proc.communicate(timeout=60), proc.returncode) for proc in procs]
    assert all(rc == 0 for _, _, rc in outputs), outputs
    assert sum(1 for _, err, _ in outputs if err) == 1
    created = {json.loads(out)["KeyMetadata"]["KeyId"] for out, _, _ in outputs}
    svc = open_service(home, announce=False)
    try:
        assert {k["KeyId"] for k in svc.list_keys(page_size=100)["Keys"]["Key"]} == created
        assert len(created) == 6
    finally:
        svc.close()


def test_first_use_race_never_exposes_a_half_written_root_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The creator of a new home is paused in the middle of writing root.key; a second opener
    arriving then must not read an empty/partial key file (and fail), but end up with the same key."""
    import os
    import threading

    home = tmp_path / "racy"
    paused, release = threading.Event(), threading.Event()
    real_write = os.write

    def slow_write(fd: int, data: bytes) -> int:
        if threading.current_thread().name == "creator" and data.startswith(b"kmsenv-root-key"):
            paused.set()
            release.wait(10)
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", slow_write)
    results: dict[str, object] = {}

    def open_and_encrypt(name: str) -> None:
        try:
            svc = open_service(home, announce=False)
            try:
                key = svc.create_key()["KeyMetadata"]["KeyId"]
                results[name] = svc.encrypt(key_id=key, plaintext=name)["CiphertextBlob"]
            finally:
                svc.close()
        except Exception as exc:
            results[name] = exc

    creator = threading.Thread(target=open_and_encrypt, args=("creator",), name="creator")
    creator.start()
    assert paused.wait(10)
    second = threading.Thread(target=open_and_encrypt, args=("second",), name="second")
    second.start()
    second.join(2)  # it must not fail while the creator is paused (it may wait, or win the race)
    release.set()
    creator.join(10)
    second.join(10)
    assert all(isinstance(r, str) for r in results.values()), results
    svc = open_service(home, announce=False)
    try:
        for name in ("creator", "second"):
            assert svc.decrypt(ciphertext_blob=str(results[name]))["Plaintext"] == name
    finally:
        svc.close()


OPENERS = r"""
import os, shutil, sys, time
from pathlib import Path
from kmsenv.kms.nonces import NonceStore
from kmsenv.kms.store import SqliteStore

base, rounds, width, which = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
opener = {"store": lambda folder: SqliteStore(folder / "kms.db"), "nonces": lambda f: NonceStore(f / "nonces.db")}
failed = 0
for n in range(rounds):
    folder = base / f"home-{n}"
    folder.mkdir()
    r, w = os.pipe()
    pids = []
    for _ in range(width):
        pid = os.fork()
        if pid == 0:  # wait for the pipe to close, then open the same new store as the others
            os.close(w)
            os.read(r, 1)
            try:
                opener[which](folder).close()
            except Exception as exc:
                print(type(exc).__name__, exc, file=sys.stderr, flush=True)
                os._exit(1)
            os._exit(0)
        pids.append(pid)
    os.close(r)
    time.sleep(0.02)
    os.close(w)
    failed += sum(1 for pid in pids if os.waitpid(pid, 0)[1] != 0)
    shutil.rmtree(folder)
print(failed)
"""


@pytest.mark.parametrize("which", ["store", "nonces"])
def test_processes_opening_one_new_store_at_the_same_instant_all_succeed(tmp_path: Path, which: str) -> None:
    """Released by one pipe close, 8 processes open the same brand-new SQLite file, 40 times over:
    the KMS store (``kmsenv`` commands on a new home) and the nonce store (server workers
    starting together).

    Without the opening locks (kms/store.py ``_opening``, the gate in kms/nonces.py) 13 of 320
    store openings (this test) and 15 of 800 nonce-store openings failed with "database is
    locked": the file is in rollback-journal mode until one of them switches it to WAL, and
    SQLite refuses a possibly deadlocking lock upgrade there at once.
    """
    proc = subprocess.run(
        [sys.executable, "-c", OPENERS, str(tmp_path), "40", "8", which],
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout) == 0, proc.stderr
