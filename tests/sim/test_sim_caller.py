"""The scripted caller: speech events, transcripts, turn-taking, barge-in, hangup."""

from __future__ import annotations

import time

import aiohttp
import pytest
from simhelpers import post, recv_json, subscribe, ws_connect

from agentd.sim import Caller, Simulator, Utterance


async def _attach(
    sim: Simulator, http: aiohttp.ClientSession, call_id: str, direction: str = "in"
) -> tuple[str, str]:
    """Transcribe + speaking on an answered call; returns their ids."""
    await sim.wait_call_status(call_id, "progressing")
    _, trn, _ = await post(
        http,
        sim.api_url + "/transcribes",
        {
            "reference_type": "call",
            "reference_id": call_id,
            "language": "en-US",
            "direction": direction,
        },
    )
    _, spk, _ = await post(
        http,
        sim.api_url + "/speakings",
        {"reference_type": "call", "reference_id": call_id, "direction": "out"},
    )
    return trn["id"], spk["id"]


async def _say(sim: Simulator, http: aiohttp.ClientSession, spk_id: str, text: str) -> None:
    status, _, _ = await post(http, f"{sim.api_url}/speakings/{spk_id}/say", {"text": text})
    assert status == 200


async def test_utterance_produces_speech_events_then_transcript(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    cid = sim.customer_id
    ws = await ws_connect(sim)
    await subscribe(
        sim,
        ws,
        [
            f"customer_id:{cid}:transcribe:transcribe_speech_",
            f"customer_id:{cid}:transcript:transcript_created",
        ],
    )
    call_id = sim.inbound_call(caller=Caller([Utterance("I need help please")]))
    trn_id, spk_id = await _attach(sim, http, call_id)
    await _say(sim, http, spk_id, "Hello, how can I help?")
    frames = [await recv_json(ws) for _ in range(7)]
    started, *interims, ended, transcript = frames
    assert "message" not in started and started["streaming_id"]
    assert [f["message"] for f in interims] == ["I", "I need", "I need help", "I need help please"]
    assert "message" not in ended
    assert all(f["transcribe_id"] == trn_id for f in frames)
    assert len({f["id"] for f in frames[:-1]}) == 6  # a fresh id per speech event
    assert transcript["direction"] == "in"
    assert transcript["message"] == "I need help please"
    assert "streaming_id" not in transcript and "offset_ms" in transcript
    # The caller waits for an answer, then hangs up once the agent's audio has finished.
    await _say(sim, http, spk_id, "Sure.")
    await sim.wait_call_status(call_id, "hangup")
    call = sim.get_call(call_id)
    assert (call.hangup_by, call.hangup_reason) == ("remote", "normal")
    assert [(line.who, line.text) for line in call.conversation] == [
        ("agent", "Hello, how can I help?"),
        ("caller", "I need help please"),
        ("agent", "Sure."),
    ]
    assert call.conversation[1].t_start >= call.conversation[0].t_end  # type: ignore[operator]
    await ws.close()


async def test_no_transcribe_means_no_speech_events(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    call_id = sim.inbound_call(
        caller=Caller([Utterance("anyone there", wait_for_agent=False)], hangup_after_s=None)
    )
    await sim.wait_for(lambda: any(line.t_end for line in sim.get_call(call_id).conversation))
    assert not [t for t, _ in sim.events if t.startswith(("transcribe_speech", "transcript"))]
    assert sim.get_call(call_id).conversation[0].text == "anyone there"


async def test_out_direction_transcribe_hears_the_agent(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    call_id = sim.inbound_call()
    _, spk_id = await _attach(sim, http, call_id, direction="both")
    await _say(sim, http, spk_id, "Welcome to the demo.")
    await sim.wait_for(lambda: len(sim.transcripts) == 1)
    (tsc,) = sim.transcripts.values()
    assert (tsc.direction, tsc.message) == ("out", "Welcome to the demo.")


async def test_in_only_transcribe_does_not_hear_the_agent(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    call_id = sim.inbound_call()
    _, spk_id = await _attach(sim, http, call_id, direction="in")
    await _say(sim, http, spk_id, "Welcome.")
    lines = sim.get_call(call_id).conversation
    await sim.wait_for(lambda: bool(lines) and lines[-1].t_end is not None)  # after the latency
    assert sim.transcripts == {}


async def test_barge_in_while_agent_talks(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.settings.playback_chars_per_s = 50.0
    caller = Caller(
        [Utterance("hi", pause_s=0.0), Utterance("wait stop", barge_in_after_s=0.1)],
        hangup_after_s=None,
    )
    call_id = sim.inbound_call(caller=caller)
    _, spk_id = await _attach(sim, http, call_id)
    await _say(sim, http, spk_id, "Hello!")
    lines = sim.get_call(call_id).conversation
    # the agent answers once the caller is done: a reply sent while they talk is the one they
    # talk over, and the caller waits for the next one
    await sim.wait_for(lambda: len(lines) == 2 and lines[1].t_end is not None)
    long_reply = "This is a long answer that takes well over a second to play back. " * 2
    await _say(sim, http, spk_id, long_reply)
    call = sim.get_call(call_id)
    await sim.wait_for(lambda: len(call.conversation) == 4)
    reply, barge = call.conversation[2], call.conversation[3]
    assert barge.who == "caller" and barge.text == "wait stop"
    assert reply.t_end is None  # the agent is still talking when the caller starts
    assert barge.t_start - reply.t_start == pytest.approx(0.1, abs=0.05)
    # The agent reacts with /stop: its line is cut where the audio stopped.
    await post(http, f"{sim.api_url}/speakings/{spk_id}/stop")
    assert reply.cut and 0 < len(reply.text) < len(long_reply)
    assert reply.planned == long_reply


async def test_wait_for_agent_false_and_never_hang_up(sim: Simulator) -> None:
    caller = Caller(
        [Utterance("one", wait_for_agent=False), Utterance("two", wait_for_agent=False)],
        hangup_after_s=None,
    )
    call_id = sim.inbound_call(caller=caller)
    call = sim.get_call(call_id)
    await sim.wait_for(
        lambda: len(call.conversation) == 2 and call.conversation[1].t_end is not None
    )
    assert [line.text for line in call.conversation] == ["one", "two"]
    with pytest.raises(TimeoutError):
        await sim.wait_for(lambda: call.ended, timeout=0.3)


async def test_a_paced_caller_keeps_its_timeline_when_late(sim: Simulator) -> None:
    # A caller whose timeline began 60 s ago (as if the simulator had stalled): it does not
    # start its pauses over from now but says what was due at once, each line at its slot.
    t = time.monotonic() - 60.0
    caller = Caller(
        [Utterance(w, pause_s=2.0, wait_for_agent=False) for w in ("one", "two", "three")],
        hangup_after_s=None,
        paced_from=t,
    )
    call = sim.get_call(sim.inbound_call(caller=caller))
    await sim.wait_for(lambda: len(call.conversation) == 3 and call.conversation[2].t_end)
    step = 1.0 / sim.settings.speech_words_per_s  # one word each
    starts = [line.t_start for line in call.conversation]
    assert starts == pytest.approx([t + 2.0, t + 4.0 + step, t + 6.0 + 2 * step])


async def test_outbound_callee_script(sim: Simulator, http: aiohttp.ClientSession) -> None:
    from agentd.sim import Outcome

    sim.on_outbound(Outcome(ring_after_s=0.0, answer_after_s=0.0), caller=Caller([], 0.0))
    _, data, _ = await post(
        http,
        sim.api_url + "/calls",
        {
            "source": {"type": "tel", "target": "+1"},
            "destinations": [{"type": "tel", "target": "+2"}],
            "actions": [{"type": "sleep", "option": {"duration": 3600000}}],
        },
    )
    call_id = data["calls"][0]["id"]
    _, spk_id = await _attach(sim, http, call_id)
    await _say(sim, http, spk_id, "Hi, this is a reminder.")
    # No utterances: the callee hangs up once the agent has said something and finished.
    await sim.wait_call_status(call_id, "hangup")
    assert sim.get_call(call_id).hangup_by == "remote"
