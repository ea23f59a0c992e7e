"""The real daemon against the real simulator over loopback: whole calls, both directions."""

from __future__ import annotations

import asyncio

import pytest
from structlog.testing import capture_logs

from agentd.daemon import Daemon
from agentd.sim import Caller, Outcome, SimSettings, Simulator, Utterance
from agentd.voipbin import Credentials, Secret, VoipbinClient
from tests.support import CALLER, OUR_NUMBER, StartAgent


def ops(sim: Simulator, call_id: str) -> list[str]:
    """The agent's REST requests about one call, as 'METHOD /kind/action' names."""
    speakings = {s.id for s in sim.speakings.values() if s.reference_id == call_id}
    transcribes = {t.id for t in sim.transcribes.values() if t.reference_id == call_id}
    out = []
    for r in sim.requests:
        body_ref = r.body.get("reference_id") if isinstance(r.body, dict) else None
        parts = r.path.split("/")  # ['', 'v1.0', 'speakings', id, 'say']
        if body_ref == call_id or (
            len(parts) > 3 and parts[3] in speakings | transcribes | {call_id}
        ):
            out.append(f"{r.method} /{parts[2]}" + (f"/{parts[4]}" if len(parts) > 4 else ""))
    return out


async def test_full_inbound_call_makes_the_exact_rest_sequence(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent()
    caller = Caller([Utterance("Hello there"), Utterance("How are you")], hangup_after_s=0.05)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, caller)
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)

    seq = ops(sim, call_id)
    assert sorted(seq[:2]) == ["POST /speakings", "POST /transcribes"]
    assert seq[2:5] == ["POST /speakings/say"] * 3  # greeting + one per caller turn
    # VoIPBIN ends the transcribe itself at the hangup (transcribe_done): only the speaking's stop
    assert seq[5:] == ["POST /speakings/stop"]
    heard = [(line.who, line.text) for line in sim.get_call(call_id).conversation]
    assert heard == [
        ("agent", "Hello, thank you for calling. How can I help you today?"),
        ("caller", "Hello there"),
        ("agent", "You said: Hello there."),
        ("caller", "How are you"),
        ("agent", "You said: How are you."),
    ]
    # the greeting went out only once the speaking session was active (POST answered 201 active)
    say = sim.requests_matching("POST", r"/say$")[0]
    create = sim.requests_matching("POST", r"/speakings$")[0]
    assert create.status == 201 and say.t >= create.t
    assert sim.leaks() == []


async def test_calls_not_ours_are_left_alone(sim: Simulator, agent: StartAgent) -> None:
    daemon = await agent()
    other = sim.inbound_call("+15557770000", "+15558880000", Caller([], hangup_after_s=None))
    mine = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("hi")], hangup_after_s=0.05))
    await sim.wait_call_status(mine, "hangup", timeout=10)
    await sim.hangup(other)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    assert ops(sim, other) == []
    assert daemon.dispatcher.counters["ignored"] > 0


async def test_duplicated_events_are_answered_once(sim: Simulator, agent: StartAgent) -> None:
    daemon = await agent()
    sim.faults.duplicate_rate = 1.0  # every frame twice
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("just once please")]))
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    assert ops(sim, call_id).count("POST /speakings/say") == 2  # greeting + one answer
    assert daemon.dispatcher.counters["duplicates"] > 0


LONG_PREFIX = "Let me repeat " + "what you said, word for word, so that you know I heard it: " * 3


async def barge_in_call(sim: Simulator, agent: StartAgent, provider: str) -> tuple[Daemon, str]:
    """A caller who talks over the agent's long reply 0.1 s into it."""
    daemon = await agent(agent={"tts_provider": provider}, backend={"prefix": LONG_PREFIX})
    caller = Caller(
        [Utterance("first question"), Utterance("no wait stop", barge_in_after_s=0.1)],
        hangup_after_s=0.05,
    )
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, caller)
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    assert any(li.who == "agent" and li.cut for li in sim.get_call(call_id).conversation)
    assert [r.what for r in daemon.records].count("barge_in") == 1
    return daemon, call_id


@pytest.mark.parametrize("tts", ["gcp", "aws"])
async def test_barge_in_with_gcp_or_aws_flushes_and_drops_the_stale_reply(
    sim: Simulator, agent: StartAgent, tts: str
) -> None:
    _, call_id = await barge_in_call(sim, agent, tts)
    seq = ops(sim, call_id)
    assert seq.count("POST /speakings/flush") == 1
    assert seq.count("POST /speakings") == 1


async def test_barge_in_with_elevenlabs_stops_and_starts_a_new_session(
    sim: Simulator, agent: StartAgent
) -> None:
    _, call_id = await barge_in_call(sim, agent, "elevenlabs")
    seq = ops(sim, call_id)
    assert seq.count("POST /speakings") == 2  # the original and the one after the cut
    assert seq.count("POST /speakings/stop") == 2
    assert "POST /speakings/flush" not in seq


async def test_hangup_during_the_greeting_stops_both_sessions(
    sim: Simulator, agent: StartAgent
) -> None:
    await agent()
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_for(lambda: bool(sim.requests_matching("POST", r"/say$")), 5)
    await sim.hangup(call_id)
    await sim.wait_for(
        lambda: (
            not sim.leaks() and len(sim.requests_matching("POST", r"/speakings/[^/]+/stop$")) == 1
        ),
        5,
    )


async def test_speaking_that_starts_initiating_is_polled_before_the_greeting(
    agent: StartAgent, sim: Simulator
) -> None:
    sim.settings.speaking_initiating = True
    daemon = await agent()
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("hello")]))
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    polls = sim.requests_matching("GET", r"/speakings/[^/]+$")
    say = sim.requests_matching("POST", r"/say$")[0]
    assert polls and polls[0].t < say.t
    assert all(r.status == 200 for r in sim.requests_matching("POST", r"/say$"))


async def test_a_say_answered_404_gets_a_new_session(sim: Simulator, agent: StartAgent) -> None:
    daemon = await agent()
    sim.faults.fail("POST", r"/say$", 404, count=1)  # the greeting finds the session gone
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("hello")]))
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    assert ops(sim, call_id).count("POST /speakings") == 2
    agent_lines = [li.text for li in sim.get_call(call_id).conversation if li.who == "agent"]
    assert agent_lines[0].startswith("Hello, thank you")  # the greeting was said after all


async def test_wrapped_frames_are_understood(agent: StartAgent, sim: Simulator) -> None:
    sim.settings.wrapped_frames = True
    daemon = await agent()
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("wrapped hello")]))
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    assert "You said: wrapped hello." in [li.text for li in sim.get_call(call_id).conversation]


async def test_malformed_frames_are_counted_and_calls_go_on(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent()
    for frame in [
        "not json",
        "[1,2]",
        '{"id": 5, "status": "progressing", "direction": 1, "source": {}}',
        '{"transcribe_id": "x", "message": 7}',
        "{}",
    ]:
        await sim.faults.send_raw(frame)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("still there")]))
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    assert daemon.stream.stats.rejected == 5
    assert "You said: still there." in [li.text for li in sim.get_call(call_id).conversation]


async def test_websocket_drop_mid_call_reconnects_and_the_call_goes_on(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent()
    call_id = sim.inbound_call(
        CALLER,
        OUR_NUMBER,
        Caller([Utterance("before the drop"), Utterance("after the drop")], hangup_after_s=None),
    )
    await sim.wait_for(lambda: len(sim.requests_matching("POST", r"/say$")) >= 2, 5)
    connects = daemon.stream.stats.connects
    sim.faults.drop_websockets()
    await sim.wait_for(lambda: daemon.stream.stats.connects > connects, 10)
    await asyncio.wait_for(daemon.stream.ready.wait(), 10)
    await sim.wait_for(
        lambda: (
            "You said: after the drop." in [li.text for li in sim.get_call(call_id).conversation]
        ),
        10,
    )
    # reconciliation asked VoIPBIN about the live call after re-subscribing
    assert sim.requests_matching("GET", rf"/calls/{call_id}$")
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)


async def test_a_call_answered_while_disconnected_is_found_past_the_first_page_of_calls(
    sim: Simulator, agent: StartAgent
) -> None:
    # nothing is delivered while the socket is down; GET /calls answers 100 calls a page,
    # newest first, ended ones and other numbers' included: on a busy account the call we
    # missed is on the second page
    daemon = await agent()
    sim.faults.refuse_ws(count=1000)
    connects = daemon.stream.stats.connects
    sim.faults.drop_websockets()
    await sim.wait_for(lambda: daemon.stream.stats.state != "ready", 5)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_call_status(call_id, "progressing", timeout=5)
    others = [sim.inbound_call(f"+1555700{i:04d}", "+15559990000") for i in range(120)]
    for other in others:
        await sim.wait_call_status(other, "progressing", timeout=5)
    sim.faults.accept_ws()
    await sim.wait_for(lambda: daemon.stream.stats.connects > connects, 40)
    await sim.wait_for(lambda: call_id in daemon.dispatcher.calls, 10)
    await sim.wait_for(lambda: bool(sim.get_call(call_id).conversation), 10)  # greeted
    assert len(sim.requests_matching("GET", r"/calls$")) >= 2  # it read on past page one
    await sim.caller_says(call_id, "found you")
    await sim.wait_for(
        lambda: "You said: found you." in [li.text for li in sim.get_call(call_id).conversation],
        10,
    )
    assert not set(others) & set(daemon.dispatcher.calls)  # not ours: left alone
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)


async def test_a_call_answered_while_disconnected_is_found_when_the_list_fails_at_first(
    sim: Simulator, agent: StartAgent
) -> None:
    """The reconcile after the resubscribe cannot read GET /calls (503s past the request's
    deadline, shrunk from 20 s to 1 s): it tries again while the stream stays up, and finds the
    call once VoIPBIN answers. Nothing else would look before the next resubscribe, and the
    caller would wait in silence until VoIPBIN's one-hour cap."""
    sim.settings.rate_limit = False
    daemon = await agent(voipbin={"rate_per_s": 0})
    daemon.client.deadline_s = 1.0
    listed = lambda: [r.status for r in sim.requests_matching("GET", r"/calls$")]  # noqa: E731
    await sim.wait_for(lambda: 200 in listed(), 5)  # the first subscribe's reconcile is over
    sim.faults.fail("GET", r"/calls$", 503, count=1000)
    connects = daemon.stream.stats.connects
    with capture_logs() as lines:
        sim.faults.drop_websockets()
        call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
        await sim.wait_for(lambda: daemon.stream.stats.connects > connects, 10)
        failed = lambda: [li for li in lines if li["event"] == "reconcile.failed"]  # noqa: E731
        await sim.wait_for(lambda: bool(failed()), 10)
    assert call_id not in daemon.dispatcher.calls  # its progressing was lost with the stream
    sim.faults.heal()
    await sim.wait_for(lambda: bool(sim.get_call(call_id).conversation), 10)  # greeted
    assert listed()[-1] == 200
    assert failed()[0]["retry_in_s"] > 0  # the log line says when it reads again
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)


@pytest.mark.parametrize("legacy", [False, True], ids=["offset_ms", "tm_transcript"])
async def test_a_stream_outage_mid_utterance_is_no_end_of_turn(
    sim: Simulator, agent: StartAgent, legacy: bool
) -> None:
    # the caller's words stop arriving because the socket is down, not because they paused:
    # answering the half heard, then the whole read back, would be two answers to one turn.
    # Read back from the current server, and from one older than 2026-09 (`tm_transcript`, no
    # paging: docs/protocol.md §4.3). An outage as long as a read-back is waited for past the
    # end of the turn would end it (a reply asked on "book" would be said): this one is shorter
    sim.settings.legacy_transcripts = legacy
    daemon = await agent(agent={"final_wait_s": 5.0})
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_for(lambda: bool(sim.get_call(call_id).conversation), 10)  # greeted
    sim.world.settings.speech_words_per_s = 8.0  # slow enough to cut the socket mid-way
    text = "I would like to book a table for two people tomorrow evening at seven"
    saying = asyncio.create_task(sim.caller_says(call_id, text))
    call = daemon.dispatcher.calls[call_id]
    # cut after "book": words that could end a turn (after "to" the turn would go on anyway)
    await sim.wait_for(lambda: call.hearing is not None and "book" in call.hearing.text(), 5)
    sim.faults.refuse_ws(400, count=1000)  # a refusal retried at the base backoff
    sim.faults.drop_websockets()
    await saying
    await sim.wait_for(
        lambda: any(e == "transcript_created" and d["message"] == text for e, d in sim.events), 5
    )
    sim.faults.accept_ws()
    said = f"You said: {text}."
    await sim.wait_for(lambda: said in [li.text for li in sim.get_call(call_id).conversation], 20)
    replies = [r.body["text"] for r in sim.requests_matching("POST", r"/say$")][1:]
    assert replies == [said]
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)


async def test_outbound_call_is_served_when_answered(sim: Simulator, agent: StartAgent) -> None:
    daemon = await agent()
    sim.on_outbound(Outcome("answer"), Caller([Utterance("who is this")]))
    client = VoipbinClient(sim.api_url, Credentials(accesskey=Secret(sim.accesskey)))
    try:
        calls = await client.place_call(OUR_NUMBER, "+15559876543")
    finally:
        await client.close()
    call_id = calls[0]["id"]
    post = sim.requests_matching("POST", r"/calls$")[0]
    assert post.body["actions"] == [{"type": "sleep", "option": {"duration": 3600000}}]
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    assert "You said: who is this." in [li.text for li in sim.get_call(call_id).conversation]


async def test_unanswered_outbound_call_records_its_reason(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent()
    sim.on_outbound(Outcome("busy"))
    client = VoipbinClient(sim.api_url, Credentials(accesskey=Secret(sim.accesskey)))
    try:
        call_id = (await client.place_call(OUR_NUMBER, "+15559876543"))[0]["id"]
    finally:
        await client.close()
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await sim.wait_for(lambda: any(r.what == "ended" for r in daemon.records), 5)
    ended = [r for r in daemon.records if r.what == "ended"][0]
    assert ended.data["reason"] == "busy" and ended.call_id == call_id
    assert ops(sim, call_id) == []  # never answered: no session was started


@pytest.mark.slow  # 50 calls
async def test_fifty_concurrent_calls_are_all_served_and_cleaned_up(
    sim: Simulator, agent: StartAgent
) -> None:
    sim.settings.rate_limit = False
    daemon = await agent(
        voipbin={"rate_per_s": 0},  # this measures agentd, not the budget
        # Fifty callers' interims 25 ms apart on a loaded CI machine: the tests' 0.1 s end of
        # turn read from interims fired in a loop stall mid-utterance once (answering "caller
        # 6" while the caller went on, as tests/test_turn_taking.py covers). Replying on finals
        # keeps this test to serving and cleanup.
        agent={"reply_on": "final"},
    )
    ids = [
        sim.inbound_call(
            f"+1555000{i:04d}",
            OUR_NUMBER,
            Caller([Utterance(f"caller {i} here"), Utterance("bye now")]),
        )
        for i in range(50)
    ]
    for call_id in ids:
        await sim.wait_call_status(call_id, "hangup", timeout=30)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    for i, call_id in enumerate(ids):
        said = [li.text for li in sim.get_call(call_id).conversation if li.who == "agent"]
        assert said[1:] == [f"You said: caller {i} here.", "You said: bye now."]
    assert sim.leaks() == []


@pytest.mark.slow  # waits on the rate limit
async def test_rate_limited_account_still_serves_every_call(
    sim_settings: SimSettings, agent: StartAgent, sim: Simulator
) -> None:
    sim.settings.rate_per_s = 20.0
    sim.settings.burst = 5
    daemon = await agent(voipbin={"rate_per_s": 15.0, "burst": 5})
    ids = [
        sim.inbound_call(f"+1555000{i:04d}", OUR_NUMBER, Caller([Utterance("hi")]))
        for i in range(6)
    ]
    for call_id in ids:
        await sim.wait_call_status(call_id, "hangup", timeout=30)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    assert [r for r in sim.requests if r.status == 429] == []


async def test_a_sentence_is_said_when_the_stream_pauses_after_its_period(
    sim: Simulator, agent: StartAgent
) -> None:
    # model streams send the space after a period with the NEXT token; agentd must not wait
    release = asyncio.Event()

    class Tokens:
        async def reply(self, call_id: str, history: object):  # type: ignore[no-untyped-def]
            for token in ["It", " is", " noon", "."]:
                yield token
            await release.wait()  # the next token is slow
            yield " Anything else?"

        async def aclose(self) -> None:
            pass

    await agent(impl=Tokens())
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("time?")]))
    await sim.wait_for(
        lambda: any(
            r.body == {"text": "It is noon."} for r in sim.requests_matching("POST", r"/say$")
        ),
        5,
    )
    release.set()
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    said = [r.body["text"] for r in sim.requests_matching("POST", r"/say$")]
    assert said[1:] == ["It is noon.", "Anything else?"]


@pytest.mark.slow  # two refusals: 5 s backoffs (tests/test_stream.py covers refusals fast)
async def test_a_server_that_refuses_to_upgrade_is_retried(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent()
    sim.faults.refuse_ws(503, count=2)
    connects = daemon.stream.stats.connects
    sim.faults.drop_websockets()
    await sim.wait_for(lambda: daemon.stream.stats.connects > connects, 30)
    await asyncio.wait_for(daemon.stream.ready.wait(), 10)
    assert daemon.stream.stats.reconnects >= 3  # the drop, then two refusals
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("back again")]))
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    assert "You said: back again." in [li.text for li in sim.get_call(call_id).conversation]


async def test_a_goodbye_longer_than_the_drain_is_cut_and_the_call_still_ended(
    sim: Simulator, agent: StartAgent
) -> None:
    # without a store nobody else stops the sessions: a drain that ran out during the goodbye
    # (a long one, a slow VoIPBIN) left the caller on a call with no agent and both sessions
    # billed, and systemd's TimeoutStopSec (30 s) was still far off
    goodbye = "Sorry, " + "we really have to go now, " * 20 + "goodbye."
    daemon = await agent(
        daemon={"drain_s": 0.5, "shutdown_goodbye": goodbye, "stop_sessions_on_shutdown": True},
        store={"path": ""},
    )
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_for(lambda: bool(sim.get_call(call_id).conversation), 10)
    with capture_logs() as logged:
        daemon.stop()
        await asyncio.wait_for(daemon.stopped.wait(), 10)
    assert sim.get_call(call_id).status == "hangup"
    assert sim.leaks() == []
    events = [line["event"] for line in logged]
    assert "agentd.drain_expired" in events  # the goodbye was still playing: it was cut
    assert "agentd.drain_incomplete" not in events


async def test_stops_refused_through_a_storeless_drain_are_named_and_counted(
    sim: Simulator, agent: StartAgent
) -> None:
    # without a store nothing stops a session after the process is gone: a VoIPBIN refusing
    # every stop through the whole drain left the speaking billed, and all the operator saw was
    # an error naming the call
    daemon = await agent(
        daemon={"drain_s": 1.0}, store={"path": ""}, metrics={"listen": "127.0.0.1:0"}
    )
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_for(lambda: bool(sim.get_call(call_id).conversation), 10)
    (speaking,) = sim.world.speakings_of(call_id)
    for method, path in (("POST", r"/stop$"), ("DELETE", r"/(speakings|transcribes)/[^/]+$")):
        sim.faults.fail(method, path, 503, count=10_000)
    assert daemon.metrics is not None
    with capture_logs() as logged:
        daemon.stop()
        await asyncio.wait_for(daemon.stopped.wait(), 30)
    stops = [r for r in sim.requests if r.path.endswith(f"{speaking.id}/stop")]
    deletes = sim.requests_matching("DELETE", f"/speakings/{speaking.id}$")
    assert len(stops) > 1 and deletes  # retried, and escalated to a DELETE, within the budget
    (incomplete,) = [line for line in logged if line["event"] == "agentd.drain_incomplete"]
    assert incomplete["log_level"] == "error"
    named = {"call_id": call_id, "kind": "speaking", "session_id": speaking.id}
    assert named in incomplete["sessions"]
    leaks = [
        line
        for line in logged
        if line.get("what") == "leak" and line.get("session_id") == speaking.id
    ]
    assert leaks and leaks[0]["log_level"] == "error" and leaks[0]["shutdown"] is True
    assert daemon.metrics.registry.get_sample_value("agentd_leaks_total") >= 1
    assert daemon.status_snapshot().counters.leaks >= 1
    # it really is still billed: stopped by hand, as the operator would
    assert [s["id"] for s in sim.leaks()] == [speaking.id]
    sim.faults.heal()
    client = VoipbinClient(sim.api_url, Credentials(accesskey=Secret(sim.accesskey)))
    try:
        await client.stop_speaking(speaking.id)
    finally:
        await client.close()
