"""Run one fuzz target under atheris (libFuzzer, coverage-guided) for a bounded time.

    python tests/fuzz/run.py TARGET --seconds N [--corpus DIR] [--timeout S] [-- libFuzzer flags]
    python tests/fuzz/run.py --list

The corpus starts from the target's seeds (built from tests/vectors); with ``--corpus DIR`` the
seeds are added to DIR and what the fuzzer finds is kept there for the next run. A crash (an
exception outside the target's contract) or a hang (one input over ``--timeout`` seconds) stops the
run with libFuzzer's report and a ``crash-*``/``timeout-*`` file to turn into a regression vector.
The last lines of libFuzzer's output carry the figures docs/security.md records (``#N`` inputs
tried, ``cov`` edges covered, ``corp`` corpus size).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/, so `fuzz.targets` imports as in pytest


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", nargs="?")
    parser.add_argument("--seconds", type=int, default=60, help="total fuzzing time (default 60)")
    parser.add_argument("--timeout", type=int, default=10, help="seconds one input may take (default 10)")
    parser.add_argument("--corpus", type=Path, help="corpus folder to use and grow (default: a temporary one)")
    parser.add_argument("--list", action="store_true", help="list the targets")
    args, extra = parser.parse_known_args(argv)

    import atheris

    with atheris.instrument_imports(include=["kmsenv"]):
        from fuzz.targets import TARGETS

    if args.list or not args.target:
        for target in TARGETS.values():
            print(f"{target.name:10} {target.doc}")
        return 0
    target = TARGETS[args.target]
    with tempfile.TemporaryDirectory(prefix=f"kmsenv-fuzz-{target.name}-") as tmp:
        corpus = args.corpus or Path(tmp)
        corpus.mkdir(parents=True, exist_ok=True)
        for seed in target.seeds():
            (corpus / f"seed-{hashlib.sha256(seed).hexdigest()[:16]}").write_bytes(seed)
        flags = [
            sys.argv[0],
            str(corpus),
            f"-max_total_time={args.seconds}",
            f"-timeout={args.timeout}",
            "-rss_limit_mb=2048",
            "-print_final_stats=1",
            *[x for x in extra if x != "--"],
        ]
        atheris.Setup(flags, target.run)
        atheris.Fuzz()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
