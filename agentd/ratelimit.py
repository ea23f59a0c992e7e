"""A priority-aware token bucket for VoIPBIN's per-customer REST budget (17 req/s, burst 33).

Every call shares one budget, so when requests must wait, the ones a caller would notice go first:
stop, flush and say before session starts before polls and reconciliation.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import time
from collections.abc import Callable

URGENT = 0  # say, flush, stop, hangup
SETUP = 1  # session starts
BACKGROUND = 2  # polls, reconciliation, lookups

# VoIPBIN's own limit: every agent and access key of a customer share one Redis-backed GCRA
# bucket of round(16.7) = 17 requests/s, burst 33 (bin-api-manager customer_ratelimit.go).
VOIPBIN_RATE_PER_S = 17.0
VOIPBIN_BURST = 33
# The daemon's default stays below it. Our bucket and VoIPBIN's run on different clocks, and
# requests we space evenly can reach VoIPBIN bunched up by network jitter; and the daemon is not
# the account's only client: `agentd call --wait`, `check-config` and an operator's curl spend
# the same budget. 15/s and 28 leave 2/s and 5 requests of the burst for all of that.
DEFAULT_RATE_PER_S = 15.0
DEFAULT_BURST = 28
# What a command line tool takes of that headroom while a daemon runs beside it (1/s, 3), so
# daemon and tool together stay at 16/s and 31 with room for an operator's request.
TOOL_RATE_PER_S = 1.0
TOOL_BURST = 3


def tool_budget(rate_per_s: float, burst: float) -> tuple[float, float]:
    """The (rate, burst) a CLI command uses beside a daemon configured with `rate_per_s` and
    `burst`: the tool's share, never more than the daemon's own; off when the budget is off."""
    if rate_per_s <= 0:
        return 0.0, 0.0
    return min(TOOL_RATE_PER_S, rate_per_s), min(float(TOOL_BURST), burst)


class RateLimiter:
    """Token bucket whose waiters are served by priority, then in arrival order."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = max(1.0, burst)
        self._clock = clock
        self._tokens = self.burst
        self._stamp = clock()
        self._waiting: list[tuple[int, int]] = []
        self._seq = itertools.count()
        self._changed = asyncio.Event()

    @property
    def queue_depth(self) -> int:
        """Requests waiting for a token now."""
        return len(self._waiting)

    def _refill(self) -> None:
        now = self._clock()
        self._tokens = min(self.burst, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def set_budget(self, rate: float, burst: float) -> None:
        """Change the budget (replicas re-split the account's as they come and go)."""
        self._refill()
        self.rate = rate
        self.burst = max(1.0, burst)
        self._tokens = min(self._tokens, self.burst)
        self._wake()

    def penalise(self, seconds: float) -> None:
        """The server said 429: spend the budget so nothing more is sent for `seconds`."""
        if self.rate > 0:
            self._refill()
            self._tokens = min(self._tokens, -seconds * self.rate + 1)

    async def acquire(self, priority: int = BACKGROUND) -> None:
        """Wait for a token."""
        if self.rate <= 0:
            return
        entry = (priority, next(self._seq))
        heapq.heappush(self._waiting, entry)
        try:
            while True:
                self._refill()
                if self._waiting[0] == entry and self._tokens >= 1:
                    heapq.heappop(self._waiting)
                    self._tokens -= 1
                    self._wake()
                    return
                delay = max((1 - self._tokens) / self.rate, 0.0005)
                changed = self._changed
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), delay)
        except BaseException:
            if entry in self._waiting:
                self._waiting.remove(entry)
                heapq.heapify(self._waiting)
                self._wake()
            raise

    def _wake(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
