"""The call's session handlers: creates, polls, /say failures and stops (docs/protocol.md §8).

One live speaking session per call; a create that fails is retried (through a short outage,
a few times when refused), a session that is gone is replaced, and the audio cut of a barge-in is
a stop followed by a new session. A transcribe is retried through an outage however long: the
call lives on without it, and the caller is heard again once it is back.
"""

from __future__ import annotations

from agentd.call.core import TRANSCRIBE_SWEEP_S, CallCore, backoff, outage
from agentd.call.ledger import StopInput
from agentd.call.session import SessionInput, SessionState
from agentd.call.turn import TurnState
from agentd.commands import (
    NOT_FOUND,
    ORPHAN,
    CheckCall,
    Command,
    FindTranscribe,
    PollSpeaking,
    Record,
    Say,
    SayFailed,
    SpeakingFailed,
    SpeakingStarted,
    StartTimer,
    StartTranscribe,
    Stopped,
    SweepTranscribes,
    TranscribeFailed,
    TranscribesFound,
    TranscribeStarted,
    WriteAhead,
)
from agentd.events import TranscribeEvent
from agentd.names import Kind, Timer, TimerKind

_SAY_5XX_WINDOW_S = 10.0  # /say 5xx further apart than this are not "in a row"


class Sessions(CallCore):
    """Results of the session commands, and the session timers."""

    __slots__ = ()

    def _on_transcribe_started(self, event: TranscribeStarted, now: float) -> list[Command]:
        if self.phase.over:
            self.transcribe.step(SessionInput.ABANDON)
            return self._stop("transcribe", event.transcribe_id) + self._maybe_finished()
        t = self.transcribe
        cmds: list[Command] = []
        if t.attempts >= self.settings.max_attempts:
            # the end of a `transcribe_down`: the operator sees how long the caller was unheard
            down_s = round(now - t.failing_since, 1)
            data = {"why": "outage over", "down_s": down_s, "attempts": t.attempts}
            cmds.append(Record(self.id, Kind.TRANSCRIBE_RESTARTED, data))
            # brand new: the silence reprompt that follows need not replace it in case it is deaf
            self.stt_replaced = True
            # and the caller's silence counts from now: nobody could hear them until now
            self.last_caller = now
            self.reprompts = 0
        t.step(SessionInput.ACTIVE, event.transcribe_id)
        self.transcribe_409s = 0
        self.transcribe_refused = False
        if self.ledger.transcribes_unsure:
            # the start the last agentd sent may still make one: looked for once it must have
            self.ledger.transcribes_unsure = False
            cmds.append(StartTimer(self.id, Timer(TimerKind.SWEEP_TRANSCRIBES), TRANSCRIBE_SWEEP_S))
        return cmds + self._on_transcribe_up(now)

    def _on_transcribe_up(self, now: float) -> list[Command]:
        if self.greet_waiting:  # the voice was up first: now the caller's answer is heard
            return self._greet_when_heard(now) + self._say_queued(now)
        return []

    def _sweep_transcribes_timer(self, _now: float) -> list[Command]:
        if self.ledger.transcribes_to_sweep:
            return [SweepTranscribes(self.id, self.settings.language, "")]  # the call is over
        t = self.transcribe
        if not t.active or t.id is None:
            return []
        return [SweepTranscribes(self.id, self.settings.language, t.id)]

    def _on_transcribes_found(self, event: TranscribesFound, _now: float) -> list[Command]:
        """Live transcribes of the call that are not ours: billed for nothing, stopped."""
        cmds: list[Command] = []
        for tid in event.ids:
            if tid != self.transcribe.id and tid not in self.ledger.known():
                cmds += [Record(self.id, Kind.STRAY, {"kind": "transcribe", "session_id": tid})]
                cmds += self._stop("transcribe", tid)
        if self.ledger.transcribes_to_sweep:
            s = self.settings
            if not event.ok:
                # over, and VoIPBIN did not list them: looked for again as a stop is retried,
                # through an outage however long, given up after `max_stop_attempts` refusals
                # (counted apart from the speakings' sweep, which may be failing at the same end)
                self.ledger.transcribe_sweep_failures += 1
                failures = self.ledger.transcribe_sweep_failures
                if failures < s.max_stop_attempts or outage(event.status):
                    delay = backoff(s.retry_s, failures, s.watch_max_s)
                    return [StartTimer(self.id, Timer(TimerKind.SWEEP_TRANSCRIBES), delay)]
                cmds.append(self._error("transcribe sweep failed", event.status))
            self.ledger.transcribes_to_sweep = False
            cmds += self._maybe_finished()
        return cmds

    def _on_transcribe_failed(self, event: TranscribeFailed, now: float) -> list[Command]:
        if self.phase.over:
            self.transcribe.step(SessionInput.ABANDON)
            return self._maybe_finished()
        s, t = self.settings, self.transcribe
        if event.status == 409 and event.reason != ORPHAN:
            # one transcribe per call and language: the number's flow may have started it
            # already, or one we gave up on (an orphan) still blocks it: the find deletes that.
            # Counted: a 409 whose transcribe is never found would otherwise loop unpaced
            self.transcribe_409s += 1
            if self.transcribe_409s > s.max_attempts:
                t.failed(now)
                return self._transcribe_refused(event)
            return [FindTranscribe(self.id, s.language, self.ledger.known())]
        if event.status == 404 and event.reason == NOT_FOUND:
            # looked for a running one (after a 409 or a restart): there is none, start one;
            # after a 409, a little later (VoIPBIN may be ending the one that answered it)
            if self.transcribe_409s:
                t.failed(now)
                delay = s.retry_s * self.transcribe_409s
                return [StartTimer(self.id, Timer(TimerKind.RETRY_TRANSCRIBE), delay)]
            return [WriteAhead(self.id), StartTranscribe(self.id, s.language, s.stt_provider)]
        if outage(event.status) and self.transcribe_409s:
            # the find after a 409 got no answer: that 409 says nothing of a transcribe never
            # found, and an outage is paced (below) however long it lasts
            self.transcribe_409s -= 1
        t.failed(now)
        if not outage(event.status) and t.attempts >= s.max_attempts:
            return self._transcribe_refused(event)
        delay = backoff(s.retry_s, t.attempts, s.transcribe_retry_max_s)
        retry = StartTimer(self.id, Timer(TimerKind.RETRY_TRANSCRIBE), delay)
        if t.attempts != s.max_attempts:
            return [retry]
        # an outage that outlasts the first retries: the caller talks to nobody until it ends,
        # which may be any moment (once per outage: it is retried up to `transcribe_retry_max_s`)
        data: dict[str, object] = {"status": event.status, "attempts": t.attempts}
        data["retry_in_s"] = delay
        if event.reason:
            data["reason"] = event.reason
        return [Record(self.id, Kind.TRANSCRIBE_DOWN, data), retry]

    def _transcribe_refused(self, event: TranscribeFailed) -> list[Command]:
        """VoIPBIN refused every create (a 4xx): no retry changes that. No hangup either: the
        caller still hears the agent, and the silence reprompts end the call politely."""
        self.transcribe_refused = True
        return [self._error("transcribe failed", event.status, event.reason)]

    def _on_transcribe_event(self, event: TranscribeEvent, _now: float) -> list[Command]:
        if event.status != "done" or event.id != self.transcribe.id:
            return []
        # ended by itself (the call hung up); no stop needed any more
        self.ledger.step(event.id, StopInput.ENDED, "transcribe")
        if self.transcribe.starting:
            return []  # the old one of a restart: the find under way decides what comes next
        self.transcribe.step(SessionInput.LOST)
        if self.phase.live:
            # usually the call hung up and its event is still on the way; if VoIPBIN says the
            # call is up, the agent went deaf: start another one then
            self.transcribe_lost = True
            return [CheckCall(self.id)]
        return self._maybe_finished()

    def _on_speaking_started(self, event: SpeakingStarted, now: float) -> list[Command]:
        if self.phase.over:
            self.speaking.step(SessionInput.ABANDON)
            return self._stop("speaking", event.speaking_id) + self._maybe_finished()
        if event.status == "stopped":
            return self._on_speaking_failed(
                SpeakingFailed(0, "session stopped", event.speaking_id), now
            )
        s = self.settings
        if event.status != "active":
            was_polling = self.speaking.state is SessionState.INITIATING
            if was_polling and now - self.speaking.poll_started > s.speaking_activate_timeout_s:
                self.speaking.failed(now)
                return self._stop("speaking", event.speaking_id) + self._start("speaking")
            delay = self.speaking.next_poll(now, s.speaking_poll_s, s.speaking_poll_max_s)
            self.speaking.step(SessionInput.INITIATING, event.speaking_id)
            return [StartTimer(self.id, Timer(TimerKind.POLL_SPEAKING), delay)]
        self.speaking.step(SessionInput.ACTIVE, event.speaking_id)
        return self._greet_when_heard(now) + self._say_queued(now)

    def _greet_timer(self, now: float) -> list[Command]:
        """The transcribe is still not up: greet all the same, the caller waited long enough."""
        if not self.greet_waiting or not self.phase.live:
            return []
        self.greet_waiting = False  # it fired: nothing to cancel
        if self.greeted or not self.speaking.active:
            return []  # the voice was lost meanwhile: its return greets
        return self._greet_now(now) + self._say_queued(now)

    def _on_speaking_failed(self, event: SpeakingFailed, now: float) -> list[Command]:
        unclear = event.status == 0 or event.status >= 500
        if self.phase.over:
            self.speaking.step(SessionInput.ABANDON)
            return (self._sweep() if unclear else []) + self._maybe_finished()
        if unclear:
            # the create may have happened anyway, with an id we never learned
            self.ledger.sweep_needed = True
        if event.speaking_id and event.speaking_id == self.speaking.id and event.status == 404:
            # the session we knew is gone (after a restart, or stopped behind our back)
            self.speaking.step(SessionInput.LOST)
            self.speaking.id = None
            return self._start("speaking")
        speaking, s = self.speaking, self.settings
        speaking.failed(now)
        if outage(event.status):
            # VoIPBIN may be back in a moment (a gateway blip, a rolling restart): a few
            # seconds of it must not cost the caller the call
            over = now - speaking.failing_since >= s.speaking_outage_s
            delay = backoff(s.retry_s, speaking.attempts, s.speaking_retry_max_s)
        else:
            over, delay = speaking.attempts >= s.max_attempts, s.retry_s
        if over:
            # the caller could never hear the agent: end the call rather than keep it mute
            return [
                self._error("speaking failed", event.status, event.reason),
                *self._hang_up_now(),
            ]
        return [StartTimer(self.id, Timer(TimerKind.RETRY_SPEAKING), delay)]

    def _on_say_failed(self, event: SayFailed, now: float) -> list[Command]:
        if self.phase.over or (event.turn not in (self.turns.turn, 0)):
            return []
        # a 404 was never spoken (the tts-manager answers every say error so), nor a 500 (the
        # gateway's own failure, or its circuit breaker failing fast: it never reached a pod),
        # nor a 503 where the say only queues text (no live pod for the session). With aws the
        # pod synthesises, and waits for room in its audio buffer, before it answers: a 503
        # there is as likely a say that outlived the gateway's 3 s budget and plays all the
        # same, and a sentence said twice is worse than one lost. Text the caller cut off
        # stays unsaid. Nor a 429: VoIPBIN's rate limiter refused it before anything ran (the
        # client waits out a Retry-After up to the say's deadline; this one ran past it).
        unsaid = (
            event.status in (404, 429, 500)
            or (event.status == 503 and self.settings.tts_provider != "aws")
        ) and self.turns.state is not TurnState.CUT
        if event.speaking_id != self.speaking.id:
            if unsaid:
                # a later sentence sent to the same dead session: say it on the new one, in order
                self.playback.queued.append((event.turn, event.text))
            return []
        if event.status >= 500:
            # "in a row": a /say that succeeds reports nothing, so failures far apart are
            # counted apart
            if now - self.say_5xx_at > _SAY_5XX_WINDOW_S:
                self.say_5xx = 0
            self.say_5xx += 1
            self.say_5xx_at = now
        replace = event.status == 404 or self.say_5xx >= self.settings.say_5xx_limit
        if replace:
            if unsaid:
                self.playback.queued.insert(0, (event.turn, event.text))
            # 404: the session is gone. 5xx again and again: the tts pod that owns it is gone,
            # and only a DELETE removes it (docs/protocol.md §8.3)
            return self._replace_speaking(event, now, delete=event.status != 404)
        error = self._error("say failed", event.status)
        if unsaid and self.speaking.id is not None:
            return [error, Say(self.id, self.speaking.id, event.text, event.turn)]
        return [error]

    def _replace_speaking(self, event: SayFailed, now: float, *, delete: bool) -> list[Command]:
        """Every /say on the session fails: a new one, a bounded number of times per call."""
        self.playback.lost(now)
        self.speaking.step(SessionInput.LOST)
        self.speaking_restarts += 1
        lost = Record(
            self.id,
            Kind.SPEAKING_LOST,
            {"speaking_id": event.speaking_id, "status": event.status},
        )
        stop = self._stop("speaking", event.speaking_id, delete=delete)
        if self.speaking_restarts > self.settings.max_speaking_restarts:
            # a voice the TTS provider refuses makes VoIPBIN answer 404 to every /say (§8.1):
            # new sessions would only burn the account's request budget in silence
            s = self.settings
            error = self._error("say refused on every session", event.status)
            error.data.update(tts_provider=s.tts_provider, voice_id=s.voice_id)
            self.playback.queued.clear()
            return [lost, *stop, error, *self._hang_up_now()]
        return [lost, *stop, *self._start("speaking")]

    def _on_stopped(self, event: Stopped, _now: float) -> list[Command]:
        sid = event.session_id
        if not event.ok:
            return self._stop_failed(event.kind, sid, event.status) + self._maybe_finished()
        self.ledger.step(sid, StopInput.OK, event.kind)
        cmds: list[Command] = []
        if event.unstopped:
            # the row is deleted but its stream ran on a pod that could not stop it: its
            # `speaking_stopped`, which ends the billing, never comes, and no request of ours
            # can end it any more (the row is gone): the operator must hear of it
            data = {"kind": event.kind, "session_id": sid, "status": 200, "gave_up": True}
            cmds.append(Record(self.id, Kind.LEAK, {**data, "unstopped": True}))
        if (
            event.kind == "speaking"
            and self.speaking.state is SessionState.STOPPING
            and sid == self.speaking.id
            and not self.phase.over
        ):
            # the barge-in cut is done; the next sentence needs a fresh session
            self.speaking.step(SessionInput.STOPPED)
            cmds += self._start("speaking")
        return cmds + self._maybe_finished()

    def _poll_timer(self, _now: float) -> list[Command]:
        if self.speaking.state is SessionState.INITIATING and self.speaking.id:
            return [PollSpeaking(self.id, self.speaking.id)]
        return []

    def _retry_speaking_timer(self, _now: float) -> list[Command]:
        return self._start("speaking") if self.speaking.state is SessionState.NONE else []

    def _retry_transcribe_timer(self, _now: float) -> list[Command]:
        return self._start("transcribe") if self.transcribe.state is SessionState.NONE else []
