"""Audit with several writers: two ``kmsenv server`` processes (two workers each) on one PostgreSQL
database under concurrent load each keep one chain, stamped with their node id;
``kmsenv audit verify`` checks both files (or their folder) and names an edited or deleted line."""

from __future__ import annotations

import json
import shutil
import socket
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from pg_harness import NO_RATE_LIMIT, Cluster, Node, kmsenv, pg_cluster, start_node
from test_server_harness import sign_v1

__all__ = ["pg_cluster"]

pytestmark = pytest.mark.slow

REQUESTS_PER_NODE = 120
THREADS = 8


def _load(nodes: list[Node], creds: tuple[str, str], key_id: str) -> list[int]:
    """Concurrent GenerateDataKey/Decrypt/DescribeKey calls spread over both nodes; their statuses."""

    def one(i: int) -> int:
        node = nodes[i % len(nodes)]
        with httpx.Client(timeout=30) as client:
            if i % 3 == 0:
                reply = client.post(node.url, params=sign_v1(*creds, "DescribeKey", {"KeyId": key_id}))
            else:
                reply = client.post(node.url, params=sign_v1(*creds, "GenerateDataKey", {"KeyId": key_id}))
                if reply.status_code == 200 and i % 3 == 2:
                    blob = reply.json()["CiphertextBlob"]
                    reply = client.post(
                        nodes[(i + 1) % 2].url, params=sign_v1(*creds, "Decrypt", {"CiphertextBlob": blob})
                    )
        return reply.status_code

    with ThreadPoolExecutor(THREADS) as pool:
        return list(pool.map(one, range(REQUESTS_PER_NODE * len(nodes))))


def _verify(home: Path, *paths: Path) -> tuple[int, str]:
    result = kmsenv(home, "audit", "verify", *map(str, paths), check=False)
    return result.returncode, result.stdout + result.stderr


def test_two_nodes_under_load_leave_two_verifiable_chains(tmp_path: Path, pg_cluster: Cluster) -> None:
    url = pg_cluster.create_database()
    home = tmp_path / "a" / "home"
    created = json.loads(kmsenv(home, "access-key", "create", KMSENV_STORE=url).stdout)
    creds = (created["AccessKeyId"], created["AccessKeySecret"])
    logs = tmp_path / "audit"
    logs.mkdir()
    nodes = [
        start_node(
            tmp_path / "a",
            "--store",
            url,
            *NO_RATE_LIMIT,
            "--workers",
            "2",
            "--node-id",
            "node-a",
            "--audit-log",
            str(logs / "node-a.jsonl"),
        ),
        start_node(
            tmp_path / "b",
            "--store",
            url,
            *NO_RATE_LIMIT,
            "--workers",
            "2",
            "--audit-log",
            str(logs / "node-b.jsonl"),
            root_key=home / "root.key",
        ),
    ]
    try:
        reply = httpx.post(nodes[0].url, params=sign_v1(*creds, "CreateKey"), timeout=30)
        assert reply.status_code == 200, reply.text
        key_id = reply.json()["KeyMetadata"]["KeyId"]
        statuses = _load(nodes, creds, key_id)
    finally:
        for node in nodes:
            node.stop()
    assert set(statuses) == {200}

    files = [logs / "node-a.jsonl", logs / "node-b.jsonl"]
    records = [[json.loads(line) for line in f.read_text().splitlines()] for f in files]
    # Every request (CreateKey, the load, the Decrypts that followed a GenerateDataKey) is audited once.
    decrypts = sum(1 for i in range(REQUESTS_PER_NODE * 2) if i % 3 == 2)
    assert sum(map(len, records)) == 1 + REQUESTS_PER_NODE * 2 + decrypts
    assert {r["node"] for r in records[0]} == {"node-a"}
    assert {r["node"] for r in records[1]} == {f"{socket.gethostname()}:{nodes[1].port}"}
    assert len({r["request_id"] for file in records for r in file}) == sum(map(len, records))
    for file in records:  # both workers of a node wrote into its one chain
        assert [r["seq"] for r in file] == list(range(1, len(file) + 1))

    rc, out = _verify(home, *files)
    assert rc == 0, out
    assert out.count(": OK: ") == 2 and "node node-a" in out
    rc, out = _verify(home, logs)  # the folder: every *.jsonl in it
    assert rc == 0 and out.count(": OK: ") == 2, out

    # An edited record in node B's file, a deleted one in node A's: both named, exit 7.
    edited = tmp_path / "edited"
    shutil.copytree(logs, edited)
    lines_b = (edited / "node-b.jsonl").read_text().splitlines(keepends=True)
    lines_b[40] = lines_b[40].replace('"code":"OK"', '"code":"Forbidden.NoPermission"')
    (edited / "node-b.jsonl").write_text("".join(lines_b))
    lines_a = (edited / "node-a.jsonl").read_text().splitlines(keepends=True)
    del lines_a[17]
    (edited / "node-a.jsonl").write_text("".join(lines_a))
    rc, out = _verify(home, edited / "node-a.jsonl", edited / "node-b.jsonl")
    assert rc == 7, out
    assert "node-a.jsonl: FAILED:" in out and "node-a.jsonl:18: the chain is broken" in out
    assert "node-b.jsonl: FAILED:" in out and "node-b.jsonl:41: the record was modified" in out
    assert "2 of 2 audit logs failed" in out
    rc, out = _verify(home, logs / "node-a.jsonl", edited / "node-b.jsonl")
    assert rc == 7 and "node-a.jsonl: OK" in out and "node-b.jsonl:41" in out, out
