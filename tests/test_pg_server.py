"""Several server nodes on one PostgreSQL store: what one node changes, the others serve; a signed
request is accepted once, whichever node it (or its replay) reaches."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kmsenv.server.app import KmsApp
from kmsenv.server.config import ServerConfig
from pg_harness import free_port, pg_cluster, pg_url, pg_url_factory
from test_server_app import credentials
from test_server_harness import Server, sign_v1, start_server

__all__ = ["credentials", "pg_cluster", "pg_url", "pg_url_factory"]


@pytest.fixture
def home(kms_home: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A node's home, its store a new PostgreSQL database (feeds test_server_app's ``credentials``)."""
    monkeypatch.setenv("KMSENV_STORE", pg_url)
    return kms_home


@pytest.fixture
def apps(home: Path, credentials: tuple[str, str]) -> Iterator[list[KmsApp]]:
    nodes = [KmsApp(ServerConfig(), home=home) for _ in range(2)]
    yield nodes
    for node in nodes:
        node.close()


def send(app: KmsApp, method: str, path: str = "/", params: dict[str, str] | None = None) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kms.test/") as client:
            return await client.request(method, path, params=params)

    return asyncio.run(go())


def post(app: KmsApp, params: dict[str, str]) -> httpx.Response:
    return send(app, "POST", params=params)


def test_nodes_share_keys_and_nonces(apps: list[KmsApp], credentials: tuple[str, str], kms_home: Path) -> None:
    first, second = apps
    created = post(first, sign_v1(*credentials, "CreateKey"))
    assert created.status_code == 200, created.text
    key_id = created.json()["KeyMetadata"]["KeyId"]
    described = post(second, sign_v1(*credentials, "DescribeKey", {"KeyId": key_id}))
    assert described.status_code == 200 and described.json()["KeyMetadata"]["KeyId"] == key_id

    request = sign_v1(*credentials, "ListKeys")
    assert post(first, request).status_code == 200
    replay = post(second, request)  # the same signed request, at another node
    assert replay.status_code == 400 and replay.json()["Code"] == "SignatureNonceUsed"
    assert not (kms_home / "nonces.db").exists()


def test_health_of_a_node_reads_the_shared_store(apps: list[KmsApp]) -> None:
    response = send(apps[0], "GET", "/health")
    assert response.status_code == 200 and response.json()["Status"] == "OK"


@pytest.fixture
def servers(tmp_path: Path, pg_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Server]]:
    """Two ``kmsenv server`` processes (own homes, one root key) on one database."""
    monkeypatch.setenv("KMSENV_STORE", pg_url)
    running = [start_server(tmp_path / "node1")]
    try:
        (tmp_path / "node2" / "home").mkdir(parents=True, mode=0o700)
        shutil.copy2(tmp_path / "node1" / "home" / "root.key", tmp_path / "node2" / "home" / "root.key")
        running.append(start_server(tmp_path / "node2"))
        yield running
    finally:
        for server in running:
            server.stop()


@pytest.mark.slow
def test_two_server_processes_on_one_database(servers: list[Server]) -> None:
    node1, node2 = servers
    creds = (node1.access_key_id, node1.secret)
    created = httpx.post(node1.url, params=sign_v1(*creds, "CreateKey"), timeout=10)
    assert created.status_code == 200, created.text
    key_id = created.json()["KeyMetadata"]["KeyId"]
    alias = httpx.post(node2.url, params=sign_v1(*creds, "CreateAlias", {"AliasName": "alias/x", "KeyId": key_id}))
    assert alias.status_code == 200, alias.text
    again = httpx.post(node1.url, params=sign_v1(*creds, "CreateAlias", {"AliasName": "alias/x", "KeyId": key_id}))
    assert again.status_code == 400 and again.json()["Code"] == "AliasAlreadyExists"

    blob = httpx.post(node2.url, params=sign_v1(*creds, "Encrypt", {"KeyId": "alias/x", "Plaintext": "hi"}))
    assert blob.status_code == 200, blob.text
    request = sign_v1(*creds, "Decrypt", {"CiphertextBlob": blob.json()["CiphertextBlob"]})
    decrypted = httpx.post(node1.url, params=request)
    assert decrypted.status_code == 200 and decrypted.json()["Plaintext"] == "hi"
    replay = httpx.post(node2.url, params=request)
    assert replay.status_code == 400 and replay.json()["Code"] == "SignatureNonceUsed"


def test_a_node_that_cannot_reach_the_database_is_unhealthy(kms_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMSENV_STORE", f"postgresql://kms@127.0.0.1:{free_port()}/kms")
    app = KmsApp(ServerConfig(), home=kms_home)
    try:
        started = time.monotonic()
        response = send(app, "GET", "/health")
        assert response.status_code == 503 and response.json()["Status"] == "Unavailable"
        assert time.monotonic() - started < 10
    finally:
        app.close()
