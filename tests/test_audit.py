"""The hash-chained audit log: appends, tamper detection, concurrent writers, the CLI."""

from __future__ import annotations

import itertools
import json
import multiprocessing
from pathlib import Path
from typing import Any

import pytest

from kmsenv.cli import main
from kmsenv.errors import InputError, IntegrityError
from kmsenv.server.audit import GENESIS, AuditLog, audit_record, verify


def _record(n: int, **overrides: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "time": f"2026-01-01T00:00:{n % 60:02d}Z",
        "request_id": f"req-{n}",
        "access_key_id": "LTAIexample",
        "action": "Decrypt",
        "key_id": "key-1",
        "alias": None,
        "code": "OK",
        "client": "127.0.0.1:5000",
        "latency_ms": 1.5,
    }
    return audit_record(**{**fields, **overrides})


@pytest.fixture
def log_path(tmp_path: Path) -> Path:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path)
    for n in range(1, 6):
        log.append(_record(n))
    log.close()
    return path


def test_chain_links_records(log_path: Path) -> None:
    records = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert [r["seq"] for r in records] == [1, 2, 3, 4, 5]
    assert records[0]["prev"] == GENESIS
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(records))
    summary = verify(log_path)
    assert (summary.records, summary.head) == (5, records[-1]["hash"])
    assert log_path.stat().st_mode & 0o777 == 0o600


def test_appending_after_reopen_continues_the_chain(log_path: Path) -> None:
    log = AuditLog(log_path)
    assert log.append(_record(6))["seq"] == 6
    log.close()
    assert verify(log_path).records == 6


def test_interleaved_writers_on_one_file_chain_onto_each_other(tmp_path: Path) -> None:
    """Each AuditLog remembers the head it wrote; an append by another writer (another worker
    process in the server) must make it re-read the tail instead of chaining onto its own record."""
    path = tmp_path / "audit.jsonl"
    first, second = AuditLog(path), AuditLog(path)
    try:
        order = [first, first, second, first, second, second, first]
        written = [log.append(_record(n)) for n, log in enumerate(order, 1)]
    finally:
        first.close()
        second.close()
    assert [r["seq"] for r in written] == list(range(1, 8))
    assert all(b["prev"] == a["hash"] for a, b in itertools.pairwise(written))
    assert verify(path).records == 7


def test_record_fields_are_clipped() -> None:
    record = _record(1, access_key_id="A" * 10_000, action="B" * 10_000)
    assert len(record["access_key_id"]) == 256 and len(record["action"]) == 256


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines(keepends=True)


def _expect_bad(path: Path, line: int, words: str) -> None:
    with pytest.raises(IntegrityError) as err:
        verify(path)
    assert f"{path}:{line}: " in err.value.message and words in err.value.message


def test_edited_record(log_path: Path) -> None:
    lines = _lines(log_path)
    record = json.loads(lines[1])
    record["code"] = "Forbidden.NoPermission"
    lines[1] = json.dumps(record) + "\n"
    log_path.write_text("".join(lines))
    _expect_bad(log_path, 2, "modified")


def test_edited_and_rehashed_record_breaks_the_next_link(log_path: Path) -> None:
    from kmsenv.server.audit import _digest

    lines = _lines(log_path)
    record = json.loads(lines[1])
    record["access_key_id"] = "LTAIsomebodyelse"
    record["hash"] = _digest(record)
    lines[1] = json.dumps(record) + "\n"
    log_path.write_text("".join(lines))
    _expect_bad(log_path, 3, "chain is broken")


@pytest.mark.parametrize(
    ("change", "line"),
    [
        (lambda lines: lines[:2] + lines[3:], 3),  # a record deleted
        (lambda lines: lines[1:], 1),  # the first record deleted
        (lambda lines: [lines[0], lines[2], lines[1], *lines[3:]], 2),  # reordered
        (lambda lines: [*lines[:3], lines[1], *lines[3:]], 4),  # a record duplicated
    ],
)
def test_deleted_reordered_duplicated(log_path: Path, change: Any, line: int) -> None:
    log_path.write_text("".join(change(_lines(log_path))))
    _expect_bad(log_path, line, "chain is broken")


def test_garbage_line(log_path: Path) -> None:
    lines = _lines(log_path)
    lines.insert(2, "not json\n")
    log_path.write_text("".join(lines))
    _expect_bad(log_path, 3, "not an audit record")


def test_empty_and_missing(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.touch()
    assert verify(empty).records == 0
    with pytest.raises(InputError):
        verify(tmp_path / "missing.jsonl")


def _append_many(path: str, worker: int, count: int) -> None:
    log = AuditLog(Path(path))
    for n in range(count):
        log.append(_record(n, request_id=f"w{worker}-{n}"))
    log.close()


@pytest.mark.slow
def test_concurrent_processes_keep_the_chain_linear(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(str(path), w, 50)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert verify(path).records == 200


def test_cli_verify(log_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", "verify", str(log_path)]) == 0
    assert ": OK: 5 records" in capsys.readouterr().out
    log_path.write_text("".join(_lines(log_path)[:-2] + _lines(log_path)[-1:]))
    assert main(["audit", "verify", str(log_path)]) == 7
    assert f"kmsenv: error: {log_path}:4: the chain is broken" in capsys.readouterr().err


def test_cli_verify_defaults_to_the_kms_home(
    log_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KMSENV_HOME", str(log_path.parent))
    assert main(["audit", "verify"]) == 0
    assert str(log_path) in capsys.readouterr().out


def test_records_carry_the_node_id_and_every_file_is_verified(tmp_path: Path) -> None:
    from kmsenv.server.audit import verify_all

    for node in ("n1", "n2"):
        log = AuditLog(tmp_path / f"{node}.jsonl", node=node)
        for n in range(3):
            assert log.append(_record(n))["node"] == node
        log.close()
    plain = AuditLog(tmp_path / "plain.jsonl")
    assert "node" not in plain.append(_record(1))
    plain.close()
    results = verify_all([tmp_path])
    assert [(p.name, getattr(s, "nodes", None)) for p, s in results] == [
        ("n1.jsonl", ("n1",)),
        ("n2.jsonl", ("n2",)),
        ("plain.jsonl", ()),
    ]
    (tmp_path / "n2.jsonl").write_text((tmp_path / "n2.jsonl").read_text().replace('"code":"OK"', '"code":"X"', 1))
    outcomes = dict(verify_all([tmp_path / "n1.jsonl", tmp_path / "n2.jsonl"]))
    assert not isinstance(outcomes[tmp_path / "n1.jsonl"], IntegrityError)
    assert isinstance(outcomes[tmp_path / "n2.jsonl"], IntegrityError)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no audit logs"):
        verify_all([empty])
