"""Alibaba Cloud request signatures, as pure functions: canonicalisation, signing and verification.

Three schemes, exactly as the official SDKs produce them (``alibaba-kms-wire.md`` §4):

- **v1** (``SignatureVersion=1.0``, ``SignatureMethod=HMAC-SHA1`` or ``HMAC-SHA256``): the old
  ``aliyunsdkcore`` SDK and the Tea SDK with ``signature_algorithm='v2'``. A MAC over every
  parameter (query and form body, minus ``Signature``), key ``secret + '&'``.
- **ACS3-HMAC-SHA256** (Tea SDK default): ``Authorization`` header; a MAC over the method, the
  canonical query, the signed headers and the SHA-256 of the body, key ``secret``.
- **ACS4-HMAC-SHA256** (Tea ``signature_version='v4'``): the ACS3 canonical request under a key
  derived from the secret, the date, the region and the product.

Everything here works on the *decoded* request and re-canonicalises it; nothing signs or compares
the raw query text, because the SDKs encode the same value differently (``+`` vs ``%20``).
Nothing here reads a clock, a store or the network: :func:`parse_auth` turns a request into a
:class:`SignedRequest` (raising the Alibaba code for malformed auth), whose ``string_to_sign`` is
independent of the secret, and :func:`verify` checks it against a secret in constant time.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from urllib.parse import quote

from kmsenv import _crypto
from kmsenv.errors import KmsError

__all__ = [
    "ACS3",
    "ACS4",
    "EMPTY_SHA256",
    "Request",
    "SignedRequest",
    "acs3_canonical_request",
    "acs3_string_to_sign",
    "acs4_signing_key",
    "canonical_params",
    "check_timestamp",
    "hmac_hex",
    "parse_auth",
    "pct",
    "v1_sign",
    "v1_string_to_sign",
    "verify",
]

ACS3 = "ACS3-HMAC-SHA256"
ACS4 = "ACS4-HMAC-SHA256"
EMPTY_SHA256 = _crypto.sha256_hex(b"")
V1_METHODS = ("HMAC-SHA1", "HMAC-SHA256")
#: Alibaba's clock window: a signed request is only good this long either side of the server clock.
SKEW_S = 15 * 60
#: Bound on nonce length: the SDKs send 32 hex characters; without a bound a client could fill the
#: nonce store with megabyte "nonces".
MAX_NONCE = 128

_TIMESTAMP_RE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}Z$")
_AUTH_RE = re.compile(
    r"^(?P<scheme>\S+) Credential=(?P<cred>[^,\s]+),SignedHeaders=(?P<sh>[^,\s]+),Signature=(?P<sig>\S+)$"
)
_HEADER_NAME_RE = re.compile(r"^[a-z0-9-]+$")

Pairs = Sequence[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Request:
    """The transport-neutral view of an HTTP request that signatures are computed over.

    ``query`` and ``form`` are decoded pairs (``+`` already a space); ``headers`` are lower-case
    names with values as received (latin-1 decoded, untrimmed, repeats kept in order).
    """

    method: str
    query: Pairs
    form: Pairs
    headers: Pairs
    body: bytes = b""

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name]
        if len(values) > 1:
            # Two values for one auth header: which one would we verify? Refuse the ambiguity.
            raise KmsError("IncompleteSignature", f"The header {name} is given more than once.")
        return values[0] if values else None

    def params(self) -> dict[str, str]:
        """Query and form parameters merged (the caller has already refused duplicates)."""
        return dict([*self.query, *self.form])


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """What a request claims: who signed it, when, with which nonce, and the server's StringToSign."""

    scheme: str  # "HMAC-SHA1" | "HMAC-SHA256" (v1), ACS3 or ACS4
    access_key_id: str
    timestamp: str
    nonce: str
    signature: str = field(repr=False)
    string_to_sign: str = field(repr=False)
    scope: tuple[str, str, str] = ("", "", "")  # ACS4: (date, region, product)

    def expected(self, secret: str) -> str:
        """The signature this request should carry if signed with ``secret``."""
        if self.scheme in V1_METHODS:
            return v1_sign(secret, self.string_to_sign, self.scheme)
        if self.scheme == ACS4:
            return hmac_hex(acs4_signing_key(secret, *self.scope), self.string_to_sign)
        return hmac_hex(secret.encode("utf-8"), self.string_to_sign)


# ------------------------------------------------------------------------------- primitives --
def pct(text: str) -> str:
    """Alibaba's percent-encoding: UTF-8, ``A-Za-z0-9-_.~`` kept, everything else ``%XX``."""
    return quote(text, safe="~")


def canonical_params(pairs: Pairs) -> str:
    """``pct(k)=pct(v)`` joined by ``&``, sorted by name in code-point order (as the SDKs sort)."""
    return "&".join(f"{pct(k)}={pct(v)}" for k, v in sorted(pairs))


def hmac_hex(key: bytes, msg: str) -> str:
    return _crypto.hmac_sha256(key, msg.encode("utf-8")).hex()


def v1_string_to_sign(method: str, params: Pairs) -> str:
    """``METHOD&%2F&pct(canonical params)``; ``Signature`` itself is left out."""
    canon = canonical_params([(k, v) for k, v in params if k != "Signature"])
    return f"{method.upper()}&{pct('/')}&{pct(canon)}"


def v1_sign(secret: str, string_to_sign: str, method: str = "HMAC-SHA1") -> str:
    mac = _crypto.hmac_sha1 if method == "HMAC-SHA1" else _crypto.hmac_sha256
    return base64.b64encode(mac(f"{secret}&".encode(), string_to_sign.encode("utf-8"))).decode("ascii")


def _canonical_headers(headers: Pairs, signed: Sequence[str], *, sort_repeats: bool) -> str:
    lines = []
    for name in signed:
        values = [v.strip() for k, v in headers if k == name]
        if sort_repeats:
            values.sort()
        lines.append(f"{name}:{','.join(values)}\n")
    return "".join(lines)


def acs3_canonical_request(
    method: str, query: Pairs, headers: Pairs, signed_headers: Sequence[str], payload_hash: str, *, acs4: bool = False
) -> str:
    """The ACS3/ACS4 canonical request; the path is always ``/``."""
    return "\n".join(
        (
            method.upper(),
            "/",
            canonical_params(query),
            _canonical_headers(headers, signed_headers, sort_repeats=not acs4),
            ";".join(signed_headers),
            payload_hash,
        )
    )


def acs3_string_to_sign(scheme: str, canonical_request: str) -> str:
    return f"{scheme}\n{_crypto.sha256_hex(canonical_request.encode('utf-8'))}"


def acs4_signing_key(secret: str, date: str, region: str, product: str) -> bytes:
    key = _crypto.hmac_sha256(f"aliyun_v4{secret}".encode(), date.encode("utf-8"))
    for part in (region, product, "aliyun_v4_request"):
        key = _crypto.hmac_sha256(key, part.encode("utf-8"))
    return key


# ---------------------------------------------------------------------------------- parsing --
def _incomplete(why: str) -> KmsError:
    return KmsError("IncompleteSignature", f"The request signature is incomplete or malformed: {why}")


def _required(value: str | None, name: str) -> str:
    if value is None or value == "":
        raise KmsError.missing_parameter(name)
    return value


def parse_auth(req: Request) -> SignedRequest:
    """Read the signature scheme and claims of ``req``; raise the Alibaba code if malformed.

    ``Authorization: ACS3-...``/``ACS4-...`` selects those schemes; otherwise the v1
    ``Signature`` parameter is required.
    """
    authorization = req.header("authorization")
    if authorization is not None:
        scheme = authorization.split(" ", 1)[0]
        if scheme == ACS3:
            return _parse_acs(req, authorization, acs4=False)
        if scheme == ACS4:
            return _parse_acs(req, authorization, acs4=True)
        if scheme.startswith(("ACS3-", "ACS4-")):
            raise KmsError("InvalidSignatureMethod", f"The signature algorithm {scheme[:40]} is not supported.")
        raise _incomplete("the Authorization header is not ACS3-HMAC-SHA256 or ACS4-HMAC-SHA256.")
    return _parse_v1(req)


def _parse_v1(req: Request) -> SignedRequest:
    params = req.params()
    signature = _required(params.get("Signature"), "Signature")
    access_key_id = _required(params.get("AccessKeyId"), "AccessKeyId")
    method = _required(params.get("SignatureMethod"), "SignatureMethod")
    if method not in V1_METHODS:
        raise KmsError("InvalidSignatureMethod", f"The signature method {method[:40]} is not supported.")
    if _required(params.get("SignatureVersion"), "SignatureVersion") != "1.0":
        raise KmsError.invalid_parameter("SignatureVersion", "It must be 1.0.")
    return SignedRequest(
        scheme=method,
        access_key_id=access_key_id,
        timestamp=_required(params.get("Timestamp"), "Timestamp"),
        nonce=_nonce(params.get("SignatureNonce"), "SignatureNonce"),
        signature=signature,
        string_to_sign=v1_string_to_sign(req.method, [*req.query, *req.form]),
    )


def _nonce(value: str | None, name: str) -> str:
    nonce = _required(value, name)
    if len(nonce) > MAX_NONCE:
        raise KmsError.invalid_parameter(name, f"It must be at most {MAX_NONCE} characters.")
    return nonce


def _parse_acs(req: Request, authorization: str, *, acs4: bool) -> SignedRequest:
    match = _AUTH_RE.match(authorization)
    if match is None:
        raise _incomplete("expected Authorization: <algorithm> Credential=...,SignedHeaders=...,Signature=...")
    scheme, credential, signature = match["scheme"], match["cred"], match["sig"]
    signed = match["sh"].split(";")
    if any(not _HEADER_NAME_RE.match(h) for h in signed) or signed != sorted(set(signed)):
        raise _incomplete("SignedHeaders must be distinct lower-case header names in sorted order.")
    # Every header that steers the request must be covered by the signature; otherwise a
    # man-in-the-middle could swap the Action, the date, the nonce or the body hash (or the
    # form body's Content-Type) of a validly signed request.
    must_sign = {name for name, _ in req.headers if name.startswith("x-acs-")} | {"host"}
    if req.body:
        must_sign.add("content-type")
    unsigned = sorted(must_sign - set(signed))
    if unsigned:
        raise _incomplete(f"these headers must be signed: {', '.join(unsigned)}.")

    scope: tuple[str, str, str] = ("", "", "")
    timestamp = _required(req.header("x-acs-date"), "x-acs-date")
    if acs4:
        parts = credential.split("/")
        if len(parts) != 5 or parts[4] != "aliyun_v4_request" or not all(parts):
            raise _incomplete("ACS4 Credential must be <AccessKeyId>/<date>/<region>/<product>/aliyun_v4_request.")
        credential, scope = parts[0], (parts[1], parts[2], parts[3])
        if scope[0] != timestamp[:10].replace("-", ""):
            raise _incomplete("the Credential date does not match x-acs-date.")

    payload_hash = _crypto.sha256_hex(req.body)
    claimed = req.header("x-acs-content-sha256")
    canonical = acs3_canonical_request(req.method, req.query, req.headers, signed, claimed or payload_hash, acs4=acs4)
    string_to_sign = acs3_string_to_sign(scheme, canonical)
    if claimed is not None and not _crypto.constant_time_eq(claimed.strip().encode(), payload_hash.encode()):
        # The signature covers the claimed hash; a body swapped in transit must not ride on it.
        raise KmsError(
            "SignatureDoesNotMatch",
            "The x-acs-content-sha256 header does not match the SHA-256 of the request body. "
            f"server string to sign is:{string_to_sign}",
        )
    return SignedRequest(
        scheme=scheme,
        access_key_id=credential,
        timestamp=timestamp,
        nonce=_nonce(req.header("x-acs-signature-nonce"), "x-acs-signature-nonce"),
        signature=signature,
        string_to_sign=string_to_sign,
        scope=scope,
    )


# ----------------------------------------------------------------------------- verification --
def check_timestamp(text: str, now: datetime, *, window_s: int = SKEW_S) -> None:
    """Refuse a malformed timestamp or one outside ``now ± window_s``.

    The window bounds how long a captured request can be replayed at all; the nonce store only
    has to remember nonces that long.
    """
    if not _TIMESTAMP_RE.fullmatch(text):  # fullmatch: "$" alone would let a trailing "\n" in
        raise KmsError(
            "InvalidTimeStamp.Format",
            "Specified time stamp or date value is not well formatted (YYYY-MM-DDThh:mm:ssZ).",
        )
    try:
        # The fields by position (the pattern fixed them): ~1 us against strptime's ~5 us, paid
        # on every request; datetime() refuses what is not a real date as strptime did.
        when = datetime(
            int(text[0:4]),
            int(text[5:7]),
            int(text[8:10]),
            int(text[11:13]),
            int(text[14:16]),
            int(text[17:19]),
            tzinfo=UTC,
        )
    except ValueError:
        raise KmsError("InvalidTimeStamp.Format", "Specified time stamp or date value is not a valid date.") from None
    if abs((now - when).total_seconds()) > window_s:
        raise KmsError("InvalidTimeStamp.Expired", "Specified time stamp or date value is expired.")


def verify(signed: SignedRequest, secret: str) -> None:
    """Raise ``SignatureDoesNotMatch`` unless ``signed`` carries the signature ``secret`` gives.

    The comparison is constant-time, so response timing does not reveal how many leading
    characters of a forged signature were right. The message ends in ``string to sign is:<ours>``:
    the old SDK splits it on ``:`` (and crashes on a message without one) to tell a wrong secret
    from a canonicalisation difference.
    """
    expected = signed.expected(secret)
    if not _crypto.constant_time_eq(expected.encode("utf-8"), signed.signature.encode("utf-8")):
        raise KmsError(
            "SignatureDoesNotMatch",
            "Specified signature is not matched with our calculation. "
            f"server string to sign is:{signed.string_to_sign}",
        )
