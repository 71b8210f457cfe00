"""The HTTP/1.1 connection protocol: uvicorn's ``httptools`` protocol with kmsenv's additions.

- **One write per response.** uvicorn writes a response's head and its body with two
  ``transport.write`` calls; with ``TCP_NODELAY`` (which the server needs, see
  ``kmsenv.server.runner``) each becomes its own send system call and its own TCP segment, and on
  loopback the sender's system call also runs the receiver's TCP input. The transport is wrapped
  so that writes made in one event-loop step are joined and sent once, right after that step.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["KmsHttpProtocol"]


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
    """uvicorn's ``httptools`` protocol, writing each response once (module docstring)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # After super(): its FlowControl pauses and resumes the real transport.
        self.transport = _JoinedWrites(transport, self.loop)  # type: ignore[assignment]
