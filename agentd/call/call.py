"""The per-call state machine: `Call.handle(event, now) -> list[Command]`, no I/O, no clock.

Theory of operation
-------------------
A call moves through phases driven by VoIPBIN's call status (table `STATUS_TABLE`):

    NEW ─dialing→ DIALING ─ringing→ RINGING ─progressing→ ANSWERED ─speaking active→ ACTIVE
     └──────────────── terminating / canceling / hangup (from any phase) ──────────→ ENDING → ENDED

Statuses only move forward (`hangup` is final), so a late `call_updated`, a duplicate
`call_progressing` or a `call_ringing` that arrives after `call_progressing` changes nothing.

On ANSWERED the call starts a transcribe session and a speaking session (nothing works before the
call is answered, so never earlier). VoIPBIN sends no speaking events: the POST /speakings answer
says `active` (greet at once) or `initiating` (poll until active). Caller transcripts go to the
backend; each sentence of the reply is spoken with /say as soon as it exists.

No event reports when playback ends, so the call estimates it from the text length
(`chars_per_s`), as VoIPBIN's own client does. Caller speech while the agent is talking or thinking
is a barge-in: the stale reply is cancelled by turn id and the audio is cut — by /flush where the
provider really cuts (gcp), else by /stop and a fresh session (the only hard cut with ElevenLabs).
History keeps only what the caller could have heard.

On ENDING every session the call started is stopped — a speaking session is billed until it is
stopped, VoIPBIN does not stop it at hangup — and a stop that fails is retried; sessions whose
creation is still in flight are stopped as soon as their id comes back. When nothing is left to
clean up the call emits `Finished`.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from typing import Any, Literal

from agentd.call.settings import CallSettings
from agentd.commands import (
    AskBackend,
    CallGone,
    CancelBackend,
    CheckCall,
    Command,
    FetchTranscripts,
    FindTranscribe,
    Finished,
    Flush,
    Hangup,
    HangupDone,
    Message,
    PollSpeaking,
    Record,
    ReplyDone,
    ReplyFailed,
    ReplySentence,
    Result,
    Say,
    SayFailed,
    SpeakingFailed,
    SpeakingStarted,
    StartSpeaking,
    StartTimer,
    StartTranscribe,
    Stopped,
    StopSpeaking,
    StopTranscribe,
    SweepSpeakings,
    TimerFired,
    TranscribeFailed,
    TranscribeStarted,
    Transfer,
    TransferDone,
)
from agentd.events import CallEvent, Event, SpeechEvent, TranscribeEvent, TranscriptEvent

SessionState = Literal["none", "starting", "initiating", "active", "restarting"]
Reply = Literal["idle", "thinking"]


class Phase(enum.Enum):
    """Where the call is, as agentd sees it."""

    NEW = "new"
    DIALING = "dialing"
    RINGING = "ringing"
    ANSWERED = "answered"  # progressing; sessions being set up
    ACTIVE = "active"  # speaking session active and greeting sent
    ENDING = "ending"  # call ending or ended; cleanup in flight
    ENDED = "ended"  # nothing left to clean up

    @property
    def live(self) -> bool:
        """Answered and not ending."""
        return self in (Phase.ANSWERED, Phase.ACTIVE)

    @property
    def over(self) -> bool:
        """Ending or ended."""
        return self in (Phase.ENDING, Phase.ENDED)


# (phase, call status) -> (next phase, what to do). Pairs not listed change nothing: a repeated or
# stale status (a ringing after progressing, an updated after hangup) is ignored.
_PRE_ANSWER = (Phase.NEW, Phase.DIALING, Phase.RINGING)
STATUS_TABLE: dict[tuple[Phase, str], tuple[Phase, str]] = {
    (Phase.NEW, "dialing"): (Phase.DIALING, "note"),
    (Phase.NEW, "ringing"): (Phase.RINGING, "note"),
    (Phase.DIALING, "ringing"): (Phase.RINGING, "note"),
    **{(p, "progressing"): (Phase.ANSWERED, "answer") for p in _PRE_ANSWER},
    **{
        (p, s): (Phase.ENDING, "end")
        for p in (*_PRE_ANSWER, Phase.ANSWERED, Phase.ACTIVE)
        for s in ("terminating", "canceling", "hangup")
    },
    # the reason only comes with the final hangup
    (Phase.ENDING, "hangup"): (Phase.ENDING, "hungup"),
    (Phase.ENDED, "hangup"): (Phase.ENDED, "hungup"),
}


@dataclass(slots=True)
class Msg:
    """One history message; `turn` ties an assistant message to the caller turn it answers."""

    role: str
    text: str
    turn: int = 0


@dataclass(slots=True)
class _Piece:
    """One /say as the caller hears it: estimated start and end of its playback."""

    turn: int
    text: str
    start: float
    end: float


class Call:
    """One call's state machine. Feed it events and results; it returns commands."""

    def __init__(self, call_id: str, settings: CallSettings, *, direction: str = "") -> None:
        self.id = call_id
        self.settings = settings
        self.direction = direction
        self.phase = Phase.NEW
        self.status = ""
        self.hangup_reason = ""
        self.transcribe_id: str | None = None
        self.transcribe: SessionState = "none"
        self.speaking_id: str | None = None
        self.speaking: SessionState = "none"
        self.greeted = False
        self.turn = 0
        self.reply: Reply = "idle"
        self.history: list[Msg] = []
        if settings.system_prompt:
            self.history.append(Msg("system", settings.system_prompt))
        self.pending_stops: dict[str, tuple[Literal["speaking", "transcribe"], int]] = {}
        self._stopped: set[str] = set()
        self._queued: list[tuple[int, str]] = []  # says waiting for an active speaking session
        self._pieces: list[_Piece] = []
        self._talking_until = 0.0
        # answered caller transcripts: REST read-backs return them again and again
        self._seen: deque[str] = deque(maxlen=2000)
        self._seen_set: set[str] = set()
        self._attempts = {"speaking": 0, "transcribe": 0}
        self._poll_delay = settings.speaking_poll_s
        self._poll_started = 0.0
        self._turn_times: dict[str, float] = {}
        self._after_reply = ""  # "end_call" or "transfer:<number>" once the reply has played
        self._speech_since: float | None = None  # when the caller's current utterance began
        self._last_heard = 0.0  # last event from VoIPBIN about this call
        self._watch_delay = settings.watch_s
        self._last_caller = 0.0  # last sign of caller speech
        self._reprompts = 0
        self._restored = False  # rebuilt from the store after a restart
        self._sweep = False  # a speaking create ended without a clear answer
        self._hangup_pending = False  # we hung up; VoIPBIN has not confirmed yet
        self._transcribe_lost = False  # our transcribe ended: is the call still up?
        self._heard_words = False  # an interim came since the last speech boundary
        self._transcript_due = False  # an utterance ended and its transcript has not come

    # ---- entry point -------------------------------------------------------------------------

    def handle(self, event: Event | Result, now: float) -> list[Command]:
        """Apply one event or command result at time `now` (seconds, monotonic)."""
        if self.phase is Phase.ENDED and not isinstance(event, CallEvent):
            return self._late_result(event)
        if isinstance(event, (CallEvent, TranscriptEvent, SpeechEvent, TranscribeEvent)):
            self._last_heard = now
            # a transcript read back over REST again is old news, not the caller speaking now
            fresh = not isinstance(event, TranscriptEvent) or event.id not in self._seen_set
            if (
                isinstance(event, (TranscriptEvent, SpeechEvent))
                and event.direction == "in"
                and fresh
            ):
                self._last_caller = now
                self._reprompts = 0
        match event:
            case CallEvent():
                return self._on_call(event)
            case CallGone():
                return self._on_call_gone()
            case TranscriptEvent():
                return self._on_transcript(event, now)
            case SpeechEvent():
                return self._on_speech(event, now)
            case TranscribeEvent():
                return self._on_transcribe_event(event)
            case TranscribeStarted():
                return self._on_transcribe_started(event.transcribe_id)
            case TranscribeFailed():
                return self._on_transcribe_failed(event)
            case SpeakingStarted():
                return self._on_speaking_started(event, now)
            case SpeakingFailed():
                return self._on_speaking_failed(event)
            case SayFailed():
                return self._on_say_failed(event, now)
            case Stopped():
                return self._on_stopped(event)
            case ReplySentence():
                return self._on_sentence(event, now)
            case ReplyDone():
                return self._on_reply_done(event, now)
            case ReplyFailed():
                return self._on_reply_failed(event, now)
            case TimerFired():
                return self._on_timer(event.name, now)
            case TransferDone():
                return self._on_transfer_done(event)
            case HangupDone():
                return self._on_hangup_done(event)

    def is_talking(self, now: float) -> bool:
        """Whether the agent's audio is (estimated to be) still playing or queued.

        No pad here: cutting audio that already ended costs a stop and a new session."""
        return bool(self._queued) or now < self._talking_until

    # ---- call status -------------------------------------------------------------------------

    def _on_call(self, event: CallEvent) -> list[Command]:
        info = event.call
        if not self.direction:
            self.direction = info.direction
        status = "hangup" if event.deleted else info.status
        if self._transcribe_lost and status == "progressing" and self.phase.live:
            self._transcribe_lost = False
            s = self.settings
            self.transcribe = "starting"
            return [
                Record(self.id, "transcribe_restarted", {}),
                StartTranscribe(self.id, s.language, s.stt_provider),
            ]
        row = STATUS_TABLE.get((self.phase, status))
        if row is None:
            return []
        first = self.phase is Phase.NEW
        if status == "hangup":
            self._hangup_pending = False
        self.phase, action = row
        self.status = status
        # lost events (a call_hangup above all) are found by asking VoIPBIN when a call goes quiet
        watch = [StartTimer(self.id, "watch", self.settings.watch_s)] if first else []
        if action == "note":
            return [
                *watch,
                Record(self.id, "status", {"status": status, "direction": self.direction}),
            ]
        if action == "answer":
            return [*watch, *self._answer()]
        if action == "hungup":
            # VoIPBIN confirms the end: a hangup of ours no longer needs retrying
            return [
                *self._record_hangup(info.hangup_by, info.hangup_reason),
                *self._maybe_finished(),
            ]
        cmds = self._begin_end()
        if status == "hangup":
            cmds += self._record_hangup(info.hangup_by, info.hangup_reason)
        return cmds + self._maybe_finished()

    def _on_call_gone(self) -> list[Command]:
        self._hangup_pending = False
        if self.phase.over:
            return self._maybe_finished()
        self.phase = Phase.ENDING
        return [*self._begin_end(), *self._record_hangup("", "gone"), *self._maybe_finished()]

    def _record_hangup(self, by: str, reason: str) -> list[Command]:
        if self.hangup_reason:
            return []
        self.hangup_reason = reason or "normal"
        return [
            Record(
                self.id,
                "ended",
                {
                    "hangup_by": by,
                    "reason": self.hangup_reason,
                    "answered": self.greeted or self.turn > 0 or self.speaking_id is not None,
                },
            )
        ]

    def _answer(self) -> list[Command]:
        s = self.settings
        self.transcribe = "starting"
        self.speaking = "starting"
        return [
            Record(self.id, "answered", {"direction": self.direction}),
            StartTranscribe(self.id, s.language, s.stt_provider),
            StartSpeaking(self.id, s.language, s.tts_provider, s.voice_id),
            StartTimer(self.id, "max_call", s.max_call_s),
        ]

    def _begin_end(self) -> list[Command]:
        """Stop everything the call started; sessions still being created are stopped on arrival."""
        cmds: list[Command] = []
        if self.reply == "thinking":
            cmds.append(CancelBackend(self.id, self.turn))
            self.reply = "idle"
        self._queued.clear()
        if self.speaking_id and self.speaking in ("initiating", "active", "restarting"):
            cmds += self._stop("speaking", self.speaking_id)
        if self.transcribe_id and self.transcribe == "active":
            cmds += self._stop("transcribe", self.transcribe_id)
        if self._restored or self._sweep:
            # a session created just before a crash, or by a create whose answer was lost,
            # may never have told us its id
            self._restored = self._sweep = False
            cmds.append(SweepSpeakings(self.id))
        if self.speaking != "starting":
            self.speaking = "none"
        if self.transcribe != "starting":
            self.transcribe = "none"
        return cmds

    def _stop(self, kind: Literal["speaking", "transcribe"], sid: str) -> list[Command]:
        if sid in self.pending_stops or sid in self._stopped:
            return []
        self.pending_stops[sid] = (kind, 1)
        if kind == "speaking":
            return [StopSpeaking(self.id, sid)]
        return [StopTranscribe(self.id, sid)]

    def _on_hangup_done(self, event: HangupDone) -> list[Command]:
        if not self._hangup_pending:
            return []
        if event.ok:
            self._hangup_pending = False
            return self._maybe_finished()
        return [StartTimer(self.id, "retry_hangup", self.settings.retry_s)]

    def _maybe_finished(self) -> list[Command]:
        if (
            self.phase is Phase.ENDING
            and not self._hangup_pending
            and not self.pending_stops
            and self.speaking != "starting"
            and self.transcribe != "starting"
        ):
            self.phase = Phase.ENDED
            return [Finished(self.id)]
        return []

    def _late_result(self, event: Event | Result) -> list[Command]:
        """After the end only a session created late still needs stopping."""
        if isinstance(event, SpeakingStarted):
            return self._stop("speaking", event.speaking_id)
        if isinstance(event, TranscribeStarted):
            return self._stop("transcribe", event.transcribe_id)
        return []

    # ---- transcribe session ------------------------------------------------------------------

    def _on_transcribe_started(self, tid: str) -> list[Command]:
        if self.phase.over:
            self.transcribe = "none"
            return self._stop("transcribe", tid) + self._maybe_finished()
        self.transcribe_id = tid
        self.transcribe = "active"
        self._attempts["transcribe"] = 0
        return []

    def _on_transcribe_failed(self, event: TranscribeFailed) -> list[Command]:
        if self.phase.over:
            self.transcribe = "none"
            return self._maybe_finished()
        s = self.settings
        if event.status == 409:
            # one transcribe per call and language: the number's flow may have started it already
            return [FindTranscribe(self.id, s.language)]
        if event.status == 404 and event.reason == "not found":
            # looked for a running one (after a 409 or a restart): there is none, start one
            return [StartTranscribe(self.id, s.language, s.stt_provider)]
        self._attempts["transcribe"] += 1
        self.transcribe = "none"
        if self._attempts["transcribe"] >= s.max_attempts:
            return [
                Record(
                    self.id,
                    "error",
                    {"what": "transcribe failed", "status": event.status, "reason": event.reason},
                ),
                # no hangup: the caller still hears the agent, the silence reprompts end the
                # call politely, and the watch retries nothing it cannot fix
            ]
        return [StartTimer(self.id, "retry_transcribe", s.retry_s * self._attempts["transcribe"])]

    def _on_transcribe_event(self, event: TranscribeEvent) -> list[Command]:
        if event.status == "done" and event.id == self.transcribe_id:
            # ended by itself (the call hung up); no stop needed any more
            self.transcribe = "none"
            self.pending_stops.pop(event.id, None)
            self._stopped.add(event.id)
            if self.phase.live:
                # usually the call hung up and its event is still on the way; if VoIPBIN
                # says the call is up, the agent went deaf: start another one then
                self._transcribe_lost = True
                return [CheckCall(self.id)]
            return self._maybe_finished()
        return []

    # ---- speaking session --------------------------------------------------------------------

    def _on_speaking_started(self, event: SpeakingStarted, now: float) -> list[Command]:
        if self.phase.over:
            self.speaking = "none"
            return self._stop("speaking", event.speaking_id) + self._maybe_finished()
        if event.status == "stopped":
            return self._on_speaking_failed(SpeakingFailed(0, "session stopped", event.speaking_id))
        self.speaking_id = event.speaking_id
        if event.status != "active":
            if self.speaking != "initiating":
                self._poll_started = now
                self._poll_delay = self.settings.speaking_poll_s
            elif now - self._poll_started > self.settings.speaking_activate_timeout_s:
                self.speaking = "none"
                return self._stop("speaking", event.speaking_id) + self._restart_speaking()
            self.speaking = "initiating"
            delay = self._poll_delay
            self._poll_delay = min(self._poll_delay * 2, self.settings.speaking_poll_max_s)
            return [StartTimer(self.id, "poll_speaking", delay)]
        self.speaking = "active"
        self._attempts["speaking"] = 0
        cmds: list[Command] = []
        if not self.greeted:
            self.greeted = True
            self.phase = Phase.ACTIVE
            self._last_caller = max(self._last_caller, now)  # silence counts from the answer
            if self.settings.greeting:
                self.history.append(Msg("assistant", self.settings.greeting, 0))
                cmds += self._say(self.settings.greeting, 0, now)
            cmds += self._arm_silence(now)
        queued, self._queued = self._queued, []
        for turn, text in queued:
            if turn == self.turn:
                cmds += self._say(text, turn, now)
        return cmds

    def _on_speaking_failed(self, event: SpeakingFailed) -> list[Command]:
        if self.phase.over:
            self.speaking = "none"
            sweep = event.status == 0 or event.status >= 500
            return ([SweepSpeakings(self.id)] if sweep else []) + self._maybe_finished()
        self.speaking = "none"
        if event.status == 0 or event.status >= 500:
            # the create may have happened anyway, with an id we never learned
            self._sweep = True
        if event.speaking_id and event.speaking_id == self.speaking_id and event.status == 404:
            # the session we knew is gone (after a restart, or stopped behind our back)
            self.speaking_id = None
            return self._restart_speaking()
        self._attempts["speaking"] += 1
        if self._attempts["speaking"] >= self.settings.max_attempts:
            return [
                Record(
                    self.id,
                    "error",
                    {"what": "speaking failed", "status": event.status, "reason": event.reason},
                ),
                # the caller could never hear the agent: end the call rather than keep it mute
                *self._hang_up_now(),
            ]
        return [StartTimer(self.id, "retry_speaking", self.settings.retry_s)]

    def _restart_speaking(self) -> list[Command]:
        s = self.settings
        # one live session per call: whatever the old one's state, make sure it is stopped
        old = self._stop("speaking", self.speaking_id) if self.speaking_id else []
        self.speaking = "starting"
        self.speaking_id = None
        return [*old, StartSpeaking(self.id, s.language, s.tts_provider, s.voice_id)]

    def _on_say_failed(self, event: SayFailed, now: float) -> list[Command]:
        if self.phase.over or (event.turn not in (self.turn, 0)):
            return []
        if event.status == 404 and event.speaking_id != self.speaking_id:
            # a later sentence sent to the same dead session: say it on the new one, in order
            self._queued.append((event.turn, event.text))
            return []
        if event.status == 404:
            # the session is gone: nothing sent to it plays any more. Start a new one and say
            # it again (a 404 was never spoken).
            self._pieces = [p for p in self._pieces if p.end <= now]
            self._talking_until = now
            self._queued.insert(0, (event.turn, event.text))
            self.speaking = "none"
            return [
                Record(self.id, "speaking_lost", {"speaking_id": event.speaking_id}),
                *self._stop("speaking", event.speaking_id),
                *self._restart_speaking(),
            ]
        return [Record(self.id, "error", {"what": "say failed", "status": event.status})]

    def _on_stopped(self, event: Stopped) -> list[Command]:
        entry = self.pending_stops.pop(event.session_id, None)
        cmds: list[Command] = []
        if event.ok:
            self._stopped.add(event.session_id)
        if not event.ok and entry is not None:
            # an unconfirmed stop is never given up: the session bills until it is stopped.
            # It is retried ever less often, kept in the store, and re-sent after a restart.
            kind, attempts = entry
            self.pending_stops[event.session_id] = (kind, attempts + 1)
            delay = min(self.settings.retry_s * 2 ** (attempts - 1), 60.0)
            cmds.append(StartTimer(self.id, f"retry_stop:{event.session_id}", delay))
            if attempts == self.settings.max_attempts:
                cmds.append(Record(self.id, "leak", {"kind": kind, "session_id": event.session_id}))
        if (
            event.ok
            and event.kind == "speaking"
            and self.speaking == "restarting"
            and event.session_id == self.speaking_id
            and not self.phase.over
        ):
            # the barge-in cut is done; the next sentence needs a fresh session
            cmds += self._restart_speaking()
        return cmds + self._maybe_finished()

    # ---- conversation ------------------------------------------------------------------------

    def _seen_before(self, key: str) -> bool:
        if key in self._seen_set:
            return True
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(key)
        self._seen_set.add(key)
        return False

    def _on_transcript(self, event: TranscriptEvent, now: float) -> list[Command]:
        if event.direction != "in" or not event.message.strip():
            return []  # "out" is our own speech heard back: never answer it
        if self._seen_before(event.id) or not self.phase.live:
            return []
        cmds: list[Command] = []
        # the utterance began when its first speech event came; with none, when it arrived
        self._transcript_due = False
        began = self._speech_since if self._speech_since is not None else now
        if now - began > 15.0:
            began = now  # speech that never became a transcript (a cough): not this utterance
        self._speech_since = None
        if self.settings.barge_in != "off" and (
            self.reply == "thinking" or (self.is_talking(now) and began < self._talking_until)
        ):
            cmds += self._cut(now, "transcript")
        text = event.message.strip()
        self.turn += 1
        if self.history and self.history[-1].role == "user":
            # the last utterance got no reply (cut off, or one sentence split in two): one turn
            self.history[-1].text += " " + text
            self.history[-1].turn = self.turn
        else:
            self.history.append(Msg("user", text, self.turn))
        self.reply = "thinking"
        self._turn_times = {"transcript": now}
        return [*cmds, AskBackend(self.id, self.turn, self._history_window())]

    def _on_speech(self, event: SpeechEvent, now: float) -> list[Command]:
        s = self.settings
        if event.direction == "in" and self._speech_since is None and self.phase.live:
            self._speech_since = now
        due: list[Command] = []
        if event.direction == "in" and self.phase.live:
            ended = event.kind == "ended" or (event.kind == "boundary" and self._heard_words)
            self._heard_words = event.kind == "interim"
            if ended:
                # the utterance is over: its transcript should follow within a moment
                self._transcript_due = True
                due = [StartTimer(self.id, "transcript_due", s.transcript_due_s)]
        return due + self._speech_barge_in(event, now)

    def _speech_barge_in(self, event: SpeechEvent, now: float) -> list[Command]:
        s = self.settings
        if (
            s.barge_in != "speech"
            or event.direction != "in"
            or event.kind != "interim"
            or not self.phase.live
        ):
            return []  # a bare speech_started is a cough as often as a word: tentative only
        words = event.message.split()
        if len(words) < s.barge_in_min_words and len(event.message.strip()) < s.barge_in_min_chars:
            return []
        last_start = max((p.start for p in self._pieces), default=-1e9)
        if now - last_start < s.echo_guard_s:
            return []  # line echo or a breath right after we started talking
        if self.reply == "thinking" or self.is_talking(now):
            return self._cut(now, "speech")
        return []

    def _cut(self, now: float, trigger: str) -> list[Command]:
        """Barge-in: drop the stale reply, cut the audio, keep only what was heard."""
        cmds: list[Command] = [Record(self.id, "barge_in", {"turn": self.turn, "by": trigger})]
        if self.reply == "thinking":
            cmds.append(CancelBackend(self.id, self.turn))
            self.reply = "idle"
        self._queued.clear()
        playing = [p for p in self._pieces if p.end > now]
        if playing and self.speaking_id and self.speaking == "active":
            if self.settings.cut == "flush":
                cmds.append(Flush(self.id, self.speaking_id))
            else:
                self.speaking = "restarting"
                cmds += self._stop("speaking", self.speaking_id)
        self._truncate_history(now)
        self._pieces = []
        self._talking_until = now
        return cmds

    def _truncate_history(self, now: float) -> None:
        heard: dict[int, list[str]] = {}
        cut_turns: set[int] = set()
        for p in self._pieces:
            if p.end <= now:
                heard.setdefault(p.turn, []).append(p.text)
                continue
            cut_turns.add(p.turn)
            if p.start < now:
                n = int((now - p.start) * self.settings.chars_per_s)
                partial = p.text[:n].rsplit(" ", 1)[0] if " " in p.text[:n] else ""
                if partial:
                    heard.setdefault(p.turn, []).append(partial + " —")
        for turn in cut_turns:
            self._set_assistant(turn, " ".join(heard.get(turn, [])))

    def _set_assistant(self, turn: int, text: str) -> None:
        """Rewrite the assistant message of `turn` (turn 0 is the greeting)."""
        idx = self._assistant_index(turn)
        if idx is None:
            if text:
                self.history.append(Msg("assistant", text, turn))
        elif text:
            self.history[idx].text = text
        else:
            del self.history[idx]

    def _assistant_index(self, turn: int) -> int | None:
        for i, m in enumerate(self.history):
            if m.role == "assistant" and m.turn == turn:
                return i
        return None

    def _history_window(self) -> tuple[Message, ...]:
        msgs = [(m.role, m.text) for m in self.history]
        limit = self.settings.history_limit
        system = [m for m in msgs[:1] if m[0] == "system"]
        rest = msgs[len(system) :]
        return tuple(system + rest[-limit:])

    def _on_sentence(self, event: ReplySentence, now: float) -> list[Command]:
        if event.turn != self.turn or self.reply != "thinking" or not self.phase.live:
            return []  # stale: cut off by a barge-in or a newer turn
        text = event.text.strip()
        if not text:
            return []
        self._turn_times.setdefault("first_sentence", now)
        idx = self._assistant_index(self.turn)
        if idx is None:
            self.history.append(Msg("assistant", text, self.turn))
        else:
            self.history[idx].text += " " + text
        return self._say(text, self.turn, now)

    def _say(self, text: str, turn: int, now: float) -> list[Command]:
        if self.speaking != "active" or self.speaking_id is None:
            self._queued.append((turn, text))
            return []
        start = max(now, self._talking_until)
        end = start + len(text) / self.settings.chars_per_s
        self._pieces.append(_Piece(turn, text, start, end))
        self._pieces = [p for p in self._pieces if p.end > now or p.turn == turn]
        self._talking_until = end
        if turn:
            self._turn_times.setdefault("first_say", now)
            self._turn_times["last_say"] = now
        return [Say(self.id, self.speaking_id, text, turn)]

    def _on_reply_done(self, event: ReplyDone, now: float) -> list[Command]:
        if event.turn != self.turn or self.reply != "thinking":
            return []
        self.reply = "idle"
        if event.first_chunk_at is not None:
            self._turn_times["first_token"] = event.first_chunk_at
        cmds: list[Command] = [Record(self.id, "turn", self._timings(now)), *self._arm_silence(now)]
        if event.action and self.phase.live:
            # let the goodbye (or "transferring you now") finish playing first
            self._after_reply = event.action
            cmds.append(Record(self.id, "action", {"action": event.action}))
            wait = max(0.0, self._talking_until - now) + self.settings.playback_pad_s
            cmds.append(StartTimer(self.id, "after_reply", wait))
        return cmds

    def _arm_silence(self, now: float) -> list[Command]:
        """Start counting the caller's silence from when our audio ends."""
        if self.settings.silence_s <= 0:
            return []
        wait = max(0.0, self._talking_until - now) + self.settings.silence_s
        return [StartTimer(self.id, "silence", wait)]

    def _on_silence(self, now: float) -> list[Command]:
        s = self.settings
        if self.reply == "thinking" or self._after_reply:
            return []  # a reply is coming: its end arms the timer again
        if self.is_talking(now):
            return self._arm_silence(now)
        quiet_since = max(self._last_caller, self._talking_until)
        if now - quiet_since < s.silence_s - 0.05:  # timers fire a hair early or late
            return [StartTimer(self.id, "silence", quiet_since + s.silence_s - now)]
        self._reprompts += 1
        # a silent caller, or an STT that stopped hearing one (measured with Google's after ~5
        # minutes while the transcribe still says progressing): worth a warning either way
        quiet = Record(
            self.id,
            "stt_quiet",
            {"quiet_s": round(now - self._last_caller, 1), "stt_provider": s.stt_provider},
        )
        if self._reprompts > s.max_silence_reprompts:
            return [
                quiet,
                Record(self.id, "silence_hangup", {}),
                *self._goodbye(s.silence_goodbye, now),
            ]
        self.history.append(Msg("assistant", s.reprompt_text, self.turn))
        return [quiet, *self._say(s.reprompt_text, self.turn, now), *self._arm_silence(now)]

    def _goodbye(self, text: str, now: float) -> list[Command]:
        """Say `text`, then hang up once it has played."""
        cmds: list[Command] = []
        if self.reply == "thinking":
            cmds.append(CancelBackend(self.id, self.turn))
            self.reply = "idle"
        self._after_reply = "end_call"
        if text:
            self.history.append(Msg("assistant", text, self.turn))
            cmds += self._say(text, self.turn, now)
        wait = max(0.0, self._talking_until - now) + self.settings.playback_pad_s
        return [*cmds, StartTimer(self.id, "after_reply", wait)]

    def _on_watch(self, now: float) -> list[Command]:
        s = self.settings
        quiet = now - self._last_heard
        if quiet < s.watch_s:
            self._watch_delay = s.watch_s
            return [StartTimer(self.id, "watch", s.watch_s - quiet)]
        # nothing heard for a while: ask, and ask less often while it stays quiet
        delay, self._watch_delay = self._watch_delay, min(self._watch_delay * 2, s.watch_max_s)
        return [CheckCall(self.id), *self._fetch_transcripts(), StartTimer(self.id, "watch", delay)]

    def _fetch_transcripts(self) -> list[Command]:
        if self.phase.live and self.transcribe_id and self.transcribe == "active":
            return [FetchTranscripts(self.id, self.transcribe_id)]
        return []

    def _on_transfer_done(self, event: TransferDone) -> list[Command]:
        if not event.ok:
            return [Record(self.id, "error", {"what": "transfer failed", "error": event.error})]
        if self.phase.over:
            return []
        # the caller is with a human now: our sessions end, the call goes on without us
        self.phase = Phase.ENDING
        return [Record(self.id, "transferred", {}), *self._begin_end(), *self._maybe_finished()]

    def _timings(self, now: float) -> dict[str, object]:
        t0 = self._turn_times.get("transcript", now)
        out: dict[str, object] = {"turn": self.turn}
        for key in ("first_token", "first_sentence", "first_say", "last_say"):
            if key in self._turn_times:
                out[f"{key}_ms"] = round((self._turn_times[key] - t0) * 1000, 1)
        return out

    def _on_reply_failed(self, event: ReplyFailed, now: float) -> list[Command]:
        if event.turn != self.turn or self.reply != "thinking" or not self.phase.live:
            return []
        self.reply = "idle"
        cmds: list[Command] = [
            Record(self.id, "backend_failed", {"turn": event.turn, "error": event.error})
        ]
        if self.settings.fallback_text and self._assistant_index(self.turn) is None:
            self.history.append(Msg("assistant", self.settings.fallback_text, self.turn))
            cmds += self._say(self.settings.fallback_text, self.turn, now)
        return cmds

    # ---- timers ------------------------------------------------------------------------------

    def _on_timer(self, name: str, now: float) -> list[Command]:
        if name == "retry_hangup" and self._hangup_pending:
            return [Hangup(self.id)]
        if name.startswith("retry_stop:"):
            sid = name.partition(":")[2]
            entry = self.pending_stops.get(sid)
            if entry is None:
                return []
            if entry[0] == "speaking":
                return [StopSpeaking(self.id, sid)]
            return [StopTranscribe(self.id, sid)]
        if self.phase.over:
            return []
        s = self.settings
        if name == "poll_speaking" and self.speaking == "initiating" and self.speaking_id:
            return [PollSpeaking(self.id, self.speaking_id)]
        if name == "retry_speaking" and self.speaking == "none":
            return self._restart_speaking()
        if name == "retry_transcribe" and self.transcribe == "none":
            self.transcribe = "starting"
            return [StartTranscribe(self.id, s.language, s.stt_provider)]
        if name == "watch":
            return self._on_watch(now)
        if name == "transcript_due" and self._transcript_due:
            self._transcript_due = False
            return self._fetch_transcripts()
        if name == "silence" and self.phase.live:
            return self._on_silence(now)
        if name == "max_call" and self.phase.live:
            return [Record(self.id, "time_limit", {}), *self._goodbye(s.time_limit_goodbye, now)]
        if name == "after_reply" and self._after_reply:
            if self.is_talking(now) and self._talking_until > now:
                return [StartTimer(self.id, "after_reply", self._talking_until - now)]
            action, self._after_reply = self._after_reply, ""
            if action.startswith("transfer:"):
                return [Transfer(self.id, action.partition(":")[2])]
            return self._hang_up_now()
        return []

    def shutdown(self, now: float, goodbye: str = "") -> list[Command]:
        """The daemon is stopping for good: say `goodbye`, hang up, stop every session."""
        if self.phase.over:
            return []
        if goodbye and self.speaking == "active" and self.phase.live:
            return self._goodbye(goodbye, now)
        return self._hang_up_now()

    def _hang_up_now(self) -> list[Command]:
        """Hang up and stop the sessions without waiting for VoIPBIN's hangup event."""
        self.phase = Phase.ENDING
        self._hangup_pending = True  # until VoIPBIN confirms: a caller must not sit in silence
        return [
            Hangup(self.id),
            *self._begin_end(),
            *self._record_hangup("local", "normal"),
            *self._maybe_finished(),
        ]

    @property
    def replying(self) -> bool:
        """A reply is being prepared, or sentences wait for a speaking session."""
        return self.reply == "thinking" or bool(self._queued)

    # ---- surviving a restart ------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """What must survive a restart (the store's CallRecord fields)."""
        return {
            "call_id": self.id,
            "direction": self.direction,
            "phase": self.phase.value,
            "status": self.status,
            "transcribe_id": self.transcribe_id,
            "speaking_id": self.speaking_id,
            "pending_stops": tuple((kind, sid) for sid, (kind, _) in self.pending_stops.items()),
            "greeted": self.greeted,
            "turn": self.turn,
            "history": tuple((m.role, m.text) for m in self.history),
            "hangup_reason": self.hangup_reason,
            "seen_transcripts": tuple(self._seen)[-200:],
        }

    @classmethod
    def restore(cls, data: dict[str, Any], settings: CallSettings) -> Call:
        """Rebuild a call from its snapshot; `resume()` then finds out what is still true."""
        call = cls(str(data["call_id"]), settings, direction=str(data.get("direction", "")))
        call.phase = Phase(data["phase"])
        call.status = str(data.get("status", ""))
        call.hangup_reason = str(data.get("hangup_reason", ""))
        call.transcribe_id = data.get("transcribe_id")
        call.speaking_id = data.get("speaking_id")
        call.pending_stops = {sid: (kind, 1) for kind, sid in data.get("pending_stops", ())}
        call.greeted = bool(data.get("greeted"))
        call.turn = int(data.get("turn", 0))
        users = 0
        call.history = []
        for role, text in data.get("history", ()):
            users += role == "user"
            call.history.append(Msg(role, text, users))
        for tid in data.get("seen_transcripts", ()):
            call._seen_before(tid)
        call._restored = True
        return call

    def resume(self, now: float) -> list[Command]:
        """After a restart: re-check the call, re-send unconfirmed stops, re-attach sessions."""
        self._last_heard = now
        cmds: list[Command] = [
            CheckCall(self.id),
            StartTimer(self.id, "watch", self.settings.watch_s),
        ]
        for sid, (kind, _) in self.pending_stops.items():
            cmds.append(
                StopSpeaking(self.id, sid) if kind == "speaking" else StopTranscribe(self.id, sid)
            )
        if self.phase.over:
            self._restored = False
            return [*cmds, SweepSpeakings(self.id), *self._maybe_finished()]
        if not self.phase.live:
            return cmds
        s = self.settings
        # a session we created may be gone (VoIPBIN restarted it, or it was stopped): verify
        self.speaking = "initiating" if self.speaking_id else "starting"
        cmds.append(
            PollSpeaking(self.id, self.speaking_id)
            if self.speaking_id
            else StartSpeaking(self.id, s.language, s.tts_provider, s.voice_id)
        )
        self.transcribe = "starting"
        cmds.append(FindTranscribe(self.id, s.language))
        return [*cmds, StartTimer(self.id, "max_call", s.max_call_s), *self._arm_silence(now)]

    def check(self) -> list[Command]:
        """Reconcile after a gap in the event stream: ask VoIPBIN how the call is."""
        return [] if self.phase is Phase.ENDED else [CheckCall(self.id)]
