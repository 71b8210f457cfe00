"""Server settings: one dataclass, from defaults, a TOML file, the environment and the command line.

Precedence, lowest first: the defaults below, a config file (``kmsenv server --config FILE``,
:func:`read_config_file`), the ``KMSENV_SERVER_*`` environment variables, command-line options.

The environment is how the settings reach the workers, because uvicorn's ``--workers`` starts
fresh interpreter processes that only inherit the environment: ``kmsenv server`` resolves every
source once, writes the result into the environment (:meth:`ServerConfig.to_env`) and every
worker's app factory reads it back (:meth:`ServerConfig.from_env`), so all workers run with
identical settings and the file is read once.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from kmsenv.errors import ConfigError
from kmsenv.kms.store import is_postgres_url, redact_url

__all__ = ["DEFAULT_MAX_BODY", "LOG_LEVELS", "ServerConfig", "read_config_file"]

#: Largest request body accepted. KMS bodies carry at most a Recipient or SecretData form field;
#: a limit stops a client from making a worker buffer gigabytes.
DEFAULT_MAX_BODY = 64 * 1024
LOG_LEVELS = ("debug", "info", "warning", "error")
#: Settings that name files: relative paths in a config file are taken from the file's folder.
_PATHS = ("tls_cert", "tls_key", "audit_log")

_ENV = {
    "host": "KMSENV_SERVER_HOST",
    "port": "KMSENV_SERVER_PORT",
    "workers": "KMSENV_SERVER_WORKERS",
    "tls_cert": "KMSENV_SERVER_TLS_CERT",
    "tls_key": "KMSENV_SERVER_TLS_KEY",
    "max_body": "KMSENV_SERVER_MAX_BODY",
    "audit_log": "KMSENV_AUDIT_LOG",
    "log_level": "KMSENV_SERVER_LOG_LEVEL",
    # The same variable every kmsenv command reads: a node's server and CLI use one store.
    "store": "KMSENV_STORE",
    "node_id": "KMSENV_NODE_ID",
    "rate_limit": "KMSENV_SERVER_RATE_LIMIT",
    "rate_burst": "KMSENV_SERVER_RATE_BURST",
    "request_timeout": "KMSENV_SERVER_REQUEST_TIMEOUT",
    "max_connections": "KMSENV_SERVER_MAX_CONNECTIONS",
    "max_connections_per_address": "KMSENV_SERVER_MAX_CONNECTIONS_PER_ADDRESS",
    "auth_failure_rate": "KMSENV_SERVER_AUTH_FAILURE_RATE",
    "auth_failure_burst": "KMSENV_SERVER_AUTH_FAILURE_BURST",
    "trusted_proxies": "KMSENV_SERVER_TRUSTED_PROXIES",
}


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    tls_cert: str = ""
    tls_key: str = ""
    max_body: int = DEFAULT_MAX_BODY
    audit_log: str = ""  # default: audit.jsonl in the KMS home
    log_level: str = "info"
    # A postgresql:// URL (docs/cluster.md), or "" for kms.db in the KMS home. It may hold a
    # password: kept out of the repr; messages show it through ``store_label``.
    store: str = field(default="", repr=False)
    # Stamped on audit records (one chain per node); default hostname:port when the store is shared.
    node_id: str = ""
    # Requests per second per AccessKey (0: no limit) and the burst above it (docs/server.md).
    rate_limit: int = 1000
    rate_burst: int = 2000
    # Seconds for a request's head, and again for its body (slow clients); open connections per worker.
    request_timeout: int = 10
    max_connections: int = 512
    # Open connections per worker from one client address (an IPv6 /64); 0: no per-address cap.
    max_connections_per_address: int = 64
    # Requests per second per client address that may fail before authenticating (0: no limit),
    # and the burst above it; past them the address is throttled before any HMAC (docs/server.md).
    auth_failure_rate: int = 20
    auth_failure_burst: int = 100
    # Comma-separated addresses/networks of reverse proxies whose X-Forwarded-For names the client
    # for the per-address limits; "" trusts nobody (the header is then ignored).
    trusted_proxies: str = ""

    @classmethod
    def from_env(cls, file: Mapping[str, object] | None = None, **overrides: object) -> ServerConfig:
        """Defaults, then ``file`` (from :func:`read_config_file`), then the environment, then
        ``overrides`` that are not None (the command line)."""
        values: dict[str, object] = dict(file or {})
        for f in fields(cls):
            raw = os.environ.get(_ENV[f.name])
            override = overrides.get(f.name)
            if override is not None:
                values[f.name] = override
            elif raw:
                values[f.name] = _int(raw, _ENV[f.name]) if f.type == "int" else raw
        config = cls(**values)  # type: ignore[arg-type]
        config.check()
        return config

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port {self.port} is not between 0 and 65535")
        if self.workers < 1:
            raise ConfigError("--workers must be at least 1")
        if self.max_body < 1024:
            raise ConfigError("the body limit must be at least 1024 bytes")
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ConfigError("TLS needs both a certificate and a key", hint="give --tls-cert and --tls-key")
        if self.log_level not in LOG_LEVELS:
            raise ConfigError(f"log level {self.log_level!r} is not one of {', '.join(LOG_LEVELS)}")
        if self.rate_limit < 0:
            raise ConfigError("the rate limit must be 0 (off) or a number of requests per second")
        if self.rate_limit and self.rate_burst < 1:
            raise ConfigError("the rate burst must be at least 1 request")
        if self.request_timeout < 1:
            raise ConfigError("the request timeout must be at least 1 second")
        if self.max_connections < 1:
            raise ConfigError("the connection limit must be at least 1")
        if self.max_connections_per_address < 0:
            raise ConfigError("the connection limit per address must be 0 (off) or a number of connections")
        if self.auth_failure_rate < 0:
            raise ConfigError("the auth failure rate must be 0 (off) or a number of requests per second")
        if self.auth_failure_rate and self.auth_failure_burst < 1:
            raise ConfigError("the auth failure burst must be at least 1 request")
        from kmsenv.server.limits import TrustedProxies

        bad = TrustedProxies.check(self.trusted_proxies)
        if bad is not None:
            raise ConfigError(
                f"trusted proxy {bad[:64]!r} is not an IP address or network",
                hint="give addresses or networks separated by commas, e.g. 127.0.0.1,10.0.0.0/8",
            )
        if self.store and not is_postgres_url(self.store):
            raise ConfigError(
                f"the store must be a postgresql:// URL, not {redact_url(self.store)!r}",
                hint="leave it unset for the embedded SQLite store in KMSENV_HOME",
            )

    def audit_node(self) -> str | None:
        """The node id for audit records: ``node_id``, else ``hostname:port`` for a node on a
        shared store; None (no ``node`` field) for a single node on its own SQLite store."""
        if self.node_id:
            return self.node_id
        if self.store:
            import socket

            return f"{socket.gethostname()}:{self.port}"
        return None

    def store_label(self, home: Path) -> str:
        """Where the KMS is, for logs: the store URL without its password, or the SQLite file."""
        return redact_url(self.store) if self.store else str(home / "kms.db")

    def to_env(self) -> None:
        """Publish these settings to worker processes (see the module docstring)."""
        for f in fields(self):
            os.environ[_ENV[f.name]] = str(getattr(self, f.name))

    def audit_path(self, home: Path) -> Path:
        return Path(self.audit_log) if self.audit_log else home / "audit.jsonl"


def read_config_file(path: Path) -> dict[str, object]:
    """The settings in a TOML config file, checked for unknown keys and types (not yet for ranges).

    The file holds top-level keys named like the fields of :class:`ServerConfig` (``port = 8443``,
    ``tls_cert = "cert.pem"``); relative paths are taken from the file's folder, so the file
    means the same whatever the working directory. Anything else is refused, not ignored: a
    misspelt ``tls_crt`` must not silently serve plain HTTP.
    """
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc.__class__.__name__}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name: f.type for f in fields(ServerConfig)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown setting(s) {', '.join(unknown)}",
            hint=f"known settings: {', '.join(known)}",
        )
    values: dict[str, object] = {}
    for name, value in data.items():
        if known[name] == "int":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ConfigError(f"config file {path}: {name} must be an integer, not {_toml_type(value)}")
        elif not isinstance(value, str):
            raise ConfigError(f"config file {path}: {name} must be a string, not {_toml_type(value)}")
        values[name] = value
        if name in _PATHS and value:
            values[name] = str(path.absolute().parent / Path(str(value)).expanduser())
    return values


def _toml_type(value: object) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a float", str: "a string", list: "an array", dict: "a table"}
    return names.get(type(value), "a date or time")


def _int(raw: str, name: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
