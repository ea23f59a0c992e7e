"""Surviving a restart (snapshot, restore, resume) and a handler that raised (fail)."""

from __future__ import annotations

from typing import Any, Self

from agentd.call.core import CallCore, Input
from agentd.call.history import History
from agentd.call.ledger import StopInput
from agentd.call.phase import Phase, PhaseMachine
from agentd.call.session import SessionInput, SessionMachine
from agentd.call.settings import CallSettings
from agentd.call.turn import TurnMachine
from agentd.commands import (
    CallGone,
    CancelBackend,
    CheckCall,
    Command,
    FindTranscribe,
    Finished,
    Hangup,
    HangupDone,
    PollSpeaking,
    Record,
    SpeakingStarted,
    StartTimer,
    Stopped,
    SweepDone,
    TimerFired,
    TranscribeStarted,
)
from agentd.events import CallEvent
from agentd.names import Action, EndCall, Kind, Timer, TimerKind, TransferTo

#: how long a goodbye said just before a restart may still play: its action waits that long
GOODBYE_S = 3.0


def _action(saved: str) -> Action | None:
    """The action after the reply, as `str(action)` saved it ("" for none)."""
    if saved == str(EndCall()):
        return EndCall()
    if saved.startswith("transfer:"):
        return TransferTo(saved.removeprefix("transfer:"))
    return None


class Recovery(CallCore):
    """What outlives the process, and the clean end of a call whose handler raised."""

    __slots__ = ()

    def fail(self, error: str) -> list[Command]:
        """A handler raised: end the call cleanly, whatever state the machines were left in.

        Everything with an id is stopped and the call hung up (a caller must not sit with a
        broken agent); from now on the call takes only the results of that cleanup."""
        self.failed = True
        cmds: list[Command] = [Record(self.id, Kind.FAILED, {"error": error})]
        if self.turns.replying:
            cmds.append(CancelBackend(self.id, self.turns.turn))
        self.phases.phase = Phase.ENDING  # the machines may be inconsistent: no table applies
        for session in (self.speaking, self.transcribe):
            if session.id:
                cmds += self._stop(session.kind, session.id)
        self.ledger.hangup_pending = True
        cmds += [Hangup(self.id), *self._sweep()]
        return cmds + self._finished_after_failure()

    def _finished_after_failure(self) -> list[Command]:
        if self.phase is Phase.ENDING and self.ledger.clean:
            self.phases.phase = Phase.ENDED
            return [Finished(self.id)]
        return []

    def _cleanup_only(self, event: Input, _now: float) -> list[Command]:
        """A failed call: stops and the hangup are confirmed or retried; the rest is dropped."""
        cmds: list[Command] = []
        match event:
            case Stopped(ok=True):
                self.ledger.step(event.session_id, StopInput.ENDED, event.kind)
            case Stopped():
                cmds += self._stop_failed(event.kind, event.session_id, event.status)
            case TimerFired(timer=Timer(kind=TimerKind.RETRY_STOP, session_id=sid)):
                cmds += self._retry_stop(sid)
            case TimerFired(timer=Timer(kind=TimerKind.RETRY_HANGUP)) if self.ledger.hangup_pending:
                cmds.append(Hangup(self.id))
            case TimerFired(timer=Timer(kind=TimerKind.RETRY_SWEEP)) if self.ledger.sweeping:
                cmds += self._sweep()
            case SweepDone():
                cmds += self._sweep_done(event)
            case HangupDone(ok=False) if self.ledger.hangup_pending:
                cmds += self._hangup_failed()
            case HangupDone() | CallGone():
                self.ledger.hangup_pending = False
            case CallEvent() if event.deleted or event.call.status == "hangup":
                self.ledger.hangup_pending = False
            case SpeakingStarted() | TranscribeStarted():
                cmds += self._late_result(event)
        return cmds + self._finished_after_failure()

    def snapshot(self) -> dict[str, Any]:
        """What must survive a restart (the store's CallRecord fields)."""
        return {
            "call_id": self.id,
            "direction": self.direction,
            "phase": self.phase.value,
            "status": self.status,
            "transcribe_id": self.transcribe.id,
            "speaking_id": self.speaking.id,
            "pending_stops": self.ledger.unconfirmed(),
            "greeted": self.greeted,
            "turn": self.turns.turn,
            "history": self.history.pairs(),
            "hangup_reason": self.hangup_reason,
            "seen_transcripts": self.turns.seen_ids(),
            "hangup_pending": self.ledger.hangup_pending,
            "after_reply": str(self.after_reply) if self.after_reply is not None else "",
        }

    @classmethod
    def restore(cls, data: dict[str, Any], settings: CallSettings) -> Self:
        """Rebuild a call from its snapshot; `resume()` then finds out what is still true."""
        call = cls(str(data["call_id"]), settings, direction=str(data.get("direction", "")))
        call.phases = PhaseMachine(Phase(data["phase"]))
        call.status = str(data.get("status", ""))
        call.hangup_reason = str(data.get("hangup_reason", ""))
        call.transcribe = SessionMachine("transcribe", data.get("transcribe_id"))
        call.speaking = SessionMachine("speaking", data.get("speaking_id"))
        call.ledger.restore(list(data.get("pending_stops", ())))
        call.ledger.hangup_pending = bool(data.get("hangup_pending"))
        action = _action(str(data.get("after_reply") or ""))
        if isinstance(action, TransferTo):
            # checked again: the allow-list may have changed since (a config reload)
            allowed = call.allowed_number(action.number)
            action = None if allowed is None else TransferTo(allowed)
        call.after_reply = action
        call.greeted = bool(data.get("greeted"))
        call.turns = TurnMachine(int(data.get("turn", 0)))
        call.history = History.restore(
            data.get("history", ()), call.turns.turn, History.keep_for(settings.history_limit)
        )
        for tid in data.get("seen_transcripts", ()):
            call.turns.mark_seen(tid)
        # a session created just before the crash may never have told us its id
        call.ledger.sweep_needed = True
        call.age_s = float(data.get("age_s", 0.0))
        return call

    def resume(self, now: float) -> list[Command]:
        """After a restart: re-check the call, re-send unconfirmed stops, re-attach sessions."""
        self.last_heard = now
        # the caller's last words were timed on the dead process's clock: their silence counts
        # from here (else the first reprompt would report them quiet for the host's uptime)
        self.last_caller = now
        if self.age_s > 0 and (self.phase.live or self.greeted or self.speaking.id is not None):
            # answered before the restart: its duration counts from then (the store's age of
            # the call), not from this process's first sight of it
            self.report.answered(now - self.age_s)
        self._restored(now)
        cmds: list[Command] = [
            CheckCall(self.id),
            StartTimer(self.id, Timer(TimerKind.WATCH), self.settings.watch_s),
        ]
        for sid, (kind, _) in self.ledger.pending.items():
            cmds.append(self._stop_command(kind, sid))
        if self.ledger.hangup_pending:
            # VoIPBIN never confirmed it: sent again (idempotent), or the caller would be left
            # on the line with nobody; the call is not finished until it is confirmed
            cmds.append(Hangup(self.id))
        if self.phase.over:
            self.ledger.sweep_needed = False
            # answered (a voice was up) with no transcribe known: the start sent with it may
            # still make one, after the hangup (a restart in the gap of the last restart: the
            # sweep that waited for it is not in the store)
            answered = self.speaking.id is not None or self.greeted
            self.ledger.transcribes_unsure = answered and not self.transcribe.id
            return [*cmds, *self._sweep(), *self._maybe_finished()]
        if not self.phase.live:
            return cmds
        s = self.settings
        # a session we created may be gone (VoIPBIN restarted it, or it was stopped): verify
        if self.speaking.id:
            self.speaking.step(SessionInput.VERIFY)
            self.speaking.poll_started = now  # the activation timeout counts from here
            self.speaking.poll_delay = s.speaking_poll_s
            cmds.append(PollSpeaking(self.id, self.speaking.id))
        else:
            self.speaking.step(SessionInput.START)
            cmds.append(self._start_speaking())
        tid = self.transcribe.id
        self.ledger.transcribes_unsure = not tid
        self.transcribe.step(SessionInput.START)
        self.transcribe.id = tid  # kept until the find answers: transcripts still route by it
        cmds.append(FindTranscribe(self.id, s.language, self.ledger.known()))
        # the time limit counts from the call's start, not from this restart
        left = max(0.0, s.max_call_s - self.age_s)
        timer = StartTimer(self.id, Timer(TimerKind.MAX_CALL), left)
        if self.after_reply is not None:
            # a goodbye was said for it before the restart, and may still be playing
            cmds.append(StartTimer(self.id, Timer(TimerKind.AFTER_REPLY), GOODBYE_S))
        return [*cmds, timer, *self.arm_silence(now), *self._resume_turn(now)]

    def fingerprint(self) -> tuple[object, ...]:
        """Cheap to compare: when it changes, the call's snapshot is worth saving again."""
        return (
            self.phase,
            self.status,
            self.transcribe.id,
            self.speaking.id,
            tuple(self.ledger.pending),
            tuple(self.ledger.awaiting),
            self.ledger.hangup_pending,
            self.after_reply,
            self.greeted,
            self.turns.turn,
            len(self.history),
            self.history.last_text,
            self.hangup_reason,
        )
