"""Running the ASGI app on uvicorn: the listening sockets, worker processes and shutdown.

What this module owns, and why it is not a plain ``uvicorn.run``:

- **One listening socket per worker** (``--workers N`` > 1). uvicorn's own multi-worker mode binds
  one socket in the parent and hands it to every worker; each worker, when woken, accepts every
  pending connection it can. A burst of connections then lands unevenly — measured 11 to 5 with 16
  clients on 2 workers — and the clients of the busier worker wait about twice as long (the
  p99 of ``docs/performance.md``). Here the parent binds the address with ``SO_REUSEPORT`` (to
  hold the port and fail early if it is taken) but never listens on it; each worker opens its
  *own* ``SO_REUSEPORT`` socket on the same address, and the kernel spreads new connections over
  the workers' sockets by a hash of the connection's addresses. Each socket is created with
  ``IPPROTO_TCP``, so asyncio sets ``TCP_NODELAY`` on accepted connections (uvicorn's listener
  lost it: uvicorn issue #3149).
- The uvicorn settings the server always uses: no uvicorn access log (it prints the query string,
  where v1 requests carry Plaintext), no ``X-Forwarded-For`` trust, 30 s graceful shutdown.

A trade-off of ``SO_REUSEPORT``: connections the kernel has queued on a worker's socket but that
worker has not accepted yet are reset if that worker exits (a crash, or shutdown), where a shared
socket would let another worker take them. Only processes of the same user can join the group.
"""

from __future__ import annotations

import contextlib
import socket
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from kmsenv.server.config import ServerConfig

__all__ = ["serve", "worker_listener"]

APP = "kmsenv.server.app:create_app"
GRACEFUL_SHUTDOWN_S = 30


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _reuseport_socket(family: socket.AddressFamily, address: Any) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def _open_in_worker(family: socket.AddressFamily, address: Any) -> socket.socket:
    """Unpickled in each worker process: that worker's own socket on the shared address."""
    return _reuseport_socket(family, address)


class _SharedAddress(socket.socket):
    """The parent's bound (never listening) socket; pickled to a worker as "open your own".

    uvicorn sends the sockets to its worker processes by pickling them; a plain socket travels as
    a duplicate of the same descriptor, this one as a recipe for a new ``SO_REUSEPORT`` socket.
    """

    def __reduce_ex__(self, protocol: Any) -> tuple[Any, tuple[Any, ...]]:
        return (_open_in_worker, (self.family, self.getsockname()))


def worker_listener(host: str, port: int) -> socket.socket:
    """Bind ``host:port`` for a group of worker processes (see the module docstring)."""
    family = _family(host)
    probe = _reuseport_socket(family, (host, port))
    # Re-wrap the descriptor so pickling goes through _SharedAddress.__reduce_ex__.
    return _SharedAddress(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=probe.detach())


def uvicorn_config(config: ServerConfig) -> Any:
    import uvicorn

    from kmsenv.server.protocol import KmsHttpProtocol

    return uvicorn.Config(
        APP,
        factory=True,
        http=KmsHttpProtocol,
        # The KMS API is plain HTTP: an Upgrade request must not hand the connection to a
        # WebSocket protocol, outside the limits of KmsHttpProtocol.
        ws="none",
        host=config.host,
        port=config.port,
        workers=config.workers,
        ssl_certfile=config.tls_cert or None,
        ssl_keyfile=config.tls_key or None,
        # uvicorn's own access log prints the query string, where v1 requests carry Plaintext and
        # CiphertextBlobs; the app writes its own access line without it.
        access_log=False,
        log_level=config.log_level,
        server_header=False,
        # uvicorn trusts X-Forwarded-For from 127.0.0.1 by default: any local client could then
        # choose the client address the audit records. kmsenv audits the peer it actually sees.
        proxy_headers=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )


def serve(config: ServerConfig) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests finish (up to 30 s)."""
    # As uvicorn.run: the signal uvicorn re-raises after its graceful shutdown ends the run quietly.
    with contextlib.suppress(KeyboardInterrupt):
        _serve(config)


def _serve(config: ServerConfig) -> None:
    import logging

    import uvicorn
    from uvicorn.config import STARTUP_FAILURE
    from uvicorn.supervisors import Multiprocess

    uv = uvicorn_config(config)
    if config.workers == 1:
        server = uvicorn.Server(uv)
        server.run()
        if not server.started:
            sys.exit(STARTUP_FAILURE)
        return
    log = logging.getLogger("kmsenv.server")
    try:
        sock = worker_listener(config.host, config.port)
    except OSError as exc:
        log.error("cannot listen on %s:%d: %s", config.host, config.port, exc)
        sys.exit(STARTUP_FAILURE)
    # uvicorn logs its address from its own bind_socket, which this path replaces.
    log.info(
        "listening on %s port %d: %d workers, one SO_REUSEPORT socket each",
        config.host,
        sock.getsockname()[1],
        config.workers,
    )
    try:
        Multiprocess(uv, sockets=[sock]).run()
    finally:
        sock.close()
