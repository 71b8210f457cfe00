"""The connection protocol sends each response with one write: uvicorn writes the head and the
body separately, which with TCP_NODELAY costs two send calls and two TCP segments per response."""

from __future__ import annotations

import asyncio
from typing import Any

from kmsenv.server.protocol import _JoinedWrites


class _Transport:
    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        assert not self.closed, "write after close"
        self.writes.append(data)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 1234) if name == "peername" else default


def test_writes_of_one_loop_step_go_out_as_one() -> None:
    async def go() -> _Transport:
        real = _Transport()
        joined = _JoinedWrites(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        joined.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n")
        joined.write(bytearray(b"{}"))
        assert real.writes == []  # nothing sent inside the step
        await asyncio.sleep(0)
        joined.write(b"next")
        await asyncio.sleep(0)
        return real

    real = asyncio.run(go())
    assert real.writes == [b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\n{}", b"next"]


def test_close_sends_what_is_pending_first_and_nothing_after() -> None:
    async def go() -> _Transport:
        real = _Transport()
        joined = _JoinedWrites(real, asyncio.get_running_loop())  # type: ignore[arg-type]
        joined.write(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n")
        joined.close()
        assert joined.is_closing()  # everything else is the real transport's
        assert joined.get_extra_info("peername") == ("127.0.0.1", 1234)
        await asyncio.sleep(0)  # the flush scheduled by the write finds nothing left to send
        return real

    real = asyncio.run(go())
    assert real.writes == [b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n"]
    assert real.closed
