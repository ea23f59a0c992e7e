"""`reply_on = "interim"`: the end of the caller's turn from interims, stepped without a network."""

from __future__ import annotations

from dataclasses import replace

import pytest

from agentd.call import Call, CallSettings
from agentd.call.endpoint import Cue, Pauses, cue, goes_on
from agentd.commands import (
    AskBackend,
    CancelBackend,
    Flush,
    Record,
    ReplyDone,
    ReplySentence,
    Say,
    StartTimer,
    StopSpeaking,
    TimerFired,
)
from agentd.events import SpeechEvent
from agentd.names import Kind, Timer, TimerKind
from tests.test_call import SETTINGS, answered, step, transcript

CID = "c1"
LIVE = replace(
    SETTINGS, reply_on="interim", say_latency_s=1.0, final_hold_s=0.5, tts_provider="gcp"
)
ENDPOINT = TimerFired(Timer(TimerKind.ENDPOINT))


def interim(text: str) -> SpeechEvent:
    return SpeechEvent("i", "t1", "interim", "in", text)


def speak(call: Call, words: str, t0: float, step_s: float = 0.3) -> float:
    """The caller says `words`, one interim per word; returns the time of the last one."""
    out: list[str] = []
    t = t0
    for word in words.split():
        out.append(word)
        step(call, interim(" ".join(out)), t)
        t += step_s
    return t - step_s


def asks(cmds: list[object]) -> list[AskBackend]:
    return [c for c in cmds if isinstance(c, AskBackend)]


def says(cmds: list[object]) -> list[str]:
    return [c.text for c in cmds if isinstance(c, Say)]


def endpoint_delay(cmds: list[object]) -> float:
    (timer,) = [c for c in cmds if isinstance(c, StartTimer) and c.timer.kind is TimerKind.ENDPOINT]
    return timer.delay_s


def greeted(settings: CallSettings = LIVE) -> Call:
    """Answered, and the greeting has played (t=0 .. ~2 s)."""
    return answered(settings)


# -- cues -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "language", "expected"),
    [
        ("what is my balance?", "en-US", Cue.QUESTION),
        ("I lost my card.", "en-US", Cue.DONE),
        ("I lost my card", "en-US", Cue.OPEN),
        ("I lost my card and", "en-US", Cue.GOING_ON),
        ("I want to, um", "en-US", Cue.GOING_ON),
        ("so I was thinking,", "en-US", Cue.GOING_ON),
        ("잔액이 얼마인가요", "ko-KR", Cue.QUESTION),
        ("카드를 잃어버렸어요", "ko-KR", Cue.DONE),
        ("카드를 잃어버렸는데", "ko-KR", Cue.GOING_ON),
        ("주소를 바꾸고", "ko-KR", Cue.GOING_ON),
        ("그리고", "ko-KR", Cue.GOING_ON),
        ("残高はいくらですか", "ja-JP", Cue.QUESTION),
        ("カードをなくしました", "ja-JP", Cue.DONE),
        ("カードをなくして", "ja-JP", Cue.GOING_ON),
        ("えーと", "ja-JP", Cue.GOING_ON),
    ],
)
def test_cues_of_the_end_of_a_turn(text: str, language: str, expected: Cue) -> None:
    assert cue(text, language) is expected


def test_only_new_words_go_on() -> None:
    assert not goes_on("What is my balance?", "what is my balance")
    assert not goes_on("a table for two", "a table for to")  # the STT heard a word again
    assert goes_on("my balance please", "my balance")
    assert goes_on("no, Denver", "to Boston")


def test_a_caller_who_pauses_mid_thought_gets_a_longer_wait() -> None:
    p = Pauses()
    assert p.wait(Cue.DONE, 0.6, 9, lead=1.0) == 0.6
    p.went_on_after(1.0)  # a reply said after 0.6 s would have been cut before its audio
    assert p.wait(Cue.DONE, 0.6, 9, lead=1.0) == 0.6
    assert p.wait(Cue.DONE, 0.6, 9, lead=0.0) == pytest.approx(1.2)
    p.went_on_after(2.6)
    assert p.wait(Cue.DONE, 0.6, 9, lead=1.0) == pytest.approx(1.0)  # (1.0 + 2.6) / 2 + 0.2 - 1
    assert p.wait(Cue.QUESTION, 0.6, 9, lead=1.0) == pytest.approx(0.36)  # a "?" is trusted
    p.went_on_after(10.0)  # started over: no pause
    assert p.wait(Cue.DONE, 0.6, 9, lead=1.0) == pytest.approx(1.0)
    assert p.wait(Cue.OPEN, 0.6, 9, lead=1.0) == pytest.approx(1.0)
    assert p.wait(Cue.GOING_ON, 0.6, 9, lead=1.0) == 9
    p.went_on_after(3.0)
    assert p.wait(Cue.OPEN, 0.6, 9, lead=0.0) == 1.5  # never longer than this


# -- the turn -------------------------------------------------------------------------------------


def test_a_question_is_asked_at_once_and_said_before_its_final() -> None:
    call = greeted()
    last = speak(call, "what is my balance?", 10.0)
    # the question mark came with the last word's interim: the backend is asked right then
    assert call.turn == 1
    assert call.history.window(9)[-1] == ("user", "what is my balance?")
    held = step(call, ReplySentence(1, "It is ten dollars."), last + 0.3)
    assert says(held) == []  # 0.3 s without new words is not the end of a question yet
    cmds = step(call, ENDPOINT, last + 0.36)
    assert says(cmds) == ["It is ten dollars."]
    # the final (with speech_ended) comes a second after the words: the same turn, no new ask
    cmds = step(call, transcript("What is my balance?"), last + 1.0)
    assert asks(cmds) == [] and says(cmds) == []
    assert call.turn == 1


def test_words_that_go_on_are_not_asked_about_until_their_final() -> None:
    call = greeted()
    last = speak(call, "I lost my card and", 10.0)
    assert call.turn == 0
    assert asks(step(call, ENDPOINT, last + 0.9)) == []
    cmds = step(call, transcript("I lost my card and"), last + 1.0)
    # the STT ended it: the reply is asked for, and said if the caller stays quiet a little
    (ask,) = asks(cmds)
    assert ask.history[-1] == ("user", "I lost my card and")
    assert endpoint_delay(cmds) == pytest.approx(LIVE.final_hold_s)
    assert says(step(call, ReplySentence(1, "Go on."), last + 1.1)) == []
    assert says(step(call, ENDPOINT, last + 1.0 + LIVE.final_hold_s)) == ["Go on."]


def test_going_on_drops_the_speculative_reply_and_asks_again_with_every_word() -> None:
    call = greeted()
    last = speak(call, "I lost my card.", 10.0)
    assert call.turn == 1  # a full sentence: asked at once
    cmds = step(call, interim("It was"), last + 0.4)  # the STT's next utterance
    assert CancelBackend(CID, 1) in cmds
    assert any(isinstance(c, Record) and c.what == Kind.TURN_JOINED for c in cmds)
    last = speak(call, "It was stolen.", last + 0.4)
    assert call.turn == 2
    assert call.history.window(9)[-1] == ("user", "I lost my card. It was stolen.")
    # the late finals repeat what was answered: no third ask
    assert asks(step(call, transcript("I lost my card."), last + 0.5)) == []
    assert asks(step(call, transcript("It was stolen.", "tr2"), last + 1.0)) == []
    assert call.wasted == 1


def test_a_reply_sent_but_not_heard_yet_is_cut_before_its_audio_when_the_caller_goes_on() -> None:
    call = greeted()
    last = speak(call, "I lost my card.", 10.0)
    step(call, ReplySentence(1, "I'm sorry to hear that."), last + 0.5)
    cmds = step(call, ENDPOINT, last + LIVE.end_of_turn_s)
    assert says(cmds) == ["I'm sorry to hear that."]  # its audio starts a second later
    cmds = step(call, interim("It was"), last + 1.2)
    assert Flush(CID, "s1") in cmds
    assert call.history.window(9)[-1] == ("user", "I lost my card.")  # nothing was heard
    last = speak(call, "It was stolen.", last + 1.2)
    assert call.history.window(9)[-1] == ("user", "I lost my card. It was stolen.")


def test_words_after_the_reply_is_heard_are_a_new_turn_or_a_barge_in() -> None:
    call = greeted()
    last = speak(call, "what is my balance?", 10.0)
    step(call, ReplySentence(1, "It is ten dollars, and your card is fine."), last + 0.2)
    step(call, ENDPOINT, last + 0.36)
    step(call, ReplyDone(1), last + 0.4)
    audio = last + 0.36 + LIVE.say_latency_s
    # a backchannel while the reply plays cuts nothing and is no turn
    assert step(call, interim("mm-hmm"), audio + 1.5) == []
    cmds = step(call, transcript("mm-hmm", "tr9"), audio + 2.5)
    assert [c.what for c in cmds if isinstance(c, Record)] == [Kind.BACKCHANNEL]
    # real words past the echo guard: a barge-in, and a new turn
    cmds = step(call, interim("wait I meant"), audio + 2.0)
    assert Flush(CID, "s1") in cmds
    speak(call, "wait I meant savings?", audio + 2.0)
    assert call.turn == 2


def test_the_final_of_the_answered_turn_arriving_after_its_reply_is_absorbed() -> None:
    call = greeted()
    last = speak(call, "what is my balance?", 10.0)
    step(call, ReplySentence(1, "Ten dollars."), last + 0.2)
    step(call, ENDPOINT, last + 0.36)
    step(call, ReplyDone(1), last + 0.4)
    after = last + 0.36 + LIVE.say_latency_s + 2.0  # the reply has played
    for tid in ("tr1", "tr1", "tr1"):  # the event, its duplicate, a REST read-back
        assert asks(step(call, transcript("What is my balance?", tid), after)) == []
    assert call.turn == 1


def test_a_stop_cuts_an_unheard_reply_with_elevenlabs() -> None:
    call = greeted(replace(LIVE, tts_provider="elevenlabs"))
    last = speak(call, "I lost my card.", 10.0)
    step(call, ReplySentence(1, "I'm sorry."), last + 0.1)
    step(call, ENDPOINT, last + LIVE.end_of_turn_s)
    cmds = step(call, interim("It was"), last + 1.0)
    assert any(isinstance(c, StopSpeaking) for c in cmds)


def test_final_mode_is_unchanged_by_interims() -> None:
    call = greeted(replace(LIVE, reply_on="final"))
    speak(call, "what is my balance?", 10.0)
    assert call.turn == 0
    cmds = step(call, transcript("What is my balance?"), 12.0)
    assert len(asks(cmds)) == 1
