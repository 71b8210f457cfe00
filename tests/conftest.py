"""Shared fixtures: a throw-away KMS home, a controllable clock, and a service over both.

Kept generic on purpose; other test modules may use them:

- ``kms_home``: an empty folder (not yet created) set as ``KMSENV_HOME``, with the other KMSENV_*
  variables cleared so the developer's environment cannot leak in;
- ``clock``: a :class:`FakeClock` (aware UTC) that tests move with ``clock.advance(days=8)``;
- ``service``: ``open_service(kms_home, clock=clock)``, closed after the test;
- ``call``: ``call("Action", Param=value, ...)`` → ``dispatch`` with every value turned into the
  string the wire would carry (``True`` → ``"True"`` as the SDKs send it, dicts → JSON);
- ``kms``/``key``: an ``EmbeddedKms`` over ``service``, and the reference document's CMK behind
  ``alias/Apollo/WorkKey``; ``outdir``: an empty output folder; ``readonly_dir``: one nobody can
  write in (as root, made immutable).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from files_helpers import ALIAS
from kmsenv.clients import EmbeddedKms
from kmsenv.kms.actions import dispatch
from kmsenv.kms.service import KmsService, open_service

START = datetime(2026, 1, 1, tzinfo=UTC)

Call = Callable[..., dict[str, Any]]


class FakeClock:
    """A clock for ``open_service(clock=...)``: returns ``now`` until told to move."""

    def __init__(self, now: datetime = START) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> datetime:
        self.now += timedelta(**delta)
        return self.now


def wire(value: object) -> str:
    """A Python value as the string an Alibaba SDK puts on the wire."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict | list):
        return json.dumps(value)
    return str(value)  # bool → "True"/"False", int → decimal


@pytest.fixture
def kms_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "kmshome"
    monkeypatch.setenv("KMSENV_HOME", str(home))
    for name in ("KMSENV_ROOT_KEY_FILE", "KMSENV_REGION"):
        monkeypatch.delenv(name, raising=False)
    return home


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def service(kms_home: Path, clock: FakeClock) -> Iterator[KmsService]:
    svc = open_service(kms_home, clock=clock, announce=False)
    yield svc
    svc.close()


@pytest.fixture
def call(service: KmsService) -> Call:
    def _call(action: str, **params: object) -> dict[str, Any]:
        return dispatch(service, action, {name: wire(value) for name, value in params.items()})

    return _call


@pytest.fixture
def key_id(call: Call) -> str:
    """A fresh Enabled symmetric key."""
    return str(call("CreateKey")["KeyMetadata"]["KeyId"])


@pytest.fixture
def kms(service: KmsService) -> EmbeddedKms:
    return EmbeddedKms(service=service)


@pytest.fixture
def key(kms: EmbeddedKms) -> str:
    """The reference document's CMK, reachable as alias/Apollo/WorkKey; returns its key id."""
    key_id = str(kms.service.create_key()["KeyMetadata"]["KeyId"])
    kms.service.create_alias(alias_name=ALIAS, key_id=key_id)
    return key_id


@pytest.fixture
def outdir(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


@pytest.fixture
def readonly_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder nobody can create files in; as root, chmod is not enough, so it is made immutable."""
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    immutable = os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(folder)], check=False).returncode == 0
    try:
        probe = folder / "probe"
        try:
            probe.write_bytes(b"")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip("cannot make a read-only folder here")
        yield folder
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)
