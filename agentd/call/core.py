"""What every part of the call router shares: the machines, the call's facts, the common steps.

`Call` (call.py) is this core plus three groups of handlers, each in its own module: the
sessions (attach.py), the conversation (talk.py) and restarts and failures (recovery.py).
Only these modules step the machines.
"""

from __future__ import annotations

from agentd.call.history import History
from agentd.call.ledger import Ledger, StopInput
from agentd.call.phase import Phase, PhaseInput, PhaseMachine
from agentd.call.playback import Playback
from agentd.call.report import ENDED, GONE, STOPPED, Report
from agentd.call.session import SessionInput, SessionKind, SessionMachine, SessionState
from agentd.call.settings import CallSettings
from agentd.call.turn import TurnInput, TurnMachine
from agentd.commands import (
    CallGone,
    CancelBackend,
    CancelTimer,
    CheckCall,
    Command,
    FetchTranscripts,
    Finished,
    Hangup,
    Record,
    Result,
    Say,
    SpeakingFailed,
    SpeakingStarted,
    StartSpeaking,
    StartTimer,
    StartTranscribe,
    Stopped,
    StopSpeaking,
    StopTranscribe,
    SweepDone,
    SweepSpeakings,
    TranscribeStarted,
    WriteAhead,
)
from agentd.events import CallEvent, Event, SpeechEvent, TranscribeEvent, TranscriptEvent
from agentd.names import TURN_TIMINGS, Action, EndCall, Kind, Timer, TimerKind, normalise_number
from agentd.sentences import split_for_say

# a step's type checks read these (tuples): `A | B` in an isinstance builds a union each time
_FROM_VOIPBIN = (CallEvent, TranscriptEvent, SpeechEvent, TranscribeEvent)
_WORDS = (TranscriptEvent, SpeechEvent)

Input = Event | Result  # what a call handles
NEVER = float("inf")  # the time of something not due (a timer not running)
#: how long after a restart a transcribe start the last agentd sent may still make one:
#: VoIPBIN's media start takes up to ~10 s, our client waits 30 s for a start at most
TRANSCRIBE_SWEEP_S = 30.0


# a call over without its hangup event: the reason its last status tells ("": "normal")
_ENDING = {"canceling": "cancel", "terminating": ""}


def backoff(base: float, tries: int, cap: float) -> float:
    """`base` doubled for each try after the first, at most `cap` (an outage of a day is some
    thousand tries: the exponent is bounded before it overflows a float)."""
    doublings: int = min(max(tries - 1, 0), 32)
    return min(base * float(2**doublings), cap)


def outage(status: int) -> bool:
    """A failure no refusal: no answer at all (0), a 429 or a 5xx. VoIPBIN may answer
    otherwise a moment later; a 4xx is its considered answer, which no retry changes."""
    return status in (0, 429) or status >= 500


class CallCore:
    """The state of one call and the steps its handlers share."""

    # slots, not a dict per call: a thousand calls are a thousand of these
    __slots__ = (
        "after_reply",
        "age_s",
        "anomalies",
        "direction",
        "failed",
        "filler_due_at",
        "filler_turn",
        "greet_waiting",
        "greeted",
        "hangup_reason",
        "heard_words",
        "held",
        "history",
        "hold_until",
        "id",
        "incomplete_turn",
        "last_caller",
        "last_heard",
        "ledger",
        "phases",
        "playback",
        "report",
        "reprompts",
        "said_turn",
        "say_5xx",
        "say_5xx_at",
        "settings",
        "shutting_down",
        "silence_due",
        "speaking",
        "speaking_restarts",
        "speech_since",
        "status",
        "stt_replaced",
        "timing_due",
        "transcribe",
        "transcribe_409s",
        "transcribe_lost",
        "transcribe_refused",
        "transcript_due",
        "turn_times",
        "turns",
        "watch_delay",
        "words_at",
    )

    def __init__(self, call_id: str, settings: CallSettings, *, direction: str = "") -> None:
        self.id = call_id
        self.settings = settings
        self.direction = direction
        self.phases = PhaseMachine()
        self.speaking = SessionMachine("speaking")
        self.transcribe = SessionMachine("transcribe")
        self.turns = TurnMachine()
        self.ledger = Ledger()
        self.playback = Playback()
        self.history = History(settings.prompt, History.keep_for(settings.history_limit))
        self.status = ""
        self.hangup_reason = ""
        self.greeted = False
        self.greet_waiting = False  # the voice is up; the greeting waits for the transcribe
        self.failed = False  # a handler raised: only the cleanup's results are taken
        self.anomalies = 0
        self.after_reply: Action | None = None  # to run once the reply has played
        self.turn_times: dict[str, float] = {}
        self.speech_since: float | None = None  # when the caller's current utterance began
        self.last_heard = 0.0  # last event from VoIPBIN about this call
        self.watch_delay = settings.watch_s
        self.last_caller = 0.0  # last sign of caller speech
        self.reprompts = 0
        self.heard_words = False  # an interim came since the last speech boundary
        self.words_at = ""  # the newest interim's `tm_event` (VoIPBIN's clock)
        self.transcript_due = False  # an utterance ended and its transcript has not come
        self.transcribe_lost = False  # our transcribe ended: is the call still up?
        self.transcribe_409s = 0  # creates answered 409 since the last transcribe went active
        self.transcribe_refused = False  # its creates were refused: no more are sent
        self.shutting_down = False  # the daemon is stopping: nothing is left to end by itself
        self.speaking_restarts = 0  # sessions replaced because /say kept failing on them
        self.say_5xx = 0  # /say 5xx in a row on the current session
        self.say_5xx_at = 0.0
        self.stt_replaced = False  # the transcribe was replaced since the caller last spoke
        # the end of the caller's turn: a reply's first audio waits until `hold_until`
        self.hold_until = 0.0
        self.held: list[tuple[int, str]] = []  # (turn, sentence) held back until then
        self.said_turn = -1  # the latest turn something was said for
        self.timing_due = False  # the reply is complete but held: its timings come when said
        self.filler_due_at = NEVER  # when a slow reply gets a filler
        self.silence_due = NEVER  # when the running silence timer fires
        self.filler_turn = -1  # the turn a filler was said for
        self.incomplete_turn = -1  # the turn the backend judged the caller not done with
        self.age_s = 0.0  # how old the call was when a restart restored it
        self.report = Report()  # summed up in one record when the call is finished

    @property
    def phase(self) -> Phase:
        """Where the call is."""
        return self.phases.phase

    @property
    def speaking_id(self) -> str | None:
        """The current speaking session."""
        return self.speaking.id

    @property
    def transcribe_id(self) -> str | None:
        """The current transcribe session."""
        return self.transcribe.id

    @property
    def turn(self) -> int:
        """The caller turn the conversation is at."""
        return self.turns.turn

    @property
    def replying(self) -> bool:
        """A reply is being prepared, or sentences wait (for the end of the caller's turn, or
        for a speaking session)."""
        return self.turns.replying or self.unsent

    @property
    def unheard(self) -> bool:
        """No transcribe hears the caller, and one is on its way (being created, or retried
        through an outage): what they say now is lost, through no fault of theirs."""
        return not self.transcribe.active and not self.transcribe_refused

    def is_talking(self, now: float) -> bool:
        """Whether the agent's audio is (estimated to be) still playing or queued."""
        return self.playback.talking(now)

    def _heard(self, event: object, now: float) -> None:
        """Note when VoIPBIN last said anything of the call, and the caller last spoke."""
        if not isinstance(event, _FROM_VOIPBIN):
            return
        self.last_heard = now
        # a transcript read back over REST again is old news, not the caller speaking now
        if isinstance(event, _WORDS) and event.direction == "in":
            if isinstance(event, TranscriptEvent) and self.turns.seen(event.id):
                return
            self.last_caller = now
            self.reprompts = 0
            self.stt_replaced = False
            if isinstance(event, SpeechEvent) and event.kind == "interim" and event.at:
                self.words_at = event.at

    def _report_input(self, event: Input, now: float) -> None:
        """Feed the report what the inputs tell, whatever the handlers make of them: when the
        call was answered and hung up, when each session was created and confirmed gone.
        Seen before the handler, so a failed call's cleanup and late results count too."""
        r = self.report
        r.tick(now)
        match event:
            case SpeechEvent() | TranscriptEvent():
                pass  # most inputs: nothing more for the report (each case is an isinstance)
            case CallEvent() if event.deleted or event.call.status == "hangup":
                r.hung_up(now)
            case CallEvent() if event.call.status == "progressing":
                r.answered(now)
            case CallGone():
                r.hung_up(now)
            case SpeakingStarted():
                r.opened("speaking", event.speaking_id, now)
                if event.status == "stopped":
                    r.closed(event.speaking_id, now, GONE)
            case TranscribeStarted():
                r.opened("transcribe", event.transcribe_id, now)
            case Stopped(ok=True):
                r.closed(event.session_id, now, STOPPED)
            case TranscribeEvent(status="done"):
                r.closed(event.id, now, ENDED)
            case SpeakingFailed(status=404) if event.speaking_id:
                r.closed(event.speaking_id, now, GONE)  # VoIPBIN: no such session (any more)

    def _reported(self, cmds: list[Command]) -> list[Command]:
        """Feed the report the step's records; the finished call's report goes just before
        `Finished` (whichever path finished it: a clean end, a failure, a late cleanup)."""
        self.report.saw(cmds)
        for i, cmd in enumerate(cmds):
            if isinstance(cmd, Finished):
                restored = self.age_s > 0  # sessions made before the restart were not seen
                # turns answered and timed: the turn number also counts speculative asks
                turns = self.report.turn_records
                report = self.report.record(self.id, turns=turns, restored=restored)
                return [*cmds[:i], report, *cmds[i:]]
        return cmds

    def _record_hangup(self, by: str, reason: str) -> list[Command]:
        if self.hangup_reason:
            return []
        self.hangup_reason = reason or "normal"
        # VoIPBIN said progressing (the call report's answer), or a restored call was served
        answered = (
            self.report.answered_at is not None
            or self.greeted
            or self.turns.turn > 0
            or self.speaking.id is not None
        )
        return [
            Record(
                self.id,
                Kind.ENDED,
                {"hangup_by": by, "reason": self.hangup_reason, "answered": answered},
            )
        ]

    def _start(self, kind: SessionKind, *, write_ahead: bool = True) -> list[Command]:
        """Create a session; the call is put on disk first (a crash must not lose its id)."""
        s = self.settings
        ahead: list[Command] = [WriteAhead(self.id)] if write_ahead else []
        if kind == "transcribe":
            self.transcribe.step(SessionInput.START)
            return [*ahead, StartTranscribe(self.id, s.language, s.stt_provider)]
        # one live session per call: whatever the old one's state, make sure it is stopped
        old = self._stop("speaking", self.speaking.id) if self.speaking.id else []
        self.speaking.step(SessionInput.START)
        self.say_5xx = 0
        return [*old, *ahead, self._start_speaking()]

    def _start_speaking(self) -> StartSpeaking:
        s = self.settings
        # a session this call stopped or gave up on is never adopted again (a dead pod's row
        # stays active, docs/protocol.md §8.3)
        avoid = self.ledger.known()
        return StartSpeaking(self.id, s.language, s.tts_provider, s.voice_id, avoid)

    def _begin_end(self, *, hangup: bool = False) -> list[Command]:
        """Stop everything the call started; sessions still being created are stopped on arrival.

        `hangup`: the call ends by a hangup (VoIPBIN's, or ours being sent), which ends its
        transcribe on VoIPBIN's side: that one is awaited instead of stopped (`_await_end`)."""
        cmds = self._end_reply()
        self.playback.queued.clear()
        self.playback.paced.clear()
        self.held.clear()
        for session in (self.speaking, self.transcribe):
            if session.id and (
                session.state
                in (SessionState.INITIATING, SessionState.ACTIVE, SessionState.STOPPING)
                # a speaking whose poll failed: it may well be live, and it bills until stopped
                or (session.kind == "speaking" and session.state is SessionState.NONE)
            ):
                if hangup and session.kind == "transcribe" and not self.shutting_down:
                    cmds += self._await_end(session.kind, session.id)
                else:
                    cmds += self._stop(session.kind, session.id, abandon=True)
            session.step(SessionInput.RELEASE)
        if self.ledger.take_sweep():
            # a session created just before a crash, or by a create whose answer was lost,
            # may never have told us its id
            cmds += self._sweep()
        return cmds

    def _await_end(self, kind: SessionKind, sid: str) -> list[Command]:
        """Leave `sid` to end by itself: no stop now, one only if its end does not come in time.

        Only a transcribe at a hangup: bin-transcribe-manager stops every transcribe of a call
        on the call's `call_hangup` (`subscribehandler/call_manager.go`
        `processEventCMCallHangup` → `transcribehandler/event.go` `EventCMCallHangup` →
        `stop.go` `Stop`: `done`, `transcribe_done`), and its STT stream ends with the channel
        anyway (the snoop's external-media channel is hung up, `streaminghandler/aws.go`
        `awsProcessMedia` reads an error). A /stop after that finds it `done` and does nothing.
        The safety net, for a lost `done` or a failed stop on VoIPBIN's side (its handler only
        logs errors and the event is not redelivered): the late stop armed here, the stop sent
        at once after a gap in the event stream (`Call.check`) or at shutdown, and a restart,
        which stops every awaited session it finds in the store."""
        if not self.ledger.expect(sid, kind):
            return []
        wait = self.settings.transcribe_end_wait_s
        return [StartTimer(self.id, Timer(TimerKind.RETRY_STOP, sid), wait)]

    def _stop_awaited(self) -> list[Command]:
        """Give up waiting for the ends awaited: stop those sessions now."""
        cmds: list[Command] = []
        for sid, kind in list(self.ledger.awaiting.items()):
            cmds += self._stop(kind, sid)
        return cmds

    def _sweep(self) -> list[Command]:
        """Stop every speaking of the call, those whose id we never learned included. The call
        is not finished before the sweep is done: a finished call is not restored to sweep."""
        self.ledger.sweeping = True
        return [SweepSpeakings(self.id)]

    def _sweep_done(self, event: SweepDone) -> list[Command]:
        """A sweep that failed is tried again ever less often: through an outage however long
        (as a stop is), given up after `max_stop_attempts` refusals (a 4xx no retry changes)."""
        if not self.ledger.sweeping:
            return []
        if event.ok:
            self.ledger.sweeping = False
            return []
        self.ledger.sweep_failures += 1
        failures, s = self.ledger.sweep_failures, self.settings
        if failures >= s.max_stop_attempts and not outage(event.status):
            self.ledger.sweeping = False
            data = {"kind": "speaking", "sweep": True, "status": event.status, "gave_up": True}
            return [Record(self.id, Kind.LEAK, data)]
        delay = backoff(s.retry_s, failures, 60.0)
        return [StartTimer(self.id, Timer(TimerKind.RETRY_SWEEP), delay)]

    def _hangup_failed(self) -> list[Command]:
        """Our hangup was refused: sent again ever less often, and VoIPBIN asked about the call
        (its call_hangup may have been lost: then the hangup has nothing left to do)."""
        self.ledger.hangup_failures += 1
        s = self.settings
        delay = backoff(s.retry_s, self.ledger.hangup_failures, s.watch_max_s)
        return [CheckCall(self.id), StartTimer(self.id, Timer(TimerKind.RETRY_HANGUP), delay)]

    def _stop(
        self, kind: SessionKind, sid: str, *, delete: bool = False, abandon: bool = False
    ) -> list[Command]:
        """Stop `sid` unless its stop was asked for already (`delete`: its pod is gone;
        `abandon`: the call is ending or the caller cut in, what is still to be said on it is
        dropped)."""
        if not self.ledger.stop(sid, kind):
            return []
        return [self._stop_command(kind, sid, delete, abandon=abandon)]

    def _stop_command(
        self, kind: SessionKind, sid: str, delete: bool = False, *, abandon: bool = False
    ) -> Command:
        if kind == "speaking":
            return StopSpeaking(self.id, sid, delete, abandon=abandon)
        return StopTranscribe(self.id, sid, delete)

    def _stop_failed(self, kind: SessionKind, sid: str, status: int = 0) -> list[Command]:
        """A stop was not confirmed: the session bills until it is stopped. It is retried ever
        less often (kept in the store, re-sent after a restart), escalated to a DELETE, which
        works without the pod that owns the session, and given up after `max_stop_attempts`
        refusals (a 4xx: a permission, a bad request, which no retry changes) with an error
        naming the session. No answer at all, a 429 or a 5xx is no refusal but an outage: that
        is retried, once a minute at most, until VoIPBIN answers, however long it is away (the
        session bills all that time; a retry costs next to nothing)."""
        attempts = self.ledger.attempts(sid)
        s = self.settings
        if not attempts:
            self.ledger.step(sid, StopInput.FAILED, kind)
            return []  # a stop we never asked for, or one confirmed since
        if attempts >= s.max_stop_attempts and not outage(status):
            self.ledger.step(sid, StopInput.GIVE_UP, kind)
            data = {"kind": kind, "session_id": sid, "attempts": attempts, "status": status}
            return [Record(self.id, Kind.LEAK, {**data, "gave_up": True})]
        self.ledger.step(sid, StopInput.FAILED, kind)
        delay = backoff(s.retry_s, attempts, 60.0)
        if status >= 500 and attempts < s.stop_delete_after:
            delay = 0.0  # the pod that owns the session may be gone: the DELETE cannot wait
        cmds: list[Command] = [StartTimer(self.id, Timer(TimerKind.RETRY_STOP, sid), delay)]
        if attempts == s.max_attempts:
            cmds.append(
                Record(self.id, Kind.LEAK, {"kind": kind, "session_id": sid, "status": status})
            )
        return cmds

    def _maybe_finished(self, by: str = "", reason: str = "") -> list[Command]:
        """`Finished` once the call is over and clean (`by`, `reason`: what VoIPBIN last said
        of its end, for a call over before its hangup event)."""
        if self.phase is Phase.ENDING and self.ledger.transcribes_unsure:
            # restored while the last agentd's transcribe start was under way, and over before
            # it was looked for: VoIPBIN may still make it, and no hangup would end that one
            self.ledger.transcribes_unsure = False
            self.ledger.transcribes_to_sweep = True
            return [StartTimer(self.id, Timer(TimerKind.SWEEP_TRANSCRIBES), TRANSCRIBE_SWEEP_S)]
        if (
            self.phase is Phase.ENDING
            and self.ledger.clean
            and not self.speaking.starting
            and not self.transcribe.starting
        ):
            self.phases.step(PhaseInput.CLEAN)
            # VoIPBIN said it was ending (terminating, canceling) and all is stopped before its
            # hangup event came: that event will find the call gone, so its end is told now
            ended: list[Command] = []
            if not self.hangup_reason and self.status in _ENDING:
                ended = self._record_hangup(by, reason or _ENDING[self.status])
            return [*ended, Finished(self.id)]
        return []

    def _late_result(self, event: Input) -> list[Command]:
        """After the end only a session created late still needs stopping."""
        if isinstance(event, SpeakingStarted):
            return self._stop("speaking", event.speaking_id)
        if isinstance(event, TranscribeStarted):
            return self._stop("transcribe", event.transcribe_id)
        return []

    def _hang_up_now(self) -> list[Command]:
        """Hang up and stop the sessions without waiting for VoIPBIN's hangup event."""
        if not self.phase.over:
            self.phases.step(PhaseInput.LOCAL_END)
        # until VoIPBIN confirms: a caller must not sit in silence
        self.ledger.hangup_pending = True
        return [
            Hangup(self.id),
            *self._begin_end(hangup=True),
            *self._record_hangup("local", "normal"),
            *self._maybe_finished(),
        ]

    def _error(self, what: str, status: int, reason: str = "") -> Record:
        data: dict[str, object] = {"what": what, "status": status}
        if reason:
            data["reason"] = reason
        return Record(self.id, Kind.ERROR, data)

    def _end_reply(self) -> list[Command]:
        """Drop the reply under way (the call ends, or a goodbye replaces it); a complete reply
        that was never said is timed as it is."""
        cmds = self._timing_flushed()
        if not self.turns.replying:
            return cmds
        self.turns.step(TurnInput.END)
        return [*cmds, CancelBackend(self.id, self.turns.turn)]

    def _timing_flushed(self) -> list[Command]:
        """The turn record a reply still waiting to be said owed (it will not be said now)."""
        if not self.timing_due:
            return []
        self.timing_due = False
        return [self._turn_record(self.turn_times.get("transcript", 0.0))]

    def _say(self, text: str, turn: int, now: float) -> list[Command]:
        if not self.speaking.active:
            self.playback.queued.append((turn, text))
            return []
        s = self.settings
        if s.tts_provider != "aws":
            return self._say_now(text, turn, now)
        # Polly's pod buffers s.aws_ahead_s and more of audio, no more: a /say that does not
        # fit waits inside its request, and one that waits past the gateway's 3 s answers 503
        # (plays all the same, but two count as a dead pod). So the text goes out in pieces
        # that fit, each as the audio ahead of it plays (aws.go SayAdd)
        most = max(1, int(s.aws_ahead_s * s.rate_for(text)))
        waiting = bool(self.playback.paced)  # then the pace timer runs already
        self.playback.paced += [(turn, piece) for piece in split_for_say(text, max_chars=most)]
        return [] if waiting else self.say_paced(now)

    def say_paced(self, now: float) -> list[Command]:
        """Send what waits for room in the aws buffer, as much as fits now (the `pace` timer)."""
        p, s = self.playback, self.settings
        cmds: list[Command] = []
        while p.paced and self.speaking.active and self.phase.live:
            turn, text = p.paced[0]
            if turn not in (self.turns.turn, 0):
                p.paced.pop(0)  # a reply the caller has moved on from
                continue
            ahead = p.remaining(now)
            over = ahead + len(text) / s.rate_for(text) - s.aws_ahead_s
            if ahead > 0 and over > 0.01:  # timers fire a hair early
                cmds.append(StartTimer(self.id, Timer(TimerKind.PACE), over))
                break
            p.paced.pop(0)
            cmds += self._say_now(text, turn, now)
        return cmds

    def _say_now(self, text: str, turn: int, now: float) -> list[Command]:
        assert self.speaking.id is not None
        s = self.settings
        self.playback.play(turn, text, now, s.rate_for(text), s.say_latency_s)
        cmds: list[Command] = [Say(self.id, self.speaking.id, text, turn)]
        if turn:
            self.turn_times.setdefault("first_say", now)
            self.turn_times["last_say"] = now
        if self.timing_due and turn == self.turns.turn:
            self.timing_due = False
            cmds.append(self._turn_record(now))
        return cmds

    @property
    def unsent(self) -> bool:
        """Sentences of the reply wait: held for the end of the caller's turn, or queued for a
        speaking session."""
        return bool(self.held) or bool(self.playback.queued) or bool(self.playback.paced)

    def _turn_record(self, now: float) -> Record:
        """The turn's timings, from the end of the caller's turn: their last words (answering
        on interims) or their final transcript (answering on finals)."""
        t0 = self.turn_times.get("transcript", now)
        out: dict[str, object] = {"turn": self.turns.turn}
        for key in TURN_TIMINGS:
            if key in self.turn_times:
                out[f"{key}_ms"] = round((self.turn_times[key] - t0) * 1000, 1)
        return Record(self.id, Kind.TURN, out)

    def _say_queued(self, now: float) -> list[Command]:
        """A speaking session is active again: say what waited for it (this turn's only)."""
        queued, self.playback.queued = self.playback.queued, []
        cmds: list[Command] = []
        for turn, text in queued:
            if turn == self.turns.turn:
                cmds += self._say(text, turn, now)
        return cmds

    def greeting_text(self) -> str:
        """What the agent says first: a call it placed may have a greeting of its own."""
        s = self.settings
        return (
            s.outbound_greeting
            if self.direction == "outgoing" and s.outbound_greeting
            else s.greeting
        )

    def _greet_when_heard(self, now: float) -> list[Command]:
        """The voice is up: greet now if someone is listening, else once the transcribe is up
        or `greet_wait_s` has passed, whichever comes first."""
        if self.greeted or not self.speaking.active:
            return []
        if self.transcribe.active or self.settings.greet_wait_s <= 0:
            return self._greet_now(now)
        if self.greet_waiting:
            return []
        self.greet_waiting = True
        return [StartTimer(self.id, Timer(TimerKind.GREET), self.settings.greet_wait_s)]

    def _greet_now(self, now: float) -> list[Command]:
        self.greeted = True
        self.phases.step(PhaseInput.GREETED)
        cancel: list[Command] = []
        if self.greet_waiting:  # the transcribe came in time: the timer has nothing to do
            self.greet_waiting = False
            cancel.append(CancelTimer(self.id, Timer(TimerKind.GREET)))
        return cancel + self._greet(now)

    def _greet(self, now: float) -> list[Command]:
        self.last_caller = max(self.last_caller, now)  # silence counts from the answer
        cmds: list[Command] = []
        greeting = self.greeting_text()
        if greeting:
            self.history.assistant(greeting, 0)
            cmds += self._say(greeting, 0, now)
        return cmds + self.arm_silence(now)

    def _goodbye(self, text: str, now: float) -> list[Command]:
        """Say `text`, then hang up once it has played."""
        cmds = self._end_reply()
        self.after_reply = EndCall()
        # the goodbye replaces what was still held: nothing is said after it, and no later
        # final can join (and so undo) a turn that ends the call
        self.held.clear()
        self.said_turn = self.turns.turn
        if text:
            self.history.assistant(text, self.turns.turn)
            cmds += self._say(text, self.turns.turn, now)
        wait = self.playback.remaining(now) + self.settings.playback_pad_s
        return [*cmds, StartTimer(self.id, Timer(TimerKind.AFTER_REPLY), wait)]

    def allowed_number(self, number: str) -> str | None:
        """The allow-listed number `number` names (as configured: that is what is dialled)."""
        wanted = normalise_number(number)
        return next(
            (n for n in self.settings.transfer_numbers if normalise_number(n) == wanted), None
        )

    def _restored(self, now: float) -> None:
        """A restart rebuilt the call from the store at `now` (the conversation adds to it)."""

    def _resume_turn(self, now: float) -> list[Command]:
        """After a restart, what the open turn the store left needs (the conversation's)."""
        return []

    def arm_silence(self, now: float) -> list[Command]:
        """Start counting the caller's silence from when our audio ends."""
        if self.settings.silence_s <= 0:
            return []
        return self.silence_timer(now, self.playback.remaining(now) + self.settings.silence_s)

    def silence_timer(self, now: float, wait: float) -> list[Command]:
        """The silence timer, due in `wait`. One already due sooner is left running: when it
        fires it finds the caller was not quiet that long and waits the rest. One timer a
        silence, not a timer (and a command and a log line) every turn."""
        due = now + wait
        if self.silence_due <= due:
            return []
        self.silence_due = due
        return [StartTimer(self.id, Timer(TimerKind.SILENCE), wait)]

    def _fetch_transcripts(self) -> list[Command]:
        t = self.transcribe
        if self.phase.live and t.id and t.state is SessionState.ACTIVE:
            return [FetchTranscripts(self.id, t.id)]
        return []

    def _retry_stop(self, sid: str) -> list[Command]:
        kind = self.ledger.kind_of(sid)
        if kind is None:
            return []
        if sid in self.ledger.awaiting:
            # its end did not come in time: lost on the way, or VoIPBIN's own stop failed
            return self._stop(kind, sid)
        delete = self.ledger.attempts(sid) >= self.settings.stop_delete_after
        return [self._stop_command(kind, sid, delete)]
