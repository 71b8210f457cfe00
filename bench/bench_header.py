"""Benchmark: the per-file CPU of a kmsenv header, the part of a small file's cost that is not I/O.

One invocation, in this process (no start-up, no disk): N times each, with the settings of a
small file in a folder run (one wrapped-key stanza, a two-pair context, one data key):

- ``new_header`` + ``encode`` (what encrypting a file adds), and ``parse_header`` + ``open_header``
  on a header followed by 4 KiB (what decrypting one adds);
- the reference: the header's own cryptography alone, done directly through ``kmsenv._crypto``
  (three HKDF-SHA256 derivations and one HMAC-SHA256 over the header bytes), the part no header
  code can avoid.

Printed: microseconds per call and the ratio of each to the reference (how much the header code
adds around its crypto), with the load average (a shared machine: nothing is asserted).

Usage: python bench/bench_header.py [--calls 20000] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

from kmsenv import _crypto
from kmsenv.format import header as fmt_header
from kmsenv.format import keys

STANZA = fmt_header.KeyStanza(
    provider="acs-kms",
    key_arn="acs:kms:cn-hangzhou:1234567890:key/key-abcdef0123456789",
    key_version_id="ver-0123456789",
    ciphertext_blob=os.urandom(180),
)
CONTEXT = {"app": "demo", "env": "prod"}


def per_call_us(fn: Callable[[], None], calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, medians reported (default 3)")
    args = parser.parse_args(argv)

    data_key = bytearray(os.urandom(32))
    first, first_key = keys.new_header(data_key, stanzas=[STANZA], context=CONTEXT, chunk_size=1 << 20)
    first_key.wipe()
    encoded = first.encode()
    file_start = encoded + os.urandom(4096)
    salt = os.urandom(32)
    derived = bytearray(32)

    def write_header() -> None:
        header, file_key = keys.new_header(data_key, stanzas=[STANZA], context=CONTEXT, chunk_size=1 << 20)
        header.encode()
        file_key.wipe()

    def read_header() -> None:
        header, _ = fmt_header.parse_header(file_start)
        keys.open_header(header, data_key).wipe()

    def crypto_only() -> None:
        for info in (b"kmsenv-v1\x00payload", b"kmsenv-v1\x00commitment", b"kmsenv-v1\x00header-mac"):
            _crypto.hkdf_sha256_into(data_key, salt=salt, info=info, out=derived)
        _crypto.hmac_sha256(derived, encoded)

    cases = {"new_header + encode": write_header, "parse_header + open_header": read_header, "crypto only": crypto_only}
    for fn in cases.values():  # warm caches and imports
        per_call_us(fn, 100)
    loads = [os.getloadavg()[0]]
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(max(1, args.rounds)):
        for name, fn in cases.items():
            samples[name].append(per_call_us(fn, args.calls))
        loads.append(os.getloadavg()[0])
    med = {name: statistics.median(values) for name, values in samples.items()}
    print(f"{args.calls} calls x {args.rounds} round(s), load average {' -> '.join(f'{x:.2f}' for x in loads)}")
    for name, us in med.items():
        print(f"  {name:28} {us:7.1f} us per call")
    for name in ("new_header + encode", "parse_header + open_header"):
        print(f"{name} / crypto only: {med[name] / med['crypto only']:.2f}x")
    _crypto.wipe(data_key)
    _crypto.wipe(derived)
    return 0


if __name__ == "__main__":
    sys.exit(main())
