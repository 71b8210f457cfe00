"""``kmsenv encrypt/decrypt/inspect/migrate``: the reference flow end to end, exit codes, messages,
stdin/stdout, no leftovers (even after ``kill -9``), and inspect without a KMS."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from files_helpers import ALIAS, CHUNK, CONTEXT, SALES, digest, flip, names, sample_encrypt
from kmsenv import format as fmt
from kmsenv.cli import main
from kmsenv.cli.files import default_decrypt_output, default_encrypt_output, default_migrate_output
from kmsenv.clients import EmbeddedKms


def kmsenv(
    *args: str, home: Path, stdin: bytes | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    """The real CLI in a subprocess."""
    env = {**os.environ, "KMSENV_HOME": str(home)}
    return subprocess.run(
        [sys.executable, "-m", "kmsenv", *args],
        input=stdin,
        capture_output=True,
        env=env,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


@pytest.fixture
def plain(tmp_path: Path) -> Path:
    path = tmp_path / "sales.csv"
    path.write_bytes(SALES * 40)  # several 4 KiB chunks
    return path


@pytest.fixture
def cipher(plain: Path, key: str, capsys: pytest.CaptureFixture[str]) -> Path:
    rc, _, err = cli(capsys, "encrypt", "--key-id", ALIAS, "--chunk-size", "4K", *_context_args(CONTEXT), str(plain))
    assert (rc, err) == (0, "")
    return plain.with_name("sales.csv.cipher")


def _context_args(context: dict[str, str]) -> list[str]:
    return [arg for k, v in context.items() for arg in ("--context", f"{k}={v}")]


# ------------------------------------------------------------------------- end to end --


def test_reference_flow(tmp_path: Path) -> None:
    """The reference document's steps: CreateKey, CreateAlias, encrypt sales.csv, decrypt, compare."""
    home, data = tmp_path / "home", tmp_path / "data"
    data.mkdir()
    (data / "sales.csv").write_bytes(SALES)
    created = kmsenv("kms", "CreateKey", home=home)
    assert created.returncode == 0, created.stderr
    key_id = json.loads(created.stdout)["KeyMetadata"]["KeyId"]
    alias = kmsenv("kms", "CreateAlias", "--AliasName", ALIAS, "--KeyId", key_id, home=home)
    assert alias.returncode == 0, alias.stderr

    enc = kmsenv("encrypt", "--key-id", ALIAS, "data/sales.csv", home=home, cwd=tmp_path)
    assert (enc.returncode, enc.stderr) == (0, b"")
    assert (data / "sales.csv.cipher").read_bytes().startswith(fmt.MAGIC)

    dec = kmsenv("decrypt", "data/sales.csv.cipher", "-o", "data/decrypted_sales.csv", home=home, cwd=tmp_path)
    assert (dec.returncode, dec.stderr) == (0, b"")
    assert (data / "decrypted_sales.csv").read_bytes() == SALES

    (data / "sales.csv").unlink()  # the default output: INPUT without .cipher
    dec = kmsenv("decrypt", "data/sales.csv.cipher", home=home, cwd=tmp_path)
    assert dec.returncode == 0, dec.stderr
    assert (data / "sales.csv").read_bytes() == SALES


def test_stdin_to_stdout(tmp_path: Path, key: str, kms: EmbeddedKms) -> None:
    home = Path(os.environ["KMSENV_HOME"])
    enc = kmsenv("encrypt", "--key-id", key, "-", home=home, stdin=SALES)
    assert enc.returncode == 0, enc.stderr
    assert enc.stdout.startswith(fmt.MAGIC)
    dec = kmsenv("decrypt", "-", home=home, stdin=enc.stdout)
    assert (dec.returncode, dec.stdout) == (0, SALES)


def test_stdout_failure_mid_stream_keeps_only_verified_chunks(
    cipher: Path, plain: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Documented: with OUTPUT '-', chunks before a bad one are out, then exit 7."""
    flip(cipher, cipher.stat().st_size - 1)  # the last chunk's tag
    home = Path(os.environ["KMSENV_HOME"])
    dec = kmsenv("decrypt", str(cipher), "-o", "-", home=home)
    assert dec.returncode == 7
    assert b"kmsenv: error: payload failed authentication" in dec.stderr
    out = dec.stdout
    assert len(out) % CHUNK == 0 and len(out) < plain.stat().st_size
    assert out == plain.read_bytes()[: len(out)]


def test_kill_9_during_decrypt_leaves_nothing(tmp_path: Path, key: str, kms: EmbeddedKms, outdir: Path) -> None:
    """The output is an O_TMPFILE: killed mid-write, no partial plaintext remains under any name."""
    if not getattr(os, "O_TMPFILE", 0):
        pytest.skip("no O_TMPFILE on this platform")
    from kmsenv import envelope

    src, enc = tmp_path / "big", tmp_path / "big.cipher"
    src.write_bytes(os.urandom(8 * 1024 * 1024))
    envelope.encrypt_file(src, enc, kms=kms, key_id=key, chunk_size=64 * 1024)
    ciphertext = enc.read_bytes()
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    env = {**os.environ}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsenv", "decrypt", str(fifo), "-o", str(outdir / "big")],
        env=env,
        stderr=subprocess.DEVNULL,
    )
    try:
        with open(fifo, "wb") as feed:  # half the file, then the writer stalls: decrypt is mid-way
            feed.write(ciphertext[: len(ciphertext) // 2])
            feed.flush()
            written = _wait_for_anonymous_output(proc, outdir)
            assert written > 0  # verified plaintext is in the file being built...
            assert names(outdir) == []  # ...which has no name
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert names(outdir) == []


def _wait_for_anonymous_output(proc: subprocess.Popen[bytes], outdir: Path) -> int:
    """Bytes in the process's unnamed output file in ``outdir``, once there are some."""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"kmsenv decrypt ended early with {proc.returncode}")
        fd_dir = Path(f"/proc/{proc.pid}/fd")
        for fd in fd_dir.iterdir():
            try:
                if os.readlink(fd).startswith(f"{outdir}/#") and fd.stat().st_size > 0:
                    return fd.stat().st_size
            except OSError:
                continue  # fds come and go
        time.sleep(0.01)
    pytest.fail("no output file appeared")


def test_import_kmsenv_stays_cheap() -> None:
    code = "import sys, kmsenv; print(any(m.split('.')[0] in ('cryptography', 'Crypto') for m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


# ------------------------------------------------------------------- errors and codes --


def _damaged(data: bytes, damage: str) -> bytes:
    h = fmt.parse_header(data)[1]
    if damage == "flip chunk":
        return data[: h + 10] + bytes([data[h + 10] ^ 1]) + data[h + 11 :]
    if damage == "flip salt":
        return data[:20] + bytes([data[20] ^ 0x80]) + data[21:]
    return {"truncate": data[:-CHUNK], "append": data + b"\n", "empty": b"", "not kmsenv": SALES}[damage]


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ("flip chunk", (7, "payload failed authentication")),
        ("flip salt", (7, "header failed authentication")),
        ("truncate", (7, "payload failed authentication")),
        ("append", (7, "payload failed authentication")),
        ("empty", (6, "not a kmsenv encrypted file: the input is empty")),
        ("not kmsenv", (6, "not a kmsenv encrypted file")),
    ],
)
def test_bad_input_exit_codes(
    cipher: Path, outdir: Path, capsys: pytest.CaptureFixture[str], damage: str, expected: tuple[int, str]
) -> None:
    cipher.write_bytes(_damaged(cipher.read_bytes(), damage))
    before = digest(cipher)
    rc, out, err = cli(capsys, "decrypt", str(cipher), "-o", str(outdir / "sales.csv"))
    assert rc == expected[0]
    assert err.startswith(f"kmsenv: error: {expected[1]}")
    assert out == ""
    assert names(outdir) == []
    assert digest(cipher) == before


@pytest.mark.parametrize(
    ("context", "message"),
    [(["project=hermes"], "another value for 'project'"), (["owner=bob"], "no key 'owner'")],
)
def test_wrong_or_missing_context_exits_8(
    cipher: Path, outdir: Path, capsys: pytest.CaptureFixture[str], context: list[str], message: str
) -> None:
    args = [a for pair in context for a in ("--context", pair)]
    rc, _, err = cli(capsys, "decrypt", str(cipher), "-o", str(outdir / "p"), *args)
    assert rc == 8
    assert message in err
    assert "kmsenv: hint: `kmsenv inspect FILE` shows" in err
    assert names(outdir) == []


def test_matching_context_decrypts(cipher: Path, plain: Path, outdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "decrypt", str(cipher), "-o", str(outdir / "p"), *_context_args(CONTEXT))
    assert (rc, err) == (0, "")
    assert (outdir / "p").read_bytes() == plain.read_bytes()


def test_disabled_cmk_exits_3(
    cipher: Path, outdir: Path, kms: EmbeddedKms, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    kms.service.disable_key(key_id=key)
    rc, _, err = cli(capsys, "decrypt", str(cipher), "-o", str(outdir / "p"))
    assert rc == 3
    assert err.startswith("kmsenv: error: Rejected.Disabled:")
    assert names(outdir) == []


def test_folder_as_input_exits_4(tmp_path: Path, outdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "decrypt", str(tmp_path), "-o", str(outdir / "p"))
    assert rc == 4
    assert "is a folder" in err


def test_missing_input_exits_4_without_creating_a_kms(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "fresh-home"
    monkeypatch.setenv("KMSENV_HOME", str(home))
    rc, _, err = cli(capsys, "encrypt", "--key-id", ALIAS, str(tmp_path / "nope.csv"))
    assert rc == 4
    assert "does not exist" in err
    assert not home.exists()


def test_unwritable_output_folder_exits_5(cipher: Path, readonly_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "decrypt", str(cipher), "-o", str(readonly_dir / "p"))
    assert rc == 5
    assert "cannot write in the output folder" in err
    assert names(readonly_dir) == []


def test_existing_output_needs_force(cipher: Path, plain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    plain.write_bytes(b"edited since")
    rc, _, err = cli(capsys, "decrypt", str(cipher))  # default output: sales.csv, which exists
    assert rc == 5
    assert "already exists" in err and "kmsenv: hint: pass --force" in err
    assert plain.read_bytes() == b"edited since"
    assert sorted(names(plain.parent)) == sorted(["sales.csv", "sales.csv.cipher", "kmshome"])
    rc, _, _ = cli(capsys, "decrypt", str(cipher), "--force")
    assert rc == 0
    assert plain.read_bytes() == SALES * 40


@pytest.mark.parametrize(
    "args",
    [["--context", "novalue"], ["--context", "=v"], ["--context", "a=1", "--context", "a=2"], ["--chunk-size", "5000"]],
)
def test_usage_errors_exit_2(plain: Path, key: str, capsys: pytest.CaptureFixture[str], args: list[str]) -> None:
    rc, _, err = cli(capsys, "encrypt", "--key-id", ALIAS, *args, str(plain))
    assert rc == 2
    assert err.startswith("kmsenv: error: ")
    assert not plain.with_name("sales.csv.cipher").exists()


def test_chunk_size_suffixes(plain: Path, key: str, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, _ = cli(capsys, "encrypt", "--key-id", ALIAS, "--chunk-size", "64K", str(plain), "-o", str(plain) + ".c")
    assert rc == 0
    assert fmt.parse_header(Path(str(plain) + ".c").read_bytes())[0].chunk_size == 65536


def test_default_output_names() -> None:
    assert default_encrypt_output("data/sales.csv") == "data/sales.csv.cipher"
    assert default_encrypt_output("-") == "-"
    assert default_decrypt_output("data/sales.csv.cipher") == "data/sales.csv"
    assert default_decrypt_output("data/sales.bin") == "data/sales.bin.decrypted"
    assert default_decrypt_output("data/.cipher") == "data/.cipher.decrypted"
    assert default_decrypt_output("-") == "-"
    assert default_migrate_output("data/sales.csv.cipher") == "data/sales.csv.v1.cipher"
    assert default_migrate_output("old.enc") == "old.enc.v1.cipher"


# ---------------------------------------------------------------------------- inspect --


def test_inspect_needs_no_kms(
    cipher: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    empty_home = tmp_path / "empty-home"
    empty_home.mkdir()
    monkeypatch.setenv("KMSENV_HOME", str(empty_home))

    rc, out, err = cli(capsys, "inspect", str(cipher), "--json")
    assert (rc, err) == (0, "")
    facts = json.loads(out)
    assert facts["format"] == "kmsenv" and facts["format_version"] == 2  # what encrypt writes
    assert facts["context"] == CONTEXT
    assert facts["chunk_size"] == CHUNK
    assert facts["plaintext_size"] == len(SALES) * 40
    assert facts["wrapped_keys"][0]["key_arn"].startswith("acs:kms:")
    assert "ciphertext_blob" not in json.dumps(facts)
    slot = facts["key_slot"]
    assert (slot["active"], slot["generation"]) == ("A", 1)
    assert 0 < slot["used"] < slot["capacity"] and slot["free"] == slot["capacity"] - slot["used"]

    rc, out, _ = cli(capsys, "inspect", str(cipher))
    assert rc == 0
    assert "format:         kmsenv v2" in out
    assert (
        f"key slot:       A (generation 1), {slot['used']} of {slot['capacity']} bytes used, {slot['free']} free: "
        f"~{slot['more_keys']} more wrapped key(s) fit in place"
    ) in out
    assert "context:        dept=sales, project=apollo" in out
    assert f"plaintext size: {len(SALES) * 40} bytes" in out
    assert facts["wrapped_keys"][0]["key_arn"] in out
    assert list(empty_home.iterdir()) == []  # no store, no root key


def test_inspect_escapes_control_characters(
    tmp_path: Path, key: str, kms: EmbeddedKms, capsys: pytest.CaptureFixture[str]
) -> None:
    from kmsenv import envelope

    src = tmp_path / "p"
    src.write_bytes(b"x")
    envelope.encrypt_file(src, tmp_path / "c", kms=kms, key_id=key, context={"note": "\x1b[2Jgotcha"})
    rc, out, _ = cli(capsys, "inspect", str(tmp_path / "c"))
    assert rc == 0
    assert "\x1b" not in out
    assert '"\\u001b[2Jgotcha"' in out


def test_inspect_of_a_non_kmsenv_file_exits_6(plain: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, _, err = cli(capsys, "inspect", str(plain))
    assert rc == 6
    assert "not a kmsenv encrypted file" in err


# ---------------------------------------------------------------------------- legacy --


def test_legacy_decrypt_and_migrate(
    tmp_path: Path, kms: EmbeddedKms, key: str, capsys: pytest.CaptureFixture[str]
) -> None:
    legacy_file = sample_encrypt(kms, tmp_path)
    before = digest(legacy_file)

    rc, out, err = cli(capsys, "decrypt", str(legacy_file), "-o", "-")
    assert (rc, err) == (0, "")
    assert out.encode() == SALES

    rc, _, err = cli(capsys, "migrate", str(legacy_file))
    assert (rc, err) == (0, "")
    migrated = tmp_path / "sales.csv.v1.cipher"
    assert migrated.read_bytes().startswith(fmt.MAGIC)
    assert digest(legacy_file) == before

    rc, _, err = cli(capsys, "decrypt", str(migrated), "-o", str(tmp_path / "again.csv"))
    assert (rc, err) == (0, "")
    assert (tmp_path / "again.csv").read_bytes() == SALES

    rc, out, _ = cli(capsys, "inspect", str(legacy_file), "--json")
    assert json.loads(out)["format"] == "legacy-aes-eax"


# ------------------------------------------------------------------------ remote KMS --


@pytest.mark.slow
def test_remote_kms_through_endpoint(tmp_path: Path) -> None:
    """--endpoint plugs a kmsenv server in; its files decrypt with the embedded KMS of that home."""
    from test_server_harness import shared_server

    server = shared_server()
    key_id = json.loads(server.cli("kms", "CreateKey").stdout)["KeyMetadata"]["KeyId"]
    (tmp_path / "sales.csv").write_bytes(SALES)
    unused_home = tmp_path / "not-used"
    remote = [
        "--endpoint",
        server.endpoint,
        "--insecure-http",
    ]
    env = {
        **os.environ,
        "KMSENV_HOME": str(unused_home),
        "ALIBABA_CLOUD_ACCESS_KEY_ID": server.access_key_id,
        "ALIBABA_CLOUD_ACCESS_KEY_SECRET": server.secret,
    }
    enc = subprocess.run(
        [
            sys.executable,
            "-m",
            "kmsenv",
            "encrypt",
            "--key-id",
            key_id,
            "--context",
            "via=server",
            "sales.csv",
            *remote,
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert enc.returncode == 0, enc.stderr
    assert not unused_home.exists()

    dec = kmsenv("decrypt", "sales.csv.cipher", "-o", "-", "--context", "via=server", home=server.home, cwd=tmp_path)
    assert (dec.returncode, dec.stdout) == (0, SALES)
