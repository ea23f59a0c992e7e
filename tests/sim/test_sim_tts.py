"""The TTS model of issue #12: timing, per-script playback rates, direction, provider voices and
tts-manager pod death. Each test names the server code (``voipbin/monorepo``) or measurement
(``PROTOCOL.md`` "Timing") it checks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import aiohttp
import pytest
from simhelpers import answered_call, envelope, fast_settings, get, post

from agentd.sim import Simulator
from agentd.sim.tts import (
    BREAKER_THRESHOLD,
    POLLY_MAX_CHARS,
    is_cjk_text,
    voice_refused,
    voice_silent,
)


@asynccontextmanager
async def _sim(**overrides: Any) -> AsyncIterator[tuple[Simulator, aiohttp.ClientSession]]:
    async with (
        Simulator(fast_settings(**overrides)) as sim,
        aiohttp.ClientSession(headers={"Cookie": f"accesskey={sim.accesskey}"}) as http,
    ):
        yield sim, http


async def _speaking(
    sim: Simulator, http: aiohttp.ClientSession, call_id: str, **body: str
) -> dict[str, Any]:
    payload = {"reference_type": "call", "reference_id": call_id, "direction": "out", **body}
    status, spk, _ = await post(http, sim.api_url + "/speakings", payload)
    assert status == 201, spk
    assert isinstance(spk, dict)
    return spk


async def _say(sim: Simulator, http: aiohttp.ClientSession, spk_id: str, text: str) -> int:
    status, _, _ = await post(http, f"{sim.api_url}/speakings/{spk_id}/say", {"text": text})
    return status


# -- timing (PROTOCOL.md "Timing": measured by VoIPBIN's own client) ----------------------------


async def test_create_takes_the_setup_time_and_its_row_blocks_a_second_session() -> None:
    """``POST /speakings`` ~0.6 s (measured); the row is inserted ``initiating`` before the setup
    (``bin-tts-manager/pkg/speakinghandler/speaking.go`` Create), so a concurrent create for the
    same call answers 500 and a concurrent GET sees ``initiating``."""
    async with _sim(speaking_create_s=0.3, pod_rpc_timeout_s=1.0) as (sim, http):
        call_id = await answered_call(sim, http)
        t0 = time.monotonic()
        first = asyncio.create_task(_speaking(sim, http, call_id))
        await sim.wait_for(lambda: bool(sim.speakings))
        (row,) = sim.speakings.values()
        _, seen, _ = await get(http, f"{sim.api_url}/speakings/{row.id}")
        assert seen["status"] == "initiating"
        body = {"reference_type": "call", "reference_id": call_id, "direction": "out"}
        status, data, _ = await post(http, sim.api_url + "/speakings", body)
        assert (status, envelope(data)[1]) == (500, "INTERNAL")
        spk = await first
        assert time.monotonic() - t0 >= 0.3
        assert spk["status"] == "active"


async def test_a_create_slower_than_the_gateway_answers_503_and_the_row_turns_active_anyway() -> (
    None
):
    """The gateway gives ``TTSV1SpeakingCreate`` 3 s; the pod's request has no deadline and
    Create sets the row ``active`` without reading it: deleted in between, it streams on."""
    async with _sim(speaking_create_s=0.3, pod_rpc_timeout_s=0.1) as (sim, http):
        call_id = await answered_call(sim, http)
        body = {"reference_type": "call", "reference_id": call_id, "direction": "out"}
        status, data, _ = await post(http, sim.api_url + "/speakings", body)
        assert (status, envelope(data)[1]) == (503, "REQUEST_TIMEOUT")
        (row,) = sim.speakings.values()
        assert row.status == "initiating"
        async with http.delete(f"{sim.api_url}/speakings/{row.id}") as resp:
            assert resp.status == 200
        await sim.wait_for(lambda: row.status == "active")
        assert sim.stranded() == [row.id]


async def test_a_call_that_ends_during_the_setup_fails_the_create() -> None:
    """``speaking.go`` Create: a failed media setup marks the row ``stopped`` and answers 500."""
    async with _sim(speaking_create_s=0.3, pod_rpc_timeout_s=1.0) as (sim, http):
        call_id = await answered_call(sim, http)
        body = {"reference_type": "call", "reference_id": call_id, "direction": "out"}
        task = asyncio.create_task(post(http, sim.api_url + "/speakings", body))
        await sim.wait_for(lambda: bool(sim.speakings))
        await sim.hangup(call_id)
        status, _, _ = await task
        assert status == 500
        (row,) = sim.speakings.values()
        assert row.status == "stopped"
        assert sim.leaks() == []


async def test_audio_starts_a_say_latency_after_the_say_and_queued_says_follow_back_to_back() -> (
    None
):
    """``/say`` → first audio 0.9-1.3 s (measured); says queue and play back to back."""
    async with _sim(say_latency_s=0.3, playback_chars_per_s=100.0) as (sim, http):
        call_id = await answered_call(sim, http)
        spk = await _speaking(sim, http, call_id)
        t_say = time.monotonic()
        assert await _say(sim, http, spk["id"], "a" * 20) == 200  # 0.2 s
        assert await _say(sim, http, spk["id"], "b" * 10) == 200
        call = sim.get_call(call_id)
        assert sim.world.agent_busy(call_id)  # waiting for audio counts as busy
        assert call.conversation == []
        await sim.wait_for(
            lambda: len(call.conversation) == 2 and not sim.world.agent_busy(call_id)
        )
        first, second = call.conversation
        assert 0.3 <= first.t_start - t_say < 0.45  # never earlier than the latency
        assert second.t_start == pytest.approx(first.t_end, abs=0.03)
        # Nothing playing: the next say waits its own latency again.
        t_say = time.monotonic()
        await _say(sim, http, spk["id"], "c" * 5)
        await sim.wait_for(lambda: len(call.conversation) == 3)
        assert 0.3 <= call.conversation[2].t_start - t_say < 0.45


async def test_stop_answers_and_silences_after_the_stop_latency() -> None:
    """A stop ~0.5 s and "silenced within 0.5 s" (measured): the sim silences at the answer."""
    async with _sim(stop_latency_s=0.3, playback_chars_per_s=100.0) as (sim, http):
        call_id = await answered_call(sim, http)
        spk = await _speaking(sim, http, call_id)
        await _say(sim, http, spk["id"], "y" * 200)
        call = sim.get_call(call_id)
        await sim.wait_for(lambda: len(call.conversation) == 1)
        t0 = time.monotonic()
        status, stopped, _ = await post(http, f"{sim.api_url}/speakings/{spk['id']}/stop")
        answered = time.monotonic()
        assert (status, stopped["status"]) == (200, "stopped")
        assert answered - t0 >= 0.3
        (line,) = call.conversation
        assert line.cut and line.t_end is not None
        assert line.t_end >= t0 + 0.29  # it kept playing until the answer


async def test_a_stop_during_the_say_latency_means_nothing_is_heard() -> None:
    """``speaking.go`` Stop ends the stream: a say not yet audible is never heard."""
    async with _sim(say_latency_s=0.5) as (sim, http):
        call_id = await answered_call(sim, http)
        spk = await _speaking(sim, http, call_id)
        await _say(sim, http, spk["id"], "never heard")
        await post(http, f"{sim.api_url}/speakings/{spk['id']}/stop")
        assert not sim.world.agent_busy(call_id)
        assert sim.get_call(call_id).conversation == []


# -- per-script playback rates (PROTOCOL.md: 15 chars/s Latin, 6 CJK) -------------------------


def test_cjk_text_is_told_by_its_letters() -> None:
    assert is_cjk_text("안녕하세요, 무엇을 도와드릴까요?")
    assert is_cjk_text("こんにちは。")
    assert is_cjk_text("你好，我能帮你什么？")
    assert is_cjk_text("KT 고객센터입니다")  # mostly Korean: a brand name does not change the pace
    assert not is_cjk_text("Hello, how can I help?")
    assert not is_cjk_text("Order 42 for 김 please")
    assert not is_cjk_text("...")


async def test_cjk_text_plays_at_the_cjk_rate_and_is_cut_at_it() -> None:
    """Playback length by script (PROTOCOL.md "Newer than the snapshot": 15 Latin, 6 CJK)."""
    async with _sim(playback_chars_per_s=100.0, playback_cjk_chars_per_s=20.0) as (sim, http):
        call_id = await answered_call(sim, http)
        spk = await _speaking(sim, http, call_id, language="ko-KR")
        await _say(sim, http, spk["id"], "가" * 4)  # 0.2 s at 20/s
        await _say(sim, http, spk["id"], "a" * 20)  # 0.2 s at 100/s
        call = sim.get_call(call_id)
        await sim.wait_for(
            lambda: len(call.conversation) == 2 and not sim.world.agent_busy(call_id)
        )
        for line in call.conversation:
            assert line.t_end is not None
            assert line.t_end - line.t_start == pytest.approx(0.2, abs=0.06)
        await _say(sim, http, spk["id"], "나" * 20)  # 1 s at 20/s
        await sim.wait_for(lambda: len(call.conversation) == 3)
        t0 = call.conversation[2].t_start
        await sim.wait_for(lambda: time.monotonic() - t0 >= 0.25, timeout=2)
        await post(http, f"{sim.api_url}/speakings/{spk['id']}/stop")
        line = call.conversation[2]
        assert line.cut and line.t_end is not None
        assert len(line.text) == int(20 * (line.t_end - line.t_start) / 1.0)


# -- direction (bin-tts-manager/models/streaming/streaming.go) ----------------------------------


@pytest.mark.parametrize("direction", ["in", ""])
async def test_only_out_and_both_reach_the_caller(
    sim: Simulator, http: aiohttp.ClientSession, direction: str
) -> None:
    """``streaming.go``: ``in`` is injected toward the other side; ``""`` passes no whisper
    direction to the snoop (``requesthandler/ast_channel.go`` omits it): the caller hears
    neither, and an ``out`` transcribe hears nothing either."""
    call_id = await answered_call(sim, http)
    body = {"reference_type": "call", "reference_id": call_id, "language": "en-US"}
    await post(http, sim.api_url + "/transcribes", {**body, "direction": "both"})
    payload = {"reference_type": "call", "reference_id": call_id}
    if direction:
        payload["direction"] = direction
    status, spk, _ = await post(http, sim.api_url + "/speakings", payload)
    assert status == 201
    assert spk.get("direction", "") == direction
    assert await _say(sim, http, spk["id"], "Can you hear me?") == 200
    assert not sim.world.agent_busy(call_id)
    call = sim.get_call(call_id)
    assert call.conversation == [] and call.say_seq == 0
    assert sim.transcripts == {}


async def test_both_reaches_the_caller(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """``streaming.go``: ``both`` is injected both ways, the caller's side included."""
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id, direction="both")
    await _say(sim, http, spk["id"], "Hello.")
    call = sim.get_call(call_id)
    await sim.wait_for(lambda: len(call.conversation) == 1)


# -- providers and voices (pkg/streaminghandler/{aws,gcp,elevenlabs}.go) ------------------------


def test_voice_tables() -> None:
    """``aws.go`` (Polly ``SynthesizeSpeech``, standard engine), ``elevenlabs.go`` (voice id in
    the stream URL), ``gcp.go`` (voice sent in the stream's config only)."""
    for provider in ("aws", "elevenlabs", "gcp", "", "azure"):
        assert not voice_refused(provider, "")
        assert not voice_silent(provider, "")
    assert not voice_refused("aws", "Joanna")
    assert not voice_refused("aws", "Seoyeon")
    assert voice_refused("aws", "joanna")  # enum values are case-sensitive
    assert voice_refused("aws", "Ruth")  # neural/generative only
    assert voice_refused("aws", "21m00Tcm4TlvDq8ikWAM")
    assert not voice_refused("elevenlabs", "21m00Tcm4TlvDq8ikWAM")
    assert voice_refused("elevenlabs", "Joanna")
    assert voice_refused("azure", "en-US-JennyNeural")  # unknown providers stream via ElevenLabs
    assert not voice_refused("gcp", "Joanna")
    assert voice_silent("gcp", "Joanna")
    assert voice_silent("gcp", "en-US-Wavenet-D")
    assert not voice_silent("gcp", "ko-KR-Chirp3-HD-Aoede")
    assert not voice_silent("gcp", "cmn-CN-Chirp3-HD-Charon")


@pytest.mark.parametrize(
    ("provider", "voice_id"), [("aws", "Rachel"), ("aws", "Ruth"), ("elevenlabs", "Joanna")]
)
async def test_a_refused_voice_creates_the_session_but_every_say_is_404(
    sim: Simulator, http: aiohttp.ClientSession, provider: str, voice_id: str
) -> None:
    """``listenhandler/v1_speakings.go`` maps every say error to 404: Polly's refusal in
    ``aws.go`` ``SayAdd``, ElevenLabs' in ``elevenlabs.go`` ``connect`` (``say.go`` SayInit)."""
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id, provider=provider, voice_id=voice_id)
    assert (spk["status"], spk["voice_id"]) == ("active", voice_id)
    for text in ("Hello.", "Hello again."):
        status, data, _ = await post(
            http, f"{sim.api_url}/speakings/{spk['id']}/say", {"text": text}
        )
        assert (status, envelope(data)[1]) == (404, "RESOURCE_NOT_FOUND")
    assert sim.get_call(call_id).conversation == []
    _, got, _ = await get(http, f"{sim.api_url}/speakings/{spk['id']}")
    assert got["status"] == "active"


async def test_empty_provider_is_stored_as_elevenlabs_and_an_empty_voice_is_a_default(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """``speakinghandler/speaking.go`` Create: ``provider == ""`` → ``elevenlabs``; each streamer
    falls back to its default voice for an empty ``voice_id``."""
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id)
    assert spk["provider"] == "elevenlabs" and "voice_id" not in spk
    assert await _say(sim, http, spk["id"], "Hi.") == 200
    await sim.wait_for(lambda: len(sim.get_call(call_id).conversation) == 1)


async def test_an_unknown_provider_is_stored_and_streamed_through_elevenlabs(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """``streaminghandler/run.go`` ``getStreamerByProvider``: unknown → ElevenLabs (its voices,
    its flush)."""
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id, provider="azure", voice_id="21m00Tcm4TlvDq8ikWAM")
    assert spk["provider"] == "azure"
    assert await _say(sim, http, spk["id"], "Hi.") == 200
    assert sim.speakings[spk["id"]].flush_kind == "elevenlabs"


async def test_polly_refuses_a_say_over_3000_characters(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """``aws.go`` sends each say to ``SynthesizeSpeech``, whose plain-text limit is 3,000
    characters; the gateway lets 5,000 bytes through, the pod's error is a 404."""
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id, provider="aws", voice_id="Joanna")
    assert await _say(sim, http, spk["id"], "a" * (POLLY_MAX_CHARS + 1)) == 404
    assert await _say(sim, http, spk["id"], "a" * POLLY_MAX_CHARS) == 200


async def test_a_say_after_the_call_ended_is_404_though_the_row_is_still_active(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """The call's audio socket closed: the pod tore the provider session down (``run.go``),
    and the say fails (``say.go``), which the API answers 404; nobody stopped the row."""
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id)
    assert await _say(sim, http, spk["id"], "Hello.") == 200
    await sim.hangup(call_id)
    assert await _say(sim, http, spk["id"], "Still there?") == 404
    assert sim.speakings[spk["id"]].status == "active"


async def test_a_gcp_voice_google_does_not_stream_is_accepted_and_silent(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """``gcp.go`` ``connect`` only sends the voice; the refusal comes on ``Recv`` and the next
    ``SayAdd`` reconnects: every say is 200, nothing is heard."""
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id, provider="gcp", voice_id="en-US-Wavenet-D")
    for text in ("Hello.", "Anyone?"):
        assert await _say(sim, http, spk["id"], text) == 200
    assert not sim.world.agent_busy(call_id)
    assert sim.get_call(call_id).conversation == []


async def test_a_chirp3_voice_is_heard(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """``gcp.go``: Chirp 3: HD voices stream (its defaults are ``*-Chirp3-HD-*``)."""
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id, provider="gcp", voice_id="ko-KR-Chirp3-HD-Aoede")
    await _say(sim, http, spk["id"], "안녕하세요.")
    await sim.wait_for(lambda: len(sim.get_call(call_id).conversation) == 1)


async def test_aws_holds_a_say_until_its_audio_fits_the_buffer() -> None:
    """``aws.go``: ``SayAdd`` pushes the say's audio into a 64-chunk (16.4 s) channel inside the
    request; past the gateway's budget the say answers 503 although its audio is queued."""
    async with _sim(pod_rpc_timeout_s=0.2) as (sim, http):
        call_id = await answered_call(sim, http)
        spk = await _speaking(sim, http, call_id, provider="aws")
        assert await _say(sim, http, spk["id"], "a" * 2000) == 200  # 10 s of audio
        t0 = time.monotonic()
        status, data, _ = await post(
            http, f"{sim.api_url}/speakings/{spk['id']}/say", {"text": "b" * 2000}
        )
        assert (status, envelope(data)[1]) == (503, "REQUEST_TIMEOUT")
        assert time.monotonic() - t0 >= 0.2
        assert sim.get_call(call_id).say_seq == 2  # it will be heard anyway
        await post(http, f"{sim.api_url}/speakings/{spk['id']}/stop")


# -- pod death (bin-api-manager/pkg/servicehandler/speaking.go, pod-routed) ----------------------


async def test_a_dead_pod_times_out_then_trips_the_breaker() -> None:
    """``servicehandler/speaking.go`` routes say/flush/stop to ``spk.pod_id``; a queue without a
    consumer times out (503 ``REQUEST_TIMEOUT``, ``server/error_translate.go``); after 5 failures
    ``circuitbreakerhandler/breaker.go`` fails fast (500) for its open duration, then lets one
    probe through."""
    async with _sim(pod_rpc_timeout_s=0.1, pod_breaker_open_s=0.5, playback_chars_per_s=20.0) as (
        sim,
        http,
    ):
        call_id = await answered_call(sim, http)
        spk = await _speaking(sim, http, call_id)
        await _say(sim, http, spk["id"], "a long greeting that is cut by the pod dying")
        call = sim.get_call(call_id)
        await sim.wait_for(lambda: len(call.conversation) == 1)
        pod = sim.faults.kill_tts_pod(spk["id"])
        assert pod == sim.speakings[spk["id"]].pod_id
        (line,) = call.conversation
        assert line.cut and not sim.world.agent_busy(call_id)
        base = f"{sim.api_url}/speakings/{spk['id']}"
        for suffix in ("/say", "/flush", "/stop", "/say", "/stop"):
            t0 = time.monotonic()
            status, data, _ = await post(http, base + suffix, {"text": "x"})
            assert (status, envelope(data)) == (503, ("UNAVAILABLE", "REQUEST_TIMEOUT")), suffix
            assert time.monotonic() - t0 >= 0.1
        assert BREAKER_THRESHOLD == 5
        t0 = time.monotonic()
        status, data, _ = await post(http, base + "/stop")
        assert (status, envelope(data)[1]) == (500, "INTERNAL")
        assert time.monotonic() - t0 < 0.1
        opened = time.monotonic()
        await sim.wait_for(lambda: time.monotonic() - opened >= 0.5)  # the open duration
        status, _, _ = await post(http, base + "/stop")
        assert status == 503  # the probe
        status, _, _ = await post(http, base + "/say", {"text": "x"})
        assert status == 500  # open again
        _, got, _ = await get(http, base)
        assert got["status"] == "active"


async def test_a_dead_pods_row_blocks_the_call_until_deleted_and_still_leaks() -> None:
    """``speakinghandler/speaking.go`` Create refuses a second live, undeleted row (500);
    ``servicehandler/speaking.go`` SpeakingDelete ignores the failed pod stop and soft-deletes
    (``dbhandler/speaking.go``): the row stays ``active`` with ``tm_delete``, no longer blocks,
    and, never stopped, still bills (no ``speaking_stopped`` ever reaches billing-manager)."""
    async with _sim(pod_rpc_timeout_s=0.1) as (sim, http):
        call_id = await answered_call(sim, http)
        spk = await _speaking(sim, http, call_id)
        sim.faults.kill_tts_pod(call_id=call_id)
        body = {"reference_type": "call", "reference_id": call_id, "direction": "out"}
        status, _, _ = await post(http, sim.api_url + "/speakings", body)
        assert status == 500
        t0 = time.monotonic()
        async with http.delete(f"{sim.api_url}/speakings/{spk['id']}") as resp:
            assert resp.status == 200
            deleted = await resp.json()
        assert time.monotonic() - t0 >= 0.1  # the stop inside waited out the pod's budget
        assert deleted["status"] == "active" and "tm_delete" in deleted
        _, got, _ = await get(http, f"{sim.api_url}/speakings/{spk['id']}")
        assert (got["status"], got["tm_delete"]) == ("active", deleted["tm_delete"])
        _, listed, _ = await get(http, sim.api_url + "/speakings")
        assert spk["id"] not in {s["id"] for s in listed["result"]}
        fresh = await _speaking(sim, http, call_id)
        assert sim.speakings[fresh["id"]].pod_id not in sim.speech.tts.dead_pods
        await _say(sim, http, fresh["id"], "I am back.")
        await sim.wait_for(lambda: len(sim.get_call(call_id).conversation) == 1)
        await post(http, f"{sim.api_url}/speakings/{fresh['id']}/stop")
        await sim.hangup(call_id)
        # still billed, but the client did all it could: stranded, not a client's leak
        assert sim.leaks() == []
        assert sim.stranded() == [spk["id"]]


async def test_a_pod_dying_inside_the_create_leaves_an_initiating_row() -> None:
    """``speaking.go`` Create updates the row to ``active`` only after the setup: a pod that dies
    inside it leaves the row ``initiating`` (blocking the call), and the gateway's 3 s budget
    (``requesthandler/main.go`` ``requestTimeoutDefault``) ends in a 503."""
    async with _sim(speaking_create_s=0.2, pod_rpc_timeout_s=0.3) as (sim, http):
        call_id = await answered_call(sim, http)
        body = {"reference_type": "call", "reference_id": call_id, "direction": "out"}
        t0 = time.monotonic()
        task = asyncio.create_task(post(http, sim.api_url + "/speakings", body))
        await sim.wait_for(lambda: bool(sim.speakings))
        (row,) = sim.speakings.values()
        sim.faults.kill_tts_pod(row.id)
        status, data, _ = await task
        assert (status, envelope(data)[1]) == (503, "REQUEST_TIMEOUT")
        assert time.monotonic() - t0 >= 0.3
        assert row.status == "initiating"
        status, _, _ = await post(http, sim.api_url + "/speakings", body)
        assert status == 500


async def test_delete_on_a_live_pod_stops_first(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """``servicehandler/speaking.go`` SpeakingDelete stops an ``active`` row on its pod, then
    soft-deletes it: ``stopped`` with ``tm_delete``; a new session is allowed."""
    call_id = await answered_call(sim, http)
    spk = await _speaking(sim, http, call_id)
    async with http.delete(f"{sim.api_url}/speakings/{spk['id']}") as resp:
        assert resp.status == 200
        deleted = await resp.json()
    assert deleted["status"] == "stopped" and "tm_delete" in deleted
    fresh = await _speaking(sim, http, call_id)
    await post(http, f"{sim.api_url}/speakings/{fresh['id']}/stop")
    await sim.hangup(call_id)
    assert sim.leaks() == []
