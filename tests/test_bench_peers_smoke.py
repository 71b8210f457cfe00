"""bench/bench_peers.py stays runnable: every tool (none skipped) on a few MiB, no timing asserted.

The peers (pyrage, tink, aws-encryption-sdk with its Material Providers Library, matplotlib) come
with the `bench` extra, which scripts/test.sh installs.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
TOOLS = {"kmsenv", "age", "tink", "esdk", "reference"}


def png_chunks(data: bytes) -> list[bytes]:
    """The chunk types of a PNG, each CRC checked; fails on anything that is not a whole PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert zlib.crc32(kind + body) == crc, kind
        kinds.append(kind)
        pos += 12 + length
    return kinds


@pytest.mark.slow
def test_bench_peers_runs_every_tool(tmp_path: Path) -> None:
    out, png = tmp_path / "peers.json", tmp_path / "peers.png"
    args = ["--size", "3MiB", "--rounds", "2", "--dir", str(tmp_path), "--out", str(out), "--plot", str(png)]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_peers.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert set(results["tools"]) == TOOLS and set(results["results"]) == TOOLS
    assert results["roundtrip_ok"] == {tool: True for tool in TOOLS}
    assert results["rounds"] == 2 and len(results["load_average"]) == 3
    for tool, ops in results["results"].items():
        for op in ("encrypt", "decrypt"):
            row = ops[op]
            assert len(row["runs_s"]) == 2 and row["min_s"] <= row["median_s"]
            assert row["mib_per_s"] > 0 and row["peak_rss_mib"] > 0
            assert row["kmsenv_speed_x"] > 0 and row["kmsenv_memory_x"] > 0
            if tool == "kmsenv":
                assert row["kmsenv_speed_x"] == pytest.approx(1.0) and row["kmsenv_memory_x"] == pytest.approx(1.0)
    # The reference sample holds the whole file (and its base64) in memory; the streaming tools do not.
    rss = {tool: ops["encrypt"]["peak_rss_mib"] for tool, ops in results["results"].items()}
    assert rss["reference"] > rss["age"]
    for label in ("kmsenv CLI", "age (pyrage)", "Tink streaming AEAD", "AWS Encryption SDK", "reference sample"):
        assert proc.stdout.count(label) == 2, label  # an encrypt and a decrypt row each
    assert "speed x" in proc.stdout and "memory x" in proc.stdout
    # The floors are measured, and importing cryptography costs memory over the bare interpreter.
    floors = results["memory_floor"]
    assert floors["python + import cryptography AEAD"] > floors["python (interpreter alone)"] > 0
    kinds = png_chunks(png.read_bytes())
    assert kinds[0] == b"IHDR" and b"IDAT" in kinds and kinds[-1] == b"IEND"
    assert list(tmp_path.glob("kmsenv-bench-peers-*")) == []  # its work folder is removed


def test_peers_tools_round_trip_each_peer(tmp_path: Path) -> None:
    """Each peer's driver decrypts its own output to the input, and refuses a tampered one."""
    keys = tmp_path / "keys"
    driver = [sys.executable, str(BENCH / "peers_tools.py")]
    subprocess.run([*driver, "keys", str(keys)], check=True, timeout=120)
    src = tmp_path / "plain"
    src.write_bytes(os.urandom(300_000))
    for tool in sorted(TOOLS - {"kmsenv"}):
        enc, dec, bad = tmp_path / f"{tool}.enc", tmp_path / f"{tool}.dec", tmp_path / f"{tool}.bad"
        subprocess.run([*driver, tool, "encrypt", str(keys), str(src), str(enc)], check=True, timeout=120)
        assert src.read_bytes()[1000:1064] not in enc.read_bytes()  # no plaintext run in the output
        subprocess.run([*driver, tool, "decrypt", str(keys), str(enc), str(dec)], check=True, timeout=120)
        assert hashlib.sha256(dec.read_bytes()).digest() == hashlib.sha256(src.read_bytes()).digest(), tool
        data = bytearray(enc.read_bytes())
        data[len(data) // 2] ^= 1  # a flipped bit in the middle of the payload
        bad.write_bytes(bytes(data))
        proc = subprocess.run(
            [*driver, tool, "decrypt", str(keys), str(bad), str(tmp_path / f"{tool}.bad.dec")],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode != 0, tool


def test_rusage_launcher_reports_the_command_not_the_caller(tmp_path: Path) -> None:
    """The launcher's peak RSS is the command's: a 64 MiB allocation shows, the caller's size does not."""
    launcher = [sys.executable, "-S", "-I", str(BENCH / "peers_rusage.py")]
    grow = "x = bytearray(64 << 20); x[::4096] = b'1' * len(x[::4096])"
    small = subprocess.run([*launcher, sys.executable, "-c", "pass"], capture_output=True, text=True, check=True)
    big = subprocess.run([*launcher, sys.executable, "-c", grow], capture_output=True, text=True, check=True)
    small_rss, big_rss = int(small.stdout.split()[1]), int(big.stdout.split()[1])
    assert small_rss < 32 << 20 < 64 << 20 < big_rss
    assert float(small.stdout.split()[0]) > 0
    failed = subprocess.run([*launcher, sys.executable, "-c", "raise SystemExit(3)"], capture_output=True, check=False)
    assert failed.returncode == 3
