"""Choosing a node's store: ``kmsenv server --store URL``, ``KMSENV_STORE``, the ``store`` key of the
config file, else kms.db in the home; a store URL's password never shows (log, errors, /health,
reprs)."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import psycopg
import pytest

from kmsenv.errors import ConfigError
from kmsenv.kms.pg_store import redact
from kmsenv.server.config import ServerConfig, read_config_file
from pg_harness import Cluster, free_port, kmsenv, pg_cluster, pg_url, pg_url_factory, start_node
from test_server_harness import sign_v1

__all__ = ["pg_cluster", "pg_url", "pg_url_factory"]

PASSWORD = "Hunter2-never-shown"


def with_password(url: str) -> str:
    """``url`` with a password in it (the test cluster trusts loopback, so any password works)."""
    scheme, rest = url.split("://", 1)
    user, host = rest.split("@", 1)
    return f"{scheme}://{user}:{PASSWORD}@{host}"


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KMSENV_"):
            monkeypatch.delenv(name)


def test_store_precedence_command_line_env_file_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "server.toml"
    path.write_text('store = "postgresql://file@db/kms"\n')
    assert ServerConfig.from_env().store == ""  # default: SQLite in the home
    assert ServerConfig.from_env().store_label(tmp_path) == str(tmp_path / "kms.db")
    assert ServerConfig.from_env(read_config_file(path)).store == "postgresql://file@db/kms"
    monkeypatch.setenv("KMSENV_STORE", "postgresql://env@db/kms")
    assert ServerConfig.from_env(read_config_file(path)).store == "postgresql://env@db/kms"
    config = ServerConfig.from_env(read_config_file(path), store="postgresql://cli@db/kms")
    assert config.store == "postgresql://cli@db/kms"
    # Workers get the resolved store through the environment, as every other setting.
    monkeypatch.delenv("KMSENV_STORE")
    config.to_env()
    assert os.environ["KMSENV_STORE"] == "postgresql://cli@db/kms"


def test_a_store_that_is_not_postgresql_is_refused_without_its_password(tmp_path: Path) -> None:
    path = tmp_path / "server.toml"
    path.write_text(f'store = "mysql://kms:{PASSWORD}@db/kms"\n')
    with pytest.raises(ConfigError) as info:
        ServerConfig.from_env(read_config_file(path))
    assert "postgresql://" in str(info.value) and PASSWORD not in str(info.value)
    path.write_text("store = 5\n")
    with pytest.raises(ConfigError, match="store must be a string"):
        read_config_file(path)


def test_the_password_stays_out_of_reprs_and_labels(tmp_path: Path) -> None:
    url = f"postgresql://kms:{PASSWORD}@db:5432/kms?sslmode=require"
    config = ServerConfig(store=url)
    assert PASSWORD not in repr(config)
    assert config.store_label(tmp_path) == "postgresql://kms:***@db:5432/kms?sslmode=require"
    assert PASSWORD not in redact(f"postgresql://db/kms?user=kms&password={PASSWORD}")


def _seed(home: Path, url: str) -> str:
    """Make the node's home and its database's KMS (root key in ``home``); an AccessKey."""
    created = kmsenv(home, "access-key", "create", KMSENV_STORE=url)
    return created.stdout


@pytest.mark.slow
def test_server_store_option_and_config_key(tmp_path: Path, pg_cluster: Cluster) -> None:
    """Node 1 names its store with --store, node 2 in its config file; both serve one KMS, and
    neither the log nor /health nor an answer shows the password."""
    import json

    url = pg_cluster.create_database()
    secret_url = with_password(url)
    first = tmp_path / "n1"
    creds = json.loads(_seed(first / "home", url))
    ak = (creds["AccessKeyId"], creds["AccessKeySecret"])
    config = tmp_path / "server.toml"
    config.write_text(f'store = "{secret_url}"\nlog_level = "debug"\n')
    node1 = start_node(first, "--store", secret_url, "--log-level", "debug")
    node2 = start_node(tmp_path / "n2", "--config", str(config), root_key=first / "home" / "root.key")
    try:
        created = httpx.post(node1.url, params=sign_v1(*ak, "CreateKey"), timeout=30)
        assert created.status_code == 200, created.text
        key_id = created.json()["KeyMetadata"]["KeyId"]
        described = httpx.post(node2.url, params=sign_v1(*ak, "DescribeKey", {"KeyId": key_id}), timeout=30)
        assert described.status_code == 200, described.text
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT count(*) FROM keys WHERE key_id = %s", (key_id,)).fetchone() == (1,)
        for node in (node1, node2):
            health = httpx.get(f"{node.url}health", timeout=10)
            assert health.status_code == 200 and PASSWORD not in health.text
        assert not (first / "home" / "kms.db").exists() and not (tmp_path / "n2" / "home" / "kms.db").exists()
    finally:
        node1.stop()
        node2.stop()
    for node in (node1, node2):
        log = node.log.read_text()
        assert redact(secret_url) in log  # the startup line names the store ...
        assert PASSWORD not in log  # ... without its password


def test_server_with_an_unreachable_store_fails_without_the_password(tmp_path: Path) -> None:
    url = f"postgresql://kms:{PASSWORD}@127.0.0.1:{free_port()}/kms"
    result = kmsenv(tmp_path / "home", "server", "--port", str(free_port()), "--store", url, check=False)
    assert result.returncode != 0
    assert "127.0.0.1" in result.stderr and PASSWORD not in result.stderr + result.stdout


def test_store_commands_take_store_and_hide_the_password(tmp_path: Path, pg_url: str) -> None:
    secret_url = with_password(pg_url)
    home = tmp_path / "home"
    _seed(home, pg_url)
    for args in (["store", "migrate"], ["store", "check-version"], ["store", "check"]):
        result = kmsenv(home, *args, "--store", secret_url, check=False)
        assert result.returncode == 0, result.stderr
        assert PASSWORD not in result.stdout + result.stderr
    export = tmp_path / "kms.export"
    result = kmsenv(home, "store", "export", "--store", secret_url, "-o", str(export))
    assert PASSWORD not in result.stderr and export.exists()
