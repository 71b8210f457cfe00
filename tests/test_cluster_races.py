"""Conflicting Actions through different ``kmsenv server`` processes on one PostgreSQL database.

tests/test_pg_store.py races the same Actions between in-process services; here they go the whole
way — signed HTTP requests released together at two real server processes (node A with one
worker, node B with two), so the races cross process, connection-pool and node boundaries as they
do behind a load balancer. Each test asserts exactly one winner where only one may win, no lost
update, and that both nodes then describe the same final state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import pytest

from pg_harness import Cluster, Node, pg_cluster, signed_nodes
from test_server_harness import sign_v1

__all__ = ["pg_cluster"]

pytestmark = pytest.mark.slow

#: Requests released together per race (spread over both nodes).
RACERS = 8


@dataclass
class Pair:
    a: Node
    b: Node
    creds: tuple[str, str]

    @property
    def nodes(self) -> tuple[Node, Node]:
        return (self.a, self.b)

    def call(self, node: Node, action: str, **params: str) -> httpx.Response:
        return httpx.post(node.url, params=sign_v1(*self.creds, action, params), timeout=60)

    def ok(self, node: Node, action: str, **params: str) -> dict[str, Any]:
        response = self.call(node, action, **params)
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body

    def race(self, calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
        """Run ``calls`` in threads released by one barrier; their responses, in order."""
        barrier = threading.Barrier(len(calls))
        results: list[httpx.Response | None] = [None] * len(calls)

        def run(n: int) -> None:
            barrier.wait()
            results[n] = calls[n]()

        threads = [threading.Thread(target=run, args=(n,)) for n in range(len(calls))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        assert all(r is not None for r in results), "a racer did not finish"
        return [r for r in results if r is not None]


@pytest.fixture
def pair(tmp_path: Path, pg_cluster: Cluster) -> Iterator[Pair]:
    with signed_nodes(tmp_path, pg_cluster.create_database(), [1, 2]) as (nodes, creds, _home):
        yield Pair(nodes[0], nodes[1], creds)


def code(response: httpx.Response) -> str:
    return "OK" if response.status_code == 200 else str(response.json()["Code"])


def test_alias_race_across_processes_has_exactly_one_winner(pair: Pair) -> None:
    keys = [pair.ok(pair.nodes[n % 2], "CreateKey")["KeyMetadata"]["KeyId"] for n in range(RACERS)]
    for round_ in range(3):
        name = f"alias/race{round_}"
        responses = pair.race(
            [partial(pair.call, pair.nodes[n % 2], "CreateAlias", AliasName=name, KeyId=keys[n]) for n in range(RACERS)]
        )
        codes = [code(r) for r in responses]
        assert codes.count("OK") == 1, codes
        assert set(codes) == {"OK", "AliasAlreadyExists"}, codes
        winner = keys[codes.index("OK")]
        for node in pair.nodes:
            assert pair.ok(node, "DescribeKey", KeyId=name)["KeyMetadata"]["KeyId"] == winner


def test_racing_key_versions_across_processes_keep_every_version_and_one_primary(pair: Pair) -> None:
    key = pair.ok(pair.a, "CreateKey")["KeyMetadata"]["KeyId"]
    first = pair.ok(pair.a, "DescribeKey", KeyId=key)["KeyMetadata"]["PrimaryKeyVersion"]
    responses = pair.race([partial(pair.call, pair.nodes[n % 2], "CreateKeyVersion", KeyId=key) for n in range(RACERS)])
    assert [code(r) for r in responses] == ["OK"] * RACERS
    created = {r.json()["KeyVersion"]["KeyVersionId"] for r in responses}
    assert len(created) == RACERS  # no two racers got the same version
    for node in pair.nodes:
        listed = pair.ok(node, "ListKeyVersions", KeyId=key, PageSize="100")
        ids = {v["KeyVersionId"] for v in listed["KeyVersions"]["KeyVersion"]}
        assert ids == created | {first}  # none lost
        primary = pair.ok(node, "DescribeKey", KeyId=key)["KeyMetadata"]["PrimaryKeyVersion"]
        assert primary in created  # one primary, one of the new versions, the same on both nodes
    assert len({pair.ok(n, "DescribeKey", KeyId=key)["KeyMetadata"]["PrimaryKeyVersion"] for n in pair.nodes}) == 1


def test_racing_state_changes_across_processes_end_consistent(pair: Pair) -> None:
    for _ in range(3):
        key = pair.ok(pair.a, "CreateKey")["KeyMetadata"]["KeyId"]
        actions: list[tuple[str, dict[str, str]]] = [
            ("EnableKey", {}),
            ("DisableKey", {}),
            ("ScheduleKeyDeletion", {"PendingWindowInDays": "7"}),
            ("DisableKey", {}),
            ("EnableKey", {}),
            ("DisableKey", {}),
        ]
        responses = pair.race(
            [
                partial(pair.call, pair.nodes[n % 2], action, KeyId=key, **extra)
                for n, (action, extra) in enumerate(actions)
            ]
        )
        codes = [code(r) for r in responses]
        assert codes[2] == "OK", codes  # Enabled and Disabled both allow scheduling: it never loses
        assert set(codes) <= {"OK", "Rejected.StateModifiedFailed"}, codes
        states = {pair.ok(node, "DescribeKey", KeyId=key)["KeyMetadata"]["KeyState"] for node in pair.nodes}
        assert states == {"PendingDeletion"}
        # Whatever came after the scheduling was refused, not applied over it: every node refuses
        # the key for cryptography as pending deletion.
        for node in pair.nodes:
            assert code(pair.call(node, "GenerateDataKey", KeyId=key)) == "Rejected.PendingDeletion"
