"""The key agent as real processes: socket permissions, peer checks, one KMS call for a loop of
CLI commands, expiry, a killed agent, hostile frames (docs/agent.md)."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from files_helpers import ALIAS
from kms_helpers import kmsenv_env, run_kmsenv
from kmsenv import format as fmt
from kmsenv._agent import MAX_FRAME, AgentKms, encode_frame, read_frame
from kmsenv.errors import ConfigError, KmsError
from kmsenv.kms.service import open_service

NOBODY = 65534
CONTEXT = {"project": "apollo"}


class Agent:
    """One ``kmsenv agent start --foreground`` process (stopped, if still alive, at teardown)."""

    def __init__(
        self, home: Path, sock: Path, *options: str, umask: int | None = None, env: dict[str, str] | None = None
    ) -> None:
        self.home, self.sock = home, sock
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kmsenv", "agent", "start", "--foreground", "--socket", str(sock), *options],
            env=kmsenv_env(home, ALIBABA_CLOUD_ECS_METADATA_DISABLED="true", **(env or {})),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=(lambda: os.umask(umask)) if umask is not None else None,  # noqa: PLW1509 - no threads use it
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # printed once the socket listens
        if not line:
            raise AssertionError(f"agent did not start: {self.proc.communicate(timeout=30)[1]}")
        assert line.strip() == f"export KMSENV_AGENT_SOCK={sock}"

    @property
    def client(self) -> AgentKms:
        return AgentKms(self.sock)

    def status(self) -> dict[str, Any]:
        return self.client.status()

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {"KMSENV_AGENT_SOCK": str(self.sock), "ALIBABA_CLOUD_ECS_METADATA_DISABLED": "true"}
        return run_kmsenv(self.home, *args, **env)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
        self.proc.communicate(timeout=30)


@pytest.fixture
def sockdir() -> Iterator[Path]:
    # Short and outside tmp_path: a Unix socket path is limited to 107 bytes.
    folder = Path(tempfile.mkdtemp(prefix="kag", dir="/tmp"))
    os.chmod(folder, 0o755)  # so that another uid may traverse it when a test loosens the agent folder
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def home(kms_home: Path) -> Path:
    service = open_service(kms_home, announce=False)
    key_id = service.create_key()["KeyMetadata"]["KeyId"]
    service.create_alias(alias_name=ALIAS, key_id=key_id)
    service.close()
    return kms_home


@pytest.fixture
def agent(home: Path, sockdir: Path) -> Iterator[Agent]:
    a = Agent(home, sockdir / "agent" / "agent.sock")
    yield a
    a.close()


def blobs(paths: list[Path]) -> set[str]:
    """The distinct wrapped data keys in these files: each came from one GenerateDataKey."""
    found = set()
    for path in paths:
        with path.open("rb") as f:
            found.add(fmt.read_header(f).stanzas[0].ciphertext_blob)
    return found


def raw_exchange(sock_path: Path, payload: bytes) -> dict[str, Any] | None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(sock_path))
        with contextlib.suppress(BrokenPipeError):  # the agent answered (a refusal) and closed first
            s.sendall(payload)
        return read_frame(s)


# ------------------------------------------------------------------------ permissions --


def test_socket_is_0600_in_a_0700_folder_under_umask_000(home: Path, sockdir: Path) -> None:
    loose = sockdir / "loose"
    loose.mkdir(mode=0o777)
    os.chmod(loose, 0o777)  # an existing folder of ours, too open: tightened, not trusted as is
    for folder in (sockdir / "fresh", loose):
        a = Agent(home, folder / "agent.sock", umask=0)
        try:
            assert stat.S_IMODE(os.stat(folder).st_mode) == 0o700
            info = os.lstat(a.sock)
            assert stat.S_ISSOCK(info.st_mode)
            assert stat.S_IMODE(info.st_mode) == 0o600
            assert info.st_uid == os.geteuid()
        finally:
            a.close()


def test_a_folder_of_another_user_is_refused(home: Path, sockdir: Path) -> None:
    theirs = sockdir / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    r = run_kmsenv(home, "agent", "start", "--socket", str(theirs / "agent.sock"))
    assert r.returncode == 9, r.stderr
    assert "belongs to uid 65534" in r.stderr
    assert not (theirs / "agent.sock").exists()


def test_the_agent_process_is_not_dumpable(agent: Agent) -> None:
    limits = Path(f"/proc/{agent.proc.pid}/limits").read_text().splitlines()
    (core,) = [line for line in limits if line.startswith("Max core file size")]
    assert core.split()[4:6] == ["0", "0"]
    # PR_GET_DUMPABLE can only be asked of oneself: run protect_memory in a forked child.
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        try:
            import ctypes

            from kmsenv._agent import protect_memory

            took = protect_memory()
            dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)  # PR_GET_DUMPABLE
            os.write(write_end, json.dumps([took, dumpable]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        took, dumpable = json.loads(f.read())
    os.waitpid(pid, 0)
    assert took is True
    assert dumpable == 0


def _as_nobody(sock_path: Path) -> dict[str, str]:
    """From a forked child running as uid nobody: what a raw connection and AgentKms each get."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the child
        result: dict[str, str] = {}
        try:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            try:
                answer = raw_exchange(sock_path, encode_frame({"v": 1, "op": "status"}))
                result["raw"] = json.dumps(answer)
            except OSError as exc:
                result["raw"] = f"OSError {exc.errno}"
            try:
                AgentKms(sock_path).status()
                result["client"] = "served"
            except ConfigError as exc:
                result["client"] = exc.message
        finally:
            os.write(write_end, json.dumps(result).encode())
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


def test_another_uid_is_refused(agent: Agent) -> None:
    # With the modes as created, the other user cannot even reach the socket.
    seen = _as_nobody(agent.sock)
    assert seen["raw"] == "OSError 13"
    assert "permission denied" in seen["client"]
    # Loosen both modes (a mistake, or a user who can): SO_PEERCRED still refuses the peer.
    os.chmod(agent.sock.parent, 0o711)
    os.chmod(agent.sock, 0o666)
    seen = _as_nobody(agent.sock)
    refused = json.loads(seen["raw"])
    assert refused["ok"] is False
    assert refused["error"]["class"] == "PeerRefused"
    # The client refuses too, before sending anything: the agent is not its own uid's.
    assert "served by uid 0, not by you" in seen["client"]
    status = agent.status()  # the owner is still served
    assert status["refused_peers"] == 2  # the raw connection and the client's (refused on both ends)


# ------------------------------------------------------------------------ one KMS call --


def test_a_loop_of_cli_encrypts_makes_one_generate_data_key(agent: Agent, tmp_path: Path) -> None:
    n = 5
    inputs = []
    for i in range(n):
        src = tmp_path / f"f{i}.csv"
        src.write_bytes(f"row {i}\n".encode() * (i + 1))
        inputs.append(src)
        r = agent.run("encrypt", "--key-id", ALIAS, "--context", "project=apollo", str(src))
        assert r.returncode == 0, r.stderr
    outputs = [p.with_name(p.name + ".cipher") for p in inputs]
    assert len(blobs(outputs)) == 1  # counted from the files: one wrapped data key for all
    status = agent.status()
    assert status["kms_calls"] == {"GenerateDataKey": 1}
    assert status["served_from_memory"] == {"GenerateDataKey": n - 1}

    for src, enc in zip(inputs, outputs, strict=True):
        out = tmp_path / (src.name + ".out")
        r = agent.run("decrypt", "--context", "project=apollo", str(enc), "-o", str(out))
        assert r.returncode == 0, r.stderr
        assert out.read_bytes() == src.read_bytes()
    status = agent.status()
    assert status["kms_calls"] == {"GenerateDataKey": 1, "Decrypt": 1}

    # The same loop without the agent: one data key per process.
    for src in inputs:
        r = agent.run("encrypt", "--no-agent", "--key-id", ALIAS, "-f", str(src))
        assert r.returncode == 0, r.stderr
    assert len(blobs(outputs)) == n


def test_two_cmks_and_rewrap_through_the_agent(agent: Agent, tmp_path: Path) -> None:
    service = open_service(agent.home, announce=False)
    second, third = (service.create_key()["KeyMetadata"]["KeyId"] for _ in range(2))
    service.close()
    files = []
    for i in range(3):
        src = tmp_path / f"r{i}.txt"
        src.write_text(f"rewrap me {i}\n")
        r = agent.run("encrypt", "--key-id", ALIAS, "--key-id", second, str(src))
        assert r.returncode == 0, r.stderr
        files.append(src.with_name(src.name + ".cipher"))
    assert len(blobs(files)) == 1
    # The second CMK's wrapping of the shared data key is asked once too.
    assert agent.status()["kms_calls"] == {"GenerateDataKey": 1, "Encrypt": 1}
    r = agent.run("rewrap", "--key-id", third, *map(str, files))
    assert r.returncode == 0, r.stderr
    # One Decrypt of the shared wrapped key, one ReEncrypt of it to the third CMK, for all files.
    assert agent.status()["kms_calls"] == {"GenerateDataKey": 1, "Encrypt": 1, "Decrypt": 1, "ReEncrypt": 1}
    out = tmp_path / "r2.out"
    r = agent.run("decrypt", "--no-agent", "--key-id", third, str(files[2]), "-o", str(out))
    assert r.returncode == 0, r.stderr
    assert out.read_text() == "rewrap me 2\n"


def test_concurrent_misses_coalesce_into_one_kms_call(agent: Agent) -> None:
    results: list[bytes] = []
    errors: list[BaseException] = []

    def one() -> None:
        try:
            results.append(agent.client.generate_data_key(ALIAS, encryption_context=CONTEXT).plaintext)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results)) == 1
    assert agent.status()["kms_calls"] == {"GenerateDataKey": 1}


def test_the_kms_still_decides_context_and_other_keys(agent: Agent) -> None:
    client = agent.client
    made = client.generate_data_key(ALIAS, encryption_context=CONTEXT)
    blob = made.wrapped.ciphertext_blob
    assert client.decrypt_data_key(blob, encryption_context=CONTEXT).plaintext == made.plaintext
    assert client.decrypt_data_key(blob, encryption_context=dict(CONTEXT)).plaintext == made.plaintext
    # The key is held for (blob, context): another context goes to the KMS, which refuses it,
    # every time (refusals are not cached).
    for _ in range(2):
        with pytest.raises(KmsError) as caught:
            client.decrypt_data_key(blob, encryption_context={"project": "other"})
        assert caught.value.code == "InvalidCiphertext"
    status = agent.status()
    assert status["kms_calls"] == {"GenerateDataKey": 1, "Decrypt": 3}
    assert status["served_from_memory"] == {"Decrypt": 1}
    # A key the KMS does not know stays unknown.
    with pytest.raises(KmsError) as caught:
        client.generate_data_key("alias/NoSuchKey", encryption_context=CONTEXT)
    assert caught.value.code == "Forbidden.AliasNotFound"


def test_no_key_material_in_anything_the_agent_prints(agent: Agent, tmp_path: Path) -> None:
    made = agent.client.generate_data_key(ALIAS, encryption_context=CONTEXT)
    agent.client.decrypt_data_key(made.wrapped.ciphertext_blob, encryption_context=CONTEXT)
    with pytest.raises(KmsError) as refused:
        agent.client.decrypt_data_key(made.wrapped.ciphertext_blob, encryption_context={"x": "y"})
    shown = [str(refused.value), json.dumps(agent.status())]
    for command in ("status", "flush", "stop"):
        r = run_kmsenv(agent.home, "agent", command, "--socket", str(agent.sock))
        assert r.returncode == 0, r.stderr
        shown += [r.stdout, r.stderr]
    out, err = agent.proc.communicate(timeout=30)
    shown += [out, err]
    secrets = [base64.b64encode(made.plaintext).decode(), made.plaintext.hex(), made.wrapped.ciphertext_blob]
    for text in shown:
        for secret in secrets:
            assert secret not in text


# --------------------------------------------------------------------------- lifetime --


def test_keys_expire_after_the_ttl(home: Path, sockdir: Path, tmp_path: Path) -> None:
    a = Agent(home, sockdir / "a" / "agent.sock", "--ttl", "0.5")
    try:
        first = a.client.generate_data_key(ALIAS, encryption_context=CONTEXT)
        assert a.status()["keys_held"] == 1
        deadline = time.monotonic() + 60
        while a.status()["keys_held"] and time.monotonic() < deadline:
            time.sleep(0.1)
        status = a.status()
        assert status["keys_held"] == 0
        assert status["keys_wiped"] == 1
        second = a.client.generate_data_key(ALIAS, encryption_context=CONTEXT)
        assert second.wrapped.ciphertext_blob != first.wrapped.ciphertext_blob
        assert a.status()["kms_calls"] == {"GenerateDataKey": 2}
    finally:
        a.close()


def test_max_uses_bounds_reuse(home: Path, sockdir: Path) -> None:
    a = Agent(home, sockdir / "a" / "agent.sock", "--max-uses", "2")
    try:
        keys = [a.client.generate_data_key(ALIAS, encryption_context=CONTEXT) for _ in range(5)]
        assert len({k.wrapped.ciphertext_blob for k in keys}) == 3  # uses 1-2, 3-4, 5
        assert a.status()["kms_calls"] == {"GenerateDataKey": 3}
    finally:
        a.close()


def test_detached_start_status_and_stop(home: Path, sockdir: Path) -> None:
    sock = sockdir / "d" / "agent.sock"
    r = run_kmsenv(home, "agent", "start", "--socket", str(sock), "--ttl", "10m")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"export KMSENV_AGENT_SOCK={sock}"
    status = json.loads(run_kmsenv(home, "agent", "status", "--socket", str(sock)).stdout)
    pid = status["pid"]
    assert status["limits"]["ttl"] == 600.0
    assert status["kms"] == f"embedded KMSENV_HOME={home}"
    AgentKms(sock).generate_data_key(ALIAS, encryption_context=CONTEXT)
    again = run_kmsenv(home, "agent", "start", "--socket", str(sock))
    assert again.returncode == 9
    assert "already running" in again.stderr
    r = run_kmsenv(home, "agent", "stop", "--socket", str(sock))
    assert r.returncode == 0, r.stderr
    assert "1 key(s) wiped" in r.stderr
    assert not sock.exists()
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (its parent, the detaching kmsenv, has exited) counts as gone.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_sigterm_stops_cleanly_and_removes_the_socket(agent: Agent) -> None:
    agent.client.generate_data_key(ALIAS, encryption_context=CONTEXT)
    agent.proc.terminate()
    assert agent.proc.wait(timeout=30) == 0
    assert not agent.sock.exists()


def test_detached_start_creates_the_embedded_kms_where_the_user_sees_it(kms_home: Path, sockdir: Path) -> None:
    sock = sockdir / "n" / "agent.sock"
    r = run_kmsenv(kms_home, "agent", "start", "--socket", str(sock))
    try:
        assert r.returncode == 0, r.stderr
        assert "back up the root key" in r.stderr
    finally:
        run_kmsenv(kms_home, "agent", "stop", "--socket", str(sock))


def test_a_killed_agent_is_a_clear_error(agent: Agent, tmp_path: Path) -> None:
    src = tmp_path / "a.txt"
    src.write_text("hello\n")
    agent.proc.send_signal(signal.SIGKILL)
    agent.proc.wait(timeout=30)
    r = agent.run("encrypt", "--key-id", ALIAS, str(src))
    assert r.returncode == 9
    assert f"the kmsenv agent at {agent.sock} is not running" in r.stderr
    assert "--no-agent" in r.stderr
    assert not (tmp_path / "a.txt.cipher").exists()
    r = agent.run("encrypt", "--no-agent", "--key-id", ALIAS, str(src))
    assert r.returncode == 0, r.stderr
    # A new agent replaces the killed one's stale socket.
    b = Agent(agent.home, agent.sock)
    try:
        assert b.status()["keys_held"] == 0
    finally:
        b.close()


def test_agent_selection_rules(home: Path, tmp_path: Path) -> None:
    missing = str(tmp_path / "no-agent.sock")
    # kmsenv kms never goes through the agent: raw Actions return what the KMS returns.
    r = run_kmsenv(home, "kms", "GenerateDataKey", "--KeyId", ALIAS, KMSENV_AGENT_SOCK=missing)
    assert r.returncode == 0, r.stderr
    # --agent names no KMS of its own.
    src = tmp_path / "a.txt"
    src.write_text("x")
    r = run_kmsenv(home, "encrypt", "--agent", "--endpoint", "127.0.0.1:9", "--key-id", ALIAS, str(src))
    assert r.returncode == 2
    assert "--agent cannot be combined" in r.stderr
    # --agent without KMSENV_AGENT_SOCK uses the default socket: none there, a clear error.
    r = run_kmsenv(home, "encrypt", "--agent", "--key-id", ALIAS, str(src), XDG_RUNTIME_DIR=str(tmp_path))
    assert r.returncode == 9
    assert f"{tmp_path}/kmsenv/agent.sock is not running" in r.stderr


# ------------------------------------------------------------------------ bad frames --


def test_bad_frames_are_refused_and_the_agent_keeps_serving(agent: Agent) -> None:
    length = struct.Struct(">I")
    cases = {
        "too long": length.pack(MAX_FRAME + 1),
        "huge": length.pack(0xFFFFFFFF),
        "empty": length.pack(0),
        "not json": length.pack(5) + b"{nope",
        "not utf-8": length.pack(2) + b"\xff\xfe",
        "not an object": length.pack(2) + b"[]",
        "old version": encode_frame({"v": 0, "op": "status"}),
        "unknown op": encode_frame({"v": 1, "op": "dump_keys"}),
        # Found by tests/test_agent_fuzz.py: an unhashable op or action raised TypeError in the
        # set lookup, so the connection died unanswered; and JSON true passed for version 1.
        "list op": encode_frame({"v": 1, "op": []}),
        "object action": encode_frame({"v": 1, "op": "call", "action": {}, "params": {}}),
        "true version": encode_frame({"v": True, "op": "status"}),
        "other action": encode_frame({"v": 1, "op": "call", "action": "ScheduleKeyDeletion", "params": {}}),
        "bad params": encode_frame({"v": 1, "op": "call", "action": "Decrypt", "params": {"CiphertextBlob": 1}}),
        "many params": encode_frame(
            {"v": 1, "op": "call", "action": "Decrypt", "params": {str(i): "x" for i in range(33)}}
        ),
    }
    for name, payload in cases.items():
        answer = raw_exchange(agent.sock, payload)
        assert answer is not None, name
        assert answer["ok"] is False, name
        assert answer["error"]["class"] == "ProtocolError", name
    # Half a frame, then the client goes away: nothing to answer, nothing breaks.
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(str(agent.sock))
        s.sendall(length.pack(100) + b"{")
    status = agent.status()
    assert status["keys_held"] == 0
    assert agent.client.generate_data_key(ALIAS, encryption_context=CONTEXT).plaintext
    assert agent.proc.poll() is None
