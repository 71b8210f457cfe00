"""The hash-chained audit log: one JSON line per request, appended by every worker process.

Each record carries ``seq`` (1, 2, ...), ``prev`` (the previous record's ``hash``; 64 zeros for the
first) and ``hash`` = SHA-256 over the record's canonical JSON without ``hash``. Editing a record
breaks its own hash; deleting, inserting or reordering records breaks the next record's ``prev``
(and ``seq``), so :func:`verify` names the first bad line. What a chain cannot show by itself is
the loss of its *last* records: ship the head hash :func:`verify` prints somewhere the server
cannot write (a ticket, another host) to anchor it. Someone able to rewrite the whole file can
also recompute the whole chain; the chain proves integrity relative to an anchor, not authorship.

Appends take an exclusive ``fcntl.flock`` on the file, read the last record's hash and write one
line with one ``write`` call, so worker processes and threads interleave whole records and the
chain stays linear. A process remembers the head it wrote and re-reads the tail only when the file
no longer ends where its own last record did (another process appended in between).

Several nodes (docs/cluster.md): each node writes its own file — one chain per node, shared by
that node's workers — and stamps every record with its ``node`` id (``--node-id``, default
``hostname:port``), so collected files say where each record was written. ``flock`` only works on
a local filesystem: nodes on different hosts must not share one file over a network mount.
:func:`verify_all` checks every node's chain (``kmsenv audit verify FILE|DIR ...``).

What a record holds is fixed by :func:`audit_record`: time, RequestId, AccessKeyId, Action, the key
id / alias the request named or resolved, the result code, client address and latency. Never
plaintext, key material, CiphertextBlobs, EncryptionContext values or secrets: they are not
passed in, so they cannot leak out.
"""

from __future__ import annotations

import fcntl
import json
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kmsenv import _crypto
from kmsenv.errors import InputError, IntegrityError

__all__ = ["GENESIS", "AuditLog", "AuditSummary", "audit_record", "verify", "verify_all"]

GENESIS = "0" * 64
#: Longest text a record keeps from a client-supplied field (AccessKeyId, Action, KeyId, alias):
#: a client must not be able to make records arbitrarily large.
MAX_FIELD = 256
_TAIL_CHUNK = 4096


def _canonical(record: dict[str, Any]) -> bytes:
    return json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _digest(record: dict[str, Any]) -> str:
    return _crypto.sha256_hex(_canonical({k: v for k, v in record.items() if k != "hash"}))


def _clip(value: str | None) -> str | None:
    return None if value is None else value[:MAX_FIELD]


def audit_record(
    *,
    time: str,
    request_id: str,
    access_key_id: str | None,
    action: str | None,
    key_id: str | None,
    alias: str | None,
    code: str,
    client: str | None,
    latency_ms: float,
) -> dict[str, Any]:
    """The fields of one audit record — the complete list of what the audit log may contain."""
    return {
        "time": time,
        "request_id": request_id,
        "access_key_id": _clip(access_key_id),
        "action": _clip(action),
        "key_id": _clip(key_id),
        "alias": _clip(alias),
        "code": code,
        "client": _clip(client),
        "latency_ms": round(latency_ms, 3),
    }


def _last_line(fd: int) -> bytes | None:
    """The last complete line of the file open at ``fd`` (read backwards from the end)."""
    end = os.lseek(fd, 0, os.SEEK_END)
    buf = b""
    pos = end
    while pos > 0:
        step = min(_TAIL_CHUNK, pos)
        pos -= step
        buf = os.pread(fd, step, pos) + buf
        stripped = buf.rstrip(b"\n")
        cut = stripped.rfind(b"\n")
        if cut >= 0:
            return stripped[cut + 1 :]
    stripped = buf.rstrip(b"\n")
    return stripped or None


class AuditLog:
    """Appends chained records to one file (created 0600). Safe across threads and processes.

    ``node``: the id stamped on every record (None: no ``node`` field, as before clusters)."""

    def __init__(self, path: Path, *, node: str | None = None) -> None:
        self.path = path
        self.node = None if node is None else node[:MAX_FIELD]
        self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
        self._lock = threading.Lock()
        # (file size after our last append, its seq, its hash): while the file still ends where
        # our own last record ended, no other process appended and the head is known without
        # reading and parsing the tail again (a read and a JSON parse per request otherwise).
        self._head: tuple[int, int, str] | None = None

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def append(self, record: dict[str, Any]) -> dict[str, Any]:
        """Chain ``record`` onto the log and write it; returns the record with seq/prev/hash."""
        with self._lock:
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                end = os.fstat(self._fd).st_size
                if self._head is not None and self._head[0] == end:
                    seq, prev = self._head[1] + 1, self._head[2]
                else:
                    last = _last_line(self._fd)
                    if last is None:
                        seq, prev = 1, GENESIS
                    else:
                        tail = json.loads(last)
                        seq, prev = int(tail["seq"]) + 1, str(tail["hash"])
                chained = {**record, "seq": seq, "prev": prev}
                if self.node is not None:
                    chained["node"] = self.node
                chained["hash"] = _digest(chained)
                line = _canonical(chained) + b"\n"
                written = os.write(self._fd, line)
                # A short write (disk full) leaves a torn line: forget the head so the next
                # append reads the file as it really is.
                self._head = (end + written, seq, chained["hash"]) if written == len(line) else None
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)
        return chained


@dataclass(frozen=True, slots=True)
class AuditSummary:
    records: int
    first_time: str | None
    last_time: str | None
    head: str
    nodes: tuple[str, ...] = ()  # the node ids the records carry, in order of first appearance


def _lines(path: Path) -> Iterator[tuple[int, bytes]]:
    try:
        with path.open("rb") as fh:
            yield from enumerate(fh, start=1)
    except FileNotFoundError:
        raise InputError(f"no audit log at {path}") from None
    except OSError as exc:
        raise InputError(f"cannot read the audit log {path}: {exc.strerror}") from None


def verify(path: Path) -> AuditSummary:
    """Check the whole chain; raise IntegrityError naming the first bad line."""
    prev, seq, count = GENESIS, 0, 0
    first_time = last_time = None
    nodes: dict[str, None] = {}
    for number, raw in _lines(path):
        where = f"{path}:{number}"
        try:
            record = json.loads(raw)
            if not isinstance(record, dict):
                raise ValueError
            claimed = str(record["hash"])
            record_prev, record_seq = str(record["prev"]), int(record["seq"])
        except (ValueError, KeyError, TypeError):
            raise IntegrityError(f"{where}: not an audit record (damaged or edited line)") from None
        if _digest(record) != claimed:
            raise IntegrityError(f"{where}: the record was modified (its hash does not match its content)")
        if record_prev != prev or record_seq != seq + 1:
            raise IntegrityError(
                f"{where}: the chain is broken: expected record {seq + 1} following hash {prev[:16]}..., "
                f"found record {record_seq} (records were deleted, inserted or reordered before this line)"
            )
        prev, seq, count = claimed, record_seq, count + 1
        first_time = first_time or record.get("time")
        last_time = record.get("time")
        if isinstance(record.get("node"), str):
            nodes.setdefault(record["node"])
    return AuditSummary(count, first_time, last_time, prev, tuple(nodes))


def audit_files(paths: list[Path]) -> list[Path]:
    """The files to verify: each file given, and the ``*.jsonl`` files of each folder given."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            found = sorted(p for p in path.glob("*.jsonl") if p.is_file())
            if not found:
                raise InputError(f"no audit logs (*.jsonl) in {path}")
            files.extend(found)
        else:
            files.append(path)
    return files


def verify_all(paths: list[Path]) -> list[tuple[Path, AuditSummary | IntegrityError]]:
    """Verify every file of :func:`audit_files` (each its own chain: one per node); a file that
    fails is reported with its error, and the others are still checked."""
    results: list[tuple[Path, AuditSummary | IntegrityError]] = []
    for path in audit_files(paths):
        try:
            results.append((path, verify(path)))
        except IntegrityError as exc:
            results.append((path, exc))
    return results
