"""Property test: any order of events and command outcomes keeps the call machine's promises.

A small model of VoIPBIN answers the commands a `Call` emits (sometimes with failures), while
hypothesis interleaves those answers with call statuses, transcripts (duplicates included) and
speech events in any order. Whatever happens: no exception escapes, nothing is said after the
hangup, no caller transcript gets two replies, and once the call is over every session that was
ever created is stopped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.call import Call, CallSettings, Phase
from agentd.commands import (
    AskBackend,
    CheckCall,
    Command,
    FindTranscribe,
    Hangup,
    HangupDone,
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
    SweepDone,
    SweepSpeakings,
    TimerFired,
    TranscribeFailed,
    TranscribeStarted,
    WriteAhead,
)
from agentd.events import CallEvent, CallInfo, Event, SpeechEvent, TranscribeEvent, TranscriptEvent

CID = "call-1"
STATUSES = ["dialing", "ringing", "progressing", "progressing", "terminating", "hangup"]


@dataclass
class World:
    """What VoIPBIN knows, and what the call asked of it."""

    call: Call
    now: float = 0.0
    pending: list[Command] = field(default_factory=list)
    timers: dict[str, float] = field(default_factory=dict)
    speakings: set[str] = field(default_factory=set)  # created and reported to the call
    transcribes: set[str] = field(default_factory=set)
    stopped: set[str] = field(default_factory=set)
    asks: int = 0
    transcript_ids: set[str] = field(default_factory=set)
    interims: int = 0  # interims with words: with reply_on "interim" a turn may end on them
    hung_up: bool = False
    done_lost: bool = False  # VoIPBIN's own end of the transcribes is never seen
    said_after_hangup: list[str] = field(default_factory=list)
    serial: int = 0
    anomalies: list[dict[str, object]] = field(default_factory=list)

    def feed(self, event: Event | Result) -> None:
        self.now += 0.1
        batch = self.call.handle(event, self.now)
        for i, cmd in enumerate(batch):
            if isinstance(cmd, StartSpeaking | StartTranscribe) and not self.call.failed:
                # the call is on disk before any billed session is created
                assert any(isinstance(c, WriteAhead) for c in batch[:i]), batch
            if isinstance(cmd, Record) and cmd.what == "anomaly":
                self.anomalies.append(cmd.data)
            if isinstance(cmd, Say) and self.hung_up:
                self.said_after_hangup.append(cmd.text)
            if isinstance(cmd, AskBackend):
                self.asks += 1
            if isinstance(cmd, StartTimer):
                self.timers[cmd.timer] = self.now + cmd.delay_s
            else:
                self.pending.append(cmd)

    def new_id(self, prefix: str) -> str:
        self.serial += 1
        return f"{prefix}{self.serial}"

    def answer(self, cmd: Command, fail: bool) -> None:
        """VoIPBIN's (or the backend's) answer to one command."""
        match cmd:
            case StartSpeaking():
                if fail:
                    self.feed(SpeakingFailed(500))
                else:
                    sid = self.new_id("s")
                    self.speakings.add(sid)
                    self.feed(SpeakingStarted(sid, "active"))
            case PollSpeaking():
                self.feed(SpeakingStarted(cmd.speaking_id, "active"))
            case StartTranscribe() | FindTranscribe():
                if fail:
                    self.feed(
                        TranscribeFailed(
                            409 if isinstance(cmd, StartTranscribe) else 404, "not found"
                        )
                    )
                else:
                    tid = self.new_id("t")
                    self.transcribes.add(tid)
                    self.feed(TranscribeStarted(tid))
            case StopSpeaking():
                if not fail:
                    self.stopped.add(cmd.speaking_id)
                self.feed(Stopped("speaking", cmd.speaking_id, not fail))
            case StopTranscribe():
                if not fail:
                    self.stopped.add(cmd.transcribe_id)
                self.feed(Stopped("transcribe", cmd.transcribe_id, not fail))
            case AskBackend():
                if fail:
                    self.feed(ReplyFailed(cmd.turn, "boom"))
                else:
                    self.feed(ReplySentence(cmd.turn, "Sure thing."))
                    self.feed(ReplyDone(cmd.turn))
            case Say():
                if fail:
                    self.feed(SayFailed(cmd.speaking_id, cmd.text, cmd.turn, 404))
            case Hangup():
                self.feed(HangupDone(not fail))
            case SweepSpeakings():
                self.feed(SweepDone(not fail, 503 if fail else 0))
            case CheckCall():
                status = "hangup" if self.hung_up else "progressing"
                self.feed(CallEvent(CallInfo(CID, status, "incoming", "+1", "+2"), checked=True))
            case _:
                pass

    def hang_up(self) -> None:
        self.hung_up = True
        self.feed(CallEvent(CallInfo(CID, "hangup", "incoming", "+1", "+2", "remote", "normal")))
        if self.done_lost:
            # its `transcribe_done` was lost, or its own stop failed: only a stop of ours ends it
            return
        for tid in sorted(self.transcribes):  # VoIPBIN ends transcribes by itself at hangup
            self.stopped.add(tid)
            self.feed(TranscribeEvent(tid, "call", CID, "done"))


RETRIES = ("retry_stop:", "retry_hangup", "retry_sweep")

external = st.one_of(
    st.sampled_from(STATUSES).map(lambda s: ("status", s)),
    st.sampled_from(["tr1", "tr2", "tr3", "tr4"]).map(lambda t: ("transcript", t)),
    st.sampled_from(["interim", "boundary"]).map(lambda k: ("speech", k)),
    st.just(("timer", "")),
)


@pytest.mark.slow  # 300 examples
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_any_interleaving_keeps_the_promises(data: st.DataObject) -> None:
    cfg = CallSettings(
        tts_provider=data.draw(st.sampled_from(["elevenlabs", "gcp"])),
        reply_on=data.draw(st.sampled_from(["final", "interim"])),
    )
    world = World(Call(CID, cfg), done_lost=data.draw(st.booleans()))
    for _ in range(data.draw(st.integers(5, 60))):
        if world.pending and data.draw(st.booleans()):
            cmd = world.pending.pop(data.draw(st.integers(0, len(world.pending) - 1)))
            world.answer(cmd, fail=data.draw(st.integers(0, 9)) == 0)
            continue
        kind, value = data.draw(external)
        if kind == "status":
            if value == "hangup":
                world.hang_up()
            elif not world.hung_up:
                world.feed(CallEvent(CallInfo(CID, value, "incoming", "+1", "+2")))
        elif kind == "transcript" and not world.hung_up:
            world.transcript_ids.add(value)
            world.feed(
                TranscriptEvent(value, next(iter(world.transcribes), "t?"), "in", f"words {value}")
            )
        elif kind == "speech" and not world.hung_up:
            msg = "two words" if value == "interim" else ""
            world.interims += value == "interim"
            world.feed(SpeechEvent(world.new_id("sp"), "t?", value, "in", msg))  # type: ignore[arg-type]
        elif kind == "timer" and world.timers:
            name = data.draw(st.sampled_from(sorted(world.timers, key=str)))
            del world.timers[name]
            world.feed(TimerFired(name))

    # the caller hangs up; VoIPBIN now answers everything, and retries of stops succeed
    if not world.hung_up:
        world.hang_up()
    for _ in range(500):
        if world.pending:
            world.answer(world.pending.pop(0), fail=False)
        elif retry := [n for n in world.timers if str(n).startswith(RETRIES)]:
            del world.timers[retry[0]]
            world.feed(TimerFired(retry[0]))
        else:
            break

    assert world.anomalies == [], "a realistic interleaving reached an impossible transition"
    assert world.said_after_hangup == []
    # one answer per final, at most; on interims, at most one per interim heard
    answerable = len(world.transcript_ids) + (world.interims if cfg.reply_on == "interim" else 0)
    assert world.asks <= answerable
    assert world.call.phase is Phase.ENDED
    assert world.speakings <= world.stopped, "a speaking session was left billing"
    assert world.transcribes <= world.stopped
