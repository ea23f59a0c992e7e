"""The STT model (agentd/sim/stt.py): speech events and finals as the transcribe manager makes
them, split finals, backchannels, silent deafness, provider fallback and orphans."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import aiohttp
import pytest
from simhelpers import answered_call, envelope, get, post

from agentd.sim import Caller, Simulator, Utterance
from agentd.sim.stt import schedule, split_finals

SPEECH = ("transcribe_speech_started", "transcribe_speech_interim", "transcribe_speech_ended")


def _body(call_id: str, **kw: str) -> dict[str, str]:
    return {
        "reference_type": "call",
        "reference_id": call_id,
        "language": "en-US",
        "direction": "in",
        "provider": "aws",
        **kw,
    }


async def _transcribe(sim: Simulator, http: aiohttp.ClientSession, call_id: str, **kw: str) -> str:
    status, trn, _ = await post(http, sim.api_url + "/transcribes", _body(call_id, **kw))
    assert status == 200, trn
    trn_id: str = trn["id"]
    return trn_id


def _stream(sim: Simulator, trn_id: str, direction: str = "in") -> list[tuple[str, float]]:
    """The transcribe's speech events and transcripts as ``S``, ``I:words``, ``E``, ``T:text``,
    with their publication times."""
    out: list[tuple[str, float]] = []
    for (kind, payload), t in zip(sim.events, sim.world.event_times, strict=True):
        if payload.get("transcribe_id") != trn_id or payload.get("direction") != direction:
            continue
        if kind == "transcribe_speech_started":
            out.append(("S", t))
        elif kind == "transcribe_speech_interim":
            out.append(("I:" + payload["message"], t))
        elif kind == "transcribe_speech_ended":
            out.append(("E", t))
        elif kind == "transcript_created":
            out.append(("T:" + payload["message"], t))
    return out


async def _delete(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    """DELETE; returns the status and the parsed body."""
    async with http.delete(url) as resp:
        return resp.status, await resp.json()


def _codes(sim: Simulator, trn_id: str, direction: str = "in") -> list[str]:
    return [code for code, _ in _stream(sim, trn_id, direction)]


def _finals(sim: Simulator, trn_id: str) -> list[str]:
    return [c[2:] for c in _codes(sim, trn_id) if c.startswith("T:")]


# ----------------------------------------------------------------------------- pure functions


def test_split_finals_at_sentence_ends_up_to_three() -> None:
    """One final per sentence, at most three (a deterministic stand-in for the endpointing
    behind PROTOCOL.md's "one sentence often arrives as several transcripts")."""
    assert split_finals("I need help please") == ["I need help please"]
    assert split_finals("Sorry, actually I lost my card.") == ["Sorry, actually I lost my card."]
    assert split_finals("Yes. Thank you!") == ["Yes.", "Thank you!"]
    assert split_finals('He said "stop." Then left') == ['He said "stop."', "Then left"]
    assert split_finals("One. Two? Three! Four. Five") == ["One.", "Two?", "Three! Four. Five"]
    assert split_finals("") == []


def test_schedule_orders_results_like_one_result_stream() -> None:
    """result.go gets the provider's results in order: a part's final comes after its own
    interims and before the next part's; finals are ``gap`` apart, the last ``delay`` after
    the speech."""
    times = [0.1, 0.2, 0.3, 0.4, 0.5]
    results = schedule(times, [["a", "b."], ["c", "d", "e"]], final_delay=1.0, gap=0.5)
    assert [(i, r.final, r.message) for i, r in results] == [
        (0, False, "a"),
        (1, False, "a b."),
        (1, True, "a b."),
        (2, False, "c"),
        (3, False, "c d"),
        (4, False, "c d e"),
        (4, True, "c d e"),
    ]
    ats = [r.at for _, r in results]
    assert ats == sorted(ats)
    assert results[-1][1].at == pytest.approx(1.5)
    # The first final comes at most `delay` after its words, and `gap` before the next.
    assert results[2][1].at == pytest.approx(1.0)
    # The second part was said before the first final: the STT reports it after that final.
    assert all(r.at > 1.0 for _, r in results[3:])


def test_schedule_holds_speech_said_before_the_previous_final() -> None:
    """One provider stream per transcribe direction (result.go): the next utterance's results
    come after the previous utterance's final."""
    results = [r for _, r in schedule([1.0, 1.1], [["x", "y"]], 0.3, 0.1, after=1.05)]
    assert [(r.final, r.message) for r in results] == [(False, "x"), (False, "x y"), (True, "x y")]
    # "x", said before the previous final, comes between that final and the next word.
    assert [r.at for r in results] == pytest.approx([1.075, 1.1, 1.4])


def test_utterance_finals_must_make_up_the_text() -> None:
    with pytest.raises(ValueError, match="do not make up"):
        Utterance("book a table", finals=["book a", "chair"])
    assert Utterance("book a table", finals=["book", "a table"]).finals == ["book", "a table"]


# ----------------------------------------------------------------------------- speech events


async def test_speech_events_carry_gos_nanosecond_time(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    call_id = await answered_call(sim, http)
    trn_id = await _transcribe(sim, http, call_id)
    await sim.caller_says(call_id, "hello there my friend")
    await sim.wait_for(lambda: any(k == "transcript_created" for k, _ in sim.events))
    speech = [p for k, p in sim.events if k in SPEECH and p["transcribe_id"] == trn_id]
    assert len(speech) >= 4
    for payload in speech:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", payload["tm_event"])
        assert payload["tm_create"] == payload["tm_event"]
    # nanoseconds (never stored, so never cut to microseconds): more than 6 digits, mostly
    assert any(len(p["tm_event"].partition(".")[2]) > 7 for p in speech)
    # while a transcript, read back from the database, has microseconds
    [transcript] = [p for k, p in sim.events if k == "transcript_created"]
    assert len(transcript["tm_create"].partition(".")[2]) <= 7


async def test_started_comes_with_the_first_interim_and_ended_with_the_final(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """bin-transcribe-manager/pkg/streaminghandler/result.go (resultProcessor.process, PR #525):
    no speech_started before the first interim; speech_ended right before the transcript, when
    the final comes, stt_final_delay_s after the caller stops."""
    sim.settings.speech_words_per_s = 20.0
    sim.settings.stt_final_delay_s = 0.3
    call_id = await answered_call(sim, http)
    trn_id = await _transcribe(sim, http, call_id)
    t0 = time.monotonic()
    await sim.caller_says(call_id, "I need help please")
    line = sim.get_call(call_id).conversation[-1]
    assert line.t_end is not None
    assert _finals(sim, trn_id) == []  # the caller has stopped; the STT has not finalized yet
    await sim.wait_for(lambda: len(_finals(sim, trn_id)) == 1)
    stream = _stream(sim, trn_id)
    assert [c for c, _ in stream] == [
        "S",
        "I:I",
        "I:I need",
        "I:I need help",
        "I:I need help please",
        "E",
        "T:I need help please",
    ]
    times = [t for _, t in stream]
    assert times[0] >= t0 + 0.05 - 0.01  # not before the first word has been said
    assert times[1] - times[0] < 0.01  # published together with the first interim
    assert times[6] - times[5] < 0.01  # ended together with the final
    assert times[5] - line.t_end == pytest.approx(0.3, abs=0.1)
    assert times[4] <= line.t_end + 0.02  # interims while the caller speaks


async def test_gcp_finals_come_sooner(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """PROTOCOL.md timing: end of speech -> final 0.88 s with Google, 1.14 s with AWS
    (stt_final_delay_gcp_s / stt_final_delay_s); result.go publishes ended with the final."""
    sim.settings.stt_final_delay_s = 0.4
    sim.settings.stt_final_delay_gcp_s = 0.1
    call_id = await answered_call(sim, http)
    aws = await _transcribe(sim, http, call_id, provider="aws")
    gcp = await _transcribe(sim, http, call_id, provider="gcp", language="de-DE")
    await sim.caller_says(call_id, "hello")
    t_end = sim.get_call(call_id).conversation[-1].t_end
    assert t_end is not None
    await sim.wait_for(lambda: len(_finals(sim, aws)) == 1 and len(_finals(sim, gcp)) == 1)
    assert _stream(sim, gcp)[-1][1] - t_end == pytest.approx(0.1, abs=0.07)
    assert _stream(sim, aws)[-1][1] - t_end == pytest.approx(0.4, abs=0.1)


async def test_sentences_arrive_as_split_finals(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """result.go: each final closes its own started/interims/ended/transcript, so a caller's
    two sentences give the whole sequence twice, the finals stt_split_gap_s or more apart."""
    sim.settings.stt_split_gap_s = 0.15
    call_id = await answered_call(sim, http)
    trn_id = await _transcribe(sim, http, call_id)
    await sim.caller_says(call_id, "Yes. Book it for two.")
    await sim.wait_for(lambda: len(_finals(sim, trn_id)) == 2)
    stream = _stream(sim, trn_id)
    assert [c for c, _ in stream] == [
        "S",
        "I:Yes.",
        "E",
        "T:Yes.",
        "S",
        "I:Book",
        "I:Book it",
        "I:Book it for",
        "I:Book it for two.",
        "E",
        "T:Book it for two.",
    ]
    assert stream[10][1] - stream[3][1] >= 0.15 - 0.01
    # One utterance in the conversation, whatever the STT made of it.
    assert [line.text for line in sim.get_call(call_id).conversation] == ["Yes. Book it for two."]


async def test_a_script_forces_or_prevents_a_split(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """Utterance.finals: the split a test wants (result.go sequence per final)."""
    caller = Caller(
        [
            Utterance("I want to book a table", finals=["I want to", "book a table"]),
            Utterance("Yes. Two. At eight.", finals=["Yes. Two. At eight."], wait_for_agent=False),
        ],
        hangup_after_s=None,
    )
    call_id = sim.inbound_call(caller=caller)
    await sim.wait_call_status(call_id, "progressing")
    trn_id = await _transcribe(sim, http, call_id)
    _, spk, _ = await post(
        http,
        sim.api_url + "/speakings",
        {"reference_type": "call", "reference_id": call_id, "direction": "out"},
    )
    await post(http, f"{sim.api_url}/speakings/{spk['id']}/say", {"text": "Hi!"})
    await sim.wait_for(lambda: len(_finals(sim, trn_id)) == 3)
    assert _finals(sim, trn_id) == ["I want to", "book a table", "Yes. Two. At eight."]
    assert re.fullmatch(r"(S,(I:[^,]+,)+E,T:[^,]+,){3}", ",".join(_codes(sim, trn_id)) + ",")


async def test_next_utterance_is_reported_after_the_previous_final(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """One result stream per transcribe direction (result.go keeps one `speaking` flag): speech
    said before the previous final is reported after it, never interleaved."""
    sim.settings.stt_final_delay_s = 0.2
    caller = Caller(
        [
            Utterance("first thing", wait_for_agent=False, pause_s=0.0),
            Utterance("second thing", wait_for_agent=False, pause_s=0.0),
        ],
        hangup_after_s=None,
    )
    call_id = sim.inbound_call(caller=caller)
    await sim.wait_call_status(call_id, "progressing")
    trn_id = await _transcribe(sim, http, call_id)
    await sim.wait_for(lambda: len(_finals(sim, trn_id)) == 2)
    codes = _codes(sim, trn_id)
    assert codes[: codes.index("T:first thing") + 1] == [
        "S",
        "I:first",
        "I:first thing",
        "E",
        "T:first thing",
    ]
    assert codes[codes.index("T:first thing") + 1 :] == [
        "S",
        "I:second",
        "I:second thing",
        "E",
        "T:second thing",
    ]


async def test_the_agent_heard_back_gives_out_speech_events(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """result.go runs for the `out` stream too: a `both` transcribe publishes speech events with
    direction `out` for the agent's own audio, then its transcript a final delay later."""
    call_id = await answered_call(sim, http)
    trn_id = await _transcribe(sim, http, call_id, direction="both")
    _, spk, _ = await post(
        http,
        sim.api_url + "/speakings",
        {"reference_type": "call", "reference_id": call_id, "direction": "out"},
    )
    await post(http, f"{sim.api_url}/speakings/{spk['id']}/say", {"text": "Welcome here."})
    await sim.wait_for(lambda: any(t.direction == "out" for t in sim.transcripts.values()))
    assert _codes(sim, trn_id, "out") == [
        "S",
        "I:Welcome",
        "I:Welcome here.",
        "E",
        "T:Welcome here.",
    ]
    assert _codes(sim, trn_id, "in") == []


# ----------------------------------------------------------------------------- backchannels


async def test_backchannel_while_the_agent_talks(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """A backchannel is speech like any other (result.go events and a transcript) said during
    the agent's reply; the caller's next turn still waits for that reply to end."""
    sim.settings.playback_chars_per_s = 100.0
    caller = Caller(
        [
            Utterance("hi", pause_s=0.0),
            Utterance("mm-hmm", backchannel_after_s=0.1),
            Utterance("thanks", pause_s=0.0),
        ],
        hangup_after_s=None,
    )
    call_id = sim.inbound_call(caller=caller)
    await sim.wait_call_status(call_id, "progressing")
    trn_id = await _transcribe(sim, http, call_id)
    _, spk, _ = await post(
        http,
        sim.api_url + "/speakings",
        {"reference_type": "call", "reference_id": call_id, "direction": "out"},
    )
    say = f"{sim.api_url}/speakings/{spk['id']}/say"
    await post(http, say, {"text": "Hello!"})
    call = sim.get_call(call_id)
    await sim.wait_for(lambda: "hi" in _finals(sim, trn_id))
    reply = "Here is a fairly long answer, it plays for about half a second."
    await post(http, say, {"text": reply})
    await sim.wait_for(
        lambda: len(call.conversation) == 5 and call.conversation[4].t_end is not None
    )
    agent_reply, backchannel, thanks = (
        call.conversation[2],
        call.conversation[3],
        call.conversation[4],
    )
    assert (agent_reply.text, backchannel.text, thanks.text) == (reply, "mm-hmm", "thanks")
    assert agent_reply.t_end is not None and backchannel.t_end is not None
    assert backchannel.t_start - agent_reply.t_start == pytest.approx(0.1, abs=0.05)
    assert backchannel.t_end < agent_reply.t_end  # said over the reply, which was not cut
    assert not agent_reply.cut
    # No new answer was needed: "thanks" follows the end of the reply it was said over.
    assert thanks.t_start >= agent_reply.t_end
    await sim.wait_for(lambda: len(_finals(sim, trn_id)) == 3)
    assert _finals(sim, trn_id) == ["hi", "mm-hmm", "thanks"]


# ----------------------------------------------------------------------------- silent failures


async def test_deafened_transcribe_stays_progressing_and_says_nothing(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """A silent STT failure (gcp.go gcpProcessResult returns on a Recv error; nothing updates
    the status): no more events, still `progressing`, still a 409 for a second one."""
    call_id = await answered_call(sim, http)
    trn_id = await _transcribe(sim, http, call_id)
    assert sim.faults.deafen_stt(call_id) == [trn_id]
    await sim.caller_says(call_id, "hello? anyone?")
    _, got, _ = await get(http, f"{sim.api_url}/transcribes/{trn_id}")
    assert got["status"] == "progressing"
    status, _, _ = await post(http, sim.api_url + "/transcribes", _body(call_id))
    assert status == 409
    # Nothing is pending either: a stop ends it, and a new one hears.
    await post(http, f"{sim.api_url}/transcribes/{trn_id}/stop")
    fresh = await _transcribe(sim, http, call_id)
    await sim.caller_says(call_id, "hello again")
    await sim.wait_for(lambda: _finals(sim, fresh) == ["hello again"])
    assert _codes(sim, trn_id) == []


async def test_deafen_one_transcribe(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """As above, per transcribe (gcp.go): the other transcribe of the call still hears."""
    call_id = await answered_call(sim, http)
    deaf = await _transcribe(sim, http, call_id)
    other = await _transcribe(sim, http, call_id, language="de-DE")
    sim.faults.deafen_transcribe(deaf)
    await sim.caller_says(call_id, "hallo")
    await sim.wait_for(lambda: _finals(sim, other) == ["hallo"])
    assert _codes(sim, deaf) == []


async def test_google_goes_deaf_after_its_stream_limit(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """bin-transcribe-manager/pkg/streaminghandler/gcp.go: the stream ends on Google's limit and
    is never reopened (measured: ~5 minutes); `gcp`, and `""` (start.go: GCP first), go deaf,
    `aws` does not."""
    sim.settings.gcp_deaf_after_s = 0.3
    call_id = await answered_call(sim, http)
    gcp = await _transcribe(sim, http, call_id, provider="gcp")
    default = await _transcribe(sim, http, call_id, provider="", language="de-DE")
    aws = await _transcribe(sim, http, call_id, provider="aws", language="fr-FR")
    await sim.caller_says(call_id, "early")
    await sim.wait_for(lambda: all(_finals(sim, t) == ["early"] for t in (gcp, default, aws)))
    t_start = sim.transcribes[gcp].t_start
    await sim.wait_for(lambda: time.monotonic() - t_start > 0.3)
    await sim.caller_says(call_id, "late")
    await sim.wait_for(lambda: _finals(sim, aws) == ["early", "late"])
    assert _finals(sim, gcp) == ["early"]
    assert _finals(sim, default) == ["early"]
    assert sim.transcribes[gcp].status == "progressing"


async def test_provider_down_falls_back_to_gcp_silently(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """bin-transcribe-manager/pkg/streaminghandler/start.go runSTT: a requested provider that
    fails to start is replaced by the default order (GCP first) without a word; the transcribe
    still reports the provider it asked for (transcribehandler/transcribe.go Create), and runs
    with Google's limits."""
    sim.settings.gcp_deaf_after_s = 0.3
    sim.faults.stt_provider_down("aws")
    call_id = await answered_call(sim, http)
    status, trn, _ = await post(http, sim.api_url + "/transcribes", _body(call_id, provider="aws"))
    assert (status, trn["provider"]) == (200, "aws")
    assert sim.transcribes[trn["id"]].engine == "gcp"
    await sim.caller_says(call_id, "heard")
    await sim.wait_for(lambda: _finals(sim, trn["id"]) == ["heard"])
    t_start = sim.transcribes[trn["id"]].t_start
    await sim.wait_for(lambda: time.monotonic() - t_start > 0.3)
    await sim.caller_says(call_id, "lost")
    # Google's silence, although the resource says aws; a working aws transcribe hears it.
    sim.faults.stt_provider_up("aws")
    aws = await _transcribe(sim, http, call_id, language="de-DE")
    assert sim.transcribes[aws].engine == "aws"
    await sim.caller_says(call_id, "back")
    await sim.wait_for(lambda: _finals(sim, aws) == ["back"])
    assert _finals(sim, trn["id"]) == ["heard"]


async def test_no_provider_can_start(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """start.go runSTT: with no provider working it logs "No handler executed successfully";
    the transcribe was already created (200, progressing) and hears nothing."""
    sim.faults.stt_provider_down("aws")
    sim.faults.stt_provider_down("gcp")
    call_id = await answered_call(sim, http)
    trn_id = await _transcribe(sim, http, call_id)
    await sim.caller_says(call_id, "hello")
    assert sim.transcribes[trn_id].status == "progressing"
    assert _codes(sim, trn_id) == []
    assert not any(kind.startswith(SPEECH) for kind, _ in sim.events)


# ----------------------------------------------------------------------------- orphans


async def test_orphan_blocks_a_new_transcribe_until_stopped(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """bin-transcribe-manager/pkg/transcribehandler/start.go startLive: a progressing orphan
    makes a new start for the call+language 409. stop.go stopLive: the streams are gone
    (streaminghandler/stop.go Get -> not found, "consider already stopped"), yet the stop
    answers 200 `done` with transcribe_done; then a new transcribe starts and hears."""
    call_id = await answered_call(sim, http)
    trn_id = await _transcribe(sim, http, call_id)
    assert sim.faults.orphan_stt() == [trn_id]
    await sim.caller_says(call_id, "is anyone listening")
    assert _codes(sim, trn_id) == []
    _, got, _ = await get(http, f"{sim.api_url}/transcribes/{trn_id}")
    assert got["status"] == "progressing"
    status, data, _ = await post(http, sim.api_url + "/transcribes", _body(call_id))
    assert (status, envelope(data)) == (409, ("ALREADY_EXISTS", "TRANSCRIBE_ALREADY_PROGRESSING"))
    _, listed, _ = await get(
        http, f"{sim.api_url}/transcribes?reference_type=call&reference_id={call_id}"
    )
    assert [t["id"] for t in listed["result"]] == [trn_id]
    status, stopped, _ = await post(http, f"{sim.api_url}/transcribes/{trn_id}/stop")
    assert (status, stopped["status"]) == (200, "done")
    assert sim.events[-1] == ("transcribe_done", stopped)
    fresh = await _transcribe(sim, http, call_id)
    await sim.caller_says(call_id, "now you hear me")
    await sim.wait_for(lambda: _finals(sim, fresh) == ["now you hear me"])


async def test_delete_clears_an_orphan(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """bin-transcribe-manager/pkg/transcribehandler/transcribe.go Delete: stops a progressing
    transcribe first (transcribe_done), soft-deletes its transcripts and itself; the deleted
    event is internal (db.go dbDelete PublishEvent). The api-manager lists with deleted=false
    (servicehandler/transcribe.go, transcript.go); GET by id still shows it."""
    call_id = await answered_call(sim, http)
    trn_id = await _transcribe(sim, http, call_id)
    await sim.caller_says(call_id, "before")
    await sim.wait_for(lambda: _finals(sim, trn_id) == ["before"])
    sim.faults.orphan_stt(call_id)
    status, deleted = await _delete(http, f"{sim.api_url}/transcribes/{trn_id}")
    assert status == 200
    assert deleted["status"] == "done" and deleted["tm_delete"] is not None
    assert deleted["tm_update"] == deleted["tm_delete"]
    assert [kind for kind, _ in sim.events[-1:]] == ["transcribe_done"]
    assert "transcribe_deleted" not in {kind for kind, _ in sim.events}
    _, listed, _ = await get(
        http, f"{sim.api_url}/transcribes?reference_type=call&reference_id={call_id}"
    )
    assert listed["result"] == []
    _, got, _ = await get(http, f"{sim.api_url}/transcribes/{trn_id}")
    assert got == deleted
    _, transcripts, _ = await get(http, f"{sim.api_url}/transcripts?transcribe_id={trn_id}")
    assert transcripts["result"] == []
    n_events = len(sim.events)
    status, again = await _delete(http, f"{sim.api_url}/transcribes/{trn_id}")
    assert (status, again) == (200, deleted)  # already deleted: unchanged
    assert len(sim.events) == n_events
    fresh = await _transcribe(sim, http, call_id)
    assert fresh != trn_id
    status, data = await _delete(http, f"{sim.api_url}/transcribes/{uuid.uuid4()}")
    assert (status, envelope(data)) == (404, ("NOT_FOUND", "TRANSCRIBE_NOT_FOUND"))


async def test_orphan_ends_when_the_call_hangs_up(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """transcribehandler/event.go EventCMCallHangup: whichever pod takes the hangup stops every
    transcribe of the call, an orphan included (stop.go, as above)."""
    call_id = await answered_call(sim, http)
    trn_id = await _transcribe(sim, http, call_id)
    sim.faults.orphan_stt(call_id)
    await sim.hangup(call_id)
    assert sim.transcribes[trn_id].status == "done"
    assert sim.leaks() == []
