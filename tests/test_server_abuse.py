"""Per-address limits over real sockets (docs/server.md, "Per-address limits"): a client address
that keeps failing authentication is throttled before the signature check, and one address cannot
hold all of a worker's connections. Linux routes all of 127.0.0.0/8 to loopback, so a test
client binds a source address of its own (127.0.0.2, ...) and is a separate client to the server,
whose other clients (another 127.0.0.x) must be unaffected.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from test_server_harness import Server, sign_v1, start_server

BURST = 5  # --auth-failure-burst of the throttling server (one worker)
PER_ADDRESS = 4  # --max-connections-per-address of the connection servers
GUARD_S = 60.0  # failure guard only: how long a test waits for an answer before failing
FLOOD = 200  # failure guard only: failed requests sent before a test gives up seeing a 429


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KMSENV_SERVER_"):
            monkeypatch.delenv(name)


def _client(address: str) -> httpx.Client:
    """An HTTP client whose connections come from ``address`` (one keep-alive connection)."""
    return httpx.Client(timeout=GUARD_S, transport=httpx.HTTPTransport(local_address=address))


def _list_keys(server: Server, client: httpx.Client, ak: str, sk: str) -> httpx.Response:
    return client.post(server.url, params=sign_v1(ak, sk, "ListKeys"))


def _audit(server: Server) -> list[dict[str, object]]:
    return [json.loads(line) for line in (server.home / "audit.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- failures before authentication --
@pytest.fixture(scope="module")
def throttling_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("abuse-auth"), "--auth-failure-rate", "1", "--auth-failure-burst", str(BURST)
    )
    yield server
    server.stop()


def _until_throttled(send: Callable[[], httpx.Response]) -> list[httpx.Response]:
    """Send failing requests until one is throttled (429); all the answers, the 429 last."""
    answers: list[httpx.Response] = []
    for _ in range(FLOOD):
        answers.append(send())
        if answers[-1].status_code == 429:
            return answers
    pytest.fail(f"{FLOOD} failing requests and none throttled: {[r.status_code for r in answers[:12]]}")


def _assert_throttled(response: httpx.Response) -> None:
    body = response.json()
    assert (response.status_code, body["Code"]) == (429, "Rejected.Throttling"), response.text
    assert set(body) == {"RequestId", "HostId", "Code", "Message", "Recommend"}
    assert "this address sends more requests that fail authentication" in body["Message"]
    assert int(response.headers["retry-after"]) >= 1
    assert int(response.headers["x-acs-retry-after"]) >= 1


def _stale() -> str:
    return (datetime.now(UTC) - timedelta(hours=1)).strftime("%Y-%m-%dT%H:%M:%SZ")


FAILURES: dict[str, tuple[str, Callable[[Server], dict[str, str]]]] = {
    # kind: (the code the server answers before the bucket is empty, the signed parameters)
    "wrong secret": ("SignatureDoesNotMatch", lambda s: sign_v1(s.access_key_id, "not-the-secret", "ListKeys")),
    "unknown AccessKey": ("InvalidAccessKeyId.NotFound", lambda s: sign_v1("LTAI" + "0" * 20, "x", "ListKeys")),
    "stale timestamp": (
        "InvalidTimeStamp.Expired",
        lambda s: sign_v1(s.access_key_id, s.secret, "ListKeys", timestamp=_stale()),
    ),
    "unsigned": ("MissingParameter", lambda s: {"Action": "ListKeys", "Version": "2016-01-20"}),
}


@pytest.mark.parametrize(
    ("kind", "address"),
    [(kind, f"127.0.0.{10 + i}") for i, kind in enumerate(FAILURES)],  # one address each
)
def test_each_kind_of_auth_failure_spends_the_address_bucket(
    throttling_server: Server, kind: str, address: str
) -> None:
    server = throttling_server
    code, params = FAILURES[kind]
    with _client(address) as client:
        answers = _until_throttled(lambda: client.post(server.url, params=params(server)))
    assert [r.json()["Code"] for r in answers[:BURST]] == [code] * BURST  # the burst: the real answer
    assert all(r.json()["Code"] == code for r in answers[:-1])  # and only the real answer until throttled
    _assert_throttled(answers[-1])


def test_replayed_nonces_spend_the_address_bucket(throttling_server: Server) -> None:
    server = throttling_server
    captured = sign_v1(server.access_key_id, server.secret, "ListKeys")
    with _client("127.0.0.14") as client:
        assert client.post(server.url, params=captured).status_code == 200
        answers = _until_throttled(lambda: client.post(server.url, params=captured))
    assert [r.json()["Code"] for r in answers[:BURST]] == ["SignatureNonceUsed"] * BURST
    _assert_throttled(answers[-1])


def test_a_throttled_address_is_refused_before_the_key_lookup_and_signature_while_others_are_served(
    throttling_server: Server,
) -> None:
    server = throttling_server
    flooder, other = "127.0.0.2", "127.0.0.3"
    with _client(flooder) as bad, _client(other) as good:
        # While the flooder's bucket is empty, even its correctly signed request is refused, and
        # so is an unknown AccessKey (which would otherwise be a 404 from the store lookup):
        # neither reached the lookup nor the HMAC. A refill between the flood and these requests
        # (1 token/s) could let one through: then flood again (bounded).
        signed = None
        for _ in range(20):
            _until_throttled(lambda: _list_keys(server, bad, server.access_key_id, "wrong"))
            signed = sign_v1(server.access_key_id, server.secret, "ListKeys")
            refused = bad.post(server.url, params=signed)
            if refused.status_code == 429:
                break
        else:
            pytest.fail("a correctly signed request from the flooding address was never throttled")
        _assert_throttled(refused)
        assert signed is not None
        unknown = _list_keys(server, bad, "LTAI" + "1" * 20, "x")
        if unknown.status_code != 429:  # a token came back in between: it was spent here
            unknown = _list_keys(server, bad, "LTAI" + "1" * 20, "x")
        _assert_throttled(unknown)

        # Another address, signing correctly, is served throughout; its own bucket is full.
        for _ in range(BURST + 2):
            assert _list_keys(server, good, server.access_key_id, server.secret).status_code == 200

        # After the hint, the flooder's correctly signed request passes: the refused one was
        # stopped before its nonce was claimed, so the very same request is not a replay.
        import time

        time.sleep(int(refused.headers["retry-after"]))  # the hint, not a speed assertion
        assert bad.post(server.url, params=signed).status_code == 200

    records = [r for r in _audit(server) if str(r["client"]).startswith(f"{flooder}:")]
    throttled = [r for r in records if r["code"] == "Rejected.Throttling"]
    assert throttled and all(r["action"] == "ListKeys" for r in throttled)
    claimed = {r["access_key_id"] for r in throttled}
    assert server.access_key_id in claimed and "LTAI" + "1" * 20 in claimed  # the claimed AccessKeyId
    assert server.secret not in (server.home / "audit.jsonl").read_text()
    assert not any(str(r["client"]).startswith(f"{other}:") and r["code"] != "OK" for r in _audit(server))


def test_authenticated_requests_spend_nothing(throttling_server: Server) -> None:
    server = throttling_server
    denied_key = server.new_access_key(
        {"Version": "1", "Statement": [{"Effect": "Allow", "Action": ["kms:Decrypt"], "Resource": ["*"]}]}
    )
    with _client("127.0.0.4") as client:
        for _ in range(3 * BURST):
            assert _list_keys(server, client, server.access_key_id, server.secret).status_code == 200
            # A policy denial comes after authentication: not an auth failure either.
            denied = _list_keys(server, client, *denied_key)
            assert denied.json()["Code"] == "Forbidden.NoPermission", denied.text
        answers = _until_throttled(lambda: _list_keys(server, client, server.access_key_id, "wrong"))
    assert len(answers) > BURST  # the whole burst was still there


# ------------------------------------------------------------------------- connections per address --
@pytest.fixture(scope="module")
def capped_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("abuse-conn"),
        "--max-connections-per-address",
        str(PER_ADDRESS),
        "--request-timeout",
        "60",  # the tests close their own connections; no deadline may close them first
    )
    yield server
    server.stop()


class _Conn:
    """A raw connection from a chosen source address."""

    def __init__(self, server: Server, address: str) -> None:
        self.server = server
        self.sock = socket.create_connection(("127.0.0.1", server.port), timeout=GUARD_S, source_address=(address, 0))

    def busy(self) -> _Conn:
        """Send a head announcing a body that never comes: the connection is inside a request."""
        self.sock.sendall(
            b"POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/x-www-form-urlencoded\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        return self

    def call(self) -> int | None:
        """Send a signed ListKeys on this connection; its status, or None if the server had closed it."""
        params = sign_v1(self.server.access_key_id, self.server.secret, "ListKeys")
        query = str(httpx.QueryParams(params))
        try:
            self.sock.sendall(f"POST /?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n".encode())
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return None
                received += chunk
        except (ConnectionResetError, BrokenPipeError):
            return None
        return int(received.split(b" ", 2)[1])

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def conns() -> Iterator[list[_Conn]]:
    opened: list[_Conn] = []
    yield opened
    for c in opened:
        c.close()


def test_over_the_cap_an_address_evicts_its_own_idle_connection_not_anothers(
    capped_server: Server, conns: list[_Conn]
) -> None:
    server = capped_server
    others = [_Conn(server, "127.0.0.21") for _ in range(2)]
    mine = [_Conn(server, "127.0.0.20") for _ in range(PER_ADDRESS)]
    conns += others + mine
    assert others[0].call() == 200  # the other address's connections are open (and now kept alive)
    # One more connection from the capped address, with a request at once: served; to make room,
    # one of its own idle connections was closed, never the other address's.
    with _client("127.0.0.20") as client:
        assert _list_keys(server, client, server.access_key_id, server.secret).status_code == 200
    outcomes = [c.call() for c in mine]
    assert outcomes.count(None) == 1, outcomes
    assert [c.call() for c in others] == [200, 200]
    assert "connection limit per address (4) reached for 127.0.0.20: closing its longest idle" in server.log.read_text()


def test_over_the_cap_with_every_connection_busy_a_new_one_is_refused_and_others_are_served(
    capped_server: Server, conns: list[_Conn]
) -> None:
    server = capped_server
    busy = [_Conn(server, "127.0.0.22").busy() for _ in range(PER_ADDRESS)]
    conns += busy
    with _client("127.0.0.22") as client:
        refused = _list_keys(server, client, server.access_key_id, server.secret)
    assert refused.status_code == 503
    assert refused.json()["Code"] == "ServiceUnavailableTemporary"
    assert refused.headers["retry-after"] == "1"
    assert refused.headers["connection"] == "close"
    with _client("127.0.0.23") as client:  # another address is served as usual
        assert _list_keys(server, client, server.access_key_id, server.secret).status_code == 200
    assert "connection limit per address (4) reached for 127.0.0.22: refusing" in server.log.read_text()
    for c in busy:
        c.close()
    # The slots free as the server sees the closes (failure guard: a bounded number of retries).
    for _ in range(100):
        with _client("127.0.0.22") as client:
            if _list_keys(server, client, server.access_key_id, server.secret).status_code == 200:
                break
    else:
        pytest.fail("the address's slots were never freed")


def test_a_refused_address_does_not_evict_others_at_the_global_limit(tmp_path: Path, conns: list[_Conn]) -> None:
    # 4 busy connections from one address and 2 idle from another fill max_connections (6). A
    # 7th from the first address is over both limits: it is refused, and the other address's
    # idle connections (which the global limit alone would evict) stay.
    server = start_server(
        tmp_path,
        "--max-connections",
        "6",
        "--max-connections-per-address",
        str(PER_ADDRESS),
        "--request-timeout",
        "60",
    )
    try:
        others = [_Conn(server, "127.0.0.31") for _ in range(2)]
        busy = [_Conn(server, "127.0.0.30").busy() for _ in range(PER_ADDRESS)]
        conns += others + busy
        with _client("127.0.0.30") as client:
            assert _list_keys(server, client, server.access_key_id, server.secret).status_code == 503
        assert [c.call() for c in others] == [200, 200]
        assert "closing the longest idle connection" not in server.log.read_text()
    finally:
        for c in conns:
            c.close()
        server.stop()


def test_the_caps_can_be_turned_off(tmp_path: Path, conns: list[_Conn]) -> None:
    server = start_server(
        tmp_path,
        "--max-connections-per-address",
        "0",
        "--auth-failure-rate",
        "0",
        "--request-timeout",
        "60",
    )
    try:
        conns += [_Conn(server, "127.0.0.40").busy() for _ in range(PER_ADDRESS * 2)]
        with _client("127.0.0.40") as client:
            assert _list_keys(server, client, server.access_key_id, server.secret).status_code == 200
            codes = {_list_keys(server, client, server.access_key_id, "wrong").json()["Code"] for _ in range(30)}
        assert codes == {"SignatureDoesNotMatch"}
    finally:
        for c in conns:
            c.close()
        server.stop()


# ------------------------------------------------------------------------- behind a trusted proxy --
PROXY = "127.0.0.50"


@pytest.fixture(scope="module")
def proxied_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_server(
        tmp_path_factory.mktemp("abuse-proxy"),
        "--trusted-proxies",
        f"{PROXY},10.0.0.0/8",
        "--auth-failure-rate",
        "1",
        "--auth-failure-burst",
        str(BURST),
        "--max-connections-per-address",
        str(PER_ADDRESS),
        "--request-timeout",
        "60",
    )
    yield server
    server.stop()


def _forwarded(server: Server, client: httpx.Client, forwarded_for: str, secret: str | None = None) -> httpx.Response:
    params = sign_v1(server.access_key_id, secret or server.secret, "ListKeys")
    return client.post(server.url, params=params, headers={"x-forwarded-for": forwarded_for})


def _throttled_probe(flood: Callable[[], httpx.Response], probe: Callable[[], httpx.Response]) -> httpx.Response:
    """Empty a bucket with ``flood``, then send ``probe``; again if a token came back in between
    (1 token/s), a bounded number of times. The probe's last answer."""
    for _ in range(20):
        _until_throttled(flood)
        answer = probe()
        if answer.status_code == 429:
            break
    return answer


def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_bucket(proxied_server: Server) -> None:
    server = proxied_server
    with _client(PROXY) as proxy:
        flood = lambda: _forwarded(server, proxy, "198.51.100.1", secret="wrong")  # noqa: E731
        # The flooding client, even correctly signed and even if it writes another address to
        # the left (the proxy appends the real one), is throttled ...
        refused = _throttled_probe(flood, lambda: _forwarded(server, proxy, "9.9.9.9, 198.51.100.1"))
        _assert_throttled(refused)
        # ... while another client behind the same proxy (and through a second trusted hop) is served.
        assert _forwarded(server, proxy, "198.51.100.2").status_code == 200
        assert _forwarded(server, proxy, "198.51.100.3, 10.1.2.3").status_code == 200


def test_from_an_untrusted_peer_x_forwarded_for_is_ignored(proxied_server: Server) -> None:
    server = proxied_server
    with _client("127.0.0.51") as client:
        flood = lambda: _forwarded(server, client, "198.51.100.4", secret="wrong")  # noqa: E731
        refused = _throttled_probe(flood, lambda: _forwarded(server, client, "198.51.100.5"))
    _assert_throttled(refused)  # naming another client did not give it another bucket


def test_a_trusted_proxy_is_exempt_from_the_per_address_connection_cap(
    proxied_server: Server, conns: list[_Conn]
) -> None:
    server = proxied_server
    conns += [_Conn(server, PROXY).busy() for _ in range(2 * PER_ADDRESS)]
    with _client(PROXY) as proxy:
        assert _forwarded(server, proxy, "198.51.100.6").status_code == 200
    conns += [_Conn(server, "127.0.0.52").busy() for _ in range(PER_ADDRESS)]
    with _client("127.0.0.52") as other:  # anyone else is still capped
        assert _list_keys(server, other, server.access_key_id, server.secret).status_code == 503


# ------------------------------------------------------------------- server faults spend nothing --
def test_a_store_outage_during_the_key_lookup_spends_no_client_tokens(
    kms_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 503 from the store (here: every AccessKey lookup fails, as with PostgreSQL down) is the
    server's trouble: it must not throttle the client once the store is back. In-process (the
    real server cannot be made to lose its store on demand; tests/test_cluster_crash.py does it
    with PostgreSQL), with ASGITransport's client address."""
    import asyncio

    from kmsenv.errors import KmsError
    from kmsenv.kms.access import AccessKeys
    from kmsenv.kms.service import open_service
    from kmsenv.server.app import KmsApp
    from kmsenv.server.config import ServerConfig

    service = open_service(kms_home, announce=False)
    try:
        created = AccessKeys(service).create()
        ak, sk = created["AccessKeyId"], created["AccessKeySecret"]
    finally:
        service.close()
    app = KmsApp(ServerConfig(auth_failure_rate=1, auth_failure_burst=BURST), home=kms_home)

    def post(params: dict[str, str]) -> httpx.Response:
        async def go() -> httpx.Response:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://kms.test") as c:
                return await c.post("/", params=params)

        return asyncio.run(go())

    real_lookup = AccessKeys.lookup

    def store_down(self: AccessKeys, access_key_id: str) -> object:
        raise KmsError("ServiceUnavailableTemporary", "could not connect to the database")

    try:
        monkeypatch.setattr(AccessKeys, "lookup", store_down)
        for _ in range(3 * BURST):
            assert post(sign_v1(ak, sk, "ListKeys")).status_code == 503
        monkeypatch.setattr(AccessKeys, "lookup", real_lookup)
        assert post(sign_v1(ak, sk, "ListKeys")).status_code == 200  # the store is back: served at once
        # The same path does count the client's own failures (the burst, then throttled).
        answers = _until_throttled(lambda: post(sign_v1(ak, "wrong", "ListKeys")))
        assert [r.json()["Code"] for r in answers[:BURST]] == ["SignatureDoesNotMatch"] * BURST
        _assert_throttled(answers[-1])
    finally:
        app.close()
