"""The HTTP door onto the KMS service: Alibaba Cloud KMS (2016-01-20) wire protocol over ASGI.

Owns only HTTP concerns — parsing query/form/headers, signatures (``signature``), clock skew,
nonce replay, the policy check, the one error table (``errors``), JSON out, the access log and
the hash-chained audit log (``audit``). Every Action goes through ``kmsenv.kms.actions.dispatch``,
the same door the embedded KMS uses, so behaviour and error codes are identical.

Importing this package is cheap; ``starlette``/``uvicorn`` are only imported by ``app`` and the
``kmsenv server`` command.
"""
