"""Plaintext key buffers are zeroed where Python allows (docs/security.md, "Plaintext key buffers"):
the agent's held data keys on expiry, use-up, eviction, flush and stop; ``_crypto.wipe`` itself;
the primitives accept a bytearray key the caller wipes afterwards; and a file operation's data key
and derived file keys are zeroed when it ends (encrypt, decrypt, rewrap, failures)."""

from __future__ import annotations

import base64
import io
import threading
from pathlib import Path
from typing import Any

import pytest

from files_helpers import ALIAS
from kmsenv import _crypto, envelope
from kmsenv import format as fmt
from kmsenv._agent import AgentKms, AgentLimits, AgentServer
from kmsenv.clients import EmbeddedKms
from kmsenv.errors import IntegrityError

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


# ------------------------------------------------------------------- the file layers --
# Each test keeps references to the very buffers the operation used: the data key the KMS
# client returned (a bytearray from kmsenv's own clients) and every buffer HKDF derived a file
# key into (payload key, commitment, header MAC key). After the operation all must be zeros.


class Recorder:
    """Wraps the wipeable KMS calls and the KDF so a test sees the buffers a file operation used."""

    def __init__(self, kms: EmbeddedKms, monkeypatch: pytest.MonkeyPatch) -> None:
        self.data_keys: list[bytearray] = []
        self.derived: list[bytearray] = []
        self.file_keys: list[Any] = []
        generate, unwrap = kms._generate_wipeable, kms._decrypt_wipeable
        derive = _crypto.hkdf_sha256_into

        def recorded_generate(*args: Any, **kwargs: Any) -> Any:
            made = generate(*args, **kwargs)
            self.data_keys.append(made.plaintext)
            return made

        def recorded_unwrap(*args: Any, **kwargs: Any) -> Any:
            got = unwrap(*args, **kwargs)
            self.data_keys.append(got.plaintext)
            return got

        def recorded_derive(ikm: Any, *, salt: bytes, info: bytes, out: bytearray) -> None:
            derive(ikm, salt=salt, info=info, out=out)
            self.derived.append(out)

        monkeypatch.setattr(kms, "_generate_wipeable", recorded_generate)
        monkeypatch.setattr(kms, "_decrypt_wipeable", recorded_unwrap)
        monkeypatch.setattr(_crypto, "hkdf_sha256_into", recorded_derive)
        new_header, open_header = fmt.new_header, fmt.open_header

        def recorded_new(*args: Any, **kwargs: Any) -> Any:
            header, file_key = new_header(*args, **kwargs)
            self.file_keys.append(file_key)
            return header, file_key

        def recorded_open(*args: Any, **kwargs: Any) -> Any:
            file_key = open_header(*args, **kwargs)
            self.file_keys.append(file_key)
            return file_key

        monkeypatch.setattr(fmt, "new_header", recorded_new)
        monkeypatch.setattr(fmt, "open_header", recorded_open)

    def assert_all_zeroed(self, *, data_keys: int, file_keys: int) -> None:
        assert len(self.data_keys) == data_keys
        assert all(isinstance(b, bytearray) and zeroed(b) for b in self.data_keys)
        assert len(self.derived) == 3 * file_keys  # payload key, commitment, header MAC key per file
        assert all(zeroed(b) for b in self.derived)
        assert len(self.file_keys) == file_keys
        for file_key in self.file_keys:
            assert file_key.wiped
            with pytest.raises(ValueError, match="wiped"):
                file_key.aead  # noqa: B018 - the property refuses a wiped key


@pytest.mark.parametrize("threads", [None, 1, 2])
def test_encrypt_and_decrypt_of_a_file_zero_the_data_key_and_the_file_keys(
    kms: EmbeddedKms, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int | None
) -> None:
    plain, cipher, out = tmp_path / "p", tmp_path / "c", tmp_path / "o"
    plain.write_bytes(_crypto.random_bytes(3 * 4096 + 5))
    rec = Recorder(kms, monkeypatch)
    envelope.encrypt_file(plain, cipher, kms=kms, key_id=ALIAS, chunk_size=4096, threads=threads)
    rec.assert_all_zeroed(data_keys=1, file_keys=1)
    envelope.decrypt_file(cipher, out, kms=kms, threads=threads)
    rec.assert_all_zeroed(data_keys=2, file_keys=2)
    assert out.read_bytes() == plain.read_bytes()  # the keys were wiped after, not before, their use


def test_streams_several_keys_and_rewrap_zero_their_keys_too(
    kms: EmbeddedKms, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    other = str(kms.service.create_key()["KeyMetadata"]["KeyId"])
    cipher = tmp_path / "c"
    rec = Recorder(kms, monkeypatch)
    with cipher.open("wb") as dst:
        envelope.encrypt_stream(io.BytesIO(b"secret" * 1000), dst, kms=kms, key_id=[ALIAS, other])
    rec.assert_all_zeroed(data_keys=1, file_keys=1)  # Encrypt under the second CMK reused the same key
    sink = io.BytesIO()
    with cipher.open("rb") as src:
        envelope.decrypt_stream(src, sink, kms=kms)
    assert sink.getvalue() == b"secret" * 1000
    rec.assert_all_zeroed(data_keys=2, file_keys=2)
    envelope.rewrap_file(cipher, kms=kms, remove_key_ids=[other])
    rec.assert_all_zeroed(data_keys=3, file_keys=3)


def test_a_failed_decrypt_zeroes_what_it_unwrapped(
    kms: EmbeddedKms, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    plain, cipher = tmp_path / "p", tmp_path / "c"
    plain.write_bytes(b"x" * 100)
    envelope.encrypt_file(plain, cipher, kms=kms, key_id=ALIAS)
    data = bytearray(cipher.read_bytes())
    data[15] ^= 1  # the salt (after magic, length, suite, chunk size): the key unwraps, the header fails
    cipher.write_bytes(bytes(data))
    rec = Recorder(kms, monkeypatch)
    with pytest.raises(IntegrityError):
        envelope.decrypt_file(cipher, tmp_path / "o", kms=kms)
    assert len(rec.data_keys) == 1 and zeroed(rec.data_keys[0])
    assert len(rec.derived) == 3 and all(zeroed(b) for b in rec.derived)


def test_the_public_kms_calls_still_return_bytes(kms: EmbeddedKms, key: str) -> None:
    made = kms.generate_data_key(ALIAS, encryption_context={})
    assert type(made.plaintext) is bytes and len(made.plaintext) == 32
    assert hash(made.plaintext) == hash(
        kms.decrypt_data_key(made.wrapped.ciphertext_blob, encryption_context={}).plaintext
    )
    made.wipe()  # bytes cannot be wiped: left as they are, no error
    assert made.plaintext != bytes(32)


def test_with_the_data_key_cache_each_file_key_is_zeroed_and_the_cached_key_keeps_serving(
    kms: EmbeddedKms, key: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kmsenv._cache import DataKeyCache

    cache = DataKeyCache()
    rec = Recorder(kms, monkeypatch)
    for name in ("a", "b"):
        (tmp_path / name).write_bytes(name.encode() * 5000)
        envelope.encrypt_file(tmp_path / name, tmp_path / f"{name}.c", kms=kms, key_id=ALIAS, cache=cache)
    # One GenerateDataKey for both files; the client's buffer is zeroed once the cache has its
    # (bytes) copy, and each file's derived keys when that file is done.
    rec.assert_all_zeroed(data_keys=1, file_keys=2)
    for name in ("a", "b"):
        envelope.decrypt_file(tmp_path / f"{name}.c", tmp_path / f"{name}.out", kms=kms)
        assert (tmp_path / f"{name}.out").read_bytes() == name.encode() * 5000
