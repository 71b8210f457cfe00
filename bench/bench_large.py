"""Benchmark: one large file (default 1 GiB) through the CLI, embedded KMS, output fsynced.

Each round (variants in a shuffled order, so that machine noise and the after-effects of the
previous run hit every variant alike), the input is first read into the page cache, then these
are timed as whole processes (start-up included):

- reference: ``cp`` of the input followed by an ``fsync`` of the copy;
- ``kmsenv encrypt --jobs 1`` (one thread, streaming), ``--jobs 2`` (two threads over chunk
  ranges) and the default (the streaming engine with a writer thread);
- ``kmsenv decrypt --jobs 1`` (one thread, streaming: the default) and ``--jobs 2`` (two
  threads over chunk ranges); every output is compared with the input once, after the timed runs;
- ``kmsenv rewrap FILE --key-id NEW`` (a v2 file: the new wrapped key goes in the spare header
  slot in place, the payload is not touched; the file is fsynced before, as one at rest), against a
  re-encryption of the same file under the new key (``kmsenv decrypt F -o - | kmsenv encrypt
  --key-id NEW - -o G``: the cheapest re-encryption that writes no plaintext to disk).

Medians and minima over the rounds are printed with the ratios the issue asks about, and the load
average before and after (a shared machine): nothing is asserted. Results also go to --out JSON.

Usage: python bench/bench_large.py [--size 1G] [--rounds 3] [--dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import parse_size, timed, warm

ROOT = Path(__file__).resolve().parent.parent


def run(cmd: list[str] | str, env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, env=env, capture_output=True, check=False, shell=isinstance(cmd, str))
    if proc.returncode != 0:
        raise SystemExit(f"{cmd!r:.200} failed ({proc.returncode}): {proc.stderr.decode()[-2000:]}")


def cp_fsync(src: Path, dst: Path) -> None:
    subprocess.run(["cp", str(src), str(dst)], check=True)
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="input size, e.g. 1G, 64M (default 1G)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    parser.add_argument("--dir", default=None, help="where to work (default: the system temp folder)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kmsenv-bench-large-", dir=args.dir))
    try:
        results = measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def measure(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    env = {**os.environ, "KMSENV_HOME": str(work / "home"), "PYTHONPATH": str(ROOT / "src")}
    kmsenv = [sys.executable, "-m", "kmsenv"]
    keys = []
    for _ in range(2):
        created = subprocess.run([*kmsenv, "kms", "CreateKey"], env=env, capture_output=True, check=True)
        keys.append(json.loads(created.stdout)["KeyMetadata"]["KeyId"])
    key, new_key = keys
    src = work / "input.bin"
    with src.open("wb") as f:
        left = args.size
        while left:
            f.write(os.urandom(min(left, 1 << 26)))
            left -= min(left, 1 << 26)
    enc = work / "input.bin.cipher"
    run([*kmsenv, "encrypt", "--key-id", key, str(src), "-o", str(enc)], env)
    out = work / "out"
    kmsenv_cmd = " ".join(kmsenv)

    def encrypt(*jobs: str) -> Callable[[], None]:
        return lambda: run([*kmsenv, "encrypt", "--key-id", key, *jobs, "-f", "-o", str(out), str(src)], env)

    def decrypt(*jobs: str) -> Callable[[], None]:
        return lambda: run([*kmsenv, "decrypt", *jobs, "-f", "-o", str(out), str(enc)], env)

    reencrypt = (
        f"set -o pipefail; {kmsenv_cmd} decrypt -o - '{enc}' | {kmsenv_cmd} encrypt --key-id {new_key} -f -o '{out}' -"
    )
    variants: dict[str, tuple[Callable[[], None], Path]] = {
        "cp+fsync": (lambda: cp_fsync(src, out), src),
        "encrypt --jobs 1": (encrypt("--jobs", "1"), src),
        "encrypt --jobs 2": (encrypt("--jobs", "2"), src),
        "encrypt (default)": (encrypt(), src),
        "decrypt --jobs 1 (default)": (decrypt("--jobs", "1"), enc),
        "decrypt --jobs 2": (decrypt("--jobs", "2"), enc),
        "re-encrypt (decrypt | encrypt)": (lambda: run(["bash", "-c", reencrypt], env), enc),
    }
    times: dict[str, list[float]] = {name: [] for name in [*variants, "rewrap --key-id NEW"]}
    loads = [os.getloadavg()[0]]
    for round_ in range(args.rounds):
        # A new order each round: what ran just before (an unlink of 1 GiB, writeback) must not
        # always weigh on the same variant.
        order = list(variants.items())
        random.Random(round_).shuffle(order)
        for name, (action, source) in order:
            out.unlink(missing_ok=True)
            warm(source)
            times[name].append(timed(action))
        out.unlink(missing_ok=True)
        shutil.copyfile(enc, out)
        # At rest, as a user's file is: otherwise rewrap's fdatasync of the header would also write
        # back the 1 GiB the copy left dirty, and time the copy instead of the rewrap.
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        warm(out)
        times["rewrap --key-id NEW"].append(timed(lambda: run([*kmsenv, "rewrap", str(out), "--key-id", new_key], env)))
        loads.append(os.getloadavg()[0])
    verified = check_outputs(kmsenv, env, key, src=src, enc=enc, out=out)
    return report(args.size, times, loads, verified)


def check_outputs(kmsenv: list[str], env: dict[str, str], key: str, *, src: Path, enc: Path, out: Path) -> bool:
    """Both engines' outputs decrypt to the input (checked once, outside the timed runs)."""
    ok = True
    for jobs in ("1", "2"):
        out.unlink(missing_ok=True)
        run([*kmsenv, "encrypt", "--key-id", key, "--jobs", jobs, "-o", str(out), str(src)], env)
        plain = out.with_suffix(".plain")
        plain.unlink(missing_ok=True)
        run([*kmsenv, "decrypt", "--jobs", "2" if jobs == "1" else "1", "-o", str(plain), str(out)], env)
        ok = ok and filecmp.cmp(src, plain, shallow=False)
        plain.unlink()
    out.unlink(missing_ok=True)
    run([*kmsenv, "decrypt", "--jobs", "2", "-o", str(out), str(enc)], env)
    return ok and filecmp.cmp(src, out, shallow=False)


def report(size: int, times: dict[str, list[float]], loads: list[float], verified: bool) -> dict[str, Any]:
    rows = {
        name: {
            "median_s": statistics.median(ts),
            "min_s": min(ts),
            "runs_s": ts,
            "mib_per_s": size / (1 << 20) / statistics.median(ts),
        }
        for name, ts in times.items()
    }
    med = {name: row["median_s"] for name, row in rows.items()}
    ratios = {
        "encrypt --jobs 2 speed-up over --jobs 1 (target >= 1.5)": med["encrypt --jobs 1"] / med["encrypt --jobs 2"],
        "decrypt --jobs 2 speed-up over --jobs 1 (target >= 1.5)": (
            med["decrypt --jobs 1 (default)"] / med["decrypt --jobs 2"]
        ),
        "encrypt --jobs 2 vs cp+fsync (target >= 0.9)": med["cp+fsync"] / med["encrypt --jobs 2"],
        "encrypt (default) vs cp+fsync": med["cp+fsync"] / med["encrypt (default)"],
        "decrypt --jobs 2 vs cp+fsync (target >= 0.9)": med["cp+fsync"] / med["decrypt --jobs 2"],
        "decrypt --jobs 1 vs cp+fsync": med["cp+fsync"] / med["decrypt --jobs 1 (default)"],
        "rewrap / re-encrypt, whole processes (start-up ~0.1 s; the target is bench_rewrap.py)": (
            med["rewrap --key-id NEW"] / med["re-encrypt (decrypt | encrypt)"]
        ),
    }
    print(
        f"{size / (1 << 20):.0f} MiB, {len(loads) - 1} round(s), load average {' -> '.join(f'{x:.2f}' for x in loads)}"
    )
    print(f"{'run':34} {'median s':>9} {'min s':>7} {'MiB/s':>7}")
    for name, row in rows.items():
        print(f"{name:34} {row['median_s']:9.2f} {row['min_s']:7.2f} {row['mib_per_s']:7.0f}")
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    print(f"outputs verified against the input: {'ok' if verified else 'MISMATCH'}")
    return {"size": size, "load_average": loads, "results": rows, "ratios": ratios, "verified": verified}


if __name__ == "__main__":
    raise SystemExit(main())
