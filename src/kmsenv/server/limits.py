"""Limits that keep one client from taking the server from the others.

- :class:`RateLimiter` — a token bucket per AccessKey: ``rate`` requests per second, ``burst``
  at once. A request over it is refused with ``Rejected.Throttling`` (HTTP 429, the status
  Alibaba Cloud KMS answers with its "QPS Limit Exceeded") and told when to retry.

The limiter is per worker process: with ``--workers N`` each worker's buckets get ``rate/N`` and
``burst/N`` (:meth:`RateLimiter.for_worker`). Each worker has its own listening socket and the
kernel spreads new connections over them by a hash of the connection's addresses
(``kmsenv.server.runner``), so a client on several connections is held to about ``rate`` in
total without any shared state on the request path (a shared bucket would add a cross-process
lock to every request, as the nonce store has). The cost: a client using a single keep-alive
connection talks to one worker and gets ``rate/N``.

- :class:`AuthFailureLimiter` — a token bucket per client *address* (:func:`address_key`) that
  only requests refused before they are authenticated spend (an unknown AccessKey, a bad
  signature, a stale timestamp, a replayed nonce, a malformed request). While an address's bucket
  is empty, every request from it is refused with ``Rejected.Throttling`` *before* the AccessKey
  lookup and the HMAC: the point is to cap the CPU that someone without a valid secret can make a
  worker spend. Requests that authenticate spend nothing, and an address's failures never touch
  another address's bucket. Also ``rate/N`` and ``burst/N`` per worker.

Addresses, not AccessKeys, because before the signature is verified the AccessKeyId is only a
claim: bucketing on it would let anyone drain a real key's bucket by naming it. An IPv6 client
is keyed by its /64 (one host usually holds a whole /64, so per-/128 buckets would be free to
multiply); an IPv4-mapped IPv6 address (``::ffff:a.b.c.d``, what a dual-stack listener sees for
IPv4 clients) by its IPv4 address.

- :class:`TrustedProxies` — the reverse proxies (``trusted_proxies``) whose ``X-Forwarded-For``
  names the client for the per-address limits. Off by default: from anyone else the header is
  only a claim, and trusting it would let a client choose its bucket.
"""

from __future__ import annotations

import functools
import ipaddress
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kmsenv.errors import KmsError

__all__ = ["AuthFailureLimiter", "RateLimiter", "Throttled", "TrustedProxies", "address_key"]

#: Buckets of AccessKeys idle this long are dropped (a full bucket is the same as none).
_FORGET_AFTER_S = 60.0
#: Addresses an :class:`AuthFailureLimiter` tracks at most per worker (a bucket is ~200 bytes):
#: past it, the address whose last failure is oldest (the fullest bucket) is forgotten.
MAX_TRACKED_ADDRESSES = 10_000


class Throttled(KmsError):
    """``Rejected.Throttling``, with the seconds after which a retry would be let through."""

    def __init__(self, retry_after_s: float, *, who: str = "this AccessKey sends more requests") -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            "Rejected.Throttling",
            f"QPS Limit Exceeded: {who} than the server allows; "
            f"retry after {self.retry_after_ms} ms (Retry-After header).",
        )

    @property
    def retry_after_ms(self) -> int:
        return max(1, math.ceil(self.retry_after_s * 1000))

    def headers(self) -> list[tuple[bytes, bytes]]:
        """``Retry-After`` (whole seconds, HTTP) and ``x-acs-retry-after`` (milliseconds): the Tea
        SDK turns the latter into a ``ThrottlingException`` whose retry policy waits that long."""
        return [
            (b"retry-after", str(max(1, math.ceil(self.retry_after_s))).encode()),
            (b"x-acs-retry-after", str(self.retry_after_ms).encode()),
        ]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    """Token buckets per AccessKey, safe across the threads of one process."""

    def __init__(self, rate: float, burst: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("rate must be positive and burst at least 1")
        self.rate = rate
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}
        self._lock = threading.Lock()
        self._last_sweep = clock()

    @classmethod
    def for_worker(cls, rate: int, burst: int, workers: int) -> RateLimiter | None:
        """This worker's share of the server's limit (module docstring); None when it is off."""
        if rate <= 0:
            return None
        return cls(rate / workers, max(1.0, burst / workers))

    def take(self, access_key_id: str) -> None:
        """Spend one token of ``access_key_id``'s bucket, or raise :class:`Throttled`."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.get(access_key_id)
            if bucket is None:
                bucket = self._buckets[access_key_id] = _Bucket(self.burst, now)
            else:
                bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
                bucket.stamp = now
            if bucket.tokens < 1.0:
                raise Throttled((1.0 - bucket.tokens) / self.rate)
            bucket.tokens -= 1.0
            if now - self._last_sweep > _FORGET_AFTER_S:
                self._sweep(now)

    def _sweep(self, now: float) -> None:
        # Only verified AccessKeys get a bucket, so the map is bounded by the keys that exist;
        # forgetting idle ones keeps deleted keys from staying forever.
        self._last_sweep = now
        for key in [k for k, b in self._buckets.items() if now - b.stamp > _FORGET_AFTER_S]:
            del self._buckets[key]


@functools.lru_cache(maxsize=4096)
def _ipv6_key(host: str) -> str:
    try:
        address = ipaddress.IPv6Address(host.split("%", 1)[0])  # a link-local zone names no host
    except ValueError:
        return host  # not an address (a Unix socket path): itself
    if address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return str(ipaddress.IPv6Network((int(address) >> 64 << 64, 64)))


def address_key(host: str) -> str:
    """The client a connection's peer address counts as: an IPv4 address itself, an IPv6 address
    its /64 prefix (``2001:db8::/64``), an IPv4-mapped IPv6 address its IPv4 address."""
    if ":" not in host:
        return host  # IPv4: the common case, kept free of parsing
    return _ipv6_key(host)


class AuthFailureLimiter:
    """Token buckets per client address, spent only by requests refused before authentication
    (module docstring). Safe across the threads of one process; at most
    ``max_addresses`` buckets."""

    def __init__(
        self,
        rate: float,
        burst: float,
        *,
        max_addresses: int = MAX_TRACKED_ADDRESSES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if rate <= 0 or burst < 1 or max_addresses < 1:
            raise ValueError("rate must be positive, burst and max_addresses at least 1")
        self.rate = rate
        self.burst = burst
        self.max_addresses = max_addresses
        self._clock = clock
        # Least recently failed first: the front is the fullest bucket, the first to forget.
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def for_worker(cls, rate: int, burst: int, workers: int) -> AuthFailureLimiter | None:
        """This worker's share of the server's limit; None when it is off (``rate`` 0)."""
        if rate <= 0:
            return None
        return cls(rate / workers, max(1.0, burst / workers))

    def __len__(self) -> int:
        return len(self._buckets)

    def check(self, address: str) -> None:
        """Raise :class:`Throttled` if ``address`` has no token left; spends nothing.

        Checking without spending keeps authenticated requests free; the price is that requests
        of one address already being verified when its bucket runs dry (at most the worker's
        pool threads) are let through.
        """
        if address not in self._buckets:  # never failed, or forgotten: the fast path, no lock
            return
        with self._lock:
            bucket = self._buckets.get(address)
            if bucket is None:
                return
            tokens = min(self.burst, bucket.tokens + (self._clock() - bucket.stamp) * self.rate)
        if tokens < 1.0:
            raise Throttled(
                (1.0 - tokens) / self.rate,
                who="this address sends more requests that fail authentication",
            )

    def fail(self, address: str) -> None:
        """Spend one of ``address``'s tokens for a request refused before authentication."""
        now = self._clock()
        with self._lock:
            bucket = self._buckets.pop(address, None)
            if bucket is None:
                self._forget(now)
                bucket = _Bucket(self.burst, now)
            else:
                bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.stamp) * self.rate)
                bucket.stamp = now
            bucket.tokens = max(0.0, bucket.tokens - 1.0)
            self._buckets[address] = bucket  # to the back: most recently failed

    def _forget(self, now: float) -> None:
        # A bucket that has refilled to the burst is the same as none: drop those from the front
        # (oldest failure first), then, if the table is still full, the oldest one anyway (the
        # fullest bucket: forgetting it loses the least).
        refill_s = self.burst / self.rate
        buckets = self._buckets
        while buckets:
            address, bucket = next(iter(buckets.items()))
            if now - bucket.stamp < refill_s and len(buckets) < self.max_addresses:
                break
            del buckets[address]


class TrustedProxies:
    """Networks of reverse proxies trusted to report the client in ``X-Forwarded-For``.

    ``spec`` is a comma-separated list of addresses and networks (``"127.0.0.1, 10.0.0.0/8"``);
    an empty one trusts nobody (and is false). A proxy appends the address of whoever connected to
    it, so the client is the right-most address in the header that is not itself a trusted proxy;
    everything to its left was written by that client and is never believed.
    """

    def __init__(self, spec: str) -> None:
        self.networks = tuple(
            ipaddress.ip_network(item.strip(), strict=False) for item in spec.split(",") if item.strip()
        )
        # Peer hosts already classified; bounded because it is keyed by client addresses.
        self._known: dict[str, bool] = {}

    @staticmethod
    def check(spec: str) -> str | None:
        """The first entry of ``spec`` that is not an address or network, or None."""
        for item in spec.split(","):
            if item.strip():
                try:
                    ipaddress.ip_network(item.strip(), strict=False)
                except ValueError:
                    return item.strip()
        return None

    def __bool__(self) -> bool:
        return bool(self.networks)

    def trusts(self, host: str) -> bool:
        if not self.networks:
            return False  # the default: nothing to parse or remember per connection
        known = self._known.get(host)
        if known is None:
            try:
                address = ipaddress.ip_address(host.split("%", 1)[0])
            except ValueError:
                known = False
            else:
                if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
                    address = address.ipv4_mapped
                known = any(address in network for network in self.networks)
            if len(self._known) >= MAX_TRACKED_ADDRESSES:
                self._known.clear()
            self._known[host] = known
        return known

    def client(self, peer: str, forwarded_for: str) -> str:
        """The client's host for a request from ``peer`` carrying ``forwarded_for`` (the
        ``X-Forwarded-For`` values joined by commas): ``peer`` itself unless it is trusted."""
        if not self.trusts(peer):
            return peer
        client = peer
        for raw in reversed(forwarded_for.split(",")):
            hop = raw.strip()
            try:
                ipaddress.ip_address(hop.split("%", 1)[0])
            except ValueError:
                return client  # not an address: no proxy of ours wrote it; stop at the last known hop
            client = hop
            if not self.trusts(hop):
                return hop
        return client
