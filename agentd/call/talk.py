"""The conversation half of the call router: transcripts, speech, replies, silence.

Caller transcripts go to the backend; each sentence of the reply is spoken with /say as soon as it
exists. Caller speech while the agent is talking or thinking is a barge-in: the stale reply is
cancelled by turn id and the audio is cut — by /flush where the provider really cuts (gcp), else
by /stop and a fresh session (the only hard cut with ElevenLabs, docs/protocol.md §8.2). History
keeps only what the caller could have heard.
"""

from __future__ import annotations

from agentd.call.core import CallCore
from agentd.call.session import SessionInput
from agentd.call.turn import TurnInput
from agentd.commands import (
    AskBackend,
    CancelBackend,
    CheckCall,
    Command,
    Flush,
    Record,
    ReplyDone,
    ReplyFailed,
    ReplySentence,
    StartTimer,
)
from agentd.events import SpeechEvent, TranscriptEvent
from agentd.names import Kind, Timer, TimerKind

_STALE_SPEECH_S = 15.0  # speech that long before its transcript was another utterance (a cough)


class Conversation(CallCore):
    """Turn taking, replies and silence."""

    def on_transcript(self, event: TranscriptEvent, now: float) -> list[Command]:
        """A final caller transcript opens a turn and asks the backend."""
        if event.direction != "in" or not event.message.strip():
            return []  # "out" is our own speech heard back: never answer it
        if not self.turns.mark_seen(event.id) or not self.phase.live:
            return []
        cmds: list[Command] = []
        # the utterance began when its first speech event came; with none, when it arrived
        self.transcript_due = False
        began = self.speech_since if self.speech_since is not None else now
        if now - began > _STALE_SPEECH_S:
            began = now
        self.speech_since = None
        p = self.playback
        if self.settings.barge_in != "off" and (
            self.turns.replying or (p.talking(now) and began < p.until)
        ):
            cmds += self._cut(now, "transcript")
        self.turns.step(TurnInput.TRANSCRIPT)
        self.history.user(event.message.strip(), self.turns.turn)
        self.turn_times = {"transcript": now}
        window = self.history.window(self.settings.history_limit)
        return [*cmds, AskBackend(self.id, self.turns.turn, window)]

    def on_speech(self, event: SpeechEvent, now: float) -> list[Command]:
        """Speech events: when an utterance began and ended, and barge-in by interims."""
        due: list[Command] = []
        if event.direction == "in" and self.phase.live:
            if self.speech_since is None:
                self.speech_since = now
            ended = event.kind == "ended" or (event.kind == "boundary" and self.heard_words)
            self.heard_words = event.kind == "interim"
            if ended:
                # the utterance is over: its transcript should follow within a moment
                self.transcript_due = True
                timer = Timer(TimerKind.TRANSCRIPT_DUE)
                due = [StartTimer(self.id, timer, self.settings.transcript_due_s)]
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
        if now - self.playback.last_start() < s.echo_guard_s:
            return []  # line echo or a breath right after we started talking
        if self.turns.replying or self.playback.talking(now):
            return self._cut(now, "speech")
        return []

    def _cut(self, now: float, trigger: str) -> list[Command]:
        """Barge-in: drop the stale reply, cut the audio, keep only what was heard."""
        turn = self.turns.turn
        cmds: list[Command] = [Record(self.id, Kind.BARGE_IN, {"turn": turn, "by": trigger})]
        if self.turns.replying:
            cmds.append(CancelBackend(self.id, turn))
        self.turns.step(TurnInput.CUT)
        if self.playback.playing(now) and self.speaking.active:
            assert self.speaking.id is not None
            if self.settings.cut == "flush":
                cmds.append(Flush(self.id, self.speaking.id))
            else:
                self.speaking.step(SessionInput.CUT)
                cmds += self._stop("speaking", self.speaking.id)
        for cut_turn, heard in self.playback.cut(now, self.settings.chars_per_s).items():
            self.history.set_reply(cut_turn, heard)
        return cmds

    def on_sentence(self, event: ReplySentence, now: float) -> list[Command]:
        """One sentence of the current reply: speak it now."""
        if not self.turns.current(event.turn) or not self.phase.live:
            return []  # stale: cut off by a barge-in or a newer turn
        text = event.text.strip()
        if not text:
            return []
        self.turn_times.setdefault("first_sentence", now)
        self.history.extend_reply(text, self.turns.turn)
        self.turns.step(TurnInput.SENTENCE)
        return self._say(text, self.turns.turn, now)

    def on_reply_done(self, event: ReplyDone, now: float) -> list[Command]:
        """The reply is complete: record its timings, then run the action it asked for."""
        if not self.turns.current(event.turn):
            return []
        self.turns.step(TurnInput.DONE)
        if event.first_chunk_at is not None:
            self.turn_times["first_token"] = event.first_chunk_at
        cmds: list[Command] = [
            Record(self.id, Kind.TURN, self._timings(now)),
            *self.arm_silence(now),
        ]
        if event.action is not None and self.phase.live:
            # let the goodbye (or "transferring you now") finish playing first
            self.after_reply = event.action
            cmds.append(Record(self.id, Kind.ACTION, {"action": str(event.action)}))
            wait = self.playback.remaining(now) + self.settings.playback_pad_s
            cmds.append(StartTimer(self.id, Timer(TimerKind.AFTER_REPLY), wait))
        return cmds

    def on_reply_failed(self, event: ReplyFailed, now: float) -> list[Command]:
        """The backend failed: say the fallback line unless part of the reply was said."""
        if not self.turns.current(event.turn) or not self.phase.live:
            return []
        self.turns.step(TurnInput.FAILED)
        cmds: list[Command] = [
            Record(self.id, Kind.BACKEND_FAILED, {"turn": event.turn, "error": event.error})
        ]
        fallback = self.settings.fallback_text
        if fallback and not self.history.has_reply(self.turns.turn):
            self.history.assistant(fallback, self.turns.turn)
            cmds += self._say(fallback, self.turns.turn, now)
        return cmds

    def _timings(self, now: float) -> dict[str, object]:
        t0 = self.turn_times.get("transcript", now)
        out: dict[str, object] = {"turn": self.turns.turn}
        for key in ("first_token", "first_sentence", "first_say", "last_say"):
            if key in self.turn_times:
                out[f"{key}_ms"] = round((self.turn_times[key] - t0) * 1000, 1)
        return out

    def on_silence(self, now: float) -> list[Command]:
        """The silence timer: reprompt a quiet caller, and end the call after a few."""
        s = self.settings
        if not self.phase.live or self.turns.replying or self.after_reply is not None:
            return []  # a reply is coming: its end arms the timer again
        if self.playback.talking(now):
            return self.arm_silence(now)
        quiet_since = max(self.last_caller, self.playback.until)
        if now - quiet_since < s.silence_s - 0.05:  # timers fire a hair early or late
            wait = quiet_since + s.silence_s - now
            return [StartTimer(self.id, Timer(TimerKind.SILENCE), wait)]
        self.reprompts += 1
        # a silent caller, or an STT that stopped hearing one (measured with Google's after ~5
        # minutes while the transcribe still says progressing): worth a warning either way
        quiet = Record(
            self.id,
            Kind.STT_QUIET,
            {"quiet_s": round(now - self.last_caller, 1), "stt_provider": s.stt_provider},
        )
        if self.reprompts > s.max_silence_reprompts:
            return [
                quiet,
                Record(self.id, Kind.SILENCE_HANGUP, {}),
                *self._goodbye(s.silence_goodbye, now),
            ]
        self.history.assistant(s.reprompt_text, self.turns.turn)
        return [quiet, *self._say(s.reprompt_text, self.turns.turn, now), *self.arm_silence(now)]

    def on_watch(self, now: float) -> list[Command]:
        """Nothing heard of the call for a while: ask VoIPBIN, less often while it stays quiet."""
        s = self.settings
        quiet = now - self.last_heard
        if quiet < s.watch_s:
            self.watch_delay = s.watch_s
            return [StartTimer(self.id, Timer(TimerKind.WATCH), s.watch_s - quiet)]
        delay, self.watch_delay = self.watch_delay, min(self.watch_delay * 2, s.watch_max_s)
        return [
            CheckCall(self.id),
            *self._fetch_transcripts(),
            StartTimer(self.id, Timer(TimerKind.WATCH), delay),
        ]

    def on_transcript_due(self, _now: float) -> list[Command]:
        """Speech ended a while ago and no transcript came: read them back."""
        if not self.transcript_due:
            return []
        self.transcript_due = False
        return self._fetch_transcripts()
