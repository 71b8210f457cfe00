"""Durability of a cluster through crashes: two ``kmsenv server`` processes on one PostgreSQL database
under signed load (CreateKey, CreateAlias, Encrypt, GenerateDataKey from several threads), then

- ``kill -9`` of one node (its whole process group, workers included) mid-load, and its restart;
- an immediate stop of PostgreSQL itself mid-load (no checkpoint: a crash, for its clients), and
  its restart.

Afterwards every Action that returned success is there: keys and aliases exist, every blob
decrypts to its plaintext; a refused CreateAlias left no alias (one refused with 503 or never
answered may have committed just before the failure, but then whole); ``kmsenv store check``
passes. While PostgreSQL is down, the nodes answer ``ServiceUnavailableTemporary`` (503) — every
request gets an answer, none hangs — and they recover by themselves once it is back.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kmsenv.errors import KmsError
from kmsenv.kms.service import open_service
from pg_harness import NO_RATE_LIMIT, Cluster, Ledger, Load, Node, kmsenv, pg_cluster, start_node
from test_server_harness import sign_v1

__all__ = ["pg_cluster"]

pytestmark = pytest.mark.slow

AMBIGUOUS = {"ServiceUnavailableTemporary"}  # the connection may have died after the commit


def check_ledger(ledger: Ledger, home: Path, url: str) -> dict[str, int]:
    """Every acknowledged write is present and right; the store passes ``kmsenv store check``."""
    assert ledger.keys and ledger.aliases and ledger.blobs, "the load did nothing: nothing was tested"
    service = open_service(home, store=url, announce=False)
    try:
        ledger.assert_acknowledged(service)
        committed = 0
        for alias, (key_id, code) in ledger.refused_aliases.items():
            try:
                found = service.describe_key(key_id=alias)["KeyMetadata"]["KeyId"]
            except KmsError as exc:
                assert exc.code == "Forbidden.AliasNotFound"
                continue
            assert code in AMBIGUOUS, f"{alias} was refused with {code} but exists"
            assert found == key_id
            committed += 1
        for alias, key_id in ledger.unknown_aliases.items():
            try:
                assert service.describe_key(key_id=alias)["KeyMetadata"]["KeyId"] == key_id
                committed += 1
            except KmsError as exc:
                assert exc.code == "Forbidden.AliasNotFound"
    finally:
        service.close()
    check = kmsenv(home, "store", "check", "--store", url, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    return {
        "keys": len(ledger.keys),
        "aliases": len(ledger.aliases),
        "blobs": len(ledger.blobs),
        "refused": sum(ledger.codes.values()) - ledger.codes["OK"],
        "no answer": ledger.no_answer,
        "unanswered or refused but committed": committed,
    }


class Pair:
    def __init__(self, tmp: Path, url: str) -> None:
        self.url = url
        self.home = tmp / "a" / "home"
        created = json.loads(kmsenv(self.home, "access-key", "create", KMSENV_STORE=url).stdout)
        self.creds = (created["AccessKeyId"], created["AccessKeySecret"])
        self.nodes: list[Node] = []
        self.nodes.append(start_node(tmp / "a", "--store", url, "--workers", "2", *NO_RATE_LIMIT))
        self.nodes.append(start_node(tmp / "b", "--store", url, *NO_RATE_LIMIT, root_key=self.home / "root.key"))
        reply = httpx.post(self.nodes[0].url, params=sign_v1(*self.creds, "CreateKey"), timeout=30)
        assert reply.status_code == 200, reply.text
        self.key_id = reply.json()["KeyMetadata"]["KeyId"]

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@pytest.fixture
def pair(tmp_path: Path, pg_cluster: Cluster) -> Iterator[Pair]:
    running = Pair(tmp_path, pg_cluster.create_database())
    yield running
    running.stop()


def test_kill_9_of_a_node_mid_load_loses_no_acknowledged_write(pair: Pair) -> None:
    load = Load(pair.nodes, pair.creds, pair.key_id)
    time.sleep(1.5)
    victim = pair.nodes[0]
    victim.kill()  # both workers and the parent, at once
    time.sleep(1.0)  # the load goes on: node B serves, node A refuses connections
    victim.start()  # same home, same port
    time.sleep(1.0)
    ledger = load.stop()
    assert ledger.no_answer > 0, "no request met the dead node: the kill was not mid-load"
    assert set(ledger.codes) == {"OK"}, ledger.codes  # the database never failed: no refusals
    figures = check_ledger(ledger, pair.home, pair.url)
    print(f"\nnode kill -9 mid-load: {figures}")


@pytest.fixture
def own_cluster() -> Iterator[Cluster]:
    """A database server of this test's own: it is stopped and started mid-test."""
    cluster = Cluster()
    yield cluster
    cluster.stop()


def test_postgresql_crash_mid_load(tmp_path: Path, own_cluster: Cluster) -> None:
    pair = Pair(tmp_path, own_cluster.create_database())
    try:
        load = Load(pair.nodes, pair.creds, pair.key_id)
        time.sleep(1.5)
        before = load.ledger.codes["OK"]
        own_cluster.kill()
        down_at = time.monotonic()
        # While it is down: every request is answered, and with 503 ServiceUnavailableTemporary.
        time.sleep(2.0)
        with load.ledger.lock:
            load.ledger.slowest_refusal_s = 0.0
            refusals_before = sum(load.ledger.codes.values()) - load.ledger.codes["OK"]
        probes = []
        for node in pair.nodes:
            started = time.monotonic()
            reply = httpx.post(
                node.url, params=sign_v1(*pair.creds, "GenerateDataKey", {"KeyId": pair.key_id}), timeout=20
            )
            probes.append(time.monotonic() - started)
            assert reply.status_code == 503, reply.text
            assert reply.json()["Code"] == "ServiceUnavailableTemporary"
            health = httpx.get(f"{node.url}health", timeout=20)
            assert health.status_code == 503
        time.sleep(1.0)
        with load.ledger.lock:
            refused_while_down = sum(load.ledger.codes.values()) - load.ledger.codes["OK"] - refusals_before
            slowest = load.ledger.slowest_refusal_s
        assert refused_while_down > 0
        own_cluster.start()
        up_at = time.monotonic()
        # They recover by themselves: no restart of a node, just requests.
        recovered = {}
        while len(recovered) < len(pair.nodes):
            for n, node in enumerate(pair.nodes):
                if n not in recovered and _answers(pair, node):
                    recovered[n] = time.monotonic() - up_at
            assert time.monotonic() - up_at < 60, "the nodes did not recover within 60 s of the database"
        time.sleep(1.0)
        ledger = load.stop()
        assert ledger.codes["OK"] > before, "no request succeeded after the restart"
        assert set(ledger.codes) <= {"OK", "ServiceUnavailableTemporary"}, ledger.codes
        figures = check_ledger(ledger, pair.home, pair.url)
        print(
            f"\nPostgreSQL crash mid-load: down {up_at - down_at:.1f} s; while down {refused_while_down} requests "
            f"answered 503 (slowest {slowest * 1000:.0f} ms; probes {[round(p * 1000) for p in probes]} ms); "
            f"recovered {', '.join(f'{r:.2f} s' for r in recovered.values())} after the restart; {figures}"
        )
    finally:
        pair.stop()


def _answers(pair: Pair, node: Node) -> bool:
    try:
        reply = httpx.post(node.url, params=sign_v1(*pair.creds, "GenerateDataKey", {"KeyId": pair.key_id}), timeout=20)
    except httpx.HTTPError:
        return False
    return reply.status_code == 200
