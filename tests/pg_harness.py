"""A throwaway PostgreSQL cluster for the tests, and the fixtures that hand out its databases.

The cluster is made with the server binaries of Debian's ``postgresql`` package
(``/usr/lib/postgresql/<version>/bin``, or ``initdb``/``pg_ctl`` on PATH) in a fresh temporary
folder, listens on a free loopback port only, and is stopped and removed when the test session
ends. PostgreSQL refuses to run as root, so as root (CI) it runs as the unprivileged ``postgres``
user the package creates (``runuser -u postgres``); otherwise as the current user. A missing
PostgreSQL is an error, never a skip: ``scripts/test.sh`` installs it.

Test modules import the fixtures: ``pg_cluster`` (one per session, shared by every module),
``pg_url`` (a new empty database per test) and ``pg_url_factory`` (more of them).

For tests of several ``kmsenv server`` processes on one database: :func:`start_node` starts one
(its own home and port, a given root key), :func:`kill_node` ``kill -9``s it; ``Cluster.restart``
and ``Cluster.kill`` stop the database server itself (immediate mode: a crash, as far as the
database's clients can tell).
"""

from __future__ import annotations

import atexit
import contextlib
import getpass
import glob
import itertools
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from kmsenv.kms.service import KmsService

RUN_AS_ROOT_USER = "postgres"


def find_bin_dir() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl`` (the newest Debian version first)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name), reverse=True)
    for folder in candidates:
        if Path(folder, "initdb").exists() and Path(folder, "pg_ctl").exists():
            return Path(folder)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return Path(initdb).parent
    raise RuntimeError(
        "PostgreSQL server binaries (initdb, pg_ctl) not found: the PostgreSQL tests need them. "
        "Install them with `apt-get install -y postgresql` (scripts/test.sh does this as root)."
    )


def free_port() -> int:
    """A loopback port nothing listens on (the socket that found it is closed again)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Cluster:
    """One running PostgreSQL server in a temporary folder; :meth:`stop` removes every trace.

    ``durable``: keep PostgreSQL's disk flushes (``fsync``, full page writes), as a production
    server would; benchmarks want it, tests do not need it."""

    def __init__(self, *, durable: bool = False) -> None:
        self.bin = find_bin_dir()
        self.as_root = os.geteuid() == 0
        self.user = RUN_AS_ROOT_USER if self.as_root else getpass.getuser()
        self.dir = Path(tempfile.mkdtemp(prefix="kmsenv-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._names = itertools.count(1)
        self._stopped = False
        if self.as_root:
            try:
                account = pwd.getpwnam(RUN_AS_ROOT_USER)
            except KeyError:
                shutil.rmtree(self.dir)
                raise RuntimeError(
                    f"running as root, the PostgreSQL tests start the server as the user {RUN_AS_ROOT_USER!r}, "
                    "which Debian's postgresql package creates: `apt-get install -y postgresql`"
                ) from None
            os.chown(self.dir, account.pw_uid, account.pw_gid)
        atexit.register(self.stop)
        self._run("initdb", "-D", str(self.data), "-U", self.user, "--auth=trust", "-E", "UTF8", "--no-sync")
        self._options = " ".join(
            [
                "-c listen_addresses=127.0.0.1",
                f"-c port={self.port}",
                f"-c unix_socket_directories={self.dir}",
                "-c max_connections=300",
            ]
            # A throwaway cluster: nothing to keep across a crash of the machine, so skip the
            # disk flushes. (A killed server process loses nothing: the OS keeps its writes.)
            + ([] if durable else ["-c fsync=off", "-c full_page_writes=off"])
        )
        self.start()

    def _run(self, tool: str, *args: str) -> None:
        command = [str(self.bin / tool), *args]
        if self.as_root:
            command = ["runuser", "-u", RUN_AS_ROOT_USER, "--", *command]
        result = subprocess.run(command, cwd=self.dir, capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            log = self.dir / "server.log"
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
            raise RuntimeError(f"{tool} failed ({result.returncode}): {result.stderr.strip()}\n{tail}")

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{dbname}"

    def create_database(self, options: str = "") -> str:
        """A new, empty database (``options``: more of CREATE DATABASE); returns its URL."""
        name = f"kms_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}" {options}')
        return self.url(name)

    def _ctl(self, *args: str) -> None:
        self._run("pg_ctl", "-D", str(self.data), *args)

    def kill(self) -> None:
        """Stop the server without a checkpoint (``-m immediate``): its clients see a crash."""
        self._ctl("-m", "immediate", "-w", "stop")

    def start(self) -> None:
        """Start the server (again after :meth:`kill`: same port, WAL recovery runs first)."""
        self._ctl("-l", str(self.dir / "server.log"), "-w", "-t", "60", "-o", self._options, "start")

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if (self.data / "postmaster.pid").exists():
            with contextlib.suppress(RuntimeError):
                self._run("pg_ctl", "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.dir, ignore_errors=True)


def install_schema(url: str, version: int) -> None:
    """Give the database at ``url`` the schema as of ``version``, as an older kmsenv left it."""
    from kmsenv.kms.pg_store import pg_migrations

    with psycopg.connect(url) as conn:
        for sql in pg_migrations()[:version]:
            for statement in sql.split(";"):
                if statement.strip():
                    conn.execute(statement)
        conn.execute("INSERT INTO meta(name, value) VALUES ('schema_version', %s)", (str(version).encode(),))


_cluster: Cluster | None = None


def cluster() -> Cluster:
    """The session's cluster, started on first use (one for every module that imports this)."""
    global _cluster  # noqa: PLW0603 (one server per test session, whichever module asks first)
    if _cluster is None:
        _cluster = Cluster()
    return _cluster


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Cluster]:
    yield cluster()
    # The cluster outlives this fixture's scope in other modules' copies of it; atexit stops it.


@pytest.fixture
def pg_url_factory(pg_cluster: Cluster) -> Callable[[], str]:
    return pg_cluster.create_database


@pytest.fixture
def pg_url(pg_url_factory: Callable[[], str]) -> str:
    return pg_url_factory()


# ------------------------------------------------------------------------------- server nodes --
def node_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment of a node or CLI run: the caller's, minus its KMSENV_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSENV_")}
    env["KMSENV_HOME"] = str(home)
    env["ALIBABA_CLOUD_ECS_METADATA_DISABLED"] = "true"
    env.update(extra)
    return env


def kmsenv(home: Path, *args: str, check: bool = True, **extra: str) -> subprocess.CompletedProcess[str]:
    """``python -m kmsenv <args>`` with ``KMSENV_HOME=home`` (and ``extra`` variables)."""
    result = subprocess.run(
        [sys.executable, "-m", "kmsenv", *args],
        env=node_env(home, **extra),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    if check and result.returncode != 0:
        raise RuntimeError(f"kmsenv {' '.join(args)} failed ({result.returncode}): {result.stderr}")
    return result


#: For nodes under test load: the per-AccessKey rate limit off (it would refuse a load test's
#: bursts with Rejected.Throttling, which is not what these tests are about).
NO_RATE_LIMIT = ("--rate-limit", "0")


class Node:
    """One ``kmsenv server`` process: its home, port, process and log."""

    def __init__(self, root: Path, args: tuple[str, ...], extra_env: dict[str, str], port: int | None = None) -> None:
        self.root = root
        self.home = root / "home"
        self.args = args
        self.extra_env = extra_env
        self.port = port or free_port()
        self.log = root / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}/"

    def start(self, timeout: float = 60) -> Node:
        import httpx

        command = [sys.executable, "-m", "kmsenv", "server", "--host", "127.0.0.1", "--port", str(self.port)]
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(
                [*command, *self.args],
                env=node_env(self.home, **self.extra_env),
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # kill_node takes its workers with it
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the node exited ({self.proc.returncode}): {self.log.read_text()[-3000:]}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}health", timeout=2).status_code == 200:
                    return self
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"the node did not become ready: {self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        """``kill -9`` the node and its workers (its process group)."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM (graceful), then SIGKILL if it takes too long."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()


def start_node(
    root: Path, *args: str, root_key: Path | None = None, port: int | None = None, **extra_env: str
) -> Node:
    """Start ``kmsenv server <args>`` with its home in ``root/home`` (given ``root_key``, copied in
    0600), on a free loopback port; returns once ``/health`` answers 200."""
    home = root / "home"
    home.mkdir(parents=True, exist_ok=True, mode=0o700)
    if root_key is not None and not (home / "root.key").exists():
        shutil.copy2(root_key, home / "root.key")
        (home / "root.key").chmod(0o600)
    return Node(root, args, extra_env, port).start()


@contextlib.contextmanager
def signed_nodes(root: Path, url: str, workers: list[int]) -> Iterator[tuple[list[Node], tuple[str, str], Path]]:
    """One ``kmsenv server`` per entry of ``workers`` (its worker count) on the database ``url``,
    in ``root/a``, ``root/b``, ...; the first node's home makes the root key and an AccessKey the
    others share. Yields (nodes, (AccessKeyId, AccessKeySecret), the first node's home); always
    stops the nodes."""
    home = root / "a" / "home"
    created = json.loads(kmsenv(home, "access-key", "create", KMSENV_STORE=url).stdout)
    nodes: list[Node] = []
    try:
        for n, count in enumerate(workers):
            extra = ("--workers", str(count)) if count != 1 else ()
            shared_key = None if n == 0 else home / "root.key"
            nodes.append(start_node(root / chr(ord("a") + n), "--store", url, *extra, root_key=shared_key))
        yield nodes, (created["AccessKeyId"], created["AccessKeySecret"]), home
    finally:
        for node in nodes:
            node.stop()


# --------------------------------------------------------------------------------- crash load --
class Ledger:
    """What a :class:`Load` was told: acknowledged writes, refusals, calls with no answer."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.keys: list[str] = []  # CreateKey answered 200
        self.aliases: dict[str, str] = {}  # CreateAlias answered 200: alias → key id
        self.refused_aliases: dict[str, tuple[str, str]] = {}  # alias → (key id, the error code)
        self.unknown_aliases: dict[str, str] = {}  # no answer (connection lost): alias → key id
        self.blobs: list[tuple[str, str]] = []  # Encrypt/GenerateDataKey answered 200: (blob, plaintext)
        self.codes: Counter[str] = Counter()
        self.no_answer = 0
        self.slowest_refusal_s = 0.0  # the longest an error answer took

    def assert_acknowledged(self, service: KmsService) -> None:
        """Every write the load was told succeeded is in ``service``, and right."""
        for key_id in self.keys:
            assert service.describe_key(key_id=key_id)["KeyMetadata"]["KeyState"] == "Enabled"
        for alias, key_id in self.aliases.items():
            assert service.describe_key(key_id=alias)["KeyMetadata"]["KeyId"] == key_id
        for blob, plaintext in self.blobs:
            assert service.decrypt(ciphertext_blob=blob)["Plaintext"] == plaintext


class Load:
    """Signed requests (v1, raw HTTP) from ``threads`` threads, round robin over ``nodes``, until
    :meth:`stop`: CreateKey, CreateAlias (a new name each time), Encrypt and GenerateDataKey, each
    outcome written to the :class:`Ledger`."""

    ACTIONS = ("CreateKey", "CreateAlias", "Encrypt", "GenerateDataKey")

    def __init__(self, nodes: list[Node], creds: tuple[str, str], key_id: str, *, threads: int = 4) -> None:
        self.nodes = nodes
        self.creds = creds
        self.key_id = key_id
        self.ledger = Ledger()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(threads)]
        for thread in self._threads:
            thread.start()

    def stop(self) -> Ledger:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=60)
        return self.ledger

    def _run(self, number: int) -> None:
        import httpx

        from test_server_harness import sign_v1

        ledger = self.ledger
        with httpx.Client(timeout=20) as client:
            for i in itertools.count():
                if self._stop.is_set():
                    return
                node = self.nodes[(number + i) % len(self.nodes)]
                action = self.ACTIONS[i % len(self.ACTIONS)]
                params: dict[str, str] = {}
                if action == "CreateAlias":
                    params = {"AliasName": f"alias/crash/{number}-{i}", "KeyId": self.key_id}
                elif action == "Encrypt":
                    params = {"KeyId": self.key_id, "Plaintext": f"plaintext {number}-{i}"}
                elif action == "GenerateDataKey":
                    params = {"KeyId": self.key_id}
                started = time.monotonic()
                try:
                    reply = client.post(node.url, params=sign_v1(*self.creds, action, params))
                    body = reply.json()
                except (httpx.HTTPError, ValueError):
                    with ledger.lock:
                        ledger.no_answer += 1
                        if action == "CreateAlias":
                            ledger.unknown_aliases[params["AliasName"]] = self.key_id
                    time.sleep(0.01)  # a dead node refuses at once: do not spin
                    continue
                took = time.monotonic() - started
                with ledger.lock:
                    if reply.status_code != 200:
                        ledger.codes[str(body.get("Code"))] += 1
                        ledger.slowest_refusal_s = max(ledger.slowest_refusal_s, took)
                        if action == "CreateAlias":
                            ledger.refused_aliases[params["AliasName"]] = (self.key_id, str(body.get("Code")))
                        continue
                    ledger.codes["OK"] += 1
                    if action == "CreateKey":
                        ledger.keys.append(body["KeyMetadata"]["KeyId"])
                    elif action == "CreateAlias":
                        ledger.aliases[params["AliasName"]] = self.key_id
                    elif action == "Encrypt":
                        ledger.blobs.append((body["CiphertextBlob"], params["Plaintext"]))
                    else:
                        ledger.blobs.append((body["CiphertextBlob"], body["Plaintext"]))
