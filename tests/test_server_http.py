"""The kmsenv server on raw HTTP: requests the SDKs never send, replays, bad input, logs.

Each refusal must carry its Alibaba code and status in the documented error body, change nothing,
leak no internals, and leave the server serving.
"""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from kmsenv import _crypto
from kmsenv.server.signature import ACS3, acs3_canonical_request, acs3_string_to_sign, hmac_hex
from test_server_harness import Caller, Server, shared_server, sign_v1, start_server, utc_stamp

ERROR_KEYS = {"RequestId", "HostId", "Code", "Message", "Recommend"}


@pytest.fixture(scope="module")
def server() -> Server:
    return shared_server()


def _expect_error(response: httpx.Response, code: str, status: int) -> dict[str, Any]:
    assert response.headers["content-type"] == "application/json;charset=utf-8"
    body = response.json()
    assert (body["Code"], response.status_code) == (code, status), body
    assert set(body) == ERROR_KEYS
    assert body["RequestId"] == response.headers["x-acs-request-id"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return dict(body)


def _signed(
    server: Server, action: str = "ListKeys", params: dict[str, str] | None = None, **kw: Any
) -> dict[str, str]:
    return sign_v1(server.access_key_id, server.secret, action, params, **kw)


def _key_count(server: Server) -> int:
    return int(httpx.post(server.url, params=_signed(server, "ListKeys")).json()["TotalCount"])


# ---------------------------------------------------------------------------- replay and clock --
def test_replayed_request_is_refused(server: Server) -> None:
    params = _signed(server, "CreateKey")
    before = _key_count(server)
    assert httpx.post(server.url, params=params).status_code == 200
    _expect_error(httpx.post(server.url, params=params), "SignatureNonceUsed", 400)
    assert _key_count(server) == before + 1  # the replay created nothing


@pytest.mark.slow
def test_replay_is_refused_across_worker_processes(tmp_path: Path) -> None:
    multi = start_server(tmp_path, "--workers", "2")
    try:
        params = sign_v1(multi.access_key_id, multi.secret, "CreateKey")
        statuses = []
        for _ in range(8):  # a fresh connection each time, so the kernel spreads them over workers
            with httpx.Client() as client:
                statuses.append(client.post(multi.url, params=params).status_code)
        assert statuses.count(200) == 1 and statuses.count(400) == 7
        listed = httpx.post(multi.url, params=sign_v1(multi.access_key_id, multi.secret, "ListKeys")).json()
        assert listed["TotalCount"] == 1
    finally:
        multi.stop()
    result = subprocess.run(
        [sys.executable, "-m", "kmsenv", "audit", "verify", str(multi.home / "audit.jsonl")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr  # two processes appended, the chain stayed linear
    assert ": OK: 9 records" in result.stdout  # 8 CreateKey + 1 ListKeys


def test_worker_listener_opens_its_own_reuseport_socket_in_each_worker() -> None:
    """Pickled to a worker (as uvicorn sends sockets), the listener is a new socket on the same port."""
    import pickle
    import socket
    from multiprocessing.reduction import ForkingPickler

    from kmsenv.server.runner import worker_listener

    parent = worker_listener("127.0.0.1", 0)
    try:
        worker = pickle.loads(ForkingPickler.dumps(parent))
        try:
            assert worker.fileno() != parent.fileno()
            assert worker.getsockname() == parent.getsockname()
            assert worker.proto == socket.IPPROTO_TCP  # so asyncio sets TCP_NODELAY on its connections
            assert worker.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
            worker.listen()
            with socket.create_connection(parent.getsockname(), timeout=5):
                accepted, _ = worker.accept()  # the parent never listens: the worker's socket gets it
                accepted.close()
        finally:
            worker.close()
    finally:
        parent.close()


@pytest.mark.slow
def test_connections_spread_over_worker_processes(tmp_path: Path) -> None:
    """A burst of connections reaches both workers (each has its own SO_REUSEPORT socket)."""
    import asyncio

    multi = start_server(tmp_path, "--workers", "2")
    try:

        async def burst() -> list[int]:
            async with httpx.AsyncClient(limits=httpx.Limits(max_connections=32)) as client:
                calls = [client.post(multi.url, params=_signed(multi, "ListKeys")) for _ in range(32)]
                return [r.status_code for r in await asyncio.gather(*calls)]

        assert asyncio.run(burst()) == [200] * 32
    finally:
        multi.stop()
    assert f"listening on 127.0.0.1 port {multi.port}: 2 workers" in multi.log.read_text()
    pids = {
        line.split("kmsenv.server.access[", 1)[1].split("]", 1)[0]
        for line in multi.log.read_text().splitlines()
        if "kmsenv.server.access[" in line and '"ListKeys"' in line
    }
    assert len(pids) == 2, pids


@pytest.mark.parametrize(
    ("timestamp", "code"),
    [
        # Skewed stamps are made when the test runs, not at collection: a long suite run would
        # otherwise bring "20 minutes ahead" back inside the window.
        (timedelta(minutes=20), "InvalidTimeStamp.Expired"),
        (-timedelta(minutes=16), "InvalidTimeStamp.Expired"),
        ("2026-11-28 15:01:44", "InvalidTimeStamp.Format"),
        ("2026-13-28T15:01:44Z", "InvalidTimeStamp.Format"),
        ("yesterday", "InvalidTimeStamp.Format"),
    ],
)
def test_bad_timestamps(server: Server, timestamp: str | timedelta, code: str) -> None:
    stamp = utc_stamp(timestamp) if isinstance(timestamp, timedelta) else timestamp
    _expect_error(httpx.post(server.url, params=_signed(server, timestamp=stamp)), code, 400)


def test_timestamp_within_window_is_accepted(server: Server) -> None:
    assert httpx.post(server.url, params=_signed(server, timestamp=utc_stamp(timedelta(minutes=14)))).status_code == 200


# --------------------------------------------------------------------------- authentication --
def test_v1_hmac_sha256_and_get(server: Server) -> None:
    assert httpx.post(server.url, params=_signed(server, signature_method="HMAC-SHA256")).status_code == 200
    assert httpx.get(server.url, params=_signed(server, method="GET")).status_code == 200


def test_v1_parameters_in_a_form_body(server: Server) -> None:
    params = _signed(server)
    response = httpx.post(server.url, data=params)  # form-encoded, '+' for spaces
    assert response.status_code == 200


def test_signature_mismatch_message_carries_server_string_to_sign(server: Server) -> None:
    params = _signed(server, "DescribeKey", {"KeyId": "k"})
    params["KeyId"] = "another"  # altered after signing
    body = _expect_error(httpx.post(server.url, params=params), "SignatureDoesNotMatch", 400)
    prefix, string_to_sign = body["Message"].split(":", 1)
    assert prefix.endswith("server string to sign is")
    assert string_to_sign.startswith("POST&%2F&AccessKeyId%3D") and "KeyId%3Danother" in string_to_sign


@pytest.mark.parametrize(
    ("drop", "code"),
    [
        ("Signature", "MissingParameter"),
        ("AccessKeyId", "MissingParameter"),
        ("SignatureNonce", "MissingParameter"),
        ("Timestamp", "MissingParameter"),
        ("Action", "MissingParameter"),
        ("Version", "MissingParameter"),
    ],
)
def test_missing_auth_parameters(server: Server, drop: str, code: str) -> None:
    params = _signed(server)
    del params[drop]
    _expect_error(httpx.post(server.url, params=params), code, 400)


def test_unsupported_signature_method(server: Server) -> None:
    params = _signed(server)
    params["SignatureMethod"] = "HMAC-MD5"
    _expect_error(httpx.post(server.url, params=params), "InvalidSignatureMethod", 400)


def test_no_auth_at_all(server: Server) -> None:
    body = _expect_error(httpx.post(server.url, params={"Action": "ListKeys"}), "MissingParameter", 400)
    assert "Signature" in body["Message"]


def _acs3_headers(server: Server, *, body: bytes = b"", signed_names: list[str] | None = None) -> dict[str, str]:
    headers = {
        "host": server.endpoint,
        "x-acs-action": "ListKeys",
        "x-acs-version": "2016-01-20",
        "x-acs-date": utc_stamp(),
        "x-acs-signature-nonce": uuid.uuid4().hex,
        "x-acs-content-sha256": _crypto.sha256_hex(body),
        "content-type": "application/x-www-form-urlencoded",
    }
    names = signed_names or sorted(headers)
    canonical = acs3_canonical_request("POST", [], list(headers.items()), names, headers["x-acs-content-sha256"])
    signature = hmac_hex(server.secret.encode(), acs3_string_to_sign(ACS3, canonical))
    headers["authorization"] = (
        f"{ACS3} Credential={server.access_key_id},SignedHeaders={';'.join(names)},Signature={signature}"
    )
    return headers


def test_raw_acs3_request(server: Server) -> None:
    assert httpx.post(server.url, headers=_acs3_headers(server)).status_code == 200


@pytest.mark.parametrize(
    ("authorization", "code"),
    [
        ("ACS3-HMAC-SHA256 garbage", "IncompleteSignature"),
        ("ACS3-HMAC-SHA256 Credential=a,SignedHeaders=b;a,Signature=c", "IncompleteSignature"),
        ("Bearer token", "IncompleteSignature"),
        ("ACS3-HMAC-SM3 Credential=a,SignedHeaders=host,Signature=c", "InvalidSignatureMethod"),
        ("ACS4-HMAC-SHA256 Credential=a/b,SignedHeaders=host,Signature=c", "IncompleteSignature"),
    ],
)
def test_malformed_authorization(server: Server, authorization: str, code: str) -> None:
    headers = {**_acs3_headers(server), "authorization": authorization}
    _expect_error(httpx.post(server.url, headers=headers), code, 400)


def test_acs3_x_acs_headers_must_be_signed(server: Server) -> None:
    # Without this rule a man-in-the-middle could change an unsigned x-acs-action.
    names = ["host", "x-acs-date", "x-acs-signature-nonce"]
    body = _expect_error(
        httpx.post(server.url, headers=_acs3_headers(server, signed_names=names)), "IncompleteSignature", 400
    )
    assert "x-acs-action" in body["Message"]


def test_acs3_body_hash_must_match(server: Server) -> None:
    headers = _acs3_headers(server, body=b"SecretData=a")
    response = httpx.post(server.url, headers=headers, content=b"SecretData=b")
    _expect_error(response, "SignatureDoesNotMatch", 400)


def test_v1_action_header_cannot_override_signed_action(server: Server) -> None:
    # v1 does not sign headers: an x-acs-action next to it may only repeat the signed Action.
    response = httpx.post(server.url, params=_signed(server, "ListKeys"), headers={"x-acs-action": "CreateKey"})
    _expect_error(response, "InvalidParameter", 400)


# ------------------------------------------------------------------------------- bad input --
def test_unknown_action_and_version(server: Server) -> None:
    _expect_error(httpx.post(server.url, params=_signed(server, "DeleteEverything")), "InvalidApi.NotFound", 404)
    params = _signed(server, params={"Version": "2099-01-01"})
    _expect_error(httpx.post(server.url, params=params), "InvalidVersion", 400)


def test_bad_base64_blob(server: Server) -> None:
    params = _signed(server, "Decrypt", {"CiphertextBlob": "@@@ not base64 @@@"})
    _expect_error(httpx.post(server.url, params=params), "InvalidCiphertext", 400)


@pytest.mark.parametrize("query", ["Action", "a=%FF", "=value"])
def test_malformed_query(server: Server, query: str) -> None:
    _expect_error(httpx.post(f"{server.url}?{query}"), "ParseRequestParameterException", 400)


def test_duplicate_parameters_are_refused(server: Server) -> None:
    params = [*list(_signed(server, "DescribeKey", {"KeyId": "a"}).items()), ("KeyId", "b")]
    body = _expect_error(httpx.post(server.url, params=params), "InvalidParameter", 400)
    assert '"KeyId"' in body["Message"]
    query = _signed(server)
    form = {"Action": "ListKeys"}  # the same name in the query and the body
    _expect_error(httpx.post(server.url, params=query, data=form), "InvalidParameter", 400)


def test_oversized_body_by_content_length(server: Server) -> None:
    response = httpx.post(server.url, params=_signed(server), content=b"a=" + b"x" * 70_000)
    _expect_error(response, "EntityTooLarge", 413)


def test_oversized_body_while_streaming(server: Server) -> None:
    def chunks() -> Iterator[bytes]:  # chunked transfer: no Content-Length to check up front
        for _ in range(100):
            yield b"x" * 1024

    response = httpx.post(
        server.url,
        params=_signed(server),
        content=chunks(),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    _expect_error(response, "EntityTooLarge", 413)


def test_body_must_be_form_encoded(server: Server) -> None:
    response = httpx.post(server.url, params=_signed(server), json={"Action": "ListKeys"})
    body = _expect_error(response, "InvalidParameter", 400)
    assert "Content-Type" in body["Message"]


def test_wrong_method_and_path(server: Server) -> None:
    _expect_error(httpx.put(server.url, params=_signed(server)), "UnsupportedHTTPMethod", 403)
    _expect_error(httpx.post(f"{server.url}admin", params=_signed(server)), "InvalidApi.NotFound", 404)


def test_health_needs_no_auth(server: Server) -> None:
    response = httpx.get(f"{server.url}health")
    assert (response.status_code, response.json()) == (200, {"Status": "OK"})


# ------------------------------------------------------------------------- audit and logs --
def test_audit_and_access_log_hold_no_secrets(server: Server, tmp_path: Path) -> None:
    caller = Caller("old", server)
    key = caller.call("CreateKey")["KeyMetadata"]["KeyId"]
    plaintext = f"plaintext-{uuid.uuid4().hex}"
    context_value = f"context-{uuid.uuid4().hex}"
    blob = caller.call("Encrypt", KeyId=key, Plaintext=plaintext, EncryptionContext={"k": context_value})[
        "CiphertextBlob"
    ]
    data_key = caller.call("GenerateDataKey", KeyId=key)
    caller.call("Decrypt", CiphertextBlob=blob, EncryptionContext={"k": context_value})
    Caller("acs3", server).call("Decrypt", CiphertextBlob=data_key["CiphertextBlob"])
    params = _signed(server, "Encrypt", {"KeyId": key, "Plaintext": plaintext})
    params["Plaintext"] = plaintext + "tampered"  # SignatureDoesNotMatch echoes it to the client only
    httpx.post(server.url, params=params)

    audit = (server.home / "audit.jsonl").read_text()
    access_log = server.log.read_text()
    assert '"action":"Decrypt"' in audit and f'"key_id":"{key}"' in audit
    for text in (audit, access_log):
        for secret in (
            server.secret,
            plaintext,
            context_value,
            blob,
            data_key["Plaintext"],
            data_key["CiphertextBlob"],
        ):
            assert secret not in text
    assert (server.home / "audit.jsonl").stat().st_mode & 0o777 == 0o600

    verified = server.cli("audit", "verify")
    assert ": OK: " in verified.stdout

    lines = audit.splitlines(keepends=True)
    edited = tmp_path / "edited.jsonl"
    record = json.loads(lines[2])
    record["access_key_id"] = "LTAIsomeoneelse"  # a forger rewriting who made the call
    edited.write_text("".join(lines[:2]) + json.dumps(record) + "\n" + "".join(lines[3:]))
    result = server.cli("audit", "verify", str(edited), check=False)
    assert result.returncode == 7 and f"{edited}:3: the record was modified" in result.stderr
    deleted = tmp_path / "deleted.jsonl"
    deleted.write_text("".join(lines[:4] + lines[5:]))
    result = server.cli("audit", "verify", str(deleted), check=False)
    assert result.returncode == 7 and f"{deleted}:5: the chain is broken" in result.stderr


def test_server_keeps_serving_after_refusals(server: Server) -> None:
    for _ in range(3):
        httpx.post(f"{server.url}?%%%")
        httpx.post(server.url, content=b"\xff\xfe", headers={"content-type": "application/x-www-form-urlencoded"})
    assert httpx.post(server.url, params=_signed(server)).status_code == 200
    assert json.loads(httpx.get(f"{server.url}health").text) == {"Status": "OK"}


def _self_signed(tmp_path: Path) -> tuple[Path, Path]:
    from datetime import UTC, datetime
    from ipaddress import IPv4Address

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(IPv4Address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_tls_and_graceful_stop(tmp_path: Path, workers: str) -> None:
    cert, key = _self_signed(tmp_path)
    trust = ssl.create_default_context(cafile=str(cert))
    tls = start_server(
        tmp_path, "--tls-cert", str(cert), "--tls-key", str(key), "--workers", workers, scheme="https", verify=trust
    )
    try:
        url = f"https://{tls.endpoint}/"
        params = sign_v1(tls.access_key_id, tls.secret, "ListKeys")
        assert httpx.post(url, params=params, verify=trust).status_code == 200
    finally:
        tls.proc.terminate()
        # uvicorn finishes in-flight requests, runs the lifespan shutdown (our stores close), then
        # re-raises the SIGTERM it caught, so the exit status is the signal's.
        assert tls.proc.wait(timeout=10) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in tls.log.read_text()


def test_audit_records_the_real_peer_not_x_forwarded_for(server: Server) -> None:
    """A local client must not choose the client address the audit trail records."""
    marker = f"spoof-{uuid.uuid4().hex[:8]}"
    params = _signed(server, "DescribeKey", {"KeyId": marker})
    response = httpx.post(server.url, params=params, headers={"X-Forwarded-For": "203.0.113.9"})
    assert response.status_code == 404
    records = [json.loads(line) for line in (server.home / "audit.jsonl").read_text().splitlines()]
    mine = [r for r in records if marker in json.dumps(r)]
    assert mine, "no audit record for the request"
    assert all(r["client"].startswith("127.0.0.1") for r in mine), mine
    assert "203.0.113.9" not in json.dumps(mine)
