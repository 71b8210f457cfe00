"""bench/bench_server.py stays runnable: end to end on a tiny count (no timing is asserted).

Also checks the load generator's hand-written SigV4 against botocore's signer, and its ACS3
request against kmsenv's own verifier, so the benchmark measures correctly signed requests.
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from unittest import mock
from urllib.parse import parse_qsl, urlsplit

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def load_loadgen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("kmsenv_bench_loadgen", BENCH / "loadgen.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while building the class
    spec.loader.exec_module(module)
    return module


def test_sigv4_matches_botocore() -> None:
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    loadgen = load_loadgen()
    body = b'{"KeyId":"alias/bench","KeySpec":"AES_256"}'
    ours = loadgen.sigv4_headers(
        "AKIDEXAMPLE",
        "secret",
        region="us-east-1",
        host="127.0.0.1:5000",
        target="TrentService.GenerateDataKey",
        body=body,
        amz_date="20261129T051500Z",
    )
    request = AWSRequest(
        method="POST",
        url="http://127.0.0.1:5000/",
        data=body,
        headers={"Content-Type": "application/x-amz-json-1.1", "X-Amz-Target": "TrentService.GenerateDataKey"},
    )
    with mock.patch("botocore.auth.get_current_datetime", return_value=datetime.datetime(2026, 11, 29, 5, 15, 0)):
        SigV4Auth(Credentials("AKIDEXAMPLE", "secret"), "kms", "us-east-1").add_auth(request)
    assert ours["authorization"] == request.headers["Authorization"]


def test_acs3_request_verifies_with_kmsenvs_verifier() -> None:
    from kmsenv.server import signature

    loadgen = load_loadgen()
    target = loadgen.Target("kmsenv", "127.0.0.1", 8080, "LTAIbench", "s3cret")
    first = loadgen.kmsenv_request(target, "Decrypt", {"CiphertextBlob": "a+b/c=="})
    second = loadgen.kmsenv_request(target, "Decrypt", {"CiphertextBlob": "a+b/c=="})
    head = first.decode("latin-1").split("\r\n\r\n")[0].split("\r\n")
    method, path, _ = head[0].split(" ")
    headers = [(name.lower(), value) for name, _, value in (line.partition(": ") for line in head[1:])]
    query = parse_qsl(urlsplit(path).query, keep_blank_values=True)
    assert query == [("CiphertextBlob", "a+b/c==")]
    signed = signature.parse_auth(signature.Request(method, query, [], headers))
    assert signed.scheme == signature.ACS3 and signed.access_key_id == "LTAIbench"
    signature.verify(signed, "s3cret")
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        signature.verify(signed, "wrong")
    # Each request carries its own nonce.
    assert (
        b"x-acs-signature-nonce" in second
        and first.split(b"x-acs-signature-nonce")[1] != second.split(b"x-acs-signature-nonce")[1]
    )


def test_percentile_is_nearest_rank() -> None:
    loadgen = load_loadgen()
    values = [float(i) for i in range(1, 101)]
    assert loadgen.percentile(values, 50) == 50.0
    assert loadgen.percentile(values, 99) == 99.0
    assert loadgen.percentile([3.0], 99) == 3.0
    assert math.isnan(loadgen.percentile([], 50))


@pytest.mark.slow
def test_bench_server_runs(tmp_path: Path) -> None:
    out = tmp_path / "server.json"
    args = [
        "--count",
        "30",
        "--repeat",
        "2",
        "--levels",
        "1,4",
        "--workers",
        "2,1",
        "--dir",
        str(tmp_path),
        "--out",
        str(out),
    ]
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_server.py"), *args],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    assert (results["setup"]["count"], results["setup"]["repeat"]) == (30, 2)
    runs = [*results["kmsenv"]["1"], *results["kmsenv"]["2"], *results["moto"]]
    assert len(runs) == 3 * 2 * 2  # (2 worker counts + moto) x 2 levels x 2 Actions
    for run in runs:
        assert run["errors"] == 0 and run["ok"] == 30
        assert run["rps"] > 0
        assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["max_ms"]
        assert len(run["rps_runs"]) == 2 and min(run["rps_runs"]) <= run["rps"] <= max(run["rps_runs"])
    for run in [*results["kmsenv"]["1"], *results["kmsenv"]["2"]]:
        assert run["server_cpu_ms_per_request"] > 0
    assert results["summary"]["best_workers"] in (1, 2)
    ratios = results["summary"]["ratio_kmsenv_over_moto"]
    assert set(ratios) == {"GenerateDataKey", "Decrypt"} and all(v > 0 for v in ratios["Decrypt"].values())
    for audit in results["audit"].values():
        assert audit["records"] >= 2 * 4 * 30 and "OK" in audit["verify"]
    assert "x moto" in proc.stdout and "best kmsenv worker count" in proc.stdout
    assert list(tmp_path.glob("kmsenv-bench-server-*")) == []  # its work folder is removed
