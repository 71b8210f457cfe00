"""Limits that keep one client from taking the server from the others (issue: hardening, resource
limits): the per-AccessKey rate limit (``Rejected.Throttling``), slow or idle connections, and the
units of the per-address limits (address keys, the auth-failure bucket, their settings), whose
behaviour over real sockets is in ``tests/test_server_abuse.py``."""

from __future__ import annotations

import json
import os
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from kmsenv.cli import main
from kmsenv.errors import ConfigError
from kmsenv.server.config import ServerConfig, read_config_file
from kmsenv.server.limits import AuthFailureLimiter, RateLimiter, Throttled, TrustedProxies, address_key
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


# -------------------------------------------------------------------- per-address limits: units --
@pytest.mark.parametrize(
    ("host", "key"),
    [
        ("192.0.2.7", "192.0.2.7"),
        ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
        ("2001:db8:1:2::1", "2001:db8:1:2::/64"),  # the same /64: the same client
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),  # the next /64: another client
        ("::ffff:192.0.2.7", "192.0.2.7"),  # IPv4 through a dual-stack listener: its IPv4 address
        ("fe80::1%eth0", "fe80::/64"),
        ("::1", "::/64"),
    ],
)
def test_address_keys_ipv4_by_address_ipv6_by_64_prefix(host: str, key: str) -> None:
    assert address_key(host) == key


def test_auth_failures_spend_an_address_bucket_that_check_reads_without_spending() -> None:
    clock = _Clock()
    limiter = AuthFailureLimiter(rate=2, burst=3, clock=clock)
    for _ in range(10):
        limiter.check("192.0.2.1")  # no failure yet: never throttled, nothing tracked
    assert len(limiter) == 0
    for _ in range(3):
        limiter.check("192.0.2.1")
        limiter.fail("192.0.2.1")
    with pytest.raises(Throttled) as refused:
        limiter.check("192.0.2.1")
    assert (refused.value.code, refused.value.http_status) == ("Rejected.Throttling", 429)
    assert refused.value.retry_after_ms == 500  # one token at 2 per second
    assert "this address sends more requests that fail authentication" in refused.value.message
    limiter.check("192.0.2.2")  # another address is untouched
    limiter.fail("192.0.2.1")  # failures past empty do not dig a deeper hole
    clock.now += 0.5
    limiter.check("192.0.2.1")  # one token back after the hint
    clock.now += 3600
    limiter.fail("192.0.2.1")  # refilled to the burst, not beyond
    limiter.fail("192.0.2.1")
    limiter.check("192.0.2.1")
    limiter.fail("192.0.2.1")
    with pytest.raises(Throttled):
        limiter.check("192.0.2.1")


def test_auth_failure_tracking_is_bounded_and_forgets_full_buckets_first() -> None:
    clock = _Clock()
    limiter = AuthFailureLimiter(rate=1, burst=2, max_addresses=3, clock=clock)
    for address in ("a", "b", "c"):
        limiter.fail(address)
        limiter.fail(address)  # each empty
        clock.now += 0.1
    limiter.fail("d")  # the table is full: the address that failed longest ago is forgotten
    assert len(limiter) == 3
    limiter.check("a")  # forgotten: a fresh start
    with pytest.raises(Throttled):
        limiter.check("b")  # kept
    clock.now += 10  # every bucket refilled: the same as none, all forgotten at the next failure
    limiter.fail("e")
    assert len(limiter) == 1
    for i in range(1000):
        limiter.fail(f"flood-{i}")
    assert len(limiter) == 3


def test_auth_failure_limit_per_worker_and_off() -> None:
    share = AuthFailureLimiter.for_worker(20, 100, workers=4)
    assert share is not None and (share.rate, share.burst) == (5, 25)
    small = AuthFailureLimiter.for_worker(1, 1, workers=3)
    assert small is not None and small.burst == 1
    assert AuthFailureLimiter.for_worker(0, 100, workers=1) is None
    with pytest.raises(ValueError):
        AuthFailureLimiter(rate=1, burst=1, max_addresses=0)


@pytest.mark.parametrize(
    ("peer", "forwarded", "client"),
    [
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # not a proxy: its header is ignored
        ("10.0.0.5", "198.51.100.1", "198.51.100.1"),  # a trusted proxy names the client
        ("10.0.0.5", "1.2.3.4, 198.51.100.1", "198.51.100.1"),  # what the client itself wrote: ignored
        ("10.0.0.5", "198.51.100.1, 10.0.0.7", "198.51.100.1"),  # through two trusted proxies
        ("10.0.0.5", "", "10.0.0.5"),  # no header: the proxy itself
        ("10.0.0.5", "garbage", "10.0.0.5"),
        ("10.0.0.5", "198.51.100.1, unknown", "10.0.0.5"),  # a hop no proxy of ours wrote: stop
        ("10.0.0.5", "10.0.0.8", "10.0.0.8"),  # only trusted hops: the left-most
        ("::ffff:127.0.0.1", "2001:db8::1", "2001:db8::1"),  # a mapped IPv4 peer is the IPv4 address
    ],
)
def test_trusted_proxies_name_the_client_only_from_a_proxy(peer: str, forwarded: str, client: str) -> None:
    proxies = TrustedProxies("10.0.0.0/8, 127.0.0.1")
    assert proxies and proxies.client(peer, forwarded) == client
    assert not TrustedProxies("")
    assert TrustedProxies("").client("10.0.0.5", "198.51.100.1") == "10.0.0.5"


def test_trusted_proxies_setting_is_checked(tmp_path: Path) -> None:
    assert ServerConfig().trusted_proxies == ""
    assert ServerConfig.from_env(trusted_proxies="127.0.0.1, 10.0.0.0/8, ::1").trusted_proxies
    with pytest.raises(ConfigError, match=r"trusted proxy 'proxy\.local' is not an IP address or network"):
        ServerConfig.from_env(trusted_proxies="10.0.0.1,proxy.local")
    path = tmp_path / "server.toml"
    path.write_text("trusted_proxies = ['10.0.0.1']\n")
    with pytest.raises(ConfigError, match="trusted_proxies must be a string"):
        read_config_file(path)


def test_per_address_settings_defaults_sources_and_zero_for_off(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    defaults = ServerConfig()
    assert (defaults.max_connections_per_address, defaults.auth_failure_rate, defaults.auth_failure_burst) == (
        64,
        20,
        100,
    )
    path = tmp_path / "server.toml"
    path.write_text("max_connections_per_address = 8\nauth_failure_rate = 5\nauth_failure_burst = 9\n")
    config = ServerConfig.from_env(read_config_file(path))
    assert (config.max_connections_per_address, config.auth_failure_rate, config.auth_failure_burst) == (8, 5, 9)
    monkeypatch.setenv("KMSENV_SERVER_MAX_CONNECTIONS_PER_ADDRESS", "0")
    monkeypatch.setenv("KMSENV_SERVER_AUTH_FAILURE_RATE", "0")
    off = ServerConfig.from_env(read_config_file(path), auth_failure_burst=0)  # no burst needed when off
    assert (off.max_connections_per_address, off.auth_failure_rate) == (0, 0)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_connections_per_address": -1}, "connection limit per address must be 0"),
        ({"auth_failure_rate": -1}, "auth failure rate must be 0"),
        ({"auth_failure_rate": 5, "auth_failure_burst": 0}, "auth failure burst must be at least 1"),
    ],
)
def test_invalid_per_address_settings_are_refused(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_env(**overrides)  # type: ignore[arg-type]


def test_cli_refuses_a_negative_per_address_cap_with_exit_9(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KMSENV_HOME", str(tmp_path / "home"))
    assert main(["server", "--max-connections-per-address", "-1"]) == 9
    assert "kmsenv: error: the connection limit per address must be 0" in capsys.readouterr().err
    assert main(["server", "--auth-failure-rate", "-1"]) == 9
    assert "kmsenv: error: the auth failure rate must be 0" in capsys.readouterr().err
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


# ------------------------------------------------------------------- slow and idle connections --
TIMEOUT_S = 3  # the server's --request-timeout in these tests
MAX_CONNECTIONS = 12  # its --max-connections (one worker)
GUARD_S = 60.0  # failure guard only: how long a test waits for the server to act before failing


@pytest.fixture(scope="module")
def guarded_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("slow"),
        "--request-timeout",
        str(TIMEOUT_S),
        "--max-connections",
        str(MAX_CONNECTIONS),
    )
    yield server
    server.stop()


class _Slow(threading.Thread):
    """A client that sends ``head`` and then ``drip`` one byte every 0.2 s until the server
    closes the connection; :meth:`outcome` is everything the server sent before closing."""

    def __init__(self, server: Server, head: bytes = b"", drip: bytes = b"") -> None:
        super().__init__(daemon=True)
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=GUARD_S)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if head:
            self.sock.sendall(head)
        self.drip = drip
        self.stopped = threading.Event()
        if drip:
            self.start()

    def run(self) -> None:
        i = 0
        while not self.stopped.wait(0.2):
            try:
                self.sock.send(self.drip[i % len(self.drip) : i % len(self.drip) + 1])
            except OSError:
                return
            i += 1

    def outcome(self) -> bytes:
        received = b""
        try:
            while chunk := self.sock.recv(65536):  # blocks until the server closes (or the guard)
                received += chunk
        except ConnectionResetError:
            pass
        finally:
            self.stopped.set()
            self.sock.close()
        return received


def _slow_head(server: Server) -> _Slow:
    """Slowloris: a request head trickled a byte at a time, never finished."""
    return _Slow(server, b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\n", drip=b"X-Slow: aaaaaaaaaaaaaaaaaaaaaaaaa\r\n")


def _slow_body(server: Server) -> _Slow:
    """A complete head announcing a body that then arrives a byte at a time."""
    head = (
        b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    return _Slow(server, head, drip=b"a")


def _error_code(received: bytes) -> tuple[int, str]:
    head, _, body = received.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)["Code"]


def test_slow_and_idle_connections_do_not_starve_a_normal_client(guarded_server: Server) -> None:
    server = guarded_server
    idle = [_Slow(server) for _ in range(6)]  # connect and send nothing
    heads = [_slow_head(server) for _ in range(4)]
    bodies = [_slow_body(server) for _ in range(2)]
    # 12 slow connections fill the limit; this 13th, a normal signed request, is served at once
    # (the connection waiting longest for a request head makes room).
    with httpx.Client(timeout=GUARD_S) as client:
        response = _list_keys(server, server.access_key_id, server.secret, client)
    assert response.status_code == 200, response.text

    # ... and every slow connection is closed by the server (the guard only fails a hang).
    assert all(s.outcome() == b"" for s in idle)  # idle: closed without a word
    for s in heads:  # a head that never completes: RequestTimeout, then closed
        assert _error_code(s.outcome()) == (408, "RequestTimeout")
    for s in bodies:  # a body that never completes: the app's RequestTimeout, audited
        assert _error_code(s.outcome()) == (408, "RequestTimeout")
    log = server.log.read_text()
    assert "closing the longest idle connection" in log
    codes = [json.loads(line)["code"] for line in (server.home / "audit.jsonl").read_text().splitlines()]
    assert codes.count("RequestTimeout") >= 2


def test_beyond_the_limit_with_every_connection_busy_a_new_one_is_refused(guarded_server: Server) -> None:
    server = guarded_server
    busy = [_slow_body(server) for _ in range(MAX_CONNECTIONS)]  # all inside a request: none evictable
    with httpx.Client(timeout=GUARD_S) as client:
        refused = _list_keys(server, server.access_key_id, server.secret, client)
    assert refused.status_code == 503
    assert refused.json()["Code"] == "ServiceUnavailableTemporary"
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"
    for s in busy:
        assert _error_code(s.outcome()) == (408, "RequestTimeout")
    with httpx.Client(timeout=GUARD_S) as client:  # their slots are free again
        assert _list_keys(server, server.access_key_id, server.secret, client).status_code == 200


def test_an_oversized_request_head_is_refused(guarded_server: Server) -> None:
    from kmsenv.server.protocol import MAX_HEAD_BYTES

    big = _Slow(guarded_server, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    try:
        for i in range(MAX_HEAD_BYTES // 1000 + 2):
            big.sock.sendall(b"X-Pad-%d: " % i + b"a" * 1000 + b"\r\n")
    except OSError:
        pass  # the server may close while we still send
    assert _error_code(big.outcome()) == (431, "RequestHeaderTooLarge")
    assert httpx.get(f"http://{guarded_server.endpoint}/health", timeout=GUARD_S).status_code == 200


@pytest.mark.parametrize(
    ("overrides", "message"),
    [({"request_timeout": 0}, "request timeout must be at least 1"), ({"max_connections": 0}, "at least 1")],
)
def test_invalid_connection_settings_are_refused(overrides: dict[str, int], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_env(**overrides)  # type: ignore[arg-type]


def test_old_sdk_sees_rejected_throttling_as_a_server_exception(throttled_server: Server) -> None:
    """aliyunsdkcore reports the code and the 429 status (its retry policy does not retry KMS)."""
    from test_server_harness import ApiError, Caller

    ak, sk = throttled_server.new_access_key()
    caller = Caller("old", throttled_server, ak, sk)
    with pytest.raises(ApiError) as caught:
        for _ in range(15):
            caller.call("ListKeys")
    assert (caught.value.code, caught.value.status) == ("Rejected.Throttling", 429)


def test_a_websocket_upgrade_is_not_taken_over(guarded_server: Server) -> None:
    """An Upgrade request stays an HTTP request (answered by the KMS), not a WebSocket."""
    upgrade = _Slow(
        guarded_server,
        b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
    )
    upgrade.sock.settimeout(GUARD_S)
    received = b""
    while b"\r\n\r\n" not in received or not received.rstrip().endswith(b"}"):
        chunk = upgrade.sock.recv(65536)
        if not chunk:
            break
        received += chunk
    upgrade.stopped.set()
    upgrade.sock.close()
    # The KMS's own JSON answer to an unsigned request, not 101 Switching Protocols nor the 403
    # a WebSocket handshake refused by the app would get.
    assert _error_code(received) == (400, "MissingParameter"), received[:120]
