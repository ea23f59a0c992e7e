"""`reply_on = "interim"` end to end: the simulator's STT timing, a real daemon, over loopback.

The simulator runs at a quarter of VoIPBIN's timing (final transcripts 0.28 s after the words,
audio 0.25 s after /say) and agentd is told the same quarter of its defaults, so what is shown
here is the real behaviour, four times faster. Nothing sleeps: tests wait on the simulator.
"""

from __future__ import annotations

import asyncio

import pytest

from agentd.daemon import Daemon
from agentd.sim import Caller, SimSettings, Simulator, Utterance
from agentd.sim.model import Line
from tests.stubs import OpenAIStub, Script
from tests.support import OUR_NUMBER, StartAgent

pytestmark = pytest.mark.slow

SCALE = 0.25
ECHO = "You said: "
INTERIM = {
    "reply_on": "interim",
    "tts_provider": "gcp",
    "chars_per_s": 60.0,
    "say_latency_s": 1.0 * SCALE,
    "final_hold_s": 0.5 * SCALE,
    "final_wait_s": 1.6 * SCALE,
    "end_of_turn_s": 0.6 * SCALE,
    "speculate_s": 0.35 * SCALE,
    "echo_guard_s": 1.0 * SCALE,
}


@pytest.fixture
def sim_settings() -> SimSettings:
    return SimSettings(
        playback_chars_per_s=60.0,
        playback_cjk_chars_per_s=24.0,
        speech_words_per_s=3.0 / SCALE,
    ).scaled(SCALE)


def echo(text: str) -> str:
    """What the echo backend answers to `text`."""
    return f"{ECHO}{text.rstrip('.?!')}."


def heard(sim: Simulator, call_id: str) -> list[Line]:
    """The agent's lines the caller heard (some audio of), after the greeting."""
    return [li for li in sim.get_call(call_id).conversation if li.who == "agent"][1:]


def caller_lines(sim: Simulator, call_id: str) -> list[Line]:
    return [li for li in sim.get_call(call_id).conversation if li.who == "caller"]


async def talk(sim: Simulator, daemon: Daemon, *utterances: Utterance) -> str:
    """A call that says `utterances` and hangs up once the agent has answered the last."""
    call_id = sim.inbound_call(destination=OUR_NUMBER, caller=Caller(list(utterances)))
    await sim.wait_call_status(call_id, "hangup", timeout=30)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    return call_id


async def test_a_question_is_answered_before_its_final_transcript(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent(agent=INTERIM)
    call_id = await talk(sim, daemon, Utterance("what is my balance?"))
    [reply] = heard(sim, call_id)
    assert reply.planned == echo("what is my balance?")
    [said] = caller_lines(sim, call_id)
    assert said.t_end is not None
    say = sim.requests_matching("POST", r"/say$")[1]  # after the greeting
    # the reply went out before VoIPBIN had the final transcript
    assert say.t < said.t_end + sim.world.settings.stt_final_delay_s
    # and its audio started less than the final delay + the TTS latency after the words
    assert reply.t_start - said.t_end < (1.14 + 1.0) * SCALE


async def test_a_sentence_split_in_two_finals_gets_one_reply(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent(agent=INTERIM)
    call_id = await talk(sim, daemon, Utterance("I need to change my booking. It is for tomorrow."))
    assert [li.planned for li in heard(sim, call_id)] == [
        echo("I need to change my booking. It is for tomorrow.")
    ]


LONG_QUESTION = "tell me about your opening hours today and tomorrow please"


@pytest.mark.parametrize(
    ("said", "settled"),
    [
        ("um I want to cancel my order", "I want to cancel my order."),  # a filler dropped
        ("yeah that is right", "Yes, that is right."),  # punctuation, "yeah" as "yes"
        ("what is my balance", "What is my balance please?"),  # a "please" the interims missed
        ("예약 을 변경 하고 싶어요", "예약을 변경하고 싶어요."),  # Korean re-spaced
    ],
)
async def test_a_final_that_only_writes_the_interims_otherwise_is_one_turn(
    sim: Simulator, agent: StartAgent, said: str, settled: str
) -> None:
    # the interims show `said` word by word; the final reads `settled`, the same words: the
    # reply asked on the interims stands, never cut nor glued to a second version
    daemon = await agent(agent=INTERIM)
    call_id = await talk(sim, daemon, Utterance(said, settled_as=settled))
    assert [li.planned for li in heard(sim, call_id)] == [echo(said)]
    assert sim.requests_matching("POST", r"/flush$") == []  # gcp: a cut would flush


@pytest.mark.parametrize(
    ("said", "settled"),
    [
        ("please cancel my order", "Please don't cancel my order."),  # a word added
        ("what is my balance", "What is my savings balance?"),  # a word the interims missed
        ("予約を替えたいんですか", "予約を変えたいんですか。"),  # one letter revised
    ],
)
async def test_a_final_that_changes_the_interims_words_is_answered_for_its_own(
    sim: Simulator, agent: StartAgent, said: str, settled: str
) -> None:
    # the reply asked on the interims is dropped; the caller's turn is answered once, for the
    # final's words alone (not glued to the interims')
    daemon = await agent(agent=INTERIM)
    call_id = await talk(sim, daemon, Utterance(said, settled_as=settled))
    [reply] = [li.planned for li in heard(sim, call_id)]  # the first was dropped unheard
    assert reply in (echo(settled), echo(settled.rstrip("。")))


async def test_backchannels_while_the_agent_talks_cut_nothing_and_get_no_reply(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent(agent=INTERIM)
    call_id = await talk(
        sim,
        daemon,
        Utterance(LONG_QUESTION),
        Utterance("mm-hmm", backchannel_after_s=0.5),
        Utterance("thanks"),
    )
    lines = heard(sim, call_id)
    assert [li.planned for li in lines] == [
        echo(LONG_QUESTION),
        echo("thanks"),
    ]
    assert not any(li.cut for li in lines)


async def test_a_real_interruption_cuts_the_agent_and_is_answered(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent(agent=INTERIM)
    call_id = await talk(
        sim,
        daemon,
        Utterance(LONG_QUESTION),
        Utterance("wait I meant the other shop", barge_in_after_s=0.6),
    )
    first, second = heard(sim, call_id)
    assert first.cut
    assert second.planned == echo("wait I meant the other shop")


async def test_a_korean_question_is_answered_once(sim: Simulator, agent: StartAgent) -> None:
    daemon = await agent(agent={**INTERIM, "language": "ko-KR", "greeting": "안녕하세요."})
    call_id = await talk(sim, daemon, Utterance("잔액이 얼마인가요?"))
    assert [li.planned for li in heard(sim, call_id)] == [echo("잔액이 얼마인가요?")]


async def test_a_japanese_turn_that_goes_on_is_answered_once_for_all_of_it(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent(agent={**INTERIM, "language": "ja-JP", "greeting": "こんにちは。"})
    call_id = await talk(
        sim,
        daemon,
        Utterance("カードをなくして"),  # "I lost my card and": て leaves it open
        Utterance("再発行したいです。", pause_s=0.6 * SCALE * 3, wait_for_agent=False),
    )
    assert [li.planned for li in heard(sim, call_id)] == [
        f"{ECHO}カードをなくして 再発行したいです."
    ]


async def test_a_slow_backend_gets_a_filler_first(
    sim: Simulator, agent: StartAgent, llm: OpenAIStub
) -> None:
    llm.script(Script("Your balance is ten dollars.", first_token_s=1.0))
    backend = {"kind": "openai", "base_url": llm.base_url, "model": "m"}
    daemon = await agent(agent={**INTERIM, "filler_after_s": 0.1}, backend=backend)
    caller = Caller([Utterance("what is my balance?")], hangup_after_s=None)
    call_id = sim.inbound_call(destination=OUR_NUMBER, caller=caller)
    await sim.wait_for(lambda: len(heard(sim, call_id)) == 2, 10)
    assert [li.planned for li in heard(sim, call_id)] == [
        "One moment.",
        "Your balance is ten dollars.",
    ]
    assert any(r.what == "filler" for r in daemon.records)
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)


@pytest.mark.parametrize("provider", ["gcp", "elevenlabs"])
async def test_words_said_on_picking_up_are_answered_after_the_whole_greeting(
    sim: Simulator, agent: StartAgent, provider: str
) -> None:
    # the caller talks first (as a callee picking up does); the greeting was cut before its
    # audio started and never heard
    daemon = await agent(agent={**INTERIM, "tts_provider": provider})
    first = Utterance("Hello, who is this?", wait_for_agent=False, pause_s=0.0)
    call_id = await talk(sim, daemon, first)
    said = [li for li in sim.get_call(call_id).conversation if li.who == "agent"]
    greeting = daemon.config.call.greeting
    assert [(li.text, li.cut) for li in said] == [
        (greeting, False),
        (echo("Hello, who is this?"), False),
    ]
    assert caller_lines(sim, call_id)[0].t_start < said[0].t_start  # it did talk first
