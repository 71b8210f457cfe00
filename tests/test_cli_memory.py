"""What ``kmsenv encrypt``/``decrypt`` keep in memory: the modules they load and the chunk buffers
they hold.

Peak RSS against the peers (issue #6) is measured by bench/bench_peers.py; these tests pin the
causes that measurement found (docs/performance.md, "Peers"): heavy modules pulled onto the file
path, a second OpenSSL loaded through ``hashlib``, every command's parser built for one command,
and more 1 MiB chunk buffers in flight than the engine needs.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import pytest

from kmsenv.format import KeyStanza, new_header, open_header, read_header
from kmsenv.format.stream import CHUNK_TAG_SIZE, decrypt_stream, encrypt_stream

#: Never needed to encrypt or decrypt a file with the embedded KMS: the HTTP server and its stack,
#: the Alibaba SDK, PostgreSQL, the test-only libraries, pycryptodome (legacy files only), the
#: remote and agent clients, and the other commands' CLI modules.
FORBIDDEN = {
    "starlette",
    "uvicorn",
    "anyio",
    "h11",
    "psycopg",
    "psycopg_pool",
    "hypothesis",
    "alibabacloud_kms20160120",
    "alibabacloud_tea_openapi",
    "alibabacloud_credentials",
    "Tea",
    "darabonba",
    "Crypto",
    "asyncio",
    "ssl",
    "email",
    "http",
    "logging",
    "kmsenv.server",
    "kmsenv._remote",
    "kmsenv._agent",
    "kmsenv.kms.pg_store",
    "kmsenv.kms.pg_nonces",
    "kmsenv.cli.kms",
    "kmsenv.cli.access",
    "kmsenv.cli.server",
    "kmsenv.cli.audit",
    "kmsenv.cli.store",
    "kmsenv.cli.agent",
    # CPython's own OpenSSL binding (hashlib/hmac/secrets): a second OpenSSL beside cryptography's.
    "_hashlib",
}

#: Runs the CLI in-process, then prints every loaded module (and its packages) as JSON.
PROBE = """
import json, sys
from kmsenv.cli import main
rc = main(sys.argv[1:])
names = {m for m in sys.modules}
names |= {".".join(m.split(".")[:i]) for m in list(names) for i in range(1, m.count(".") + 1)}
print(json.dumps({"rc": rc, "modules": sorted(names)}))
"""


def _env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSENV_")}
    env.update(KMSENV_HOME=str(home), ALIBABA_CLOUD_ECS_METADATA_DISABLED="true")
    return env


def _run(env: dict[str, str], *args: str) -> set[str]:
    done = subprocess.run([sys.executable, "-c", PROBE, *args], env=env, capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["rc"] == 0, done.stderr
    return set(result["modules"])


def test_encrypt_and_decrypt_load_nothing_heavy(tmp_path: Path) -> None:
    env = _env(tmp_path / "home")
    created = subprocess.run(
        [sys.executable, "-m", "kmsenv", "kms", "CreateKey"], env=env, capture_output=True, text=True, check=True
    )
    key_id = json.loads(created.stdout)["KeyMetadata"]["KeyId"]
    plain = tmp_path / "plain"
    plain.write_bytes(os.urandom(3 * 4096 + 5))

    encrypt = _run(env, "encrypt", "--key-id", key_id, "--chunk-size", "4K", str(plain), "-o", str(tmp_path / "c"))
    decrypt = _run(env, "decrypt", str(tmp_path / "c"), "-o", str(tmp_path / "back"))

    assert (tmp_path / "back").read_bytes() == plain.read_bytes()
    for loaded in (encrypt, decrypt):
        assert "kmsenv.kms.service" in loaded and "kmsenv.format.stream" in loaded  # the probe saw the real path
        assert loaded & FORBIDDEN == set()


def test_crypto_and_the_embedded_kms_load_no_second_openssl() -> None:
    """``hashlib``/``hmac`` (and ``secrets``, which imports ``hmac``) load CPython's ``_hashlib``
    and the system OpenSSL beside the one in ``cryptography``: 3.7 MiB of peak RSS, measured."""
    code = (
        "import sys, kmsenv._crypto, kmsenv.kms.service, kmsenv.format;"
        "print(sorted({'_hashlib', 'hashlib', 'hmac', 'secrets'} & set(sys.modules)))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_help_builds_every_parser_without_loading_logging() -> None:
    code = (
        "import sys; from kmsenv.cli import build_parser; build_parser([]).format_help();"
        "print('logging' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_every_command_maps_to_the_module_that_registers_it() -> None:
    """A run builds only its command's module, so the map must know every command."""
    import argparse

    from kmsenv import cli

    parser = cli.build_parser([])
    (sub,) = (a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == set(cli._COMMANDS)
    for command, module in cli._COMMANDS.items():
        (own,) = (a for a in cli.build_parser([command])._actions if isinstance(a, argparse._SubParsersAction))
        assert command in own.choices and module in cli._MODULES


# ------------------------------------------------------------------------- chunk buffers --

CHUNK = 1024 * 1024  # the default chunk size: the case the peers bench measures
KEY = bytes(range(32))
STANZA = KeyStanza("acs-kms", "acs:kms:cn-hangzhou:1:key/k", "v1", b"blob")


class Input(io.RawIOBase):
    """``n`` bytes of input, left as they are in the reader's buffer: no allocation to count."""

    def __init__(self, n: int) -> None:
        self.left = n

    def readable(self) -> bool:
        return True

    def readinto(self, buf: memoryview) -> int:  # type: ignore[override]
        n = min(len(buf), self.left)
        self.left -= n
        return n


class Sink(io.RawIOBase):
    """Takes every byte without keeping it; keeps a running count."""

    def __init__(self) -> None:
        self.count = 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        n = len(memoryview(b))
        self.count += n
        return n


def _peak_buffers(run: object) -> float:
    """Peak Python-allocated bytes while ``run()`` executes, in chunk sizes."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        run()  # type: ignore[operator]
        return tracemalloc.get_traced_memory()[1] / CHUNK
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("threads", [1, 2])
def test_encrypt_holds_one_input_buffer_and_at_most_two_outputs(threads: int) -> None:
    """2 chunk buffers inline, 3 with the writer thread (it was 4 and 8), on a 16-chunk input."""
    _, file_key = new_header(KEY, stanzas=(STANZA,), context={}, chunk_size=CHUNK)
    sink = Sink()

    def run() -> None:
        encrypt_stream(Input(16 * CHUNK), sink, file_key, chunk_size=CHUNK, threads=threads)  # type: ignore[arg-type]

    peak = _peak_buffers(run)
    assert sink.count == 16 * (CHUNK + CHUNK_TAG_SIZE)
    assert peak < (2.5 if threads == 1 else 3.5), peak


def test_decrypt_holds_one_input_buffer_and_one_output() -> None:
    header, file_key = new_header(KEY, stanzas=(STANZA,), context={}, chunk_size=CHUNK)
    encrypted = io.BytesIO()
    encrypted.write(header.encode())
    encrypt_stream(Input(16 * CHUNK), encrypted, file_key, chunk_size=CHUNK)  # type: ignore[arg-type]
    encrypted.seek(0)
    opened = open_header(read_header(encrypted), KEY)
    sink = Sink()

    def run() -> None:
        decrypt_stream(encrypted, sink, opened, chunk_size=CHUNK)  # type: ignore[arg-type]

    peak = _peak_buffers(run)
    assert sink.count == 16 * CHUNK
    assert peak < 2.5, peak


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("grown", [1, 10, CHUNK_TAG_SIZE - 1, CHUNK_TAG_SIZE, CHUNK_TAG_SIZE + 1])
def test_input_a_few_bytes_longer_than_its_size_hint(threads: int, grown: int) -> None:
    """A file that grew by fewer bytes than a tag between stat and read encrypts to the same
    bytes as without the hint (the output buffer was sized to the hint, not to the record)."""
    hint = 100
    plaintext = os.urandom(hint + grown)
    _, file_key = new_header(KEY, stanzas=(STANZA,), context={}, chunk_size=4096)
    hinted, plain = io.BytesIO(), io.BytesIO()
    encrypt_stream(io.BytesIO(plaintext), hinted, file_key, chunk_size=4096, threads=threads, expected_size=hint)
    encrypt_stream(io.BytesIO(plaintext), plain, file_key, chunk_size=4096, threads=threads)
    assert hinted.getvalue() == plain.getvalue()
    assert len(hinted.getvalue()) == len(plaintext) + CHUNK_TAG_SIZE
