"""The per-call state machine, stepped event by event without any network."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agentd.call import Call, CallSettings, Phase
from agentd.commands import (
    AskBackend,
    CancelBackend,
    FindTranscribe,
    Finished,
    Flush,
    Hangup,
    PollSpeaking,
    Record,
    ReplyDone,
    ReplyFailed,
    ReplySentence,
    Say,
    SayFailed,
    SpeakingStarted,
    StartSpeaking,
    StartTimer,
    StartTranscribe,
    Stopped,
    StopSpeaking,
    StopTranscribe,
    TimerFired,
    TranscribeFailed,
    TranscribeStarted,
    Transfer,
    TransferDone,
)
from agentd.events import CallEvent, CallInfo, SpeechEvent, TranscribeEvent, TranscriptEvent

CID = "c1"
SETTINGS = CallSettings(greeting="Hi there.", system_prompt="be brief", chars_per_s=10.0)


def status(s: str, reason: str = "", by: str = "") -> CallEvent:
    return CallEvent(CallInfo(CID, s, "incoming", "+1555", "+1666", by, reason))


def transcript(text: str, tid: str = "tr1", direction: str = "in") -> TranscriptEvent:
    return TranscriptEvent(tid, "t1", direction, text)


def kinds(cmds: list[object]) -> list[str]:
    return [type(c).__name__ for c in cmds if not isinstance(c, Record)]


def answered(settings: CallSettings = SETTINGS, *, speaking: str = "active") -> Call:
    """A call that is up, with both sessions and the greeting sent at t=0."""
    call = Call(CID, settings)
    assert kinds(call.handle(status("ringing"), 0)) == []
    cmds = call.handle(status("progressing"), 0)
    assert kinds(cmds) == ["StartTranscribe", "StartSpeaking"]
    assert call.handle(TranscribeStarted("t1"), 0) == []
    cmds = call.handle(SpeakingStarted("s1", speaking), 0)
    if speaking == "active":
        assert cmds == [Say(CID, "s1", settings.greeting, 0)]
        assert call.phase is Phase.ACTIVE
    return call


def test_full_call_issues_the_protocol_sequence() -> None:
    call = answered()
    # t=10: the greeting (0.9 s at 10 chars/s) is long over
    assert call.handle(transcript("What time is it"), 10) == [
        AskBackend(
            CID,
            1,
            (("system", "be brief"), ("assistant", "Hi there."), ("user", "What time is it")),
        )
    ]
    assert call.handle(ReplySentence(1, "It is noon."), 10.5) == [Say(CID, "s1", "It is noon.", 1)]
    done = call.handle(ReplyDone(1), 10.6)
    assert isinstance(done[0], Record) and done[0].what == "turn"
    assert done[0].data["first_say_ms"] == 500.0
    cmds = call.handle(status("hangup", "normal", "remote"), 20)
    assert kinds(cmds) == ["StopSpeaking", "StopTranscribe"]
    assert any(isinstance(c, Record) and c.data.get("reason") == "normal" for c in cmds)
    assert call.handle(Stopped("speaking", "s1", True), 20) == []
    assert call.handle(Stopped("transcribe", "t1", True), 20) == [Finished(CID)]
    assert call.phase is Phase.ENDED


def test_duplicate_transcript_is_answered_once() -> None:
    call = answered()
    assert kinds(call.handle(transcript("hello"), 10)) == ["AskBackend"]
    assert call.handle(transcript("hello"), 10.1) == []


def test_our_own_speech_heard_back_is_never_answered() -> None:
    call = answered()
    assert call.handle(transcript("Hi there.", direction="out"), 10) == []


def test_transcript_before_speaking_is_active_is_said_after_the_greeting() -> None:
    call = Call(CID, SETTINGS)
    call.handle(status("progressing"), 0)
    assert kinds(call.handle(transcript("hello"), 0.1)) == ["AskBackend"]
    assert call.handle(ReplySentence(1, "Hello to you."), 0.2) == []  # no session yet: queued
    cmds = call.handle(SpeakingStarted("s1", "active"), 0.3)
    assert cmds == [Say(CID, "s1", "Hi there.", 0), Say(CID, "s1", "Hello to you.", 1)]


def test_hangup_during_session_setup_stops_sessions_when_they_arrive() -> None:
    call = Call(CID, SETTINGS)
    call.handle(status("progressing"), 0)
    cmds = call.handle(status("hangup", "normal", "remote"), 0.1)
    assert kinds(cmds) == []  # nothing to stop yet, and not finished: creations are in flight
    assert call.handle(SpeakingStarted("s1", "active"), 0.2) == [StopSpeaking(CID, "s1")]
    assert call.handle(TranscribeStarted("t1"), 0.2) == [StopTranscribe(CID, "t1")]
    assert call.handle(Stopped("speaking", "s1", True), 0.3) == []
    assert call.handle(Stopped("transcribe", "t1", True), 0.3) == [Finished(CID)]


@pytest.mark.parametrize("reason", ["busy", "noanswer", "failed"])
def test_unanswered_outbound_call_records_its_reason(reason: str) -> None:
    call = Call(CID, SETTINGS)
    call.handle(status("dialing"), 0)
    cmds = call.handle(status("hangup", reason, "remote"), 1)
    assert [c for c in cmds if isinstance(c, Record)][0].data["reason"] == reason
    assert cmds[-1] == Finished(CID)
    assert not any(isinstance(c, (StartSpeaking, StartTranscribe)) for c in cmds)


def test_second_progressing_and_stale_statuses_change_nothing() -> None:
    call = answered()
    assert call.handle(status("progressing"), 1) == []
    assert call.handle(status("ringing"), 1) == []
    call.handle(status("hangup"), 2)
    assert call.handle(status("progressing"), 3) == []  # call_updated after call_hangup


def test_say_404_restarts_the_session_and_says_it_again() -> None:
    call = answered()
    call.handle(transcript("hello"), 10)
    call.handle(ReplySentence(1, "Hi."), 10)
    cmds = call.handle(SayFailed("s1", "Hi.", 1, 404), 10.1)
    assert StartSpeaking(CID, "en-US", "elevenlabs", SETTINGS.voice_id) in cmds
    assert StopSpeaking(CID, "s1") in cmds  # an unconfirmed session is stopped, never assumed gone
    assert call.handle(SpeakingStarted("s2", "active"), 10.2) == [Say(CID, "s2", "Hi.", 1)]


def test_barge_in_on_elevenlabs_stops_and_restarts_the_session() -> None:
    call = answered()
    call.handle(transcript("tell me a story"), 10)
    call.handle(ReplySentence(1, "Once upon a time there was a very long story."), 10)
    # 2 s into a 4.6 s sentence the caller talks over it
    cmds = call.handle(SpeechEvent("sp1", "t1", "interim", "in", "wait stop"), 12)
    assert kinds(cmds) == ["CancelBackend", "StopSpeaking"]
    assert call.handle(ReplySentence(1, "The end."), 12.1) == []  # stale reply: not spoken
    assert call.handle(Stopped("speaking", "s1", True), 12.2) == [
        StartSpeaking(CID, "en-US", "elevenlabs", SETTINGS.voice_id)
    ]
    assert call.handle(SpeakingStarted("s2", "active"), 12.3) == []  # no second greeting
    ask = call.handle(transcript("wait stop", "tr2"), 13)
    assert kinds(ask) == ["AskBackend"]
    history = ask[-1].history  # type: ignore[union-attr]
    # what the caller heard of the interrupted reply, not what was planned
    assert ("assistant", "Once upon a time —") in history
    assert history[-1] == ("user", "wait stop")


def test_barge_in_on_gcp_flushes() -> None:
    call = answered(replace(SETTINGS, tts_provider="gcp"))
    call.handle(transcript("tell me a story"), 10)
    call.handle(ReplySentence(1, "Once upon a time there was a very long story."), 10)
    call.handle(ReplyDone(1), 10)
    cmds = call.handle(transcript("stop", "tr2"), 12)
    assert kinds(cmds) == ["Flush", "AskBackend"]
    assert Flush(CID, "s1") in cmds


def test_short_or_echo_speech_does_not_cut_the_agent() -> None:
    call = answered()
    call.handle(transcript("tell me a story"), 10)
    call.handle(ReplySentence(1, "Once upon a time there was a very long story."), 10)
    assert call.handle(SpeechEvent("a", "t1", "interim", "in", "uh"), 12) == []  # backchannel
    assert call.handle(SpeechEvent("b", "t1", "interim", "in", "hello there"), 10.5) == []  # echo
    assert call.handle(SpeechEvent("c", "t1", "boundary", "in"), 12) == []  # tentative only


def test_caller_speech_after_the_agent_finished_is_no_barge_in() -> None:
    call = answered()
    call.handle(transcript("hi"), 10)
    call.handle(ReplySentence(1, "Hello."), 10)
    call.handle(ReplyDone(1), 10)
    assert kinds(call.handle(transcript("next", "tr2"), 30)) == ["AskBackend"]


def test_initiating_speaking_is_polled_until_active() -> None:
    call = answered(speaking="initiating")
    timer = StartTimer(CID, "poll_speaking", SETTINGS.speaking_poll_s)
    assert call.handle(TimerFired("poll_speaking"), 0.2) == [PollSpeaking(CID, "s1")]
    assert call.handle(SpeakingStarted("s1", "initiating"), 0.3) == [
        replace(timer, delay_s=SETTINGS.speaking_poll_s * 2)
    ]
    assert call.handle(SpeakingStarted("s1", "active"), 0.8) == [Say(CID, "s1", "Hi there.", 0)]


def test_transcribe_conflict_looks_up_the_running_one() -> None:
    call = Call(CID, SETTINGS)
    call.handle(status("progressing"), 0)
    assert call.handle(TranscribeFailed(409, "TRANSCRIBE_ALREADY_PROGRESSING"), 0.1) == [
        FindTranscribe(CID, "en-US")
    ]
    assert call.handle(TranscribeStarted("t9"), 0.2) == []
    assert call.transcribe_id == "t9"


def test_a_failed_stop_is_retried_until_confirmed() -> None:
    call = answered()
    call.handle(TranscribeEvent("t1", "call", CID, "done"), 5)  # ended by itself
    assert kinds(call.handle(status("hangup"), 5)) == ["StopSpeaking"]
    cmds = call.handle(Stopped("speaking", "s1", False), 5.1)
    assert cmds == [StartTimer(CID, "retry_stop:s1", SETTINGS.retry_s)]
    assert call.handle(TimerFired("retry_stop:s1"), 6.1) == [StopSpeaking(CID, "s1")]
    assert call.handle(Stopped("speaking", "s1", True), 6.2) == [Finished(CID)]


def test_backend_failure_speaks_the_fallback_and_the_call_goes_on() -> None:
    call = answered()
    call.handle(transcript("hello"), 10)
    cmds = call.handle(ReplyFailed(1, "backend timed out"), 25)
    assert Say(CID, "s1", SETTINGS.fallback_text, 1) in cmds
    assert kinds(call.handle(transcript("again", "tr2"), 40)) == ["AskBackend"]


def test_fragments_of_one_sentence_become_one_turn() -> None:
    call = answered()
    call.handle(transcript("I need help"), 10)
    cmds = call.handle(transcript("with my account", "tr2"), 10.4)
    assert CancelBackend(CID, 1) in cmds
    ask = cmds[-1]
    assert isinstance(ask, AskBackend) and ask.turn == 2
    assert ask.history[-1] == ("user", "I need help with my account")


def test_end_call_hangs_up_after_the_goodbye_has_played() -> None:
    call = answered()
    call.handle(transcript("bye"), 10)
    call.handle(ReplySentence(1, "Goodbye."), 10)
    cmds = call.handle(ReplyDone(1, action="end_call"), 10)
    timer = [c for c in cmds if isinstance(c, StartTimer)][0]
    assert timer.delay_s == pytest.approx(0.8 + SETTINGS.playback_pad_s)
    assert call.handle(TimerFired("after_reply"), 12) == [Hangup(CID)]


def test_transfer_after_the_reply_then_our_sessions_end() -> None:
    call = answered()
    call.handle(transcript("a human please"), 10)
    call.handle(ReplySentence(1, "Transferring you now."), 10)
    call.handle(ReplyDone(1, action="transfer:+15550009999"), 10)
    assert call.handle(TimerFired("after_reply"), 13) == [Transfer(CID, "+15550009999")]
    cmds = call.handle(TransferDone(True), 13.5)
    assert kinds(cmds) == ["StopSpeaking", "StopTranscribe"]
    assert not any(isinstance(c, Hangup) for c in cmds)  # the caller stays, with the human


def test_shutdown_hangs_up_and_stops_everything() -> None:
    call = answered()
    cmds = call.shutdown()
    assert kinds(cmds) == ["Hangup", "StopSpeaking", "StopTranscribe"]
    assert call.shutdown() == []
