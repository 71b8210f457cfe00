"""Benchmark: many small files in one CLI run (`encrypt -r` / `decrypt -r`), embedded KMS.

One invocation, on N files of SIZE bytes (default 2,000 x 4 KiB) in a fresh KMS home, each variant
timed in every round (default 3; medians are reported, every run is kept in the JSON):
- `kmsenv encrypt -r` with the data-key cache (the default) and with `--no-cache`: files/s, and
  the number of GenerateDataKey calls, counted exactly as the number of distinct wrapped data
  keys in the outputs (each GenerateDataKey makes one; target with the cache: <= 5);
- `kmsenv decrypt -r` of the cached run's output: files/s (every file is checked against its
  input) and the KMS Decrypt calls it made (from its `-v` summary);
- the AWS Encryption SDK over the same tree, with a raw AES-256 wrapping key and its caching
  materials manager (no KMS calls at all), no fsync, one process: `stream()` encryption, `stream()`
  decryption of its own outputs (the issue's reference: target kmsenv >= 5x its files/s) and
  one-shot `encrypt()`; each timed both as the in-process loop alone (what the target uses; it
  leaves out the SDK's ~0.4 s of imports) and as the whole process (as kmsenv is timed). It runs
  with this Python if it has `aws-encryption-sdk` (`pip install -e .[bench]`), or `--esdk PYTHON`;
  otherwise it is skipped, and the report says so;
- references: `cp -r` of the tree followed by `sync` (the machine's small-file limit, without the
  per-file fsync kmsenv does), and one `kmsenv encrypt` process per file (what a shell loop over
  the files costs; measured on a sample and extrapolated).

kmsenv figures are whole CLI processes (start-up included); every kmsenv output is fsynced. The
load average is printed before and after each round: nothing is asserted (shared, noisy
machines). Results also go to --out JSON.

Usage: python bench/bench_scale.py [--files 2000] [--size 4096] [--jobs N] [--rounds 3] [--settle 2] [--esdk PYTHON]
                                   [--dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: --settle: seconds of pause after the sync before each timed run (0 in the smoke test).
OPTIONS = {"settle_s": 2.0}

ESDK_SCRIPT = r"""
import os, sys, time
import aws_encryption_sdk
from aws_encryption_sdk import CommitmentPolicy
from aws_encryption_sdk.caches.local import LocalCryptoMaterialsCache
from aws_encryption_sdk.identifiers import EncryptionKeyType, WrappingAlgorithm
from aws_encryption_sdk.internal.crypto.wrapping_keys import WrappingKey
from aws_encryption_sdk.key_providers.raw import RawMasterKeyProvider
from aws_encryption_sdk.materials_managers.caching import CachingCryptoMaterialsManager

class Static(RawMasterKeyProvider):
    provider_id = "bench"
    def _get_raw_key(self, key_id):
        return WrappingKey(wrapping_algorithm=WrappingAlgorithm.AES_256_GCM_IV12_TAG16_NO_PADDING,
                           wrapping_key=b"k" * 32, wrapping_key_type=EncryptionKeyType.SYMMETRIC)

mode, src, dst = sys.argv[1], sys.argv[2], sys.argv[3]
provider = Static(); provider.add_master_key(b"key")
cmm = CachingCryptoMaterialsManager(master_key_provider=provider, cache=LocalCryptoMaterialsCache(100),
                                    max_age=300.0, max_messages_encrypted=10000)
client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
start = time.perf_counter()
n = 0
for folder, _, names in os.walk(src):
    for name in names:
        rel = os.path.relpath(os.path.join(folder, name), src)
        out = os.path.join(dst, rel + (".cipher" if mode != "decrypt" else ".plain"))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(os.path.join(folder, name), "rb") as fin, open(out, "wb") as fout:
            if mode == "oneshot":
                fout.write(client.encrypt(source=fin.read(), materials_manager=cmm)[0])
            else:
                # The streaming API, as the issue names it: chunks are written as they come.
                with client.stream(mode=mode[0], source=fin, materials_manager=cmm) as stream:
                    for part in stream:
                        fout.write(part)
        n += 1
print(n, time.perf_counter() - start)
"""


def run(cmd: list[str], env: dict[str, str]) -> float:
    return run_output(cmd, env)[0]


def settle() -> None:
    """Let the file system finish earlier work before a timed run.

    Why: on ext4 mounted with ``discard`` (this kind of VM), creating files right after a burst of
    deletions or of dirty data costs up to 20x more kernel time for several seconds (2,000 creates:
    0.8-0.9 s just after an ``rm -rf``, 0.05 s a few seconds later). Outputs are therefore kept
    until the end (no deletion while measuring), and every timed run, kmsenv's and the references'
    alike, starts after a ``sync`` and a short pause.
    """
    os.sync()
    time.sleep(OPTIONS["settle_s"])


def run_output(cmd: list[str], env: dict[str, str], *, settled: bool = True) -> tuple[float, str]:
    """Wall time of ``cmd`` (a whole process, start-up included) and its stderr."""
    if settled:
        settle()
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return elapsed, proc.stderr.decode()


FLOOR_SCRIPT = r"""
import os, sys, threading, time
src, dst, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
jobs = []
for folder, _, names in os.walk(src):
    out = os.path.join(dst, os.path.relpath(folder, src))
    os.makedirs(out, exist_ok=True)
    jobs.append((folder, out, names))
def work(mine):
    for folder, out, names in mine:
        for name in names:
            with open(os.path.join(folder, name), "rb") as fin:
                data = fin.read()
            fd = os.open(os.path.join(out, name), os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, data)
            os.close(fd)
start = time.perf_counter()
workers = [threading.Thread(target=work, args=(jobs[k::threads],)) for k in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
print(time.perf_counter() - start)
"""


def floor(src: Path, dst: Path) -> float:
    """Seconds this machine needs just to read the tree and create and write its copies, with one
    thread per core on separate folders and no crypto, no fsync and no start-up: what the file
    system alone costs. Any tool writing the same files needs at least this, so the best ratio
    anyone could reach against the ESDK loop is ESDK loop / (kmsenv start-up + floor)."""
    settle()
    cmd = [sys.executable, "-c", FLOOR_SCRIPT, str(src), str(dst), str(os.cpu_count() or 1)]
    return float(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)


def esdk_python(choice: str | None) -> str | None:
    """The Python to run the ESDK with: --esdk PYTHON, else this one if it has the SDK
    (``pip install -e .[bench]``), else None (the comparison is skipped, and said so)."""
    if choice:
        return choice
    probe = subprocess.run([sys.executable, "-c", "import aws_encryption_sdk"], capture_output=True, check=False)
    return sys.executable if probe.returncode == 0 else None


def esdk(python: str, mode: str, src: Path, dst: Path) -> tuple[int, float, float]:
    """(files, seconds of the in-process loop, seconds of the whole process) for one ESDK run."""
    settle()
    start = time.perf_counter()
    cmd = [python, "-c", ESDK_SCRIPT, mode, str(src), str(dst)]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    whole = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"the ESDK {mode} run failed: {proc.stderr.strip()[-2000:]}")
    count, seconds = proc.stdout.split()
    return int(count), float(seconds), whole


def data_keys_made(folder: Path) -> int:
    """Distinct wrapped data keys among the outputs = GenerateDataKey calls that served them."""
    sys.path.insert(0, str(ROOT / "src"))
    from kmsenv import format as fmt

    blobs = set()
    for path in folder.rglob("*.cipher"):
        with path.open("rb") as f:
            blobs.add(fmt.read_header(f).stanzas[0].ciphertext_blob)
    return len(blobs)


def make_tree(root: Path, files: int, size: int) -> None:
    """``files`` random files of ``size`` bytes, 100 per folder."""
    for i in range(files):
        folder = root / f"d{i // 100:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"f{i:06d}.dat").write_bytes(os.urandom(size))


def same_tree(a: Path, b: Path) -> bool:
    left = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    right = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    return left == right and all((a / p).read_bytes() == (b / p).read_bytes() for p in left)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--jobs", type=int, default=None, help="kmsenv --jobs (default: kmsenv's own default)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds of each variant; medians (default 3)")
    parser.add_argument("--per-process-sample", type=int, default=20, help="files timed one process each")
    parser.add_argument(
        "--esdk", metavar="PYTHON", help="a Python with aws-encryption-sdk (default: this one, if it has it)"
    )
    parser.add_argument(
        "--settle",
        type=float,
        default=OPTIONS["settle_s"],
        help="seconds to wait after a sync before each timed run (default 2)",
    )
    parser.add_argument("--dir", type=Path, default=None, help="work folder parent (default: system temp)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "scale.json")
    args = parser.parse_args(argv)
    OPTIONS["settle_s"] = args.settle

    work = Path(tempfile.mkdtemp(prefix="kmsenv-bench-", dir=args.dir))
    try:
        results = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    env = {**os.environ, "KMSENV_HOME": str(work / "home"), "PYTHONPATH": str(ROOT / "src")}
    env.setdefault("ALIBABA_CLOUD_ECS_METADATA_DISABLED", "true")
    kmsenv = [sys.executable, "-m", "kmsenv"]
    created = subprocess.run([*kmsenv, "kms", "CreateKey"], env=env, capture_output=True, check=True)
    key = json.loads(created.stdout)["KeyMetadata"]["KeyId"]
    src = work / "in"
    make_tree(src, args.files, args.size)
    n = args.files
    python = esdk_python(args.esdk)
    loads = [os.getloadavg()[0]]
    times: dict[str, list[float]] = {}
    extra: dict[str, dict[str, Any]] = {}

    def timed(name: str, seconds: float, **facts: Any) -> None:
        times.setdefault(name, []).append(seconds)
        extra.setdefault(name, {}).update(facts)

    jobs = ["--jobs", str(args.jobs)] if args.jobs else []
    (work / "empty").mkdir()

    def empty_run(round_: int) -> list[str]:
        return ["encrypt", "-r", str(work / "empty"), "-o", str(work / f"empty-{round_}"), "--key-id", key, *jobs]

    for round_ in range(max(1, args.rounds)):
        outs = [work / f"{name}-{round_}" for name in ("copy", "enc", "enc-nc", "dec", "esdk-e", "esdk-o", "esdk-d")]
        copy, enc, enc_nc, dec, esdk_enc, esdk_one, esdk_dec = outs
        timed("cp -r + sync", run(["sh", "-c", 'cp -r "$1" "$2" && sync', "sh", str(src), str(copy)], env))
        timed("start-up: kmsenv encrypt -r of an empty folder", run([*kmsenv, *empty_run(round_)], env))
        timed("floor: create + write, no crypto, no fsync", floor(src, work / f"floor-{round_}"))
        t = run([*kmsenv, "encrypt", "-r", str(src), "-o", str(enc), "--key-id", key, *jobs], env)
        timed("kmsenv encrypt -r (cache)", t, generate_data_key_calls=data_keys_made(enc))
        t = run([*kmsenv, "encrypt", "-r", str(src), "-o", str(enc_nc), "--key-id", key, "--no-cache", *jobs], env)
        timed("kmsenv encrypt -r --no-cache", t, generate_data_key_calls=data_keys_made(enc_nc))
        t, err = run_output([*kmsenv, "decrypt", "-r", str(enc), "-o", str(dec), "-v", *jobs], env)
        calls = [line for line in err.splitlines() if "KMS Decrypt call(s)" in line]
        timed(
            "kmsenv decrypt -r", t, verified=same_tree(src, dec), decrypt_calls=calls[-1].split()[2] if calls else None
        )
        if python is not None:
            for mode, target, name in [
                ("encrypt", esdk_enc, "ESDK stream() encrypt"),
                ("decrypt", esdk_dec, "ESDK stream() decrypt"),
                ("oneshot", esdk_one, "ESDK encrypt() one-shot"),
            ]:
                count, loop, whole = esdk(python, mode, esdk_enc if mode == "decrypt" else src, target)
                if count != n:
                    raise SystemExit(f"the ESDK {mode} run saw {count} files, not {n}")
                timed(f"{name}, in-process loop", loop)
                timed(f"{name}, whole process", whole)
        loads.append(os.getloadavg()[0])

    sample = sorted(p for p in src.rglob("*") if p.is_file())[: args.per_process_sample]
    start = time.perf_counter()
    for p in sample:
        # Not settled: a shell loop runs one process after another.
        run_output(
            [*kmsenv, "encrypt", "--key-id", key, str(p), "-o", str(work / f"one-{p.name}.cipher")], env, settled=False
        )
    per_file = (time.perf_counter() - start) / max(1, len(sample))
    timed("kmsenv encrypt, one process per file", per_file * n, extrapolated_from=len(sample))

    rows = {
        name: {
            "seconds": round(statistics.median(ts), 3),
            "files_per_s": round(n / statistics.median(ts), 1),
            "runs_s": [round(t, 3) for t in ts],
            **extra[name],
        }
        for name, ts in times.items()
    }
    ratios = report(rows, n, args.size, loads, esdk=python)
    return {"files": n, "size": args.size, "jobs": args.jobs, "load_average": loads, "results": rows, "ratios": ratios}


def report(
    rows: dict[str, dict[str, Any]], n: int, size: int, loads: list[float], *, esdk: str | None
) -> dict[str, float]:
    out = io.StringIO()
    rounds = len(loads) - 1
    out.write(f"{n} files of {size} bytes, {rounds} round(s) (medians), load average ")
    out.write(" -> ".join(f"{x:.2f}" for x in loads) + "\n")
    for name, r in rows.items():
        facts = {k: v for k, v in r.items() if k not in {"seconds", "files_per_s", "runs_s"}}
        out.write(f"  {name:48s} {r['seconds']:8.2f} s {r['files_per_s']:9.1f} files/s  {facts or ''}\n")

    def rate(name: str) -> float:
        return float(rows[name]["files_per_s"])

    pairs = [
        ("encrypt -r / cp -r + sync", "kmsenv encrypt -r (cache)", "cp -r + sync"),
        ("encrypt -r / one process per file", "kmsenv encrypt -r (cache)", "kmsenv encrypt, one process per file"),
    ]
    if esdk is not None:
        pairs += [
            (
                "encrypt -r / ESDK stream() encrypt loop (target >= 5)",
                "kmsenv encrypt -r (cache)",
                "ESDK stream() encrypt, in-process loop",
            ),
            (
                "decrypt -r / ESDK stream() decrypt loop (target >= 5)",
                "kmsenv decrypt -r",
                "ESDK stream() decrypt, in-process loop",
            ),
            (
                "encrypt -r / ESDK stream() encrypt, whole process",
                "kmsenv encrypt -r (cache)",
                "ESDK stream() encrypt, whole process",
            ),
            (
                "decrypt -r / ESDK stream() decrypt, whole process",
                "kmsenv decrypt -r",
                "ESDK stream() decrypt, whole process",
            ),
            (
                "encrypt -r / ESDK encrypt() one-shot loop",
                "kmsenv encrypt -r (cache)",
                "ESDK encrypt() one-shot, in-process loop",
            ),
        ]
    ratios = {label: round(rate(a) / rate(b), 3) for label, a, b in pairs}
    if esdk is not None:
        best = rows["start-up: kmsenv encrypt -r of an empty folder"]["seconds"]
        best += rows["floor: create + write, no crypto, no fsync"]["seconds"]
        for verb in ("encrypt", "decrypt"):
            loop = rows[f"ESDK stream() {verb}, in-process loop"]["seconds"]
            ratios[f"upper bound vs ESDK {verb} loop: ESDK loop / (start-up + floor)"] = round(loop / best, 3)
    out.write("ratios (files/s):\n")
    for label, value in ratios.items():
        out.write(f"  {label}: {value:.2f}x\n")
    if esdk is None:
        out.write("  ESDK comparison skipped: pip install -e .[bench], or pass --esdk PYTHON\n")
    calls = rows["kmsenv encrypt -r (cache)"]["generate_data_key_calls"]
    out.write(f"GenerateDataKey calls with the cache: {calls} (target <= 5): {'ok' if calls <= 5 else 'OVER'}\n")
    out.write(f"KMS Decrypt calls of decrypt -r: {rows['kmsenv decrypt -r']['decrypt_calls']}\n")
    sys.stdout.write(out.getvalue())
    return ratios


if __name__ == "__main__":
    sys.exit(main())
