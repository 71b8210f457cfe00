"""Property tests of the agent's two parsers of client input: the frame reader (any bytes) and
the request handler (any JSON object). Whatever arrives, the reader returns an object, None at a
clean end, or raises FrameError; the handler answers ``{"ok": bool, ...}`` and never raises."""

from __future__ import annotations

import socket
import struct
import threading
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from files_helpers import ALIAS
from kmsenv._agent import MAX_FRAME, AgentServer, FrameError, read_frame
from kmsenv.clients import EmbeddedKms

SETTINGS = settings(max_examples=300, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)
ops = st.sampled_from(["call", "key_arn", "status", "flush", "stop", "nope"])
actions = st.sampled_from(["GenerateDataKey", "Decrypt", "Encrypt", "ReEncrypt", "DescribeKey", "CreateKey"])
params = st.dictionaries(
    st.sampled_from(["KeyId", "CiphertextBlob", "EncryptionContext", "NumberOfBytes", "Plaintext", "x"]),
    st.one_of(st.text(max_size=40), st.just(ALIAS), st.just('{"a":"b"}'), json_values),
    max_size=5,
)
requests = st.fixed_dictionaries(
    {"v": st.one_of(st.just(1), json_values), "op": st.one_of(ops, json_values)},
    optional={
        "action": st.one_of(actions, json_values),
        "params": st.one_of(params, json_values),
        "key_id": st.one_of(st.just(ALIAS), json_values),
    },
)


@pytest.fixture
def server(kms: EmbeddedKms, key: str, tmp_path: Path) -> AgentServer:
    return AgentServer(kms, tmp_path / "agent.sock")


@SETTINGS
@given(request=requests)
def test_any_request_gets_an_answer(server: AgentServer, request: dict[str, Any]) -> None:
    server.stopping.clear()  # a fuzzed "stop" must not mask the other ops
    answer = server.handle(request)
    assert isinstance(answer.get("ok"), bool)
    if not answer["ok"]:
        assert isinstance(answer["error"]["class"], str)
        assert isinstance(answer["error"]["message"], str)


def _read(data: bytes) -> dict[str, Any] | None:
    a, b = socket.socketpair()
    with a, b:
        writer = threading.Thread(target=lambda: (a.sendall(data), a.shutdown(socket.SHUT_WR)))
        writer.start()
        try:
            return read_frame(b)
        finally:
            b.close()
            writer.join()


@SETTINGS
@given(
    data=st.one_of(
        st.binary(max_size=64),
        st.builds(lambda n, body: struct.pack(">I", n) + body, st.integers(0, 2 * MAX_FRAME), st.binary(max_size=64)),
        st.builds(lambda body: struct.pack(">I", len(body)) + body, st.binary(max_size=200)),
    )
)
def test_any_bytes_give_an_object_none_or_frame_error(data: bytes) -> None:
    try:
        message = _read(data)
    except FrameError:
        return
    except OSError:
        return  # the reader closed first: the writer's side saw a broken pipe, not the reader
    assert message is None or isinstance(message, dict)
