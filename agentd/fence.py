"""Fencing: a replica that lost a call's lease never sends another request for that call.

The executor runs each call's REST commands inside `guarded(allowed)`, where `allowed()` says
whether this replica still holds the call's lease. `VoipbinClient.request` calls `check()` after
it has its rate-limit token and before every attempt: a request that waited in the queue (or a
process that was paused) while the lease ran out is never sent. One context variable read per
request; nothing at all when no guard is set (one agentd on SQLite).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

__all__ = ["Fenced", "check", "guarded"]

_allowed: ContextVar[Callable[[], bool] | None] = ContextVar("agentd_fence", default=None)


class Fenced(Exception):
    """The request was not sent: this replica no longer holds the call's lease."""


@contextmanager
def guarded(allowed: Callable[[], bool]) -> Iterator[None]:
    """Requests made inside the block are sent only while `allowed()` holds."""
    token = _allowed.set(allowed)
    try:
        yield
    finally:
        _allowed.reset(token)


def check() -> None:
    """Raise `Fenced` if the current block's guard says no."""
    allowed = _allowed.get()
    if allowed is not None and not allowed():
        raise Fenced
