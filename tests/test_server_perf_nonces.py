"""Nonce claims of a KMS home's worker processes are serialised by a kernel lock (``nonces.lock``),
so SQLite never finds ``nonces.db`` busy (its busy handler sleeps milliseconds); replay protection
is still decided by the nonce table."""

from __future__ import annotations

import asyncio
import fcntl
import os
import threading
from pathlib import Path

import httpx

from kmsenv.kms.access import AccessKeys
from kmsenv.kms.service import open_service
from kmsenv.server.app import KmsApp
from kmsenv.server.config import ServerConfig
from test_server_harness import sign_v1


def _post(app: KmsApp, params: dict[str, str]) -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kms.test/") as client:
            return await client.post("/", params=params)

    return asyncio.run(go())


def test_a_claim_waits_for_another_process_holding_the_nonce_lock(kms_home: Path) -> None:
    service = open_service(kms_home, announce=False)
    try:
        created = AccessKeys(service).create()
    finally:
        service.close()
    app = KmsApp(ServerConfig(), home=kms_home)
    try:
        params = sign_v1(created["AccessKeyId"], created["AccessKeySecret"], "ListKeys")
        assert _post(app, sign_v1(created["AccessKeyId"], created["AccessKeySecret"], "ListKeys")).status_code == 200
        # Another worker process holds the lock: its own open file, so a conflicting flock.
        fd = os.open(kms_home / "nonces.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        results: list[httpx.Response] = []
        caller = threading.Thread(target=lambda: results.append(_post(app, params)))
        try:
            caller.start()
            caller.join(0.5)
            assert caller.is_alive() and not results  # waiting for the lock, not racing SQLite
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        caller.join(10)
        assert results[0].status_code == 200
        replay = _post(app, params)
        assert (replay.status_code, replay.json()["Code"]) == (400, "SignatureNonceUsed")
    finally:
        app.close()


def test_the_nonce_store_itself_takes_the_lock(tmp_path: Path) -> None:
    """The lock lives in ``NonceStore.claim``: any process claiming on this file takes turns."""
    from kmsenv.kms.nonces import NonceStore

    store = NonceStore(tmp_path / "nonces.db")
    try:
        assert (tmp_path / "nonces.lock").stat().st_mode & 0o777 == 0o600
        fd = os.open(tmp_path / "nonces.lock", os.O_RDWR)
        fcntl.flock(fd, fcntl.LOCK_EX)
        results: list[bool] = []
        caller = threading.Thread(target=lambda: results.append(store.claim("LTAI", "n-1", window_s=900)))
        try:
            caller.start()
            caller.join(0.5)
            assert caller.is_alive() and not results
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        caller.join(10)
        assert results == [True]
        assert store.claim("LTAI", "n-1", window_s=900) is False  # the table still decides replays
    finally:
        store.close()
