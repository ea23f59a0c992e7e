"""The per-call state machine, stepped event by event without any network."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agentd.call import Call, CallSettings, Phase, core
from agentd.call.history import SLACK
from agentd.commands import (
    NOT_FOUND,
    AskBackend,
    CallGone,
    CancelBackend,
    CancelTimer,
    CheckCall,
    FetchTranscripts,
    FindTranscribe,
    Finished,
    Flush,
    Hangup,
    HangupDone,
    PollSpeaking,
    Record,
    ReplyDone,
    ReplyFailed,
    ReplySentence,
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
    SweepTranscribes,
    TimerFired,
    TranscribeFailed,
    TranscribesFound,
    TranscribeStarted,
    TranscriptsRead,
    Transfer,
    TransferDone,
    WriteAhead,
)
from agentd.events import CallEvent, CallInfo, SpeechEvent, TranscribeEvent, TranscriptEvent
from agentd.names import EndCall, Kind, Timer, TimerKind, TransferTo

CID = "c1"
# the timing of the turn (hold, TTS latency) has tests of its own below
SETTINGS = CallSettings(
    greeting="Hi there.",
    system_prompt="be brief",
    chars_per_s=10.0,
    say_latency_s=0.0,
    final_hold_s=0.0,
    reply_on="final",  # these tests step final transcripts; interims: test_listen
)


def status(s: str, reason: str = "", by: str = "") -> CallEvent:
    return CallEvent(CallInfo(CID, s, "incoming", "+1555", "+1666", by, reason))


def transcript(text: str, tid: str = "tr1", direction: str = "in") -> TranscriptEvent:
    return TranscriptEvent(tid, "t1", direction, text)


BACKGROUND_TIMERS = {"watch", "silence", "max_call", "filler"}


def T(name: str) -> Timer:
    """A timer by its logged name ("watch", "retry_stop:s1")."""
    kind, _, sid = name.partition(":")
    return Timer(TimerKind(kind), sid)


def step(call: Call, event: object, now: float) -> list[object]:
    """Handle one event; leave out the background timers, the write-ahead (tested on its
    own, in test_call_properties) and the call's report (test_call_report) that most tests
    don't care about."""
    return [
        c
        for c in call.handle(event, now)  # type: ignore[arg-type]
        if not (isinstance(c, StartTimer | CancelTimer) and c.timer.kind in BACKGROUND_TIMERS)
        and not isinstance(c, WriteAhead)
        and not (isinstance(c, Record) and c.what is Kind.REPORT)
    ]


def kinds(cmds: list[object]) -> list[str]:
    return [type(c).__name__ for c in cmds if not isinstance(c, Record)]


def answered(settings: CallSettings = SETTINGS, *, speaking: str = "active") -> Call:
    """A call that is up, with both sessions and the greeting sent at t=0."""
    call = Call(CID, settings)
    assert kinds(step(call, status("ringing"), 0)) == []
    cmds = step(call, status("progressing"), 0)
    assert kinds(cmds) == ["StartTranscribe", "StartSpeaking"]
    assert step(call, TranscribeStarted("t1"), 0) == []
    cmds = step(call, SpeakingStarted("s1", speaking), 0)
    if speaking == "active":
        assert cmds == [Say(CID, "s1", settings.greeting, 0)]
        assert call.phase is Phase.ACTIVE
    return call


def test_full_call_issues_the_protocol_sequence() -> None:
    call = answered()
    # t=10: the greeting (0.9 s at 10 chars/s) is long over
    assert step(call, transcript("What time is it"), 10) == [
        AskBackend(
            CID,
            1,
            (("system", "be brief"), ("assistant", "Hi there."), ("user", "What time is it")),
        )
    ]
    assert step(call, ReplySentence(1, "It is noon."), 10.5) == [Say(CID, "s1", "It is noon.", 1)]
    done = step(call, ReplyDone(1, first_chunk_at=10.2), 10.6)
    assert isinstance(done[0], Record) and done[0].what == "turn"
    assert done[0].data["first_token_ms"] == pytest.approx(200.0)
    assert done[0].data["first_say_ms"] == 500.0
    cmds = step(call, status("hangup", "normal", "remote"), 20)
    # the speaking bills until stopped; the transcribe VoIPBIN ends itself at hangup: awaited,
    # with a late stop armed in case its `done` never comes
    assert kinds(cmds) == ["StopSpeaking", "StartTimer"]
    assert StartTimer(CID, T("retry_stop:t1"), SETTINGS.transcribe_end_wait_s) in cmds
    assert any(isinstance(c, Record) and c.data.get("reason") == "normal" for c in cmds)
    assert step(call, Stopped("speaking", "s1", True), 20) == []
    assert step(call, TranscribeEvent("t1", "call", CID, "done"), 20.2) == [Finished(CID)]
    assert call.phase is Phase.ENDED
    assert step(call, TimerFired(T("retry_stop:t1")), 25) == []  # too late to matter


def test_duplicate_transcript_is_answered_once() -> None:
    call = answered()
    assert kinds(step(call, transcript("hello"), 10)) == ["AskBackend"]
    assert step(call, transcript("hello"), 10.1) == []


def test_our_own_speech_heard_back_is_never_answered() -> None:
    call = answered()
    assert step(call, transcript("Hi there.", direction="out"), 10) == []


def test_transcript_before_speaking_is_active_is_said_after_the_greeting() -> None:
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    assert step(call, TranscribeStarted("t1"), 0.05) == []
    assert kinds(step(call, transcript("what are your hours"), 0.1)) == ["AskBackend"]
    assert step(call, ReplySentence(1, "Nine to five."), 0.2) == []  # no session yet: queued
    cmds = step(call, SpeakingStarted("s1", "active"), 0.3)
    assert cmds == [Say(CID, "s1", "Hi there.", 0), Say(CID, "s1", "Nine to five.", 1)]


@pytest.mark.parametrize("said", ["Hello?", "Hi, yes.", "Good morning.", "Hello hello?"])
def test_a_hello_before_the_greeting_is_answered_by_the_greeting(said: str) -> None:
    """A callee picking up says "hello?" first: the greeting answers it, no reply follows it."""
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    step(call, TranscribeStarted("t1"), 0.05)
    assert step(call, SpeechEvent("sp1", "t1", "interim", "in", said), 0.2) == []  # no ask
    cmds = step(call, transcript(said), 0.4)
    assert kinds(cmds) == []
    [heard] = [c for c in cmds if isinstance(c, Record)]
    assert heard.what is Kind.BACKCHANNEL and heard.data["greeting"] is True
    assert step(call, SpeakingStarted("s1", "active"), 0.5) == [Say(CID, "s1", "Hi there.", 0)]
    # after the greeting, the same words are a turn
    assert kinds(step(call, transcript("Hello?", "tr2"), 5.0)) == ["AskBackend"]


@pytest.mark.parametrize(
    ("direction", "said"), [("outgoing", "Hi, this is Anna."), ("incoming", "Hi there.")]
)
def test_a_call_agentd_placed_has_its_own_greeting(direction: str, said: str) -> None:
    call = Call(CID, replace(SETTINGS, outbound_greeting="Hi, this is Anna."), direction=direction)
    step(call, status("progressing"), 0)
    step(call, TranscribeStarted("t1"), 0.05)
    assert step(call, SpeakingStarted("s1", "active"), 0.5) == [Say(CID, "s1", said, 0)]


def test_a_question_before_the_greeting_is_answered_after_it() -> None:
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    step(call, TranscribeStarted("t1"), 0.05)
    assert kinds(step(call, transcript("Hello, who is this?"), 0.4)) == ["AskBackend"]


def test_the_greeting_waits_for_the_transcribe_when_the_voice_is_up_first() -> None:
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    # nobody would hear the caller answer the greeting: it waits, a while at most
    assert step(call, SpeakingStarted("s1", "active"), 0.3) == [
        StartTimer(CID, T("greet"), SETTINGS.greet_wait_s)
    ]
    assert call.phase is Phase.ANSWERED
    assert step(call, TranscribeStarted("t1"), 1.2) == [
        CancelTimer(CID, T("greet")),
        Say(CID, "s1", SETTINGS.greeting, 0),
    ]
    assert call.phase is Phase.ACTIVE
    assert step(call, TimerFired(T("greet")), 3.3) == []  # cancelled, fired all the same


def test_a_transcribe_that_does_not_come_in_time_does_not_keep_the_caller_waiting() -> None:
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    step(call, SpeakingStarted("s1", "active"), 0.3)
    assert step(call, TimerFired(T("greet")), 3.3) == [Say(CID, "s1", SETTINGS.greeting, 0)]
    assert call.phase is Phase.ACTIVE
    assert step(call, TranscribeStarted("t1"), 5.0) == []  # greeted once


def test_hangup_during_session_setup_stops_sessions_when_they_arrive() -> None:
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    cmds = step(call, status("hangup", "normal", "remote"), 0.1)
    assert kinds(cmds) == []  # nothing to stop yet, and not finished: creations are in flight
    assert step(call, SpeakingStarted("s1", "active"), 0.2) == [StopSpeaking(CID, "s1")]
    assert step(call, TranscribeStarted("t1"), 0.2) == [StopTranscribe(CID, "t1")]
    assert step(call, Stopped("speaking", "s1", True), 0.3) == []
    assert step(call, Stopped("transcribe", "t1", True), 0.3) == [Finished(CID)]


@pytest.mark.parametrize("reason", ["busy", "noanswer", "failed"])
def test_unanswered_outbound_call_records_its_reason(reason: str) -> None:
    call = Call(CID, SETTINGS)
    step(call, status("dialing"), 0)
    cmds = step(call, status("hangup", reason, "remote"), 1)
    assert [c for c in cmds if isinstance(c, Record)][0].data["reason"] == reason
    assert cmds[-1] == Finished(CID)
    assert not any(isinstance(c, (StartSpeaking, StartTranscribe)) for c in cmds)


def test_a_call_cancelled_while_ringing_ends_with_its_reason_before_its_hangup_event() -> None:
    call = Call(CID, SETTINGS)
    step(call, status("dialing"), 0)
    step(call, status("ringing"), 1)
    cmds = step(call, status("canceling", by="local"), 2)  # nothing to stop: over at once
    [ended] = [c for c in cmds if isinstance(c, Record) and c.what is Kind.ENDED]
    assert ended.data == {"hangup_by": "local", "reason": "cancel", "answered": False}
    assert cmds[-1] == Finished(CID)


def test_a_call_clean_before_its_hangup_event_came_records_its_end() -> None:
    call = answered()
    step(call, status("terminating", by="remote"), 5)
    step(call, Stopped("speaking", "s1", True), 5.2)
    cmds = call.handle(TranscribeEvent("t1", "call", CID, "done"), 5.3)
    [ended] = [c for c in cmds if isinstance(c, Record) and c.what is Kind.ENDED]
    assert ended.data == {"hangup_by": "", "reason": "normal", "answered": True}
    assert cmds[-1] == Finished(CID)


def test_a_call_hung_up_before_its_sessions_came_was_answered() -> None:
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    cmds = step(call, status("hangup", "normal", "remote"), 0.3)
    [ended] = [c for c in cmds if isinstance(c, Record) and c.what is Kind.ENDED]
    assert ended.data["answered"] is True  # as its call report says


def test_second_progressing_and_stale_statuses_change_nothing() -> None:
    call = answered()
    assert step(call, status("progressing"), 1) == []
    assert step(call, status("ringing"), 1) == []
    step(call, status("hangup"), 2)
    assert step(call, status("progressing"), 3) == []  # call_updated after call_hangup


def test_say_404_restarts_the_session_and_says_it_again() -> None:
    call = answered()
    step(call, transcript("hello"), 10)
    step(call, ReplySentence(1, "Hi."), 10)
    cmds = step(call, SayFailed("s1", "Hi.", 1, 404), 10.1)
    # the session given up on is never adopted again
    new = StartSpeaking(CID, "en-US", "elevenlabs", SETTINGS.voice_id, frozenset({"s1"}))
    assert new in cmds
    assert StopSpeaking(CID, "s1") in cmds  # an unconfirmed session is stopped, never assumed gone
    assert step(call, SpeakingStarted("s2", "active"), 10.2) == [Say(CID, "s2", "Hi.", 1)]


def test_barge_in_on_elevenlabs_stops_and_restarts_the_session() -> None:
    call = answered()
    step(call, transcript("tell me a story"), 10)
    step(call, ReplySentence(1, "Once upon a time there was a very long story."), 10)
    # 2 s into a 4.6 s sentence the caller talks over it
    cmds = step(call, SpeechEvent("sp1", "t1", "interim", "in", "wait stop"), 12)
    assert kinds(cmds) == ["CancelBackend", "StopSpeaking"]
    assert step(call, ReplySentence(1, "The end."), 12.1) == []  # stale reply: not spoken
    assert step(call, Stopped("speaking", "s1", True), 12.2) == [
        StartSpeaking(CID, "en-US", "elevenlabs", SETTINGS.voice_id, frozenset({"s1"}))
    ]
    assert step(call, SpeakingStarted("s2", "active"), 12.3) == []  # no second greeting
    ask = step(call, transcript("wait stop", "tr2"), 13)
    assert kinds(ask) == ["AskBackend"]
    history = ask[-1].history  # type: ignore[union-attr]
    # what the caller heard of the interrupted reply, not what was planned
    assert ("assistant", "Once upon a time —") in history
    assert history[-1] == ("user", "wait stop")


def test_barge_in_on_gcp_flushes() -> None:
    call = answered(replace(SETTINGS, tts_provider="gcp"))
    step(call, transcript("tell me a story"), 10)
    step(call, ReplySentence(1, "Once upon a time there was a very long story."), 10)
    step(call, ReplyDone(1), 10)
    cmds = step(call, transcript("stop", "tr2"), 12)
    assert kinds(cmds) == ["Flush", "AskBackend"]
    assert Flush(CID, "s1") in cmds


def test_short_or_echo_speech_does_not_cut_the_agent() -> None:
    call = answered()
    step(call, transcript("tell me a story"), 10)
    step(call, ReplySentence(1, "Once upon a time there was a very long story."), 10)
    assert step(call, SpeechEvent("a", "t1", "interim", "in", "uh"), 12) == []  # backchannel
    assert step(call, SpeechEvent("b", "t1", "interim", "in", "hello there"), 10.5) == []  # echo
    cmds = step(call, SpeechEvent("c", "t1", "boundary", "in"), 12)  # tentative only
    assert [c for c in cmds if not isinstance(c, StartTimer)] == []


def test_caller_speech_after_the_agent_finished_is_no_barge_in() -> None:
    call = answered()
    step(call, transcript("hi"), 10)
    step(call, ReplySentence(1, "Hello."), 10)
    step(call, ReplyDone(1), 10)
    assert kinds(step(call, transcript("next", "tr2"), 30)) == ["AskBackend"]


def test_initiating_speaking_is_polled_until_active() -> None:
    call = answered(speaking="initiating")
    timer = StartTimer(CID, T("poll_speaking"), SETTINGS.speaking_poll_s)
    assert step(call, TimerFired(T("poll_speaking")), 0.2) == [PollSpeaking(CID, "s1")]
    assert step(call, SpeakingStarted("s1", "initiating"), 0.3) == [
        replace(timer, delay_s=SETTINGS.speaking_poll_s * 2)
    ]
    assert step(call, SpeakingStarted("s1", "active"), 0.8) == [Say(CID, "s1", "Hi there.", 0)]


@pytest.mark.parametrize("code", [429, 500, 0])
def test_a_speaking_whose_poll_failed_is_stopped_at_hangup(code: int) -> None:
    call = answered(speaking="initiating")
    assert step(call, TimerFired(T("poll_speaking")), 0.2) == [PollSpeaking(CID, "s1")]
    step(call, SpeakingFailed(code, "", "s1"), 0.3)  # not active yet, or not answered
    assert StopSpeaking(CID, "s1") in step(call, status("hangup"), 0.4)


def test_a_speaking_that_never_answers_its_polls_is_stopped_when_the_call_gives_up() -> None:
    # its polls answered 429 (an outage, not a refusal): tried for `speaking_outage_s`
    call = answered(speaking="initiating")
    stopped: list[str] = []
    cmds: list[object] = []
    n = 0
    while Hangup(CID) not in cmds:
        n += 1
        sid, t = f"s{n}", 5.0 * n
        if n > 1:
            cmds = step(call, TimerFired(T("retry_speaking")), t)
            stopped += [c.speaking_id for c in cmds if isinstance(c, StopSpeaking)]
            assert any(isinstance(c, StartSpeaking) for c in cmds)
            step(call, SpeakingStarted(sid, "initiating"), t + 0.1)
        assert step(call, TimerFired(T("poll_speaking")), t + 0.2) == [PollSpeaking(CID, sid)]
        cmds = step(call, SpeakingFailed(429, "", sid), t + 0.3)
        stopped += [c.speaking_id for c in cmds if isinstance(c, StopSpeaking)]
    assert stopped == [f"s{i}" for i in range(1, n + 1)] and n == 5  # the last at t=25.3


def _speaking_refused(code: int, times: list[float]) -> tuple[Call, list[object]]:
    """A call answered whose speaking creates fail with `code` at `times`, each retried when
    its timer says; the transcribe is up. Returns the call and the last failure's commands."""
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    step(call, TranscribeStarted("t1"), 0)
    cmds: list[object] = []
    for n, t in enumerate(times):
        if n:
            assert kinds(step(call, TimerFired(T("retry_speaking")), t - 0.01)) == ["StartSpeaking"]
        cmds = step(call, SpeakingFailed(code, ""), t)
    return call, cmds


def test_a_speaking_create_is_retried_ever_less_often_through_a_short_outage() -> None:
    # POST /speakings answers 503 (a gateway blip) for ~13 s: the call waits it out, and the
    # caller is greeted once VoIPBIN answers
    delays = [1.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]  # retry_s doubling, up to speaking_retry_max_s
    times = [0.5]
    for d in delays[:-1]:
        times.append(times[-1] + d)
    call, cmds = _speaking_refused(503, times)
    assert cmds == [StartTimer(CID, T("retry_speaking"), delays[len(times) - 1])]
    assert call.phase is Phase.ANSWERED and not call.ledger.hangup_pending
    t = times[-1] + delays[len(times) - 1]
    assert kinds(step(call, TimerFired(T("retry_speaking")), t)) == ["StartSpeaking"]
    assert step(call, SpeakingStarted("s1", "active"), t + 0.5) == [Say(CID, "s1", "Hi there.", 0)]
    assert call.speaking.attempts == 0  # the next outage gets the whole window again


@pytest.mark.parametrize("code", [503, 0, 429])
def test_a_speaking_create_that_fails_past_the_outage_window_hangs_up(code: int) -> None:
    window = SETTINGS.speaking_outage_s
    _, cmds = _speaking_refused(code, [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 20.0])
    assert Hangup(CID) not in cmds
    _, cmds = _speaking_refused(code, [1.0, 2.0, 4.0, 8.0, 12.0, 16.0, 1.0 + window])
    [error] = [c for c in cmds if isinstance(c, Record) and c.what is Kind.ERROR]
    assert error.data["what"] == "speaking failed" and Hangup(CID) in cmds


def test_a_refused_speaking_create_is_given_up_after_max_attempts() -> None:
    # a 4xx no retry changes (a bad voice, a permission): retried every retry_s, four in all
    times = [1.0 + SETTINGS.retry_s * n for n in range(SETTINGS.max_attempts)]
    call, cmds = _speaking_refused(400, times[:-1])
    assert cmds == [StartTimer(CID, T("retry_speaking"), SETTINGS.retry_s)]
    call, cmds = _speaking_refused(400, times)
    assert Hangup(CID) in cmds and call.phase is Phase.ENDING


def test_transcribe_conflict_looks_up_the_running_one() -> None:
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    assert step(call, TranscribeFailed(409, "TRANSCRIBE_ALREADY_PROGRESSING"), 0.1) == [
        FindTranscribe(CID, "en-US", frozenset())
    ]
    assert step(call, TranscribeStarted("t9"), 0.2) == []
    assert call.transcribe_id == "t9"


def test_a_conflict_whose_transcribe_is_never_found_is_paced_then_given_up() -> None:
    # 409 on every create, and the list shows no live transcribe (FAILED_PRECONDITION, or one
    # VoIPBIN is still ending): each new create waits longer, and the call stops asking
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    retry = T("retry_transcribe")
    for n in range(1, SETTINGS.max_attempts + 1):
        assert step(call, TranscribeFailed(409, "FAILED_PRECONDITION"), n) == [
            FindTranscribe(CID, "en-US", frozenset())
        ]
        assert step(call, TranscribeFailed(404, NOT_FOUND), n + 0.1) == [
            StartTimer(CID, retry, SETTINGS.retry_s * n)
        ]
        assert kinds(step(call, TimerFired(retry), n + 0.5)) == ["StartTranscribe"]
    cmds = step(call, TranscribeFailed(409, "FAILED_PRECONDITION"), 9)
    [error] = [c for c in cmds if isinstance(c, Record) and c.what is Kind.ERROR]
    assert error.data["what"] == "transcribe failed" and kinds(cmds) == []


def test_conflicts_whose_finds_get_no_answer_are_retried_through_the_outage() -> None:
    # a create that took effect but answered 503, then 409 on every create while listing the
    # transcribes fails (an outage of GET /transcribes): no sign the transcribe is missing
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    retry = T("retry_transcribe")
    for n in range(1, 3 * SETTINGS.max_attempts):
        assert kinds(step(call, TranscribeFailed(409, "TRANSCRIBE_ALREADY_PROGRESSING"), n)) == [
            "FindTranscribe"
        ]
        assert kinds(step(call, TranscribeFailed((0, 503)[n % 2], "down"), n + 0.1)) in (
            ["StartTimer"],
            ["Record", "StartTimer"],  # transcribe_down, once
        )
        assert kinds(step(call, TimerFired(retry), n + 0.5)) == ["StartTranscribe"]
    assert not call.transcribe_refused
    assert step(call, TranscribeFailed(409, "TRANSCRIBE_ALREADY_PROGRESSING"), 50) == [
        FindTranscribe(CID, "en-US", frozenset())
    ]
    [back] = step(call, TranscribeStarted("t9"), 50.1)  # listed at last: adopted
    assert isinstance(back, Record) and back.what is Kind.TRANSCRIBE_RESTARTED
    assert call.transcribe_id == "t9"


def test_a_failed_stop_is_retried_until_confirmed() -> None:
    call = answered()
    step(call, TranscribeEvent("t1", "call", CID, "done"), 5)  # ended by itself
    assert kinds(step(call, status("hangup"), 5)) == ["StopSpeaking"]
    cmds = step(call, Stopped("speaking", "s1", False), 5.1)
    assert cmds == [StartTimer(CID, T("retry_stop:s1"), SETTINGS.retry_s)]
    # the retry is a DELETE: it works when the tts pod that owns the session is gone
    assert step(call, TimerFired(T("retry_stop:s1")), 6.1) == [StopSpeaking(CID, "s1", True)]
    assert step(call, Stopped("speaking", "s1", True), 6.2) == [Finished(CID)]


def test_sessions_left_unstopped_at_a_shutdown_are_named_as_leaks() -> None:
    call = answered()
    assert call.unstopped() == [("speaking", "s1"), ("transcribe", "t1")]  # no stop asked yet
    call.shutdown(1)
    step(call, Stopped("transcribe", "t1", True), 1.1)
    step(call, Stopped("speaking", "s1", False, 503), 1.2)  # refused: still billed
    assert call.unstopped() == [("speaking", "s1")]
    (leak,) = call.left_running()
    assert isinstance(leak, Record) and leak.what is Kind.LEAK
    assert leak.data["session_id"] == "s1" and leak.data["kind"] == "speaking"
    assert leak.data["gave_up"] is True and leak.data["shutdown"] is True


def test_a_session_given_up_before_the_shutdown_is_not_recorded_a_leak_again() -> None:
    # its stops were refused for good while the call went on ending: its leak was recorded
    # then, with its attempts; the drain's end names it, but records it no more
    call = answered()
    call.shutdown(1)
    step(call, Stopped("transcribe", "t1", False, 503), 1.1)  # still billed, retried
    gave_up = []
    for attempt in range(SETTINGS.max_stop_attempts):
        cmds = step(call, Stopped("speaking", "s1", False, 403), 2 + attempt)
        gave_up += [c for c in cmds if isinstance(c, Record) and c.data.get("gave_up")]
        step(call, TimerFired(T("retry_stop:s1")), 2.5 + attempt)
    assert [leak.data["session_id"] for leak in gave_up] == ["s1"]
    assert call.unstopped() == [("transcribe", "t1"), ("speaking", "s1")]  # both still bill
    (leak,) = call.left_running()
    assert isinstance(leak, Record) and leak.data["session_id"] == "t1"


def test_backend_failure_speaks_the_fallback_and_the_call_goes_on() -> None:
    call = answered()
    step(call, transcript("hello"), 10)
    cmds = step(call, ReplyFailed(1, "backend timed out"), 25)
    assert Say(CID, "s1", SETTINGS.fallback_text, 1) in cmds
    assert kinds(step(call, transcript("again", "tr2"), 40)) == ["AskBackend"]


def test_fragments_of_one_sentence_become_one_turn() -> None:
    call = answered()
    step(call, transcript("I need help"), 10)
    cmds = step(call, transcript("with my account", "tr2"), 10.4)
    assert CancelBackend(CID, 1) in cmds
    ask = cmds[-1]
    assert isinstance(ask, AskBackend) and ask.turn == 2
    assert ask.history[-1] == ("user", "I need help with my account")


def test_end_call_hangs_up_after_the_goodbye_has_played() -> None:
    call = answered()
    step(call, transcript("bye"), 10)
    step(call, ReplySentence(1, "Goodbye."), 10)
    cmds = step(call, ReplyDone(1, action=EndCall()), 10)
    timer = [c for c in cmds if isinstance(c, StartTimer)][0]
    assert timer.delay_s == pytest.approx(0.8 + SETTINGS.playback_pad_s)
    cmds = step(call, TimerFired(T("after_reply")), 12)
    # our hangup ends the transcribe on VoIPBIN's side: no stop for it, a late one armed
    assert kinds(cmds) == ["Hangup", "StopSpeaking", "StartTimer"]


def test_a_goodbye_in_a_slower_script_is_waited_for_at_its_own_pace() -> None:
    # an English agent's model answering in Korean: its audio plays at the Korean pace (6 to
    # 15 characters a second), and the hangup waited only for the English estimate
    call = answered()  # en-US, 10 characters a second
    step(call, transcript("bye"), 10)
    step(call, ReplySentence(1, "감사합니다 좋은 하루"), 10)  # 11 characters: 2.75 s, not 1.1 s
    cmds = step(call, ReplyDone(1, action=EndCall()), 10)
    timer = [c for c in cmds if isinstance(c, StartTimer) and c.timer == T("after_reply")][0]
    assert timer.delay_s == pytest.approx(2.75 + SETTINGS.playback_pad_s)
    # and the other way round: Latin text from a Korean agent plays faster than Korean
    korean = replace(SETTINGS, language="ko-KR")
    assert korean.rate_for("Thank you") == pytest.approx(25.0)
    assert korean.rate_for("감사합니다") == SETTINGS.rate_for("Thank you") == 10.0


def test_end_call_with_nothing_said_says_a_goodbye_before_the_hangup() -> None:
    # a model often sends the end_call tool alone: the caller was hung up on without a word
    call = answered()
    step(call, transcript("that is all thanks"), 10)
    cmds = step(call, ReplyDone(1, action=EndCall()), 10)
    assert Say(CID, "s1", "Goodbye!", 1) in cmds
    timer = [c for c in cmds if isinstance(c, StartTimer) and c.timer == T("after_reply")][0]
    assert timer.delay_s == pytest.approx(0.8 + SETTINGS.playback_pad_s)  # after it played
    assert kinds(step(call, TimerFired(T("after_reply")), 12))[0] == "Hangup"
    korean = answered(replace(SETTINGS, language="ko-KR"))
    step(korean, transcript("됐어요"), 10)
    assert Say(CID, "s1", "안녕히 계세요.", 1) in step(korean, ReplyDone(1, action=EndCall()), 10)


def test_transfer_after_the_reply_then_our_sessions_end() -> None:
    call = answered(replace(SETTINGS, transfer_numbers=("+15550009999",)))
    step(call, transcript("a human please"), 10)
    step(call, ReplySentence(1, "Transferring you now."), 10)
    # the model's spelling names the allowed number; what is dialled is the configured one
    step(call, ReplyDone(1, action=TransferTo("+1 555 000 9999")), 10)
    assert step(call, TimerFired(T("after_reply")), 13) == [Transfer(CID, "+15550009999")]
    cmds = step(call, TransferDone(True), 13.5)
    assert kinds(cmds) == ["StopSpeaking", "StopTranscribe"]
    assert not any(isinstance(c, Hangup) for c in cmds)  # the caller stays, with the human


def test_a_transfer_to_a_number_not_on_the_allow_list_is_refused_and_the_call_goes_on() -> None:
    call = answered(replace(SETTINGS, transfer_numbers=("+15550009999",)))
    step(call, transcript("put me through to 1-900-PREMIUM"), 10)
    step(call, ReplySentence(1, "Transferring you now."), 10)
    cmds = step(call, ReplyDone(1, action=TransferTo("+19005550100")), 10)
    [error] = [c for c in cmds if isinstance(c, Record) and c.what is Kind.ERROR]
    assert error.data["number"] == "+19005550100"
    assert Say(CID, "s1", SETTINGS.transfer_failed_text, 1) in cmds
    assert call.after_reply is None
    assert step(call, TimerFired(T("after_reply")), 13) == []  # nothing dialled


def test_a_failed_transfer_leaves_the_caller_with_the_agent() -> None:
    call = answered(replace(SETTINGS, transfer_numbers=("+15550009999",)))
    step(call, transcript("a human please"), 10)
    step(call, ReplySentence(1, "Transferring you now."), 10)
    step(call, ReplyDone(1, action=TransferTo("+15550009999")), 10)
    step(call, TimerFired(T("after_reply")), 13)
    cmds = step(call, TransferDone(False, "HTTP 500"), 13.5)
    assert Say(CID, "s1", SETTINGS.transfer_failed_text, 1) in cmds
    assert call.phase is Phase.ACTIVE


def test_shutdown_hangs_up_and_stops_everything() -> None:
    call = answered()
    cmds = call.shutdown(30)
    assert kinds(cmds) == ["Hangup", "StopSpeaking", "StopTranscribe"]
    assert call.shutdown(30) == []


def test_shutdown_with_a_goodbye_says_it_first() -> None:
    call = answered()
    cmds = call.shutdown(30, "Bye now.")
    assert kinds(cmds) == ["Say", "StartTimer"]
    assert kinds(step(call, TimerFired(T("after_reply")), 32)) == [
        "Hangup",
        "StopSpeaking",
        "StopTranscribe",
    ]


def test_snapshot_and_restore_resume_without_a_second_greeting() -> None:
    call = answered()
    call.handle(transcript("hello", "tr1"), 10)
    call.handle(ReplySentence(1, "Hi."), 10)
    call.handle(ReplyDone(1), 10)
    again = Call.restore(call.snapshot(), SETTINGS)
    cmds = [c for c in again.resume(100) if not isinstance(c, StartTimer)]
    assert kinds(cmds) == ["CheckCall", "PollSpeaking", "FindTranscribe"]
    assert step(again, SpeakingStarted("s1", "active"), 100.1) == []  # no second greeting
    assert step(again, transcript("hello", "tr1"), 100.2) == []  # answered before the crash
    assert kinds(step(again, transcript("more", "tr2"), 101)) == ["AskBackend"]


def test_a_restored_calls_silence_counts_from_the_restart() -> None:
    settings = replace(SETTINGS, silence_s=10.0)
    call = answered(settings)
    call.handle(transcript("hello", "tr1"), 10)
    # the next process's clock is another one: here, the host's uptime
    again = Call.restore(call.snapshot(), settings)
    resumed = again.resume(20_000)
    [timer] = [c for c in resumed if isinstance(c, StartTimer) and c.timer.kind == "silence"]
    assert timer.delay_s == pytest.approx(10.0)
    again.handle(TranscribeStarted("t1"), 20_000.5)  # the find: its transcribe is still there
    cmds = again.handle(TimerFired(T("silence")), 20_010)
    [quiet] = [c for c in cmds if isinstance(c, Record) and c.what is Kind.STT_QUIET]
    assert quiet.data["quiet_s"] == 10.0


def test_restored_call_that_ended_while_we_were_down_is_cleaned_up() -> None:
    call = answered()
    again = Call.restore(call.snapshot(), SETTINGS)
    again.resume(100)
    cmds = step(again, status("hangup", "normal", "remote"), 100.1)
    # the speaking id is known; a session created just before the crash may not be: sweep
    assert kinds(cmds) == ["StopSpeaking", "SweepSpeakings"]
    assert step(again, Stopped("speaking", "s1", True), 100.2) == []
    assert step(again, TranscribeFailed(404, "not found"), 100.3) == []  # the sweep is not done
    assert step(again, SweepDone(True), 100.4) == [Finished(CID)]


def test_a_sweep_that_fails_is_tried_again_and_the_call_waits_for_it() -> None:
    call = answered()
    call.ledger.sweep_needed = True  # a create answered 500: a session may exist unknown to us
    assert "SweepSpeakings" in kinds(step(call, status("hangup", "normal", "remote"), 50))
    step(call, Stopped("speaking", "s1", True), 50.1)
    step(call, TranscribeEvent("t1", "call", CID, "done"), 50.2)
    # VoIPBIN's outage: tried again ever less often, however long, and the call stays open
    for n in range(10):
        delay = min(SETTINGS.retry_s * 2**n, 60.0)
        assert step(call, SweepDone(False, 503), 51 + n) == [
            StartTimer(CID, T("retry_sweep"), delay)
        ]
        assert step(call, TimerFired(T("retry_sweep")), 52 + n) == [SweepSpeakings(CID)]
    assert step(call, SweepDone(True), 70) == [Finished(CID)]


def test_a_sweep_refused_again_and_again_is_given_up_with_a_leak_record() -> None:
    call = answered()
    call.ledger.sweep_needed = True
    step(call, status("hangup", "normal", "remote"), 50)
    step(call, Stopped("speaking", "s1", True), 50.1)
    step(call, TranscribeEvent("t1", "call", CID, "done"), 50.2)
    for n in range(SETTINGS.max_stop_attempts - 1):
        step(call, SweepDone(False, 403), 51 + n)
        step(call, TimerFired(T("retry_sweep")), 52 + n)
    cmds = step(call, SweepDone(False, 403), 70)
    [leak] = [c for c in cmds if isinstance(c, Record)]
    assert leak.what is Kind.LEAK and leak.data["gave_up"] is True
    assert cmds[-1] == Finished(CID)


def test_a_restored_call_whose_hangup_was_unconfirmed_sends_it_again() -> None:
    call = answered()
    call.handle(TimerFired(T("max_call")), 50)
    call.handle(TimerFired(T("after_reply")), 57)  # the goodbye played: our hangup goes
    assert step(call, HangupDone(False), 57.1)[0] == CheckCall(CID)  # refused: retried later
    again = Call.restore(call.snapshot(), SETTINGS)
    cmds = again.resume(100)
    assert Hangup(CID) in cmds and Finished(CID) not in cmds
    # its sessions confirmed stopped: the call is still not over until the hangup is
    for cmd in cmds:
        if isinstance(cmd, (StopSpeaking, StopTranscribe)):
            sid = cmd.speaking_id if isinstance(cmd, StopSpeaking) else cmd.transcribe_id
            kind = "speaking" if isinstance(cmd, StopSpeaking) else "transcribe"
            assert Finished(CID) not in step(again, Stopped(kind, sid, True), 100.1)
    assert step(again, SweepDone(True), 100.2) == []  # the hangup is still not confirmed
    assert step(again, HangupDone(True), 100.3)[-1] == Finished(CID)


def test_a_restored_call_runs_the_action_its_goodbye_was_said_for() -> None:
    call = answered()
    call.handle(TimerFired(T("max_call")), 50)  # the time limit: a goodbye, then the hangup
    again = Call.restore(call.snapshot(), SETTINGS)
    cmds = again.resume(100)
    [timer] = [c for c in cmds if isinstance(c, StartTimer) and c.timer == T("after_reply")]
    assert kinds(step(again, TimerFired(timer.timer), 100 + timer.delay_s))[0] == "Hangup"
    # a transfer waits the same way, to a number still allowed
    allowed = replace(SETTINGS, transfer_numbers=("+15550002222",))
    call = answered(allowed)
    call.after_reply = TransferTo("+15550002222")
    assert Call.restore(call.snapshot(), allowed).after_reply == TransferTo("+15550002222")
    assert Call.restore(call.snapshot(), SETTINGS).after_reply is None  # no longer allowed


def test_a_transcribe_start_cut_short_by_a_restart_is_looked_for_and_stopped() -> None:
    # killed while POST /transcribes was under way: VoIPBIN may create that one after the
    # next agentd started its own (its duplicate check runs before its slow media start)
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    step(call, SpeakingStarted("s1", "active"), 0)
    again = Call.restore(call.snapshot(), SETTINGS)
    assert "FindTranscribe" in kinds(again.resume(100))
    assert kinds(step(again, TranscribeFailed(404, NOT_FOUND), 100.1))[-1] == "StartTranscribe"
    cmds = step(again, TranscribeStarted("t2"), 100.2)
    [sweep] = [c for c in cmds if isinstance(c, StartTimer)]
    assert sweep.timer == T("sweep_transcribes") and sweep.delay_s >= 10
    cmds = step(again, TimerFired(sweep.timer), 130)
    assert cmds == [SweepTranscribes(CID, SETTINGS.language, "t2")]
    cmds = step(again, TranscribesFound(("t1",)), 130.1)
    assert StopTranscribe(CID, "t1") in cmds
    [stray] = [c for c in cmds if isinstance(c, Record)]
    assert stray.what is Kind.STRAY and stray.data["session_id"] == "t1"
    # a call whose transcribe was known before the restart has nothing to look for
    plain = Call.restore(answered().snapshot(), SETTINGS)
    plain.resume(100)
    cmds = step(plain, TranscribeStarted("t1"), 100.1)
    assert not [c for c in cmds if isinstance(c, StartTimer)]


def _over_before_its_transcribe_sweep() -> tuple[Call, list[object]]:
    """A call restored while its transcribe was being started, whose caller hung up in the
    restart's gap: its speaking is stopped and swept, its transcribe sweep still to come."""
    call = Call(CID, SETTINGS)
    step(call, status("progressing"), 0)
    step(call, SpeakingStarted("s1", "active"), 0)
    again = Call.restore(call.snapshot(), SETTINGS)
    again.resume(100)
    cmds = step(again, status("hangup"), 100.05)
    cmds += step(again, TranscribeFailed(404, NOT_FOUND), 100.1)
    cmds += step(again, Stopped("speaking", "s1", True), 100.2)
    cmds += step(again, SweepDone(True), 100.3)  # its speakings' sweep
    return again, cmds


def test_a_restored_call_over_before_its_transcribe_sweep_is_swept_before_it_is_finished() -> None:
    # the caller hung up in the restart's gap: the last agentd's transcribe start, still under
    # way at VoIPBIN, may make one after the hangup, and no hangup would ever end that one
    again, cmds = _over_before_its_transcribe_sweep()
    assert "Finished" not in kinds(cmds)
    [sweep] = [c for c in cmds if isinstance(c, StartTimer) and c.timer == T("sweep_transcribes")]
    assert sweep.delay_s >= 10
    assert step(again, TimerFired(sweep.timer), 130) == [
        SweepTranscribes(CID, SETTINGS.language, "")
    ]
    # killed again before the sweep (it is not in the store): the next agentd sweeps too
    third = Call.restore(again.snapshot(), SETTINGS)
    cmds = third.resume(120)
    assert "Finished" not in kinds(cmds)
    assert StartTimer(CID, T("sweep_transcribes"), core.TRANSCRIBE_SWEEP_S) in cmds
    # VoIPBIN failing to list them: looked for again, whatever the speakings' sweep counted
    again.ledger.sweep_failures = SETTINGS.max_stop_attempts
    cmds = step(again, TranscribesFound((), ok=False), 130.1)
    assert kinds(cmds) == ["StartTimer"]
    step(again, TimerFired(sweep.timer), 131)
    cmds = step(again, TranscribesFound(("t9",)), 131.1)
    assert StopTranscribe(CID, "t9") in cmds and "Finished" not in kinds(cmds)
    assert kinds(step(again, Stopped("transcribe", "t9", True), 131.2))[-1] == "Finished"


def test_a_transcribe_sweep_waits_out_an_outage_and_gives_up_on_refusals() -> None:
    again, _ = _over_before_its_transcribe_sweep()
    limit = SETTINGS.max_stop_attempts
    # VoIPBIN unreachable or failing (no answer, 503) far past the refusals' limit: the
    # transcribe a cut-short start may have made is still looked for
    for i in range(limit + 3):
        cmds = step(again, TranscribesFound((), ok=False, status=(0, 503)[i % 2]), 130 + i)
        assert kinds(cmds) == ["StartTimer"], i
    # a refusal, though: no retry changes it, given up loudly
    cmds = step(again, TranscribesFound((), ok=False, status=403), 140)
    [error] = [c for c in cmds if isinstance(c, Record) and c.what is Kind.ERROR]
    assert error.data["what"] == "transcribe sweep failed" and error.data["status"] == 403
    assert kinds(cmds)[-1] == "Finished"


def test_a_quiet_call_is_checked_over_rest_with_backoff() -> None:
    call = Call(CID, SETTINGS)
    cmds = call.handle(status("ringing"), 0)
    assert StartTimer(CID, T("watch"), SETTINGS.watch_s) in cmds
    call.handle(status("progressing"), 5)
    # an event 5 s in: at 20 s the call is not quiet yet, the watch waits the rest
    assert call.handle(TimerFired(T("watch")), 20) == [StartTimer(CID, T("watch"), 5.0)]
    assert call.handle(TimerFired(T("watch")), 25) == [
        CheckCall(CID),
        StartTimer(CID, T("watch"), SETTINGS.watch_s),
    ]
    assert call.handle(TimerFired(T("watch")), 45) == [
        CheckCall(CID),
        StartTimer(CID, T("watch"), SETTINGS.watch_s * 2),
    ]
    # the check answers hangup: the lost call_hangup is made good
    cmds = call.handle(status("hangup", "normal", "remote"), 46)
    assert any(isinstance(c, StopSpeaking | StopTranscribe) for c in cmds) or call.phase.over


def test_silence_reprompts_then_says_goodbye_and_hangs_up() -> None:
    settings = replace(SETTINGS, silence_s=10.0, max_silence_reprompts=1)
    call = Call(CID, settings)
    call.handle(status("progressing"), 0)
    call.handle(TranscribeStarted("t1"), 0)
    cmds = call.handle(SpeakingStarted("s1", "active"), 0)
    # the greeting plays 0.9 s; silence counts from its end
    assert StartTimer(CID, T("silence"), pytest.approx(10.9)) in cmds
    cmds = call.handle(TimerFired(T("silence")), 10.9)
    assert Say(CID, "s1", settings.reprompt_text, 0) in cmds
    quiet = next(c for c in cmds if isinstance(c, Record) and c.what == "stt_quiet")
    assert quiet.data == {"quiet_s": 10.9, "stt_provider": "aws"}  # silent since the answer
    # the STT may be the deaf one: replaced before the reprompt's answer is due
    assert StopTranscribe(CID, "t1") in cmds
    assert StartTranscribe(CID, "en-US", "aws") in cmds
    assert call.handle(TranscribeStarted("t2"), 11) == []
    cmds = call.handle(TimerFired(T("silence")), 22.9)
    assert not any(isinstance(c, StartTranscribe) for c in cmds)  # once per quiet spell
    assert Say(CID, "s1", settings.silence_goodbye, 0) in cmds
    timer = next(c for c in cmds if isinstance(c, StartTimer) and c.timer.kind == "after_reply")
    cmds = call.handle(TimerFired(T("after_reply")), 22.9 + timer.delay_s)
    assert kinds(cmds) == ["Hangup", "StopSpeaking", "StartTimer"]
    assert StartTimer(CID, T("retry_stop:t2"), settings.transcribe_end_wait_s) in cmds


def test_a_quiet_transcribe_replaced_is_read_back_first() -> None:
    # the caller may have spoken while the events were lost (a subscription that took effect
    # late: "events sent before the subscription took effect are lost", docs/protocol.md): what
    # the old transcribe heard is read back, not dropped with it
    settings = replace(SETTINGS, silence_s=10.0)
    call = answered(settings)
    cmds = call.handle(TimerFired(T("silence")), 10.9)
    assert StopTranscribe(CID, "t1") in cmds and FetchTranscripts(CID, "t1") in cmds
    call.handle(TranscribeStarted("t2"), 11)
    cmds = call.handle(TranscriptsRead((transcript("are you there", "tr9"),)), 11.2)
    assert any(isinstance(c, AskBackend) for c in cmds)


def test_caller_speech_resets_the_silence_count() -> None:
    settings = replace(SETTINGS, silence_s=10.0)
    call = answered(settings)
    assert step(call, SpeechEvent("x", "t1", "boundary", "in"), 5) == []
    cmds = call.handle(TimerFired(T("silence")), 10.9)
    assert cmds == [StartTimer(CID, T("silence"), pytest.approx(4.1))]  # 10 s after the speech


def test_one_silence_timer_runs_across_turns_and_waits_out_the_rest() -> None:
    settings = replace(SETTINGS, silence_s=10.0)
    call = answered(settings)  # the greeting armed the timer: due at 10.9

    def silence_timers(cmds: list[object]) -> list[float]:
        return [c.delay_s for c in cmds if isinstance(c, StartTimer) and c.timer.kind == "silence"]

    call.handle(transcript("hello", "tr1"), 3)
    call.handle(ReplySentence(1, "Hi."), 3)
    # the reply's end would want it at 13.x: the one due at 10.9 stays, nothing is re-armed
    assert silence_timers(call.handle(ReplyDone(1), 3)) == []
    # it fires: the caller was not quiet 10 s, so it waits the rest, from the reply's end
    cmds = call.handle(TimerFired(T("silence")), 10.9)
    assert not any(isinstance(c, Say) for c in cmds)
    [rest] = silence_timers(cmds)
    assert 10.9 + rest == pytest.approx(max(3.0, call.playback.until) + 10.0)
    # after it fires the next reply's end arms one again
    call.handle(transcript("again", "tr2"), 12)
    call.handle(ReplySentence(2, "Yes."), 12)
    assert silence_timers(call.handle(ReplyDone(2), 12)) == []  # the rest, due sooner, runs
    cmds = call.handle(TimerFired(T("silence")), 10.9 + rest)
    assert silence_timers(cmds)  # not quiet long enough yet: the rest again
    assert not any(isinstance(c, Say) for c in cmds)


def test_the_time_limit_says_goodbye_and_hangs_up() -> None:
    call = answered()
    call.handle(transcript("tell me everything"), 10)
    cmds = call.handle(TimerFired(T("max_call")), SETTINGS.max_call_s)
    assert CancelBackend(CID, 1) in cmds
    assert Say(CID, "s1", SETTINGS.time_limit_goodbye, 1) in cmds
    assert call.handle(ReplySentence(1, "More words."), SETTINGS.max_call_s + 0.1) == []


def test_a_lost_transcript_is_fetched_when_speech_ended_without_one() -> None:
    call = answered()
    step(call, SpeechEvent("a", "t1", "boundary", "in"), 10)  # started
    step(call, SpeechEvent("b", "t1", "interim", "in", "are you"), 10.3)
    cmds = step(call, SpeechEvent("c", "t1", "boundary", "in"), 10.8)  # ended
    assert cmds == [StartTimer(CID, T("transcript_due"), SETTINGS.transcript_due_s)]
    assert step(call, TimerFired(T("transcript_due")), 13.8) == [FetchTranscripts(CID, "t1")]
    # the fetched transcript is answered; a second fetch of it changes nothing
    assert kinds(step(call, transcript("are you there", "tr9"), 14)) == ["AskBackend"]
    assert step(call, transcript("are you there", "tr9"), 15) == []


def test_a_transcript_in_time_cancels_the_fetch() -> None:
    call = answered()
    step(call, SpeechEvent("b", "t1", "interim", "in", "hello"), 10.3)
    step(call, SpeechEvent("c", "t1", "boundary", "in"), 10.8)
    step(call, transcript("hello", "tr1"), 11)
    assert step(call, TimerFired(T("transcript_due")), 13.8) == []


def test_an_old_transcript_read_back_again_does_not_reset_the_silence() -> None:
    call = answered(replace(SETTINGS, silence_s=10.0))
    step(call, transcript("hello", "tr1"), 1)
    step(call, ReplySentence(1, "Hi."), 1)
    step(call, ReplyDone(1), 1)
    step(call, transcript("hello", "tr1"), 9)  # the watch fetched it again
    cmds = step(call, TimerFired(T("silence")), 11.3)
    assert Say(CID, "s1", SETTINGS.reprompt_text, 1) in cmds


def test_a_stop_answered_5xx_escalates_to_delete_and_is_never_given_up() -> None:
    call = answered()
    call.handle(TranscribeEvent("t1", "call", CID, "done"), 5)
    step(call, status("hangup"), 5)
    delays = []
    leaks = []
    for attempt in range(SETTINGS.max_stop_attempts + 5):  # an outage of many minutes
        cmds = step(call, Stopped("speaking", "s1", False, 503), 6 + attempt)
        timer = next(c for c in cmds if isinstance(c, StartTimer))
        delays.append(timer.delay_s)
        leaks += [c.data for c in cmds if isinstance(c, Record) and c.what is Kind.LEAK]
        assert step(call, TimerFired(timer.timer), 7 + attempt) == [StopSpeaking(CID, "s1", True)]
        assert not any(isinstance(c, Finished) for c in cmds)
    # a 5xx may be a dead pod: the first DELETE goes at once; then a minute apart at most
    assert delays == [0.0, 2.0, 4.0, 8.0, 16.0, 32.0, *[60.0] * 7]
    # reported once, with the session id, while it goes on
    assert leaks == [{"kind": "speaking", "session_id": "s1", "status": 503}]
    assert step(call, Stopped("speaking", "s1", True), 900) == [Finished(CID)]


def test_a_stop_refused_again_and_again_is_given_up_loudly() -> None:
    call = answered()
    call.handle(TranscribeEvent("t1", "call", CID, "done"), 5)
    step(call, status("hangup"), 5)
    for attempt in range(SETTINGS.max_stop_attempts - 1):
        cmds = step(call, Stopped("speaking", "s1", False, 403), 6 + attempt)
        timer = next(c for c in cmds if isinstance(c, StartTimer))
        assert step(call, TimerFired(timer.timer), 7 + attempt) == [StopSpeaking(CID, "s1", True)]
    # a refusal no retry changes (a permission): bounded, reported with the session id, and
    # the call is let go
    cmds = step(call, Stopped("speaking", "s1", False, 403), 300)
    leak = next(c for c in cmds if isinstance(c, Record))
    assert leak.what is Kind.LEAK
    assert leak.data == {
        "kind": "speaking",
        "session_id": "s1",
        "attempts": SETTINGS.max_stop_attempts,
        "status": 403,
        "gave_up": True,
    }
    assert cmds[-1] == Finished(CID)
    assert not any(isinstance(c, StartTimer) for c in cmds)


def test_a_delete_that_leaves_the_stream_running_is_reported_and_the_call_let_go() -> None:
    call = answered()
    call.handle(TranscribeEvent("t1", "call", CID, "done"), 5)
    step(call, status("hangup"), 5)
    cmds = step(call, Stopped("speaking", "s1", False, 503), 6)
    assert step(call, TimerFired(T("retry_stop:s1")), 6) == [StopSpeaking(CID, "s1", True)]
    # VoIPBIN deleted the row (200) but its pod could not stop the stream: no request of ours
    # can end it any more; an error names it, and nothing is retried
    cmds = step(call, Stopped("speaking", "s1", True, unstopped=True), 7)
    [leak] = [c for c in cmds if isinstance(c, Record)]
    assert leak.what is Kind.LEAK
    assert leak.data == {
        "kind": "speaking",
        "session_id": "s1",
        "status": 200,
        "gave_up": True,
        "unstopped": True,
    }
    assert cmds[-1] == Finished(CID)
    assert not any(isinstance(c, StartTimer) for c in cmds)


def test_barge_in_restart_waits_for_a_confirmed_stop() -> None:
    call = answered()
    step(call, transcript("tell me a story"), 10)
    step(call, ReplySentence(1, "Once upon a time there was a very long story."), 10)
    step(call, SpeechEvent("sp1", "t1", "interim", "in", "wait stop"), 12)
    cmds = step(call, Stopped("speaking", "s1", False), 12.2)
    assert not any(isinstance(c, StartSpeaking) for c in cmds)  # the old one may still play
    assert step(call, TimerFired(T("retry_stop:s1")), 13.2) == [StopSpeaking(CID, "s1", True)]
    assert kinds(step(call, Stopped("speaking", "s1", True), 13.3)) == ["StartSpeaking"]


def test_our_hangup_is_retried_until_voipbin_confirms_it() -> None:
    call = answered()
    cmds = call.shutdown(30)
    assert kinds(cmds) == ["Hangup", "StopSpeaking", "StopTranscribe"]
    step(call, Stopped("speaking", "s1", True), 30.1)
    assert step(call, Stopped("transcribe", "t1", True), 30.1) == []  # hangup not confirmed
    assert step(call, HangupDone(False), 30.2) == [
        CheckCall(CID),
        StartTimer(CID, T("retry_hangup"), 1.0),
    ]
    assert step(call, TimerFired(T("retry_hangup")), 31.2) == [Hangup(CID)]
    assert step(call, HangupDone(True), 31.3) == [Finished(CID)]


def test_a_hangup_refused_again_and_again_is_retried_ever_less_often() -> None:
    call = answered()
    call.shutdown(30)
    step(call, Stopped("speaking", "s1", True), 30.1)
    step(call, Stopped("transcribe", "t1", True), 30.1)
    delays = []
    for n in range(9):  # VoIPBIN answers 5xx for minutes
        [check, timer] = step(call, HangupDone(False), 31 + n)
        assert check == CheckCall(CID) and isinstance(timer, StartTimer)
        delays.append(timer.delay_s)
        assert step(call, TimerFired(T("retry_hangup")), 31.5 + n) == [Hangup(CID)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 120, 120]
    # the check finds the call hung up (its call_hangup event was lost): nothing left to do
    assert step(call, status("hangup", "normal"), 40) == [Finished(CID)]


def test_interim_speech_does_not_push_answered_transcripts_out() -> None:
    call = answered()
    step(call, transcript("hello", "tr1"), 10)
    for i in range(3000):
        step(call, SpeechEvent(f"sp{i}", "t1", "interim", "in", "x"), 11)
    assert step(call, transcript("hello", "tr1"), 12) == []


def test_a_transcribe_that_ends_under_a_live_call_is_replaced() -> None:
    call = answered()
    assert step(call, TranscribeEvent("t1", "call", CID, "done"), 5) == [CheckCall(CID)]
    # VoIPBIN's answer to the check: the call is up, the agent went deaf
    cmds = step(call, replace(status("progressing"), checked=True), 5.05)
    assert kinds(cmds) == ["StartTranscribe"]
    assert step(call, TranscribeStarted("t2"), 5.1) == []
    cmds = step(call, status("hangup"), 6)
    assert not any(isinstance(c, StopTranscribe) for c in cmds)  # VoIPBIN ends t2 itself
    assert StartTimer(CID, T("retry_stop:t2"), SETTINGS.transcribe_end_wait_s) in cmds
    assert T("retry_stop:t1") not in [c.timer for c in cmds if isinstance(c, StartTimer)]


def test_a_late_call_updated_after_the_transcribe_ended_starts_nothing() -> None:
    # call_updated (progressing) published before the hangup, delivered after the transcribe's
    # done: the call is over, and a new transcribe would be started on a dead call
    call = answered()
    assert step(call, TranscribeEvent("t1", "call", CID, "done"), 5) == [CheckCall(CID)]
    assert step(call, status("progressing"), 5.05) == []
    cmds = step(call, status("hangup", "normal"), 5.1)
    assert not any(isinstance(c, StartTranscribe) for c in cmds)
    assert not any(isinstance(c, Record) and c.what is Kind.TRANSCRIBE_RESTARTED for c in cmds)


# ---- the transcribe at hangup: VoIPBIN ends it, agentd awaits that -----------------------------
# bin-transcribe-manager stops every transcribe of a call on its call_hangup
# (transcribehandler/event.go EventCMCallHangup): a /stop of ours would find it `done`.


def hung_up_remotely(now: float = 20.0) -> Call:
    """A call the caller hung up at `now`, its speaking's stop confirmed: only the transcribe's
    end is awaited."""
    call = answered()
    cmds = step(call, status("hangup", "normal", "remote"), now)
    assert not any(isinstance(c, StopTranscribe) for c in cmds)
    assert StartTimer(CID, T("retry_stop:t1"), SETTINGS.transcribe_end_wait_s) in cmds
    assert step(call, Stopped("speaking", "s1", True), now + 0.1) == []  # not finished yet
    assert call.phase is Phase.ENDING
    return call


def test_at_hangup_the_transcribe_is_awaited_not_stopped() -> None:
    call = hung_up_remotely()
    assert step(call, TranscribeEvent("t1", "call", CID, "done"), 20.3) == [Finished(CID)]
    # a duplicate `done` and the late-stop timer find nothing left to do
    assert step(call, TranscribeEvent("t1", "call", CID, "done"), 20.4) == []
    assert step(call, TimerFired(T("retry_stop:t1")), 25) == []


def test_an_awaited_transcribe_whose_end_never_comes_is_stopped_after_all() -> None:
    call = hung_up_remotely()
    # the `done` was lost, or VoIPBIN's own stop failed (its handler only logs the error)
    assert step(call, TimerFired(T("retry_stop:t1")), 25) == [StopTranscribe(CID, "t1")]
    # that stop is an ordinary one from now on: retried until confirmed
    assert step(call, Stopped("transcribe", "t1", False), 25.1) == [
        StartTimer(CID, T("retry_stop:t1"), SETTINGS.retry_s)
    ]
    assert kinds(step(call, TimerFired(T("retry_stop:t1")), 26.1)) == ["StopTranscribe"]
    assert step(call, Stopped("transcribe", "t1", True), 26.2) == [Finished(CID)]


def test_a_done_after_the_late_stop_was_sent_also_ends_the_wait() -> None:
    call = hung_up_remotely()
    assert step(call, TimerFired(T("retry_stop:t1")), 25) == [StopTranscribe(CID, "t1")]
    assert step(call, TranscribeEvent("t1", "call", CID, "done"), 25.05) == [Finished(CID)]
    assert step(call, Stopped("transcribe", "t1", True), 25.1) == []


def test_after_a_gap_in_the_events_an_awaited_transcribe_is_stopped_at_once() -> None:
    call = hung_up_remotely()
    # the stream reconnected: the `done` may have come while we were away
    assert call.check() == [CheckCall(CID), StopTranscribe(CID, "t1")]
    assert call.check() == [CheckCall(CID)]  # asked once
    assert step(call, Stopped("transcribe", "t1", True), 21) == [Finished(CID)]


def test_our_own_hangup_awaits_the_transcribe_too() -> None:
    call = answered()
    step(call, transcript("bye"), 10)
    step(call, ReplySentence(1, "Goodbye."), 10)
    step(call, ReplyDone(1, action=EndCall()), 10)
    cmds = step(call, TimerFired(T("after_reply")), 12)
    assert kinds(cmds) == ["Hangup", "StopSpeaking", "StartTimer"]
    step(call, HangupDone(True), 12.1)
    step(call, Stopped("speaking", "s1", True), 12.2)
    assert call.phase is Phase.ENDING  # the transcribe's end is still awaited
    assert step(call, status("hangup", "normal", "local"), 12.3) == []
    assert step(call, TranscribeEvent("t1", "call", CID, "done"), 12.4) == [Finished(CID)]


def test_shutdown_stops_an_awaited_transcribe_at_once() -> None:
    call = hung_up_remotely()
    # the process may be gone before VoIPBIN's `done` comes
    assert call.shutdown(21) == [StopTranscribe(CID, "t1")]
    assert step(call, Stopped("transcribe", "t1", True), 21.1) == [Finished(CID)]


def test_a_call_gone_or_handed_over_still_stops_its_transcribe() -> None:
    # no hangup VoIPBIN is known to act on: the call vanished (404/403), or goes on with a human
    call = answered()
    assert kinds(step(call, CallGone(), 10)) == ["StopSpeaking", "StopTranscribe"]


def test_an_awaited_transcribe_survives_a_restart_as_a_stop_to_send() -> None:
    call = hung_up_remotely()
    snap = call.snapshot()
    assert ("transcribe", "t1") in snap["pending_stops"]
    again = Call.restore(snap, SETTINGS)
    cmds = again.resume(100)
    assert StopTranscribe(CID, "t1") in cmds  # whether its `done` came is unknown: stop it
    assert step(again, Stopped("transcribe", "t1", True), 100.1) == []  # swept yet?
    assert step(again, SweepDone(True), 100.2) == [Finished(CID)]


def test_a_failure_while_the_transcribe_is_awaited_stops_it() -> None:
    call = hung_up_remotely()
    cmds = call.fail("boom")
    assert StopTranscribe(CID, "t1") in cmds
    assert call.handle(HangupDone(True), 21)[-1:] == []  # its stop is not confirmed yet
    assert call.handle(Stopped("transcribe", "t1", True), 21.1) == []  # nor the sweep
    assert isinstance(call.handle(SweepDone(True), 21.2)[-1], Finished)


def _talk(call: Call, turns: int) -> list[list[tuple[str, str]]]:
    """`turns` caller turns, each answered with two sentences; the messages that left the
    call's history, taken after each step as the daemon takes them for the store."""
    left = []
    for n in range(turns):
        now = 10.0 + 10 * n
        for event in (
            transcript(f"question {n}", f"tr{n}"),
            ReplySentence(n + 1, f"Answer {n}."),
            ReplySentence(n + 1, "Anything else?"),
            ReplyDone(n + 1),
        ):
            call.handle(event, now)
            if call.history.left:
                left.append([(m.role, m.text) for m in call.history.take_left()])
    return left


def test_the_messages_that_leave_a_long_calls_history_go_out_in_order() -> None:
    call = answered(replace(SETTINGS, history_limit=6))
    left = _talk(call, 100)
    assert len(left) == (2 + 2 * 100 - len(call.history.msgs[1:])) // SLACK  # in batches
    assert all(len(batch) == SLACK for batch in left)
    kept = [(m.role, m.text) for m in call.history.msgs[1:]]
    conversation = [m for batch in left for m in batch] + kept
    assert conversation[0] == ("assistant", "Hi there.")
    assert conversation[1:] == [
        m
        for n in range(100)
        for m in (("user", f"question {n}"), ("assistant", f"Answer {n}. Anything else?"))
    ]


def test_a_long_call_keeps_a_bounded_history_and_sends_the_same_window() -> None:
    limit = 6
    bounded = answered(replace(SETTINGS, history_limit=limit))
    whole = answered(replace(SETTINGS, history_limit=limit))
    whole.history.keep = 0  # what every call kept before: every message
    _talk(bounded, 200)
    _talk(whole, 200)
    assert len(whole.history) == 1 + 1 + 2 * 200  # the prompt, the greeting, 200 turns
    # the prompt and the last few turns: the state and its save do not grow with the call
    assert 1 + limit + SLACK <= len(bounded.history) < 1 + limit + 2 * SLACK
    assert len(bounded.snapshot()["history"]) == len(bounded.history)
    assert bounded.history.window(limit) == whole.history.window(limit)
    assert bounded.history.msgs[-1].text == "Answer 199. Anything else?"
    # the next turn's question is asked with the same messages either way
    (ask,) = [c for c in step(bounded, transcript("and now?", "tr-x"), 3000) if kinds([c])]
    (ask_whole,) = [c for c in step(whole, transcript("and now?", "tr-x"), 3000) if kinds([c])]
    assert isinstance(ask, AskBackend) and isinstance(ask_whole, AskBackend)
    assert ask.history == ask_whole.history and ask.turn == ask_whole.turn == 201


def test_a_long_call_restored_knows_its_current_turn_was_answered() -> None:
    settings = replace(SETTINGS, history_limit=6)
    call = answered(settings)
    _talk(call, 50)
    snapshot = call.snapshot()
    assert len(snapshot["history"]) < 1 + 6 + 2 * SLACK  # the saved row is bounded too
    again = Call.restore(snapshot, settings)
    assert again.turn == 50 and again.history.has_reply(50)  # numbered from the call's turn
    assert [(m.role, m.turn) for m in again.history.msgs[-2:]] == [("user", 50), ("assistant", 50)]
    assert again.history.window(6) == call.history.window(6)


def test_a_read_back_after_a_long_call_restarts_answers_only_what_was_lost() -> None:
    call = answered()
    _talk(call, 300)  # far more transcripts than a call remembers (and saves) the ids of
    again = Call.restore(call.snapshot(), SETTINGS)
    again.resume(5000)
    # GET /transcripts: the whole call, oldest first, and one the stream lost while we were down
    old = tuple(transcript(f"question {n}", f"tr{n}") for n in range(300))
    lost = transcript("and one more thing", "tr-lost")
    (ask,) = [c for c in step(again, TranscriptsRead((*old, lost)), 5001) if kinds([c])]
    assert isinstance(ask, AskBackend) and ask.turn == 301
    assert ask.history[-1] == ("user", "and one more thing")  # not the first 236 questions
    # read back again (the stream dropped once more): nothing new, nothing asked
    assert step(again, TranscriptsRead((*old, lost)), 5002) == []


def test_a_read_back_answers_a_transcript_lost_before_one_that_was_answered() -> None:
    # the stream lost "first" and brought "second", answered before the read-back came back
    call = answered()
    _talk(call, 3)
    step(call, transcript("second", "tr-b"), 100)
    step(call, ReplySentence(4, "Right."), 100)
    step(call, ReplyDone(4), 100)
    read = (*(transcript(f"question {n}", f"tr{n}") for n in range(3)), transcript("first", "tr-a"))
    cmds = step(call, TranscriptsRead((*read, transcript("second", "tr-b"))), 101)
    (ask,) = [c for c in cmds if isinstance(c, AskBackend)]
    assert ask.history[-1] == ("user", "first")


def test_a_read_back_of_a_call_that_saw_none_of_it_answers_it() -> None:
    call = answered()
    cmds = step(call, TranscriptsRead((transcript("hello?", "tr1"),)), 10)
    assert [c for c in cmds if isinstance(c, AskBackend)][0].history[-1] == ("user", "hello?")


def test_a_retry_after_a_day_long_outage_still_has_a_delay() -> None:
    # some thousand failed stops (one a minute at most): the doubling must not overflow
    from agentd.call.core import backoff

    assert backoff(1.0, 1, 60.0) == 1.0
    assert backoff(1.0, 3, 60.0) == 4.0
    assert backoff(1.0, 2000, 60.0) == 60.0
