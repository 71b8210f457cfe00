"""Server settings: one dataclass, read from ``KMSENV_SERVER_*`` environment variables.

The environment is the one source because uvicorn's ``--workers`` starts fresh interpreter
processes that only inherit the environment: ``kmsenv server`` writes its command-line options
into the environment (:meth:`ServerConfig.to_env`) and every worker's app factory reads them back
(:meth:`ServerConfig.from_env`), so all workers run with identical settings.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path

from kmsenv.errors import ConfigError

__all__ = ["DEFAULT_MAX_BODY", "ServerConfig"]

#: Largest request body accepted. KMS bodies carry at most a Recipient or SecretData form field;
#: a limit stops a client from making a worker buffer gigabytes.
DEFAULT_MAX_BODY = 64 * 1024

_ENV = {
    "host": "KMSENV_SERVER_HOST",
    "port": "KMSENV_SERVER_PORT",
    "workers": "KMSENV_SERVER_WORKERS",
    "tls_cert": "KMSENV_SERVER_TLS_CERT",
    "tls_key": "KMSENV_SERVER_TLS_KEY",
    "max_body": "KMSENV_SERVER_MAX_BODY",
    "audit_log": "KMSENV_AUDIT_LOG",
    "log_level": "KMSENV_SERVER_LOG_LEVEL",
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

    @classmethod
    def from_env(cls, **overrides: object) -> ServerConfig:
        """Defaults, then the environment, then ``overrides`` that are not None."""
        values: dict[str, object] = {}
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

    def to_env(self) -> None:
        """Publish these settings to worker processes (see the module docstring)."""
        for f in fields(self):
            os.environ[_ENV[f.name]] = str(getattr(self, f.name))

    def audit_path(self, home: Path) -> Path:
        return Path(self.audit_log) if self.audit_log else home / "audit.jsonl"


def _int(raw: str, name: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
