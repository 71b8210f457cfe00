"""The public surface: every name in ``kmsenv.__all__`` resolves, and starting the CLI or importing
the package stays cheap (no crypto, SQL, HTTP server or SDK modules loaded up front)."""

from __future__ import annotations

import json
import subprocess
import sys

import kmsenv

HEAVY = {"cryptography", "sqlite3", "starlette", "uvicorn", "alibabacloud_kms20160120", "psycopg", "Crypto"}


def loaded_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nimport json; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return set(json.loads(out.strip().splitlines()[-1]))


def test_every_public_name_resolves() -> None:
    for name in kmsenv.__all__:
        assert getattr(kmsenv, name) is not None, name
    assert set(dir(kmsenv)) >= set(kmsenv.__all__)


def test_import_and_help_load_nothing_heavy() -> None:
    assert loaded_after("import kmsenv") & HEAVY == set()
    assert loaded_after("from kmsenv.cli import build_parser; build_parser().format_help()") & HEAVY == set()


def test_help_lists_every_command() -> None:
    out = subprocess.run([sys.executable, "-m", "kmsenv", "--help"], capture_output=True, text=True, check=True)
    commands = ("kms", "encrypt", "decrypt", "inspect", "migrate", "rewrap", "access-key", "server", "audit", "store")
    for command in commands:
        assert command in out.stdout, command
