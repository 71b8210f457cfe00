"""The ASGI app in-process: failures the real server cannot be made to hit on demand.

Unexpected exceptions, a busy store, a failing health check, the lifespan protocol and the
server clock, driven through ``httpx.ASGITransport`` (no sockets).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from kmsenv.errors import KmsError
from kmsenv.kms.access import AccessKeys
from kmsenv.kms.service import open_service
from kmsenv.server import app as app_module
from kmsenv.server.app import KmsApp
from kmsenv.server.config import ServerConfig
from test_server_harness import sign_v1

URL = "http://kms.test/"


@pytest.fixture
def home(kms_home: Path) -> Path:
    return kms_home


@pytest.fixture
def credentials(home: Path) -> tuple[str, str]:
    service = open_service(home, announce=False)
    try:
        created = AccessKeys(service).create()
    finally:
        service.close()
    return created["AccessKeyId"], created["AccessKeySecret"]


@pytest.fixture
def app(home: Path) -> Iterator[KmsApp]:
    application = KmsApp(ServerConfig(), home=home)
    yield application
    application.close()


def _post(app: KmsApp, params: dict[str, str] | None = None, *, path: str = "", method: str = "POST") -> httpx.Response:
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url=URL) as client:
            return await client.request(method, f"/{path}", params=params)

    return asyncio.run(go())


def _signed(creds: tuple[str, str], action: str = "ListKeys", **kw: Any) -> dict[str, str]:
    return sign_v1(creds[0], creds[1], action, **kw)


def test_unexpected_exception_is_internal_failure_without_detail(
    app: KmsApp, credentials: tuple[str, str], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def explode(*args: object) -> dict[str, Any]:
        raise RuntimeError("disk I/O error in /var/secret/kms.db")

    monkeypatch.setattr(app_module, "dispatch", explode)
    with caplog.at_level(logging.ERROR, logger="kmsenv.server"):
        response = _post(app, _signed(credentials))
    body = response.json()
    assert (response.status_code, body["Code"]) == (500, "InternalFailure")
    assert "/var/secret" not in response.text and "RuntimeError" not in response.text
    assert "/var/secret" in caplog.text  # the operator gets the detail
    assert _post(app, _signed(credentials)).status_code == 500  # and the app keeps answering


def test_busy_store_message_is_generic(
    app: KmsApp, credentials: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    def busy(*args: object, **kwargs: object) -> bool:
        raise KmsError("ServiceUnavailableTemporary", "The nonce store is busy (database is locked: /x/nonces.db).")

    monkeypatch.setattr(app_module.NonceStore, "claim", busy)
    response = _post(app, _signed(credentials))
    assert (response.status_code, response.json()["Code"]) == (503, "ServiceUnavailableTemporary")
    assert "nonces.db" not in response.text


def test_health_reports_an_unreachable_store(app: KmsApp, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _post(app, path="health", method="GET").json() == {"Status": "OK"}

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("gone")

    assert app._state is not None
    monkeypatch.setattr(app._state.service.store, "transaction", broken)
    response = _post(app, path="health", method="GET")
    assert (response.status_code, response.json()) == (503, {"Status": "Unavailable"})


def test_refused_calls_change_nothing(app: KmsApp, credentials: tuple[str, str], home: Path) -> None:
    service = open_service(home, announce=False)
    try:
        deny_all = '{"Version":"1","Statement":[{"Effect":"Allow","Action":["kms:ListKeys"],"Resource":["*"]}]}'
        limited = AccessKeys(service).create(policy=deny_all)
    finally:
        service.close()
    limited_creds = (limited["AccessKeyId"], limited["AccessKeySecret"])
    denied = _post(app, _signed(limited_creds, "CreateKey"))
    assert (denied.status_code, denied.json()["Code"]) == (403, "Forbidden.NoPermission")
    wrong = _post(app, _signed((credentials[0], "wrong"), "CreateKey"))
    assert wrong.json()["Code"] == "SignatureDoesNotMatch"
    assert _post(app, _signed(credentials)).json()["TotalCount"] == 0


def test_server_clock_decides_the_window(home: Path, credentials: tuple[str, str]) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    application = KmsApp(ServerConfig(), home=home, clock=lambda: later)
    try:
        now_stamp = _signed(credentials)
        assert _post(application, now_stamp).json()["Code"] == "InvalidTimeStamp.Expired"
        future = _signed(credentials, timestamp=later.strftime("%Y-%m-%dT%H:%M:%SZ"))
        assert _post(application, future).status_code == 200
    finally:
        application.close()


def test_lifespan_opens_and_closes(app: KmsApp) -> None:
    async def go() -> list[str]:
        inbox = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
        sent: list[str] = []

        async def receive() -> dict[str, Any]:
            return inbox.pop(0)

        async def send(message: Any) -> None:
            sent.append(message["type"])
            if message["type"] == "lifespan.startup.complete":
                assert app._state is not None

        await app({"type": "lifespan"}, receive, send)
        return sent

    assert asyncio.run(go()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert app._state is None


def test_config_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KMSENV_SERVER_PORT", "9999")
    monkeypatch.setenv("KMSENV_SERVER_MAX_BODY", "2048")
    config = ServerConfig.from_env(workers=3)
    assert (config.port, config.max_body, config.workers) == (9999, 2048, 3)
    monkeypatch.setenv("KMSENV_SERVER_PORT", "http")
    with pytest.raises(Exception, match="not an integer"):
        ServerConfig.from_env()


def test_help_does_not_import_the_server_stack() -> None:
    import subprocess
    import sys

    code = (
        "import sys; from kmsenv.cli import build_parser; build_parser(); "
        "print(sorted(m for m in ('starlette', 'uvicorn', 'kmsenv.server.app') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_every_request_gets_one_audit_record(app: KmsApp, credentials: tuple[str, str], home: Path) -> None:
    import json

    ok = _signed(credentials, "CreateKey")
    _post(app, ok)
    _post(app, ok)  # replayed
    _post(app, _signed(credentials, "DescribeKey", params={"KeyId": "alias/missing"}))
    _post(app, {"Action": "ListKeys"})  # unsigned
    _post(app, path="health", method="GET")  # a probe: logged, not audited
    records = [json.loads(line) for line in (home / "audit.jsonl").read_text().splitlines()]
    assert [(r["action"], r["code"]) for r in records] == [
        ("CreateKey", "OK"),
        ("CreateKey", "SignatureNonceUsed"),
        ("DescribeKey", "Forbidden.AliasNotFound"),
        ("ListKeys", "MissingParameter"),
    ]
    assert records[0]["key_id"] and records[0]["access_key_id"] == credentials[0]
    assert (records[2]["alias"], records[2]["key_id"]) == ("alias/missing", None)
    assert all(
        set(r)
        == {"time", "request_id", "access_key_id", "action", "key_id", "alias", "code", "client", "latency_ms"}
        | {"seq", "prev", "hash"}
        for r in records
    )


@pytest.mark.parametrize("flavour", ["old", "acs3", "tea-v1", "acs4"])
def test_internal_failure_as_each_sdk_surfaces_it(
    home: Path, credentials: tuple[str, str], monkeypatch: pytest.MonkeyPatch, flavour: str
) -> None:
    import threading
    import time

    import uvicorn

    from test_server_harness import ApiError, Caller, Server, free_port

    def explode(*args: object) -> dict[str, Any]:
        raise RuntimeError("internal detail")

    monkeypatch.setattr(app_module, "dispatch", explode)
    port = free_port()
    application = KmsApp(ServerConfig(), home=home)
    server = uvicorn.Server(uvicorn.Config(application, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        target = Server(home, port, None, home / "unused.log", *credentials)  # type: ignore[arg-type]
        with pytest.raises(ApiError) as err:
            Caller(flavour, target).call("ListKeys")
        expected_status = None if flavour == "acs4" else 500
        assert (err.value.code, err.value.status) == ("InternalFailure", expected_status)
        assert "internal detail" not in err.value.message
    finally:
        server.should_exit = True
        thread.join(timeout=10)


#: The status of every code the server layer emits, written from alibaba-kms-wire.md §4.4/§8
#: (not read back from kmsenv.errors); EntityTooLarge is kmsenv's choice (docs/server.md).
SERVER_STATUS = {
    "MissingParameter": 400,
    "InvalidParameter": 400,
    "ParseRequestParameterException": 400,
    "IncompleteSignature": 400,
    "InvalidSignatureMethod": 400,
    "InvalidTimeStamp.Format": 400,
    "InvalidTimeStamp.Expired": 400,
    "SignatureDoesNotMatch": 400,
    "SignatureNonceUsed": 400,
    "InvalidVersion": 400,
    "InvalidAccessKeyId.NotFound": 404,
    "InvalidApi.NotFound": 404,
    "Forbidden.AccessKey": 403,
    "UnsupportedHTTPMethod": 403,
    "EntityTooLarge": 413,
    "RequestTimeout": 408,
    "RequestHeaderTooLarge": 431,
    "Rejected.Throttling": 429,  # Alibaba KMS's "QPS Limit Exceeded" status
    "InternalFailure": 500,
    "ServiceUnavailableTemporary": 503,
}


def test_every_server_code_has_its_reference_status() -> None:
    import re

    source = Path(app_module.__file__).parent
    emitted = set()
    for path in source.glob("*.py"):
        emitted |= set(re.findall(r'KmsError\(\s*"([A-Za-z][A-Za-z.]+)"', path.read_text("utf-8")))
    assert emitted <= set(SERVER_STATUS), emitted - set(SERVER_STATUS)
    for code, status in SERVER_STATUS.items():
        assert KmsError(code, "m").http_status == status, code


def test_audit_time_is_the_current_second_in_the_audit_format(monkeypatch: pytest.MonkeyPatch) -> None:
    import time as _time

    app = KmsApp(ServerConfig())
    now = [1_795_000_000.2]
    monkeypatch.setattr(_time, "time", lambda: now[0])
    assert app._audit_time() == "2026-11-18T11:06:40Z"
    now[0] += 0.7  # same second: the cached text
    assert app._audit_time() == "2026-11-18T11:06:40Z"
    now[0] += 0.2  # the next second
    assert app._audit_time() == "2026-11-18T11:06:41Z"
