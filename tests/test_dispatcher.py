"""The dispatcher: routing, dedupe, ownership, and the error path of a call whose handler raises."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

import pytest
import structlog

from agentd.call import Call, CallSettings, Phase
from agentd.call import call as call_module
from agentd.commands import (
    CancelTimer,
    Command,
    Finished,
    Hangup,
    HangupDone,
    Record,
    ReplySentence,
    SpeakingStarted,
    StartSpeaking,
    StartTimer,
    Stopped,
    StopSpeaking,
    SweepDone,
    SweepSpeakings,
    TranscribeStarted,
)
from agentd.dispatcher import Dispatcher
from agentd.events import CallEvent, CallInfo, SpeechEvent, TranscribeEvent, TranscriptEvent
from agentd.names import Kind, normalise_number
from agentd.sim import Caller, Simulator, Utterance
from tests.support import CALLER, OUR_NUMBER, StartAgent


class Shell:
    """Collects what the dispatcher asks to execute, with a clock the test moves."""

    def __init__(self) -> None:
        self.now = 0.0
        self.batches: list[tuple[str, list[Command]]] = []

    def execute(self, call_id: str, commands: list[Command]) -> None:
        self.batches.append((call_id, commands))

    def commands(self, call_id: str) -> list[Command]:
        return [c for cid, batch in self.batches if cid == call_id for c in batch]


def settings() -> CallSettings:
    """Final transcripts are stepped here (no interims): answered on them."""
    return CallSettings(reply_on="final")


def dispatcher(shell: Shell, numbers: tuple[str, ...] = (OUR_NUMBER,)) -> Dispatcher:
    return Dispatcher(settings, shell.execute, numbers=numbers, clock=lambda: shell.now)


def call_event(call_id: str, status: str, dest: str = OUR_NUMBER) -> CallEvent:
    return CallEvent(CallInfo(call_id, status, "incoming", CALLER, dest))


def test_a_call_to_our_number_is_adopted_and_others_are_ignored() -> None:
    shell = Shell()
    d = dispatcher(shell)
    d.on_event(call_event("c1", "progressing"))
    d.on_event(call_event("c2", "progressing", dest="+15559990000"))
    assert set(d.calls) == {"c1"}
    assert d.counters["ignored"] == 1
    assert shell.commands("c2") == []


def test_a_live_call_left_alone_stays_so_when_a_reload_adds_its_number() -> None:
    # not ours when it came: whatever answered it (a flow of its own) serves it. The number
    # added by a reload is for new calls; the next event of the live one must not have the
    # agent start its sessions and greet over it
    shell = Shell()
    other = "+15559990000"
    d = dispatcher(shell)
    d.on_event(call_event("c2", "progressing", dest=other))
    d.on_event(call_event("c3", "progressing", dest="+15558880000"))
    assert d.left_to_others() == 0
    d.numbers = {normalise_number(n) for n in (OUR_NUMBER, other)}  # what a reload does
    assert d.left_to_others() == 1  # c2 would be ours now, and is left alone
    d.on_event(call_event("c2", "progressing", dest=other))  # a reconcile reads it again
    assert set(d.calls) == set() and shell.commands("c2") == []
    d.on_event(call_event("c2", "hangup", dest=other))
    assert d.left_to_others() == 0
    d.on_event(call_event("c4", "progressing", dest=other))  # a new call is ours
    assert set(d.calls) == {"c4"}
    assert d.left_to_others() == 0
    shell.now += 3600.0  # VoIPBIN ends a call after an hour: c3's end was lost, not waited for
    d.numbers = set()  # every call
    assert d.left_to_others() == 0


def test_numbers_are_compared_by_their_digits() -> None:
    shell = Shell()
    d = dispatcher(shell, numbers=("+1 (555) 123-4567",))
    d.on_event(call_event("c1", "progressing"))
    assert set(d.calls) == {"c1"}


def test_a_transcript_before_its_transcribe_id_is_known_waits_then_reaches_its_call() -> None:
    shell = Shell()
    d = dispatcher(shell)
    d.on_event(call_event("c1", "progressing"))
    d.feed("c1", SpeakingStarted("s1", "active"))
    d.on_event(TranscriptEvent("tr1", "t1", "in", "what time is it"))  # t1 not known yet: buffered
    assert not any(type(c).__name__ == "AskBackend" for c in shell.commands("c1"))
    d.feed("c1", TranscribeStarted("t1"))
    asks = [c for c in shell.commands("c1") if type(c).__name__ == "AskBackend"]
    assert len(asks) == 1


def test_other_calls_speech_does_not_push_ours_out_of_the_waiting_buffer() -> None:
    # a busy account: calls to numbers that are not ours, with their transcribes, talking
    shell = Shell()
    d = dispatcher(shell)
    for n in range(20):
        d.on_event(call_event(f"other{n}", "progressing", dest="+15559990000"))
        d.on_event(TranscribeEvent(f"ot{n}", "call", f"other{n}", "progressing"))
    d.on_event(call_event("c1", "progressing"))
    d.feed("c1", SpeakingStarted("s1", "active"))
    d.on_event(
        TranscriptEvent("tr1", "t1", "in", "what time is it")
    )  # before our transcribe id is known
    for i in range(600):
        d.on_event(SpeechEvent(f"sp{i}", f"ot{i % 20}", "interim", "in", "blah blah"))
    d.feed("c1", TranscribeStarted("t1"))
    assert len(asks(shell, "c1")) == 1
    assert d.counters["ignored"] == 20 + 600


def attached(d: Dispatcher, call_id: str, transcribe_id: str, speaking_id: str) -> Call:
    """An answered call of ours whose speaking and transcribe sessions have started."""
    d.on_event(call_event(call_id, "progressing"))
    d.feed(call_id, SpeakingStarted(speaking_id, "active"))
    d.feed(call_id, TranscribeStarted(transcribe_id))
    return d.calls[call_id]


def asks(shell: Shell, call_id: str) -> list[Command]:
    return [c for c in shell.commands(call_id) if type(c).__name__ == "AskBackend"]


def test_a_call_another_replica_serves_is_left_alone_until_taken_back() -> None:
    shell = Shell()
    d = dispatcher(shell)
    restorable = attached(d, "c1", "t1", "s1")
    d.disown("c1")  # another replica took it over
    before = len(shell.batches)
    d.on_event(call_event("c1", "progressing"))  # not adopted again as a new call
    d.on_event(TranscriptEvent("tr1", "t1", "in", "what time is it"))  # its transcribe's: dropped
    d.on_event(TranscribeEvent("t2", "call", "c1", "progressing"))  # a new one of it: known
    d.on_event(TranscriptEvent("tr2", "t2", "in", "hello"))
    assert "c1" not in d.calls and len(shell.batches) == before
    assert d.counters["foreign"] == 3
    d.adopt(restorable)  # taken back (a takeover restores it)
    d.on_event(TranscriptEvent("tr3", "t1", "in", "how are you"))
    assert len(asks(shell, "c1")) == 1


def test_events_that_waited_for_a_call_taken_over_are_not_replayed_into_it() -> None:
    shell = Shell()
    d = dispatcher(shell)
    taken = attached(d, "c1", "t1", "s1")
    d.disown("c1", foreign=False)  # lost while the store was unreachable: not known as foreign
    d.on_event(TranscriptEvent("tr1", "t1", "in", "said meanwhile"))  # waits as an orphan
    d.adopt(taken)  # the takeover reads "said meanwhile" back over REST instead
    d.on_event(call_event("c2", "progressing"))
    d.feed("c2", TranscribeStarted("t9"))  # a new transcribe id replays the orphans
    assert asks(shell, "c1") == []


def test_an_orphan_keeps_its_age_across_replays() -> None:
    shell = Shell()
    d = dispatcher(shell)
    d.on_event(TranscriptEvent("tr1", "t-nobody", "in", "hello"))
    for i in range(4):  # each new call's transcribe replays the orphans
        shell.now += 10.0
        d.on_event(call_event(f"c{i}", "progressing"))
        d.feed(f"c{i}", TranscribeStarted(f"t{i}"))
    assert len(d._orphans) == 0  # 40 s old: dropped, not re-stamped on every replay


def test_an_ended_call_is_never_adopted_again() -> None:
    shell = Shell()
    d = dispatcher(shell)
    d.remember_ended(["c1"])
    d.on_event(call_event("c1", "progressing"))
    assert d.calls == {}


def test_a_hangup_seen_first_is_remembered_and_a_late_progressing_starts_nothing() -> None:
    shell = Shell()
    d = dispatcher(shell)
    d.on_event(call_event("c1", "hangup"))  # order is not guaranteed: the end came first
    d.on_event(call_event("c1", "progressing"))
    assert d.calls == {}
    assert shell.commands("c1") == []
    assert d.counters["ignored"] == 2


def test_a_call_that_turns_out_to_be_a_flows_leg_is_released_before_its_answer() -> None:
    shell = Shell()
    d = dispatcher(shell)
    # a `connect` flow dials from our number: it looks like a call agentd placed...
    leg = CallInfo("leg", "dialing", "outgoing", OUR_NUMBER, "+15550000100")
    d.on_event(CallEvent(leg))
    assert set(d.calls) == {"leg"}
    # ...until VoIPBIN chains it to the caller's call
    chained = CallInfo(
        "leg", "ringing", "outgoing", OUR_NUMBER, "+15550000100", master_call_id="c1"
    )
    d.on_event(CallEvent(chained))
    assert Finished("leg") in shell.commands("leg")
    d.finished("leg")
    d.on_event(CallEvent(replace(chained, status="progressing")))
    assert d.calls == {}
    assert not any(isinstance(c, StartSpeaking) for c in shell.commands("leg"))


def test_a_steps_timers_go_apart_and_are_shown_on_its_event_line() -> None:
    # four timer changes a turn (the transcript due, the filler): a log line each cost ~3 % of
    # a turn's CPU; the step's line says what it armed and cancelled
    shell = Shell()
    timers: list[tuple[str, list[Command]]] = []
    d = Dispatcher(
        settings,
        shell.execute,
        numbers=(OUR_NUMBER,),
        clock=lambda: shell.now,
        set_timers=lambda call_id, cmds: timers.append((call_id, list(cmds))),
    )
    d.on_event(call_event("c1", "progressing"))
    d.feed("c1", TranscribeStarted("t1"))
    d.feed("c1", SpeakingStarted("s1", "active"))
    shell.now = 100.0  # the greeting has played
    shell.batches.clear()
    timers.clear()
    with structlog.testing.capture_logs() as lines:
        d.on_event(TranscriptEvent("tr1", "t1", "in", "what time is it"))
        shell.now += settings().final_hold_s  # the caller is done: the reply is not held
        d.feed("c1", ReplySentence(1, "Hi."))
    assert [(cid, [(type(c).__name__, str(c.timer)) for c in cmds]) for cid, cmds in timers] == [
        ("c1", [("StartTimer", "filler")]),
        ("c1", [("CancelTimer", "filler")]),
    ]
    assert not [c for c in shell.commands("c1") if isinstance(c, StartTimer | CancelTimer)]
    assert [type(c).__name__ for c in shell.commands("c1")] == ["AskBackend", "Say"]
    events = [
        (e["type"], e.get("armed"), e.get("cancelled")) for e in lines if e["event"] == "event"
    ]
    assert events == [
        ("TranscriptEvent", {"filler": settings().final_hold_s + settings().filler_after_s}, None),
        ("ReplySentence", None, ["filler"]),
    ]


def test_a_handler_that_raises_ends_that_call_cleanly_and_not_the_others(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    shell = Shell()
    d = dispatcher(shell)
    for cid in ("c1", "c2"):
        attached(d, cid, f"t-{cid}", f"s-{cid}")

    def boom(self: Call, event: Any, now: float) -> list[Command]:
        if self.id == "c1":
            raise RuntimeError("injected")
        return original(self, event, now)

    original = call_module._HANDLERS[ReplySentence]
    monkeypatch.setitem(call_module._HANDLERS, ReplySentence, boom)
    shell.now = 100.0  # the greetings have played: the transcripts are no barge-in
    d.on_event(TranscriptEvent("tr1", "t-c1", "in", "hello"))
    d.on_event(TranscriptEvent("tr2", "t-c2", "in", "hello"))
    shell.now += settings().final_hold_s  # the callers are done: the replies are not held
    shell.batches.clear()
    d.feed("c1", ReplySentence(1, "Hi."))
    d.feed("c2", ReplySentence(1, "Hi."))

    c1 = shell.commands("c1")
    [failed] = [c for c in c1 if isinstance(c, Record) and c.what is Kind.FAILED]
    assert failed.data == {"error": "RuntimeError"}
    assert StopSpeaking("c1", "s-c1") in c1
    assert Hangup("c1") in c1 and SweepSpeakings("c1") in c1
    assert d.counters["failed"] == 1
    # the other call goes on: its sentence is said (its filler is no longer needed)
    assert [type(c).__name__ for c in shell.commands("c2")] == ["Say", "CancelTimer"]
    # the failed call takes no more events, only the results of its cleanup
    shell.batches.clear()
    d.on_event(TranscriptEvent("tr3", "t-c1", "in", "are you there"))
    assert shell.commands("c1") == []
    # a stop that fails is retried ever less often, as for a live call
    d.feed("c1", Stopped("speaking", "s-c1", False))
    d.feed("c1", Stopped("speaking", "s-c1", False))
    retries = [c for c in shell.commands("c1") if isinstance(c, StartTimer)]
    assert [(str(t.timer), t.delay_s) for t in retries] == [
        ("retry_stop:s-c1", 1.0),
        ("retry_stop:s-c1", 2.0),
    ]
    d.feed("c1", Stopped("speaking", "s-c1", True))
    d.feed("c1", Stopped("transcribe", "t-c1", True))
    d.feed("c1", HangupDone(True))
    assert Finished("c1") not in shell.commands("c1")  # the sweep has not answered
    d.feed("c1", SweepDone(True))
    assert shell.commands("c1")[-1] == Finished("c1")
    assert d.calls["c1"].phase is Phase.ENDED


async def test_an_injected_fault_in_one_call_leaves_no_session_and_the_other_call_is_served(
    sim: Simulator, agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    victim: set[str] = set()

    def boom(self: Call, event: Any, now: float) -> list[Command]:
        if self.id in victim:
            raise RuntimeError("injected")
        return original(self, event, now)

    original = call_module._HANDLERS[ReplySentence]
    monkeypatch.setitem(call_module._HANDLERS, ReplySentence, boom)
    daemon = await agent()
    bad = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("hello")], hangup_after_s=None))
    victim.add(bad)
    good = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("hello")], hangup_after_s=0.05))
    await sim.wait_call_status(bad, "hangup", timeout=10)  # agentd hung up on the broken call
    await sim.wait_call_status(good, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    failed = [r for r in daemon.records if r.what is Kind.FAILED]
    assert [(r.call_id, r.data["error"]) for r in failed] == [(bad, "RuntimeError")]
    said = [line.text for line in sim.get_call(good).conversation if line.who == "agent"]
    assert "You said: hello." in said
    assert sim.leaks() == []
