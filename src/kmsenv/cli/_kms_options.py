"""Which KMS a command talks to: the embedded one (default) or a remote one (``--endpoint``/``--profile``).

Every command that needs a KMS adds these options with :func:`add_kms_options` and gets its KMS
from :func:`open_kms`, so ``kmsenv kms``, ``encrypt`` and ``decrypt`` choose a KMS the same way.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kmsenv.clients import AlibabaKms, EmbeddedKms

__all__ = ["add_kms_options", "is_remote", "open_kms"]


def add_kms_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "KMS selection",
        "Default: the embedded KMS in KMSENV_HOME. With --endpoint, --profile or --region: a kmsenv server or "
        "Alibaba Cloud KMS through the official SDK and the standard Alibaba credential chain "
        "(ALIBABA_CLOUD_ACCESS_KEY_ID/_SECRET, ~/.aliyun/config.json profiles, STS, RAM roles).",
    )
    group.add_argument("--endpoint", help="host:port of a kmsenv server, or kms.<region>.aliyuncs.com")
    group.add_argument("--insecure-http", action="store_true", help="plain http (loopback endpoints only)")
    group.add_argument("--profile", help="profile in ~/.aliyun/config.json for credentials")
    group.add_argument("--region", help="region id; alone, it selects Alibaba Cloud KMS kms.<region>.aliyuncs.com")


def is_remote(args: argparse.Namespace) -> bool:
    # --region alone means Alibaba Cloud KMS in that region (kms.<region>.aliyuncs.com): the
    # embedded KMS has its region fixed at creation, so the option has no other meaning.
    return bool(args.endpoint or args.profile or args.region)


def open_kms(args: argparse.Namespace) -> EmbeddedKms | AlibabaKms:
    """The KMS the options name; callers ``close()`` it when done."""
    if is_remote(args):
        from kmsenv.clients import AlibabaKms

        return AlibabaKms(args.endpoint, region=args.region, profile=args.profile, insecure_http=args.insecure_http)
    from kmsenv.clients import EmbeddedKms

    return EmbeddedKms()
