"""Write the request-signature vectors in this folder: ``python tests/vectors/signature/generate.py``.

One scenario per file. The expected signatures do not come from kmsenv's own signer:

- ``v1_*`` and ``acs3_*`` use the values published in alibaba-kms-wire.md §4 (the Alibaba docs'
  signed URL, and signatures computed with the official SDKs' composers);
- ``acs4_*`` are computed here with the official ``alibabacloud-gateway-pop`` signer.

``expect`` is ``ok`` or the Alibaba error code verification must raise. ``signature_only`` marks
the docs' vector, which predates ``SignatureNonce`` (a server refuses it as MissingParameter):
only its signature is checked. Files hold dummy credentials only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

HERE = Path(__file__).parent
EMPTY = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
NONCE = "0" * 31 + "1"
DOC_V1 = [
    ("AccessKeyId", "testid"),
    ("Action", "CreateKey"),
    ("Format", "json"),
    ("SignatureMethod", "HMAC-SHA1"),
    ("SignatureVersion", "1.0"),
    ("Timestamp", "2016-03-28T03:13:08Z"),
    ("Version", "2016-01-20"),
]
GDK_V1 = [
    ("Action", "GenerateDataKey"),
    ("Version", "2016-01-20"),
    ("Format", "JSON"),
    ("KeyId", "alias/Apollo/WorkKey"),
    ("NumberOfBytes", "32"),
    ("RegionId", "cn-hangzhou"),
    ("Timestamp", "2024-01-01T00:00:00Z"),
    ("SignatureMethod", "HMAC-SHA1"),
    ("SignatureVersion", "1.0"),
    ("SignatureNonce", NONCE),
    ("AccessKeyId", "testid"),
    ("EncryptionContext", '{"a":"b c*~é"}'),
]
ACS3_HEADERS = [
    ("accept", "application/json"),
    ("host", "kms.example.local"),
    ("x-acs-action", "GenerateDataKey"),
    ("x-acs-content-sha256", EMPTY),
    ("x-acs-date", "2024-01-01T00:00:00Z"),
    ("x-acs-signature-nonce", NONCE),
    ("x-acs-version", "2016-01-20"),
]
FORM_HEADERS = sorted([*ACS3_HEADERS, ("content-type", "application/x-www-form-urlencoded")])
GDK_QUERY = [("KeyId", "alias/Apollo/WorkKey"), ("NumberOfBytes", "32")]
ACS3_SIG = "d789a4a14ef6b1aa0c6b0cd34440fb2236fd48fff6e672e7cb313cfb15774503"


def _acs3_auth(signature: str, headers: list[tuple[str, str]] = ACS3_HEADERS) -> tuple[str, str]:
    names = ";".join(name for name, _ in headers)
    return ("authorization", f"ACS3-HMAC-SHA256 Credential=testid,SignedHeaders={names},Signature={signature}")


def _acs4_auth(headers: list[tuple[str, str]], query: list[tuple[str, str]], secret: str) -> tuple[str, str]:
    from alibabacloud_gateway_pop.client import Client

    pop = Client()
    alg, date, region = "ACS4-HMAC-SHA256", "20240101", "cn-hangzhou"
    key = pop.get_signingkey(alg, secret, "Kms", region, date)
    auth = pop.get_authorization(
        "/", "POST", dict(query), dict(headers), alg, EMPTY, "testid", key, "Kms", region, date
    )
    return ("authorization", auth)


def scenarios() -> dict[str, dict[str, Any]]:
    base = {"method": "POST", "form": [], "body": "", "access_key_id": "testid", "secret": "testsecret"}
    acs4_headers = [h for h in ACS3_HEADERS if h[0] != "accept"]
    return {
        "v1_doc_get_create_key": {
            **base,
            "method": "GET",
            "source": "Alibaba KMS docs signed URL (alibaba-kms-wire.md §4.1)",
            "signature_only": True,
            "query": [*DOC_V1, ("Signature", "41wk2SSX1GJh7fwnc5eqOfiJPFg=")],
            "headers": [],
            "expect": "ok",
        },
        "v1_sdk_generate_data_key_context": {
            **base,
            "source": "aliyunsdkcore composer (alibaba-kms-wire.md §4.1)",
            "query": [*GDK_V1, ("Signature", "6nIKWaVUb51G6w1UFLiVGtdeplk=")],
            "headers": [],
            "expect": "ok",
        },
        "v1_parameter_altered_after_signing": {
            **base,
            "source": "v1_sdk_generate_data_key_context with NumberOfBytes changed",
            "query": [
                *(("NumberOfBytes", "64") if k == "NumberOfBytes" else (k, v) for k, v in GDK_V1),
                ("Signature", "6nIKWaVUb51G6w1UFLiVGtdeplk="),
            ],
            "headers": [],
            "expect": "SignatureDoesNotMatch",
        },
        "v1_wrong_secret": {
            **base,
            "secret": "testsecreT",
            "source": "v1_doc_get_create_key verified with another secret",
            "signature_only": True,
            "method": "GET",
            "query": [*DOC_V1, ("Signature", "41wk2SSX1GJh7fwnc5eqOfiJPFg=")],
            "headers": [],
            "expect": "SignatureDoesNotMatch",
        },
        "acs3_sdk_generate_data_key": {
            **base,
            "source": "Tea SDK Utils.get_authorization (alibaba-kms-wire.md §4.2)",
            "query": GDK_QUERY,
            "headers": [*ACS3_HEADERS, _acs3_auth(ACS3_SIG)],
            "expect": "ok",
        },
        "acs3_header_altered_after_signing": {
            **base,
            "source": "acs3_sdk_generate_data_key with x-acs-action changed",
            "query": GDK_QUERY,
            "headers": [
                *(("x-acs-action", "Decrypt") if k == "x-acs-action" else (k, v) for k, v in ACS3_HEADERS),
                _acs3_auth(ACS3_SIG),
            ],
            "expect": "SignatureDoesNotMatch",
        },
        "acs3_body_with_unsigned_content_type": {
            **base,
            "source": "acs3_sdk_generate_data_key plus a form body whose Content-Type is not signed",
            "query": GDK_QUERY,
            "headers": [*ACS3_HEADERS, ("content-type", "application/x-www-form-urlencoded"), _acs3_auth(ACS3_SIG)],
            "body": "Recipient=x",
            "expect": "IncompleteSignature",
        },
        "acs3_body_not_matching_content_sha256": {
            **base,
            "source": "a signed empty-body hash (x-acs-content-sha256) arriving with a body",
            "query": GDK_QUERY,
            "headers": [*FORM_HEADERS, _acs3_auth(ACS3_SIG, FORM_HEADERS)],
            "body": "Recipient=x",
            "expect": "SignatureDoesNotMatch",
        },
        "acs4_pop_generate_data_key": {
            **base,
            "source": "alibabacloud-gateway-pop 0.1.3 get_signingkey/get_authorization",
            "query": GDK_QUERY,
            "headers": [*acs4_headers, _acs4_auth(acs4_headers, GDK_QUERY, "testsecret")],
            "expect": "ok",
        },
        "acs4_wrong_secret": {
            **base,
            "source": "acs4_pop_generate_data_key signed with another secret",
            "query": GDK_QUERY,
            "headers": [*acs4_headers, _acs4_auth(acs4_headers, GDK_QUERY, "othersecret")],
            "expect": "SignatureDoesNotMatch",
        },
    }


def main() -> None:
    for name, scenario in scenarios().items():
        (HERE / f"{name}.json").write_text(json.dumps(scenario, indent=2, ensure_ascii=False) + "\n", "utf-8")


if __name__ == "__main__":
    main()
