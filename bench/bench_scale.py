"""Benchmark: many small files in one CLI run (`encrypt -r` / `decrypt -r`), embedded KMS.

One invocation, on N files of SIZE bytes (default 2,000 × 4 KiB) in a fresh KMS home:
- `kmsenv encrypt -r` with the data-key cache (the default) and with `--no-cache`: files/s, and
  the number of GenerateDataKey calls, counted exactly as the number of distinct wrapped data
  keys in the outputs (each GenerateDataKey makes one; target with the cache: <= 5);
- `kmsenv decrypt -r` of the cached run's output: files/s (every file is checked afterwards);
- references: `cp -r` of the tree followed by `sync` (the machine's small-file limit, without the
  per-file fsync kmsenv does), and one `kmsenv encrypt` process per file (what a shell loop over
  the files costs; measured on a sample and extrapolated);
- optionally (`--esdk PYTHON`: a Python with `aws-encryption-sdk` installed, e.g. in a venv) the
  AWS Encryption SDK encrypting the same files in one process with a raw AES-256 wrapping key and
  its caching materials manager (no KMS calls at all, so it flatters the SDK), no fsync.

Ratios are printed; nothing is asserted (shared, noisy machines). Results also go to --out JSON.

Usage: python bench/bench_scale.py [--files 2000] [--size 4096] [--jobs 4] [--dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent

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

src, dst = sys.argv[1], sys.argv[2]
provider = Static(); provider.add_master_key(b"key")
cmm = CachingCryptoMaterialsManager(master_key_provider=provider, cache=LocalCryptoMaterialsCache(100),
                                    max_age=300.0, max_messages_encrypted=10000)
client = aws_encryption_sdk.EncryptionSDKClient(commitment_policy=CommitmentPolicy.REQUIRE_ENCRYPT_REQUIRE_DECRYPT)
start = time.perf_counter()
n = 0
for folder, _, names in os.walk(src):
    for name in names:
        rel = os.path.relpath(os.path.join(folder, name), src)
        out = os.path.join(dst, rel + ".cipher")
        os.makedirs(os.path.dirname(out), exist_ok=True)
        with open(os.path.join(folder, name), "rb") as f:
            ct, _ = client.encrypt(source=f.read(), materials_manager=cmm)
        with open(out, "wb") as f:
            f.write(ct)
        n += 1
print(n, time.perf_counter() - start)
"""


def run(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, check=False)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")
    return elapsed


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
    parser.add_argument("--jobs", type=int, default=4)
    parser.add_argument("--per-process-sample", type=int, default=20, help="files timed one process each")
    parser.add_argument("--esdk", metavar="PYTHON", help="a Python with aws-encryption-sdk, for the comparison")
    parser.add_argument("--dir", type=Path, default=None, help="work folder parent (default: system temp)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "out" / "scale.json")
    args = parser.parse_args(argv)

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
    kmsenv = [sys.executable, "-m", "kmsenv"]
    created = subprocess.run([*kmsenv, "kms", "CreateKey"], env=env, capture_output=True, check=True)
    key = json.loads(created.stdout)["KeyMetadata"]["KeyId"]
    src = work / "in"
    make_tree(src, args.files, args.size)
    n = args.files
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str, seconds: float, files: int = n, **extra: Any) -> None:
        rows[name] = {"seconds": round(seconds, 3), "files_per_s": round(files / seconds, 1), **extra}

    t = run(["cp", "-r", str(src), str(work / "copy")], env)
    t += run(["sync"], env)
    row("cp -r + sync", t)

    jobs = ["--jobs", str(args.jobs)]
    t = run([*kmsenv, "encrypt", "-r", str(src), "-o", str(work / "enc"), "--key-id", key, *jobs], env)
    row("kmsenv encrypt -r (cache)", t, generate_data_key_calls=data_keys_made(work / "enc"))
    t = run([*kmsenv, "encrypt", "-r", str(src), "-o", str(work / "enc-nc"), "--key-id", key, "--no-cache", *jobs], env)
    row("kmsenv encrypt -r --no-cache", t, generate_data_key_calls=data_keys_made(work / "enc-nc"))
    t = run([*kmsenv, "decrypt", "-r", str(work / "enc"), "-o", str(work / "dec"), *jobs], env)
    row("kmsenv decrypt -r", t, verified=same_tree(src, work / "dec"))

    sample = sorted(p for p in src.rglob("*") if p.is_file())[: args.per_process_sample]
    start = time.perf_counter()
    for p in sample:
        run([*kmsenv, "encrypt", "--key-id", key, str(p), "-o", str(work / f"one-{p.name}.cipher")], env)
    per_file = (time.perf_counter() - start) / max(1, len(sample))
    row("kmsenv encrypt, one process per file", per_file * n, extrapolated_from=len(sample))

    if args.esdk:
        proc = subprocess.run(
            [args.esdk, "-c", ESDK_SCRIPT, str(src), str(work / "esdk")], capture_output=True, text=True, check=False
        )
        if proc.returncode == 0:
            count, seconds = proc.stdout.split()
            row("AWS Encryption SDK, caching CMM, raw AES key, in-process", float(seconds), int(count))
        else:
            rows["AWS Encryption SDK"] = {"error": proc.stderr.strip().splitlines()[-1:]}

    report(rows, n, args.size)
    return {"files": n, "size": args.size, "jobs": args.jobs, "results": rows}


def report(rows: dict[str, dict[str, Any]], n: int, size: int) -> None:
    out = io.StringIO()
    cached = rows["kmsenv encrypt -r (cache)"]["files_per_s"]
    out.write(f"{n} files of {size} bytes\n")
    for name, r in rows.items():
        if "files_per_s" not in r:
            out.write(f"  {name:60s} {r}\n")
            continue
        extra = {k: v for k, v in r.items() if k not in {"seconds", "files_per_s"}}
        out.write(f"  {name:60s} {r['seconds']:8.2f} s {r['files_per_s']:9.1f} files/s  {extra or ''}\n")
    out.write("ratios (files/s):\n")
    for name, r in rows.items():
        if name != "kmsenv encrypt -r (cache)" and "files_per_s" in r:
            out.write(f"  encrypt -r (cache) / {name}: {cached / r['files_per_s']:.2f}x\n")
    calls = rows["kmsenv encrypt -r (cache)"]["generate_data_key_calls"]
    out.write(f"GenerateDataKey calls with the cache: {calls} (target <= 5): {'ok' if calls <= 5 else 'OVER'}\n")
    sys.stdout.write(out.getvalue())


if __name__ == "__main__":
    sys.exit(main())
