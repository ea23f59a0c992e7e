"""`reply_on = "interim"`: the end of the caller's turn from interims, stepped without a network."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from agentd.call import Call, CallSettings
from agentd.call.endpoint import Cue, Hearing, Pauses, cue, goes_on, rejoin
from agentd.call.settings import TURN_NUDGE
from agentd.commands import (
    AskBackend,
    CancelBackend,
    CancelTimer,
    FetchTranscripts,
    Flush,
    Message,
    Record,
    ReplyDone,
    ReplyFailed,
    ReplyIncomplete,
    ReplySentence,
    Say,
    SpeakingStarted,
    StartTimer,
    StopSpeaking,
    StreamState,
    TimerFired,
    TranscribeStarted,
    TranscriptsRead,
)
from agentd.events import SpeechEvent
from agentd.names import EndCall, Kind, Timer, TimerKind
from agentd.reply import MAX_REPLY_CHARS, _Silence, stream_reply
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
    """Answered, and the greeting sent at t=0."""
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
        ("문제는", "ko-KR", Cue.GOING_ON),
        ("지난달부터 카드를", "ko-KR", Cue.GOING_ON),
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


def test_an_interim_delivered_after_its_final_does_not_double_the_words() -> None:
    # speech events and transcripts come on two topics, in no guaranteed order: the last
    # interim of an utterance may come after the utterance's final
    call = greeted()
    last = speak(call, "book a table for", 10.0)
    cmds = step(call, transcript("book a table for two"), last + 0.5)
    cmds += step(call, interim("book a table for two"), last + 0.66)
    cmds += step(call, ENDPOINT, last + 2.0)
    assert [a.history[-1] for a in asks(cmds)][-1:] == [("user", "book a table for two")]
    assert call.history.window(9)[-1] == ("user", "book a table for two")
    # the same words said again right after are the caller going on: their interims grow
    # from one word, and count
    again = greeted()
    last = speak(again, "what is my balance?", 10.0)
    step(again, transcript("what is my balance?"), last + 0.3)
    step(again, interim("what"), last + 0.5)
    assert again.hearing is not None
    assert again.hearing.text() == "what is my balance? what"


def test_no_words_while_the_stream_is_down_is_no_pause_of_the_callers() -> None:
    call = greeted()
    last = speak(call, "I would like to book", 10.0)
    assert step(call, StreamState(False), last + 0.1) == []
    # the caller goes on, unheard: no end of turn is taken from the silence of the stream
    assert asks(step(call, ENDPOINT, last + 1.5)) == []
    assert asks(step(call, TimerFired(Timer(TimerKind.SILENCE)), last + 30)) == []
    back = last + 5.0
    cmds = step(call, StreamState(True), back)
    assert asks(cmds) == []  # the pause counts from the stream's return
    read_back = "I would like to book a table for two tomorrow evening."
    cmds = step(call, transcript(read_back), back + 0.2)
    cmds += step(call, ENDPOINT, back + 2.0)
    assert [a.history[-1] for a in asks(cmds)] == [("user", read_back)]


HOLD = TimerFired(Timer(TimerKind.HOLD))
BOTH_MODES = pytest.mark.parametrize("reply_on", ["interim", "final"])


def _asked(reply_on: str) -> tuple[Call, float]:
    """A greeted call whose caller asked a question, asked of the backend at once (on its
    interims, or on its final with `reply_on = "final"`); the time of the caller's last word."""
    call = greeted(replace(LIVE, reply_on=reply_on))
    last = speak(call, "what is my balance?", 10.0)
    if reply_on == "final":
        last += 1.0
        step(call, transcript("what is my balance?"), last)
    return call, last


def _back_with_a_reply_held(
    reply: str, reply_on: str = "interim"
) -> tuple[Call, float, list[object]]:
    """The caller asked a question (asked at once: on its interims, or on its final with
    `reply_on = "final"`), the stream dropped, the reply's sentence came while it was down;
    the call, when the stream came back, and that step's commands."""
    call, last = _asked(reply_on)
    step(call, StreamState(False), last + 0.05)
    step(call, ReplySentence(call.turns.turn, reply), last + 0.1)
    back = last + 2.0
    return call, back, list(step(call, StreamState(True), back))


@BOTH_MODES
def test_a_turn_open_when_the_stream_comes_back_is_not_answered_before_the_read_back(
    reply_on: str,
) -> None:
    # a restart or a blip between the caller's first words and the end of their turn: they
    # went on unheard. Said at once, the reply to their first words would be cut by the rest
    # once read back: the agent talking over itself
    call, back, cmds = _back_with_a_reply_held("Your balance is ten dollars.", reply_on)
    assert [c for c in cmds if isinstance(c, FetchTranscripts)] != []
    cmds += step(call, ENDPOINT, back + 0.6)
    cmds += step(call, HOLD, back + 0.6)
    assert says(cmds) == []  # held for the read-back
    gone_on = "what is my balance? and my savings?"
    read = (transcript(gone_on, "tr7"),)
    if reply_on == "final":  # one final a sentence: the first was heard, the next was not
        read = (transcript("what is my balance?"), transcript("and my savings?", "tr7"))
    cmds = list(step(call, TranscriptsRead(read), back + 0.7))
    assert says(cmds) == []
    (again,) = asks(cmds)  # one turn, all of its words
    assert again.history[-1] == ("user", gone_on)


@BOTH_MODES
def test_a_read_back_that_finds_nothing_new_lets_the_held_reply_be_said_at_once(
    reply_on: str,
) -> None:
    call, back, cmds = _back_with_a_reply_held("Ten dollars.", reply_on)
    cmds += step(call, ENDPOINT, back + 0.6)
    cmds += step(call, HOLD, back + 0.6)
    assert says(cmds) == []
    assert says(step(call, TranscriptsRead(()), back + 0.7)) == ["Ten dollars."]


@BOTH_MODES
def test_a_read_back_that_never_comes_holds_the_reply_no_longer_than_a_final_is_awaited(
    reply_on: str,
) -> None:
    call, back, cmds = _back_with_a_reply_held("Ten dollars.", reply_on)
    kind = TimerKind.ENDPOINT if reply_on == "interim" else TimerKind.HOLD
    (timer,) = [c for c in cmds if isinstance(c, StartTimer) and c.timer.kind is kind]
    assert timer.delay_s == pytest.approx(LIVE.final_wait_s)
    assert says(step(call, TimerFired(timer.timer), back + LIVE.final_wait_s)) == ["Ten dollars."]


@BOTH_MODES
def test_a_reply_held_for_the_end_of_the_turn_is_not_said_while_the_stream_is_down(
    reply_on: str,
) -> None:
    # the hold ran out during the outage: no words is no pause of the caller's, they may have
    # gone on unheard. The stream's return decides, after the read-back (unless it stays down
    # long: test_a_reply_held_through_a_long_outage_is_said_once_it_waited_as_long_as_a_read_back)
    call, last = _asked(reply_on)
    step(call, StreamState(False), last + 0.05)
    assert says(step(call, ReplySentence(call.turns.turn, "Ten dollars."), last + 0.1)) == []
    assert says(step(call, HOLD, last + 1.0)) == []
    assert says(step(call, ReplySentence(call.turns.turn, "Anything else?"), last + 1.5)) == []
    back = last + 5.0
    assert says(step(call, StreamState(True), back)) == []
    assert says(step(call, ENDPOINT, back + 0.6) + step(call, HOLD, back + 0.6)) == []
    assert says(step(call, TranscriptsRead(()), back + 0.7)) == ["Ten dollars.", "Anything else?"]


@BOTH_MODES
def test_a_reply_held_through_a_long_outage_is_said_once_it_waited_as_long_as_a_read_back(
    reply_on: str,
) -> None:
    # VoIPBIN's REST answers and its WebSocket does not, for minutes: the caller who asked
    # must not sit in silence until the stream is back. Past its hold and the drop, the reply
    # waits as long as a read-back would be waited for, then it is said
    call, last = _asked(reply_on)
    down = last + 0.05
    step(call, StreamState(False), down)
    cmds = step(call, ReplySentence(call.turns.turn, "Ten dollars."), last + 0.1)
    (timer,) = [c for c in cmds if isinstance(c, StartTimer) and c.timer == HOLD.timer]
    due = last + 0.1 + timer.delay_s
    assert due == pytest.approx(max(call.hold_until, down) + LIVE.final_wait_s)
    assert says(step(call, HOLD, due - 0.5)) == []
    assert says(step(call, HOLD, due)) == ["Ten dollars."]
    # the stream comes back: nothing is said again, and the read-back finds the turn answered
    cmds = step(call, StreamState(True), due + 60.0)
    cmds += step(call, TranscriptsRead((transcript("what is my balance?"),)), due + 60.2)
    cmds += step(call, ENDPOINT, due + 62.0) + step(call, HOLD, due + 62.0)
    assert says(cmds) == [] and asks(cmds) == []


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


def answered_question(call: Call, reply: str) -> float:
    """The caller asks; the reply is said at the end of the question; returns when its audio
    starts."""
    last = speak(call, "what is my balance?", 10.0)
    step(call, ReplySentence(1, reply), last + 0.2)
    step(call, ENDPOINT, last + 0.36)
    step(call, ReplyDone(1), last + 0.4)
    return last + 0.36 + LIVE.say_latency_s


def test_words_after_the_reply_is_heard_are_a_new_turn_or_a_barge_in() -> None:
    call = greeted()
    audio = answered_question(call, "It is ten dollars, and your card is fine.")
    # a backchannel while the reply plays cuts nothing and is no turn
    assert step(call, interim("mm-hmm"), audio + 1.5) == []
    cmds = step(call, transcript("mm-hmm", "tr9"), audio + 2.5)
    assert [c.what for c in cmds if isinstance(c, Record)] == [Kind.BACKCHANNEL]
    # real words past the echo guard: a barge-in, and a new turn
    cmds = step(call, interim("wait I meant"), audio + 2.0)
    assert Flush(CID, "s1") in cmds
    speak(call, "wait I meant savings?", audio + 2.0)
    assert call.turn == 2


@pytest.mark.parametrize(
    ("heard", "final"),
    [
        *(("はい、はい", "はい、はい。"), ("うんうん", "うんうん。")),
        *(("嗯嗯", "嗯嗯。"), ("对对对", "对，对，对。")),
    ],
)
def test_a_repeated_cjk_backchannel_over_the_reply_neither_cuts_nor_is_a_turn(
    heard: str, final: str
) -> None:
    # written without spaces, as Japanese and Chinese are: still a listener's "yes, yes"
    call = greeted()
    audio = answered_question(call, "It is ten dollars, and your card is fine.")
    assert step(call, interim(heard), audio + 1.5) == []
    cmds = step(call, transcript(final, "tr9"), audio + 2.5)
    assert [c.what for c in cmds if isinstance(c, Record)] == [Kind.BACKCHANNEL]
    assert call.turn == 1


def test_the_final_of_the_answered_turn_arriving_after_its_reply_is_absorbed() -> None:
    call = greeted()
    after = answered_question(call, "Ten dollars.") + 2.0  # the reply has played
    for tid in ("tr1", "tr1", "tr1"):  # the event, its duplicate, a REST read-back
        assert asks(step(call, transcript("What is my balance?", tid), after)) == []
    assert call.turn == 1


def test_the_late_final_that_settles_the_answered_words_differently_is_absorbed() -> None:
    # the interims showed "what is my balance"; the final, a second later, adds a word they
    # never showed: the caller did not go on, the STT settled the words (a reply heard and
    # cut for it would be answered twice, merged)
    call = greeted()
    audio = answered_question(call, "Ten dollars.")
    cmds = step(call, transcript("What is my balance please?", "tr1"), audio + 0.2)
    assert asks(cmds) == [] and StopSpeaking(CID, "s1") not in cmds and Flush(CID, "s1") not in cmds
    assert call.turn == 1
    # new words after it are a turn of their own
    speak(call, "and my savings?", audio + 3.0)
    assert call.turn == 2


def test_a_late_final_that_revises_an_answered_word_corrects_the_history_only() -> None:
    # "card" settled as "credit card" after the reply began to play: the reply heard stands
    # (no cut, no second answer), the model sees the caller's words as the final has them
    call = greeted()
    last = speak(call, "I lost my card.", 10.0)
    step(call, ReplySentence(1, "I am sorry."), last + 0.2)
    step(call, ENDPOINT, last + 0.7)
    step(call, ReplyDone(1), last + 0.8)
    audio = last + 0.7 + LIVE.say_latency_s
    cmds = step(call, transcript("I lost my credit card.", "tr1"), audio + 0.2)
    assert asks(cmds) == [] and Flush(CID, "s1") not in cmds
    assert ("user", "I lost my credit card.") in call.history.window(9)
    assert call.turn == 1


def test_a_late_final_that_changes_the_answered_words_is_answered_again_in_their_place() -> None:
    # the reply to "what is my balance?" plays; the final says more than the interims had
    # shown: the agent stops and answers the final's words, which take the place of the
    # interims' in the history (not a second question glued after the first)
    call = greeted()
    audio = answered_question(call, "Ten dollars.")
    cmds = step(call, transcript("What is my balance in dollars?", "tr1"), audio + 0.2)
    assert Flush(CID, "s1") in cmds
    (ask,) = asks(cmds + step(call, ENDPOINT, audio + 2.0))
    assert ask.history[-1] == ("user", "What is my balance in dollars?")
    assert [m for m in ask.history if m[0] == "user"] == [
        ("user", "What is my balance in dollars?")
    ]


@pytest.mark.parametrize(
    ("heard", "final"),
    [
        ("um I want to cancel my order", "I want to cancel my order."),  # a filler dropped
        ("yeah", "Yes."),  # one word heard again
        ("walk tomorrow", "Work tomorrow."),  # its first word revised
        ("予約を替えたいんですか", "予約を変えたいんですか。"),  # one token, a letter revised
        ("예약 을 변경 하고 싶어요", "예약을 변경하고 싶어요."),  # re-spaced
    ],
)
def test_a_final_that_restates_its_interim_replaces_it(heard: str, final: str) -> None:
    h = Hearing()
    h.on_interim(heard, 0.0)
    h.on_final(final, 1.1)
    assert h.text() == final


def test_a_final_unlike_an_interim_that_began_long_before_it_replaces_it() -> None:
    # "five five five one two three four" settled as "555-1234": no word alike, but the
    # interims began 4 s before the final, too early to be the next utterance's
    h = Hearing()
    h.on_interim("five five five", 0.0)
    h.on_interim("five five five one two three four", 2.0)
    h.on_final("555-1234.", 4.0)
    assert h.text() == "555-1234."


def test_the_next_utterances_interim_before_the_last_final_is_kept() -> None:
    h = Hearing()
    h.on_interim("yes", 0.0)
    h.on_interim("and the blue", 1.2)  # the next utterance: "yes" stands on its interim
    h.on_final("Yes.", 1.3)
    assert h.text() == "Yes. and the blue"
    h2 = Hearing()
    h2.on_interim("no thanks", 1.0)  # the next utterance; its final-less predecessor unseen
    h2.on_final("Yes.", 1.3)
    assert h2.text() == "Yes. no thanks"


@pytest.mark.parametrize(
    ("said", "final"),
    [
        ("please cancel my order", "Please don't cancel my order."),
        ("transfer fifty dollars", "Transfer fifteen dollars."),
        ("my pin is 1 2 3", "My pin is 1 2 3 4."),
        ("fifty", "Fifteen."),
        ("no", "Now."),
    ],
)
def test_a_final_that_changes_the_words_asked_on_has_the_reply_asked_again(
    said: str, final: str
) -> None:
    call = greeted()
    last = speak(call, said, 10.0)
    assert asks(step(call, ENDPOINT, last + 0.5))  # asked on the interims
    cmds = step(call, transcript(final, "tr1"), last + 1.1)
    for t in (2.0, 3.0, 5.0):
        cmds += step(call, ENDPOINT, last + t)
    # for the final's words alone: not glued to the interims', not left answering those
    assert [a.history[-1] for a in asks(cmds)] == [("user", final)]


def test_a_final_that_only_drops_a_filler_keeps_the_reply_asked_on_the_interims() -> None:
    call = greeted()
    last = speak(call, "um what is my balance?", 10.0)
    assert call.turn == 1  # a question: asked at once, on the interims
    cmds = step(call, transcript("What is my balance, please?", "tr1"), last + 1.1)
    assert asks(cmds) == [] and call.turn == 1


def test_a_turn_restored_open_while_the_stream_is_up_is_answered() -> None:
    # a takeover: the turn was asked for, unanswered, and its final was handled before the
    # restart (its read-back is dropped as a repeat): nothing else would ever ask it again
    call = greeted(replace(LIVE, silence_s=5.0))
    t = speak(call, "I lost my card.", 10.0) + 0.4
    step(call, transcript("I lost my card.", "tr1"), t)
    restored = Call.restore(call.snapshot(), call.settings)
    cmds = restored.resume(t + 5.0) + restored.handle(SpeakingStarted("s1", "active"), t + 5.1)
    cmds += restored.handle(TranscriptsRead((transcript("I lost my card.", "tr1"),)), t + 6)
    delay = endpoint_delay(cmds)
    (ask,) = asks(step(restored, ENDPOINT, t + 5.0 + delay))
    assert ask.history[-1] == ("user", "I lost my card.")


def test_a_number_the_final_writes_in_digits_is_the_same_words() -> None:
    call = greeted()
    last = speak(call, "my number is five five five one two three four", 10.0)
    assert asks(step(call, ENDPOINT, last + 0.5))
    cmds = step(call, transcript("My number is 555-1234.", "tr1"), last + 1.9)
    assert asks(cmds) == [] and Flush(CID, "s1") not in cmds and call.turn == 1


def test_an_interim_of_no_words_opens_no_turn_and_the_silence_is_reprompted() -> None:
    call = greeted(replace(LIVE, silence_s=5.0))
    assert step(call, interim("?"), 10.0) == []
    assert step(call, interim("-"), 10.5) == []
    assert call.hearing is None
    assert says(step(call, TimerFired(Timer(TimerKind.SILENCE)), 16.0)) == ["Are you still there?"]


def test_words_that_go_on_and_never_get_a_final_are_answered_after_a_while() -> None:
    call = greeted()
    last = speak(call, "I need help with", 10.0)
    cmds = step(call, ENDPOINT, last + 0.5)
    assert asks(cmds) == []  # "with": more is coming
    wait = 2 * LIVE.final_wait_s
    cmds = step(call, ENDPOINT, last + wait)
    (ask,) = asks(cmds)  # no word, not even a final (lost): the turn is over all the same
    assert ask.history[-1] == ("user", "I need help with")


def test_words_read_back_while_the_stream_is_down_are_answered_once_it_is_back() -> None:
    call = greeted(replace(LIVE, silence_s=1.0))
    step(call, StreamState(False), 10)
    # the REST watch reads back what the caller said meanwhile: a final, its turn open
    step(call, TranscriptsRead((transcript("can you hear me", "tr5"),)), 11)
    assert asks(step(call, ENDPOINT, 12)) == []  # deaf: no pause is the caller's
    silence = step(call, TimerFired(Timer(TimerKind.SILENCE)), 13)
    assert says(silence) == []  # the caller's turn is open: no reprompt
    cmds = step(call, StreamState(True), 14)
    # the STT had ended those words: the usual wait after a final, not the trailing "me"'s
    assert endpoint_delay(cmds) < 2 * LIVE.final_wait_s
    (ask,) = asks(step(call, ENDPOINT, 14 + endpoint_delay(cmds)))
    assert ask.history[-1] == ("user", "can you hear me")
    assert says(step(call, TimerFired(Timer(TimerKind.SILENCE)), 15)) == []  # it is answering


def test_a_stop_cuts_an_unheard_reply_with_elevenlabs() -> None:
    call = greeted(replace(LIVE, tts_provider="elevenlabs"))
    last = speak(call, "I lost my card.", 10.0)
    step(call, ReplySentence(1, "I'm sorry."), last + 0.1)
    # a retraction costs a /stop and a new session: a statement's end is waited for longer
    assert says(step(call, ENDPOINT, last + LIVE.end_of_turn_s)) == []
    assert says(step(call, ENDPOINT, last + LIVE.end_of_turn_stop_s)) == ["I'm sorry."]
    cmds = step(call, interim("It was"), last + 1.2)
    assert any(isinstance(c, StopSpeaking) for c in cmds)


def test_final_mode_is_unchanged_by_interims() -> None:
    call = greeted(replace(LIVE, reply_on="final"))
    speak(call, "what is my balance?", 10.0)
    assert call.turn == 0
    cmds = step(call, transcript("What is my balance?"), 12.0)
    assert len(asks(cmds)) == 1


# -- fillers, the turn limit, echo, kept lines ----------------------------------------------------


def test_a_slow_reply_gets_a_filler_once_the_turn_is_over() -> None:
    call = greeted()
    last = speak(call, "what is my balance?", 10.0)
    cmds = call.handle(ENDPOINT, last + 0.36)  # (`step` leaves the filler timer out)
    filler = [c for c in cmds if isinstance(c, StartTimer) and c.timer.kind is TimerKind.FILLER]
    assert [t.delay_s for t in filler] == [LIVE.filler_after_s]
    cmds = step(call, TimerFired(Timer(TimerKind.FILLER)), last + 0.36 + LIVE.filler_after_s)
    assert says(cmds) == ["One moment."]
    cmds = step(call, ReplySentence(1, "Ten dollars."), last + 2.0)
    assert says(cmds) == ["Ten dollars."]  # it plays after the filler
    # one filler a turn
    assert says(step(call, TimerFired(Timer(TimerKind.FILLER)), last + 3.0)) == []


def slow_reply_with_filler() -> tuple[Call, float]:
    """A question whose reply is slow: "One moment." is said; and when its audio starts."""
    call = greeted()
    last = speak(call, "what is my balance?", 10.0)
    step(call, ENDPOINT, last + 0.36)
    step(call, transcript("What is my balance?", "tr1"), last + 1.14)
    filler_at = last + 0.36 + LIVE.filler_after_s
    assert says(step(call, TimerFired(Timer(TimerKind.FILLER)), filler_at)) == ["One moment."]
    return call, filler_at + LIVE.say_latency_s


def test_the_filler_is_no_reply_the_turn_it_covers_is_still_answered() -> None:
    # the reply is slow: "One moment."; the caller's "and savings" begins just before its
    # audio and drops the reply asked without it. The filler's audio is not the turn's reply:
    # the turn stays open and is asked again (before, it was taken for answered: never answered)
    call, audio = slow_reply_with_filler()
    cmds = step(call, interim("and"), audio - 0.1)
    assert any(isinstance(c, CancelBackend) for c in cmds)  # the caller went on
    cmds = step(call, interim("and savings"), audio + 0.2)
    for t in (audio + 1.0, audio + 1.5, audio + 4.0):
        cmds += step(call, ENDPOINT, t)
    cmds += step(call, transcript("And savings.", "tr2"), audio + 1.4)
    assert asks(cmds)
    assert call.turns.replying
    # the turn asked again is the same turn of the caller's: it had its "One moment." already
    assert says(step(call, TimerFired(Timer(TimerKind.FILLER)), audio + 6.0)) == []


def test_a_backchannel_while_the_agent_thinks_keeps_the_reply_under_way() -> None:
    # the reply is slow: "One moment."; the caller's "uh huh" (over it, or before its audio)
    # adds nothing to the question: the reply asked is not dropped and asked again
    call, audio = slow_reply_with_filler()
    cmds = step(call, interim("uh"), audio - 0.1)
    cmds += step(call, interim("uh huh"), audio + 0.2)
    assert not any(isinstance(c, CancelBackend | AskBackend) for c in cmds)
    cmds = step(call, transcript("Uh huh.", "tr2"), audio + 1.4)
    assert [r.data for r in cmds if isinstance(r, Record)] == [{"text": "Uh huh.", "waiting": True}]
    assert not asks(cmds) and call.turns.replying
    # the reply comes: said once the caller's final is half a second old, as after any final
    cmds = step(call, ReplySentence(1, "Your balance is ten dollars."), audio + 1.5)
    cmds += step(call, TimerFired(Timer(TimerKind.HOLD)), audio + 1.4 + LIVE.final_hold_s)
    assert says(cmds) == ["Your balance is ten dollars."]


def test_a_reply_ready_in_time_needs_no_filler() -> None:
    call = greeted(replace(LIVE, language="ko-KR"))
    assert call.settings.filler == "잠시만요."
    last = speak(call, "잔액이 얼마인가요?", 10.0)
    step(call, ReplySentence(1, "만 원입니다."), last + 0.2)
    step(call, ENDPOINT, last + 0.36)
    assert says(step(call, TimerFired(Timer(TimerKind.FILLER)), last + 1.4)) == []


def test_timers_whose_reason_went_away_are_cancelled_not_left_to_fire() -> None:
    call = greeted(replace(LIVE, reply_on="final", final_hold_s=0.0))
    last = speak(call, "what is my balance", 10.0)
    cmds = call.handle(SpeechEvent("b", "t1", "boundary", "in", ""), last + 0.1)
    due = Timer(TimerKind.TRANSCRIPT_DUE)
    assert [c.timer for c in cmds if isinstance(c, StartTimer)] == [due]
    # the transcript that was due came: its timer goes; the turn arms a filler
    cmds = call.handle(transcript("What is my balance?"), last + 0.2)
    assert CancelTimer(CID, due) in cmds
    assert any(isinstance(c, StartTimer) and c.timer.kind is TimerKind.FILLER for c in cmds)
    # the reply was said in time: the filler it was armed for goes
    cmds = call.handle(ReplySentence(1, "Ten dollars."), last + 0.3)
    assert says(cmds) == ["Ten dollars."]
    assert CancelTimer(CID, Timer(TimerKind.FILLER)) in cmds
    # nothing more is due: later steps cancel nothing
    cmds = call.handle(ReplyDone(1), last + 0.4)
    assert not [c for c in cmds if isinstance(c, CancelTimer)]


@pytest.mark.parametrize("reply_on", ["interim", "final"])
def test_a_speech_started_delivered_after_its_first_words_is_not_taken_for_their_end(
    reply_on: str,
) -> None:
    # VoIPBIN publishes speech_started with the first interim and speech_ended with the final;
    # unwrapped, both are a boundary, and their order is not guaranteed. Taken for an end, a
    # late start armed the transcript's timer, and a long utterance ran past it: a needless
    # read-back of the transcripts
    call = greeted(replace(LIVE, reply_on=reply_on, final_hold_s=0.0))
    due = Timer(TimerKind.TRANSCRIPT_DUE)

    def speech(kind: str, text: str, at: str) -> SpeechEvent:
        return SpeechEvent(kind[0], "t1", "interim" if text else "boundary", "in", text, at)

    def arms(cmds: list[object]) -> bool:
        return any(isinstance(c, StartTimer) and c.timer == due for c in cmds)

    step(call, speech("i1", "what", "2026-12-06T10:00:00.000200Z"), 10.0)
    assert not arms(step(call, speech("s", "", "2026-12-06T10:00:00.000100Z"), 10.05))
    step(call, speech("i2", "what is my balance", "2026-12-06T10:00:01.200000Z"), 11.2)
    assert arms(step(call, speech("e", "", "2026-12-06T10:00:02.300000Z"), 12.3))


def test_a_turn_past_the_limit_is_cut_short_politely_and_answered() -> None:
    call = greeted(replace(LIVE, max_turn_s=3.0))
    words = "so the thing is that my card was charged twice last week and then again"
    words = words.split()
    for i in range(len(words)):
        cmds = step(call, interim(" ".join(words[: i + 1])), 10.0 + 0.3 * i)
        if any(isinstance(c, Record) and c.what == Kind.CUT_IN for c in cmds):
            break
    else:
        raise AssertionError("never cut in")
    assert says(cmds) == ["Sorry to cut in."]
    (ask,) = asks(cmds)
    assert ask.history[-1][1].startswith("so the thing is that my card was charged")
    # the caller talking on neither cuts the agent nor makes another turn
    t = 10.0 + 0.3 * i
    assert step(call, interim("and I really want it back now"), t + 0.5) == []
    assert step(call, transcript("so the thing is and I really want it back now"), t + 1.0) == []
    assert says(step(call, ReplySentence(ask.turn, "I'll refund it."), t + 1.2)) == [
        "I'll refund it."
    ]


def test_the_agents_own_words_heard_back_are_no_turn_and_no_barge_in() -> None:
    for mode in ("final", "interim"):
        greeting = "Hello, here is how I can help you today."
        call = greeted(replace(LIVE, reply_on=mode, greeting=greeting))  # type: ignore[arg-type]
        step(call, SpeechEvent("e", "t1", "interim", "in", "here is how I can"), 1.5)
        cmds = step(call, transcript("Here is how I can help.", "echo1"), 1.8)
        assert [c.what for c in cmds if isinstance(c, Record)] == [Kind.ECHO], mode
        assert call.turn == 0
        # a caller who says a word or two of ours is still heard
        cmds = step(call, transcript("hello hello", "tr2"), 2.0)
        assert Kind.ECHO not in [c.what for c in cmds if isinstance(c, Record)], mode


@pytest.mark.parametrize("mode", ["final", "interim"])
def test_a_speech_end_delivered_after_its_transcript_changes_nothing(mode: str) -> None:
    # VoIPBIN guarantees no order: speech_ended may come just after the final it ends. The
    # agent's reply, heard back on the caller's side, must still be told from the caller
    def turn(late: bool) -> list[object]:
        call = greeted(replace(LIVE, reply_on=mode, greeting="Hello."))  # type: ignore[arg-type]
        boundary = SpeechEvent("b", "t1", "boundary", "in", "")
        step(call, boundary, 10.0)
        step(call, interim("what are your hours"), 10.6)
        if not late:
            step(call, boundary, 11.75)
        step(call, transcript("What are your hours?"), 11.8)
        out: list[object] = []
        if late:
            out += step(call, boundary, 11.85)
        for t in (12.0, 12.5, 13.0):
            out += step(call, ENDPOINT, t)
        out += step(call, ReplySentence(call.turn, "We are open from nine to five every day."), 13)
        out += step(call, ReplyDone(call.turn), 13.0)
        for t in (13.5, 14.0):
            out += step(call, TimerFired(Timer(TimerKind.HOLD)), t)
        assert says(out) == ["We are open from nine to five every day."]
        # its own words, heard back while the reply plays
        step(call, boundary, 16.0)
        out = step(call, interim("we are open from nine to five"), 16.3)
        out += step(call, transcript("We are open from nine to five.", "tr2"), 16.8)
        assert call.turn == 1
        return out

    assert turn(late=True) == turn(late=False)
    assert [c.what for c in turn(late=True) if isinstance(c, Record)] == [Kind.ECHO]


def test_the_goodbye_before_an_action_is_not_barged_in_on() -> None:
    call = greeted(replace(LIVE, reply_on="final", say_latency_s=0.0))
    step(call, transcript("bye"), 5.0)
    step(call, ReplySentence(1, "Goodbye, have a nice day and take care."), 5.1)
    step(call, ReplyDone(1, action=EndCall()), 5.2)
    cmds = step(call, interim("okay thank you bye"), 6.5)
    cmds += step(call, transcript("okay thank you bye", "tr2"), 7.0)
    assert not any(isinstance(c, Flush | StopSpeaking) for c in cmds)


# -- the backend's own verdict (agent.turn_marker) -------------------------------------------------


class Scripted:
    """A backend that streams `chunks`."""

    def __init__(self, *chunks: str) -> None:
        self.chunks = chunks
        self.asked: list[tuple[Message, ...]] = []

    async def reply(self, call_id: str, history: tuple[Message, ...]) -> AsyncIterator[str]:
        self.asked.append(history)
        for chunk in self.chunks:
            yield chunk


async def replies(backend: Scripted, *, marker: bool) -> list[object]:
    out: list[object] = []
    cmd = AskBackend(CID, 3, (("user", "hi"),), marker=marker)
    await stream_reply(backend, cmd, out.append, clock=lambda: 0.0, timeout_s=5)  # type: ignore[arg-type]
    return out


async def test_an_empty_reply_is_a_failure_the_caller_hears_the_fallback_for() -> None:
    empty = ReplyFailed(3, "empty reply: the backend answered nothing to say")
    assert await replies(Scripted(), marker=False) == [empty]
    assert await replies(Scripted(" ", "\U0001f642", "\n"), marker=False) == [empty]  # an emoji
    assert await replies(Scripted("\u2713"), marker=True) == [empty]  # a marker alone
    call = answered()
    [ask] = asks(step(call, transcript("hello"), 10))
    cmds = step(call, replace(empty, turn=ask.turn), 10.5)
    cmds += step(call, TimerFired(Timer(TimerKind.HOLD)), 11)
    assert says(cmds) == [SETTINGS.fallback_text]
    assert Kind.BACKEND_FAILED in [c.what for c in cmds if isinstance(c, Record)]


async def test_a_runaway_reply_is_cut_at_max_reply_chars() -> None:
    out = await replies(Scripted(*["It is a word. "] * 1000), marker=False)
    said = "".join(o.text + " " for o in out if isinstance(o, ReplySentence))
    assert MAX_REPLY_CHARS - 20 <= len(said) <= MAX_REPLY_CHARS + 1
    assert isinstance(out[-1], ReplyDone)


class Paced(Scripted):
    """A backend that streams its chunks `every_s` apart, then maybe stalls."""

    def __init__(self, *chunks: str, every_s: float, stall_s: float = 0.0) -> None:
        super().__init__(*chunks)
        self.every_s = every_s
        self.stall_s = stall_s

    async def reply(self, call_id: str, history: tuple[Message, ...]) -> AsyncIterator[str]:
        for chunk in self.chunks:
            await asyncio.sleep(self.every_s)
            yield chunk
        await asyncio.sleep(self.stall_s)


async def test_the_backend_timeout_bounds_a_silence_not_a_long_reply() -> None:
    cmd = AskBackend(CID, 3, (("user", "hi"),))
    out: list[object] = []
    # ten pieces 0.05 s apart: half a second in all, with a 0.2 s timeout
    slow = Paced(*[f"Part {n}. " for n in range(10)], every_s=0.05)
    await stream_reply(slow, cmd, out.append, clock=lambda: 0.0, timeout_s=0.2)  # type: ignore[arg-type]
    assert len([o for o in out if isinstance(o, ReplySentence)]) == 10
    assert isinstance(out[-1], ReplyDone)
    out.clear()
    stalled = Paced("It is noon. ", "And", every_s=0.0, stall_s=5.0)
    await stream_reply(stalled, cmd, out.append, clock=lambda: 0.0, timeout_s=0.2)  # type: ignore[arg-type]
    assert out == [ReplySentence(3, "It is noon."), ReplyFailed(3, "backend timed out")]


async def test_a_burst_of_chunks_does_not_move_the_silence_deadline_per_chunk() -> None:
    """A token each: the deadline moves once per 1/32 of the timeout, not once per chunk
    (each move is a timer handle); the slow reply above shows it still moves."""
    async with asyncio.timeout(60.0) as timeout:
        first = timeout.when()
        silence = _Silence(timeout, 60.0)
        for _ in range(500):
            silence.broken()
            await asyncio.sleep(0)  # a chunk a loop step, as a fast stream gives them
        assert timeout.when() == first


async def test_a_reply_marked_unfinished_is_not_spoken() -> None:
    assert await replies(Scripted(" ", "\u25cb"), marker=True) == [ReplyIncomplete(3)]
    assert await replies(Scripted("\u25d0 hmm"), marker=True) == [ReplyIncomplete(3, long=True)]
    out = await replies(Scripted("\u2713 Sure", ". It is ", "ten."), marker=True)
    assert [o.text for o in out if isinstance(o, ReplySentence)] == ["Sure.", "It is ten."]
    # a model that forgets the marker still answers; a marker is never spoken
    out = await replies(Scripted("Sure."), marker=True)
    assert [o.text for o in out if isinstance(o, ReplySentence)] == ["Sure."]
    out = await replies(Scripted("\u2713 Sure."), marker=False)
    assert [o.text for o in out if isinstance(o, ReplySentence)] == ["Sure."]


def test_an_unfinished_caller_gets_more_time_then_an_answer() -> None:
    settings = replace(LIVE, reply_on="final", turn_marker=True)
    assert "\u25cb" in settings.prompt
    call = greeted(settings)
    (ask,) = asks(step(call, transcript("I want to"), 5.0))
    assert ask.marker and ask.history[0][1] == settings.prompt
    cmds = call.handle(ReplyIncomplete(1), 5.5)
    assert says(cmds) == []
    (timer,) = [c for c in cmds if isinstance(c, StartTimer)]
    assert timer.timer.kind is TimerKind.INCOMPLETE and timer.delay_s == 5.0
    # quiet: the backend is told to answer now
    (again,) = asks(step(call, TimerFired(Timer(TimerKind.INCOMPLETE)), 10.5))
    assert again.history[-1] == ("system", TURN_NUDGE) and not again.marker
    assert says(step(call, ReplySentence(again.turn, "What would you like?"), 10.6)) == [
        "What would you like?"
    ]


def test_an_unfinished_caller_who_goes_on_is_answered_for_all_of_it() -> None:
    call = greeted(replace(LIVE, turn_marker=True))
    last = speak(call, "I want to book.", 5.0)
    call.handle(ReplyIncomplete(1), last + 0.4)
    last = speak(call, "a table for two", last + 1.0)
    (ask,) = asks(step(call, ENDPOINT, last + LIVE.speculate_s))
    assert ask.history[-1] == ("user", "I want to book. a table for two")
    assert asks(step(call, TimerFired(Timer(TimerKind.INCOMPLETE)), last + 5.0)) == []


def test_an_end_call_meant_for_fewer_words_is_dropped_with_its_reply() -> None:
    call = greeted()
    last = speak(call, "that is all.", 10.0)
    step(call, ReplySentence(1, "Goodbye!"), last + 0.1)
    step(call, ReplyDone(1, action=EndCall()), last + 0.2)
    step(call, ENDPOINT, last + LIVE.end_of_turn_s)  # said; its audio is a second away
    assert call.after_reply == EndCall()
    cmds = step(call, interim("oh wait"), last + 1.0)  # the caller goes on
    assert Flush(CID, "s1") in cmds
    assert call.after_reply is None
    assert step(call, TimerFired(Timer(TimerKind.AFTER_REPLY)), last + 3.0) == []


def test_speculation_is_capped_per_turn_then_asked_only_at_the_end() -> None:
    call = greeted(replace(LIVE, max_speculative=2))
    t = 10.0
    # each sentence ends like a turn and is asked about at once; the caller goes on each time
    for text in ("I lost my card.", "It was stolen.", "On Monday."):
        t = speak(call, text, t) + 0.4
    assert call.wasted == 2  # two asks dropped; the third sentence was not asked about
    assert call.turn == 2
    (ask,) = asks(step(call, ENDPOINT, t - 0.4 + LIVE.end_of_turn_s))
    assert ask.history[-1] == ("user", "I lost my card. It was stolen. On Monday.")


def test_a_turn_answered_on_interims_before_a_restart_is_not_answered_again_by_its_final() -> None:
    call = greeted()
    audio = answered_question(call, "Ten dollars.")
    restored = Call.restore(call.snapshot(), LIVE)  # SIGKILL before the final came
    restored.resume(audio + 5.0)
    restored.handle(SpeakingStarted("s1", "active"), audio + 5.1)
    # the final, read back over REST after the restart
    read = TranscriptsRead((transcript("What is my balance?"),))
    assert asks(step(restored, read, audio + 6.0)) == []
    # a new question is answered
    speak(restored, "and my savings?", audio + 8.0)
    assert restored.turn == 2


def test_after_a_restart_a_question_like_the_last_one_answered_is_answered() -> None:
    # the last question's final came before the restart (it is among the seen): a new final
    # read back after it, one word apart, is the caller correcting themselves, not that final
    call = greeted()
    audio = answered_question(call, "Ten dollars.")
    step(call, transcript("What is my balance?", "tr1"), audio + 0.5)
    restored = Call.restore(call.snapshot(), LIVE)  # SIGKILL after the final came
    restored.resume(audio + 5.0)
    restored.handle(SpeakingStarted("s1", "active"), audio + 5.1)
    read = TranscriptsRead(
        (transcript("What is my balance?", "tr1"), transcript("What is my savings?", "tr2"))
    )
    (ask,) = asks(step(restored, read, audio + 6.0))
    assert ask.history[-1] == ("user", "What is my savings?")


def restored_final_unanswered() -> tuple[Call, float]:
    """`reply_on = "final"`: the caller's question was asked for on its final and the process
    died before anything of the reply was said. The call restored from its last snapshot while
    the stream is still down, and when it comes back."""
    settings = replace(LIVE, reply_on="final")
    call = greeted(settings)
    step(call, transcript("What is my balance?", "tr1"), 10.0)
    assert call.turns.replying and call.history.msgs[-1].role == "user"
    restored = Call.restore(call.snapshot(), settings)
    cmds = restored.resume(15.0)
    (timer,) = [
        c for c in cmds if isinstance(c, StartTimer) and c.timer.kind is ENDPOINT.timer.kind
    ]
    step(restored, StreamState(False), 15.0)  # no subscription yet
    step(restored, SpeakingStarted("s1", "active"), 15.1)
    step(restored, TranscribeStarted("t1"), 15.1)
    assert asks(step(restored, ENDPOINT, 15.0 + timer.delay_s)) == []  # deaf: not yet
    return restored, 16.0


def test_with_replies_on_finals_a_turn_a_restart_left_unanswered_is_asked_again_once() -> None:
    call, back = restored_final_unanswered()
    cmds = step(call, StreamState(True), back)
    assert FetchTranscripts(CID, "t1") in cmds  # its final was handled: nothing new read back
    cmds = step(call, TranscriptsRead((transcript("What is my balance?", "tr1"),)), back + 0.2)
    (ask,) = asks(cmds)
    assert ask.history[-1] == ("user", "What is my balance?")
    assert [m.role for m in call.history.msgs].count("user") == 1  # the words once
    # said at once: the caller's turn ended before the restart
    assert says(step(call, ReplySentence(call.turns.turn, "Ten dollars."), back + 0.5)) == [
        "Ten dollars."
    ]
    assert asks(step(call, ENDPOINT, back + LIVE.final_wait_s)) == []  # once


def test_with_replies_on_finals_a_final_read_back_after_a_restart_joins_the_unanswered_turn() -> (
    None
):
    call, back = restored_final_unanswered()
    step(call, StreamState(True), back)
    read = (transcript("What is my balance?", "tr1"), transcript("And my savings?", "tr2"))
    (ask,) = asks(step(call, TranscriptsRead(read), back + 0.2))
    assert ask.history[-1] == ("user", "What is my balance? And my savings?")
    assert asks(step(call, ENDPOINT, back + LIVE.final_wait_s)) == []


def test_with_replies_on_finals_a_read_back_that_never_comes_costs_the_wait() -> None:
    call, back = restored_final_unanswered()
    cmds = step(call, StreamState(True), back)
    (timer,) = [
        c for c in cmds if isinstance(c, StartTimer) and c.timer.kind is ENDPOINT.timer.kind
    ]
    assert timer.delay_s == pytest.approx(LIVE.final_wait_s)
    (ask,) = asks(step(call, ENDPOINT, back + timer.delay_s))
    assert ask.history[-1] == ("user", "What is my balance?")


def restored_unanswered(said: list[str]) -> tuple[Call, float]:
    """The caller says `said`, one utterance each, their finals lost but for the first's when
    there are two; the turn is asked for on the interims and the process dies before anything
    of the reply is said. Returns the call restored from its last snapshot, the read-back due."""
    call = greeted()
    t = 10.0
    for i, text in enumerate(said):
        t = speak(call, text, t) + 0.4
        if i == 0 and len(said) > 1:
            step(call, transcript(text, "tr1"), t)
    assert call.history.msgs[-1].role == "user"  # asked, not answered
    restored = Call.restore(call.snapshot(), LIVE)
    restored.resume(t + 5.0)
    restored.handle(SpeakingStarted("s1", "active"), t + 5.1)
    return restored, t + 6.0


@pytest.mark.parametrize(
    ("held", "start", "final", "expected"),
    [
        (
            "Second question. And a detail.",
            0,
            "And a detail.",
            ("Second question. And a detail.", -1),
        ),
        (
            "Second question. and a detail",
            0,
            "And a detail.",
            ("Second question. And a detail.", -1),
        ),
        ("Second question. And a", 0, "And a detail.", ("Second question. And a detail.", -1)),
        ("I lost my card.", 0, "I lost my card on Monday.", ("I lost my card on Monday.", -1)),
        ("I lost it. It was", 0, "was stolen.", ("I lost it. It was stolen.", -1)),
        ("I lost it. It was stolen.", 0, "I lost it.", ("I lost it. It was stolen.", 3)),
        ("I lost it. It was stolen.", 3, "It was stolen.", ("I lost it. It was stolen.", -1)),
        (
            "It is for two people",
            0,
            "for three people please",
            ("It is for three people please", -1),
        ),
        ("I lost my card.", 0, "Where is the bank?", None),
        ("I lost it. It was stolen.", 3, "I lost it.", None),
    ],
)
def test_a_final_is_set_into_the_words_it_repeats(
    held: str, start: int, final: str, expected: tuple[str, int] | None
) -> None:
    assert rejoin(held, start, final) == expected


def test_a_turn_asked_on_interims_before_a_restart_takes_its_final_once() -> None:
    call, t = restored_unanswered(["what is my balance?"])
    (ask,) = asks(step(call, transcript("What is my balance?"), t))
    assert ask.history[-1] == ("user", "What is my balance?")
    assert call.turn == 2  # the restored turn, answered now


def test_a_final_after_a_restart_that_extends_the_interims_adds_only_its_new_words() -> None:
    call, t = restored_unanswered(["I lost my card."])
    (ask,) = asks(step(call, transcript("I lost my card on Monday."), t))
    assert ask.history[-1] == ("user", "I lost my card on Monday.")
    # the interims' end and the words after them, their first final already answered
    call, t = restored_unanswered(["I lost my card.", "It was stolen."])
    assert asks(step(call, transcript("I lost my card.", "tr1"), t)) == []  # seen
    (ask,) = asks(step(call, transcript("stolen on Monday.", "tr2"), t + 0.1))
    assert ask.history[-1] == ("user", "I lost my card. It was stolen on Monday.")


def test_finals_of_a_split_utterance_after_a_restart_are_not_added_again() -> None:
    call, t = restored_unanswered(["I lost my card.", "It was stolen."])
    # the first final was seen before the restart, but the history cannot say which words
    # it brought: the read-back sends it again and then the lost one
    (ask,) = asks(step(call, transcript("It was stolen.", "tr2"), t))
    assert ask.history[-1] == ("user", "I lost my card. It was stolen.")
    call, t = restored_unanswered(["I lost my card.", "It was stolen.", "On Monday."])
    cmds = step(call, transcript("It was stolen.", "tr2"), t)
    cmds += step(call, transcript("On Monday.", "tr3"), t + 0.1)
    assert [a.history[-1] for a in asks(cmds)] == [
        ("user", "I lost my card. It was stolen. On Monday.")
    ]


def test_the_final_of_a_restored_turn_read_back_after_its_reply_was_heard_is_absorbed() -> None:
    call, t = restored_unanswered(["what is my balance?"])
    # the caller goes on before the read-back: the turn is asked for all of it and answered
    last = speak(call, "and my savings?", t)
    step(call, ReplySentence(2, "Ten and twenty dollars."), last + 0.1)
    step(call, ENDPOINT, last + 0.36)
    audio = last + 0.36 + LIVE.say_latency_s
    assert call.history.window(9)[-2] == ("user", "what is my balance? and my savings?")
    cmds = step(call, transcript("What is my balance?"), audio + 0.5)
    cmds += step(call, transcript("And my savings?", "tr2"), audio + 0.6)
    assert asks(cmds) == [] and call.turn == 2


def test_a_new_final_after_a_restart_joins_the_unanswered_turn() -> None:
    call, t = restored_unanswered(["what is my balance?"])
    (ask,) = asks(step(call, transcript("And my savings?", "tr2"), t))
    assert ask.history[-1] == ("user", "what is my balance? And my savings?")


def test_an_old_snapshot_with_an_unanswered_turn_restores_and_takes_its_final_once() -> None:
    snap = {
        "call_id": CID,
        "direction": "incoming",
        "phase": "active",
        "status": "progressing",
        "transcribe_id": "t1",
        "speaking_id": "s1",
        "pending_stops": [],
        "greeted": True,
        "turn": 4,
        "history": [
            ("user", "first question 1"),
            ("assistant", "You said: first question 1."),
            ("user", "second question 1. And a detail."),
        ],
        "hangup_reason": "",
        "seen_transcripts": ["f1", "f2"],
    }
    call = Call.restore(snap, LIVE)
    call.resume(100.0)
    call.handle(SpeakingStarted("s1", "active"), 100.0)
    cmds: list[object] = []
    for tid, text in (
        ("f1", "first question 1"),
        ("f2", "second question 1."),
        ("f3", "And a detail."),
    ):
        cmds += step(call, transcript(text, tid), 100.5)
    (ask,) = asks(cmds)
    assert (ask.turn, ask.history[-1]) == (5, ("user", "second question 1. And a detail."))


def test_words_after_a_goodbye_that_was_heard_are_not_answered() -> None:
    for mode in ("final", "interim"):
        call = greeted(replace(LIVE, reply_on=mode))  # type: ignore[arg-type]
        last = speak(call, "that is all, bye.", 10.0)
        step(call, transcript("That is all, bye."), last + 1.0)
        turn = call.turn
        step(call, ReplySentence(turn, "Goodbye!"), last + 1.1)
        step(call, ReplyDone(turn, action=EndCall()), last + 1.2)
        step(call, ENDPOINT, last + 1.6)
        step(call, TimerFired(Timer(TimerKind.HOLD)), last + 1.6)
        heard_at = last + 4.0  # the goodbye has played; the hang-up is a moment away
        cmds = step(call, interim("bye bye"), heard_at)
        cmds += step(call, transcript("Bye bye.", "tr2"), heard_at + 0.5)
        assert asks(cmds) == [] and says(cmds) == [], mode
        assert call.turn == turn, mode


@pytest.mark.parametrize("second_first", [False, True])
def test_a_split_sentences_finals_in_either_order_make_it_up_once(second_first: bool) -> None:
    """Two utterances standing on interims; their finals come in no order (two topics)."""
    h = Hearing()
    for t, text in enumerate(["i want", "i want to book a table", "for", "for two people"]):
        h.on_interim(text, t * 0.1)
    finals = ["I want to book a table.", "For two people."]
    for k, text in enumerate(reversed(finals) if second_first else finals):
        h.on_final(text, 1.0 + k * 0.1)
    assert h.text() == "I want to book a table. For two people."
    assert h.unconfirmed() == ""


def test_finals_in_order_fill_their_own_utterances_when_both_begin_with_i() -> None:
    """An interim that missed its first word, then the next utterance's: each final finds its
    own, though "I" begins the final of one and the interim of the other."""
    h = Hearing()
    for t, text in enumerate(["want to book", "want to book a table", "i also", "i also need"]):
        h.on_interim(text, t * 0.1)
    h.on_final("I want to book a table.", 1.0)
    h.on_final("I also need parking.", 1.1)
    assert h.text() == "I want to book a table. I also need parking."
