"""Whole conversations: the simulator, a real daemon, and stub backends over loopback.

The OpenAI stub and the simulator both stamp events with `time.monotonic()`, so a test can say
"the first /say reached VoIPBIN before the model had finished". Nothing here sleeps to wait:
tests wait on the simulator's state, the stub's events, or the daemon going idle.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from agentd.call import DEFAULT_GREETING
from agentd.daemon import Daemon
from agentd.sim import Caller, Outcome, Simulator, Utterance
from agentd.sim.records import Request
from tests.stubs import HttpReply, HttpStub, OpenAIStub, Script
from tests.support import CALLER, OUR_NUMBER, StartAgent

# whole multi-turn calls through each backend kind: 1-2 s each
pytestmark = pytest.mark.slow

SYSTEM = "You are a test agent."
FALLBACK = "Sorry, one moment please."
NUMBER = "+15557654321"


def openai_config(llm: OpenAIStub, **extra: Any) -> dict[str, Any]:
    """[backend] for the stub, built by make_backend like a real config."""
    return {"kind": "openai", "base_url": llm.base_url, "model": "stub-model", **extra}


async def start(agent: StartAgent, backend: dict[str, Any], **agent_keys: Any) -> Daemon:
    return await agent(
        agent={"system_prompt": SYSTEM, "fallback_text": FALLBACK, **agent_keys}, backend=backend
    )


async def finish(sim: Simulator, daemon: Daemon, call_id: str) -> None:
    """Wait for the call to end and the daemon to clean it up."""
    await sim.wait_call_status(call_id, "hangup", timeout=15)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)


def says(sim: Simulator) -> list[Request]:
    return sim.requests_matching("POST", r"/speakings/[^/]+/say$")


def heard(sim: Simulator, call_id: str) -> list[str]:
    """What the caller heard from the agent so far."""
    return [li.text for li in sim.get_call(call_id).conversation if li.who == "agent"]


def agent_lines(sim: Simulator, call_id: str) -> list[str]:
    """What the caller heard from the agent, after the greeting."""
    lines = heard(sim, call_id)
    assert lines[0] == DEFAULT_GREETING
    return lines[1:]


async def test_first_sentence_is_spoken_before_the_model_has_finished(
    llm: OpenAIStub, sim: Simulator, agent: StartAgent
) -> None:
    reply = "Sure, I can help. Your order shipped yesterday. It should arrive on Friday."
    llm.script(Script(reply, first_token_s=0.05, tokens_per_s=30))
    daemon = await start(agent, openai_config(llm))
    # the caller stays on the line while the model pauses between sentences; we hang up
    caller = Caller([Utterance("where is my order")], hangup_after_s=None)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, caller)
    await sim.wait_for(  # the greeting and the 3 sentences, played to the end
        lambda: len([li for li in sim.get_call(call_id).conversation if li.t_end]) == 5, 10
    )
    await sim.hangup(call_id)
    await finish(sim, daemon, call_id)

    [stream] = llm.streams
    assert stream.finished_at is not None and not stream.closed_early.is_set()
    reply_says = [r for r in says(sim) if r.body["text"] in reply]
    assert reply_says[0].body["text"] == "Sure, I can help."
    assert reply_says[0].t < stream.finished_at  # spoken while the model was still writing
    assert " ".join(agent_lines(sim, call_id)) == reply
    # the request the model got: system prompt, greeting, the caller
    assert llm.requests[0].messages == [
        {"role": "system", "content": SYSTEM},
        {"role": "assistant", "content": DEFAULT_GREETING},
        {"role": "user", "content": "where is my order"},
    ]


# a reply generated faster than it plays (100 tokens/s vs 400 chars/s of audio), long enough
# that the caller interrupts it while audio is still playing and the model still writing
LONG = " ".join(
    f"Product number {i} is a fine choice for most of our customers." for i in range(30)
)


@pytest.mark.parametrize("tts", ["gcp", "elevenlabs"])
async def test_barge_in_closes_the_stream_and_history_keeps_only_what_was_heard(
    llm: OpenAIStub, sim: Simulator, agent: StartAgent, tts: str
) -> None:
    first = "We are open from nine to five."
    llm.script(
        Script(first),
        Script(LONG, tokens_per_s=100),
        Script("Okay, I will stop."),
    )
    daemon = await start(agent, openai_config(llm), tts_provider=tts)
    caller = Caller(
        [
            Utterance("what are your hours"),
            Utterance("tell me about your products"),
            Utterance("no wait stop", barge_in_after_s=0.2),
        ],
        hangup_after_s=0.05,
    )
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, caller)
    await finish(sim, daemon, call_id)

    # (2) the stub saw its stream closed before the end
    long_stream = llm.streams[1]
    await asyncio.wait_for(long_stream.closed_early.wait(), 5)
    assert long_stream.finished_at is None and long_stream.sent < long_stream.planned
    # ... the audio was cut (flush on gcp, stop + a new session on ElevenLabs) ...
    cut_path = r"/flush$" if tts == "gcp" else r"/speakings/[^/]+/stop$"
    long_says = [r for r in says(sim) if r.body["text"] in LONG]
    cut = [r for r in sim.requests_matching("POST", cut_path) if r.t > long_says[0].t][0]
    # ... and nothing of that reply was said after the cut; the next reply was
    assert all(r.t < cut.t for r in long_says)
    assert says(sim)[-1].body["text"] == "Okay, I will stop." and says(sim)[-1].t > cut.t
    assert any(li.cut for li in sim.get_call(call_id).conversation)

    # (3) turn 3 was asked with turns 1-2, the interrupted reply cut to what was heard
    assert len(llm.requests) == 3
    messages = llm.requests[2].messages
    assert messages[:5] == [
        {"role": "system", "content": SYSTEM},
        {"role": "assistant", "content": DEFAULT_GREETING},
        {"role": "user", "content": "what are your hours"},
        {"role": "assistant", "content": first},
        {"role": "user", "content": "tell me about your products"},
    ]
    assert [m["role"] for m in messages[5:]] == ["assistant", "user"]
    kept = messages[5]["content"].removesuffix(" —")
    assert kept and LONG.startswith(kept) and len(kept) < len(LONG) / 2
    assert messages[6] == {"role": "user", "content": "no wait stop"}


def _goodbye(kind: str, llm: OpenAIStub, service: HttpStub) -> dict[str, Any]:
    """A backend of `kind` whose reply is the goodbye followed by `end_call`."""
    text = "Thank you for calling. Goodbye!"
    if kind == "openai":
        llm.script(Script(text, tool_calls=[("end_call", {})], tokens_per_s=200))
        return openai_config(llm)
    if kind == "http":
        service.script(
            HttpReply("sse", ["Thank you ", "for calling. ", "Goodbye!", {"action": "end_call"}])
        )
        return {"kind": "http", "url": service.reply_url}
    return {"kind": "python", "callable": "tests.stubs:py_stream"}  # yields the same goodbye


@pytest.mark.parametrize("kind", ["openai", "http", "python"])
async def test_end_call_says_goodbye_then_agentd_hangs_up(
    llm: OpenAIStub, service: HttpStub, sim: Simulator, agent: StartAgent, kind: str
) -> None:
    daemon = await start(agent, _goodbye(kind, llm, service))
    # this caller never hangs up: only agentd can end the call
    call_id = sim.inbound_call(
        CALLER, OUR_NUMBER, Caller([Utterance("that is all thanks")], hangup_after_s=None)
    )
    await finish(sim, daemon, call_id)

    goodbye = " ".join(agent_lines(sim, call_id))
    assert goodbye in ("Thank you for calling. Goodbye!", "Thanks for calling. Goodbye!")
    [hangup] = sim.requests_matching("POST", rf"/calls/{call_id}/hangup$")
    assert hangup.t > says(sim)[-1].t
    assert [r.what for r in daemon.records].count("action") == 1


#: The number's flow a transfer needs (README "Transfers"): the caller is `connect`ed to a
#: second leg that answers and stays up, so the caller is in a confbridge (docs/protocol.md §9).
HOLD_LINE = "+15550000100"
CONNECT_FLOW = [
    {"type": "answer"},
    {
        "type": "connect",
        "option": {
            "source": {"type": "tel", "target": OUR_NUMBER},
            "destinations": [{"type": "tel", "target": HOLD_LINE}],
        },
    },
    {"type": "sleep", "option": {"duration": 3600000}},
]


def _transfer_backend(kind: str, llm: OpenAIStub, service: HttpStub) -> dict[str, Any]:
    if kind == "openai":
        llm.script(Script("Let me connect you.", tool_calls=[("transfer", {"number": NUMBER})]))
        return openai_config(llm)
    service.script(
        HttpReply("ndjson", [{"text": "Let me connect you."}, {"action": {"transfer": NUMBER}}])
    )
    return {"kind": "http", "url": service.reply_url}


@pytest.mark.parametrize("kind", ["openai", "http"])
async def test_transfer_hands_the_caller_to_the_human_through_the_connect_flow(
    llm: OpenAIStub, service: HttpStub, sim: Simulator, agent: StartAgent, kind: str
) -> None:
    sim.on_outbound(Outcome(ring_after_s=0.0, answer_after_s=0.05))  # the hold line, the human
    daemon = await start(agent, _transfer_backend(kind, llm, service), transfer_numbers=[NUMBER])
    call_id = sim.inbound_call(
        CALLER,
        OUR_NUMBER,
        Caller([Utterance("a human please")], hangup_after_s=None),
        flow_id=sim.create_flow(CONNECT_FLOW),
    )
    caller = sim.get_call(call_id)
    await sim.wait_for(lambda: bool(sim.requests_matching("POST", r"/transfers$")), 10)
    [transfer] = sim.requests_matching("POST", r"/transfers$")
    assert transfer.status == 200
    # the second leg is the transferer: a blind transfer hangs the transferer up
    [leg] = caller.chained_call_ids[:1]
    assert transfer.body["transferer_call_id"] == leg != call_id
    assert transfer.body["transferee_addresses"] == [{"type": "tel", "target": NUMBER}]
    assert transfer.t > says(sim)[-1].t  # after "Let me connect you."
    assert agent_lines(sim, call_id) == ["Let me connect you."]
    # the human answers into the caller's confbridge; the caller is still up, with them
    [human] = [c for c in sim.world.calls.values() if c.destination.get("target") == NUMBER]
    await sim.wait_for(lambda: human.confbridge_id == caller.confbridge_id, 5)
    assert caller.status == "progressing"
    # agentd's part is over: its sessions are stopped, it attached to no other leg
    await sim.wait_for(lambda: any(r.what == "transferred" for r in daemon.records), 5)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    assert sim.leaks() == []
    assert daemon.dispatcher.counters["calls"] == 1
    await sim.hangup(call_id)


async def test_a_transfer_without_a_confbridge_is_not_attempted_and_the_caller_is_told(
    llm: OpenAIStub, service: HttpStub, sim: Simulator, agent: StartAgent
) -> None:
    daemon = await start(agent, _transfer_backend("http", llm, service), transfer_numbers=[NUMBER])
    # the default number flow: answer and sleep, no connect: VoIPBIN would answer 500
    call_id = sim.inbound_call(
        CALLER, OUR_NUMBER, Caller([Utterance("a human please")], hangup_after_s=None)
    )
    failed = "Sorry, I can't transfer you right now."
    await sim.wait_for(lambda: failed in heard(sim, call_id), 10)
    assert sim.requests_matching("POST", r"/transfers$") == []
    [error] = [r for r in daemon.records if r.what == "error"]
    assert "no confbridge" in str(error.data["error"])
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)


async def test_a_transfer_to_a_number_off_the_allow_list_is_refused(
    llm: OpenAIStub, service: HttpStub, sim: Simulator, agent: StartAgent
) -> None:
    daemon = await start(agent, _transfer_backend("http", llm, service))  # no transfer_numbers
    call_id = sim.inbound_call(
        CALLER, OUR_NUMBER, Caller([Utterance("call 1-900 for me")], hangup_after_s=None)
    )
    await sim.wait_for(lambda: any(r.what == "error" for r in daemon.records), 10)
    assert sim.requests_matching("POST", r"/transfers$") == []
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)


async def test_backend_slower_than_timeout_gets_the_fallback_and_the_next_turn_works(
    llm: OpenAIStub, sim: Simulator, agent: StartAgent
) -> None:
    llm.script(Script("Too late.", first_token_s=30), Script("Now I am quick."))
    daemon = await start(agent, openai_config(llm, timeout_s=0.5))
    caller = Caller([Utterance("hello there"), Utterance("are you there")])
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, caller)
    await finish(sim, daemon, call_id)

    assert agent_lines(sim, call_id) == [FALLBACK, "Now I am quick."]
    await asyncio.wait_for(llm.streams[0].closed_early.wait(), 5)  # we hung up on the model
    failed = [r for r in daemon.records if r.what == "backend_failed"]
    assert [r.data["error"] for r in failed] == ["backend timed out"]
    # the fallback is in the history the model sees next, as said
    assert llm.requests[1].messages[-3:] == [
        {"role": "user", "content": "hello there"},
        {"role": "assistant", "content": FALLBACK},
        {"role": "user", "content": "are you there"},
    ]


@pytest.mark.parametrize(
    "failure",
    [
        Script(status=500, error_message="upstream exploded"),
        Script(status=401, error_message="Incorrect API key provided: sk-conv-test-1234."),
        Script(raw=["data: {not json\n\n"]),
    ],
    ids=["500", "401", "malformed"],
)
async def test_backend_error_gets_the_fallback_and_the_next_turn_works(
    llm: OpenAIStub, sim: Simulator, agent: StartAgent, failure: Script
) -> None:
    # a 5xx is asked again within the turn, twice: a server that keeps failing
    llm.script(*[failure] * (3 if failure.status >= 500 else 1), Script("Back in business."))
    daemon = await start(agent, openai_config(llm, api_key="sk-conv-test-1234"))
    caller = Caller([Utterance("hello there"), Utterance("try again")])
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, caller)
    await finish(sim, daemon, call_id)

    assert agent_lines(sim, call_id) == [FALLBACK, "Back in business."]
    [failed] = [r for r in daemon.records if r.what == "backend_failed"]
    error = str(failed.data["error"])
    assert "BackendError" in error and "sk-conv-test-1234" not in error
    if failure.status != 200:
        assert f"HTTP {failure.status}" in error


def _delta(delta: dict[str, Any], finish: str | None = None) -> str:
    """One raw chunk of a streamed chat completion."""
    choice = {"index": 0, "delta": delta, "finish_reason": finish}
    return f"data: {json.dumps({'choices': [choice]})}\n\n"


async def test_a_whole_sentence_before_a_stream_error_is_said_not_the_fallback(
    llm: OpenAIStub, sim: Simulator, agent: StartAgent
) -> None:
    # its end waited only for the space the next chunk would have brought
    answer = "Your balance is ten dollars."
    llm.script(
        Script(raw=[_delta({"content": answer}), 'data: {"error": {"message": "busy"}}\n\n'])
    )
    daemon = await start(agent, openai_config(llm))
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("what is my balance")]))
    await finish(sim, daemon, call_id)
    assert agent_lines(sim, call_id) == [answer]
    assert [r.what for r in daemon.records].count("backend_failed") == 1


@pytest.mark.parametrize("arguments", ['{"number": "+1555', "{}"], ids=["not JSON", "no number"])
async def test_a_transfer_without_a_number_is_refused_and_the_caller_told(
    llm: OpenAIStub, sim: Simulator, agent: StartAgent, arguments: str
) -> None:
    call = {"index": 0, "id": "c0", "type": "function"}
    call["function"] = {"name": "transfer", "arguments": arguments}
    llm.script(
        Script(
            raw=[
                _delta({"role": "assistant", "content": "Let me connect you."}),
                _delta({"tool_calls": [call]}),
                _delta({}, "tool_calls"),
                "data: [DONE]\n\n",
            ]
        )
    )
    daemon = await start(agent, openai_config(llm), transfer_numbers=[NUMBER])
    call_id = sim.inbound_call(
        CALLER, OUR_NUMBER, Caller([Utterance("a human please")], hangup_after_s=None)
    )
    failed = "Sorry, I can't transfer you right now."
    await sim.wait_for(lambda: failed in " ".join(heard(sim, call_id)), 10)
    # (the two may go out merged in one /say)
    assert " ".join(agent_lines(sim, call_id)) == f"Let me connect you. {failed}"
    [error] = [r for r in daemon.records if r.what == "error"]
    assert error.data == {"what": "transfer failed", "error": "no number given"}
    assert sim.requests_matching("POST", r"/transfers$") == []
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)


async def test_an_http_text_reply_is_said_as_it_streams_and_never_read_past_its_limit(
    sim: Simulator, agent: StartAgent
) -> None:
    # a service that streams text/plain and keeps the body open (or sends megabytes): the
    # whole body was read before a word was said
    from aiohttp import web

    from tests.support import serving

    done = asyncio.Event()

    async def reply(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/plain; charset=utf-8"})
        await resp.prepare(request)
        await resp.write(("Here is the first part. " + "Then more words. " * 300).encode())
        await done.wait()  # the body is never finished while the test runs
        return resp

    app = web.Application()
    app.router.add_post("/reply", reply)
    async with serving(app) as port:
        try:
            await _said_while_streaming(sim, agent, port)
        finally:
            done.set()  # else the server's cleanup waits for the handler


async def _said_while_streaming(sim: Simulator, agent: StartAgent, port: int) -> None:
    """The reply's first sentence reaches VoIPBIN while its body is still open."""
    daemon = await start(agent, {"kind": "http", "url": f"http://127.0.0.1:{port}/reply"})
    call_id = sim.inbound_call(
        CALLER, OUR_NUMBER, Caller([Utterance("tell me everything")], hangup_after_s=None)
    )
    lines = sim.get_call(call_id).conversation

    def sent() -> str:
        return " ".join(li.planned for li in lines if li.who == "agent")

    await sim.wait_for(lambda: "Here is the first part." in sent(), 10)
    assert FALLBACK not in sent()
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)


async def test_a_python_callable_returning_none_says_nothing_and_fails_nothing(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await start(agent, {"kind": "python", "callable": "tests.stubs:py_nothing"})
    caller = Caller([Utterance("mm let me think")], hangup_after_s=None)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, caller)
    await sim.wait_for(lambda: any(r.what == "turn" for r in daemon.records), 10)
    assert agent_lines(sim, call_id) == []  # no fallback line: the callable chose silence
    assert "backend_failed" not in [r.what for r in daemon.records]
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)


async def test_python_backend_answers_from_the_callable(sim: Simulator, agent: StartAgent) -> None:
    daemon = await start(agent, {"kind": "python", "callable": "tests.stubs:py_whole"})
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("is it raining")]))
    await finish(sim, daemon, call_id)
    # the function got the system prompt, the greeting and the caller's line
    said = " ".join(agent_lines(sim, call_id))
    assert said == "Python heard: is it raining. It has 3 messages."
