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

    Frame-level knobs (``duplicate_rate``, ``lose_rate``, ``reorder``, ``jitter_s``) apply per
    frame per connection, using a seedable random generator.
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
        #: Each frame (each copy of a duplicate too) reaches each connection up to this many
        #: seconds late, drawn apart: events published closer together than that arrive in any
        #: order, a ``call_hangup`` before the ``call_updated`` published ahead of it. The
        #: server's order is no better: ``notifyhandler/publish.go`` publishes each event from
        #: its own goroutine, webhook-manager relays them with 10 workers, and the api-manager
        #: hands each one to a goroutine of its own (``subscribehandler/main.go``
        #: ``processEventRun``). ``reorder`` only swaps neighbours; this reaches further.
        self.jitter_s = 0.0
        self.rng = random.Random()
        self._fails: list[FailRule] = []
        self._delays: list[DelayRule] = []
        self.held = 0  # requests a delay rule has held so far (they reached the server)
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

    def heal(self) -> None:
        """Forget every failure still pending: the service answers normally again."""
        self._fails.clear()

    def delay(self, method: str, path_regex: str, seconds: float, count: int = 1) -> None:
        """Hold the next ``count`` matching requests for ``seconds``."""
        self._delays.append(DelayRule(method.upper(), re.compile(path_regex), count, seconds))

    def refuse_ws(self, status: int = 503, count: int = 1) -> None:
        """Refuse the next ``count`` WebSocket upgrades with ``status``."""
        self._refuse.append((status, count))

    def accept_ws(self) -> None:
        """Forget the refusals still pending: the next WebSocket upgrade is accepted."""
        self._refuse.clear()

    async def send_raw(self, frame: str | bytes) -> None:
        """Send ``frame`` verbatim (``str`` as text, ``bytes`` as binary) to every WS client."""
        await self._send_raw(frame)

    # -- TTS faults (tts.py) --------------------------------------------------------------------

    def kill_tts_pod(self, speaking_id: str | None = None, *, call_id: str | None = None) -> str:
        """The tts-manager pod owning a speaking (by id, or the call's newest one) dies.

        Its sessions fall silent and their rows stay ``active`` (billed, counted by
        :meth:`Simulator.leaks` once the call ends); say/flush/stop on them answer 503 after the
        gateway's budget, then 500 while its breaker is open; a new ``POST /speakings`` for the
        call answers 500 until the row is deleted (see :meth:`agentd.sim.tts.Tts.kill_pod`).
        Returns the pod's name.
        """
        speakings = self._speech.world.speakings
        if speaking_id is None:
            if call_id is None:
                raise ValueError("kill_tts_pod needs a speaking_id or a call_id")
            speaking_id = max(
                self._speech.world.speakings_of(call_id), key=lambda s: s.tm_create
            ).id
        pod = speakings[speaking_id].pod_id
        self._speech.tts.kill_pod(pod)
        return pod

    # -- STT faults (stt.py) --------------------------------------------------------------------

    def deafen_stt(self, call_id: str) -> list[str]:
        """The call's progressing transcribes publish nothing more and stay ``progressing``
        (the silent failure Google's 5-minute limit also causes); returns their ids."""
        return self._speech.stt.deafen_call(call_id)

    def deafen_transcribe(self, transcribe_id: str) -> None:
        """As :meth:`deafen_stt`, for one transcribe."""
        self._speech.stt.deafen(self._speech.world.transcribes[transcribe_id])

    def stt_provider_down(self, provider: str) -> None:
        """``provider`` (``gcp``/``aws``) fails to start: new transcribes that ask for it run on
        the other one, and still report the one they asked for (``streaminghandler/start.go``
        ``runSTT``); with both down they hear nothing."""
        self._speech.stt.providers_down.add(provider)

    def stt_provider_up(self, provider: str) -> None:
        """Undo :meth:`stt_provider_down` (for transcribes started from now on)."""
        self._speech.stt.providers_down.discard(provider)

    def fail_stt_hangup_end(self, count: int = 1) -> None:
        """The next ``count`` call hangups fail to end their calls' transcribes: those stay
        ``progressing`` (hearing nothing) until a client stops them, and count as leaks
        (``transcribehandler/event.go`` ``EventCMCallHangup`` only logs a failed ``Stop``; see
        :meth:`agentd.sim.stt.Stt.on_call_hangup`)."""
        self._speech.stt.hangup_end_failures += count

    def orphan_stt(self, call_id: str | None = None) -> list[str]:
        """The transcribe manager's pod restarts: the progressing transcribes (of ``call_id``, or
        all) hear nothing, stay ``progressing`` and make a new ``POST /transcribes`` for the same
        call and language answer 409; ``/stop`` or ``DELETE`` clears them. Returns their ids."""
        return self._speech.stt.orphan(call_id)

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
                self.held += 1
                return rule.seconds
        return 0.0

    def take_refuse_ws(self) -> int | None:
        """Status to refuse this upgrade with, if a ``refuse_ws`` is pending."""
        for i, (status, remaining) in enumerate(self._refuse):
            if remaining > 0:
                self._refuse[i] = (status, remaining - 1)
                return status
        return None

    def lateness(self) -> float:
        """Seconds the next frame is held before it reaches its connection (``jitter_s``)."""
        return self.rng.uniform(0.0, self.jitter_s) if self.jitter_s > 0 else 0.0

    def copies(self) -> int:
        """How many times to send the next frame: 0 (lost), 1, or 2 (duplicated)."""
        if self.lose_rate > 0 and self.rng.random() < self.lose_rate:
            return 0
        if self.duplicate_rate > 0 and self.rng.random() < self.duplicate_rate:
            return 2
        return 1
