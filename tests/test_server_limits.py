"""Limits that keep one client from taking the server from the others (issue: hardening, resource
limits): the per-AccessKey rate limit (``Rejected.Throttling``), and slow or idle connections."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kmsenv.cli import main
from kmsenv.errors import ConfigError
from kmsenv.server.config import ServerConfig, read_config_file
from kmsenv.server.limits import RateLimiter, Throttled
from test_server_harness import Server, sign_v1, start_server


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KMSENV_SERVER_"):
            monkeypatch.delenv(name)


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------------- rate limit --
def test_bucket_allows_the_burst_then_throttles_with_the_wait_until_a_token() -> None:
    clock = _Clock()
    limiter = RateLimiter(rate=4, burst=3, clock=clock)
    for _ in range(3):
        limiter.take("LTAI-a")
    with pytest.raises(Throttled) as refused:
        limiter.take("LTAI-a")
    assert refused.value.code == "Rejected.Throttling"
    assert refused.value.http_status == 429
    assert refused.value.retry_after_ms == 250  # one token at 4 per second
    assert dict(refused.value.headers()) == {b"retry-after": b"1", b"x-acs-retry-after": b"250"}
    assert "retry after 250 ms" in refused.value.message
    limiter.take("LTAI-b")  # another AccessKey has its own bucket


def test_bucket_refills_at_the_rate_up_to_the_burst() -> None:
    clock = _Clock()
    limiter = RateLimiter(rate=2, burst=2, clock=clock)
    limiter.take("k")
    limiter.take("k")
    clock.now += 0.4  # 0.8 token: not yet
    with pytest.raises(Throttled) as refused:
        limiter.take("k")
    assert refused.value.retry_after_ms == 100
    clock.now += 0.1
    limiter.take("k")
    clock.now += 3600  # an idle hour refills to the burst, not beyond
    limiter.take("k")
    limiter.take("k")
    with pytest.raises(Throttled):
        limiter.take("k")


def test_each_worker_gets_its_share_and_zero_turns_the_limit_off() -> None:
    share = RateLimiter.for_worker(1000, 2000, workers=4)
    assert share is not None and (share.rate, share.burst) == (250, 500)
    small = RateLimiter.for_worker(1, 1, workers=3)
    assert small is not None and small.burst == 1  # a worker can always serve one request
    assert RateLimiter.for_worker(0, 2000, workers=2) is None
    with pytest.raises(ValueError):
        RateLimiter(rate=0, burst=1)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"rate_limit": -1}, "rate limit must be 0"),
        ({"rate_limit": 10, "rate_burst": 0}, "burst must be at least 1"),
    ],
)
def test_invalid_rate_settings_are_refused(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_env(**overrides)  # type: ignore[arg-type]


def test_rate_settings_from_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "server.toml"
    path.write_text("rate_limit = 50\nrate_burst = 80\n")
    config = ServerConfig.from_env(read_config_file(path))
    assert (config.rate_limit, config.rate_burst) == (50, 80)
    monkeypatch.setenv("KMSENV_SERVER_RATE_LIMIT", "0")
    assert ServerConfig.from_env(read_config_file(path)).rate_limit == 0  # "0" from the env turns it off
    assert (ServerConfig().rate_limit, ServerConfig().rate_burst) == (1000, 2000)  # on by default
    path.write_text('rate_limit = "fast"\n')
    with pytest.raises(ConfigError, match="rate_limit must be an integer"):
        read_config_file(path)
    monkeypatch.setenv("KMSENV_SERVER_RATE_LIMIT", "lots")
    with pytest.raises(ConfigError, match="KMSENV_SERVER_RATE_LIMIT"):
        ServerConfig.from_env()


def test_cli_refuses_a_negative_rate_with_exit_9(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KMSENV_HOME", str(tmp_path / "home"))
    assert main(["server", "--rate-limit", "-5"]) == 9
    assert "kmsenv: error: the rate limit must be 0" in capsys.readouterr().err
    assert not (tmp_path / "home").exists()


@pytest.fixture(scope="module")
def throttled_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(tmp_path_factory.mktemp("throttle"), "--rate-limit", "1", "--rate-burst", "3")
    yield server
    server.stop()


def _list_keys(server: Server, access_key_id: str, secret: str, client: httpx.Client) -> httpx.Response:
    return client.post(server.url, params=sign_v1(access_key_id, secret, "ListKeys"))


def test_a_flood_from_one_access_key_is_throttled_while_another_is_served(throttled_server: Server) -> None:
    server = throttled_server
    flooder = server.new_access_key()
    other = server.new_access_key()
    with httpx.Client(timeout=30) as client:
        flood = [_list_keys(server, *flooder, client) for _ in range(15)]
        statuses = [r.status_code for r in flood]
        assert statuses[:3] == [200, 200, 200]  # the burst
        refused = [r for r in flood if r.status_code != 200]
        assert refused, statuses  # 15 requests at 1 per second cannot all pass
        for response in refused:
            body = response.json()
            assert (response.status_code, body["Code"]) == (429, "Rejected.Throttling")
            assert set(body) == {"RequestId", "HostId", "Code", "Message", "Recommend"}
            assert int(response.headers["retry-after"]) >= 1
            assert int(response.headers["x-acs-retry-after"]) >= 1
            assert "retry after" in body["Message"]
        assert _list_keys(server, *other, client).status_code == 200  # another AccessKey is served

    audited = [json.loads(line) for line in (server.home / "audit.jsonl").read_text().splitlines()]
    codes = [r["code"] for r in audited if r["access_key_id"] == flooder[0]]
    assert codes.count("Rejected.Throttling") == len(refused)
    assert codes.count("OK") == 15 - len(refused)


def test_the_bucket_refills_after_the_retry_hint(throttled_server: Server) -> None:
    import time

    server = throttled_server
    key = server.new_access_key()
    with httpx.Client(timeout=30) as client:
        responses = [_list_keys(server, *key, client) for _ in range(10)]
        refused = [r for r in responses if r.status_code == 429]
        assert refused
        time.sleep(int(refused[-1].headers["retry-after"]))  # the hint, not a speed assertion
        assert _list_keys(server, *key, client).status_code == 200


def test_tea_sdk_sees_a_throttling_exception_with_the_retry_hint(throttled_server: Server) -> None:
    from alibabacloud_kms20160120.client import Client
    from alibabacloud_kms20160120.models import ListKeysRequest
    from alibabacloud_tea_openapi.exceptions import ThrottlingException
    from alibabacloud_tea_openapi.models import Config

    server = throttled_server
    ak, sk = server.new_access_key()
    sdk = Client(
        Config(
            access_key_id=ak, access_key_secret=sk, region_id="cn-hangzhou", endpoint=server.endpoint, protocol="http"
        )
    )
    with pytest.raises(ThrottlingException) as caught:
        for _ in range(15):
            sdk.list_keys(ListKeysRequest())
    assert caught.value.code == "Rejected.Throttling"
    assert caught.value.status_code == 429
    assert caught.value.retry_after >= 1  # milliseconds, from x-acs-retry-after
