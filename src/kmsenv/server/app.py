"""The ASGI application: Alibaba Cloud KMS (2016-01-20) requests in, JSON responses out.

A request goes through these steps, each refusing with its Alibaba code (``docs/server.md``):

1. transport — ``GET``/``POST`` on ``/`` (``GET /health`` is the unauthenticated readiness probe);
   a body of at most ``max_body`` bytes, checked by Content-Length *and* while streaming, that must
   be ``application/x-www-form-urlencoded``; query and form decoded (``+`` is a space) strictly,
   and a parameter given twice is refused;
2. auth format — first, while the client address has failed authentication too often,
   ``Rejected.Throttling`` before any lookup or HMAC (``kmsenv.server.limits.AuthFailureLimiter``);
   then the signature scheme and its claims (:func:`signature.parse_auth`);
3. Action and Version — from the signed parameters, or for ACS3/ACS4 the signed ``x-acs-*``
   headers;
4. clock — ``Timestamp``/``x-acs-date`` within ±15 minutes;
5. AccessKey — looked up in the store, cached per worker for ``CREDENTIAL_CACHE_S`` (1 s: so
   ``kmsenv access-key disable`` or a new policy applies within a second); signature verified in
   constant time; then the key must be Active;
6. nonce — claimed in ``nonces.db`` in the KMS home, shared by every worker process;
   then the AccessKey's rate limit (``kmsenv.server.limits``: ``Rejected.Throttling``);
7. policy — ``actions.authorize``;
8. the Action — ``actions.dispatch``, the embedded KMS's own door.

A request refused at steps 1–6 before its nonce is claimed (not yet authenticated), with a 4xx
code (its own fault, not the store's), spends a token of its client address's auth-failure bucket.

Blocking work (SQLite, crypto, the audit file) runs in the thread pool, so one slow request does not
stall the event loop. Every request, refused or not, gets one access-log line and one audit record.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import threading
import time
from collections.abc import Awaitable, Callable, MutableMapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote_plus

from starlette.concurrency import run_in_threadpool

from kmsenv.errors import KmsError
from kmsenv.kms.access import AccessKeys
from kmsenv.kms.actions import ACTIONS, API_VERSION, authorize, dispatch, new_request_id
from kmsenv.kms.nonces import NonceStore
from kmsenv.kms.pg_nonces import PgNonceStore, open_nonce_store
from kmsenv.kms.service import KmsService, default_home, open_service
from kmsenv.server import signature
from kmsenv.server.audit import AuditLog, audit_record
from kmsenv.server.config import ServerConfig
from kmsenv.server.errors import error_reply
from kmsenv.server.limits import AuthFailureLimiter, RateLimiter, Throttled, TrustedProxies, address_key

__all__ = ["KmsApp", "create_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Clock = Callable[[], datetime]
T = TypeVar("T")

_log = logging.getLogger("kmsenv.server")
_access = logging.getLogger("kmsenv.server.access")

JSON_TYPE = b"application/json;charset=utf-8"
#: How long a worker keeps an AccessKey it looked up: a disable, enable, delete or policy change
#: made with ``kmsenv access-key`` applies to requests within this many seconds.
CREDENTIAL_CACHE_S = 1.0
#: Threads per worker process that run requests' blocking work (anyio's pool has 40). Measured
#: at concurrency 16, 2 workers: 4 threads gave the best throughput and p99; 1 was clearly worse.
POOL_THREADS = 4
FORM_TYPE = "application/x-www-form-urlencoded"


class _Hop:
    """Hands pool threads' results back to the event loop, many per loop wake-up.

    ``run_in_executor`` chains a ``concurrent.futures.Future`` to an asyncio one (callbacks both
    ways, state copied across) and wakes the loop once per result: in a loaded worker that
    chaining alone was ~9 % of the event loop's time (py-spy). Here a pool thread appends its
    result to a list and wakes the loop only if no wake-up is pending yet; the loop then
    resolves every result that has arrived.
    """

    __slots__ = ("_lock", "_ready", "_scheduled", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._ready: list[tuple[asyncio.Future[Any], tuple[bool, Any]]] = []
        self._scheduled = False

    def deliver(self, future: asyncio.Future[Any], outcome: tuple[bool, Any]) -> None:
        """From a pool thread: ``outcome`` is (True, result) or (False, exception)."""
        with self._lock:
            self._ready.append((future, outcome))
            if self._scheduled:
                return
            self._scheduled = True
        self.loop.call_soon_threadsafe(self._resolve)

    def _resolve(self) -> None:
        with self._lock:
            ready, self._ready = self._ready, []
            self._scheduled = False
        for future, (ok, value) in ready:
            if future.cancelled():
                continue
            if ok:
                future.set_result(value)
            else:
                future.set_exception(value)


class _ClientGone(Exception):
    """The client disconnected before sending its whole body."""


@dataclass(slots=True)
class _Exchange:
    """What one request has revealed so far, for the response, the access log and the audit record."""

    request_id: str
    method: str
    path: str
    client: str | None
    host_id: str
    address: str | None = None  # the client's host for the auth-failure limit (the peer, or behind a trusted proxy)
    started: float = field(default_factory=time.perf_counter)
    access_key_id: str | None = None
    action: str | None = None
    params: dict[str, str] = field(default_factory=dict)
    response: dict[str, Any] | None = None
    status: int = 200
    code: str = "OK"
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # extra response headers
    authenticated: bool = False  # signature verified, key active and nonce claimed


@dataclass(slots=True)
class _State:
    """Per-process handles on the KMS home, opened at startup and closed at shutdown."""

    service: KmsService
    access_keys: AccessKeys
    nonces: NonceStore | PgNonceStore
    audit: AuditLog
    limiter: RateLimiter | None = None
    auth_limiter: AuthFailureLimiter | None = None

    @classmethod
    def open(cls, home: Path, config: ServerConfig) -> _State:
        service = open_service(home, announce=False, store=config.store or None)
        try:
            nonces = open_nonce_store(service.store, home)
            audit = AuditLog(config.audit_path(home), node=config.audit_node())
        except BaseException:
            service.close()
            raise
        limiter = RateLimiter.for_worker(config.rate_limit, config.rate_burst, config.workers)
        auth_limiter = AuthFailureLimiter.for_worker(
            config.auth_failure_rate, config.auth_failure_burst, config.workers
        )
        return cls(service, AccessKeys(service, cache_s=CREDENTIAL_CACHE_S), nonces, audit, limiter, auth_limiter)

    def claim_nonce(self, access_key_id: str, nonce: str) -> bool:
        """Claim the nonce for the AccessKey; False if it was used within the window."""
        return self.nonces.claim(access_key_id, nonce, window_s=signature.SKEW_S)

    def close(self) -> None:
        self.audit.close()
        self.nonces.close()
        self.service.close()


# ------------------------------------------------------------------------------ request parsing --
def _parse_pairs(raw: bytes, where: str) -> list[tuple[str, str]]:
    """Strictly decode ``a=1&b=2`` (``+`` is a space); refuse what is not name=value in UTF-8."""
    pairs = []
    try:
        text = raw.decode("utf-8")
        for piece in text.split("&"):
            if not piece:
                continue  # "a=1&" and "&&": harmless empty separators
            name, sep, value = piece.partition("=")
            if not sep or not name:
                raise ValueError
            pairs.append((unquote_plus(name, errors="strict"), unquote_plus(value, errors="strict")))
    except ValueError:  # UnicodeDecodeError included
        raise KmsError(
            "ParseRequestParameterException", f"The request {where} is not valid: use name=value pairs in UTF-8."
        ) from None
    return pairs


def _refuse_duplicates(pairs: list[tuple[str, str]]) -> None:
    # Parameter pollution: with two values for one name, the signature check and the handler
    # could each pick a different one. Alibaba's SDKs never send a name twice.
    seen: set[str] = set()
    for name, _ in pairs:
        if name in seen:
            raise KmsError.invalid_parameter(name, "It is given more than once.")
        seen.add(name)


def _one(candidates: tuple[str | None, str | None], name: str) -> str:
    """The Action or Version given as a parameter and/or an x-acs-* header; both must agree."""
    given = [c for c in candidates if c]
    if not given:
        raise KmsError.missing_parameter(name)
    if len(set(given)) > 1:
        raise KmsError.invalid_parameter(name, f"The {name} parameter and the x-acs-{name.lower()} header differ.")
    return given[0]


def _resolve_action(req: signature.Request, signed: signature.SignedRequest, params: dict[str, str]) -> str:
    # v1 signs parameters, not headers: an x-acs-action header next to a v1 signature is
    # unauthenticated, so it may only repeat the signed Action, never supply or replace it.
    v1 = signed.scheme in signature.V1_METHODS
    action = _one((params.get("Action"), req.header("x-acs-action")), "Action")
    version = _one((params.get("Version"), req.header("x-acs-version")), "Version")
    if v1 and not (params.get("Action") and params.get("Version")):
        raise KmsError.missing_parameter("Action" if not params.get("Action") else "Version")
    if version != API_VERSION:
        raise KmsError("InvalidVersion", f"Specified parameter Version is not valid: this KMS speaks {API_VERSION}.")
    if action not in ACTIONS:
        raise KmsError("InvalidApi.NotFound", "Specified api is not found, please check your url and method.")
    return action


def _audit_subject(params: dict[str, str], response: dict[str, Any] | None) -> tuple[str | None, str | None]:
    """(key id, alias) a request named or resolved; never a blob or a context."""
    metadata = (response or {}).get("KeyMetadata") or {}
    named = params.get("KeyId") or params.get("DestinationKeyId")
    alias = params.get("AliasName") or (named if named and "alias/" in named else None)
    key_id = (response or {}).get("KeyId") or metadata.get("KeyId") or (named if named != alias else None)
    return key_id, alias


def _client_fault(failure: Exception) -> bool:
    """Whether a refusal is the client's doing (a 4xx code), so it may spend the client's tokens.
    Not a server fault (the store down or busy while the AccessKey is looked up, a bug): those
    would throttle innocent clients for the server's trouble. Not a throttle answer itself."""
    return isinstance(failure, KmsError) and failure.http_status < 500 and not isinstance(failure, Throttled)


# ----------------------------------------------------------------------------------- the app --
class KmsApp:
    """The ASGI callable. ``clock`` is the server's clock for timestamp checks (tests move it)."""

    def __init__(self, config: ServerConfig, *, home: Path | None = None, clock: Clock | None = None) -> None:
        self.config = config
        self.home = home or default_home()
        self._clock = clock or (lambda: datetime.now(UTC))
        self._state: _State | None = None
        self._state_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._hop: _Hop | None = None
        self._stamp: tuple[int, str] = (-1, "")
        self._proxies = TrustedProxies(config.trusted_proxies)

    # -- lifecycle: each worker process opens its own handles; shutdown closes them.
    def _open_state(self) -> _State:
        with self._state_lock:
            if self._state is None:
                self._state = _State.open(self.home, self.config)
            return self._state

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)  # requests already handed to it finish, audit record included
        with self._state_lock:
            if self._state is not None:
                self._state.close()
                self._state = None

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self._request_pool()
                try:
                    await run_in_threadpool(self._open_state)
                except Exception as exc:
                    _log.error("cannot open the KMS home %s: %s", self.home, exc)
                    await send({"type": "lifespan.startup.failed", "message": "cannot open the KMS home"})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await run_in_threadpool(self.close)
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        if scope["type"] != "http":
            return
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in scope["headers"]]
        client = scope.get("client")
        host = next((v for k, v in headers if k == "host"), "")
        ex = _Exchange(
            request_id=new_request_id(),
            method=scope["method"],
            path=scope["path"],
            client=f"{client[0]}:{client[1]}" if client else None,
            host_id=host[:255] or "kmsenv",
            address=client[0] if client else None,
        )
        if self._proxies and client:
            ex.address = self._proxies.client(client[0], ",".join(v for k, v in headers if k == "x-forwarded-for"))
        # All blocking work of a request — auth lookups, the Action, the access-log line and the
        # audit record — happens in ONE thread-pool call: each hop between the event loop and a
        # pool thread costs ~0.1-0.2 ms of CPU and a GIL hand-over (docs/performance.md).
        if ex.path == "/health" and ex.method == "GET":
            status, payload = await self._blocking(self._serve_health, ex)
        else:
            req: signature.Request | None = None
            failure: Exception | None = None
            try:
                req = await self._receive(scope, headers, receive, ex)
            except _ClientGone:
                ex.status, ex.code = 499, "ClientClosedRequest"
                await self._blocking(self._finish, ex)
                return
            except Exception as exc:
                failure = exc
            status, payload = await self._blocking(self._serve, ex, req, failure)
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", JSON_TYPE),
                    (b"content-length", str(len(payload)).encode()),
                    (b"x-acs-request-id", ex.request_id.encode()),
                    *ex.headers,
                ],
            }
        )
        await send({"type": "http.response.body", "body": payload})

    def _request_pool(self) -> ThreadPoolExecutor:
        # A few threads: a request is sub-millisecond work under one GIL, and more threads only
        # make requests queue on the GIL and the store lock.
        if self._pool is None:
            self._pool = ThreadPoolExecutor(POOL_THREADS, thread_name_prefix="kmsenv-request")
        return self._pool

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` in the request pool. If the awaiting task is cancelled, the call still runs
        to its end — its access-log line and audit record included."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        hop = self._hop
        if hop is None or hop.loop is not loop:
            hop = self._hop = _Hop(loop)

        def call() -> None:
            try:
                outcome: tuple[bool, Any] = (True, fn(*args))
            except BaseException as exc:  # delivered to the awaiting task, raised there
                outcome = (False, exc)
            hop.deliver(future, outcome)

        self._request_pool().submit(call)
        return await future

    def _serve(self, ex: _Exchange, req: signature.Request | None, failure: Exception | None) -> tuple[int, bytes]:
        """The blocking part of an API request (in a pool thread): the call, its logs, the JSON."""
        body: Any = None
        status = 200
        if req is not None and failure is None:
            try:
                body = self._authenticated_call(req, ex)
            except Exception as exc:
                failure = exc
        if failure is not None:
            if not ex.authenticated and _client_fault(failure):
                self._count_auth_failure(ex)
            reply = error_reply(failure, request_id=ex.request_id, host_id=ex.host_id)
            status, body, ex.code = reply.status, reply.body, reply.code
            if isinstance(failure, Throttled):
                ex.headers = failure.headers()
        ex.status = status
        self._finish(ex)
        return status, json.dumps(body, ensure_ascii=False).encode("utf-8")

    def _count_auth_failure(self, ex: _Exchange) -> None:
        # Throttled answers spend nothing: an address that keeps failing is let through again
        # at the bucket's rate, not locked out for as long as it keeps sending.
        state = self._state
        if state is not None and state.auth_limiter is not None and ex.address is not None:
            state.auth_limiter.fail(address_key(ex.address))

    def _serve_health(self, ex: _Exchange) -> tuple[int, bytes]:
        status, body = self._health()
        ex.status = status
        self._finish(ex)
        return status, json.dumps(body, ensure_ascii=False).encode("utf-8")

    def _health(self) -> tuple[int, dict[str, Any]]:
        try:
            state = self._open_state()
            with state.service.store.transaction(write=False) as tx:
                tx.meta_get("region")
        except Exception as exc:
            _log.warning("health check failed: %s", exc)
            return 503, {"Status": "Unavailable"}
        return 200, {"Status": "OK"}

    # -- the API path
    async def _receive(
        self, scope: Scope, headers: list[tuple[str, str]], receive: Receive, ex: _Exchange
    ) -> signature.Request:
        """Transport checks and the body, on the event loop; the request for :meth:`_serve`."""
        if ex.path != "/":
            raise KmsError("InvalidApi.NotFound", "Specified api is not found, please check your url and method.")
        if ex.method not in ("GET", "POST"):
            raise KmsError(
                "UnsupportedHTTPMethod", f"The HTTP method {ex.method[:16]} is not supported: use GET or POST."
            )
        body = await self._read_body(headers, receive, ex)
        query = _parse_pairs(scope["query_string"], "query string")
        form: list[tuple[str, str]] = []
        if body:
            content_type = next((v for k, v in headers if k == "content-type"), "")
            if content_type.split(";", 1)[0].strip().lower() != FORM_TYPE:
                raise KmsError.invalid_parameter("Content-Type", f"A request body must be {FORM_TYPE}.")
            form = _parse_pairs(body, "body")
        _refuse_duplicates([*query, *form])
        req = signature.Request(ex.method, query, form, headers, body)
        ex.params = req.params()
        return req

    async def _read_body(self, headers: list[tuple[str, str]], receive: Receive, ex: _Exchange) -> bytes:
        limit = self.config.max_body
        too_large = KmsError("EntityTooLarge", f"The request body exceeds the limit of {limit} bytes.")
        declared = next((v for k, v in headers if k == "content-length"), None)
        if declared is not None and declared.strip().isdigit() and int(declared) > limit:
            raise too_large  # refused before a byte of it is read
        chunked = any(k == "transfer-encoding" for k, _ in headers)
        if not chunked and (declared is None or declared.strip() in ("", "0")):
            return await self._read_chunks(receive, limit, too_large)  # no body: nothing to wait for
        # A body trickled a byte at a time would hold its connection (and this task) for ever.
        timeout = self.config.request_timeout
        try:
            async with asyncio.timeout(timeout):
                return await self._read_chunks(receive, limit, too_large)
        except TimeoutError:
            ex.headers = [(b"connection", b"close")]  # the rest of the body may still be coming
            raise KmsError("RequestTimeout", f"The request body was not received within {timeout} s.") from None

    @staticmethod
    async def _read_chunks(receive: Receive, limit: int, too_large: KmsError) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                raise too_large  # chunked bodies have no Content-Length: count as they stream
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _authenticated_call(self, req: signature.Request, ex: _Exchange) -> dict[str, Any]:
        state = self._open_state()
        params = ex.params
        # What the request claims, for the logs, even if it is refused before it is verified.
        ex.action = params.get("Action") or next((v for k, v in req.headers if k == "x-acs-action"), None)
        ex.access_key_id = params.get("AccessKeyId")
        # An address that keeps failing authentication is refused here, before the AccessKey
        # lookup (a store read for unknown keys, which are never cached) and the HMAC: the work
        # a client without a valid secret can make the worker do.
        if state.auth_limiter is not None and ex.address is not None:
            state.auth_limiter.check(address_key(ex.address))
        signed = signature.parse_auth(req)
        ex.access_key_id = signed.access_key_id
        action = ex.action = _resolve_action(req, signed, params)
        signature.check_timestamp(signed.timestamp, self._clock())
        credential = state.access_keys.lookup(signed.access_key_id)
        if credential is None:
            raise KmsError("InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        signature.verify(signed, credential.secret)
        # Status after the signature: only the key's holder learns that it is disabled.
        if not credential.active:
            raise KmsError("Forbidden.AccessKey", "The specified AccessKey is disabled.")
        # Replay: a captured request re-sent within the clock window carries a used nonce.
        if not state.claim_nonce(signed.access_key_id, signed.nonce):
            raise KmsError("SignatureNonceUsed", "Specified signature nonce was used already.")
        ex.authenticated = True
        # Flood control per AccessKey, only once the request is proven to be the key holder's
        # (others cannot spend a key's tokens by naming it) and not a replay (re-sending a
        # captured request cannot either).
        if state.limiter is not None:
            state.limiter.take(signed.access_key_id)
        authorize(state.service, credential.policy, action, params)
        response = dispatch(state.service, action, params)
        response["RequestId"] = ex.request_id
        ex.response = response
        return response

    # -- one access-log line and one audit record per request
    def _audit_time(self) -> str:
        """Now as the audit's ``YYYY-MM-DDThh:mm:ssZ``, formatted once per clock second (the
        datetime + strftime took ~4 us of every request). One tuple, so threads never mix a
        second with another second's text."""
        second = int(time.time())
        cached = self._stamp
        if cached[0] != second:
            cached = self._stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)))
        return cached[1]

    def _finish(self, ex: _Exchange) -> None:
        latency_ms = (time.perf_counter() - ex.started) * 1000
        key_id, alias = _audit_subject(ex.params, ex.response)
        if _access.isEnabledFor(logging.INFO):  # at --log-level warning, skip building the line
            _access.info(
                json.dumps(
                    {
                        "request_id": ex.request_id,
                        "client": ex.client,
                        "method": ex.method,
                        "path": ex.path,  # never the query string: v1 requests carry Plaintext and blobs there
                        "action": (ex.action or "")[:64] or None,
                        "access_key_id": (ex.access_key_id or "")[:64] or None,
                        "status": ex.status,
                        "code": ex.code,
                        "latency_ms": round(latency_ms, 3),
                    }
                )
            )
        state = self._state
        if state is None or ex.path == "/health":  # probes are logged, not audited: no API request
            return
        try:
            state.audit.append(
                audit_record(
                    time=self._audit_time(),
                    request_id=ex.request_id,
                    access_key_id=ex.access_key_id,
                    action=ex.action,
                    key_id=key_id,
                    alias=alias,
                    code=ex.code,
                    client=ex.client,
                    latency_ms=latency_ms,
                )
            )
        except Exception:
            # The Action has already happened; failing the response would not undo it. Shout instead.
            _log.exception("request %s: could not write the audit record", ex.request_id)


def _configure_logging(level: str) -> None:
    logger = logging.getLogger("kmsenv")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s[%(process)d] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level.upper())


def create_app() -> KmsApp:
    """The app factory uvicorn calls in every worker process (settings from the environment)."""
    config = ServerConfig.from_env()
    _configure_logging(config.log_level)
    return KmsApp(config)
