"""TTS playback: real-time timing, queueing, flush per provider, stop, deaf sessions."""

from __future__ import annotations

import aiohttp
import pytest
from simhelpers import answered_call, fast_settings, post

from agentd.sim import Simulator
from agentd.sim.tts import AWS_CHUNK_S


async def _speaking(
    sim: Simulator, http: aiohttp.ClientSession, call_id: str, provider: str = ""
) -> str:
    body = {"reference_type": "call", "reference_id": call_id, "direction": "out"}
    if provider:
        body["provider"] = provider
    status, spk, _ = await post(http, sim.api_url + "/speakings", body)
    assert status == 201
    return str(spk["id"])


@pytest.fixture
async def slow_sim() -> Simulator:  # type: ignore[misc]
    async with Simulator(fast_settings(playback_chars_per_s=100.0)) as sim:
        yield sim


@pytest.fixture
async def slow_http(slow_sim: Simulator) -> aiohttp.ClientSession:  # type: ignore[misc]
    async with aiohttp.ClientSession(headers={"Cookie": f"accesskey={slow_sim.accesskey}"}) as s:
        yield s


async def test_says_play_back_to_back_in_real_time(
    slow_sim: Simulator, slow_http: aiohttp.ClientSession
) -> None:
    sim, http = slow_sim, slow_http
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id)
    await post(http, f"{sim.api_url}/speakings/{spk}/say", {"text": "a" * 20})  # 0.2 s
    await post(http, f"{sim.api_url}/speakings/{spk}/say", {"text": "b" * 10})  # 0.1 s
    assert sim.world.agent_busy(call_id)
    call = sim.get_call(call_id)
    await sim.wait_for(lambda: len(call.conversation) == 2 and not sim.world.agent_busy(call_id))
    first, second = call.conversation
    assert first.t_end is not None and second.t_end is not None
    assert first.t_end - first.t_start == pytest.approx(0.2, abs=0.06)
    assert second.t_start == pytest.approx(first.t_end, abs=0.03)
    assert second.t_end - second.t_start == pytest.approx(0.1, abs=0.06)
    assert not first.cut and first.text == first.planned


async def _flush_scenario(sim: Simulator, http: aiohttp.ClientSession, provider: str) -> list:  # type: ignore[type-arg]
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id, provider)
    await post(http, f"{sim.api_url}/speakings/{spk}/say", {"text": "x" * 30})
    await post(http, f"{sim.api_url}/speakings/{spk}/say", {"text": "queued"})
    call = sim.get_call(call_id)
    await sim.wait_for(lambda: len(call.conversation) == 1)
    status, _, _ = await post(http, f"{sim.api_url}/speakings/{spk}/flush")
    assert status == 200
    await sim.wait_for(lambda: not sim.world.agent_busy(call_id))
    return call.conversation


async def test_flush_gcp_cuts_and_drops_queue(
    slow_sim: Simulator, slow_http: aiohttp.ClientSession
) -> None:
    lines = await _flush_scenario(slow_sim, slow_http, "gcp")
    assert len(lines) == 1
    assert lines[0].cut and len(lines[0].text) < 30


async def test_flush_aws_drains_its_buffer_so_the_say_ends_with_its_chunk(
    slow_sim: Simulator, slow_http: aiohttp.ClientSession
) -> None:
    """``bin-tts-manager/pkg/streaminghandler/aws.go``: ``SayFlush`` drains the audio channel,
    which holds the rest of the playing say in 0.256 s chunks; the chunk being written plays
    out, the rest and the queued say are gone."""
    lines = await _flush_scenario(slow_sim, slow_http, "aws")
    assert len(lines) == 1
    (line,) = lines
    assert line.cut and line.t_end is not None
    assert line.t_end - line.t_start == pytest.approx(AWS_CHUNK_S, abs=0.05)
    assert 20 <= len(line.text) < 30


async def test_flush_elevenlabs_changes_nothing(
    slow_sim: Simulator, slow_http: aiohttp.ClientSession
) -> None:
    lines = await _flush_scenario(slow_sim, slow_http, "elevenlabs")
    assert [line.text for line in lines] == ["x" * 30, "queued"]
    assert not any(line.cut for line in lines)


async def test_stop_silences_at_once(slow_sim: Simulator, slow_http: aiohttp.ClientSession) -> None:
    sim, http = slow_sim, slow_http
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id)
    await post(http, f"{sim.api_url}/speakings/{spk}/say", {"text": "y" * 100})
    await post(http, f"{sim.api_url}/speakings/{spk}/say", {"text": "never heard"})
    call = sim.get_call(call_id)
    await sim.wait_for(lambda: len(call.conversation) == 1)
    await post(http, f"{sim.api_url}/speakings/{spk}/stop")
    assert not sim.world.agent_busy(call_id)
    (line,) = call.conversation
    assert line.cut and len(line.text) < 100 and line.t_end is not None


async def test_hangup_cuts_the_audio(slow_sim: Simulator, slow_http: aiohttp.ClientSession) -> None:
    sim, http = slow_sim, slow_http
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id)
    await post(http, f"{sim.api_url}/speakings/{spk}/say", {"text": "z" * 100})
    call = sim.get_call(call_id)
    await sim.wait_for(lambda: len(call.conversation) == 1)
    await sim.hangup(call_id)
    assert call.conversation[0].cut
    assert sim.speakings[spk].status == "active"


async def test_session_made_before_answer_is_deaf(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    call_id = sim.inbound_call(answer_after_s=30.0)
    spk = await _speaking(sim, http, call_id)
    status, _, _ = await post(http, f"{sim.api_url}/speakings/{spk}/say", {"text": "hello?"})
    assert status == 200
    assert not sim.world.agent_busy(call_id)
    assert sim.get_call(call_id).conversation == []
