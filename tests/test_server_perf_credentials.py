"""The server's per-process AccessKey cache (``AccessKeys(cache_s=...)``) and request pool size.

A change made elsewhere (the CLI, another worker) applies within ``cache_s``; one made through the
caching object applies at once; unknown AccessKeyIds are never cached; without ``cache_s`` every
lookup reads the store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kmsenv.kms import access as access_module
from kmsenv.kms.access import AccessKeys
from kmsenv.kms.service import KmsService, open_service
from kmsenv.server import app as app_module
from kmsenv.server.app import KmsApp
from kmsenv.server.config import ServerConfig


@pytest.fixture
def other(kms_home: Path, service: KmsService) -> Iterator[AccessKeys]:
    """AccessKey management from another process's point of view: its own service and object."""
    svc = open_service(kms_home, announce=False)
    yield AccessKeys(svc)
    svc.close()


class Monotonic:
    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = 1000.0
        monkeypatch.setattr(access_module.time, "monotonic", lambda: self.now)


def test_a_change_elsewhere_applies_within_cache_s(
    service: KmsService, other: AccessKeys, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Monotonic(monkeypatch)
    cached = AccessKeys(service, cache_s=1.0)
    ak = cached.create()["AccessKeyId"]
    assert cached.lookup(ak).active  # type: ignore[union-attr]
    other.set_active(ak, False)
    clock.now += 0.5
    assert cached.lookup(ak).active  # type: ignore[union-attr]  # still the cached credential
    clock.now += 0.5
    assert not cached.lookup(ak).active  # type: ignore[union-attr]  # 1 s after it was read: re-read
    policy = '{"Version":"1","Statement":[{"Effect":"Allow","Action":["kms:Decrypt"],"Resource":["*"]}]}'
    other.set_policy(ak, policy)
    clock.now += 1.0
    assert cached.lookup(ak).policy is not None  # type: ignore[union-attr]
    other.delete(ak)
    clock.now += 1.0
    assert cached.lookup(ak) is None


def test_a_change_through_the_caching_object_applies_at_once(
    service: KmsService, monkeypatch: pytest.MonkeyPatch
) -> None:
    Monotonic(monkeypatch)  # time stands still: only invalidation can refresh the entry
    cached = AccessKeys(service, cache_s=1.0)
    ak = cached.create()["AccessKeyId"]
    assert cached.lookup(ak).active  # type: ignore[union-attr]
    cached.set_active(ak, False)
    assert not cached.lookup(ak).active  # type: ignore[union-attr]
    cached.delete(ak)
    assert cached.lookup(ak) is None


def test_unknown_ids_are_not_cached(service: KmsService, other: AccessKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    Monotonic(monkeypatch)
    cached = AccessKeys(service, cache_s=1.0)
    for i in range(50):
        assert cached.lookup(f"LTAI{i:020d}") is None
    assert cached._cache == {}
    ak = other.create()["AccessKeyId"]  # created after a miss: found on the next lookup
    assert cached.lookup(ak) is not None


def test_no_cache_by_default(service: KmsService, other: AccessKeys, monkeypatch: pytest.MonkeyPatch) -> None:
    Monotonic(monkeypatch)
    plain = AccessKeys(service)
    ak = plain.create()["AccessKeyId"]
    assert plain.lookup(ak).active  # type: ignore[union-attr]
    other.set_active(ak, False)
    assert not plain.lookup(ak).active  # type: ignore[union-attr]


def test_the_server_caches_for_at_most_a_second_and_runs_a_small_pool(kms_home: Path, service: KmsService) -> None:
    assert 0 < app_module.CREDENTIAL_CACHE_S <= 1.0
    app = KmsApp(ServerConfig(), home=kms_home)

    async def lifespan() -> int:
        messages: list[dict[str, Any]] = [{"type": "lifespan.startup"}]
        sent: list[dict[str, Any]] = []

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop(0)
            await asyncio.sleep(3600)
            raise AssertionError

        async def send(message: Any) -> None:
            sent.append(message)

        task = asyncio.create_task(app({"type": "lifespan"}, receive, send))
        while not sent:
            await asyncio.sleep(0.01)
        task.cancel()
        assert sent == [{"type": "lifespan.startup.complete"}]
        assert app._pool is not None
        return int(app._pool._max_workers)

    try:
        assert asyncio.run(lifespan()) == app_module.POOL_THREADS
        assert app._state is not None and app._state.access_keys._cache_s == app_module.CREDENTIAL_CACHE_S
    finally:
        app.close()
