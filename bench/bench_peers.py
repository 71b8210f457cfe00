"""Benchmark: kmsenv side by side with its peers on one large file (default 1 GiB).

One invocation: every tool encrypts the same page-cached input and decrypts its own output, each
run a separate process timed whole (interpreter start-up and imports included) and measured with
wait4 (through bench/peers_rusage.py), so the peak RSS is that tool's alone. The tools:

- ``kmsenv``: the CLI as a user runs it (``kmsenv encrypt --key-id alias/bench IN -o OUT``,
  embedded KMS in a fresh KMSENV_HOME, default options: 1 MiB chunks, streaming engine);
- ``age`` (pyrage), ``tink`` (streaming AEAD, AES256_GCM_HKDF_1MB), ``esdk`` (AWS Encryption SDK
  ``stream()``, raw AES keyring, 1 MiB frames) and ``reference`` (the reference document's sample,
  bench/reference_sample.py): driven by bench/peers_tools.py, which says how and why.

Fairness: every output is fsynced (file, then folder) before its process exits — kmsenv does so
itself, peers_tools.py does it for the others. Inputs are read into the page cache before each
run. Each round runs the tools in a new shuffled order (each tool's encrypt then its decrypt), so
noise and the after-effects of the previous run (writeback, an unlink of 1 GiB) do not always hit
the same tool. Every decrypted output is compared with the input by SHA-256.

Printed: per tool and operation the median and minimum seconds, MiB/s (from the median), the
peak RSS (largest seen), and kmsenv's ratios to each tool: ``speed x`` = kmsenv MiB/s / tool MiB/s
and ``memory x`` = tool peak RSS / kmsenv peak RSS (above 1: kmsenv ahead). The load average is
printed before and after each round (a shared machine: nothing is asserted). A PNG with two
panels (throughput, peak memory; encrypt and decrypt per tool) goes to --plot, the results as
JSON to --out.

Usage: python bench/bench_peers.py [--size 1GiB] [--rounds 3] [--tools kmsenv,age,...]
                                   [--dir DIR] [--out FILE] [--plot FILE.png] [--replot FILE]
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
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from _common import MiB, parse_size, warm

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
TOOLS = ("kmsenv", "age", "tink", "esdk", "reference")
LABELS = {
    "kmsenv": "kmsenv CLI",
    "age": "age (pyrage)",
    "tink": "Tink streaming AEAD",
    "esdk": "AWS Encryption SDK",
    "reference": "reference sample",
}
OPS = ("encrypt", "decrypt")


def run(cmd: Sequence[str], env: dict[str, str]) -> tuple[float, int]:
    """Run ``cmd`` to the end; (wall seconds, peak RSS bytes of that process and its children).

    Through bench/peers_rusage.py, so that the peak RSS is the command's own and not inherited
    from this harness (see there); the time is from its fork to its exit, start-up included.
    """
    launcher = [sys.executable, "-S", "-I", str(BENCH / "peers_rusage.py")]
    proc = subprocess.run([*launcher, *cmd], env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    seconds, rss = proc.stdout.split()
    return float(seconds), int(rss)


def make_file(path: Path, size: int) -> str:
    """``size`` random bytes at ``path``; returns their SHA-256."""
    digest = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left > 0:
            block = os.urandom(min(left, 16 * MiB))
            digest.update(block)
            f.write(block)
            left -= len(block)
    return digest.hexdigest()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(16 * MiB):
            digest.update(block)
    return digest.hexdigest()


def commands(work: Path, env: dict[str, str]) -> dict[str, dict[str, list[str]]]:
    """Per tool, the encrypt and decrypt command lines (IN and OUT filled in later)."""
    kmsenv = shutil.which("kmsenv")
    base = [kmsenv] if kmsenv else [sys.executable, "-m", "kmsenv"]
    created = subprocess.run([*base, "kms", "CreateKey"], env=env, check=True, capture_output=True)
    key_id = json.loads(created.stdout)["KeyMetadata"]["KeyId"]
    subprocess.run(
        [*base, "kms", "CreateAlias", "--AliasName", "alias/bench", "--KeyId", key_id],
        env=env,
        check=True,
        capture_output=True,
    )
    keys = work / "keys"
    subprocess.run([sys.executable, str(BENCH / "peers_tools.py"), "keys", str(keys)], env=env, check=True)
    cmds = {
        "kmsenv": {
            "encrypt": [*base, "encrypt", "--key-id", "alias/bench", "IN", "-o", "OUT", "--force"],
            "decrypt": [*base, "decrypt", "IN", "-o", "OUT", "--force"],
        }
    }
    for tool in TOOLS[1:]:
        driver = [sys.executable, str(BENCH / "peers_tools.py"), tool]
        cmds[tool] = {op: [*driver, op, str(keys), "IN", "OUT"] for op in OPS}
    return cmds


def fill(cmd: list[str], src: Path, dst: Path) -> list[str]:
    return [str(src) if a == "IN" else str(dst) if a == "OUT" else a for a in cmd]


def measure(args: argparse.Namespace, tools: list[str], work: Path) -> dict[str, Any]:
    # Time kmsenv as installed: pip compiles bytecode at install time, so a run that may not write
    # it (PYTHONDONTWRITEBYTECODE) would time the compiler. The peers' packages were compiled by pip.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["KMSENV_HOME"] = str(work / "home")
    import compileall

    import kmsenv

    compileall.compile_dir(Path(kmsenv.__file__).parent, quiet=1, force=False)
    compileall.compile_dir(BENCH, quiet=1, force=False, maxlevels=0)
    cmds = commands(work, env)
    src = work / "input.bin"
    src_hash = make_file(src, args.size)
    enc, dec = work / "output.enc", work / "output.dec"
    samples: dict[str, dict[str, list[tuple[float, int]]]] = {t: {op: [] for op in OPS} for t in tools}
    verified: dict[str, bool] = {t: True for t in tools}
    loads = [os.getloadavg()[0]]
    print(f"{args.size / MiB:.0f} MiB input, {args.rounds} round(s), tools: {', '.join(tools)}", flush=True)
    for round_ in range(args.rounds):
        order = list(tools)
        random.Random(round_).shuffle(order)
        for tool in order:
            for path in (enc, dec):
                path.unlink(missing_ok=True)
            warm(src)
            samples[tool]["encrypt"].append(run(fill(cmds[tool]["encrypt"], src, enc), env))
            warm(enc)
            samples[tool]["decrypt"].append(run(fill(cmds[tool]["decrypt"], enc, dec), env))
            verified[tool] = verified[tool] and sha256(dec) == src_hash
        loads.append(os.getloadavg()[0])
        print(f"round {round_ + 1}: order {', '.join(order)}; load average {loads[-1]:.2f}", flush=True)
    results = report(args.size, tools, samples, verified, loads)
    results["memory_floor"] = memory_floor(env, results["results"])
    return results


#: What every Python tool pays before any work: the interpreter, then the interpreter with the
#: AEAD module of ``cryptography`` imported (the one crypto library kmsenv may use: its Rust
#: extension carries a statically linked OpenSSL).
FLOORS = {
    "python (interpreter alone)": "pass",
    "python + import cryptography AEAD": "import cryptography.hazmat.primitives.ciphers.aead",
}


def memory_floor(env: dict[str, str], rows: dict[str, dict[str, dict[str, Any]]]) -> dict[str, float]:
    """Peak RSS (MiB, largest of 3 runs) of FLOORS, launched as the tools are, and what it means.

    Why: the issue asks for kmsenv below every peer in memory. A tool that must import
    ``cryptography`` cannot go below the second floor, so when a peer's whole run peaks under it,
    that target is out of reach for any kmsenv that keeps the crypto standard; printed, not
    assumed.
    """
    floors = {
        name: max(run([sys.executable, "-c", code], env)[1] for _ in range(3)) / MiB for name, code in FLOORS.items()
    }
    print("memory floors (peak RSS, launched like the tools):")
    for name, mib in floors.items():
        print(f"  {name:40} {mib:6.1f} MiB")
    crypto = floors["python + import cryptography AEAD"]
    for tool, ops in rows.items():
        if tool == "kmsenv":
            continue
        for op, r in ops.items():
            if r["peak_rss_mib"] < crypto:
                print(
                    f"  {tool} {op} peaks at {r['peak_rss_mib']:.1f} MiB, under the cryptography floor"
                    f" ({crypto:.1f} MiB): no tool built on cryptography can use less"
                )
    return floors


def report(
    size: int,
    tools: list[str],
    samples: dict[str, dict[str, list[tuple[float, int]]]],
    verified: dict[str, bool],
    loads: list[float],
) -> dict[str, Any]:
    rows: dict[str, dict[str, dict[str, Any]]] = {}
    for tool in tools:
        rows[tool] = {}
        for op in OPS:
            secs = [s for s, _ in samples[tool][op]]
            rss = max(r for _, r in samples[tool][op])
            med = statistics.median(secs)
            rows[tool][op] = {
                "median_s": med,
                "min_s": min(secs),
                "runs_s": secs,
                "mib_per_s": size / MiB / med,
                "peak_rss_mib": rss / MiB,
            }
    if "kmsenv" in rows:
        for tool in tools:
            for op in OPS:
                mine, theirs = rows["kmsenv"][op], rows[tool][op]
                theirs["kmsenv_speed_x"] = mine["mib_per_s"] / theirs["mib_per_s"]
                theirs["kmsenv_memory_x"] = theirs["peak_rss_mib"] / mine["peak_rss_mib"]
    print(f"load average {' -> '.join(f'{x:.2f}' for x in loads)}")
    head = f"{'tool':22} {'op':8} {'median s':>9} {'min s':>7} {'MiB/s':>7} {'peak RSS MiB':>13}"
    print(f"{head} {'speed x':>8} {'memory x':>9}  round-trip")
    for tool in tools:
        for op in OPS:
            r = rows[tool][op]
            ratios = (
                f"{r['kmsenv_speed_x']:8.2f} {r['kmsenv_memory_x']:9.2f}" if "kmsenv_speed_x" in r else f"{'':8} {'':9}"
            )
            check = ("ok" if verified[tool] else "MISMATCH") if op == "decrypt" else ""
            print(
                f"{LABELS[tool]:22} {op:8} {r['median_s']:9.2f} {r['min_s']:7.2f} {r['mib_per_s']:7.0f}"
                f" {r['peak_rss_mib']:13.1f} {ratios}  {check}"
            )
    print("speed x = kmsenv MiB/s / tool MiB/s; memory x = tool peak RSS / kmsenv peak RSS (above 1: kmsenv ahead)")
    return {
        "size": size,
        "rounds": len(loads) - 1,
        "load_average": loads,
        "tools": tools,
        "results": rows,
        "roundtrip_ok": verified,
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Two panels, throughput and peak RSS, encrypt and decrypt bars per tool."""
    import matplotlib

    matplotlib.use("Agg")  # no display: a file only
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    tools: list[str] = results["tools"]
    rows = results["results"]
    fig, (speed_ax, mem_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    width = 0.38
    xs = range(len(tools))
    colours = {"encrypt": "#3b75af", "decrypt": "#ef8636"}
    for i, op in enumerate(OPS):
        offs = [x + (i - 0.5) * width for x in xs]
        speed_bars = speed_ax.bar(offs, [rows[t][op]["mib_per_s"] for t in tools], width, label=op, color=colours[op])
        speed_ax.bar_label(speed_bars, fmt="%.0f", fontsize=7)
        mem_bars = mem_ax.bar(offs, [rows[t][op]["peak_rss_mib"] for t in tools], width, label=op, color=colours[op])
        mem_ax.bar_label(mem_bars, fmt="%.0f", fontsize=7)
    for ax, title, unit in (
        (speed_ax, "Throughput (higher is better)", "MiB/s (median, whole process)"),
        (mem_ax, "Peak memory (lower is better)", "peak RSS, MiB (log scale)"),
    ):
        ax.set_xticks(list(xs), [LABELS[t] for t in tools], rotation=20, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(unit)
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    # Log scale: the reference sample's GiBs and the streaming tools' tens of MiB on one axis.
    mem_ax.set_yscale("log")
    peak = max(rows[t][op]["peak_rss_mib"] for t in tools for op in OPS)
    mem_ax.set_ylim(5, peak * 1.6)
    mem_ax.set_yticks([t for t in (5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000) if t <= peak * 1.6])
    mem_ax.yaxis.set_major_formatter(ScalarFormatter())
    mem_ax.yaxis.set_minor_formatter(NullFormatter())
    loads = results["load_average"]
    fig.suptitle(
        f"{results['size'] / MiB:.0f} MiB file, every output fsynced, {results['rounds']} round(s); "
        f"load average {min(loads):.1f}-{max(loads):.1f}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=parse_size, default=1 << 30, help="input size, e.g. 1GiB, 8MiB (default 1GiB)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, each in a new shuffled order (default 3)")
    ap.add_argument("--tools", default=",".join(TOOLS), help=f"comma-separated subset of {','.join(TOOLS)}")
    ap.add_argument("--dir", type=Path, default=None, help="work folder parent (default: the system temp folder)")
    ap.add_argument("--out", type=Path, default=BENCH / "out" / "peers.json")
    ap.add_argument("--plot", type=Path, default=BENCH / "out" / "peers.png")
    ap.add_argument("--replot", type=Path, default=None, help="only redraw --plot from this --out JSON")
    args = ap.parse_args(argv)
    if args.replot:
        plot(json.loads(args.replot.read_text()), args.plot)
        print(f"plot: {args.plot}")
        return 0
    tools = [t for t in args.tools.split(",") if t]
    unknown = set(tools) - set(TOOLS)
    if unknown or not tools:
        ap.error(f"unknown tools: {', '.join(sorted(unknown)) or '(none given)'}")
    work = Path(tempfile.mkdtemp(prefix="kmsenv-bench-peers-", dir=args.dir))
    try:
        results = measure(args, tools, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    plot(results, args.plot)
    print(f"results: {args.out}; plot: {args.plot}")
    return 0 if all(results["roundtrip_ok"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
