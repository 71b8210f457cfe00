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
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kmsenv.errors import KmsError

__all__ = ["RateLimiter", "Throttled"]

#: Buckets of AccessKeys idle this long are dropped (a full bucket is the same as none).
_FORGET_AFTER_S = 60.0


class Throttled(KmsError):
    """``Rejected.Throttling``, with the seconds after which a retry would be let through."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(
            "Rejected.Throttling",
            f"QPS Limit Exceeded: this AccessKey sends more requests than the server allows; "
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
