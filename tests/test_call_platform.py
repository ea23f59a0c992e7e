"""The call core against VoIPBIN as it really is (docs/protocol.md): split finals, backchannels,
TTS latency and per-language playback, /say refused on every session, a dead tts pod, a deaf or
orphaned transcribe. Pure: events in, commands out."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agentd.call import Call, CallSettings
from agentd.call.talk import is_backchannel
from agentd.commands import (
    ORPHAN,
    AskBackend,
    CancelBackend,
    FindTranscribe,
    Finished,
    Flush,
    Hangup,
    Record,
    ReplyDone,
    ReplyFailed,
    ReplySentence,
    Say,
    SayFailed,
    SpeakingStarted,
    StartSpeaking,
    StartTimer,
    Stopped,
    StopSpeaking,
    StopTranscribe,
    TimerFired,
    TranscribeFailed,
    TranscribeStarted,
)
from agentd.events import SpeechEvent, TranscribeEvent
from agentd.names import EndCall, Kind, TimerKind, TransferTo
from tests.test_call import CID, SETTINGS, T, answered, kinds, status, step, transcript

HOLD = replace(SETTINGS, final_hold_s=0.5, final_wait_s=1.5)


def records(cmds: list[object], what: Kind) -> list[Record]:
    return [c for c in cmds if isinstance(c, Record) and c.what is what]


def interim(text: str, sid: str = "sp") -> SpeechEvent:
    return SpeechEvent(sid, "t1", "interim", "in", text)


# -- split finals: one turn, no self-interruption -------------------------------------------------


def test_a_sentence_split_in_two_finals_is_one_turn_and_nothing_is_cut() -> None:
    call = answered(HOLD)
    assert kinds(step(call, transcript("I want to book a table", "tr1"), 10)) == ["AskBackend"]
    # the backend is fast: its first sentence is held while the caller may go on
    assert step(call, ReplySentence(1, "Sure."), 10.2) == [
        StartTimer(CID, T("hold"), pytest.approx(0.3))
    ]
    cmds = step(call, transcript("for two people", "tr2"), 10.45)
    assert kinds(cmds) == ["CancelBackend", "AskBackend"]
    assert records(cmds, Kind.TURN_JOINED) and not records(cmds, Kind.BARGE_IN)
    assert not any(isinstance(c, StopSpeaking | Flush) for c in cmds)  # nothing played
    ask = cmds[-1]
    assert isinstance(ask, AskBackend) and ask.turn == 2
    assert ask.history[-1] == ("user", "I want to book a table for two people")
    assert ("assistant", "Sure.") not in ask.history  # never said, never heard
    # the first half's reply is stale; the whole turn's is said once the hold is over
    assert step(call, ReplySentence(1, "Sure."), 10.5) == []
    assert step(call, ReplySentence(2, "A table for two, sure."), 10.6) == [
        StartTimer(CID, T("hold"), pytest.approx(0.35))
    ]
    assert step(call, TimerFired(T("hold")), 10.95) == [Say(CID, "s1", "A table for two, sure.", 2)]


def test_interims_after_the_final_keep_the_reply_back_for_their_own_final() -> None:
    call = answered(HOLD)
    step(call, transcript("I want to book", "tr1"), 10)
    step(call, ReplySentence(1, "Sure."), 10.1)
    # still talking: their final comes ~1.1 s after these words; the reply waits for it
    assert step(call, interim("a table"), 10.4) == [StartTimer(CID, T("hold"), 1.5)]
    assert step(call, TimerFired(T("hold")), 10.5) == [
        StartTimer(CID, T("hold"), pytest.approx(1.4))
    ]
    step(call, interim("a table for"), 10.7)
    cmds = step(call, transcript("a table for two", "tr2"), 11.8)  # it came: one turn
    assert kinds(cmds) == ["CancelBackend", "AskBackend"]
    assert call.hold_until == pytest.approx(12.3)  # and the usual hold after it


def test_no_filler_is_said_over_a_caller_still_talking_after_their_final() -> None:
    # the reply to the first final is slow, and the caller went on: "One moment." due 1 s
    # after that final's hold would talk over them (and be cut unheard by their next words)
    call = answered(replace(HOLD, filler_after_s=1.0))
    step(call, transcript("What are your opening hours today?", "tr1"), 10)
    for n, t in enumerate((10.4, 10.8, 11.2, 11.6), 1):
        step(call, interim(" ".join(["and", "do", "you", "open"][:n])), t)
    cmds = step(call, TimerFired(T("filler")), 11.5)  # 10 + final_hold_s + filler_after_s
    assert not [c for c in cmds if isinstance(c, Say)]
    step(call, transcript("and do you open on Sunday?", "tr2"), 12.9)  # it joins the turn
    # the filler counts from the end of the whole turn
    cmds = step(call, TimerFired(T("filler")), 12.9 + 0.5 + 1.0)
    assert [c.text for c in cmds if isinstance(c, Say)] == ["One moment."]


def test_words_whose_final_never_comes_hold_the_reply_back_only_so_long() -> None:
    call = answered(HOLD)
    step(call, transcript("I want to book", "tr1"), 10)
    step(call, ReplySentence(1, "Sure."), 10.1)
    step(call, interim("a table"), 10.4)  # a noise the STT took for words, then dropped
    assert step(call, TimerFired(T("hold")), 11.9) == [Say(CID, "s1", "Sure.", 1)]


def test_a_final_after_the_reply_was_said_is_a_barge_in_not_a_join() -> None:
    call = answered(HOLD)
    step(call, transcript("tell me a story", "tr1"), 10)
    step(call, ReplySentence(1, "Once upon a time there was a very long story."), 11)
    assert step(call, transcript("no stop", "tr2"), 12)[0] == Record(
        CID, Kind.BARGE_IN, {"turn": 1, "by": "transcript"}
    )


def test_a_silence_that_falls_due_while_the_reply_is_held_is_counted_after_it() -> None:
    """The soak's stalled callers: the silence timer fired while the reply was held, was not
    armed again, and a reply the dead tts pod swallowed was never followed by a reprompt."""
    settings = replace(HOLD, silence_s=1.5)
    call = answered(settings)  # the greeting (0.9 s) armed the silence: due at 2.4
    call.handle(transcript("what time is it", "tr1"), 2.0)
    call.handle(ReplySentence(1, "Noon."), 2.1)  # held until 2.5
    # the reply's end would count the silence from later: the timer due at 2.4 stays
    call.handle(ReplyDone(1), 2.1)
    due: list[float] = []  # the silence timer's due time, as the executor would keep it

    def handle(event: object, now: float) -> list[object]:
        cmds = call.handle(event, now)  # type: ignore[arg-type]
        for c in cmds:
            if isinstance(c, StartTimer) and c.timer.kind == "silence":
                due[:] = [now + c.delay_s]
        return cmds

    cmds = handle(TimerFired(T("silence")), 2.4)
    assert not any(isinstance(c, Say) for c in cmds)  # a reply is held: no reprompt
    assert Say(CID, "s1", "Noon.", 1) in handle(TimerFired(T("hold")), 2.5)
    audio_end = call.playback.until
    # whatever became of that /say, the caller's silence after it is counted: the timer runs
    # until the reprompt, a silence after the reply's audio
    for _ in range(3):
        assert due, "no silence timer runs"
        now = due.pop()
        if Say(CID, "s1", settings.reprompt_text, 1) in handle(TimerFired(T("silence")), now):
            break
    else:
        pytest.fail("no reprompt")
    assert now == pytest.approx(audio_end + settings.silence_s, abs=0.06)


def test_an_end_call_waits_for_its_held_goodbye() -> None:
    call = answered(HOLD)
    step(call, transcript("bye", "tr1"), 10)
    step(call, ReplySentence(1, "Goodbye!"), 10.1)
    cmds = step(call, ReplyDone(1, EndCall()), 10.2)
    timer = next(
        c for c in cmds if isinstance(c, StartTimer) and c.timer.kind is TimerKind.AFTER_REPLY
    )
    # not said yet (held): the hangup must not come before it
    assert kinds(step(call, TimerFired(timer.timer), 10.2 + timer.delay_s)) == ["StartTimer"]
    cmds = step(call, TimerFired(T("hold")), 10.5)
    assert cmds[0] == Say(CID, "s1", "Goodbye!", 1)
    [timing] = records(cmds, Kind.TURN)  # timed once said
    assert timing.data["first_say_ms"] == pytest.approx(500.0)
    cmds = step(call, TimerFired(T("after_reply")), 10.6)
    assert kinds(cmds) == ["StartTimer"]  # the goodbye plays (0.8 s at 10 chars/s)
    assert kinds(step(call, TimerFired(T("after_reply")), 12.4))[0] == "Hangup"


# -- backchannels ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        *("mm-hmm", "Mm-hmm.", "yeah, okay", "Uh huh", "uh-huh", "Uh-huh.", "mm-hm", "I see."),
        *("네", "네네", "네, 네.", "はい、はい。", "うんうん", "嗯嗯", "对，对，对。"),
        # the commonest ones after "yes": "I see", "right", "got it"
        *("なるほど", "そうですね。", "알겠습니다.", "그렇죠", "好的。", "是的"),
    ],
)
def test_backchannels_are_recognised(text: str) -> None:
    assert is_backchannel(text)


@pytest.mark.parametrize(
    "text", ["", "yeah but no", "okay what about Tuesday", "stop", "uh-uh", "はい、いいえ"]
)
def test_words_that_take_the_turn_are_no_backchannel(text: str) -> None:
    assert not is_backchannel(text)


def test_more_backchannels_can_be_configured() -> None:
    assert not is_backchannel("gotcha")
    assert is_backchannel("Gotcha.", ("gotcha",))
    assert is_backchannel("okay gotcha", ("gotcha",))
    assert is_backchannel("Uh-oh.", ("uh-oh",))  # compared as the caller's words are


@pytest.mark.parametrize(("heard", "final"), [("mm-hmm", "Mm-hmm."), ("uh-huh", "Uh-huh.")])
def test_a_backchannel_while_the_agent_talks_neither_cuts_nor_asks(heard: str, final: str) -> None:
    call = answered()
    step(call, transcript("tell me a story", "tr1"), 10)
    step(call, ReplySentence(1, "Once upon a time there was a very long story."), 10)
    assert step(call, interim(heard), 12) == []  # 6 characters, but no barge-in
    cmds = step(call, transcript(final, "tr2"), 12.5)
    assert [c.what for c in cmds if isinstance(c, Record)] == [Kind.BACKCHANNEL]
    assert kinds(cmds) == []
    assert call.turn == 1


def replied(text: str) -> Call:
    """An answered call whose first reply, `text`, was sent at t=10 and plays to its end
    (`call.playback.until`)."""
    call = answered()
    step(call, transcript("tell me", "tr1"), 10)
    step(call, ReplySentence(1, text), 10)
    step(call, ReplyDone(1), 10)
    return call


def test_a_backchannel_over_the_end_of_a_reply_is_none_though_its_final_comes_after() -> None:
    call = replied("Once upon a time there was a very long story.")
    end = call.playback.until
    assert step(call, interim("mm-hmm"), end - 0.5) == []  # its words, as the agent ends
    cmds = step(call, transcript("Mm-hmm.", "tr2"), end + 0.6)  # its final, ~1 s later
    assert [c.what for c in cmds if isinstance(c, Record)] == [Kind.BACKCHANNEL]
    assert kinds(cmds) == []
    assert call.turn == 1
    # the same word begun after the agent's audio ended answers it
    step(call, interim("okay"), end + 2.0)
    assert kinds(step(call, transcript("Okay.", "tr3"), end + 2.5)) == ["AskBackend"]


def test_a_yes_at_the_very_end_of_a_question_answers_it() -> None:
    call = replied("Shall I book it for you?")
    end = call.playback.until
    step(call, interim("yes"), end - 0.5)  # over the question's last word: an answer
    assert kinds(step(call, transcript("Yes.", "tr2"), end + 0.6)) == ["AskBackend"]


def test_a_noise_long_ago_does_not_make_a_later_yes_a_backchannel() -> None:
    call = replied("Once upon a time there was a very long story.")
    step(call, interim("uh"), 11)  # a noise over the reply, its final empty
    step(call, transcript("", "tr2"), 12)
    end = call.playback.until
    assert kinds(step(call, transcript("Okay.", "tr3"), end + 5)) == ["AskBackend"]


def test_a_hello_over_a_long_greeting_neither_cuts_it_nor_is_answered_on_finals() -> None:
    long = "Hello, thank you for calling the clinic. How can I help you today?"
    call = answered(replace(SETTINGS, reply_on="final", greeting=long))
    assert step(call, interim("hello"), 2.5) == []  # past the echo guard: no cut
    cmds = step(call, transcript("Hello?", "tr1"), 3.0)
    assert kinds(cmds) == [] and records(cmds, Kind.BACKCHANNEL)


def test_a_hello_over_a_reprompt_is_a_turn() -> None:
    call = answered(replace(SETTINGS, silence_s=5.0))
    step(call, TimerFired(T("silence")), 6)  # "Are you still there?" at turn 0
    assert kinds(step(call, interim("hello"), 6.5)) == []
    cmds = step(call, transcript("Hello?", "tr1"), 7.0)
    assert kinds(cmds)[-1] == "AskBackend"


# the greeting's audio starts 1 s after its /say at t=0 and plays until 4.6
LATE_AUDIO = replace(SETTINGS, say_latency_s=1.0, greeting="Hello, this is Anna from the clinic.")
CUTS = ("StopSpeaking", "Flush", "CancelBackend")


@pytest.mark.parametrize("reply_on", ["final", "interim"])
def test_words_begun_before_the_greetings_audio_do_not_cut_it(reply_on: str) -> None:
    """A callee's "hello, who is this?" on picking up: the greeting started over them, they
    did not cut into it; cut before its audio, it was never heard (an outbound disclosure)."""
    call = answered(replace(LATE_AUDIO, reply_on=reply_on))  # type: ignore[arg-type]
    cmds = step(call, interim("hello who is"), 0.3)
    cmds += step(call, interim("hello who is this"), 0.6)
    cmds += step(call, transcript("Hello, who is this?"), 0.9)
    assert not records(cmds, Kind.BARGE_IN) and not set(kinds(cmds)) & set(CUTS)
    assert call.playback.until == pytest.approx(4.6)  # the greeting still plays whole


def test_words_begun_over_the_greetings_audio_still_cut_it() -> None:
    call = answered(LATE_AUDIO)
    cmds = step(call, interim("I need my bill"), 2.5)  # 1.5 s into its audio
    assert records(cmds, Kind.BARGE_IN) and "StopSpeaking" in kinds(cmds)


def test_a_greeting_that_may_not_be_cut_is_heard_to_the_end_and_the_caller_then_answered() -> None:
    call = answered(replace(SETTINGS, barge_in_greeting=False))  # "Hi there." plays 0.9 s
    assert step(call, interim("I need my bill"), 0.5) == []
    cmds = step(call, transcript("I need my bill", "tr1"), 0.6)
    assert kinds(cmds) == ["AskBackend"]  # no cut: the reply follows the greeting
    assert not records(cmds, Kind.BARGE_IN)


def test_a_yes_when_the_agent_is_quiet_is_an_answer() -> None:
    call = answered()
    assert kinds(step(call, transcript("Yeah.", "tr1"), 10)) == ["AskBackend"]


# -- TTS timing -----------------------------------------------------------------------------------


def test_playback_is_estimated_after_the_tts_latency_and_per_script() -> None:
    assert CallSettings().rate == 15.0
    assert CallSettings(language="ko-KR").rate == 6.0
    assert CallSettings(language="ja-JP", chars_per_s=8.0).rate == 8.0
    settings = replace(SETTINGS, chars_per_s=0.0, language="ko-KR", say_latency_s=1.0)
    call = answered(settings)  # greeting "Hi there." (9 chars) at t=0
    # by the script read, not the language: English words play at the Latin pace
    assert call.playback.until == pytest.approx(1.0 + 9 / 15.0)
    korean = answered(replace(settings, greeting="안녕하세요 반갑습니다"))  # 11 characters
    assert korean.playback.until == pytest.approx(1.0 + 11 / 6.0)
    # the audio begins after the latency: the echo guard counts from then, not from the /say
    assert call.playback.talk_started(0.5) == -1e9
    assert call.playback.talk_started(1.2) == pytest.approx(1.0)


def test_the_echo_guard_counts_from_the_start_of_the_audio_not_of_the_last_queued_piece() -> None:
    call = answered(replace(SETTINGS, echo_guard_s=1.0))  # greeting 0.9 s at 10 chars/s
    step(call, transcript("tell me", "tr1"), 10)
    step(call, ReplySentence(1, "One two three four five."), 10)
    step(call, ReplySentence(1, "Six seven eight nine ten."), 10)  # queued behind the first
    # 2.6 s into the first sentence's 2.4 s + the second's: past the guard, a barge-in
    cmds = step(call, interim("wait stop"), 12.6)
    assert records(cmds, Kind.BARGE_IN)


# -- /say refused, pod death ----------------------------------------------------------------------


def test_say_404_on_every_session_is_capped_then_the_call_ends_with_a_clear_error() -> None:
    settings = replace(SETTINGS, max_speaking_restarts=2)
    call = answered(settings)
    sid = "s1"
    for n in range(2, 4):
        cmds = step(call, SayFailed(sid, settings.greeting, 0, 404), n)
        assert kinds(cmds) == ["StopSpeaking", "StartSpeaking"]
        sid = f"s{n}"
        assert step(call, SpeakingStarted(sid, "active"), n + 0.1) == [
            Say(CID, sid, settings.greeting, 0)
        ]
    cmds = step(call, SayFailed(sid, settings.greeting, 0, 404), 5)
    [error] = records(cmds, Kind.ERROR)
    assert error.data["what"] == "say refused on every session"
    assert error.data["tts_provider"] == "elevenlabs"
    assert Hangup(CID) in cmds
    assert not any(isinstance(c, StartSpeaking) for c in cmds)


def test_say_503s_mean_a_dead_pod_the_session_is_deleted_and_replaced() -> None:
    call = answered()
    step(call, transcript("hello", "tr1"), 10)
    step(call, ReplySentence(1, "Hi."), 10)
    # one 503 may be a blip, and it never reached a pod: said again
    assert kinds(step(call, SayFailed("s1", "Hi.", 1, 503), 10.1)) == ["Say"]
    cmds = step(call, SayFailed("s1", "Hi.", 1, 503), 10.2)
    assert StopSpeaking(CID, "s1", True) in cmds  # /stop would answer 503 too
    new = next(c for c in cmds if isinstance(c, StartSpeaking))
    assert "s1" in new.avoid  # its row stays active: never adopt it
    # a 503 never reached a pod: said once on the new session, not twice
    assert step(call, SpeakingStarted("s2", "active"), 10.8) == [Say(CID, "s2", "Hi.", 1)]


def test_an_aws_say_answered_503_is_not_said_again() -> None:
    # aws synthesises before the say answers: past the gateway's 3 s budget it answers 503,
    # and the pod plays the sentence all the same (bin-tts-manager aws.go)
    call = answered(replace(SETTINGS, tts_provider="aws"))
    step(call, transcript("hello", "tr1"), 10)
    step(call, ReplySentence(1, "Hi."), 10)
    step(call, ReplySentence(1, "How can I help?"), 10)
    assert kinds(step(call, SayFailed("s1", "Hi.", 1, 503), 10.1)) == []
    # again and again: the pod is gone after all, the session is replaced, nothing said twice
    cmds = step(call, SayFailed("s1", "How can I help?", 1, 503), 10.2)
    assert kinds(cmds) == ["StopSpeaking", "StartSpeaking"]
    assert step(call, SpeakingStarted("s2", "active"), 10.8) == []


def test_a_500_on_say_never_reached_a_pod_and_is_said_again() -> None:
    # a 500 is the gateway's own failure or its circuit breaker failing fast; the tts-manager
    # answers its own say errors 404 (docs/protocol.md §8.1)
    call = answered()
    step(call, transcript("hello", "tr1"), 10)
    step(call, ReplySentence(1, "Hi."), 10)
    assert kinds(step(call, SayFailed("s1", "Hi.", 1, 500), 10.1)) == ["Say"]
    cmds = step(call, SayFailed("s1", "Hi.", 1, 500), 10.2)
    assert kinds(cmds) == ["StopSpeaking", "StartSpeaking"]
    assert step(call, SpeakingStarted("s2", "active"), 10.8) == [Say(CID, "s2", "Hi.", 1)]


def test_a_say_refused_429_past_its_deadline_is_said_again_on_the_same_session() -> None:
    # the rate limiter refuses before anything runs; the client waits out Retry-After up to
    # the say's deadline, and one past it fails the say: nothing was spoken, nothing is lost
    call = answered()
    step(call, transcript("hello", "tr1"), 10)
    step(call, ReplySentence(1, "Hi."), 10)
    cmds = step(call, SayFailed("s1", "Hi.", 1, 429), 30)
    assert Say(CID, "s1", "Hi.", 1) in cmds
    # again: the session is fine (a limit is no dead pod), it is not replaced
    cmds = step(call, SayFailed("s1", "Hi.", 1, 429), 50)
    assert kinds(cmds) == ["Say"]


# -- transcribe: orphans ------------------------------------------------------------------------


def test_an_orphaned_transcribe_is_never_adopted_and_its_deletion_is_retried_bounded() -> None:
    call = answered(replace(SETTINGS, silence_s=10.0))
    cmds = call.handle(TimerFired(T("silence")), 10.9)  # deaf? replace it
    assert "t1" in call.ledger.known()
    # the old one is an orphan: still progressing, so the new one gets 409
    cmds = step(call, TranscribeFailed(409, "TRANSCRIBE_ALREADY_PROGRESSING"), 11)
    assert cmds == [FindTranscribe(CID, "en-US", frozenset({"t1"}))]
    # the executor found it, deleted it, and says so: start again after a pause
    cmds = step(call, TranscribeFailed(409, ORPHAN), 11.1)
    assert cmds == [StartTimer(CID, T("retry_transcribe"), SETTINGS.retry_s)]
    assert kinds(step(call, TimerFired(T("retry_transcribe")), 12.1)) == ["StartTranscribe"]


# -- transcribe: an outage longer than the first retries ------------------------------------------

QUIET = replace(SETTINGS, silence_s=10.0)


def unheard(settings: CallSettings = QUIET) -> tuple[Call, float]:
    """A call answered while POST /transcribes answers 503: greeted all the same after
    `greet_wait_s`, its first create failed and retried. Returns it and the time it is at."""
    call = Call(CID, settings)
    step(call, status("progressing"), 0)
    assert step(call, SpeakingStarted("s1", "active"), 0.5) == [
        StartTimer(CID, T("greet"), settings.greet_wait_s)
    ]
    retry = StartTimer(CID, T("retry_transcribe"), settings.retry_s)
    assert step(call, TranscribeFailed(503, "SERVICE_UNAVAILABLE"), 1) == [retry]
    assert step(call, TimerFired(T("greet")), 3.5) == [Say(CID, "s1", settings.greeting, 0)]
    return call, 3.5


def fail_again(call: Call, t: float, code: int = 503) -> list[object]:
    """The retry timer fires at `t` and its create fails with `code` 0.5 s later."""
    assert kinds(step(call, TimerFired(T("retry_transcribe")), t)) == ["StartTranscribe"]
    return step(call, TranscribeFailed(code, ""), t + 0.5)


def test_a_transcribe_outage_is_retried_as_long_as_the_call_lives_and_warned_of_once() -> None:
    call, t = unheard()
    delays: list[float] = []
    down: list[Record] = []
    for _ in range(11):  # some four minutes of outage
        cmds = fail_again(call, t)
        down += records(cmds, Kind.TRANSCRIBE_DOWN)
        assert not records(cmds, Kind.ERROR) and Hangup(CID) not in cmds
        [timer] = [c for c in cmds if isinstance(c, StartTimer)]
        delays.append(timer.delay_s)
        t += 0.5 + timer.delay_s
    # retry_s doubling, up to every transcribe_retry_max_s
    assert delays == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0, 30.0, 30.0, 30.0]
    [warning] = down  # at the fourth failure in a row: one warning an outage, not one a retry
    assert warning.what.warns
    assert warning.data == {"status": 503, "attempts": 4, "retry_in_s": 8.0}
    # VoIPBIN is back: the caller is heard again, and the operator told for how long they were not
    assert kinds(step(call, TimerFired(T("retry_transcribe")), t)) == ["StartTranscribe"]
    cmds = step(call, TranscribeStarted("t1"), t + 0.5)
    [back] = records(cmds, Kind.TRANSCRIBE_RESTARTED)
    assert back.data == {"why": "outage over", "down_s": round(t + 0.5 - 1, 1), "attempts": 12}
    assert call.transcribe.active and call.transcribe_id == "t1"


def test_the_silence_of_a_caller_nobody_hears_neither_reprompts_nor_hangs_up() -> None:
    # a reprompt would ask them to talk to nobody, and the silence goodbye would hang up on a
    # caller who may have talked all along
    call, t = unheard()
    for n in range(1, 5):
        now = t + QUIET.silence_s * n
        fail_again(call, now - 1)  # the outage goes on
        cmds = call.handle(TimerFired(T("silence")), now)
        assert cmds == [StartTimer(CID, T("silence"), QUIET.silence_s)]
    assert call.reprompts == 0
    # heard again: their silence counts from now, not from before the outage (nobody could
    # hear them until now): the check due meanwhile waits the rest, then reprompts
    step(call, TimerFired(T("retry_transcribe")), 60)
    step(call, TranscribeStarted("t1"), 60.5)
    cmds = call.handle(TimerFired(T("silence")), 64)
    assert cmds == [StartTimer(CID, T("silence"), pytest.approx(60.5 + QUIET.silence_s - 64))]
    cmds = step(call, TimerFired(T("silence")), 60.5 + QUIET.silence_s)
    assert Say(CID, "s1", QUIET.reprompt_text, 0) in cmds and records(cmds, Kind.STT_QUIET)
    assert StopTranscribe(CID, "t1") not in cmds  # brand new: not replaced in case it is deaf


def test_a_transcribe_refused_is_given_up_and_the_silence_ends_the_call_as_before() -> None:
    # a 4xx (a bad language, a permission) no retry changes: the caller still hears the agent
    call, t = unheard()
    for _ in range(QUIET.max_attempts - 2):
        fail_again(call, t, 400)
        t += 5
    cmds = fail_again(call, t, 400)
    [error] = records(cmds, Kind.ERROR)
    assert error.data["what"] == "transcribe failed" and kinds(cmds) == []
    cmds = step(call, TimerFired(T("silence")), 40)
    assert Say(CID, "s1", QUIET.reprompt_text, 0) in cmds


def test_a_transcribe_retried_through_an_outage_and_in_flight_at_hangup_is_stopped() -> None:
    # no billed session left: the create answered after the hangup is stopped, and the call is
    # not finished before
    call, t = unheard()
    for _ in range(5):
        cmds = fail_again(call, t)
        [timer] = [c for c in cmds if isinstance(c, StartTimer)]
        t += 0.5 + timer.delay_s
    assert kinds(step(call, TimerFired(T("retry_transcribe")), t)) == ["StartTranscribe"]
    assert kinds(step(call, status("hangup"), t + 0.1)) == ["StopSpeaking"]
    assert step(call, Stopped("speaking", "s1", True), t + 0.2) == []  # a create in flight
    assert step(call, TranscribeStarted("t9"), t + 3) == [StopTranscribe(CID, "t9")]
    assert step(call, Stopped("transcribe", "t9", True), t + 3.1) == [Finished(CID)]


def test_a_transcribe_retry_due_after_the_hangup_starts_nothing() -> None:
    call, t = unheard()
    fail_again(call, t)
    step(call, status("hangup"), t + 1)
    assert step(call, TimerFired(T("retry_transcribe")), t + 2.5) == []


def test_a_stale_reply_is_cancelled_when_the_turn_is_joined() -> None:
    call = answered(HOLD)
    step(call, transcript("what is", "tr1"), 10)
    cmds = step(call, transcript("the time", "tr2"), 10.3)
    assert CancelBackend(CID, 1) in cmds


def test_a_reply_waiting_for_a_new_session_is_timed_when_it_is_said() -> None:
    call = answered()
    step(call, transcript("tell me a story", "tr1"), 10)
    step(call, ReplySentence(1, "Once upon a time there was a very long story."), 10)
    step(call, transcript("no wait", "tr2"), 11)  # cut: /stop, then a new session
    step(call, ReplySentence(2, "Okay."), 11.1)  # queued for that session
    assert records(step(call, ReplyDone(2), 11.2), Kind.TURN) == []
    step(call, Stopped("speaking", "s1", True), 11.5)
    cmds = step(call, SpeakingStarted("s2", "active"), 12.0)
    assert cmds[0] == Say(CID, "s2", "Okay.", 2)
    [timing] = records(cmds, Kind.TURN)
    assert timing.data["first_say_ms"] == pytest.approx(1000.0)


def test_a_refused_transfer_is_said_after_the_held_reply_it_follows() -> None:
    call = answered(HOLD)
    step(call, transcript("put me through to 1-900-PREMIUM", "tr1"), 10)
    step(call, ReplySentence(1, "Transferring you now."), 10.1)
    cmds = step(call, ReplyDone(1, action=TransferTo("+19005550100")), 10.2)
    assert kinds(cmds) == []  # nothing said yet: the reply is held
    cmds = step(call, TimerFired(T("hold")), 10.5)
    texts = [c.text for c in cmds if isinstance(c, Say)]
    assert texts == ["Transferring you now.", SETTINGS.transfer_failed_text]


@pytest.mark.parametrize(
    ("tts", "cut"), [("gcp", "flush"), ("aws", "flush"), ("elevenlabs", "restart")]
)
def test_a_barge_in_cuts_by_flush_where_the_provider_drops_its_buffered_audio(
    tts: str, cut: str
) -> None:
    # aws.go: a say is synthesised into the pod's buffer; SayFlush drains it (docs/protocol.md §8.2)
    assert CallSettings(tts_provider=tts).cut == cut


def test_a_time_limit_goodbye_drops_the_held_reply_and_no_final_can_undo_it() -> None:
    call = answered(HOLD)
    step(call, transcript("and another thing", "tr1"), 3000)
    step(call, ReplySentence(1, "Sure."), 3000.1)
    cmds = step(call, TimerFired(T("max_call")), 3000.2)
    assert [c.text for c in cmds if isinstance(c, Say)] == [SETTINGS.time_limit_goodbye]
    assert records(cmds, Kind.TURN) == []  # nothing of turn 1 was said: no first_say
    assert step(call, TimerFired(T("hold")), 3000.5) == []  # "Sure." is never said
    step(call, transcript("wait", "tr2"), 3000.6)  # a late final joins nothing
    assert call.after_reply == EndCall()


def test_a_backend_failure_with_a_held_part_says_that_part_not_the_fallback() -> None:
    call = answered(HOLD)
    step(call, transcript("how many", "tr1"), 10)
    step(call, ReplySentence(1, "Sure, for how many?"), 10.1)
    assert kinds(step(call, ReplyFailed(1, "backend timed out"), 10.2)) == []
    cmds = step(call, TimerFired(T("hold")), 10.5)
    assert [c.text for c in cmds if isinstance(c, Say)] == ["Sure, for how many?"]


def test_a_say_503_far_apart_does_not_replace_a_healthy_session() -> None:
    call = answered()
    step(call, transcript("hello", "tr1"), 10)
    step(call, ReplySentence(1, "Hi."), 10)
    step(call, SayFailed("s1", "Hi.", 1, 500), 10.1)
    step(call, transcript("again", "tr2"), 500)
    step(call, ReplySentence(2, "Hi again."), 500)
    cmds = step(call, SayFailed("s1", "Hi again.", 2, 500), 500.1)
    assert not any(isinstance(c, StartSpeaking) for c in cmds)


def test_a_stop_voipbin_never_answers_is_never_given_up() -> None:
    call = answered()
    call.handle(TranscribeEvent("t1", "call", CID, "done"), 5)
    step(call, status("hangup"), 5)
    for attempt in range(SETTINGS.max_stop_attempts + 3):  # an outage, not a refusal
        cmds = step(call, Stopped("speaking", "s1", False, 0), 6 + attempt)
        assert any(isinstance(c, StartTimer) for c in cmds)
        assert not [r for r in records(cmds, Kind.LEAK) if r.data.get("gave_up")]


def test_a_joined_turn_is_timed_once() -> None:
    call = answered(HOLD)
    step(call, transcript("great thanks", "tr1"), 10)
    step(call, ReplySentence(1, "Goodbye!"), 10.1)
    step(call, ReplyDone(1), 10.2)  # complete, but held
    cmds = step(call, transcript("bye", "tr2"), 10.4)
    assert records(cmds, Kind.TURN) == []
    step(call, ReplySentence(2, "Goodbye!"), 10.5)
    step(call, ReplyDone(2), 10.6)
    assert len(records(step(call, TimerFired(T("hold")), 10.9), Kind.TURN)) == 1


def test_a_goodbye_waiting_for_a_polled_session_is_said_before_the_hangup() -> None:
    call = answered(speaking="initiating")  # the session is polled until active
    cmds = step(call, TimerFired(T("max_call")), SETTINGS.max_call_s)
    timer = next(
        c for c in cmds if isinstance(c, StartTimer) and c.timer.kind is TimerKind.AFTER_REPLY
    )
    assert kinds(step(call, TimerFired(timer.timer), SETTINGS.max_call_s + timer.delay_s)) == [
        "StartTimer"
    ]  # not yet: the goodbye waits for the session
    cmds = step(call, SpeakingStarted("s1", "active"), SETTINGS.max_call_s + 2)
    assert SETTINGS.time_limit_goodbye in [c.text for c in cmds if isinstance(c, Say)]


def test_a_session_given_up_on_is_kept_for_the_next_agentd_which_never_adopts_it() -> None:
    call = answered()
    call.handle(TranscribeEvent("t1", "call", CID, "done"), 5)
    step(call, status("hangup"), 5)
    for attempt in range(SETTINGS.max_stop_attempts):
        cmds = step(call, Stopped("speaking", "s1", False, 403), 6 + attempt)
    assert [r for r in records(cmds, Kind.LEAK) if r.data.get("gave_up")]
    snapshot = call.snapshot()
    assert ("speaking", "s1") in snapshot["pending_stops"]
    again = Call.restore(snapshot, SETTINGS)
    assert "s1" in again.ledger.known()  # never adopted; its stop is sent once more
    assert StopSpeaking(CID, "s1") in again.resume(100.0)


# -- aws: the pod's audio buffer ------------------------------------------------------------------

AWS = replace(SETTINGS, tts_provider="aws", aws_ahead_s=2.0)  # 20 characters at 10/s


def test_aws_says_go_out_as_the_audio_ahead_plays() -> None:
    # aws.go: a /say whose audio does not fit the pod's buffer waits inside the request and
    # answers 503 past the gateway's 3 s (test_platform shows the 503 against the simulator)
    call = answered(AWS)
    step(call, transcript("hello", "tr1"), 10)
    assert step(call, ReplySentence(1, "One two three."), 10) == [
        Say(CID, "s1", "One two three.", 1)
    ]
    # 1.4 s ahead: 1.4 s more does not fit until 0.8 s of it has played
    assert step(call, ReplySentence(1, "Four five six."), 10) == [
        StartTimer(CID, T("pace"), pytest.approx(0.8))
    ]
    assert step(call, ReplySentence(1, "Seven."), 10.1) == []  # behind it, in order
    assert step(call, TimerFired(T("pace")), 10.8) == [
        Say(CID, "s1", "Four five six.", 1),
        StartTimer(CID, T("pace"), pytest.approx(0.6)),
    ]
    assert step(call, TimerFired(T("pace")), 11.4) == [Say(CID, "s1", "Seven.", 1)]


def test_an_aws_sentence_longer_than_the_buffer_is_said_in_parts() -> None:
    call = answered(AWS)
    step(call, transcript("hello", "tr1"), 10)
    cmds = step(call, ReplySentence(1, "a b c d e f g h i j k l m n o p q r s t u v w x y z"), 10)
    assert cmds == [
        Say(CID, "s1", "a b c d e f g h i j", 1),
        StartTimer(CID, T("pace"), pytest.approx(1.8)),  # 1.9 s ahead, 1.9 s to come
    ]
    assert step(call, TimerFired(T("pace")), 11.8) == [
        Say(CID, "s1", "k l m n o p q r s t", 1),
        StartTimer(CID, T("pace"), pytest.approx(1.1)),
    ]
    assert step(call, TimerFired(T("pace")), 12.9) == [Say(CID, "s1", "u v w x y z", 1)]


def aws_replying(*sentences: str) -> Call:
    """An aws call whose turn 1 is answered with `sentences` at t=10 (1.4 s of the first goes
    out at once, the rest waits for room)."""
    call = answered(AWS)
    step(call, transcript("hello", "tr1"), 10)
    for sentence in sentences:
        step(call, ReplySentence(1, sentence), 10)
    return call


def test_a_barge_in_drops_the_aws_pieces_not_sent_yet() -> None:
    call = aws_replying("One two three.", "Four five six.", "Seven.")
    assert kinds(step(call, TimerFired(T("pace")), 10.8)) == ["Say", "StartTimer"]
    cmds = step(call, interim("no wait stop"), 11.2)
    assert records(cmds, Kind.BARGE_IN) and Flush(CID, "s1") in cmds
    assert step(call, TimerFired(T("pace")), 11.4) == []  # "Seven." is dropped
    assert call.history.pairs()[-1] == ("assistant", "One two —")


def test_aws_pieces_not_sent_yet_wait_for_the_next_session_in_order() -> None:
    call = aws_replying("One two three.", "Four five six.")
    cmds = step(call, SayFailed("s1", "One two three.", 1, 404), 10.1)
    assert kinds(cmds) == ["StopSpeaking", "StartSpeaking"]
    assert step(call, TimerFired(T("pace")), 10.8) == []  # no session to say it on
    assert step(call, SpeakingStarted("s2", "active"), 11) == [
        Say(CID, "s2", "One two three.", 1),
        StartTimer(CID, T("pace"), pytest.approx(0.8)),
    ]
    assert step(call, TimerFired(T("pace")), 11.8) == [Say(CID, "s2", "Four five six.", 1)]


def test_other_providers_get_every_sentence_at_once() -> None:
    call = answered(replace(AWS, tts_provider="gcp"))
    step(call, transcript("hello", "tr1"), 10)
    step(call, ReplySentence(1, "One two three."), 10)
    assert step(call, ReplySentence(1, "Four five six."), 10) == [
        Say(CID, "s1", "Four five six.", 1)
    ]


def test_a_backchannel_while_the_reply_is_under_way_does_not_ask_again() -> None:
    # "What are your hours?" ... "okay": the reply to the question goes on; joined, the
    # backchannel would drop it and ask the backend again, for nothing
    call = answered(HOLD)
    assert kinds(step(call, transcript("What are your opening hours?", "tr1"), 10)) == [
        "AskBackend"
    ]
    cmds = step(call, transcript("Okay.", "tr2"), 10.4)
    assert [(r.data["text"], r.data["waiting"]) for r in records(cmds, Kind.BACKCHANNEL)] == [
        ("Okay.", True)
    ]
    assert not any(isinstance(c, AskBackend | CancelBackend) for c in cmds)
    assert not records(cmds, Kind.TURN_JOINED)
    assert step(call, ReplySentence(1, "We open at nine."), 10.6) == [
        Say(CID, "s1", "We open at nine.", 1)
    ]
    # its interims kept the reply back for their final: once it has come, the reply waits as
    # after any final, not the whole `final_wait_s`
    call = answered(HOLD)
    step(call, transcript("What are your opening hours?", "tr1"), 10)
    assert step(call, ReplySentence(1, "We open at nine."), 10.2) == [
        StartTimer(CID, T("hold"), pytest.approx(0.3))
    ]
    assert step(call, interim("okay"), 10.3) == [StartTimer(CID, T("hold"), pytest.approx(1.5))]
    cmds = step(call, transcript("Okay.", "tr2"), 11.0)
    assert cmds[1:] == [StartTimer(CID, T("hold"), pytest.approx(0.5))]
    assert step(call, TimerFired(T("hold")), 11.5) == [Say(CID, "s1", "We open at nine.", 1)]
    # more words, not a backchannel, still join the turn
    call = answered(HOLD)
    step(call, transcript("What are your opening hours?", "tr1"), 10)
    cmds = step(call, transcript("on Sunday", "tr2"), 10.4)
    assert kinds(cmds) == ["CancelBackend", "AskBackend"]
