"""Per-customer token bucket (the server's ``v1_customer`` tier: 17/s, burst 33)."""

from __future__ import annotations

import math
import time


class TokenBucket:
    """A classic token bucket on the monotonic clock."""

    def __init__(self, rate_per_s: float, burst: int) -> None:
        self.rate = rate_per_s
        self.burst = float(burst)
        self._tokens = float(burst)
        self._t = time.monotonic()

    def take(self) -> float:
        """Take one token: ``0.0`` when allowed, else seconds until one is available."""
        now = time.monotonic()
        self._tokens = min(self.burst, self._tokens + (now - self._t) * self.rate)
        self._t = now
        if self._tokens >= 1.0:
            self._tokens -= 1.0
            return 0.0
        return (1.0 - self._tokens) / self.rate if self.rate > 0 else math.inf


def retry_after_header(wait_s: float) -> str:
    """``Retry-After`` value: whole seconds, rounded up, at least 1."""
    if math.isinf(wait_s):
        return "60"
    return str(max(1, math.ceil(wait_s)))
