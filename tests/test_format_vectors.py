"""The committed format v1 and v2 vectors: each decrypts or fails exactly as its ``expect`` says,
the library writes the success vectors byte for byte (v2 rewrap states through ``rewrap_header``
and in-place ``slot_writes``), and the committed generator reproduces them byte for byte."""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import io
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from kmsenv.errors import FormatError, IntegrityError
from kmsenv.format import (
    decrypt_stream,
    encrypt_stream,
    open_header,
    parse_header,
    read_header,
    rewrap_header,
    slot_writes,
)
from kmsenv.format.keys import _new_header

VECTORS = Path(__file__).parent / "vectors"
NAMES = sorted(p.stem for p in VECTORS.glob("*.json"))
ERRORS = {"FormatError": FormatError, "IntegrityError": IntegrityError}


def load_generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kmsenv_vector_generator", VECTORS / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def load(name: str) -> dict[str, Any]:
    record: dict[str, Any] = json.loads((VECTORS / f"{name}.json").read_text(encoding="utf-8"))
    return record


def file_of(record: dict[str, Any]) -> bytes:
    return base64.b64decode(record["file_base64"], validate=True)


def run(record: dict[str, Any], threads: int) -> tuple[str, bytes]:
    """Decrypt as the file layer will: (stage reached when it stopped, plaintext written)."""
    src = io.BytesIO(file_of(record))
    out = io.BytesIO()
    stage = "header"
    try:
        header = read_header(src)
        if "selected_generation" in record:  # v2: the slot a reader must choose
            assert header.generation == record["selected_generation"]
        stage = "open"
        file_key = open_header(header, bytes.fromhex(record["data_key"]))
        stage = "payload"
        decrypt_stream(src, out, file_key, chunk_size=header.chunk_size, threads=threads)
    except (FormatError, IntegrityError) as exc:
        return f"{stage}:{type(exc).__name__}", out.getvalue()
    return "success", out.getvalue()


def test_there_are_vectors_of_every_kind() -> None:
    expects = {load(n)["expect"] for n in NAMES}
    stages = {load(n).get("stage") for n in NAMES}
    assert expects == {"success", "FormatError", "IntegrityError"}
    assert stages == {None, "header", "open", "payload"}
    assert len(NAMES) >= 60


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("name", NAMES)
def test_vector(name: str, threads: int) -> None:
    record = load(name)
    assert record["name"] == name
    assert len(file_of(record)) == record["file_size"]
    outcome, plaintext = run(record, threads)
    if record["expect"] == "success":
        assert outcome == "success"
        assert len(plaintext) == record["plaintext_size"]
        assert hashlib.sha256(plaintext).hexdigest() == record["plaintext_sha256"]
    else:
        assert outcome == f"{record['stage']}:{record['expect']}"


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith(("ok_", "v2_ok_"))])
def test_success_vectors_are_what_the_library_writes(name: str) -> None:
    """The library's writer, given the vector's salt, reproduces the file byte for byte: the
    independent generator and the implementation agree on the spec."""
    record = load(name)
    data = file_of(record)
    header, size = parse_header(data)
    assert header.encode() == data[:size]  # canonical round trip
    plaintext = io.BytesIO()
    key = bytes.fromhex(record["data_key"])
    decrypt_stream(io.BytesIO(data[size:]), plaintext, open_header(header, key), chunk_size=header.chunk_size)
    again, file_key = _new_header(
        key,
        stanzas=header.stanzas,
        context=header.context,
        chunk_size=header.chunk_size,
        salt=header.salt,
        version=header.version,
    )
    out = io.BytesIO()
    out.write(again.encode())
    plaintext.seek(0)
    encrypt_stream(plaintext, out, file_key, chunk_size=header.chunk_size)
    assert out.getvalue() == data


@pytest.mark.parametrize("name", [n for n in NAMES if "rewrap_of" in load(n)])
def test_rewrap_vectors_are_what_the_library_writes(name: str) -> None:
    """``rewrap_header`` turns the base vector's header into this one (same payload bytes); from a
    v2 base, the in-place writes turn the base file into this file, in increasing generation."""
    record = load(name)
    data, base = file_of(record), file_of(load(record["rewrap_of"]))
    (before, n0), (after, n1) = parse_header(base), parse_header(data)
    assert base[n0:] == data[n1:]
    rewrapped = rewrap_header(before, open_header(before, bytes.fromhex(record["data_key"])), after.stanzas)
    assert rewrapped.encode() == data[:n1]
    writes = slot_writes(before, rewrapped)
    if before.version == 1:
        assert writes is None
        return
    assert writes
    file = bytearray(base)
    for offset, slot in writes:
        file[offset : offset + len(slot)] = slot
    assert bytes(file) == data


def test_rewrapped_vector_shares_its_payload() -> None:
    """Rewrap changes stanzas and tag only: the payload is the same bytes as before."""
    before, after = file_of(load("ok_chunk_plus_one")), file_of(load("ok_rewrapped"))
    (h1, n1), (h2, n2) = parse_header(before), parse_header(after)
    assert before[n1:] == after[n2:]
    assert h1.commitment == h2.commitment and h1.salt == h2.salt
    assert h1.stanzas != h2.stanzas and h1.tag != h2.tag


def test_generator_reproduces_the_committed_files() -> None:
    generated = load_generator().vectors()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in VECTORS.glob("*.json")}
    assert set(generated) == set(on_disk)
    for name, text in generated.items():
        assert text == on_disk[name], name


def test_the_spec_indexes_every_vector() -> None:
    spec = (Path(__file__).parents[1] / "docs" / "format.md").read_text(encoding="utf-8")
    index = spec[spec.index("## 10. Test vectors") :]
    missing = [n for n in NAMES if f"| `{n}` |" not in index]
    assert missing == []
