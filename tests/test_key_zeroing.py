"""Plaintext key buffers are zeroed where Python allows (docs/security.md, "Plaintext key buffers"):
the agent's held data keys on expiry, use-up, eviction, flush and stop; ``_crypto.wipe`` itself;
and the primitives accept a bytearray key the caller wipes afterwards."""

from __future__ import annotations

import base64
import threading
from pathlib import Path
from typing import Any

import pytest

from files_helpers import ALIAS
from kmsenv import _crypto
from kmsenv._agent import AgentKms, AgentLimits, AgentServer
from kmsenv.clients import EmbeddedKms

CONTEXT = '{"project":"apollo"}'


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def zeroed(buf: bytearray) -> bool:
    return len(buf) > 0 and buf == bytearray(len(buf))


def make_server(kms: EmbeddedKms, tmp_path: Path, clock: Clock, **limits: Any) -> AgentServer:
    return AgentServer(kms, tmp_path / "agent.sock", limits=AgentLimits(**limits), clock=clock)


def generate(server: AgentServer, context: str = CONTEXT) -> dict[str, Any]:
    answer = server.handle(
        {"v": 1, "op": "call", "action": "GenerateDataKey", "params": {"KeyId": ALIAS, "EncryptionContext": context}}
    )
    assert answer["ok"], answer
    return dict(answer["result"])


def decrypt(server: AgentServer, blob: str, context: str = CONTEXT) -> dict[str, Any]:
    return server.handle(
        {"v": 1, "op": "call", "action": "Decrypt", "params": {"CiphertextBlob": blob, "EncryptionContext": context}}
    )


def held(server: AgentServer) -> list[bytearray]:
    buffers = server.store.buffers()
    assert buffers and all(isinstance(b, bytearray) and not zeroed(b) for b in buffers)
    return buffers


def test_expiry_zeroes_the_held_key(kms: EmbeddedKms, key: str, tmp_path: Path) -> None:
    clock = Clock()
    server = make_server(kms, tmp_path, clock, ttl=60)
    made = generate(server)
    buffers = held(server)
    assert bytes(buffers[0]) == base64.b64decode(made["Plaintext"])  # the very key, held as a bytearray
    clock.now += 59
    assert server.store.reap() == 0
    assert not zeroed(buffers[0])
    clock.now += 1
    assert server.store.reap() == 1
    assert zeroed(buffers[0])
    assert len(server.store) == 0


def test_an_expired_key_met_on_use_is_zeroed_too(kms: EmbeddedKms, key: str, tmp_path: Path) -> None:
    clock = Clock()
    server = make_server(kms, tmp_path, clock, ttl=60)
    first = generate(server)
    buffers = held(server)
    clock.now += 61
    second = generate(server)  # no reaper ran: the lookup itself finds it expired
    assert zeroed(buffers[0])
    assert second["CiphertextBlob"] != first["CiphertextBlob"]


def test_stop_zeroes_every_key(kms: EmbeddedKms, key: str, tmp_path: Path) -> None:
    server = make_server(kms, tmp_path, Clock())
    made = generate(server)
    assert decrypt(server, made["CiphertextBlob"])["ok"]
    buffers = held(server)
    assert len(buffers) == 2  # the generated key, and the Decrypt answer for (blob, context)
    answer = server.handle({"v": 1, "op": "stop"})
    assert answer["result"]["wiped"] == 2
    assert all(zeroed(b) for b in buffers)
    refused = server.handle({"v": 1, "op": "call", "action": "GenerateDataKey", "params": {"KeyId": ALIAS}})
    assert refused["error"]["class"] == "AgentStopping"


def test_flush_zeroes_and_keeps_serving(kms: EmbeddedKms, key: str, tmp_path: Path) -> None:
    server = make_server(kms, tmp_path, Clock())
    generate(server)
    buffers = held(server)
    assert server.handle({"v": 1, "op": "flush"})["result"] == {"wiped": 1}
    assert zeroed(buffers[0])
    generate(server)
    assert server.status()["kms_calls"] == {"GenerateDataKey": 2}


def test_use_up_and_eviction_zero_only_the_key_that_goes(kms: EmbeddedKms, key: str, tmp_path: Path) -> None:
    server = make_server(kms, tmp_path, Clock(), max_uses=2, max_keys=2)
    generate(server, '{"n":"1"}')
    (first,) = held(server)
    generate(server, '{"n":"1"}')  # its second use: served, then wiped
    assert zeroed(first)
    generate(server, '{"n":"2"}')
    generate(server, '{"n":"3"}')
    two, three = held(server)
    generate(server, '{"n":"4"}')  # a third key: the oldest is evicted
    assert zeroed(two)
    assert not zeroed(three)
    assert len(server.store) == 2


def test_the_socket_server_zeroes_keys_when_stopped(kms: EmbeddedKms, key: str, tmp_path: Path) -> None:
    server = AgentServer(kms, tmp_path / "s" / "agent.sock")
    server.bind()
    thread = threading.Thread(target=server.serve)
    thread.start()
    try:
        client = AgentKms(server.socket_path)
        made = client.generate_data_key(ALIAS, encryption_context={"project": "apollo"})
        buffers = held(server)
        assert bytes(buffers[0]) == made.plaintext
        assert client.stop()["wiped"] == 1
        thread.join(timeout=30)
        assert not thread.is_alive()
        assert zeroed(buffers[0])
        assert not server.socket_path.exists()
    finally:
        server.shutdown()
        thread.join(timeout=30)


def test_wipe_overwrites_in_place() -> None:
    key = bytearray(_crypto.random_bytes(32))
    alias = key  # the same object: wiping must not rebind, it must overwrite
    view = memoryview(key)
    _crypto.wipe(key)
    assert alias is key
    assert zeroed(key)
    assert bytes(view) == bytes(32)
    part = bytearray(b"secret-key-bytes")
    _crypto.wipe(memoryview(part)[7:])
    assert part == b"secret-" + bytes(9)


def test_primitives_take_a_bytearray_key_that_is_wiped_afterwards() -> None:
    raw = _crypto.random_bytes(32)
    buf = bytearray(raw)
    derived = _crypto.hkdf_sha256(buf, salt=b"s", info=b"i", length=32)
    assert derived == _crypto.hkdf_sha256(raw, salt=b"s", info=b"i", length=32)
    aead = _crypto.AesGcm(buf)
    _crypto.wipe(buf)
    # The cipher keeps its own copy inside OpenSSL: wiping the caller's buffer does not change it.
    nonce = bytes(12)
    assert aead.encrypt(nonce, b"data") == _crypto.AesGcm(raw).encrypt(nonce, b"data")
    with pytest.raises(ValueError):
        _crypto.AesGcm(bytearray(31))
