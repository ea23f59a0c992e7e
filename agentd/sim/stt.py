"""Speech-to-text on a call: transcribes, the caller's speech events and final transcripts.

As the transcribe manager makes them (``voipbin/monorepo`` ``bin-transcribe-manager``):

* **Speech events come from the STT's results** (``pkg/streaminghandler/result.go``,
  ``resultProcessor.process``, PR #525): ``transcribe_speech_started`` is published with the
  first interim of an utterance, never before it; every interim is a ``_speech_interim``; the
  final result publishes ``_speech_ended`` and right after it the transcript. The final comes
  ``stt_final_delay_s`` (``stt_final_delay_gcp_s`` for Google) after the caller stops.
* **Split finals**: an utterance of several sentences arrives as up to 3 finals, each with its
  own started/interims/ended/transcript (:func:`split_finals`, :func:`schedule`).
* **Silent failures**: a transcribe can stay ``progressing`` and publish nothing more: Google's
  stream ends after ~5 minutes (``gcp_deaf_after_s``), a fault deafens it, or its pod restarted
  (an orphan). A provider that cannot start is replaced by another without a word
  (``pkg/streaminghandler/start.go`` ``runSTT``).
"""

from __future__ import annotations

import asyncio
import collections
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from agentd.sim.clock import go_now_nano
from agentd.sim.model import JSON, Line, SimCall, SimTranscribe, SimTranscript, new_id
from agentd.sim.state import World

Direction = Literal["in", "out"]

#: At most this many finals per utterance; further sentences join the last one.
MAX_FINALS = 3
#: The server's fallback order after the requested provider (``start.go``
#: ``defaultProviderOrder``); an empty ``provider`` uses just this order.
PROVIDER_ORDER = ("gcp", "aws")
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*$")


_SUBTAGS = re.compile(r"[A-Za-z]{2,3}(?:[-_][A-Za-z0-9]{1,8})*")


def _subtag(sub: str) -> str:
    if len(sub) == 4 and sub.isalpha():
        return sub[0].upper() + sub[1:].lower()  # a script
    if (len(sub) == 2 and sub.isalpha()) or (len(sub) == 3 and sub.isdigit()):
        return sub.upper()  # a region
    return sub.lower()


def bcp47(language: str) -> str:
    """A transcribe's language as the server keeps it: ``getBCP47LanguageCode``
    (``transcribehandler/main.go``) prints golang.org/x/text's ``language.BCP47.Make``, and
    what does not parse (``und``) becomes ``en-US``. Case and separator only: the tags the
    tests use need no deprecated-subtag table."""
    if not _SUBTAGS.fullmatch(language):
        return "en-US"
    head, *tail = re.split(r"[-_]", language)
    return "-".join([head.lower(), *map(_subtag, tail)])


def split_finals(text: str) -> list[str]:
    """The final transcripts ``text`` arrives as: one per sentence, at most :data:`MAX_FINALS`.

    A sentence ends with a word ending in ``.``, ``!`` or ``?``; a single sentence stays one
    final. Deterministic, so tests can predict the split.
    """
    parts: list[list[str]] = [[]]
    for word in text.split():
        parts[-1].append(word)
        if _SENTENCE_END.search(word):
            parts.append([])
    parts = [p for p in parts if p]
    if len(parts) > MAX_FINALS:
        head, tail = parts[: MAX_FINALS - 1], parts[MAX_FINALS - 1 :]
        parts = [*head, [w for p in tail for w in p]]
    return [" ".join(p) for p in parts]


@dataclass(frozen=True)
class SttResult:
    """One result of the STT provider: an interim (words so far) or a final, due at ``at``."""

    at: float
    final: bool
    message: str


def schedule(
    times: Sequence[float],
    parts: Sequence[Sequence[str]],
    final_delay: float,
    gap: float,
    after: float | None = None,
) -> list[tuple[int, SttResult]]:
    """When the STT reports each part of an utterance: ``(word index, result)`` in order.

    ``times[i]`` is when word ``i`` has been said, and the word index tells which word makes the
    result known. Each word gives an interim at its time; the last part's final comes
    ``final_delay`` after the last word, and an earlier part's final at most ``final_delay``
    after its own last word; finals are at least ``gap`` apart (a part too short for that
    pushes the next final later). The STT reports in order: interims of a part said before the
    previous final (``after`` is the previous utterance's) are held back and spread between
    that final and the next word.
    """
    ends: list[float] = []
    count = 0
    for part in parts:
        count += len(part)
        ends.append(times[count - 1])
    finals = [0.0] * len(parts)
    if parts:
        finals[-1] = ends[-1] + final_delay
    for k in range(len(parts) - 2, -1, -1):
        finals[k] = max(ends[k], min(ends[k] + final_delay, finals[k + 1] - gap))
    for k in range(1, len(parts)):
        # A final clamped to its own last word may sit too close to the next: push that one.
        finals[k] = max(finals[k], finals[k - 1] + gap)
    out: list[tuple[int, SttResult]] = []
    first = 0
    prev = after
    for k, part in enumerate(parts):
        final_at = finals[k] if prev is None else max(finals[k], prev)
        part_times = times[first : first + len(part)]
        held = 0 if prev is None else sum(1 for t in part_times if t < prev)
        release = part_times[held] if held < len(part) else final_at
        for j, t in enumerate(part_times):
            at = t
            if prev is not None and j < held:
                at = prev + (release - prev) * (j + 1) / (held + 1)
            out.append((first + j, SttResult(at, False, " ".join(part[: j + 1]))))
        first += len(part)
        out.append((first - 1, SttResult(final_at, True, " ".join(part))))
        prev = final_at
    return out


class _Stream:
    """One direction of one transcribe: the server's ``resultProcessor`` (``result.go``).

    Results are processed one at a time in the order they were pushed, each not before its
    time, as the provider's result stream delivers them.
    """

    def __init__(self, stt: Stt, trn: SimTranscribe, direction: Direction) -> None:
        self.stt = stt
        self.trn = trn
        self.direction: Direction = direction
        self.queue: collections.deque[SttResult] = collections.deque()
        self.speaking = False
        #: Due time of the last final pushed (later speech is reported after it).
        self.last_final: float | None = None
        self.task: asyncio.Task[None] | None = None

    def push(self, result: SttResult) -> None:
        self.queue.append(result)
        if result.final:
            self.last_final = result.at
        if self.task is None or self.task.done():
            self.task = self.stt.world.spawn(
                self._run(), name=f"sim-stt-{self.trn.id}-{self.direction}"
            )

    async def _run(self) -> None:
        while self.queue:
            delay = self.queue[0].at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            self.process(self.queue.popleft())

    def process(self, result: SttResult) -> None:
        """``resultProcessor.process``: started with the first interim, ended with the final."""
        if not self.stt.live(self.trn):
            return
        if not result.final:
            if not self.speaking:
                self.speaking = True
                self.stt.speech_event(self, "transcribe_speech_started", None)
            self.stt.speech_event(self, "transcribe_speech_interim", result.message)
            return
        if self.speaking:
            self.speaking = False
            self.stt.speech_event(self, "transcribe_speech_ended", None)
        if result.message:
            self.stt.transcript(self.trn, self.direction, result.message)


class Stt:
    """The transcribe manager's behaviour on top of the shared :class:`World`."""

    def __init__(self, world: World) -> None:
        self.world = world
        self._streams: dict[tuple[str, Direction], _Stream] = {}
        #: Providers that fail to start (fault): new transcribes fall back to another.
        self.providers_down: set[str] = set()
        #: Hangups whose own stop of the call's transcribes fails (fault), see on_call_hangup.
        self.hangup_end_failures = 0

    # -- lifecycle ---------------------------------------------------------------------------------

    def engine_for(self, requested: str) -> str:
        """The provider that ends up transcribing (``start.go`` ``runSTT``): the requested one
        if it starts, else the first of :data:`PROVIDER_ORDER` that does; ``""`` if none."""
        order = ([requested] if requested in PROVIDER_ORDER else []) + list(PROVIDER_ORDER)
        return next((p for p in order if p not in self.providers_down), "")

    def start_transcribe(
        self, call: SimCall, language: str, direction: str, provider: str
    ) -> SimTranscribe:
        """Create a ``progressing`` transcribe on ``call`` and publish ``transcribe_created``.

        The resource reports the requested ``provider`` even when another one runs: the server
        stores what was asked (``transcribehandler/transcribe.go`` ``Create``) and picks the
        provider later, in a goroutine (``start.go`` ``runSTT``). With none able to start it
        still answers 200 and hears nothing.
        """
        engine = self.engine_for(provider)
        trn = SimTranscribe(
            id=new_id(),
            customer_id=self.world.customer_id,
            reference_type="call",
            reference_id=call.id,
            language=language,
            direction=direction,
            provider=provider,
            tm_create=self.world.clock.now(),
            t_start=time.monotonic(),
            # Production measurement: a transcribe made before the answer never hears anything.
            deaf=call.status != "progressing" or not engine,
            engine=engine,
        )
        self.world.transcribes[trn.id] = trn
        self.world.emit("transcribe_created", trn.to_json())
        return trn

    def stop_transcribe(self, trn: SimTranscribe) -> None:
        """``progressing`` -> ``done`` with ``transcribe_done`` (idempotent).

        An orphan stops like any other (``transcribehandler/stop.go`` ``stopLive``): its
        streams are unknown to the pod that takes the request (``streaminghandler/stop.go``
        ``Get`` -> ``STREAMING_NOT_FOUND``), which it logs as "consider already stopped" before
        setting ``done``.
        """
        for direction in ("in", "out"):
            self._streams.pop((trn.id, direction), None)
        if trn.status != "progressing":
            return
        trn.status = "done"
        trn.tm_update = self.world.clock.now()
        self.world.emit("transcribe_done", trn.to_json())

    def delete_transcribe(self, trn: SimTranscribe) -> None:
        """``DELETE /transcribes/{id}`` (``transcribehandler/transcribe.go`` ``Delete``).

        Already deleted: unchanged. Otherwise a progressing one is stopped first (so an orphan
        is cleared as by ``/stop``), its transcripts and then the transcribe are soft-deleted
        (``tm_update`` = ``tm_delete``). ``transcribe_deleted`` is published with
        ``PublishEvent`` only (``db.go`` ``dbDelete``): it never reaches the WebSocket.
        """
        if trn.tm_delete is not None:
            return
        self.stop_transcribe(trn)
        now = self.world.clock.now()
        for tsc in self.world.transcripts.values():
            if tsc.transcribe_id == trn.id and tsc.tm_delete is None:
                tsc.tm_delete = now
        trn.tm_delete = now
        trn.tm_update = now
        self.world.notify()

    def on_call_hangup(self, call: SimCall) -> None:
        """The call is gone: its transcribes end by themselves, ``done`` and ``transcribe_done``.

        The transcribe manager subscribes to the call manager's events and, on ``call_hangup``
        (``pkg/subscribehandler/call_manager.go`` ``processEventCMCallHangup``), stops every
        transcribe whose ``reference_id`` is the call (``pkg/transcribehandler/event.go``
        ``EventCMCallHangup`` -> ``stop.go`` ``Stop``/``stopLive``: an already ``done`` one is left
        as it is). Whichever pod takes the event does it, so orphans end too. It runs after the
        call manager has published ``call_hangup``, so ``transcribe_done`` follows it; the
        milliseconds its database work and one internal request take are not modelled.

        With the :meth:`~agentd.sim.faults.Faults.fail_stt_hangup_end` fault that stop fails:
        the handler only logs errors (``EventCMCallHangup`` ``continue``s past a failed ``Stop``,
        and ``subscribehandler/main.go`` ``processEventRun`` acks the event whatever happened, so
        it is never redelivered). The transcribe then stays ``progressing`` for good; its STT
        stream has ended with the channel all the same (the snoop's external-media channel is
        hung up, ``bin-call-manager/pkg/callhandler/bridge.go`` ``bridgeLeftExternal``, and
        ``streaminghandler/aws.go`` ``awsProcessMedia`` reads an error), so it hears nothing.
        Only a client's ``/stop`` (or ``DELETE``) ends it then.
        """
        if self.hangup_end_failures > 0:
            self.hangup_end_failures -= 1
            for trn in self.world.transcribes_of(call.id):
                for direction in ("in", "out"):
                    self._streams.pop((trn.id, direction), None)
                trn.deaf = True
            self.world.notify()
            return
        for trn in self.world.transcribes_of(call.id):
            self.stop_transcribe(trn)

    # -- faults ------------------------------------------------------------------------------------

    def deafen(self, trn: SimTranscribe) -> None:
        """From now on ``trn`` publishes nothing; it stays ``progressing``."""
        trn.deaf = True
        self.world.notify()

    def deafen_call(self, call_id: str) -> list[str]:
        """Deafen every progressing transcribe of the call; returns their ids."""
        out = []
        for trn in self.world.transcribes_of(call_id):
            if trn.status == "progressing":
                self.deafen(trn)
                out.append(trn.id)
        return out

    def orphan(self, call_id: str | None = None) -> list[str]:
        """The pod restarted: the progressing transcribes of ``call_id`` (``None``: all of them,
        the service runs one pod) lose their streams and hear nothing; the rows still say
        ``progressing``, so a new one for the same call and language answers 409
        (``transcribehandler/start.go`` ``startLive``). Returns their ids."""
        out = []
        for trn in list(self.world.transcribes.values()):
            if trn.status != "progressing":
                continue
            if call_id is not None and trn.reference_id != call_id:
                continue
            trn.orphaned = True
            for direction in ("in", "out"):
                self._streams.pop((trn.id, direction), None)
            self.deafen(trn)
            out.append(trn.id)
        return out

    # -- hearing -----------------------------------------------------------------------------------

    def live(self, trn: SimTranscribe) -> bool:
        """Whether ``trn`` still publishes: progressing, not deaf, and (Google) younger than
        ``gcp_deaf_after_s``. ``gcp.go`` ``gcpProcessResult`` treats the stream's first ``Recv``
        error as a hangup and returns; nothing reopens the stream or updates the status."""
        if trn.status != "progressing" or trn.deaf:
            return False
        limit = self.world.settings.gcp_deaf_after_s
        if trn.engine == "gcp" and time.monotonic() - trn.t_start >= limit:
            trn.deaf = True
            return False
        return True

    def _hearing(self, call_id: str, direction: Direction) -> list[SimTranscribe]:
        return [
            t
            for t in self.world.transcribes_of(call_id)
            if t.direction in (direction, "both") and self.live(t)
        ]

    def _stream(self, trn: SimTranscribe, direction: Direction) -> _Stream:
        key = (trn.id, direction)
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _Stream(self, trn, direction)
        return stream

    def _final_delay(self, trn: SimTranscribe) -> float:
        settings = self.world.settings
        return settings.stt_final_delay_gcp_s if trn.engine == "gcp" else settings.stt_final_delay_s

    def _plan(
        self,
        stream: _Stream,
        times: list[float],
        parts: list[list[str]],
        first: int,
        settled_as: str | None = None,
    ) -> dict[int, list[SttResult]]:
        """:func:`schedule` for ``stream``, which hears the utterance from word ``first`` on."""
        heard: list[list[str]] = []
        index = 0
        for part in parts:
            kept = [w for i, w in enumerate(part, index) if i >= first]
            index += len(part)
            if kept:
                heard.append(kept)
        plan: dict[int, list[SttResult]] = {}
        results = schedule(
            times[first:],
            heard,
            self._final_delay(stream.trn),
            self.world.settings.stt_split_gap_s,
            stream.last_final,
        )
        if settled_as is not None and results and results[-1][1].final:
            i, last = results[-1]
            results[-1] = (i, SttResult(last.at, True, settled_as))
        for i, result in results:
            plan.setdefault(first + i, []).append(result)
        return plan

    async def caller_says(
        self,
        call: SimCall,
        text: str,
        finals: list[str] | None = None,
        *,
        start: float | None = None,
        settled_as: str | None = None,
    ) -> float:
        """The caller speaks ``text``, one word every ``1 / speech_words_per_s`` seconds.

        Returns when the caller stops talking, with the instant its last word was due; the
        transcribes that hear direction ``in`` report it as :func:`schedule` says, the last final
        ``stt_final_delay_s`` later. ``finals`` forces the split (default :func:`split_finals`).
        A transcribe started mid-utterance hears the rest of it. The conversation records the
        utterance either way. ``start`` (``time.monotonic()``, default now) is when the caller
        started talking: callers given the same one speak in lockstep (the bench's burst),
        whenever their tasks get to run. ``settled_as``: the last final's text, when the STT
        settles the words otherwise than its interims showed them.
        """
        parts = [p.split() for p in (finals if finals is not None else split_finals(text))]
        parts = [p for p in parts if p]
        count = sum(len(p) for p in parts)
        t0 = time.monotonic() if start is None else start
        step = 1.0 / self.world.settings.speech_words_per_s
        times = [t0 + (i + 1) * step for i in range(count)]
        line = Line("caller", text, text, t0)
        call.conversation.append(line)
        self.world.notify()
        plans: dict[str, dict[int, list[SttResult]]] = {}
        try:
            for i, t in enumerate(times):
                delay = t - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                for trn in self._hearing(call.id, "in"):
                    stream = self._stream(trn, "in")
                    plan = plans.get(trn.id)
                    if plan is None:
                        plan = plans[trn.id] = self._plan(stream, times, parts, i, settled_as)
                    for result in plan.get(i, ()):
                        stream.push(result)
        finally:
            line.t_end = time.monotonic()
            self.world.notify()
        return times[-1] if times else t0

    def hear_agent(self, call_id: str, text: str) -> None:
        """The agent's audio, just finished, heard back on an ``out``/``both`` transcribe.

        Its stream reports it like the caller's speech (speech events with ``direction: out``,
        then the final ``stt_final_delay_s`` later); the interims come at once, as the TTS
        reports the audio only when it ends.
        """
        parts = [p.split() for p in split_finals(text)]
        times = [time.monotonic()] * sum(len(p) for p in parts)
        if not times:
            return
        for trn in self._hearing(call_id, "out"):
            stream = self._stream(trn, "out")
            for result in self._plan(stream, times, parts, 0).values():
                for item in result:
                    stream.push(item)

    # -- publishing --------------------------------------------------------------------------------

    def speech_event(self, stream: _Stream, event_type: str, message: str | None) -> None:
        """A ``streaming.Speech`` webhook message (``models/streaming/webhook.go``), timed with
        ``time.Now()`` in nanoseconds (``result.go``: never stored, so never cut to the
        database's microseconds)."""
        trn = stream.trn
        now = go_now_nano()
        payload: JSON = {
            # A fresh id per speech event (``Streaming.NewSpeech``).
            "id": new_id(),
            "customer_id": self.world.customer_id,
            "streaming_id": trn.streaming_in if stream.direction == "in" else trn.streaming_out,
            "transcribe_id": trn.id,
            "direction": stream.direction,
        }
        if message is not None:
            payload["message"] = message
        payload["tm_event"] = now
        payload["tm_create"] = now
        self.world.emit(event_type, payload)

    def transcript(self, trn: SimTranscribe, direction: Direction, text: str) -> None:
        """A final transcript, ``offset_ms`` after the stream started."""
        tsc = SimTranscript(
            id=new_id(),
            customer_id=self.world.customer_id,
            transcribe_id=trn.id,
            direction=direction,
            message=text,
            offset_ms=int((time.monotonic() - trn.t_start) * 1000),
            tm_create=self.world.clock.now(),
            legacy=self.world.settings.legacy_transcripts,
        )
        self.world.transcripts[tsc.id] = tsc
        self.world.emit("transcript_created", tsc.to_json())
