"""The agent's request logic in process: what is served from memory, what goes to the KMS, limits,
and that nothing about it shows or pickles key material (docs/agent.md)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest

from files_helpers import ALIAS
from kms_helpers import run_kmsenv
from kmsenv._agent import AgentLimits, AgentServer
from kmsenv.clients import EmbeddedKms
from kmsenv.errors import UsageError


def call(server: AgentServer, action: str, **params: str) -> dict[str, Any]:
    return server.handle({"v": 1, "op": "call", "action": action, "params": params})


@pytest.fixture
def server(kms: EmbeddedKms, key: str, tmp_path: Path) -> AgentServer:
    return AgentServer(kms, tmp_path / "agent.sock")


def test_context_order_and_spacing_do_not_matter(server: AgentServer) -> None:
    a = call(server, "GenerateDataKey", KeyId=ALIAS, EncryptionContext='{"a":"1","b":"2"}')
    b = call(server, "GenerateDataKey", KeyId=ALIAS, EncryptionContext='{ "b": "2", "a": "1" }')
    assert a["result"]["CiphertextBlob"] == b["result"]["CiphertextBlob"]
    c = call(server, "GenerateDataKey", KeyId=ALIAS, EncryptionContext='{"a":"1"}')
    d = call(server, "GenerateDataKey", KeyId=ALIAS, NumberOfBytes="16", EncryptionContext='{"a":"1","b":"2"}')
    assert len({a["result"]["CiphertextBlob"], c["result"]["CiphertextBlob"], d["result"]["CiphertextBlob"]}) == 3
    assert server.status()["kms_calls"] == {"GenerateDataKey": 3}


def test_refusals_and_bad_contexts_are_never_held(server: AgentServer) -> None:
    for _ in range(2):
        bad = call(server, "GenerateDataKey", KeyId=ALIAS, EncryptionContext="[1]")
        assert bad["ok"] is False
        assert bad["error"]["class"] == "KmsError"
        missing = call(server, "GenerateDataKey", KeyId="alias/Nope")
        assert missing["error"]["code"] == "Forbidden.AliasNotFound"
    assert server.status()["kms_calls"] == {"GenerateDataKey": 4}
    assert len(server.store) == 0


def test_wrapping_answers_are_held_without_the_key(server: AgentServer) -> None:
    made = call(server, "GenerateDataKey", KeyId=ALIAS)["result"]
    wrapped = [call(server, "Encrypt", KeyId=ALIAS, Plaintext=made["Plaintext"]) for _ in range(2)]
    moved = [call(server, "ReEncrypt", CiphertextBlob=made["CiphertextBlob"], DestinationKeyId=ALIAS) for _ in range(2)]
    assert all(a["ok"] for a in wrapped + moved)
    assert wrapped[0]["result"] == wrapped[1]["result"]
    assert "Plaintext" not in wrapped[1]["result"]
    assert moved[0]["result"] == moved[1]["result"]
    assert server.status()["kms_calls"] == {"GenerateDataKey": 1, "Encrypt": 1, "ReEncrypt": 1}
    # Another plaintext or destination is another request: the KMS answers it.
    other = call(server, "GenerateDataKey", KeyId=ALIAS, NumberOfBytes="16")["result"]
    call(server, "Encrypt", KeyId=ALIAS, Plaintext=other["Plaintext"])
    assert server.status()["kms_calls"]["Encrypt"] == 2
    # Only the two data keys are held as keys; the Encrypt entries keep a digest, not the key.
    assert server.status()["keys_held"] == 2
    assert server.status()["answers_held"] == 5
    for cache_key in server.store._entries:
        assert made["Plaintext"] not in repr(cache_key)
        assert other["Plaintext"] not in repr(cache_key)
    calls = server.status()["kms_calls"]
    call(server, "DescribeKey", KeyId=ALIAS)
    call(server, "DescribeKey", KeyId=ALIAS)
    assert server.status()["kms_calls"] == {**calls, "DescribeKey": 2}  # metadata: always asked


@pytest.mark.parametrize("context", ['{"a":"1","a":"1"}', '{"a":1}', '{"a":{"b":"c"}}', '"a"', "{"])
def test_a_context_the_agent_cannot_compare_always_goes_to_the_kms(server: AgentServer, context: str) -> None:
    for _ in range(2):
        call(server, "GenerateDataKey", KeyId=ALIAS, EncryptionContext=context)
    assert server.status()["kms_calls"] == {"GenerateDataKey": 2}
    assert len(server.store) == 0


@pytest.mark.parametrize("limits", [{"ttl": 0}, {"max_uses": 0}, {"max_keys": -1}, {"ttl": True}, {"ttl": "5"}])
def test_limits_must_be_positive_numbers(limits: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        AgentLimits(**limits)


def test_cli_refuses_a_zero_limit_before_starting(kms_home: Path, tmp_path: Path) -> None:
    r = run_kmsenv(kms_home, "agent", "start", "--socket", str(tmp_path / "a.sock"), "--max-uses", "0")
    assert r.returncode == 2
    assert "max_uses (--max-uses) must be a positive number" in r.stderr
    assert not (tmp_path / "a.sock").exists()
    assert not kms_home.exists()  # nothing was opened or created


def test_no_key_material_in_reprs_or_pickles(server: AgentServer) -> None:
    made = call(server, "GenerateDataKey", KeyId=ALIAS)["result"]
    (entry,) = server.store._entries.values()
    for obj in (server, server.store, entry):
        assert made["Plaintext"] not in repr(obj)
        with pytest.raises(TypeError):
            pickle.dumps(obj)
    status = str(server.status())
    assert made["Plaintext"] not in status
    assert made["CiphertextBlob"] not in status


def test_an_unexpected_failure_is_answered_and_the_agent_goes_on(
    server: AgentServer, capsys: pytest.CaptureFixture[str]
) -> None:
    real = server.kms

    class Broken:
        def call(self, action: str, params: dict[str, str]) -> dict[str, Any]:
            raise RuntimeError("secret-looking detail")

    server.kms = Broken()  # type: ignore[assignment]
    answer = call(server, "GenerateDataKey", KeyId=ALIAS)
    assert answer["error"] == {"class": "InternalError", "message": "the agent failed to serve the request"}
    logged = capsys.readouterr().err
    assert "RuntimeError" in logged
    assert "secret-looking detail" not in logged + str(answer)
    server.kms = real
    assert call(server, "GenerateDataKey", KeyId=ALIAS)["ok"]
