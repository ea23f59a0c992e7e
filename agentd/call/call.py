"""The per-call router: `Call.handle(event, now) -> list[Command]`, no I/O, no clock.

Theory of operation
-------------------
A call is a composition of small machines, each a literal table in its own module:

- `phase.PhaseMachine`: NEW → DIALING → RINGING → ANSWERED → ACTIVE → ENDING → ENDED, driven by
  VoIPBIN's call status and by agentd's own inputs (greeted, local end, clean).
- `session.SessionMachine`, twice: the speaking (TTS) and the transcribe (STT) session.
- `turn.TurnMachine`: listening, thinking, speaking, cut — which reply is current.
- `ledger.Ledger`: what must still be stopped or confirmed before the call is `Finished`.

This router owns them and is the only code that steps them: one handler per input type
(`_HANDLERS` at the end of this module), and no machine reads another's fields. Its state and
shared steps are in `core.py`; the handlers are grouped by what they serve: the sessions
(`attach.py`), the conversation (`talk.py`), restarts and failures (`recovery.py`).

On ANSWERED the call starts a transcribe and a speaking session (nothing works before the call
is answered, docs/protocol.md §5); the create answer says `active` (greet at once) or
`initiating` (poll). On ENDING every session the call started is stopped — a speaking session is
billed until it is stopped — and a stop that fails is retried until confirmed; sessions whose
creation is still in flight are stopped as soon as their id comes back.

Stale or duplicate remote input (a late status, a result of another turn) is a quiet no-op: the
protocol allows it. An internal input a machine does not allow raises `Illegal`; `handle` turns
it into an `anomaly` record. Any other exception escapes to the dispatcher, which calls `fail`:
the call stops its sessions, hangs up and from then on only takes the results of that cleanup.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agentd.call.attach import Sessions
from agentd.call.core import NEVER, Input
from agentd.call.ledger import StopState
from agentd.call.listen import Listening
from agentd.call.phase import REMOTE, Effect, Phase, PhaseInput
from agentd.call.recovery import Recovery
from agentd.call.session import SessionKind, SessionState
from agentd.call.table import Illegal
from agentd.commands import (
    CallGone,
    CancelTimer,
    CheckCall,
    Command,
    Hangup,
    HangupDone,
    Record,
    ReplyDone,
    ReplyFailed,
    ReplyIncomplete,
    ReplySentence,
    SayFailed,
    SpeakingFailed,
    SpeakingStarted,
    StartTimer,
    Stopped,
    StreamState,
    SweepDone,
    TimerFired,
    TranscribeFailed,
    TranscribesFound,
    TranscribeStarted,
    TranscriptsRead,
    Transfer,
    TransferDone,
    WriteAhead,
)
from agentd.events import CallEvent, SpeechEvent, TranscribeEvent, TranscriptEvent
from agentd.names import Kind, Timer, TimerKind, TransferTo

_STATUSES = {inp.value: inp for inp in REMOTE}
_NONE: list[Command] = []  # an empty result, never appended to
# a session in one of these states may be live on VoIPBIN, so billed
_BILLED = (SessionState.INITIATING, SessionState.ACTIVE, SessionState.STOPPING)


class Call(Recovery, Sessions, Listening):
    """One call. Feed it events and results; it returns commands."""

    __slots__ = ()

    def handle(self, event: Input, now: float) -> list[Command]:
        """Apply one event or command result at time `now` (seconds, monotonic)."""
        self._report_input(event, now)
        # a timer that just fired needs no cancelling
        transcript_was_due = self.transcript_due and not isinstance(event, TimerFired)
        cmds = self._apply(event, now)
        moot = self._moot_timers(transcript_was_due)
        if moot:
            cmds = cmds + moot
        return self._reported(cmds) if cmds else cmds

    def _moot_timers(self, transcript_was_due: bool) -> list[Command]:
        """Timers whose reason went away in this step, cancelled rather than left to fire for
        nothing (an event, a step and a log line each, on nearly every turn): the transcript
        that was due came; something was said for the turn a filler was armed for."""
        if not (transcript_was_due or self.filler_due_at != NEVER):
            return _NONE  # most steps: no timer of these is armed
        out: list[Command] = []
        if transcript_was_due and not self.transcript_due:
            out.append(CancelTimer(self.id, Timer(TimerKind.TRANSCRIPT_DUE)))
        if self.filler_due_at != NEVER and self.said_turn == self.turns.turn:
            self.filler_due_at = NEVER
            out.append(CancelTimer(self.id, Timer(TimerKind.FILLER)))
        return out

    def _apply(self, event: Input, now: float) -> list[Command]:
        if self.failed:
            return self._cleanup_only(event, now)
        if self.phase is Phase.ENDED and not isinstance(event, CallEvent):
            return self._late_result(event)
        self._heard(event, now)
        handler = _HANDLERS.get(type(event))
        if handler is None:
            return []
        try:
            return handler(self, event, now)
        except Illegal as exc:
            self.anomalies += 1
            return [
                Record(
                    self.id,
                    Kind.ANOMALY,
                    {
                        "machine": exc.machine,
                        "state": exc.state,
                        "input": exc.input,
                        "event": type(event).__name__,
                    },
                )
            ]

    def _on_call(self, event: CallEvent, now: float) -> list[Command]:
        info = event.call
        if not self.direction:
            self.direction = info.direction
        status = "hangup" if event.deleted else info.status
        if self.transcribe_lost and status == "progressing" and self.phase.live and event.checked:
            # our transcribe ended but VoIPBIN says the call is up: the agent went deaf, start
            # another. Only its answer to our GET says so: a call_updated can come late,
            # after the hangup that ended the transcribe
            self.transcribe_lost = False
            return [Record(self.id, Kind.TRANSCRIBE_RESTARTED, {}), *self._start("transcribe")]
        inp = _STATUSES.get(status)
        if inp is None:
            return []  # an unknown status: nothing to do with it
        first = self.phase is Phase.NEW
        effect = self.phases.step(inp)
        if effect is None:
            return []
        if status == "hangup":
            self.ledger.hangup_pending = False  # VoIPBIN confirms the end
        self.status = status
        # lost events (a call_hangup above all) are found by asking VoIPBIN when a call goes quiet
        watch = (
            [StartTimer(self.id, Timer(TimerKind.WATCH), self.settings.watch_s)] if first else []
        )
        if effect is Effect.NOTE:
            return [
                *watch,
                Record(self.id, Kind.STATUS, {"status": status, "direction": self.direction}),
            ]
        if effect is Effect.ANSWER:
            return [*watch, *self._answer()]
        # terminating, canceling and hangup all end in the channel's hangup: VoIPBIN then ends
        # the transcribe itself, which is awaited rather than stopped
        cmds = self._begin_end(hangup=True) if effect is Effect.END else []
        if status == "hangup":
            cmds += self._record_hangup(info.hangup_by, info.hangup_reason)
        return cmds + self._maybe_finished(info.hangup_by, info.hangup_reason)

    def _on_transcripts_read(self, event: TranscriptsRead, now: float) -> list[Command]:
        """A read-back, oldest first. From the oldest transcript the call remembers handling,
        each is handled as if it had just come (those handled are dropped as repeats): a lost
        one between them, or after the newest, is answered. What came before is old news: the
        transcripts too old to be among the ids a call remembers (`SEEN_KEEP`); a long call,
        restarted, would otherwise answer its first hour again."""
        read = event.transcripts
        start = next((i for i, t in enumerate(read) if self.turns.seen(t.id)), 0)
        self.finals_read_back([t for t in read if self.turns.seen(t.id)])
        cmds: list[Command] = []
        for transcript in read[start:]:
            cmds += self._apply(transcript, now)
        return cmds + self.read_back(now)

    def _on_call_gone(self, _event: CallGone, _now: float) -> list[Command]:
        self.ledger.hangup_pending = False
        if self.phase.over:
            return self._maybe_finished()
        self.phases.step(PhaseInput.LOCAL_END)
        return [*self._begin_end(), *self._record_hangup("", "gone"), *self._maybe_finished()]

    def _answer(self) -> list[Command]:
        return [
            Record(self.id, Kind.ANSWERED, {"direction": self.direction}),
            WriteAhead(self.id),
            *self._start("transcribe", write_ahead=False),
            *self._start("speaking", write_ahead=False),
            StartTimer(self.id, Timer(TimerKind.MAX_CALL), self.settings.max_call_s),
        ]

    def _on_hangup_done(self, event: HangupDone, _now: float) -> list[Command]:
        if not self.ledger.hangup_pending:
            return []
        if event.ok:
            self.ledger.hangup_pending = False
            return self._maybe_finished()
        return self._hangup_failed()

    def _on_sweep_done(self, event: SweepDone, _now: float) -> list[Command]:
        return self._sweep_done(event) + self._maybe_finished()

    def _on_timer(self, event: TimerFired, now: float) -> list[Command]:
        timer = event.timer
        kind = timer.kind
        if kind is TimerKind.RETRY_HANGUP:
            return [Hangup(self.id)] if self.ledger.hangup_pending else []
        if kind is TimerKind.RETRY_STOP:
            return self._retry_stop(timer.session_id)
        if kind is TimerKind.RETRY_SWEEP:
            return self._sweep() if self.ledger.sweeping else []
        if kind is TimerKind.SWEEP_TRANSCRIBES and self.ledger.transcribes_to_sweep:
            return self._sweep_transcribes_timer(now)  # the call's end waits for it
        if self.phase.over:
            return []
        handler = _TIMERS.get(kind)
        return handler(self, now) if handler is not None else []

    def _max_call_timer(self, now: float) -> list[Command]:
        if not self.phase.live or self.after_reply is not None:
            return []  # a goodbye was said already (a restart can arm this one again)
        s = self.settings
        return [Record(self.id, Kind.TIME_LIMIT, {}), *self._goodbye(s.time_limit_goodbye, now)]

    def _after_reply_timer(self, now: float) -> list[Command]:
        if self.after_reply is None:
            return []
        if self.held or self.playback.paced or (self.playback.queued and not self.speaking.active):
            # the goodbye has not gone out yet (held, waiting for room, or for a new session)
            wait = max(self.hold_until - now, self.settings.retry_s)
            return [StartTimer(self.id, Timer(TimerKind.AFTER_REPLY), wait)]
        if self.playback.talking(now) and self.playback.until > now:
            wait = self.playback.until - now + self.settings.playback_pad_s
            return [StartTimer(self.id, Timer(TimerKind.AFTER_REPLY), wait)]
        action, self.after_reply = self.after_reply, None
        if isinstance(action, TransferTo):
            return [Transfer(self.id, action.number)]
        return self._hang_up_now()

    def _on_transfer_done(self, event: TransferDone, now: float) -> list[Command]:
        if self.phase.over:
            return []
        if not event.ok:
            return [*self._transfer_failed(now, event.error), *self.arm_silence(now)]
        # the caller is with a human now: our sessions end, the call goes on without us
        self.phases.step(PhaseInput.LOCAL_END)
        return [Record(self.id, Kind.TRANSFERRED, {}), *self._begin_end(), *self._maybe_finished()]

    def shutdown(self, now: float, goodbye: str = "") -> list[Command]:
        """The daemon is stopping for good: say `goodbye`, hang up, stop every session.

        Every session is stopped, a transcribe too: the process may be gone before VoIPBIN's
        own end of it arrives, and without a store nobody would stop it later."""
        self.shutting_down = True
        if self.phase.over:
            return self._stop_awaited()
        if goodbye and self.speaking.active and self.phase.live:
            return self._goodbye(goodbye, now)
        return self._hang_up_now()

    def unstopped(self) -> list[tuple[SessionKind, str]]:
        """The sessions VoIPBIN has not confirmed stopped: the stops still pending or given up,
        the ends still awaited, and a live session no stop was asked for yet."""
        left = list(self.ledger.unconfirmed())
        known = self.ledger.known()
        for session in (self.speaking, self.transcribe):
            if session.id and session.id not in known and session.state in _BILLED:
                left.append((session.kind, session.id))
        return left

    def left_running(self) -> list[Command]:
        """The daemon stops for good and nothing will stop this call's sessions after it (no
        store to resume them from): a `leak` record, given up, for each session still
        unconfirmed (and for a sweep still owed, whose session's id was never learned), so that
        the operator can stop them by hand. Asked once, as the process leaves. Not for a
        session given up before: its leak was recorded then, with its attempts."""
        cmds: list[Command] = []
        for kind, sid in self.unstopped():
            if self.ledger.state(sid) is StopState.ABANDONED:
                continue
            data = {"kind": kind, "session_id": sid, "attempts": self.ledger.attempts(sid)}
            cmds.append(Record(self.id, Kind.LEAK, {**data, "gave_up": True, "shutdown": True}))
        if self.ledger.sweeping or self.ledger.sweep_needed:
            data = {"kind": "speaking", "sweep": True, "gave_up": True, "shutdown": True}
            cmds.append(Record(self.id, Kind.LEAK, data))
        return cmds

    def check(self) -> list[Command]:
        """Reconcile after a gap in the event stream: ask VoIPBIN how the call is.

        An end awaited since the hangup may have come during the gap, unseen: the session is
        stopped now rather than after the wait (a stop of a `done` transcribe is harmless)."""
        if self.phase is Phase.ENDED:
            return []
        return [CheckCall(self.id), *self._stop_awaited()]


Handler = Callable[[Call, Any, float], list[Command]]

# one row per input: what happens when it arrives
_HANDLERS: dict[type, Handler] = {
    CallEvent: Call._on_call,
    CallGone: Call._on_call_gone,
    TranscriptEvent: Call.on_transcript,
    TranscriptsRead: Call._on_transcripts_read,
    SpeechEvent: Call.on_speech,
    TranscribeEvent: Call._on_transcribe_event,
    TranscribeStarted: Call._on_transcribe_started,
    TranscribeFailed: Call._on_transcribe_failed,
    SpeakingStarted: Call._on_speaking_started,
    SpeakingFailed: Call._on_speaking_failed,
    SayFailed: Call._on_say_failed,
    Stopped: Call._on_stopped,
    ReplySentence: Call.on_sentence,
    ReplyDone: Call.on_reply_done,
    ReplyFailed: Call.on_reply_failed,
    ReplyIncomplete: Call.on_reply_incomplete,
    StreamState: Call.on_stream,
    TimerFired: Call._on_timer,
    TransferDone: Call._on_transfer_done,
    HangupDone: Call._on_hangup_done,
    SweepDone: Call._on_sweep_done,
    TranscribesFound: Call._on_transcribes_found,
}

# one row per timer that the live call handles (stop, hangup and sweep retries: every phase)
_TIMERS: dict[TimerKind, Callable[[Call, float], list[Command]]] = {
    TimerKind.POLL_SPEAKING: Call._poll_timer,
    TimerKind.RETRY_SPEAKING: Call._retry_speaking_timer,
    TimerKind.RETRY_TRANSCRIBE: Call._retry_transcribe_timer,
    TimerKind.WATCH: Call.on_watch,
    TimerKind.TRANSCRIPT_DUE: Call.on_transcript_due,
    TimerKind.SILENCE: Call.on_silence,
    TimerKind.MAX_CALL: Call._max_call_timer,
    TimerKind.AFTER_REPLY: Call._after_reply_timer,
    TimerKind.HOLD: Call.on_hold,
    TimerKind.ENDPOINT: Call.on_endpoint,
    TimerKind.FILLER: Call.on_filler,
    TimerKind.INCOMPLETE: Call.on_incomplete,
    TimerKind.GREET: Call._greet_timer,
    TimerKind.SWEEP_TRANSCRIBES: Call._sweep_transcribes_timer,
    TimerKind.PACE: Call.say_paced,
}
