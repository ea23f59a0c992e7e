"""When to try again, and how long to wait: the retry rules of the REST client and the stream.

Pure: no asyncio, no clock, no I/O. Callers measure time themselves and pass it in (how long a
connection stayed up, how long is left before a deadline), and the random source is injectable.

- `delays()`: capped exponential backoff with jitter, each delay drawn between half and all of
  the current step (the REST client from 0.2 s up to 5 s, the stream from 0.5 s up to 30 s, the
  daemon's reconcile after a subscribe from 1 s up to 10 s).
- `classify()` / `decide()`: what a failed REST request means (docs/protocol.md §6.3).
  A 429 was refused at the gate, so it is retried after `Retry-After` (even a `/say`: nothing
  happened); a 401 logs in again once; 5xx and no answer are retried within the deadline, but
  only when resending is safe — a `/say` that may have reached the server is never sent again,
  or the caller would hear it twice. Everything else is final.
- `classify_connect()` / `Reconnects`: what a failed WebSocket connection means, and the delay
  before the next attempt; the stream never gives up, and starts its backoff over after a
  subscription that was ready for a healthy while.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Literal

Uniform = Callable[[float, float], float]  # random.uniform, or a stand-in in tests

REST_BASE_S = 0.2
REST_CAP_S = 5.0
RETRY_AFTER_MAX_S = 60.0  # a longer Retry-After is capped: the deadline decides anyway
RECONNECT_BASE_S = 0.5
RECONNECT_CAP_S = 30.0  # websockets' own cap is 90 s: too long for calls
# A subscription that was ready this long proved the server up: a drop after it is a new
# incident, retried from the base. Measured over a minute (or even 5 s), a few drops close
# together (a rolling restart of VoIPBIN's pods, a flaky NAT; the soak's faults) grow the delay
# to 7 s and more while every connection is accepted at once, and callers go unanswered while
# the stream is down. A server that closes each subscription within a second still backs off.
HEALTHY_AFTER_S = 1.0
SLOW_FLOOR_S = 5.0  # refused (403, 429, 5xx, login failed): wait at least this long
# A reconcile whose GET /calls failed is tried again while the stream stays up: a call answered
# while the stream was down is found by nothing else, and its caller hears silence meanwhile.
# Each attempt already retries for the request's deadline, so the pause between them stays
# short; one GET a try costs little of the budget.
RECONCILE_BASE_S = 1.0
RECONCILE_CAP_S = 10.0

Verdict = Literal["retry", "reauth", "rate_limited", "fatal"]
ConnectVerdict = Literal["retry", "reauth", "slow"]


def delays(
    base: float = REST_BASE_S, cap: float = REST_CAP_S, uniform: Uniform = random.uniform
) -> Iterator[float]:
    """Delays to sleep between attempts: a step doubling from `base` up to `cap`, each delay
    drawn by `uniform` between half the step and the whole step."""
    if base < 0 or cap < 0:
        raise ValueError("backoff bounds must not be negative")
    return _doubling(min(base, cap), cap, uniform)


def _doubling(step: float, cap: float, uniform: Uniform) -> Iterator[float]:
    while True:
        yield uniform(step / 2, step)
        step = min(cap, step * 2)


# ---- REST requests ------------------------------------------------------------------------------


def classify(
    status: int, *, idempotent: bool, reached: bool = True, relogged: bool = False
) -> Verdict:
    """What a failed request means. `status` 0 = no answer (a connection error or a timeout);
    `reached` = the request may have reached the server (false only when it never connected);
    `relogged` = this request has already logged in again once."""
    if status == 401 and not relogged:
        return "reauth"
    if status == 429:
        return "rate_limited"  # refused at the gate: nothing happened, resending is safe
    if status == 0 or status >= 500:
        # the server may have acted on it: only an idempotent request may go again
        return "retry" if idempotent or not reached else "fatal"
    return "fatal"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the request loop does next: `retry` / `rate_limited` after `wait_s`, `reauth` at
    once, or `fatal` (raise). `hold_s` (a 429) holds the whole REST budget, even when giving up."""

    verdict: Verdict
    wait_s: float = 0.0
    hold_s: float = 0.0


def decide(
    verdict: Verdict, *, remaining_s: float, retry_after: float | None, backoff: Iterator[float]
) -> Decision:
    """The next step after `verdict`, `remaining_s` before the request's deadline. Takes a delay
    from `backoff` only when one is needed (a retry, or a 429 without `Retry-After`)."""
    if verdict == "retry":
        if remaining_s <= 0:
            return Decision("fatal")
        return Decision("retry", wait_s=min(next(backoff), remaining_s))
    if verdict == "rate_limited":
        wait = retry_after if retry_after is not None else next(backoff)
        return Decision("rate_limited" if wait < remaining_s else "fatal", wait, hold_s=wait)
    return Decision(verdict)


def parse_retry_after(value: str | None) -> float | None:
    """A `Retry-After` in seconds, within 0 to 60 s; None if absent or not a number (an HTTP date
    is not used by VoIPBIN)."""
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        return None
    return min(max(seconds, 0.0), RETRY_AFTER_MAX_S) if math.isfinite(seconds) else None


# ---- the WebSocket ------------------------------------------------------------------------------


def classify_connect(status: int | None) -> ConnectVerdict:
    """What a failed connection means, by the HTTP status it failed with (None: no status, a
    network error or a dropped connection): log in again, back off longer, or just retry."""
    if status is None:
        return "retry"
    if status == 401:
        return "reauth"
    if status in (403, 429) or status >= 500:
        return "slow"
    return "retry"


@dataclass
class Reconnects:
    """The delay before each reconnect: `delays(base, cap)`, started over after a subscription
    that was ready longer than `healthy_after_s`, and at least `slow_floor_s` (within the cap)
    after a refusal."""

    base: float = RECONNECT_BASE_S
    cap: float = RECONNECT_CAP_S
    healthy_after_s: float = HEALTHY_AFTER_S
    slow_floor_s: float = SLOW_FLOOR_S
    uniform: Uniform = random.uniform
    _delays: Iterator[float] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._delays = delays(self.base, self.cap, self.uniform)

    def next_delay(self, up_for_s: float, verdict: ConnectVerdict = "retry") -> float:
        """The wait before the next attempt, after one that was ready `up_for_s` (0 if it never
        was) and ended so."""
        if up_for_s > self.healthy_after_s:
            self._delays = delays(self.base, self.cap, self.uniform)
        delay = next(self._delays)
        if verdict == "slow":
            delay = max(delay, min(self.cap, self.slow_floor_s))
        return delay
