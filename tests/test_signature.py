"""Request signatures: the reference's published vectors, SDK-generated vectors, and parse errors."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from kmsenv.errors import KmsError
from kmsenv.server.signature import (
    EMPTY_SHA256,
    Request,
    acs3_canonical_request,
    check_timestamp,
    parse_auth,
    pct,
    v1_sign,
    v1_string_to_sign,
    verify,
)

VECTORS = sorted((Path(__file__).parent / "vectors" / "signature").glob("*.json"))


def _request(v: dict[str, Any]) -> Request:
    pairs = lambda items: [(str(k), str(val)) for k, val in items]  # noqa: E731
    return Request(v["method"], pairs(v["query"]), pairs(v["form"]), pairs(v["headers"]), v["body"].encode())


@pytest.mark.parametrize("path", VECTORS, ids=[p.stem for p in VECTORS])
def test_vector(path: Path) -> None:
    vector = json.loads(path.read_text("utf-8"))
    req = _request(vector)
    if vector.get("signature_only"):
        params = dict(req.query)
        ok = v1_sign(vector["secret"], v1_string_to_sign(req.method, req.query)) == params["Signature"]
        assert ok == (vector["expect"] == "ok")
        return
    try:
        signed = parse_auth(req)
        assert signed.access_key_id == vector["access_key_id"]
        verify(signed, vector["secret"])
    except KmsError as exc:
        assert exc.code == vector["expect"]
    else:
        assert vector["expect"] == "ok"


def test_vectors_cover_every_scheme() -> None:
    assert {p.stem.split("_")[0] for p in VECTORS} == {"v1", "acs3", "acs4"}


#: The reference's published signatures (alibaba-kms-wire.md §4): test_vector verifies each file,
#: and this table pins the values, so a regenerated vector file cannot quietly change them.
REFERENCE = {
    "v1_doc_get_create_key": "41wk2SSX1GJh7fwnc5eqOfiJPFg=",
    "v1_sdk_generate_data_key_context": "6nIKWaVUb51G6w1UFLiVGtdeplk=",
    "acs3_sdk_generate_data_key": "d789a4a14ef6b1aa0c6b0cd34440fb2236fd48fff6e672e7cb313cfb15774503",
}


@pytest.mark.parametrize(("name", "value"), sorted(REFERENCE.items()))
def test_reference_signatures(name: str, value: str) -> None:
    vector = json.loads((VECTORS[0].parent / f"{name}.json").read_text("utf-8"))
    req = _request(vector)
    if vector.get("signature_only"):
        computed = v1_sign(vector["secret"], v1_string_to_sign(req.method, req.query))
    else:
        computed = parse_auth(req).expected(vector["secret"])
    assert (computed, vector["expect"]) == (value, "ok")


def test_pct_is_alibabas_encoding() -> None:
    assert pct("a b*c~d/é+") == "a%20b%2Ac~d%2F%C3%A9%2B"


def test_repeated_signed_header_values_are_sorted_for_acs3() -> None:
    headers = [("x-acs-a", "b"), ("x-acs-a", " a ")]
    assert "x-acs-a:a,b\n" in acs3_canonical_request("GET", [], headers, ["x-acs-a"], EMPTY_SHA256)
    assert "x-acs-a:b,a\n" in acs3_canonical_request("GET", [], headers, ["x-acs-a"], EMPTY_SHA256, acs4=True)


def test_v1_empty_values_are_signed() -> None:
    with_empty = v1_string_to_sign("POST", [("A", "1"), ("SignatureType", "")])
    assert with_empty.endswith("%26SignatureType%3D")


def _v1(**params: str) -> Request:
    base = {
        "Signature": "x",
        "AccessKeyId": "ak",
        "SignatureMethod": "HMAC-SHA1",
        "SignatureVersion": "1.0",
        "Timestamp": "2024-01-01T00:00:00Z",
        "SignatureNonce": "n",
    }
    return Request("POST", list({**base, **params}.items()), [], [])


@pytest.mark.parametrize(
    ("req", "code"),
    [
        (_v1(SignatureMethod="HMAC-MD5"), "InvalidSignatureMethod"),
        (_v1(SignatureVersion="2.0"), "InvalidParameter"),
        (_v1(SignatureNonce="n" * 129), "InvalidParameter"),
        (_v1(Signature=""), "MissingParameter"),
        (
            Request("POST", [], [], [("authorization", "ACS3-HMAC-SHA256 x"), ("authorization", "y")]),
            "IncompleteSignature",
        ),
        (
            Request(
                "POST", [], [], [("authorization", "ACS3-HMAC-SHA256 Credential=a,SignedHeaders=Host,Signature=s")]
            ),
            "IncompleteSignature",
        ),
    ],
)
def test_parse_errors(req: Request, code: str) -> None:
    with pytest.raises(KmsError) as err:
        parse_auth(req)
    assert err.value.code == code


def test_acs4_date_must_match_credential_scope() -> None:
    headers = [
        ("host", "h"),
        ("x-acs-date", "2024-01-02T00:00:00Z"),
        ("x-acs-signature-nonce", "n"),
        (
            "authorization",
            "ACS4-HMAC-SHA256 Credential=ak/20240101/r/Kms/aliyun_v4_request,"
            "SignedHeaders=host;x-acs-date;x-acs-signature-nonce,Signature=s",
        ),
    ]
    with pytest.raises(KmsError) as err:
        parse_auth(Request("POST", [], [], headers))
    assert err.value.code == "IncompleteSignature"


def test_signature_mismatch_message_ends_with_string_to_sign() -> None:
    signed = parse_auth(_v1())
    with pytest.raises(KmsError) as err:
        verify(signed, "secret")
    assert err.value.code == "SignatureDoesNotMatch"
    assert err.value.message.split(":", 1)[1] == signed.string_to_sign
    assert "secret" not in repr(signed)


NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("2026-01-01T12:15:00Z", None),
        ("2026-01-01T11:45:00Z", None),
        ("2026-01-01T12:15:01Z", "InvalidTimeStamp.Expired"),
        ("2026-01-01T11:44:59Z", "InvalidTimeStamp.Expired"),
        ("2026-01-01T12:00:00", "InvalidTimeStamp.Format"),
        ("2026-01-01T12:00:00.000Z", "InvalidTimeStamp.Format"),
        ("2026-02-30T12:00:00Z", "InvalidTimeStamp.Format"),
        ("", "InvalidTimeStamp.Format"),
    ],
)
def test_timestamp_window(text: str, code: str | None) -> None:
    if code is None:
        check_timestamp(text, NOW)
        return
    with pytest.raises(KmsError) as err:
        check_timestamp(text, NOW)
    assert err.value.code == code
