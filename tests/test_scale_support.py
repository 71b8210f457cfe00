"""Helpers shared by the ``test_scale_*`` modules (no tests here): the CLI in-process, a KMS that
counts its Actions, extra CMKs, and files built with hand-made stanzas."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path
from typing import Any

import pytest

from kmsenv import format as fmt
from kmsenv.cli import main
from kmsenv.clients import EmbeddedKms


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    """The CLI in-process: (exit code, stdout, stderr)."""
    rc = main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class CountingKms(EmbeddedKms):
    """An EmbeddedKms that records every Action it is asked for (name and parameters)."""

    def __init__(self, other: EmbeddedKms) -> None:
        super().__init__(service=other.service)
        self.calls: list[tuple[str, dict[str, str]]] = []

    def call(self, action: str, params: dict[str, str]) -> dict[str, Any]:
        self.calls.append((action, dict(params)))
        return super().call(action, params)

    def count(self, action: str) -> int:
        return sum(1 for name, _ in self.calls if name == action)


def new_key(kms: EmbeddedKms) -> str:
    return str(kms.service.create_key()["KeyMetadata"]["KeyId"])


def read_header(path: Path) -> fmt.Header:
    return fmt.read_header(io.BytesIO(path.read_bytes()))


def restanza(path: Path, kms: EmbeddedKms, stanzas: list[fmt.KeyStanza]) -> None:
    """Give the file at ``path`` other stanzas, with a valid tag (as someone holding its data key could)."""
    data = path.read_bytes()
    header = fmt.read_header(io.BytesIO(data))
    blob = base64.b64encode(header.stanzas[0].ciphertext_blob).decode()
    data_key = kms.decrypt_data_key(blob, encryption_context=header.context).plaintext
    new = fmt.rewrap_header(header, fmt.open_header(header, data_key), stanzas)
    path.write_bytes(new.encode() + data[header.size :])
