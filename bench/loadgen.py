"""Load generator for ``bench_server.py``: signed KMS requests at a fixed concurrency and count.

Runs in its own process (``python bench/loadgen.py < job.json``, one JSON result on stdout), so
its CPU is accounted apart from the server's. One job = one Action at one concurrency level
against one target:

- ``kmsenv``: the Alibaba KMS 2016-01-20 wire, signed ACS3-HMAC-SHA256 exactly as the Tea SDK
  signs it (``POST /?<params>``, empty body, ``x-acs-*`` headers), with kmsenv's own signing
  functions (``kmsenv.server.signature``);
- ``moto``: the AWS KMS JSON protocol (``X-Amz-Target: TrentService.<Action>``), signed SigV4 by
  :func:`sigv4_headers` (the same result as botocore's signer; ``tests/test_bench_server_smoke.py``
  checks that). moto does not verify signatures by default, but signing anyway charges the
  generator the same per-request cost on both sides.

Every request is signed when it is sent, with its own timestamp and nonce (the kmsenv server
refuses a replayed nonce). The HTTP client is a minimal HTTP/1.1 keep-alive client on asyncio
streams, one connection per concurrent caller: on a 2-core machine shared with the server, the
generator's own CPU per request is what it takes from the server, and this costs a fraction of an
httpx or ``http.client`` thread pool at concurrency 64.

A job is bounded: ``count`` timed requests after ``warmup`` untimed ones, within ``timeout_s``.
Errors (a status other than 200, a response without the expected field, a connection failure)
are counted and a few are kept as samples; the caller decides what an error means (the benchmark
refuses any).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Job", "Target", "kmsenv_request", "moto_request", "percentile", "run_job", "sigv4_headers"]

KMS_VERSION = "2016-01-20"
#: The response field whose presence marks a successful call of each Action.
EXPECT = {"GenerateDataKey": b'"CiphertextBlob"', "Decrypt": b'"Plaintext"'}
MAX_SAMPLES = 5


@dataclass(frozen=True, slots=True)
class Target:
    kind: str  # "kmsenv" | "moto"
    host: str
    port: int
    access_key_id: str
    secret: str
    region: str = "cn-hangzhou"

    @property
    def authority(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Job:
    target: Target
    action: str  # GenerateDataKey | Decrypt
    key_id: str = ""  # for GenerateDataKey
    blobs: tuple[str, ...] = ()  # for Decrypt: used in turn
    concurrency: int = 1
    count: int = 100
    warmup: int = 0
    timeout_s: float = 300.0
    collect: bool = False  # return the CiphertextBlobs of the responses (to prepare Decrypt jobs)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Job:
        target = Target(**data.pop("target"))
        data["blobs"] = tuple(data.get("blobs", ()))
        return cls(target=target, **data)


# ------------------------------------------------------------------------------------ signing --
def _stamp(now: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now))


def kmsenv_request(target: Target, action: str, params: dict[str, str], *, now: float | None = None) -> bytes:
    """One complete HTTP/1.1 request, ACS3-signed as the Tea SDK signs an RPC call."""
    from kmsenv.server.signature import (
        ACS3,
        EMPTY_SHA256,
        acs3_canonical_request,
        acs3_string_to_sign,
        canonical_params,
        hmac_hex,
    )

    query = list(params.items())
    headers = [
        ("accept", "application/json"),
        ("host", target.authority),
        ("x-acs-action", action),
        ("x-acs-content-sha256", EMPTY_SHA256),
        ("x-acs-date", _stamp(time.time() if now is None else now)),
        ("x-acs-signature-nonce", os.urandom(16).hex()),
        ("x-acs-version", KMS_VERSION),
    ]
    signed = [name for name, _ in headers]
    canonical = acs3_canonical_request("POST", query, headers, signed, EMPTY_SHA256)
    signature = hmac_hex(target.secret.encode(), acs3_string_to_sign(ACS3, canonical))
    authorization = f"{ACS3} Credential={target.access_key_id},SignedHeaders={';'.join(signed)},Signature={signature}"
    lines = [f"POST /?{canonical_params(query)} HTTP/1.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    lines += [f"authorization: {authorization}", "content-length: 0", "", ""]
    return "\r\n".join(lines).encode("latin-1")


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sigv4_headers(
    access_key_id: str, secret: str, *, region: str, host: str, target: str, body: bytes, amz_date: str
) -> dict[str, str]:
    """AWS SigV4 headers (service ``kms``) for ``POST /`` with an AWS JSON 1.1 body."""
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {
        "content-type": "application/x-amz-json-1.1",
        "host": host,
        "x-amz-date": amz_date,
        "x-amz-target": target,
    }
    signed = ";".join(sorted(headers))
    canonical_headers = "".join(f"{k}:{headers[k]}\n" for k in sorted(headers))
    canonical = f"POST\n/\n\n{canonical_headers}\n{signed}\n{payload_hash}"
    date = amz_date[:8]
    scope = f"{date}/{region}/kms/aws4_request"
    to_sign = f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{hashlib.sha256(canonical.encode()).hexdigest()}"
    key = _hmac(f"AWS4{secret}".encode(), date)
    for part in (region, "kms", "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    headers["authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, SignedHeaders={signed}, Signature={signature}"
    )
    return headers


def moto_request(target: Target, action: str, payload: dict[str, Any], *, now: float | None = None) -> bytes:
    """One complete HTTP/1.1 request of the AWS KMS JSON protocol, SigV4-signed."""
    body = json.dumps(payload, separators=(",", ":")).encode()
    amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    headers = sigv4_headers(
        target.access_key_id,
        target.secret,
        region=target.region,
        host=target.authority,
        target=f"TrentService.{action}",
        body=body,
        amz_date=amz_date,
    )
    lines = ["POST / HTTP/1.1", *(f"{k}: {v}" for k, v in headers.items()), f"content-length: {len(body)}", "", ""]
    return "\r\n".join(lines).encode("latin-1") + body


def request_builder(job: Job) -> Callable[[int], bytes]:
    """``build(i)``: the i-th request of ``job``, freshly signed."""
    target, blobs = job.target, job.blobs
    if job.action == "Decrypt" and not blobs:
        raise ValueError("a Decrypt job needs blobs")
    if target.kind == "kmsenv":
        if job.action == "GenerateDataKey":
            return lambda i: kmsenv_request(target, "GenerateDataKey", {"KeyId": job.key_id, "NumberOfBytes": "32"})
        return lambda i: kmsenv_request(target, "Decrypt", {"CiphertextBlob": blobs[i % len(blobs)]})
    if target.kind == "moto":
        if job.action == "GenerateDataKey":
            return lambda i: moto_request(target, "GenerateDataKey", {"KeyId": job.key_id, "KeySpec": "AES_256"})
        return lambda i: moto_request(target, "Decrypt", {"CiphertextBlob": blobs[i % len(blobs)]})
    raise ValueError(f"unknown target kind {target.kind!r}")


# ---------------------------------------------------------------------------------- transport --
class _Connection:
    """One keep-alive HTTP/1.1 connection; reconnects if the server closed it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.reconnects = -1  # the first connect is not a reconnect

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        self.reconnects += 1

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = self.reader = None

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        if self.writer is None:
            await self._connect()
        assert self.reader is not None and self.writer is not None
        self.writer.write(request)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                fields[name.strip().lower()] = value.strip()
        if "content-length" in fields:
            body = await self.reader.readexactly(int(fields["content-length"]))
        elif fields.get("transfer-encoding", "").lower() == "chunked":
            body = await self._chunked()
        else:  # HTTP/1.0 style: the body runs to the end of the connection
            body = await self.reader.read()
            fields["connection"] = "close"
        if fields.get("connection", "").lower() == "close" or lines[0].startswith("HTTP/1.0"):
            await self.close()
        return status, body

    async def _chunked(self) -> bytes:
        assert self.reader is not None
        parts: list[bytes] = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")  # no trailers are expected
                return b"".join(parts)
            parts.append(await self.reader.readexactly(size))
            await self.reader.readexactly(2)


# -------------------------------------------------------------------------------------- a job --
def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), -(-len(sorted_values) * q // 100)))
    return sorted_values[int(rank) - 1]


async def _run(job: Job) -> dict[str, Any]:
    build = request_builder(job)
    expect = EXPECT[job.action]
    connections = [_Connection(job.target.host, job.target.port) for _ in range(job.concurrency)]
    latencies: list[float] = []
    errors = 0
    samples: list[str] = []
    blobs: list[str] = []
    next_index = 0

    async def caller(conn: _Connection, quota: Callable[[], int | None], record: bool) -> None:
        nonlocal errors
        while (i := quota()) is not None:
            request = build(i)
            start = time.perf_counter()
            try:
                status, body = await asyncio.wait_for(conn.exchange(request), 30)
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ValueError) as exc:
                status, body = 0, repr(exc).encode()
                await conn.close()
            elapsed = time.perf_counter() - start
            if status != 200 or expect not in body:
                errors += 1
                if len(samples) < MAX_SAMPLES:
                    samples.append(f"{status} {body[:300].decode(errors='replace')}")
                continue
            if record:
                latencies.append(elapsed)
                if job.collect:
                    blobs.append(json.loads(body)["CiphertextBlob"])

    def counter(limit: int) -> Callable[[], int | None]:
        def take() -> int | None:
            nonlocal next_index
            if next_index >= limit:
                return None
            next_index += 1
            return next_index - 1

        return take

    # Warm-up: open every connection and let the server's caches and thread pools settle. Untimed.
    warm_quota = counter(job.warmup + job.concurrency)
    await asyncio.gather(*(caller(c, warm_quota, record=False) for c in connections))
    warm_errors, errors = errors, 0
    next_index = 0
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    await asyncio.gather(*(caller(c, counter(job.count), record=True) for c in connections))
    seconds = time.perf_counter() - start
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    reconnects = sum(max(c.reconnects, 0) for c in connections)
    for c in connections:
        await c.close()
    latencies.sort()
    ok = len(latencies)
    client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    result: dict[str, Any] = {
        "target": job.target.kind,
        "action": job.action,
        "concurrency": job.concurrency,
        "requests": job.count,
        "ok": ok,
        "errors": errors + warm_errors,
        "error_samples": samples,
        "reconnects": reconnects,
        "seconds": seconds,
        "rps": ok / seconds if seconds > 0 else 0.0,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p90_ms": percentile(latencies, 90) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "max_ms": (latencies[-1] if latencies else float("nan")) * 1000,
        "client_cpu_ms_per_request": client_cpu * 1000 / max(ok + errors, 1),
    }
    if job.collect:
        result["blobs"] = blobs
    return result


def run_job(job: Job) -> dict[str, Any]:
    return asyncio.run(asyncio.wait_for(_run(job), job.timeout_s))


def main() -> int:
    job = Job.from_json(json.load(sys.stdin))
    try:
        result = run_job(job)
    except TimeoutError:
        print(f"loadgen: error: the job did not finish within {job.timeout_s:.0f} s", file=sys.stderr)
        return 1
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
