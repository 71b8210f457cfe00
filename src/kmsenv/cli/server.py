"""``kmsenv server``: serve the KMS in KMSENV_HOME over the Alibaba Cloud KMS (2016-01-20) HTTP API.

Presentation only: options (and ``--config FILE``) → :class:`kmsenv.server.config.ServerConfig` →
uvicorn. uvicorn and the server package are imported when the command runs, never at
``kmsenv --help`` time.
"""

from __future__ import annotations

import argparse
import ipaddress
from pathlib import Path
from typing import Any

__all__ = ["register"]


def register(sub: argparse._SubParsersAction[Any]) -> None:
    parser = sub.add_parser(
        "server",
        help="serve the KMS over HTTP to the official Alibaba Cloud SDKs",
        description="Serve the KMS in KMSENV_HOME over the Alibaba Cloud KMS (2016-01-20) HTTP API, so the "
        "official SDKs work unchanged with only their endpoint set to this server. Requests are signed "
        "with AccessKeys from `kmsenv access-key create`. Each option can also be set by the "
        "environment variable shown, or in a TOML file given with --config; precedence: command line, "
        "then environment, then file, then defaults. See docs/server.md.",
    )
    parser.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help="TOML file of settings (host, port, workers, tls_cert, tls_key, max_body, audit_log, log_level, "
        "store, node_id, rate_limit, rate_burst, request_timeout, max_connections, max_connections_per_address, "
        "auth_failure_rate, auth_failure_burst, trusted_proxies)",
    )
    parser.add_argument("--host", help="address to listen on (KMSENV_SERVER_HOST; default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="TCP port (KMSENV_SERVER_PORT; default 8080)")
    parser.add_argument("--workers", type=int, help="worker processes (KMSENV_SERVER_WORKERS; default 1)")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain for HTTPS (KMSENV_SERVER_TLS_CERT)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key for HTTPS (KMSENV_SERVER_TLS_KEY)")
    parser.add_argument(
        "--max-body", type=int, help="largest request body in bytes (KMSENV_SERVER_MAX_BODY; default 65536)"
    )
    parser.add_argument(
        "--audit-log", type=Path, help="audit log file (KMSENV_AUDIT_LOG; default KMSENV_HOME/audit.jsonl)"
    )
    parser.add_argument(
        "--log-level",
        choices=["debug", "info", "warning", "error"],
        help="server log level (KMSENV_SERVER_LOG_LEVEL; default info)",
    )
    parser.add_argument(
        "--store",
        metavar="URL",
        help="a postgresql:// URL to share one KMS between nodes (KMSENV_STORE; default kms.db in KMSENV_HOME)",
    )
    parser.add_argument(
        "--node-id",
        help="this node's id in its audit records (KMSENV_NODE_ID; default hostname:port with a shared store)",
    )
    parser.add_argument(
        "--rate-limit",
        type=int,
        metavar="N",
        help="requests per second per AccessKey, answered Rejected.Throttling above it; 0 turns it off "
        "(KMSENV_SERVER_RATE_LIMIT; default 1000)",
    )
    parser.add_argument(
        "--rate-burst",
        type=int,
        metavar="N",
        help="requests an AccessKey may send at once above its rate (KMSENV_SERVER_RATE_BURST; default 2000)",
    )
    parser.add_argument(
        "--request-timeout",
        type=int,
        metavar="S",
        help="seconds a client has to send a request's head, and again its body "
        "(KMSENV_SERVER_REQUEST_TIMEOUT; default 10)",
    )
    parser.add_argument(
        "--max-connections",
        type=int,
        metavar="N",
        help="open connections per worker process (KMSENV_SERVER_MAX_CONNECTIONS; default 512)",
    )
    parser.add_argument(
        "--max-connections-per-address",
        type=int,
        metavar="N",
        help="open connections per worker process from one client address (an IPv6 /64); 0 turns it off "
        "(KMSENV_SERVER_MAX_CONNECTIONS_PER_ADDRESS; default 64)",
    )
    parser.add_argument(
        "--auth-failure-rate",
        type=int,
        metavar="N",
        help="requests per second one client address may send that fail before authenticating; above it the "
        "address is answered Rejected.Throttling before any signature check; 0 turns it off "
        "(KMSENV_SERVER_AUTH_FAILURE_RATE; default 20)",
    )
    parser.add_argument(
        "--auth-failure-burst",
        type=int,
        metavar="N",
        help="failed requests one address may send at once above that rate (KMSENV_SERVER_AUTH_FAILURE_BURST; "
        "default 100)",
    )
    parser.add_argument(
        "--trusted-proxies",
        metavar="LIST",
        help="comma-separated addresses or networks of reverse proxies whose X-Forwarded-For names the client "
        "for the per-address limits (KMSENV_SERVER_TRUSTED_PROXIES; default none: the header is ignored)",
    )
    parser.set_defaults(func=_serve)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _serve(args: argparse.Namespace) -> int:
    import logging  # here: `kmsenv --help` builds this module's parser and need not load logging

    from kmsenv.kms.service import default_home, open_service
    from kmsenv.server.app import _configure_logging
    from kmsenv.server.config import ServerConfig, read_config_file
    from kmsenv.server.runner import serve

    config = ServerConfig.from_env(
        read_config_file(args.config) if args.config else None,
        host=args.host,
        port=args.port,
        workers=args.workers,
        tls_cert=str(args.tls_cert) if args.tls_cert else None,
        tls_key=str(args.tls_key) if args.tls_key else None,
        max_body=args.max_body,
        audit_log=str(args.audit_log) if args.audit_log else None,
        log_level=args.log_level,
        store=args.store,
        rate_limit=args.rate_limit,
        rate_burst=args.rate_burst,
        request_timeout=args.request_timeout,
        max_connections=args.max_connections,
        max_connections_per_address=args.max_connections_per_address,
        auth_failure_rate=args.auth_failure_rate,
        auth_failure_burst=args.auth_failure_burst,
        trusted_proxies=args.trusted_proxies,
        node_id=args.node_id,
    )
    # Create (or check) the KMS home once, here: workers starting together must not race to
    # create a root key each.
    open_service(default_home(), store=config.store).close()
    config.to_env()
    _configure_logging(config.log_level)
    log = logging.getLogger("kmsenv.server")
    if not config.tls_cert and not _is_loopback(config.host):
        log.warning("serving plain HTTP on %s: use --tls-cert/--tls-key or a TLS proxy", config.host)
    scheme = "https" if config.tls_cert else "http"
    log.info(
        "kmsenv KMS on %s://%s:%d (home %s, store %s, %d worker(s))",
        scheme,
        config.host,
        config.port,
        default_home(),
        config.store_label(default_home()),
        config.workers,
    )
    serve(config)
    return 0
