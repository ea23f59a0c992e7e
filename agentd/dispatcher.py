"""The dispatcher: routes each event to its call's state machine and hands the commands on.

Events find their call by call id (call events), by transcribe id (transcripts and speech events,
whose own ids are random) or by reference id (transcribe lifecycle). A transcript can arrive before
the POST /transcribes answer that tells us its transcribe id: such events wait in a small buffer
until the id is known. Calls that are not ours are dropped at once, and calls that ended are
remembered for a while so a late `call_updated` cannot bring one back to life.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable
from typing import Any

from agentd import logs
from agentd.call import Call, CallSettings, Phase
from agentd.commands import CancelTimer, Command, Finished, Result, StartTimer, TranscriptsRead
from agentd.events import (
    CallEvent,
    CallInfo,
    Deduper,
    Event,
    Parsed,
    SpeechEvent,
    TranscribeEvent,
    TranscriptEvent,
)
from agentd.names import normalise_number
from agentd.voipbin import CALL_CAP_S

log = logs.get_logger("agentd.dispatcher")

_KEEP = 10_000  # ids of calls not served (ended, others', foreign) remembered, at most

# a tuple: `A | B` in an isinstance builds a union on every call (per command, per step)
_TIMERS = (StartTimer, CancelTimer)

Execute = Callable[[str, list[Command]], None]
SetTimers = Callable[[str, list[StartTimer | CancelTimer]], None]
OnStep = Callable[[Call, "Event | Result"], None]


class Dispatcher:
    """Owns the live calls; `on_event` for the stream, `feed` for command results."""

    def __init__(
        self,
        settings: Callable[[], CallSettings],
        execute: Execute,
        *,
        numbers: Iterable[str] = (),
        clock: Callable[[], float] = time.monotonic,
        on_step: OnStep | None = None,
        on_finished: Callable[[Call | None, str], None] | None = None,
        set_timers: SetTimers | None = None,
    ) -> None:
        self.on_step = on_step
        #: where a step's timer changes go, shown on its event line rather than a line each
        #: (four a turn: the transcript due and the filler, armed and cancelled); None: they
        #: are executed and logged with the other commands
        self.set_timers = set_timers
        self.on_finished = on_finished
        self.settings = settings
        self.execute = execute
        self.numbers = {normalise_number(n) for n in numbers}
        self.clock = clock
        self.calls: dict[str, Call] = {}
        self.accepting = True
        self._by_transcribe: dict[str, str] = {}
        self._transcribes: dict[str, list[str]] = {}  # call id -> its transcribe ids
        self._ended: OrderedDict[str, None] = OrderedDict()
        # calls another replica serves (or took from us): their events are not ours to act on
        self._foreign: OrderedDict[str, None] = OrderedDict()
        self._foreign_transcribes: OrderedDict[str, None] = OrderedDict()  # of those calls
        # the account's calls that are not ours (other numbers, a flow's legs) and their
        # transcribes: their speech must not fill the orphans' buffer and push ours out
        self._others: OrderedDict[str, None] = OrderedDict()
        self._others_transcribes: OrderedDict[str, None] = OrderedDict()
        # of those, the calls not ours by their numbers and not known to be over: when each
        # was first seen, and its numbers (`left_to_others`)
        self._left: OrderedDict[str, tuple[float, frozenset[str]]] = OrderedDict()
        self._orphans: deque[tuple[float, TranscriptEvent | SpeechEvent]] = deque(maxlen=256)
        self.dedupe = Deduper()
        self.counters: dict[str, int] = {
            "events": 0,
            "duplicates": 0,
            "ignored": 0,
            "calls": 0,
            "failed": 0,
            "foreign": 0,
        }
        self.last_event_at: float | None = None
        self._idle: asyncio.Event | None = None
        self._waiters: list[tuple[Callable[[], bool], asyncio.Future[None]]] = []

    # ---- input ---------------------------------------------------------------------------

    def on_parsed(self, parsed: Parsed) -> None:
        """A frame from the stream: drop duplicates, then route."""
        self.counters["events"] += 1
        self.last_event_at = self.clock()
        if self.dedupe.seen(parsed.key):
            self.counters["duplicates"] += 1
            return
        self.on_event(parsed.event)

    def on_event(self, event: Event) -> None:
        """Route one event to its call (creating the call when it is ours and new)."""
        match event:
            case CallEvent(call=info):
                if info.id in self._foreign:
                    self.counters["foreign"] += 1
                    return
                call = self.calls.get(info.id)
                if call is not None and info.master_call_id and call.phase.ringing:
                    self._release(call)
                    return
                call = call or self._adopt(info)
                if call is not None:
                    self._step(call, event)
            case TranscriptEvent() | SpeechEvent():
                call_id = self._by_transcribe.get(event.transcribe_id)
                if call_id is None:
                    if event.transcribe_id in self._foreign_transcribes:
                        self.counters["foreign"] += 1
                    elif event.transcribe_id in self._others_transcribes:
                        self.counters["ignored"] += 1
                    else:
                        self._orphans.append((self.clock(), event))
                elif call_id in self.calls:
                    self._step(self.calls[call_id], event)
            case TranscribeEvent():
                call = self.calls.get(event.reference_id)
                if call is not None:
                    self._step(call, event)
                elif event.reference_id in self._foreign:
                    _keep(self._foreign_transcribes, event.id)
                elif event.reference_id in self._others:
                    _keep(self._others_transcribes, event.id)

    def feed(self, call_id: str, result: Event | Result) -> None:
        """A command's outcome (from the executor) for `call_id`."""
        call = self.calls.get(call_id)
        if call is not None:
            self._step(call, result)

    def unheard_of(self, call_id: str) -> bool:
        """A call never seen here: not served, ended, another's, or left to another replica."""
        return not (
            call_id in self.calls
            or call_id in self._ended
            or call_id in self._others
            or call_id in self._foreign
        )

    def is_ours(self, info: CallInfo) -> bool:
        """Calls to or from one of our numbers (every call when no numbers are configured)."""
        if not self.numbers:
            return True
        return bool(
            {normalise_number(info.source), normalise_number(info.destination)} & self.numbers
        )

    def left_to_others(self) -> int:
        """Live calls left alone when they came that the numbers configured now would take
        (a reload added theirs): they stay left alone, whatever serves them."""
        now = self.clock()
        return sum(
            1
            for seen, numbers in self._left.values()
            if now - seen < CALL_CAP_S and (not self.numbers or numbers & self.numbers)
        )

    def _adopt(self, info: CallInfo) -> Call | None:
        if (
            info.id in self._ended
            # not ours when it came: a reload that makes it ours is for new calls, and a flow
            # of its own may serve this one
            or info.id in self._others
            or info.master_call_id
            or not self.is_ours(info)
        ):
            # a chained leg (the second leg of a `connect` flow, a transferee) has our number
            # as its source, but no caller of ours is on it
            self.counters["ignored"] += 1
            if info.id not in self._ended:
                self._leave(info)
            return None
        if info.status == "hangup":
            # over before we saw it: a `progressing` delivered after it (order is not
            # guaranteed) must not start sessions on a dead call
            self._remember(info.id)
            self.counters["ignored"] += 1
            return None
        if not self.accepting:
            log.warning("call.refused", call_id=info.id, reason="shutting down")
            return None
        call = Call(info.id, self.settings(), direction=info.direction)
        self.calls[info.id] = call
        self.counters["calls"] += 1
        log.info(
            "call.new",
            call_id=info.id,
            direction=info.direction,
            source=info.source,
            destination=info.destination,
            status=info.status,
        )
        return call

    # ---- stepping a call -----------------------------------------------------------------

    def _step(self, call: Call, event: Event | Result) -> None:
        token = logs.bind(call_id=call.id)
        try:
            commands = self._handle(call, event)
        finally:
            logs.unbind(token)
        if self.on_step is not None:
            self.on_step(call, event)
        if self._waiters:
            self._check_waiters()
        known = call.transcribe_id
        if known is not None and self._by_transcribe.get(known) != call.id:
            self._by_transcribe[known] = call.id
            self._transcribes.setdefault(call.id, []).append(known)
            self.execute(call.id, commands)
            self._replay_orphans()
            return
        self.execute(call.id, commands)

    def _handle(self, call: Call, event: Event | Result) -> list[Command]:
        """Step the call. A bug in one call must not stop the others: a call whose handler
        raises is ended cleanly (its sessions stopped) and takes no more events."""
        try:
            commands = call.handle(event, self.clock())
        except Exception as exc:
            log.info("event", **_describe(event))
            log.exception("call.crashed", input=type(event).__name__)
            if call.failed:  # its cleanup failed too: nothing more can be done for it here
                log.error("call.abandoned", sessions=call.speaking_id or call.transcribe_id)
                return [Finished(call.id)]
            self.counters["failed"] += 1
            return call.fail(type(exc).__name__)
        set_timers = self.set_timers
        timers = [c for c in commands if isinstance(c, _TIMERS)] if set_timers else []
        if set_timers is None or not timers:
            log.info("event", **_describe(event))
            return commands
        log.info("event", **_describe(event), **_timer_fields(timers))
        set_timers(call.id, timers)
        return [c for c in commands if not isinstance(c, _TIMERS)]

    def _replay_orphans(self) -> None:
        horizon = self.clock() - 30.0
        waiting, self._orphans = self._orphans, deque(maxlen=self._orphans.maxlen)
        for at, event in waiting:
            if at < horizon:
                continue
            if event.transcribe_id in self._by_transcribe:
                self.on_event(event)
            else:
                self._orphans.append((at, event))  # still nobody's: it keeps its age

    def finished(self, call_id: str) -> None:
        """The executor saw `Finished`: forget the call, remember it ended."""
        call = self.calls.pop(call_id, None)
        for tid in self._transcribes.pop(call_id, ()):
            self._by_transcribe.pop(tid, None)
        self._remember(call_id)
        log.info("call.finished", call_id=call_id, live=len(self.calls))
        if self.on_finished is not None:
            self.on_finished(call, call_id)
        self._check_waiters()
        if not self.calls and self._idle is not None:
            self._idle.set()

    def _release(self, call: Call) -> None:
        """A call we took for ours is a leg a flow dialled for another call: VoIPBIN chains it
        just after creating it. Nothing was started before an answer: it is only forgotten (its
        timers, its row in the store) the way a finished call is."""
        self.counters["calls"] -= 1
        self.counters["ignored"] += 1
        log.info("call.released", call_id=call.id, reason="a leg chained to another call")
        self.execute(call.id, [Finished(call.id)])

    def disown(self, call_id: str, *, never_ours: bool = False, foreign: bool = True) -> None:
        """Another replica serves the call (it claimed it first, or took it over): forget it
        here without a side effect, and (`foreign`) leave its events alone until `adopt` takes
        it back. `never_ours`: it lost the first claim, so it does not count as a call taken."""
        call = self.calls.pop(call_id, None)
        if call is not None and never_ours:
            self.counters["calls"] -= 1
        tids = self._transcribes.pop(call_id, ())
        for tid in tids:
            self._by_transcribe.pop(tid, None)
        if foreign:
            _keep(self._foreign, call_id)
            for tid in tids:
                _keep(self._foreign_transcribes, tid)
        self._check_waiters()
        if not self.calls and self._idle is not None:
            self._idle.set()

    def _leave(self, info: CallInfo) -> None:
        """Leave a call that is not ours alone, for as long as it lives."""
        first = info.id not in self._others
        _keep(self._others, info.id)
        if info.master_call_id or info.status == "hangup":
            self._left.pop(info.id, None)
        elif first:
            numbers = frozenset(normalise_number(n) for n in (info.source, info.destination))
            self._left[info.id] = (self.clock(), numbers)
            _trim(self._left)

    def _remember(self, call_id: str) -> None:
        _keep(self._ended, call_id)

    def remember_ended(self, call_ids: Iterable[str]) -> None:
        """Calls that ended (or were handed over) before a restart: never adopt them again."""
        for call_id in call_ids:
            self._ended[call_id] = None

    def adopt(self, call: Call) -> None:
        """Take over a call restored from the store."""
        self._foreign.pop(call.id, None)
        self.calls[call.id] = call
        if call.transcribe_id:
            tid = call.transcribe_id
            self._foreign_transcribes.pop(tid, None)
            self._by_transcribe[tid] = call.id
            self._transcribes[call.id] = [tid]
            # what came for it while it was not ours is stale: its transcripts are read back,
            # and replaying its old speech events would look like the caller speaking now
            self._orphans = deque(
                (o for o in self._orphans if o[1].transcribe_id != tid), self._orphans.maxlen
            )

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Return once `predicate()` holds; re-checked after every step."""
        if predicate():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((predicate, fut))
        try:
            await fut
        finally:
            self._waiters = [(p, f) for p, f in self._waiters if f is not fut]

    def _check_waiters(self) -> None:
        for predicate, fut in self._waiters:
            if not fut.done() and predicate():
                fut.set_result(None)

    async def wait_idle(self) -> None:
        """Return once no call is left."""
        while self.calls:
            self._idle = asyncio.Event()
            await self._idle.wait()

    # ---- reconciliation and shutdown -----------------------------------------------------

    def reconcile(self) -> None:
        """After (re)subscribing: events may have been lost, ask VoIPBIN about every live call."""
        for call in list(self.calls.values()):
            self.execute(call.id, call.check())

    def live_calls(self) -> list[Call]:
        """Calls not yet ended."""
        return [c for c in self.calls.values() if c.phase is not Phase.ENDED]


def _keep(ids: OrderedDict[str, None], key: str, limit: int = _KEEP) -> None:
    """Remember `key` among the last `limit` ids (the oldest forgotten first)."""
    ids[key] = None
    _trim(ids, limit)


def _trim(entries: OrderedDict[str, Any], limit: int = _KEEP) -> None:
    """Forget the oldest of `entries` past `limit`."""
    while len(entries) > limit:
        entries.popitem(last=False)


def _timer_fields(timers: list[StartTimer | CancelTimer]) -> dict[str, object]:
    """A step's timer changes as its event line shows them: armed (in seconds), cancelled."""
    out: dict[str, object] = {}
    armed = {str(c.timer): round(c.delay_s, 3) for c in timers if isinstance(c, StartTimer)}
    if armed:
        out["armed"] = armed
    cancelled = [str(c.timer) for c in timers if isinstance(c, CancelTimer)]
    if cancelled:
        out["cancelled"] = cancelled
    return out


def _describe(event: Event | Result) -> dict[str, object]:
    if type(event) is SpeechEvent:  # four to six a turn: one dict, made at once
        return {"type": "SpeechEvent", "kind": event.kind, "text": event.message or None}
    out: dict[str, object] = {"type": type(event).__name__}
    if isinstance(event, CallEvent):
        out.update(status=event.call.status, reason=event.call.hangup_reason or None)
    elif isinstance(event, TranscriptEvent):
        out.update(id=event.id, direction=event.direction, text=event.message)
    elif isinstance(event, SpeechEvent):
        out.update(kind=event.kind, text=event.message or None)
    elif isinstance(event, TranscriptsRead):
        out["count"] = len(event.transcripts)
    else:
        for name in (
            "status",
            "turn",
            "speaking_id",
            "transcribe_id",
            "session_id",
            "timer",
            "error",
            "ok",
            "text",
        ):
            value = getattr(event, name, None)
            if value is not None:
                out[name] = value if isinstance(value, (str, int, float)) else str(value)
    return out
