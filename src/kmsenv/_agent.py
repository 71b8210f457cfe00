"""The key agent: one process per user that holds unwrapped data keys for a bounded time.

What it owns: the agent's wire protocol (length-prefixed JSON frames over a Unix socket, spec in
docs/agent.md), the socket's placement and permissions, the peer-uid checks on both ends, the
in-memory key store with its limits and wiping, the server loop, and :class:`AgentKms`, the
client the CLI uses when ``KMSENV_AGENT_SOCK`` is set or ``--agent`` is given.

Why it exists: every ``kmsenv encrypt`` process is new, so a shell loop over N files costs N
``GenerateDataKey`` calls; the agent keeps the answer so the loop costs one. What it holds: the
KMS's answers to ``GenerateDataKey``/``Decrypt`` (plaintext *data keys*, never CMK material, which
never leaves the KMS) and ``Encrypt``/``ReEncrypt`` (wrapped keys only), each until the first of
its TTL, its use count or ``kmsenv agent stop``/``flush``; then a data key's buffer is zeroed.

Authorization stays with the KMS: the agent answers a ``Decrypt`` from its memory only for the
exact ``CiphertextBlob`` *and* encryption context the KMS already accepted, and it never caches a
refusal, so a request the KMS would refuse (wrong context, other blob) is sent to the KMS and
refused there. Only the uid that started the agent may connect (the socket is 0600 in a 0700
folder, and ``SO_PEERCRED`` is checked); the client checks the agent's uid too, so another user
cannot plant a fake agent that hands out keys it knows.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import os
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from kmsenv.clients import _ActionKms
from kmsenv.errors import ConfigError, KmsenvError, KmsError, UsageError

__all__ = [
    "DEFAULT_MAX_KEYS",
    "DEFAULT_MAX_USES",
    "DEFAULT_TTL",
    "SOCKET_ENV",
    "AgentKms",
    "AgentLimits",
    "AgentServer",
    "default_socket_path",
]

SOCKET_ENV = "KMSENV_AGENT_SOCK"
PROTOCOL_VERSION = 1

DEFAULT_TTL = 300.0
DEFAULT_MAX_USES = 10_000
DEFAULT_MAX_KEYS = 1_000

#: Frames carry a few short strings (a CiphertextBlob is ~100 bytes, a context at most a few KiB),
#: so 64 KiB is generous; a larger length prefix is refused before anything is read or allocated.
MAX_FRAME = 64 << 10
#: Connections served at once; the next one is told ``Busy`` and closed (bounded threads/memory).
MAX_CONNECTIONS = 32
#: A connection that sends nothing for this long is closed (a stuck client holds no thread forever).
IDLE_TIMEOUT = 10.0
#: How long a stopping agent waits for connections in flight to finish before it exits.
DRAIN_TIMEOUT = 2.0
#: How long a client waits for an answer: the agent may be calling a remote KMS.
CLIENT_TIMEOUT = 120.0
#: sockaddr_un.sun_path is 108 bytes on Linux, NUL included.
MAX_SOCKET_PATH = 107

#: The Actions the agent serves. Everything else (CreateKey, ScheduleKeyDeletion, ...) is refused:
#: the agent is a cache for the file commands, not a proxy to the KMS.
#: Answers carrying a data key (held as a zeroable bytearray), answers carrying only a wrapped key
#: (a second CMK's wrapping of a held data key: held as is), and Actions always passed through.
KEY_ACTIONS = frozenset({"GenerateDataKey", "Decrypt"})
WRAP_ACTIONS = frozenset({"Encrypt", "ReEncrypt"})
PASSED_ACTIONS = frozenset({"DescribeKey"})
CACHED_ACTIONS = KEY_ACTIONS | WRAP_ACTIONS
OPS = frozenset({"call", "key_arn", "status", "flush", "stop"})

_LENGTH = struct.Struct(">I")

#: A held key's identity: the Action and its sorted (name, value) wire parameters.
CacheKey = tuple[str, tuple[tuple[str, str], ...]]
_UCRED = struct.Struct("3i")


# ------------------------------------------------------------------------------ paths --


def default_socket_path() -> Path:
    """``$KMSENV_AGENT_SOCK``, else ``$XDG_RUNTIME_DIR/kmsenv/agent.sock``, else
    ``/tmp/kmsenv-<uid>/agent.sock`` (the folder is created 0700 and must be ours)."""
    named = os.environ.get(SOCKET_ENV)
    if named:
        return Path(named)
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return Path(runtime) / "kmsenv" / "agent.sock"
    return Path("/tmp") / f"kmsenv-{os.geteuid()}" / "agent.sock"  # noqa: S108 - private 0700 folder, owner checked


def _check_path_length(path: Path) -> None:
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        raise UsageError(
            f"the agent socket path is longer than {MAX_SOCKET_PATH} bytes: {path}",
            hint="pass a shorter --socket PATH (Unix socket paths are limited in length)",
        )


def prepare_socket_folder(folder: Path) -> None:
    """Create ``folder`` 0700, or check an existing one is a real folder owned by us and make it 0700.

    Why: the socket's own mode is one barrier; a private folder is a second one that also covers
    the moment between ``bind`` and ``chmod``, and a folder owned by someone else could let them
    swap the socket for their own.
    """
    try:
        folder.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ConfigError(f"cannot create the agent folder {folder}: {exc.strerror}") from None
    info = os.lstat(folder)
    if not stat.S_ISDIR(info.st_mode):
        raise ConfigError(f"the agent folder {folder} is not a folder (a symbolic link is refused too)")
    if info.st_uid != os.geteuid():
        raise ConfigError(f"the agent folder {folder} belongs to uid {info.st_uid}, not to you")
    if stat.S_IMODE(info.st_mode) != 0o700:
        os.chmod(folder, 0o700)  # mkdir honours the umask; the mode must not


# ----------------------------------------------------------------------------- frames --


class FrameError(Exception):
    """A frame that breaks the protocol (length, encoding, shape). Its message is safe to show."""


def _recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None on a clean end of stream before the first byte."""
    parts = bytearray()
    while len(parts) < n:
        chunk = sock.recv(n - len(parts))
        if not chunk:
            if not parts:
                return None
            raise FrameError("the connection closed in the middle of a frame")
        parts += chunk
    return bytes(parts)


def read_frame(sock: socket.socket, *, limit: int = MAX_FRAME) -> dict[str, Any] | None:
    """One frame's JSON object, or None at a clean end of stream. FrameError on a bad frame."""
    prefix = _recv_exactly(sock, _LENGTH.size)
    if prefix is None:
        return None
    (length,) = _LENGTH.unpack(prefix)
    if length == 0 or length > limit:
        raise FrameError(f"frame length {length} is outside 1..{limit}")
    body = _recv_exactly(sock, length)
    if body is None:
        raise FrameError("the connection closed in the middle of a frame")
    try:
        message = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise FrameError("the frame is not UTF-8 JSON") from None
    if not isinstance(message, dict):
        raise FrameError("the frame is not a JSON object")
    return message


def encode_frame(message: Mapping[str, Any]) -> bytes:
    body = json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    if len(body) > MAX_FRAME:
        raise FrameError(f"frame of {len(body)} bytes exceeds {MAX_FRAME}")
    return _LENGTH.pack(len(body)) + body


def peer_uid(sock: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process at the other end, as the kernel recorded it at connect time."""
    pid, uid, _gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return pid, uid


def _error(cls: str, message: str, code: str | None = None) -> dict[str, Any]:
    error: dict[str, Any] = {"class": cls, "message": message}
    if code is not None:
        error["code"] = code
    return {"ok": False, "error": error}


# ------------------------------------------------------------------------------ store --


@dataclass(frozen=True, slots=True)
class AgentLimits:
    """How long and how much the agent may use one data key (each must be positive)."""

    ttl: float = DEFAULT_TTL
    max_uses: int = DEFAULT_MAX_USES
    max_keys: int = DEFAULT_MAX_KEYS

    def __post_init__(self) -> None:
        for name, option, value in (
            ("ttl", "--ttl", self.ttl),
            ("max_uses", "--max-uses", self.max_uses),
            ("max_keys", "--max-keys", self.max_keys),
        ):
            if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
                raise UsageError(
                    f"the agent's {name} ({option}) must be a positive number, not {value!r}",
                    hint="to use no agent, do not start one (or pass --no-agent to a command)",
                )


class _Held:
    """One KMS answer: without ``Plaintext``, and the data key (if it carried one) in a bytearray."""

    __slots__ = ("created", "key", "response", "uses")

    def __init__(self, response: dict[str, Any], key: bytearray | None, created: float) -> None:
        self.response = response
        self.key = key
        self.created = created
        self.uses = 0

    def __repr__(self) -> str:
        return f"_Held(uses={self.uses})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("agent entries hold key material and cannot be pickled")


def _wipe(buf: bytearray) -> None:
    from kmsenv._crypto import wipe

    wipe(buf)


class KeyStore:
    """Unwrapped data keys by cache key, within :class:`AgentLimits`; every removal zeroes the key.

    Thread-safe. ``clock`` (monotonic seconds) is a seam for tests.
    """

    def __init__(self, limits: AgentLimits, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[CacheKey, _Held] = OrderedDict()
        self.wiped = 0

    def __repr__(self) -> str:
        return f"KeyStore(entries={len(self._entries)}, wiped={self.wiped})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("KeyStore objects hold key material and cannot be pickled")

    def __len__(self) -> int:
        return len(self._entries)

    def buffers(self) -> list[bytearray]:
        """The live key buffers (for tests that check wiping)."""
        with self._lock:
            return [held.key for held in self._entries.values() if held.key is not None]

    def keys_held(self) -> int:
        with self._lock:
            return sum(held.key is not None for held in self._entries.values())

    def _drop(self, key: CacheKey) -> int:
        """Forget ``key``, zeroing its data key; 1 if there was a key to zero, else 0."""
        held = self._entries.pop(key)
        if held.key is None:
            return 0
        _wipe(held.key)
        self.wiped += 1
        return 1

    def take(self, key: CacheKey) -> dict[str, Any] | None:
        """The held answer for ``key`` with its ``Plaintext``, counting one use; None if absent or expired."""
        with self._lock:
            held = self._entries.get(key)
            if held is None:
                return None
            if self._clock() - held.created >= self.limits.ttl:
                self._drop(key)
                return None
            held.uses += 1
            answer = dict(held.response)
            if held.key is not None:
                # The base64 text is an immutable copy: unavoidable, the answer travels as JSON.
                answer["Plaintext"] = base64.b64encode(held.key).decode("ascii")
            if held.uses >= self.limits.max_uses:
                self._drop(key)  # used up: the next request asks the KMS for a new key
            return answer

    def put(self, key: CacheKey, response: dict[str, Any], plaintext: bytearray | None) -> None:
        """Hold ``response`` and ``plaintext`` (taken over, not copied) for ``key``; this put counts
        as its first use."""
        with self._lock:
            if key in self._entries:
                self._drop(key)
            held = _Held(response, plaintext, self._clock())
            held.uses = 1
            if held.uses >= self.limits.max_uses:
                if plaintext is not None:
                    _wipe(plaintext)
                    self.wiped += 1
                return
            self._entries[key] = held
            while len(self._entries) > self.limits.max_keys:
                self._drop(next(iter(self._entries)))  # the oldest goes first

    def reap(self) -> int:
        """Wipe every expired key; return how many."""
        with self._lock:
            now = self._clock()
            old = [k for k, held in self._entries.items() if now - held.created >= self.limits.ttl]
            return sum(self._drop(k) for k in old)

    def clear(self) -> int:
        """Forget every answer, zeroing every key; return how many keys."""
        with self._lock:
            return sum(self._drop(k) for k in list(self._entries))


def _flat_pairs(pairs: list[tuple[Any, Any]]) -> dict[str, str]:
    names = [k for k, _ in pairs]
    if len(set(names)) != len(names) or not all(isinstance(v, str) for _, v in pairs):
        raise ValueError("not a flat context")  # duplicates or non-strings: let the KMS judge it
    return dict(pairs)


def _cache_key(action: str, params: Mapping[str, str]) -> CacheKey | None:
    """The store key of a cacheable request: the Action and every (name, value) parameter pair,
    the context in one canonical form (key order and spacing do not matter to the KMS, so they
    must not here). None when the context is anything but a flat JSON object of strings without
    repeated keys: such a request always goes to the KMS, which decides, and refusals are not held.
    """
    items = dict(params)
    for name in ("EncryptionContext", "SourceEncryptionContext", "DestinationEncryptionContext"):
        text = items.get(name)
        if text is None:
            continue
        try:
            context = json.loads(text, object_pairs_hook=_flat_pairs)
        except ValueError:
            return None
        if not isinstance(context, dict):
            return None
        items[name] = json.dumps(context, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
    if "Plaintext" in items:
        # Encrypt's Plaintext is a data key: the store keeps a digest of it, never the key itself.
        from kmsenv._crypto import sha256_hex

        items["Plaintext"] = "sha256:" + sha256_hex(items["Plaintext"].encode("utf-8"))
    return (action, tuple(sorted(items.items())))


def _key_bytes(response: dict[str, Any]) -> bytearray:
    """Pop ``Plaintext`` off a KMS answer as a bytearray (the decoded bytes copy cannot be wiped)."""
    try:
        return bytearray(base64.b64decode(response.pop("Plaintext"), validate=True))
    except (KeyError, TypeError, binascii.Error, ValueError):
        raise KmsError("InternalFailure", "The KMS answered without a usable Plaintext.") from None


# ----------------------------------------------------------------------------- server --


class AgentServer:
    """Serves one KMS to the user who started it, over a Unix socket.

    ``handle`` is the whole request logic (transport-free, for tests); ``bind``/``serve`` add the
    socket. ``clock`` (monotonic seconds) is a seam for tests of expiry.
    """

    def __init__(
        self,
        kms: _ActionKms,
        socket_path: Path,
        *,
        limits: AgentLimits | None = None,
        describe: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.kms = kms
        self.socket_path = socket_path
        self.limits = limits or AgentLimits()
        self.describe = describe
        self.store = KeyStore(self.limits, clock)
        self.uid = os.geteuid()
        self.started = time.time()
        self.stopping = threading.Event()
        self._kms_lock = threading.Lock()
        self._count_lock = threading.Lock()
        self._connections = 0
        self._listener: socket.socket | None = None
        self.calls: dict[str, int] = {}
        self.served: dict[str, int] = {}
        self.refused_peers = 0

    def __repr__(self) -> str:
        return f"AgentServer({self.socket_path}, {self.store!r})"

    def __reduce__(self) -> NoReturn:
        raise TypeError("AgentServer objects hold key material and cannot be pickled")

    # -- requests --

    def _count(self, table: dict[str, int], name: str) -> None:
        with self._count_lock:
            table[name] = table.get(name, 0) + 1

    def _kms_call(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        self._count(self.calls, action)
        return self.kms.call(action, params)

    def _call(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        if action in PASSED_ACTIONS:
            with self._kms_lock:
                return self._kms_call(action, params)
        key = _cache_key(action, params)
        if key is None:
            with self._kms_lock:
                return self._kms_call(action, params)
        answer = self.store.take(key)
        if answer is not None:
            self._count(self.served, action)
            return answer
        # One KMS call at a time: concurrent misses on the same key wait here, then find it held.
        with self._kms_lock:
            answer = self.store.take(key)
            if answer is not None:
                self._count(self.served, action)
                return answer
            response = dict(self._kms_call(action, params))
        if action in WRAP_ACTIONS:
            self.store.put(key, dict(response), None)
            return response
        plaintext_text = response.get("Plaintext")
        key_buf = _key_bytes(response)
        self.store.put(key, dict(response), key_buf)
        return {**response, "Plaintext": plaintext_text}

    def status(self) -> dict[str, Any]:
        with self._count_lock:
            calls, served = dict(self.calls), dict(self.served)
        return {
            "pid": os.getpid(),
            "uid": self.uid,
            "socket": str(self.socket_path),
            "kms": self.describe,
            "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.started)),
            "limits": {"ttl": self.limits.ttl, "max_uses": self.limits.max_uses, "max_keys": self.limits.max_keys},
            "keys_held": self.store.keys_held(),
            "answers_held": len(self.store),
            "keys_wiped": self.store.wiped,
            "kms_calls": calls,
            "served_from_memory": served,
            "refused_peers": self.refused_peers,
        }

    def handle(self, request: Mapping[str, Any]) -> dict[str, Any]:
        """Answer one request object; never raises for a bad request or a KMS refusal."""
        # Types first: JSON true == 1 in Python, and a list or object is unhashable in a set lookup.
        version = request.get("v")
        if type(version) is not int or version != PROTOCOL_VERSION:
            return _error("ProtocolError", f"unsupported protocol version (this agent speaks v{PROTOCOL_VERSION})")
        op = request.get("op")
        if not isinstance(op, str) or op not in OPS:
            return _error("ProtocolError", "unknown op")
        if self.stopping.is_set() and op != "status":
            return _error("AgentStopping", "the agent is stopping")
        try:
            if op == "call":
                action, params = request.get("action"), request.get("params")
                if not isinstance(action, str) or action not in CACHED_ACTIONS | PASSED_ACTIONS:
                    return _error(
                        "ProtocolError", "the agent serves GenerateDataKey, Decrypt, Encrypt, ReEncrypt, DescribeKey"
                    )
                if (
                    not isinstance(params, dict)
                    or len(params) > 32
                    or not all(isinstance(k, str) and isinstance(v, str) for k, v in params.items())
                ):
                    return _error("ProtocolError", "params must be an object of at most 32 string values")
                return {"ok": True, "result": self._call(str(action), params)}
            if op == "key_arn":
                key_id = request.get("key_id")
                if not isinstance(key_id, str) or not key_id:
                    return _error("ProtocolError", "key_arn needs a key_id string")
                with self._kms_lock:
                    return {"ok": True, "result": {"KeyArn": self.kms._key_arn(key_id)}}
            if op == "status":
                return {"ok": True, "result": self.status()}
            if op == "flush":
                return {"ok": True, "result": {"wiped": self.store.clear()}}
            # stop: wipe first, so the keys are gone by the time the caller hears back.
            self.stopping.set()
            return {"ok": True, "result": {"wiped": self.store.clear(), "pid": os.getpid()}}
        except KmsError as exc:
            return _error("KmsError", exc.message, exc.code)
        except KmsenvError as exc:
            return _error(type(exc).__name__, exc.message)
        except Exception as exc:
            # A bug (or a store failure) must not kill the agent or leave the client hanging; the
            # message may quote data, so only the class is logged and a fixed sentence answered.
            print(f"kmsenv agent: internal error serving {op}: {type(exc).__name__}", file=sys.stderr)
            return _error("InternalError", "the agent failed to serve the request")

    # -- socket --

    def bind(self) -> None:
        """Create the private folder and the 0600 socket; refuse if a live agent already serves it."""
        path = self.socket_path
        _check_path_length(path)
        prepare_socket_folder(path.parent)
        if os.path.lexists(path):
            info = os.lstat(path)
            if not stat.S_ISSOCK(info.st_mode) or info.st_uid != self.uid:
                raise ConfigError(f"{path} exists and is not an agent socket of yours")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(str(path))
            except OSError:
                os.unlink(path)  # a socket nobody listens on: left by a killed agent
            else:
                raise ConfigError(f"an agent is already running at {path}", hint="kmsenv agent stop, or --socket PATH")
            finally:
                probe.close()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # the socket is born 0600; the chmod below makes sure of it
        try:
            listener.bind(str(path))
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        listener.listen(64)
        listener.settimeout(0.25)  # accept() wakes up to notice a stop
        self._listener = listener

    def serve(self) -> None:
        """Accept connections until a ``stop`` request or :meth:`shutdown`; then wipe and remove the socket."""
        if self._listener is None:
            raise RuntimeError("bind() first")
        reaper = threading.Thread(target=self._reap_loop, name="kmsenv-agent-reaper", daemon=True)
        reaper.start()
        try:
            while not self.stopping.is_set():
                try:
                    conn, _ = self._listener.accept()
                except TimeoutError:
                    continue
                except OSError:
                    if self.stopping.is_set():
                        break
                    raise
                self._admit(conn)
            self._drain(DRAIN_TIMEOUT)
        finally:
            self.close()

    def _drain(self, timeout: float) -> None:
        """Let connections in flight finish (above all the one that asked to ``stop``: it must get
        its answer before this process exits and takes the daemon threads with it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self._count_lock:
                if self._connections == 0:
                    return
            time.sleep(0.01)

    def shutdown(self) -> None:
        """Stop serving (from a signal handler or another thread); keys are wiped by :meth:`close`."""
        self.stopping.set()

    def close(self) -> None:
        self.stopping.set()
        self.store.clear()
        if self._listener is not None:
            self._listener.close()
            self._listener = None
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.socket_path)

    def _reap_loop(self) -> None:
        interval = min(1.0, max(0.05, self.limits.ttl / 4))
        while not self.stopping.wait(interval):
            self.store.reap()

    def _admit(self, conn: socket.socket) -> None:
        with self._count_lock:
            busy = self._connections >= MAX_CONNECTIONS
            if not busy:
                self._connections += 1
        if busy:
            with conn:
                conn.settimeout(1.0)
                with contextlib.suppress(OSError):
                    conn.sendall(encode_frame(_error("Busy", "the agent is serving too many connections")))
            return
        threading.Thread(target=self._serve_connection, args=(conn,), name="kmsenv-agent-conn", daemon=True).start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                conn.settimeout(IDLE_TIMEOUT)
                pid, uid = peer_uid(conn)
                if uid != self.uid:
                    # The folder and socket modes already keep others out; this holds even if
                    # someone loosened them, and names the refused process for the owner.
                    with self._count_lock:
                        self.refused_peers += 1
                    print(f"kmsenv agent: refused a connection from uid {uid} (pid {pid})", file=sys.stderr)
                    conn.sendall(encode_frame(_error("PeerRefused", "this agent serves only the user who started it")))
                    return
                while True:
                    try:
                        request = read_frame(conn)
                    except FrameError as exc:
                        conn.sendall(encode_frame(_error("ProtocolError", str(exc))))
                        return  # framing is lost: only a new connection can start clean
                    if request is None:
                        return
                    try:
                        answer = encode_frame(self.handle(request))
                    except FrameError:
                        answer = encode_frame(_error("ProtocolError", "the answer would exceed the frame limit"))
                    conn.sendall(answer)
                    if request.get("op") == "stop":
                        return
        except OSError:
            return  # the client went away or timed out: nothing to answer
        finally:
            with self._count_lock:
                self._connections -= 1


_PR_SET_DUMPABLE = 4


def protect_memory() -> bool:
    """Make this process non-dumpable and give it no core files; True if both took effect.

    Why: the agent's memory holds data keys. ``PR_SET_DUMPABLE`` 0 stops other processes of the
    same uid from attaching with ptrace or reading ``/proc/PID/mem`` (root still can), and a
    crash then writes no core file; ``RLIMIT_CORE`` 0 says the same for the rlimit path.
    """
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def run_agent(server: AgentServer, *, ready: Callable[[], None] | None = None) -> None:
    """Protect memory, bind, announce readiness, serve until stopped; SIGTERM/SIGINT/SIGHUP stop it
    cleanly (keys wiped)."""
    protect_memory()
    server.bind()
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, lambda *_: server.shutdown())
    if ready is not None:
        ready()
    server.serve()


# ----------------------------------------------------------------------------- client --


class AgentKms(_ActionKms):
    """The ``Kms`` a command uses when an agent serves it: every call is one frame to the agent.

    To its callers the agent is one more door speaking the KMS Actions (wire parameters in,
    response bodies out), so it is an ``_ActionKms`` like the embedded and remote clients. One
    connection per request, so it is thread-safe
    and survives nothing between calls. Refusals come back as the KMS's own ``KmsError``.
    """

    def __init__(self, socket_path: Path | str) -> None:
        self.socket_path = Path(socket_path)
        self._arns: dict[str, str] = {}
        self._arn_lock = threading.Lock()

    def close(self) -> None:
        """Nothing to release: each request has its own connection."""

    def _unavailable(self, why: str) -> ConfigError:
        return ConfigError(
            f"the kmsenv agent at {self.socket_path} {why}",
            hint=f'start one (eval "$(kmsenv agent start)"), or unset {SOCKET_ENV} / pass --no-agent '
            "to use the KMS directly",
        )

    @contextlib.contextmanager
    def _connection(self) -> Iterator[socket.socket]:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(CLIENT_TIMEOUT)
            try:
                sock.connect(str(self.socket_path))
            except (FileNotFoundError, ConnectionRefusedError):
                raise self._unavailable("is not running") from None
            except PermissionError:
                raise self._unavailable("is not reachable by you (permission denied)") from None
            except OSError as exc:
                raise self._unavailable(f"is not reachable: {exc.strerror}") from None
            _pid, uid = peer_uid(sock)
            if uid != os.geteuid():
                # Whoever answers could hand out data keys it knows: only our own agent is trusted.
                raise ConfigError(
                    f"the agent socket {self.socket_path} is served by uid {uid}, not by you; refusing to use it"
                )
            yield sock
        finally:
            sock.close()

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send one request object, return its ``result``; agent-side errors raise."""
        with self._connection() as sock:
            try:
                # The agent may have answered (a refusal) and closed before reading: read that answer.
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    sock.sendall(encode_frame({"v": PROTOCOL_VERSION, **message}))
                answer = read_frame(sock)
            except FrameError as exc:
                raise self._unavailable(f"answered with a malformed frame ({exc})") from None
            except TimeoutError:
                raise self._unavailable(f"did not answer within {CLIENT_TIMEOUT:.0f} s") from None
            except OSError as exc:
                raise self._unavailable(f"dropped the connection ({exc.strerror})") from None
        if answer is None:
            raise self._unavailable("closed the connection without answering")
        if answer.get("ok") is True and isinstance(answer.get("result"), dict):
            return dict(answer["result"])
        error = answer.get("error")
        if not isinstance(error, dict):
            raise self._unavailable("answered with a malformed frame")
        message_text = str(error.get("message", ""))
        if error.get("class") == "KmsError":
            raise KmsError(str(error.get("code", "InternalFailure")), message_text)
        raise ConfigError(f"the kmsenv agent refused the request: {error.get('class')}: {message_text}")

    def call(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        return self.request({"op": "call", "action": action, "params": params})

    def _key_arn(self, key_id: str) -> str:
        with self._arn_lock:
            arn = self._arns.get(key_id)
        if arn is None:
            arn = str(self.request({"op": "key_arn", "key_id": key_id})["KeyArn"])
            with self._arn_lock:
                self._arns[key_id] = arn
        return arn

    def status(self) -> dict[str, Any]:
        return self.request({"op": "status"})

    def flush(self) -> int:
        return int(self.request({"op": "flush"})["wiped"])

    def stop(self) -> dict[str, Any]:
        return self.request({"op": "stop"})
