"""Harness for the server tests (no tests here): a real ``kmsenv server`` process and SDK callers.

- :func:`shared_server` starts one server per test session (a tmp KMS home, a free loopback
  port), cached so every server test module talks to the same process; it is stopped at exit.
- :func:`start_server` starts another one (``--workers 2``) for tests that need their own.
- :class:`Caller` drives a server through one official SDK flavour and normalises its errors to
  :class:`ApiError` (the code and status as *that SDK* reports them):
  ``old`` = aliyunsdkcore AcsClient (v1 HMAC-SHA1), ``acs3`` = Tea default, ``tea-v1`` = Tea with
  ``signature_algorithm='v2'``, ``acs4`` = Tea with ``signature_version='v4'``.
- :func:`sign_v1` builds a signed v1 parameter set with kmsenv's own signer, for raw httpx
  requests the SDKs never send (replays, skewed clocks, malformed input).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import importlib
import json
import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from kmsenv.server.signature import v1_sign, v1_string_to_sign

FLAVOURS = ("old", "acs3", "tea-v1", "acs4")
CONTEXT_PARAMS = {"EncryptionContext", "SourceEncryptionContext", "DestinationEncryptionContext"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    home: Path
    port: int
    proc: subprocess.Popen[bytes]
    log: Path
    access_key_id: str = ""
    secret: str = field(default="", repr=False)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.endpoint}/"

    def env(self) -> dict[str, str]:
        return {**os.environ, "KMSENV_HOME": str(self.home)}

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "kmsenv", *args], env=self.env(), capture_output=True, text=True, check=check
        )

    def new_access_key(self, policy: dict[str, Any] | None = None) -> tuple[str, str]:
        args = ["access-key", "create"]
        if policy is not None:
            path = self.home.parent / f"policy-{uuid.uuid4().hex}.json"
            path.write_text(json.dumps(policy))
            args += ["--policy-file", str(path)]
        created = json.loads(self.cli(*args).stdout)
        return created["AccessKeyId"], created["AccessKeySecret"]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_server(root: Path, *extra: str, scheme: str = "http", verify: ssl.SSLContext | bool = True) -> Server:
    home = root / "home"
    env = {**os.environ, "KMSENV_HOME": str(home)}
    for name in ("KMSENV_ROOT_KEY_FILE", "KMSENV_REGION", "KMSENV_AUDIT_LOG"):
        env.pop(name, None)
    subprocess.run([sys.executable, "-m", "kmsenv", "access-key", "list"], env=env, capture_output=True, check=True)
    port = free_port()
    log = root / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kmsenv", "server", "--host", "127.0.0.1", "--port", str(port), *extra],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    server = Server(home, port, proc, log)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{scheme}://{server.endpoint}/health", timeout=1, verify=verify).status_code == 200:
                break
        time.sleep(0.05)
    else:
        server.stop()
        raise RuntimeError(f"server did not become ready: {log.read_text()}")
    server.access_key_id, server.secret = server.new_access_key()
    return server


@functools.cache
def shared_server() -> Server:
    import tempfile

    root = Path(tempfile.mkdtemp(prefix="kmsenv-server-test-"))
    server = start_server(root)

    def cleanup() -> None:
        server.stop()
        shutil.rmtree(root, ignore_errors=True)

    atexit.register(cleanup)
    return server


# ------------------------------------------------------------------------------------ SDKs --
@dataclass(frozen=True)
class ApiError(Exception):
    code: str
    status: int | None
    message: str = ""


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Caller:
    """``call(Action, Param=value)`` through one SDK flavour; values are Python objects."""

    def __init__(self, flavour: str, server: Server, access_key_id: str | None = None, secret: str | None = None):
        self.flavour = flavour
        self.server = server
        ak, sk = access_key_id or server.access_key_id, secret or server.secret
        if flavour == "old":
            from aliyunsdkcore.client import AcsClient

            self._client: Any = AcsClient(ak, sk, "cn-hangzhou")
        else:
            from alibabacloud_kms20160120.client import Client
            from alibabacloud_tea_openapi.models import Config

            extra = {"tea-v1": {"signature_algorithm": "v2"}, "acs4": {"signature_version": "v4"}}.get(flavour, {})
            config = Config(
                access_key_id=ak,
                access_key_secret=sk,
                region_id="cn-hangzhou",
                endpoint=server.endpoint,
                protocol="http",
                **extra,
            )
            self._client = Client(config)

    def call(self, action: str, **params: Any) -> dict[str, Any]:
        if self.flavour == "old":
            return self._old(action, params)
        return self._tea(action, params)

    def _old(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        from aliyunsdkcore.acs_exception.exceptions import ServerException

        module = importlib.import_module(f"aliyunsdkkms.request.v20160120.{action}Request")
        req = getattr(module, f"{action}Request")()
        req.set_endpoint(self.server.endpoint)
        req.set_protocol_type("http")
        for name, value in params.items():
            wire = json.dumps(value) if isinstance(value, dict | list) else value
            getattr(req, f"set_{name}")(wire)
        try:
            return dict(json.loads(self._client.do_action_with_exception(req)))
        except ServerException as exc:
            raise ApiError(exc.get_error_code(), exc.get_http_status(), exc.get_error_msg()) from None

    def _tea(self, action: str, params: dict[str, Any]) -> dict[str, Any]:
        from alibabacloud_kms20160120 import models
        from alibabacloud_tea_openapi.exceptions import ClientException, ServerException
        from darabonba.exceptions import UnretryableException

        kwargs = {}
        for name, value in params.items():
            kwargs[_snake(name)] = value if name in CONTEXT_PARAMS or not isinstance(value, list) else json.dumps(value)
        request = getattr(models, f"{action}Request")(**kwargs)
        try:
            response = getattr(self._client, _snake(action))(request)
        except (ClientException, ServerException) as exc:
            raise ApiError(str(exc.code), exc.status_code, str(exc.message)) from None
        except UnretryableException as exc:  # ACS4 (gateway-pop) wraps the error without a status
            inner = exc.inner_exception if hasattr(exc, "inner_exception") else exc
            raise ApiError(str(getattr(inner, "code", None) or getattr(exc, "code", "")), None, str(exc)) from None
        return dict(response.body.to_map())


# ------------------------------------------------------------------------------- raw requests --
def utc_stamp(offset: timedelta = timedelta(0)) -> str:
    return (datetime.now(UTC) + offset).strftime("%Y-%m-%dT%H:%M:%SZ")


def sign_v1(
    access_key_id: str,
    secret: str,
    action: str,
    params: dict[str, str] | None = None,
    *,
    method: str = "POST",
    timestamp: str | None = None,
    nonce: str | None = None,
    signature_method: str = "HMAC-SHA1",
) -> dict[str, str]:
    """A complete v1-signed parameter set, as the old SDK would send it."""
    signed = {
        "Action": action,
        "Version": "2016-01-20",
        "Format": "JSON",
        "RegionId": "cn-hangzhou",
        "Timestamp": timestamp or utc_stamp(),
        "SignatureMethod": signature_method,
        "SignatureType": "",
        "SignatureVersion": "1.0",
        "SignatureNonce": nonce or uuid.uuid4().hex,
        "AccessKeyId": access_key_id,
        **(params or {}),
    }
    signed["Signature"] = v1_sign(secret, v1_string_to_sign(method, list(signed.items())), signature_method)
    return signed
