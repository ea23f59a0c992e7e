"""Property test: one reply per caller turn, whatever the mix of triggers.

A caller says turns of one to three fragments; VoIPBIN reports each fragment as interims (one
per word) and a final that comes late, sometimes after the next fragment's first interims, as
the event and its duplicate, and again in REST read-backs at any time later. The backend answers
after a random delay, sometimes for a turn that was cancelled meanwhile; the daemon may restart
between turns (snapshot, restore, resume). In both `reply_on` modes: every caller turn gets
exactly one reply the caller hears, and no two (a reply cut before its audio started is not
heard).
"""

from __future__ import annotations

import heapq
import itertools
from dataclasses import dataclass, field, replace
from typing import Any

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from agentd.call import Call
from agentd.commands import (
    AskBackend,
    CancelBackend,
    Command,
    FindTranscribe,
    Flush,
    PollSpeaking,
    ReplyDone,
    ReplySentence,
    Say,
    SpeakingStarted,
    StartTimer,
    StopSpeaking,
    TimerFired,
    TranscribeStarted,
    TranscriptsRead,
)
from agentd.events import SpeechEvent, TranscriptEvent
from agentd.names import TimerKind
from tests.test_call import SETTINGS, status

WORD_S = 0.3  # the caller's pace: one interim per word
LIVE = replace(SETTINGS, say_latency_s=1.0, final_hold_s=0.5, silence_s=0.0, tts_provider="gcp")
BACKGROUND = {TimerKind.WATCH, TimerKind.MAX_CALL, TimerKind.SILENCE}
_seq = itertools.count()


@dataclass
class Sim:
    """A tiny discrete-event world around one `Call`."""

    call: Call
    now: float = 0.0
    queue: list[tuple[float, int, Any]] = field(default_factory=list)
    timers: dict[Any, int] = field(default_factory=dict)  # the live token of each timer
    cancelled: set[int] = field(default_factory=set)
    said: dict[int, list[str]] = field(default_factory=dict)  # reply turn -> sentences said
    # the caller's audio, as VoIPBIN plays it: each say a second after it was sent, after what
    # plays before it; a flush or a stop silences it and drops what has not started
    audio: list[tuple[float, float, int]] = field(default_factory=list)  # (start, end, turn)
    finals: list[TranscriptEvent] = field(default_factory=list)
    reply_delay: float = 0.5
    stale_replies: bool = False

    def at(self, t: float, what: Any) -> None:
        heapq.heappush(self.queue, (t, next(_seq), what))

    def feed(self, event: Any) -> None:
        for cmd in self.call.handle(event, self.now):
            self.run(cmd)

    def run(self, cmd: Command) -> None:
        if isinstance(cmd, StartTimer) and cmd.timer.kind not in BACKGROUND:
            token = next(_seq)
            self.timers[cmd.timer] = token
            self.at(self.now + cmd.delay_s, ("timer", cmd.timer, token))
        elif isinstance(cmd, AskBackend):
            t = self.now + self.reply_delay
            self.at(t, ReplySentence(cmd.turn, f"Answer {cmd.turn}."))
            self.at(t + 0.2, ReplySentence(cmd.turn, "More."))
            self.at(t + 0.3, ReplyDone(cmd.turn))
        elif isinstance(cmd, CancelBackend) and not self.stale_replies:
            self.cancelled.add(cmd.turn)
        elif isinstance(cmd, PollSpeaking):  # a restart verifies its sessions
            self.at(self.now + 0.05, SpeakingStarted(cmd.speaking_id, "active"))
        elif isinstance(cmd, FindTranscribe):
            self.at(self.now + 0.05, TranscribeStarted("t1"))
        elif isinstance(cmd, Say):
            start = max([self.now + LIVE.say_latency_s] + [e for _, e, _ in self.audio])
            self.audio.append((start, start + len(cmd.text) / LIVE.rate, cmd.turn))
            if cmd.turn:
                self.said.setdefault(cmd.turn, []).append(cmd.text)
        elif isinstance(cmd, Flush | StopSpeaking):
            self.audio = [(a, min(b, self.now), k) for a, b, k in self.audio if a < self.now]

    def heard(self) -> set[int]:
        """The reply turns the caller heard some of."""
        return {k for a, b, k in self.audio if k and b > a}

    def until(self, t: float) -> None:
        while self.queue and self.queue[0][0] <= t:
            when, _, what = heapq.heappop(self.queue)
            self.now = max(self.now, when)
            if isinstance(what, tuple) and what[0] == "timer":
                if self.timers.get(what[1]) == what[2]:
                    self.feed(TimerFired(what[1]))
            elif isinstance(what, ReplySentence | ReplyDone) and what.turn in self.cancelled:
                continue
            else:
                self.feed(what)
        self.now = max(self.now, t)


fragments = st.lists(
    st.sampled_from(
        [
            "what is my balance?",
            "I lost my card.",
            "I need help with",
            "my account please",
            "and also",
            "it is for tomorrow.",
            "can you hear me",
            "no sorry, Denver.",
        ]
    ),
    min_size=1,
    max_size=3,
)


# the final of an answered turn comes after its reply is heard (a slow STT)
@example("interim", [["what is my balance?"]], 2.0, 0.1, False, False, False)
@example("final", [["I need help with", "my account please"]], 1.0, 0.5, False, False, False)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    mode=st.sampled_from(["final", "interim"]),
    turns=st.lists(fragments, min_size=1, max_size=4),
    final_delay=st.floats(0.3, 2.2),
    reply_delay=st.floats(0.05, 1.5),
    stale=st.booleans(),
    dup=st.booleans(),
    restart=st.booleans(),
)
def test_every_caller_turn_gets_exactly_one_reply(  # noqa: PLR0917 (hypothesis draws)
    mode: str,
    turns: list[list[str]],
    final_delay: float,
    reply_delay: float,
    stale: bool,
    dup: bool,
    restart: bool,
) -> None:
    cs = replace(LIVE, reply_on=mode)  # type: ignore[arg-type]
    sim = Sim(Call("c1", cs), reply_delay=reply_delay, stale_replies=stale)
    for event in (status("progressing"), TranscribeStarted("t1"), SpeakingStarted("s1", "active")):
        sim.feed(event)
    t = 5.0
    tid = itertools.count(1)
    for k, turn in enumerate(turns):
        for frag in turn:
            words = frag.split()
            for i in range(len(words)):
                sim.at(
                    t + i * WORD_S,
                    SpeechEvent("x", "t1", "interim", "in", " ".join(words[: i + 1])),
                )
            end = t + (len(words) - 1) * WORD_S
            final = TranscriptEvent(f"tr{next(tid)}", "t1", "in", frag)
            sim.at(end + final_delay, final)
            if dup:
                sim.at(end + final_delay + 0.01, final)
            sim.finals.append(final)
            t = end + WORD_S  # the next fragment follows without a pause
        # the caller waits for the reply to be done and heard before going on
        sim.until(t + 3.0 + final_delay + reply_delay)
        for _ in range(50):
            if not sim.call.replying and sim.now >= sim.call.playback.until:
                break
            sim.until(sim.now + 0.5)
        if dup:
            sim.feed(TranscriptsRead(tuple(sim.finals)))  # a REST read-back of every final so far
        if restart and k % 2 == 0:
            snap = sim.call.snapshot()
            sim.call = type(sim.call).restore(snap, cs)
            for cmd in sim.call.resume(sim.now):
                sim.run(cmd)
        t = sim.now + 1.0
    sim.until(t + 10.0)
    heard = sim.heard()
    assert len(heard) == len(turns), (mode, turns, sim.said, sim.audio)
    for turn in heard:
        # a slow reply may be preceded by a filler ("One moment.")
        said = [t for t in sim.said[turn] if t != cs.filler]
        assert said == [f"Answer {turn}.", "More."], sim.said
