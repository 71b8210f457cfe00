"""Benchmark: in-place ``rewrap`` of a large v2 file against re-encrypting it (issue #6: ≤ 1 %).

One file (default 1 GiB of incompressible bytes) is encrypted once with the embedded KMS. Then,
round after round, in a shuffled order each round (so machine noise hits every variant alike),
these are timed:

- **re-encrypt**: what changing the key costs without rewrap: decrypt the file and encrypt the
  plaintext under the new key, streamed through a pipe (no plaintext on disk), the output
  ``fsync``ed. In-process, through the public API (``decrypt_stream`` | ``encrypt_stream``).
- **rewrap add**: ``rewrap_file(F, key_ids=[NEW])``: verify the header (KMS Decrypt), ReEncrypt,
  write the spare header slot in place, ``fdatasync``.
- **rewrap remove**: ``rewrap_file(F, remove_key_ids=[NEW])``: as above, then the old slot is
  overwritten too (two slot writes, two ``fdatasync``), so the file stays the same size forever.
- **rewrap add (CLI)**: ``kmsenv rewrap F --key-id NEW`` as a whole process, for context only: it
  includes interpreter start-up, which the target is not about.

Every rewrap must be in place (checked: the file keeps its inode and size and the result says
so); the payload bytes are compared before and after at the end. Medians and minima are printed
with the ratios rewrap / re-encrypt and the load average before and after (the machine may be
shared): nothing is asserted. Results also go to --out JSON.

Usage: python bench/bench_rewrap.py [--size 1G] [--rounds 5] [--dir DIR] [--out FILE]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import parse_size, timed, warm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from kmsenv import envelope  # noqa: E402
from kmsenv import format as fmt  # noqa: E402
from kmsenv.clients import EmbeddedKms  # noqa: E402


def write_input(path: Path, size: int) -> None:
    """``size`` incompressible bytes (SHA-256 counter stream: cheap, deterministic)."""
    block = b"".join(hashlib.sha256(i.to_bytes(8, "big")).digest() for i in range(1 << 15))  # 1 MiB
    with path.open("wb") as f:
        left = size
        while left:
            f.write(block[: min(left, len(block))])
            left -= min(left, len(block))


def reencrypt(kms: EmbeddedKms, src: Path, dst: Path, key: str) -> None:
    """Decrypt ``src`` into a pipe, encrypt the pipe into ``dst`` under ``key``, fsync ``dst``."""
    r, w = os.pipe()
    failed: list[BaseException] = []

    def produce() -> None:
        try:
            with src.open("rb") as fin, os.fdopen(w, "wb") as pipe:
                envelope.decrypt_stream(fin, pipe, kms=kms)
        except BaseException as exc:  # reported below, in the calling thread
            failed.append(exc)

    producer = threading.Thread(target=produce)
    producer.start()
    with os.fdopen(r, "rb") as pipe, dst.open("wb") as out:
        envelope.encrypt_stream(pipe, out, kms=kms, key_id=key)
        out.flush()
        os.fsync(out.fileno())
    producer.join()
    if failed:
        raise failed[0]


def decrypts_to(kms: EmbeddedKms, path: Path, size: int) -> bool:
    with path.open("rb") as fin, open(os.devnull, "wb") as sink:
        return envelope.decrypt_stream(fin, sink, kms=kms) == size


def payload_digest(path: Path) -> str:
    with path.open("rb") as f:
        header = fmt.read_header(f)
        f.seek(header.size)
        h = hashlib.sha256()
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size", type=parse_size, default=1 << 30, help="plaintext size, e.g. 1G, 64M (default 1G)")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--dir", default=None, help="where to work (default: the system temp folder)")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="kmsenv-bench-rewrap-", dir=args.dir))
    try:
        results = bench(work, args.size, args.rounds)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def bench(work: Path, size: int, rounds: int) -> dict[str, Any]:
    os.environ.setdefault("ALIBABA_CLOUD_ECS_METADATA_DISABLED", "true")
    home = work / "home"
    kms = EmbeddedKms(home=home)
    key = str(kms.service.create_key()["KeyMetadata"]["KeyId"])
    new = str(kms.service.create_key()["KeyMetadata"]["KeyId"])
    plain, enc, out = work / "plain", work / "plain.cipher", work / "reencrypted.cipher"
    write_input(plain, size)
    envelope.encrypt_file(plain, enc, kms=kms, key_id=key)
    plain.unlink()  # only the ciphertext is needed from here on
    before = os.stat(enc)
    digest = payload_digest(enc)
    env = {**os.environ, "KMSENV_HOME": str(home), "PYTHONPATH": str(ROOT / "src")}
    cli = [sys.executable, "-m", "kmsenv", "rewrap", str(enc)]

    in_place: list[bool] = []

    def rewrap(**kwargs: Any) -> None:
        in_place.append(envelope.rewrap_file(enc, kms=kms, **kwargs).in_place)

    def cli_add() -> None:
        subprocess.run([*cli, "--key-id", new], env=env, check=True, capture_output=True)

    variants: dict[str, Callable[[], object]] = {
        "re-encrypt (decrypt | encrypt, fsync)": lambda: reencrypt(kms, enc, out, new),
        "rewrap add, in place": lambda: None,  # timed below, with the remove that follows it
        "rewrap add (CLI process)": cli_add,
    }
    times: dict[str, list[float]] = {name: [] for name in [*variants, "rewrap remove, in place"]}
    loads = [os.getloadavg()[0]]
    for _ in range(rounds):
        order = list(variants)
        random.shuffle(order)
        for name in order:
            warm(enc)
            if name == "rewrap add, in place":
                # Timed separately: the add (one slot) and the remove that follows (two slots).
                times[name].append(timed(lambda: rewrap(key_ids=[new])))
                times["rewrap remove, in place"].append(timed(lambda: rewrap(remove_key_ids=[new])))
            else:
                times[name].append(timed(variants[name]))
            if name == "rewrap add (CLI process)":
                rewrap(remove_key_ids=[new])  # back to one key, untimed
        loads.append(os.getloadavg()[0])
    after = os.stat(enc)
    checks = {
        "every rewrap in place": all(in_place),
        "same inode and size": (after.st_ino, after.st_size) == (before.st_ino, before.st_size),
        "payload unchanged": payload_digest(enc) == digest,
        "re-encrypted file decrypts": decrypts_to(kms, out, size),
    }
    return report(size, times, loads, checks)


def report(size: int, times: dict[str, list[float]], loads: list[float], checks: dict[str, bool]) -> dict[str, Any]:
    med = {name: statistics.median(t) for name, t in times.items()}
    low = {name: min(t) for name, t in times.items()}
    base = "re-encrypt (decrypt | encrypt, fsync)"
    load = " -> ".join(f"{x:.2f}" for x in loads)
    print(f"{size / (1 << 20):.0f} MiB plaintext, {len(loads) - 1} round(s), load average {load}")
    print(f"{'variant':44} {'median s':>10} {'min s':>10} {'vs re-encrypt':>14}")
    rows = {}
    for name in times:
        ratio = med[name] / med[base]
        rows[name] = {"median_s": med[name], "min_s": low[name], "ratio_to_reencrypt": ratio}
        print(f"{name:44} {med[name]:10.4f} {low[name]:10.4f} {ratio:13.2%}")
    ratios = {
        "rewrap add / re-encrypt (target <= 0.01)": med["rewrap add, in place"] / med[base],
        "rewrap remove / re-encrypt (target <= 0.01)": med["rewrap remove, in place"] / med[base],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.4%}")
    for name, ok in checks.items():
        print(f"check: {name}: {'ok' if ok else 'FAILED'}")
    return {"size": size, "load_average": loads, "results": rows, "ratios": ratios, "checks": checks}


if __name__ == "__main__":
    sys.exit(main())
