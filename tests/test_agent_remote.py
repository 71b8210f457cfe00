"""The agent in front of a kmsenv server: a loop of CLI encrypts is one GenerateDataKey in the
server's audit log, and a Decrypt the caller's policy forbids stays forbidden even though the agent
holds that very data key (authorization stays with the KMS; docs/agent.md)."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest

from test_agent import Agent, blobs
from test_server_harness import start_server

pytestmark = pytest.mark.slow


def audited(home: Path, access_key_id: str) -> list[tuple[str, str]]:
    lines = (home / "audit.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return [(r["action"], r["code"]) for r in records if r["access_key_id"] == access_key_id]


def test_agent_before_a_server_makes_one_call_and_keeps_its_refusals(tmp_path: Path) -> None:
    sockdir = Path(tempfile.mkdtemp(prefix="kag", dir="/tmp"))  # short: socket paths are limited
    server = start_server(tmp_path / "srv")
    try:
        key_id = json.loads(server.cli("kms", "CreateKey").stdout)["KeyMetadata"]["KeyId"]
        policy = {
            "Version": "1",
            "Statement": [
                {
                    "Effect": "Allow",
                    "Action": ["kms:GenerateDataKey", "kms:DescribeKey"],
                    "Resource": [f"acs:kms:*:*:key/{key_id}"],
                }
            ],
        }
        ak, secret = server.new_access_key(policy)
        credentials = {"ALIBABA_CLOUD_ACCESS_KEY_ID": ak, "ALIBABA_CLOUD_ACCESS_KEY_SECRET": secret}
        client_home = tmp_path / "unused-home"  # commands served by the agent never open a KMS home
        agent = Agent(
            client_home,
            sockdir / "r" / "agent.sock",
            "--endpoint",
            server.endpoint,
            "--insecure-http",
            env=credentials,
        )
        try:
            assert agent.status()["kms"] == f"remote endpoint={server.endpoint}"
            outputs = []
            for i in range(3):
                src = tmp_path / f"f{i}.txt"
                src.write_text(f"file {i}\n")
                r = agent.run("encrypt", "--key-id", key_id, "--context", "team=a", str(src))
                assert r.returncode == 0, r.stderr
                outputs.append(src.with_name(src.name + ".cipher"))
            assert len(blobs(outputs)) == 1
            assert audited(server.home, ak).count(("GenerateDataKey", "OK")) == 1

            r = agent.run("decrypt", str(outputs[0]), "-o", str(tmp_path / "out.txt"))
            assert r.returncode == 3, r.stderr
            assert "Forbidden.NoPermission" in r.stderr
            assert not (tmp_path / "out.txt").exists()
            assert ("Decrypt", "Forbidden.NoPermission") in audited(server.home, ak)
            assert not client_home.exists()
        finally:
            agent.close()
    finally:
        server.stop()
        shutil.rmtree(sockdir, ignore_errors=True)
