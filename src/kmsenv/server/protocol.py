"""The HTTP/1.1 connection protocol: uvicorn's ``httptools`` protocol with kmsenv's additions.

- **Slow and idle clients** (slowloris). uvicorn closes a keep-alive connection idle between
  requests (``timeout_keep_alive``, 5 s) but has no deadline for a request's head, and httptools
  no bound on its size: a client that connects and sends nothing, or trickles its headers a byte
  at a time, would hold its connection for ever. Here the head must be complete within
  ``request_timeout`` seconds of the connection opening (or of the request's first byte on a
  kept-alive connection) and within ``MAX_HEAD_BYTES``. A connection that misses the deadline is
  closed (with a ``RequestTimeout`` answer if it had begun a request); an oversized head gets
  ``RequestHeaderTooLarge`` and a close. The body has its own deadline in the app
  (``KmsApp._read_body``), which can still answer with an audited ``RequestTimeout``.
- **Connections per worker** are bounded by ``max_connections``. A new connection beyond it
  first makes room by closing the connection that has waited longest for a request head (an
  idle keep-alive, a silent or a trickling client), so idle connections cannot lock out a client
  that sends its request at once; only when every connection is inside a request is the new one
  refused: it is read up to its head and answered ``ServiceUnavailableTemporary`` (503, which
  Alibaba's clients retry) with ``Retry-After: 1`` and ``connection: close``.
- **Connections per client address** (``kmsenv.server.limits.address_key``: an IPv4 address, an
  IPv6 /64) per worker are bounded by ``max_connections_per_address``, so one address cannot take
  all ``max_connections``. Past it, the same steps, within that address: the new connection
  makes room by closing *that address's* connection longest waiting for a head, or, when all of
  them are inside a request, is refused with the same 503. It never evicts another address's
  connection. Refused rather than closed at once, because the Alibaba SDKs retry a 503 with
  back-off where a connection closed without an answer reads as a broken server; reading the
  head is bounded (``request_timeout``, ``MAX_HEAD_BYTES``) and the waiting connection is the
  first to be evicted by the next one. A trusted reverse proxy (``trusted_proxies``) is exempt:
  it carries many clients' connections.
- **One write per response.** uvicorn writes a response's head and its body with two
  ``transport.write`` calls; with ``TCP_NODELAY`` (which the server needs, see
  ``kmsenv.server.runner``) each becomes its own send system call and its own TCP segment, and on
  loopback the sender's system call also runs the receiver's TCP input. The transport is wrapped
  so that writes made in one event-loop step are joined and sent once, right after that step.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from kmsenv.errors import KmsError
from kmsenv.kms.actions import new_request_id
from kmsenv.server.errors import error_reply
from kmsenv.server.limits import TrustedProxies, address_key

__all__ = ["MAX_HEAD_BYTES", "KmsHttpProtocol"]

#: Largest request head (request line and headers). An SDK's head is under 2 KiB; the v1
#: parameters travel in the query, so a long Plaintext or blob makes it longer, never near this.
MAX_HEAD_BYTES = 64 * 1024
JSON_TYPE = b"application/json;charset=utf-8"

_log = logging.getLogger("kmsenv.server")


@functools.cache
def _limits() -> tuple[float, int, int, TrustedProxies]:
    """(request_timeout, max_connections, max_connections_per_address, trusted_proxies) of this
    worker, from the settings it was started with."""
    from kmsenv.server.config import ServerConfig

    config = ServerConfig.from_env()
    return (
        float(config.request_timeout),
        config.max_connections,
        config.max_connections_per_address,
        TrustedProxies(config.trusted_proxies),
    )


#: This worker's open connections by client address (``address_key``). A worker process runs one
#: server on one event loop, and only that loop's thread touches this.
_BY_ADDRESS: dict[str, set[KmsHttpProtocol]] = {}


def _error_parts(
    code: str, message: str, *, host_id: str = "kmsenv", extra: tuple[tuple[bytes, bytes], ...] = ()
) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """Status, headers and body of a ``connection: close`` answer with Alibaba's error body."""
    request_id = new_request_id()
    reply = error_reply(KmsError(code, message), request_id=request_id, host_id=host_id)
    body = json.dumps(reply.body).encode()
    headers = [
        (b"content-type", JSON_TYPE),
        (b"content-length", str(len(body)).encode()),
        (b"x-acs-request-id", request_id.encode()),
        *extra,
        (b"connection", b"close"),
    ]
    return reply.status, headers, body


def _error_response(code: str, message: str, *, extra: tuple[tuple[bytes, bytes], ...] = ()) -> bytes:
    """A complete ``connection: close`` HTTP response with Alibaba's error body, as raw bytes
    (written to the transport before any app has the request)."""
    status, headers, body = _error_parts(code, message, extra=extra)
    head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Error"))
    return head + b"".join(name + b": " + value + b"\r\n" for name, value in headers) + b"\r\n" + body


_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large", 503: b"Service Unavailable"}
_OVER_LIMIT = "The server has too many open connections; try again later."
_OVER_ADDRESS_LIMIT = "This client address has too many open connections; try again later."


def _refusal(message: str) -> Any:
    """The app for a request on a connection past a connection limit: 503, then close. (The
    client sees the fixed 503 sentence of ``server.errors``; ``message`` goes to the log.)"""

    async def refuse(scope: Any, receive: Any, send: Any) -> None:
        host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
        status, headers, body = _error_parts(
            "ServiceUnavailableTemporary", message, host_id=host[:255] or "kmsenv", extra=((b"retry-after", b"1"),)
        )
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return refuse


_REFUSE_OVER_LIMIT = _refusal(_OVER_LIMIT)
_REFUSE_OVER_ADDRESS_LIMIT = _refusal(_OVER_ADDRESS_LIMIT)


class _JoinedWrites:
    """A transport whose writes in one event-loop step are sent as one ``write`` after it.

    Everything else is the wrapped transport's. ``close`` sends what is pending first, so a
    response written just before a close is never lost.
    """

    __slots__ = ("_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending.append(bytes(data))

    def _flush(self) -> None:
        if self._pending:
            data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
            self._pending.clear()
            if not self._transport.is_closing():
                self._transport.write(data)

    def close(self) -> None:
        self._flush()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class KmsHttpProtocol(HttpToolsProtocol):
    """uvicorn's ``httptools`` protocol with one write per response, a deadline and a size bound
    for request heads, and a bounded number of connections, in all and per client address
    (module docstring)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._timeout, self._max_connections, self._per_address, self._proxies = _limits()
        self._address: str | None = None  # set while counted in _BY_ADDRESS
        self._head_timer: asyncio.TimerHandle | None = None
        self._awaiting_head = True  # no request head in progress or complete: evictable
        self._idle_since = time.monotonic()
        self._head_bytes = 0
        self._begun = False  # a byte of the current request head has arrived
        self._refuse: Any = None  # the app answering this connection's request, if over a limit

    # -- connection lifecycle
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # After super(): its FlowControl pauses and resumes the real transport.
        self.transport = _JoinedWrites(transport, self.loop)  # type: ignore[assignment]
        self._arm_head_timer()
        # A trusted reverse proxy carries many clients' connections: only the global cap applies.
        if self._per_address and self.client is not None and not self._proxies.trusts(self.client[0]):
            self._address = address_key(self.client[0])
            peers = _BY_ADDRESS.setdefault(self._address, set())
            peers.add(self)
            if len(peers) > self._per_address and self._make_room_for_address(peers):
                return  # one of its own closed (no net growth), or this one refused: nobody else pays
        if len(self.connections) > self._max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        if self._address is not None:
            peers = _BY_ADDRESS.get(self._address)
            if peers is not None:
                peers.discard(self)
                if not peers:
                    del _BY_ADDRESS[self._address]
            self._address = None
        super().connection_lost(exc)

    def _make_room_for_address(self, peers: set[KmsHttpProtocol]) -> bool:
        """Over the per-address cap: close this address's longest idle connection, or refuse this
        one. False if the address is not over its cap after all (connections already closing)."""
        others = [c for c in peers if c is not self and not c.transport.is_closing()]
        if len(others) < self._per_address:
            return False
        idle = [c for c in others if c._awaiting_head]
        if idle:
            oldest = min(idle, key=lambda c: c._idle_since)
            _log.info(
                "connection limit per address (%d) reached for %s: closing its longest idle connection",
                self._per_address,
                self._address,
            )
            oldest.transport.close()
        else:
            _log.warning(
                "connection limit per address (%d) reached for %s: refusing a new connection",
                self._per_address,
                self._address,
            )
            self._refuse = _REFUSE_OVER_ADDRESS_LIMIT
        return True

    def _make_room(self) -> None:
        idle = [
            c
            for c in self.connections
            if c is not self and isinstance(c, KmsHttpProtocol) and c._awaiting_head and not c.transport.is_closing()
        ]
        if idle:
            oldest = min(idle, key=lambda c: c._idle_since)
            _log.info("connection limit (%d) reached: closing the longest idle connection", self._max_connections)
            oldest.transport.close()
        else:
            _log.warning("connection limit (%d) reached: refusing a new connection", self._max_connections)
            self._refuse = _REFUSE_OVER_LIMIT

    # -- the request head: a deadline and a size bound
    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self._timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self._begun:  # a request had begun: tell the client why it is cut off
            self.transport.write(
                _error_response("RequestTimeout", f"The request head was not received within {self._timeout:g} s.")
            )
        self.transport.close()

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = 0
        self._begun = True
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._awaiting_head and self._begun and not self.transport.is_closing():
            # Counted only while the head is still incomplete after this chunk: a chunk that
            # completes a head may carry a body too, which the body limit bounds.
            self._head_bytes += len(data)
            if self._head_bytes > MAX_HEAD_BYTES:
                self._cancel_head_timer()
                self.transport.write(
                    _error_response(
                        "RequestHeaderTooLarge", f"The request head exceeds the limit of {MAX_HEAD_BYTES} bytes."
                    )
                )
                self.transport.close()

    def on_headers_complete(self) -> None:
        self._cancel_head_timer()
        self._awaiting_head = False
        self._begun = False
        if self._refuse is None:
            super().on_headers_complete()
            return
        app, self.app = self.app, self._refuse
        try:
            super().on_headers_complete()
        finally:
            self.app = app

    def on_response_complete(self) -> None:
        pipelined = bool(self.pipeline)  # super() starts the next pipelined request, head complete
        super().on_response_complete()
        if not pipelined:
            self._awaiting_head = True  # idle until the next request's first byte
            self._idle_since = time.monotonic()
