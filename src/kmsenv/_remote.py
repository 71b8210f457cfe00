"""Calls to a remote KMS — a kmsenv server or Alibaba Cloud KMS — through the official SDK.

One code path for both: the ``alibabacloud-kms20160120`` (Tea) client signs with ACS3, and
credentials come from ``alibabacloud-credentials``, so users' existing setups work unchanged:
``ALIBABA_CLOUD_ACCESS_KEY_ID``/``ALIBABA_CLOUD_ACCESS_KEY_SECRET`` (+ ``ALIBABA_CLOUD_SECURITY_TOKEN``
for STS), ``~/.aliyun/config.json`` profiles (``--profile`` or ``ALIBABA_CLOUD_PROFILE``), the
credentials file, ECS RAM roles, OIDC. Actions go through the SDK's generic ``call_api`` so every
Action the CLI knows is reachable with the same string parameters as on the wire.

Plain HTTP is allowed only to loopback addresses (``--insecure-http``): credentials are signed,
not sent, but responses carry data-key plaintext, which must never cross a network in the clear.
The SDK is imported only when a remote KMS is used.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from typing import Any

from kmsenv.errors import ConfigError, KmsError, UsageError

__all__ = ["DEFAULT_REGION", "RemoteApi", "parse_endpoint"]

DEFAULT_REGION = "cn-hangzhou"
_API_VERSION = "2016-01-20"


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def parse_endpoint(endpoint: str) -> tuple[str, str | None]:
    """``host[:port]`` (a scheme is tolerated and stripped) → (endpoint, scheme given or None)."""
    scheme = None
    for prefix in ("https://", "http://"):
        if endpoint.lower().startswith(prefix):
            scheme = prefix[:-3]
            endpoint = endpoint[len(prefix) :]
    endpoint = endpoint.rstrip("/")
    if not endpoint or "/" in endpoint:
        raise UsageError(f"invalid endpoint {endpoint!r}: expected host or host:port")
    return endpoint, scheme


def _env_provider() -> Any:
    from alibabacloud_credentials.provider import StaticAKCredentialsProvider, StaticSTSCredentialsProvider

    ak, secret = os.environ["ALIBABA_CLOUD_ACCESS_KEY_ID"], os.environ["ALIBABA_CLOUD_ACCESS_KEY_SECRET"]
    token = os.environ.get("ALIBABA_CLOUD_SECURITY_TOKEN")
    if token:
        return StaticSTSCredentialsProvider(access_key_id=ak, access_key_secret=secret, security_token=token)
    return StaticAKCredentialsProvider(access_key_id=ak, access_key_secret=secret)


def _local_chain() -> Any:
    """The default chain's file-based providers (environment handled before), minus the cloud-only
    ones (ECS metadata, OIDC, URI)."""
    from alibabacloud_credentials.provider import (
        CLIProfileCredentialsProvider,
        ProfileCredentialsProvider,
    )

    class LocalChain:
        def __init__(self) -> None:
            self._providers = [
                CLIProfileCredentialsProvider(),
                ProfileCredentialsProvider(),
            ]

        def get_provider_name(self) -> str:
            return "kmsenv_local_chain"

        def get_credentials(self) -> Any:
            errors = []
            for provider in self._providers:
                try:
                    found = provider.get_credentials()
                except Exception as exc:  # each provider raises its own kind for "not configured"
                    errors.append(f"{type(provider).__name__}: {exc}")
                    continue
                if found is not None:
                    return found
            from alibabacloud_credentials.exceptions import CredentialException

            raise CredentialException(f"unable to load credentials: {errors}")

        async def get_credentials_async(self) -> Any:
            return self.get_credentials()

    return LocalChain()


class RemoteApi:
    """Signed Action calls to one KMS endpoint."""

    def __init__(
        self,
        endpoint: str | None = None,
        *,
        region: str | None = None,
        profile: str | None = None,
        insecure_http: bool = False,
        timeout_ms: int = 10_000,
    ) -> None:
        from alibabacloud_credentials.client import Client as CredentialClient
        from alibabacloud_credentials.provider.cli_profile import CLIProfileCredentialsProvider
        from alibabacloud_kms20160120.client import Client
        from alibabacloud_tea_openapi.utils_models import Config

        self.region = region or os.environ.get("ALIBABA_CLOUD_REGION_ID") or DEFAULT_REGION
        protocol = "https"
        host = None
        if endpoint is not None:
            host, scheme = parse_endpoint(endpoint)
            if scheme == "http" and not insecure_http:
                raise UsageError(f"{endpoint} is plain http", hint="add --insecure-http (loopback only)")
            if insecure_http:
                hostname = host.rsplit(":", 1)[0] if not host.endswith("]") else host
                if not _is_loopback(hostname):
                    raise UsageError(
                        f"--insecure-http is allowed only for loopback endpoints, not {host}",
                        hint="data keys travel in responses; use TLS for anything but this machine",
                    )
                protocol = "http"
        self.endpoint = host or f"kms.{self.region}.aliyuncs.com"
        # The credential chain logs each failed provider with a traceback; the one error we
        # raise says what to do instead.
        logging.getLogger("credentials").setLevel(logging.CRITICAL)
        try:
            provider: Any
            if profile:
                provider = CLIProfileCredentialsProvider(profile_name=profile)
            elif os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_ID") and os.environ.get("ALIBABA_CLOUD_ACCESS_KEY_SECRET"):
                # Read the environment now: the SDK's own environment provider captured it when
                # the module was first imported, which misses changes made since.
                provider = _env_provider()
            elif _is_loopback(self.endpoint.rsplit(":", 1)[0].strip("[]")):
                # A kmsenv server on this machine: the ECS metadata service (RAM roles) can't
                # hold credentials for it, and querying it would send traffic off the machine.
                provider = _local_chain()
            else:
                provider = None
            credential = CredentialClient(provider=provider) if provider else CredentialClient()
            config = Config(
                credential=credential,
                region_id=self.region,
                endpoint=self.endpoint,
                protocol=protocol,
                read_timeout=timeout_ms,
                connect_timeout=timeout_ms,
            )
            self._client = Client(config)
        except Exception as exc:  # the SDK raises bare Exceptions for credential problems
            raise ConfigError(f"cannot set up the KMS client: {exc}") from None

    def call(self, action: str, params: Mapping[str, str]) -> dict[str, Any]:
        """Call ``action`` with wire parameters; return the response body or raise KmsError."""
        from alibabacloud_tea_openapi import utils_models
        from darabonba.runtime import RuntimeOptions
        from Tea.exceptions import TeaException, UnretryableException

        request = utils_models.OpenApiRequest(query=dict(params))
        spec = utils_models.Params(
            action=action,
            version=_API_VERSION,
            protocol="HTTPS",
            pathname="/",
            method="POST",
            auth_type="AK",
            style="RPC",
            req_body_type="formData",
            body_type="json",
        )
        try:
            result = self._client.call_api(spec, request, RuntimeOptions())
        except UnretryableException as exc:
            # No HTTP answer: connection refused, DNS, TLS, timeout — or no usable credentials.
            inner = getattr(exc, "inner_exception", exc)
            text = (str(inner).splitlines() or [inner.__class__.__name__])[0][:300]
            errno = re.search(r"\[Errno -?\d+\] [^\"')]+", text)
            text = errno.group(0) if errno else text
            if inner.__class__.__name__ == "CredentialException":
                raise ConfigError(
                    "no usable Alibaba Cloud credentials were found",
                    hint="set ALIBABA_CLOUD_ACCESS_KEY_ID and ALIBABA_CLOUD_ACCESS_KEY_SECRET, or use --profile",
                ) from None
            raise KmsError("ServiceUnavailableTemporary", f"cannot reach the KMS at {self.endpoint}: {text}") from None
        except TeaException as exc:
            data = exc.data if isinstance(exc.data, dict) else {}
            code = str(exc.code or data.get("Code") or "InternalFailure")
            message = str(data.get("Message") or exc.message or "the KMS returned an error")
            raise KmsError(code, message) from None
        body = result.get("body") if isinstance(result, dict) else None
        if not isinstance(body, dict):
            raise KmsError("InternalFailure", f"the KMS at {self.endpoint} returned a response that is not JSON")
        return body
