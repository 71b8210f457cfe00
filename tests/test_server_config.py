"""`kmsenv server --config FILE`: TOML settings, precedence (command line > env > file > defaults), refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import httpx
import pytest

from kmsenv.cli import main
from kmsenv.errors import ConfigError
from kmsenv.server.config import DEFAULT_MAX_BODY, ServerConfig, read_config_file
from test_server_harness import free_port


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("KMSENV_SERVER_") or name == "KMSENV_AUDIT_LOG":
            monkeypatch.delenv(name)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "server.toml"
    path.write_text(text)
    return path


def test_file_settings_are_used_and_defaults_fill_the_rest(tmp_path: Path) -> None:
    path = write(tmp_path, 'host = "127.0.0.2"\nport = 9443\nworkers = 3\nmax_body = 4096\nlog_level = "warning"\n')
    config = ServerConfig.from_env(read_config_file(path))
    assert (config.host, config.port, config.workers, config.max_body, config.log_level) == (
        "127.0.0.2",
        9443,
        3,
        4096,
        "warning",
    )
    assert (config.tls_cert, config.tls_key, config.audit_log) == ("", "", "")


def test_precedence_command_line_then_env_then_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path, "port = 1111\nworkers = 2\nmax_body = 2048\n")
    monkeypatch.setenv("KMSENV_SERVER_PORT", "2222")
    monkeypatch.setenv("KMSENV_SERVER_WORKERS", "4")
    config = ServerConfig.from_env(read_config_file(path), workers=5)
    assert config.workers == 5  # command line beats env and file
    assert config.port == 2222  # env beats file
    assert config.max_body == 2048  # file beats the default
    assert ServerConfig.from_env().max_body == DEFAULT_MAX_BODY


def test_relative_paths_are_taken_from_the_files_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    path = folder / "server.toml"
    path.write_text(f'tls_cert = "cert.pem"\ntls_key = "{tmp_path / "key.pem"}"\naudit_log = "logs/audit.jsonl"\n')
    monkeypatch.chdir(tmp_path)
    config = ServerConfig.from_env(read_config_file(Path("etc/server.toml")))
    assert config.tls_cert == str(folder / "cert.pem")
    assert config.tls_key == str(tmp_path / "key.pem")  # absolute stays as is
    assert config.audit_path(tmp_path / "home") == folder / "logs" / "audit.jsonl"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("tls_crt = 'cert.pem'\n", "unknown setting(s) tls_crt"),
        ("[server]\nport = 1\n", "unknown setting(s) server"),
        ("port = '8080'\n", "port must be an integer, not a string"),
        ("workers = true\n", "workers must be an integer, not a boolean"),
        ("max_body = 1.5\n", "max_body must be an integer, not a float"),
        ("host = 127\n", "host must be a string, not an integer"),
        ("port = [1]\n", "port must be an integer, not an array"),
        ("port = = 1\n", "is not valid TOML"),
    ],
)
def test_unknown_keys_and_wrong_types_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_config_file(write(tmp_path, text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("port = 70000\n", "not between 0 and 65535"),
        ("workers = 0\n", "at least 1"),
        ("max_body = 10\n", "at least 1024 bytes"),
        ("tls_cert = 'c.pem'\n", "both a certificate and a key"),
        ("log_level = 'loud'\n", "not one of debug, info, warning, error"),
    ],
)
def test_bad_values_are_refused(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        ServerConfig.from_env(read_config_file(write(tmp_path, text)))


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        read_config_file(tmp_path / "absent.toml")


def test_cli_refuses_a_bad_file_with_exit_9(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KMSENV_HOME", str(tmp_path / "home"))
    path = write(tmp_path, "prot = 8080\n")
    assert main(["server", "--config", str(path)]) == 9
    err = capsys.readouterr().err
    assert "kmsenv: error: config file" in err
    assert "unknown setting(s) prot" in err
    assert "kmsenv: hint: known settings: host, port" in err
    assert not (tmp_path / "home").exists()  # refused before the KMS home is touched


@pytest.mark.slow
def test_server_runs_with_the_files_settings(tmp_path: Path) -> None:
    port = free_port()
    audit = tmp_path / "conf" / "audit-from-file.jsonl"
    audit.parent.mkdir()
    path = audit.parent / "server.toml"
    path.write_text(f'host = "127.0.0.1"\nport = {port}\nlog_level = "warning"\naudit_log = "{audit.name}"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("KMSENV_")}
    env["KMSENV_HOME"] = str(tmp_path / "home")
    env["KMSENV_SERVER_WORKERS"] = "1"  # the environment still beats the file
    proc = subprocess.Popen(
        [sys.executable, "-m", "kmsenv", "server", "--config", str(path)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                reply = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                break
            except httpx.HTTPError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "the server did not answer on the port from its config file"
                time.sleep(0.1)
        assert reply.status_code == 200
        assert json.loads(reply.text) == {"Status": "OK"}
        # An API request (unsigned, refused) is audited to the file the config names.
        httpx.post(f"http://127.0.0.1:{port}/", timeout=5)
        assert audit.exists()
        assert json.loads(audit.read_text().splitlines()[-1])["code"] == "MissingParameter"
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def _settings_rows() -> dict[str, list[str]]:
    """The rows of docs/server.md's settings table, by their file-key column."""
    text = (Path(__file__).parent.parent / "docs" / "server.md").read_text()
    section = text.split("\n## Settings\n", 1)[1].split("\n## ", 1)[0]
    rows: dict[str, list[str]] = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `--") and len(cells) == 5 and cells[2] != "—":  # not --config's row
            rows[cells[2].strip("`")] = cells
    return rows


def test_docs_settings_table_lists_every_setting_exactly() -> None:
    """Every ServerConfig setting has its row in docs/server.md, naming the option `kmsenv server`
    really takes, the variable the workers really read and the default, so the table cannot drift
    from the code when a setting is added, renamed or its row removed."""
    import argparse

    from kmsenv.cli import server as server_cli
    from kmsenv.server.config import _ENV

    sub = argparse.ArgumentParser().add_subparsers()
    server_cli.register(sub)
    server_parser = sub.choices["server"]
    options = {a.dest: a for a in server_parser._actions if a.option_strings}
    rows = _settings_rows()
    defaults = ServerConfig()
    for f in fields(ServerConfig):
        assert f.name in rows, f"docs/server.md settings table has no row for {f.name}"
        option_cell, env_cell, _, default_cell, _ = rows[f.name]
        action = options[f.name]
        option = action.option_strings[0]
        assert option_cell.split()[0].strip("`") == option, (f.name, option_cell)
        assert env_cell == f"`{_ENV[f.name]}`", (f.name, env_cell)
        assert _ENV[f.name] in (action.help or ""), f"{option} --help does not name {_ENV[f.name]}"
        default = getattr(defaults, f.name)
        if default != "":
            assert f"`{default}`" in default_cell, (f.name, default_cell)
    assert set(rows) == {f.name for f in fields(ServerConfig)}, "a row for a setting that does not exist"
