"""Fault injection: failed/delayed requests, refused upgrades, dropped/lost/duplicated frames."""

from __future__ import annotations

import random
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from agentd.sim.speech import Speech


@dataclass
class _Rule:
    method: str
    pattern: re.Pattern[str]
    remaining: int

    def take(self, method: str, path: str) -> bool:
        if self.remaining <= 0 or method.upper() != self.method or not self.pattern.search(path):
            return False
        self.remaining -= 1
        return True


@dataclass
class FailRule(_Rule):
    """Answer matching requests with ``status`` (the handler runs first when ``apply``)."""

    status: int = 500
    retry_after: float | None = None
    apply: bool = False


@dataclass
class DelayRule(_Rule):
    """Hold matching requests for ``seconds`` before serving them."""

    seconds: float = 0.0


class Faults:
    """Knobs a test turns to make the simulator misbehave like the real service can.

    Frame-level knobs (``duplicate_rate``, ``lose_rate``, ``reorder``) apply per frame per
    connection, using a seedable random generator.
    """

    def __init__(
        self,
        drop_websockets: Callable[[], None],
        expire_tokens: Callable[[], None],
        send_raw: Callable[[str | bytes], Awaitable[None]],
        speech: Speech,
    ) -> None:
        self._speech = speech
        self._drop = drop_websockets
        self._expire = expire_tokens
        self._send_raw = send_raw
        self.duplicate_rate = 0.0
        self.lose_rate = 0.0
        self.reorder = False
        self.rng = random.Random()
        self._fails: list[FailRule] = []
        self._delays: list[DelayRule] = []
        self._refuse: list[tuple[int, int]] = []  # [(status, remaining)]

    def seed(self, n: int) -> None:
        """Make the frame-level randomness deterministic."""
        self.rng.seed(n)

    def drop_websockets(self) -> None:
        """Abrupt TCP close of every WebSocket connection (no close frame: clients see 1006)."""
        self._drop()

    def expire_tokens(self) -> None:
        """Refuse every JWT issued so far (401); open WebSockets stay open, as on the service."""
        self._expire()

    def fail(
        self,
        method: str,
        path_regex: str,
        status: int,
        count: int = 1,
        retry_after: float | None = None,
        *,
        apply: bool = False,
    ) -> None:
        """The next ``count`` matching requests get ``status`` in the error envelope.

        ``retry_after`` sets the ``Retry-After`` header (a 429 always has one). With
        ``apply=True`` the request takes effect before the error is returned (a request that
        "may have reached the server").
        """
        self._fails.append(
            FailRule(method.upper(), re.compile(path_regex), count, status, retry_after, apply)
        )

    def delay(self, method: str, path_regex: str, seconds: float, count: int = 1) -> None:
        """Hold the next ``count`` matching requests for ``seconds``."""
        self._delays.append(DelayRule(method.upper(), re.compile(path_regex), count, seconds))

    def refuse_ws(self, status: int = 503, count: int = 1) -> None:
        """Refuse the next ``count`` WebSocket upgrades with ``status``."""
        self._refuse.append((status, count))

    async def send_raw(self, frame: str | bytes) -> None:
        """Send ``frame`` verbatim (``str`` as text, ``bytes`` as binary) to every WS client."""
        await self._send_raw(frame)

    # -- TTS faults (tts.py) --------------------------------------------------------------------

    # -- STT faults (stt.py) --------------------------------------------------------------------

    # -- used by the server ---------------------------------------------------------------------

    def take_fail(self, method: str, path: str) -> FailRule | None:
        """The fail rule consumed by this request, if any."""
        for rule in self._fails:
            if rule.take(method, path):
                return rule
        return None

    def take_delay(self, method: str, path: str) -> float:
        """Seconds to hold this request (0 when no rule matches)."""
        for rule in self._delays:
            if rule.take(method, path):
                return rule.seconds
        return 0.0

    def take_refuse_ws(self) -> int | None:
        """Status to refuse this upgrade with, if a ``refuse_ws`` is pending."""
        for i, (status, remaining) in enumerate(self._refuse):
            if remaining > 0:
                self._refuse[i] = (status, remaining - 1)
                return status
        return None

    def copies(self) -> int:
        """How many times to send the next frame: 0 (lost), 1, or 2 (duplicated)."""
        if self.lose_rate > 0 and self.rng.random() < self.lose_rate:
            return 0
        if self.duplicate_rate > 0 and self.rng.random() < self.duplicate_rate:
            return 2
        return 1
