"""The server's one error table: exception → HTTP status, ``Code``, client-safe ``Message``, body.

Every error response has Alibaba's shape ``{RequestId, HostId, Code, Message, Recommend}`` with
``Content-Type: application/json;charset=utf-8``; the status comes from the code
(``kmsenv.errors.HTTP_STATUS``), so a code means the same everywhere.

What a client sees is kept apart from what the operator's log gets: :class:`KmsError` messages are
written to be shown (they never carry key material, plaintext or secrets), except for the codes in
``_GENERIC`` whose messages may describe internals (SQLite errors, file paths) — those, and any
exception that is not a ``KmsError`` at all, reach the client as a fixed sentence and the detail
goes to the server log only. A client never sees a traceback.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from kmsenv.errors import KmsError

__all__ = ["ErrorReply", "error_reply"]

_log = logging.getLogger("kmsenv.server")

#: Codes whose message is replaced by a fixed one before it reaches a client.
_GENERIC = {
    "InternalFailure": "The request processing has failed due to some unknown error.",
    "ServiceUnavailableTemporary": "The service is temporarily unavailable. Please try again later.",
}
RECOMMEND = "https://api.aliyun.com/troubleshoot?q={code}&product=Kms&requestId={request_id}"


@dataclass(frozen=True, slots=True)
class ErrorReply:
    status: int
    code: str
    body: dict[str, Any]


def error_reply(exc: BaseException, *, request_id: str, host_id: str) -> ErrorReply:
    """The response for ``exc``; logs the detail of anything not meant for the client."""
    if isinstance(exc, KmsError):
        code, status, message = exc.code, exc.http_status, exc.message
        if code in _GENERIC:
            _log.warning("request %s: %s: %s", request_id, code, exc.message)
            message = _GENERIC[code]
    else:
        _log.error("request %s: unexpected error", request_id, exc_info=exc)
        code, status, message = "InternalFailure", 500, _GENERIC["InternalFailure"]
    body = {
        "RequestId": request_id,
        "HostId": host_id,
        "Code": code,
        "Message": message,
        "Recommend": RECOMMEND.format(code=code, request_id=request_id),
    }
    return ErrorReply(status, code, body)
