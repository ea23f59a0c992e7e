"""agentd against VoIPBIN as it really is: a real daemon, the faithful simulator and its faults.

Each test names the behaviour of the service it survives (docs/protocol.md): a tts pod that dies
(§8.3), a voice the provider refuses (§8.1), an STT that goes deaf or is orphaned (§10.2), one
sentence split into several finals and backchannels (§10.3).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from agentd.call import DEFAULT_GREETING, core
from agentd.daemon import Daemon
from agentd.names import Kind
from agentd.sim import Caller, Simulator, Utterance
from tests.support import CALLER, OUR_NUMBER, StartAgent, pod_killer

ECHO = "You said: "


def agent_said(sim: Simulator, call_id: str) -> list[str]:
    """What the caller heard the agent say, in full lines."""
    return [li.planned for li in sim.get_call(call_id).conversation if li.who == "agent"]


def unstopped(daemon: Daemon) -> list[str]:
    """The sessions agentd reported deleted over a stream VoIPBIN could not stop."""
    return [
        str(r.data["session_id"])
        for r in daemon.records
        if r.what is Kind.LEAK and r.data.get("unstopped")
    ]


def kinds(daemon: Daemon) -> list[str]:
    return [str(r.what) for r in daemon.records]


async def greeted(sim: Simulator, call_id: str) -> None:
    await sim.wait_for(lambda: bool(agent_said(sim, call_id)), 10)


async def ends_clean(sim: Simulator, daemon: Daemon, call_id: str) -> None:
    if sim.get_call(call_id).status != "hangup":
        await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    assert sim.leaks() == []


def paced(daemon: Daemon, **waits: float) -> None:
    """Waits that are VoIPBIN's pace, not config keys, shrunk like the simulator's (for the
    calls that come next)."""
    daemon.config = replace(daemon.config, call=replace(daemon.config.call, **waits))


def open_line(*utterances: Utterance) -> Caller:
    return Caller(list(utterances), hangup_after_s=None)


# -- TTS ------------------------------------------------------------------------------------------


async def test_a_dead_tts_pod_is_deleted_and_replaced_and_the_reply_is_still_heard(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent()
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await greeted(sim, call_id)
    await sim.wait_for(lambda: not sim.world.agent_busy(call_id), 5)
    [dead] = [s.id for s in sim.world.speakings_of(call_id)]
    sim.faults.kill_tts_pod(dead)
    await sim.caller_says(call_id, "are you there")
    await sim.wait_for(lambda: f"{ECHO}are you there." in agent_said(sim, call_id), 15)
    # /say kept failing on the dead pod: deleted (a /stop would fail too), never adopted again
    assert sim.requests_matching("DELETE", rf"/speakings/{dead}$")
    assert Kind.SPEAKING_LOST in kinds(daemon)
    assert len(sim.requests_matching("POST", r"/speakings$")) == 2
    [heard] = [
        r
        for r in sim.requests_matching("POST", r"/say$")
        if "are you there" in str(r.body) and r.status == 200
    ]
    assert dead not in heard.path
    await ends_clean(sim, daemon, call_id)
    # the dead pod's row was deleted, the one thing a client can do; VoIPBIN still bills it,
    # and said so (the row came back `active`): the operator is told, by the session's id
    assert sim.stranded() == [dead]
    assert unstopped(daemon) == [dead]


async def test_a_create_slower_than_the_gateway_is_waited_for_not_deleted_under_its_pod(
    sim: Simulator, agent: StartAgent
) -> None:
    # the gateway answers 503 after its budget; the pod goes on and sets the row active,
    # whatever became of it: a row deleted in between would stream on, deleted, billed for good
    sim.world.settings.speaking_create_s = 3 * sim.world.settings.pod_rpc_timeout_s
    daemon = await agent()
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await greeted(sim, call_id)
    creates = sim.requests_matching("POST", r"/speakings$")
    assert [r.status for r in creates] == [503]
    [row] = sim.world.speakings_of(call_id)
    assert sim.requests_matching("POST", rf"/speakings/{row.id}/say$")  # the greeting, on it
    assert sim.requests_matching("DELETE", r"/speakings/") == []
    await ends_clean(sim, daemon, call_id)
    assert sim.stranded() == []


async def test_a_pod_that_dies_inside_the_create_is_given_up_and_the_greeting_heard_on_another(
    sim: Simulator, agent: StartAgent
) -> None:
    # its row stays `initiating` for good (docs/protocol.md §8.3) and blocks a new create until
    # it is deleted: waited for as a slow create's would be, then deleted, and the call is
    # greeted on a new one (a restart in between waits again from its own create)
    daemon = await agent()
    daemon.executor.setup_grace_s = 0.5  # VoIPBIN's pace (10 s), shrunk like the simulator's
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    kill_the_first_create, killed = pod_killer(sim, call_id)
    await sim.wait_for(kill_the_first_create, 5)
    await greeted(sim, call_id)
    [greeting] = sim.requests_matching("POST", r"/say$")
    assert killed[0] not in greeting.path
    assert sim.requests_matching("DELETE", rf"/speakings/{killed[0]}$")
    assert len(sim.requests_matching("POST", r"/speakings$")) >= 2
    await ends_clean(sim, daemon, call_id)


async def test_a_voice_the_provider_refuses_ends_the_call_after_a_bounded_number_of_sessions(
    sim: Simulator, agent: StartAgent
) -> None:
    # an ElevenLabs voice id with aws: Polly refuses it, VoIPBIN answers 404 to every /say
    daemon = await agent(agent={"tts_provider": "aws", "voice_id": "21m00Tcm4TlvDq8ikWAM"})
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await sim.wait_call_status(call_id, "hangup", timeout=15)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    restarts = daemon.config.call.max_speaking_restarts
    assert len(sim.requests_matching("POST", r"/speakings$")) == 1 + restarts
    [error] = [r for r in daemon.records if r.what is Kind.ERROR]
    assert error.data["what"] == "say refused on every session"
    assert error.data["tts_provider"] == "aws"
    assert sim.leaks() == []


async def test_tts_provider_aws_alone_works(sim: Simulator, agent: StartAgent) -> None:
    daemon = await agent(agent={"tts_provider": "aws"})
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line(Utterance("hello")))
    await sim.wait_for(lambda: f"{ECHO}hello." in agent_said(sim, call_id), 10)
    [create] = sim.requests_matching("POST", r"/speakings$")
    assert create.body["provider"] == "aws"
    assert [r.status for r in sim.requests_matching("POST", r"/say$")] == [200, 200]
    await ends_clean(sim, daemon, call_id)


# a reply of ~1.3 s of audio at the tests' playback speed, one of its sentences alone longer
# than the aws buffer below (0.3 s, 120 characters)
LONG_REPLY = (
    "Sure. "
    + "This sentence is only here to make the reply longer than the buffer. " * 4
    + "And this one goes on and on, word after word and clause after clause, far longer than"
    " the audio a tts pod holds ahead of its playback at one time, so it is said in parts. "
)


async def test_an_aws_reply_longer_than_the_pods_buffer_is_said_whole_without_a_503(
    sim: Simulator, agent: StartAgent
) -> None:
    # aws.go: a say whose audio does not fit the pod's buffer waits inside its /say request,
    # and one that waits past the gateway's budget answers 503 (while it plays all the same)
    sim.settings.aws_buffer_s = 0.3
    daemon = await agent(agent={"tts_provider": "aws"}, backend={"prefix": LONG_REPLY})
    paced(daemon, aws_ahead_s=0.2)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line(Utterance("hello")))
    # its last sentences may go out as one /say (queued together behind a held one)
    await sim.wait_for(lambda: " ".join(agent_said(sim, call_id)).endswith("hello."), 10)
    statuses = [r.status for r in sim.requests_matching("POST", r"/say$")]
    assert set(statuses) == {200}, statuses
    assert len(statuses) > 4  # the reply went out in parts as the audio played
    heard = " ".join(agent_said(sim, call_id)[1:])
    assert heard == f"{LONG_REPLY}hello."  # the echo backend's prefix, then the words
    assert Kind.SPEAKING_LOST not in kinds(daemon)
    assert len(sim.requests_matching("POST", r"/speakings$")) == 1
    await ends_clean(sim, daemon, call_id)


async def test_a_barge_in_on_a_dead_pod_deletes_the_session_and_the_answer_is_heard(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent()
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await greeted(sim, call_id)
    [dead] = [s.id for s in sim.world.speakings_of(call_id)]
    sim.faults.kill_tts_pod(dead)  # the greeting falls silent; agentd thinks it still plays
    await sim.caller_says(call_id, "wait there")
    await sim.wait_for(lambda: f"{ECHO}wait there." in agent_said(sim, call_id), 15)
    assert Kind.BARGE_IN in kinds(daemon)
    # the cut's /stop failed on the dead pod: it became a DELETE at once
    assert sim.requests_matching("DELETE", rf"/speakings/{dead}$")
    await ends_clean(sim, daemon, call_id)
    assert sim.stranded() == [dead]
    assert unstopped(daemon) == [dead]


async def test_a_say_refused_429_for_longer_than_its_deadline_is_heard_once_the_wait_is_over(
    sim: Simulator, agent: StartAgent
) -> None:
    # a Retry-After past what is left of the say's deadline fails it at once; VoIPBIN's
    # limiter refused it before anything ran, so it is sent again once the wait is over
    daemon = await agent()
    daemon.client.deadline_s = 0.5  # a Retry-After of 1 s is past it (the default is 20 s)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await greeted(sim, call_id)
    sim.faults.fail("POST", r"/say$", 429, retry_after=1.0)
    await sim.caller_says(call_id, "are you there")
    await sim.wait_for(lambda: f"{ECHO}are you there." in agent_said(sim, call_id), 10)
    says = [r for r in sim.requests_matching("POST", r"/say$") if "are you" in str(r.body)]
    assert [r.status for r in says] == [429, 200]
    assert says[1].t - says[0].t >= 1.0  # the Retry-After was waited out
    await ends_clean(sim, daemon, call_id)


async def test_a_transcript_with_a_lone_surrogate_escape_is_answered(
    sim: Simulator, agent: StartAgent
) -> None:
    # valid JSON that no UTF-8 encoder can write back: it once failed the event's log line,
    # and the caller was never answered
    daemon = await agent()
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await greeted(sim, call_id)
    await sim.caller_says(call_id, "hello \ud83d there")
    await sim.wait_for(lambda: f"{ECHO}hello \ufffd there." in agent_said(sim, call_id), 10)
    await ends_clean(sim, daemon, call_id)


# -- lost events ----------------------------------------------------------------------------------


def calls_listed(sim: Simulator) -> int:
    return len(sim.requests_matching("GET", r"/calls$"))


async def test_a_new_call_whose_events_were_all_lost_with_the_stream_up_is_found(
    sim: Simulator, agent: StartAgent
) -> None:
    # "a client more than 2,000 messages behind loses events silently" (docs/protocol.md):
    # every event of the call is lost, the stream stays up, no reconcile runs
    daemon = await agent(voipbin={"find_calls_s": 0.3})
    await sim.wait_for(lambda: calls_listed(sim) >= 1, 5)  # the subscribe's reconcile is done
    sim.faults.lose_rate = 1.0
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await sim.wait_for(lambda: sim.get_call(call_id).action.get("type") == "sleep", 5)
    sim.faults.lose_rate = 0.0  # answered, and all of it lost
    connects = daemon.stream.stats.connects
    await greeted(sim, call_id)
    assert daemon.stream.stats.connects == connects  # found without a new subscribe
    await sim.caller_says(call_id, "anyone there")
    await sim.wait_for(lambda: f"{ECHO}anyone there." in agent_said(sim, call_id), 10)
    assert agent_said(sim, call_id).count(DEFAULT_GREETING) == 1
    await ends_clean(sim, daemon, call_id)


async def test_a_ringing_call_whose_answer_was_lost_is_greeted_before_its_watch(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent(voipbin={"find_calls_s": 0.3})  # agent.watch_s stays 20 s
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line(), answer_after_s=1.0)
    await sim.wait_for(lambda: call_id in daemon.dispatcher.calls, 5)  # ringing, heard
    sim.faults.lose_rate = 1.0
    await sim.wait_for(lambda: sim.get_call(call_id).action.get("type") == "sleep", 5)
    sim.faults.lose_rate = 0.0  # answered, and its call_updated lost
    await greeted(sim, call_id)
    await ends_clean(sim, daemon, call_id)


async def test_a_call_answered_and_hung_up_before_the_subscription_took_effect_is_served(
    sim: Simulator, agent: StartAgent
) -> None:
    # "subscriptions take effect asynchronously": here later than the reconcile that follows
    # the subscribe, and the call is answered in between
    daemon = await agent(voipbin={"find_calls_s": 0.3})
    sim.settings.subscribe_bind_s = 1.0
    connects = daemon.stream.stats.connects
    listed = calls_listed(sim)
    sim.faults.drop_websockets()
    await sim.wait_for(lambda: daemon.stream.stats.connects > connects, 10)
    await sim.wait_for(lambda: calls_listed(sim) > listed, 5)  # the reconcile, before the bind
    assert not all(c.subscriptions for c in sim.ws_connections if not c.closed)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await greeted(sim, call_id)
    # hung up before the subscription took effect either: its call_hangup is lost too
    assert not all(c.subscriptions for c in sim.ws_connections if not c.closed)
    await ends_clean(sim, daemon, call_id)


@pytest.mark.parametrize("lost", [False, True], ids=["events", "events lost"])
async def test_a_call_an_operator_deletes_mid_call_is_ended_and_cleaned_up(
    sim: Simulator, agent: StartAgent, lost: bool
) -> None:
    # `DELETE /calls/{id}` (someone else's tool, VoIPBIN's console): the call is hung up and
    # deleted at once, then VoIPBIN refuses it with 409 STATE_INVALID (docs/protocol.md §5).
    # Its events (terminating, deleted, hangup) end it; lost, the watch's GET finds the 409
    daemon = await agent(agent={"watch_s": 0.5})
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await greeted(sim, call_id)
    sim.faults.lose_rate = 1.0 if lost else 0.0
    headers = {"Cookie": f"accesskey={sim.accesskey}"}
    async with (
        aiohttp.ClientSession(headers=headers) as http,
        http.delete(f"{sim.api_url}/calls/{call_id}") as resp,
    ):
        assert resp.status == 200
    await sim.wait_call_status(call_id, "hangup")
    sim.faults.lose_rate = 0.0
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    assert sim.leaks() == []  # its speaking stopped: VoIPBIN does not at hangup
    checks = [r.status for r in sim.requests_matching("GET", rf"/calls/{call_id}$")]
    assert (409 in checks) == lost


# -- STT ------------------------------------------------------------------------------------------


async def test_at_hangup_voipbin_ends_the_transcribe_and_no_stop_is_sent(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent()
    for by in ("remote", "local"):  # the caller hangs up, or the call is hung up on our side
        call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
        await greeted(sim, call_id)
        await sim.hangup(call_id, by=by)
        await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
        assert sim.leaks() == []
    # the speakings were stopped (they bill until then); the transcribes needed no request
    assert len(sim.requests_matching("POST", r"/speakings/[^/]+/stop$")) == 2
    assert sim.requests_matching("POST", r"/transcribes/[^/]+/stop$") == []


async def test_a_transcribe_voipbin_fails_to_end_at_hangup_is_stopped_late(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent()
    paced(daemon, transcribe_end_wait_s=0.3)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await greeted(sim, call_id)
    [trn] = [t.id for t in sim.world.transcribes_of(call_id)]
    sim.faults.fail_stt_hangup_end()
    await sim.hangup(call_id)
    assert sim.leaks() != []  # VoIPBIN left it progressing
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    assert len(sim.requests_matching("POST", rf"/transcribes/{trn}/stop$")) == 1
    assert sim.leaks() == []


async def _replaced_when_quiet(sim: Simulator, agent: StartAgent, fault: str) -> None:
    daemon = await agent(agent={"silence_s": 0.5})
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await greeted(sim, call_id)
    await sim.wait_for(lambda: len(sim.requests_matching("POST", r"/transcribes$")) == 1, 5)
    if fault == "deaf":
        sim.faults.deafen_stt(call_id)
    else:
        sim.faults.orphan_stt(call_id)
    # the caller talks, nobody hears; the agent's silence check replaces the transcribe
    await sim.caller_says(call_id, "hello")
    [old] = [t.id for t in sim.world.transcribes_of(call_id)]
    await sim.wait_for(lambda: Kind.TRANSCRIBE_RESTARTED in kinds(daemon), 10)
    call = daemon.dispatcher.calls[call_id]
    await sim.wait_for(lambda: call.transcribe.active and call.transcribe_id != old, 10)
    assert sim.world.transcribes[old].status == "done"  # stopped: it bills no more
    await sim.caller_says(call_id, "hello again")
    await sim.wait_for(lambda: f"{ECHO}hello again." in agent_said(sim, call_id), 10)
    await ends_clean(sim, daemon, call_id)


async def test_a_deaf_transcribe_is_replaced_before_the_caller_is_hung_up_on(
    sim: Simulator, agent: StartAgent
) -> None:
    await _replaced_when_quiet(sim, agent, "deaf")


async def test_an_orphaned_transcribe_is_replaced_and_never_adopted(
    sim: Simulator, agent: StartAgent
) -> None:
    await _replaced_when_quiet(sim, agent, "orphan")


async def test_words_lost_to_a_late_subscription_are_heard_when_the_quiet_transcribe_is_replaced(
    sim: Simulator, agent: StartAgent
) -> None:
    # "subscriptions take effect asynchronously", here later than the reconcile that follows
    # the subscribe: the caller speaks in between and every event of it is lost. The silence
    # reprompt replaces the transcribe, which may be deaf: what it heard is read back first
    daemon = await agent(agent={"silence_s": 4.0})
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await greeted(sim, call_id)
    sim.settings.subscribe_bind_s = 1.5
    connects, listed = daemon.stream.stats.connects, calls_listed(sim)
    sim.faults.drop_websockets()
    await sim.wait_for(lambda: daemon.stream.stats.connects > connects, 10)
    await sim.wait_for(lambda: calls_listed(sim) > listed, 5)  # the reconcile, before the bind
    await sim.caller_says(call_id, "are you there")
    assert not all(c.subscriptions for c in sim.ws_connections if not c.closed)  # all lost
    await sim.wait_for(lambda: Kind.TRANSCRIBE_RESTARTED in kinds(daemon), 10)
    await sim.wait_for(lambda: f"{ECHO}are you there." in agent_said(sim, call_id), 10)
    await ends_clean(sim, daemon, call_id)


async def test_a_transcribe_outage_longer_than_the_retries_is_waited_out_and_the_caller_heard(
    sim: Simulator, agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    """POST /transcribes answers 503 for longer than the first retries and than the silence
    goodbye takes: the caller is greeted, and neither reprompted nor hung up on while nobody
    can hear them; once VoIPBIN answers again a transcribe is started and they are answered."""
    import agentd.voipbin

    monkeypatch.setattr(agentd.voipbin, "TRANSCRIBE_START_RETRY_S", 0.3)
    sim.settings.rate_limit = False
    daemon = await agent(voipbin={"rate_per_s": 0}, agent={"silence_s": 1.0})
    paced(daemon, retry_s=0.1, transcribe_retry_max_s=0.4, greet_wait_s=0.5)
    sim.faults.fail("POST", r"/transcribes$", 503, count=1000)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await greeted(sim, call_id)
    await sim.wait_for(lambda: Kind.TRANSCRIBE_DOWN in kinds(daemon), 10)

    def outage_s() -> float:
        creates = sim.requests_matching("POST", r"/transcribes$")
        return creates[-1].t - creates[0].t

    # longer than the silence goodbye takes (three silences of 1 s after the greeting)
    await sim.wait_for(lambda: outage_s() > 5.0, 15)
    assert sim.get_call(call_id).status == "progressing"
    assert agent_said(sim, call_id) == [DEFAULT_GREETING]
    sim.faults.heal()
    await sim.wait_for(lambda: bool(sim.world.transcribes_of(call_id)), 5)
    await sim.wait_for(lambda: Kind.TRANSCRIBE_RESTARTED in kinds(daemon), 5)
    await sim.wait_for(lambda: not sim.world.agent_busy(call_id), 5)
    await sim.caller_says(call_id, "can anybody hear me")
    await sim.wait_for(lambda: f"{ECHO}can anybody hear me." in agent_said(sim, call_id), 10)
    assert Kind.SILENCE_HANGUP not in kinds(daemon)
    await ends_clean(sim, daemon, call_id)


async def test_one_sentence_in_two_finals_gets_one_answer_and_no_self_interruption(
    sim: Simulator, agent: StartAgent
) -> None:
    daemon = await agent()
    said = "I want to book a table. For two people."
    call_id = sim.inbound_call(
        CALLER,
        OUR_NUMBER,
        Caller([Utterance(said, finals=["I want to book a table.", "For two people."])]),
    )
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    replies = [line for line in agent_said(sim, call_id) if line.startswith(ECHO)]
    assert replies == [f"{ECHO}{said}"]
    assert Kind.BARGE_IN not in kinds(daemon)
    assert not sim.requests_matching("POST", r"/speakings/[^/]+/stop$")[:-1]  # only the hangup's
    assert sim.leaks() == []


async def test_a_backchannel_over_the_reply_neither_cuts_it_nor_gets_an_answer(
    sim: Simulator, agent: StartAgent
) -> None:
    long = "one two three four five six seven eight nine ten " * 3
    daemon = await agent(backend={"prefix": long})
    call_id = sim.inbound_call(
        CALLER,
        OUR_NUMBER,
        Caller(
            [
                Utterance("tell me"),
                Utterance("mm-hmm", backchannel_after_s=0.01),
                Utterance("thanks"),
            ]
        ),
    )
    await sim.wait_call_status(call_id, "hangup", timeout=15)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    assert Kind.BARGE_IN not in kinds(daemon)
    assert Kind.BACKCHANNEL in kinds(daemon)
    lines = sim.get_call(call_id).conversation
    assert not any(li.cut for li in lines if li.who == "agent")
    answers = [li.planned for li in lines if li.who == "agent" and "mm-hmm" in li.planned]
    assert answers == []
    assert sim.leaks() == []


async def test_a_transcribe_the_last_agentd_started_is_stopped_though_the_call_ended_meanwhile(
    sim: Simulator, agent: StartAgent, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """VoIPBIN makes a transcribe seconds after its start was asked (media first, the row
    last): agentd restarts in between, the caller hangs up in the gap, and the row comes after
    the next agentd found none and ended the call. No hangup ends a transcribe made after it:
    the call is kept until its transcribes were looked for, and that one is stopped."""
    monkeypatch.setattr(core, "TRANSCRIBE_SWEEP_S", 2.0)  # as long as such a start may take
    sim.settings.rate_limit = False
    sim.settings.transcribe_start_s = 1.0
    common: dict[str, dict[str, object]] = {
        "voipbin": {"rate_per_s": 0},
        "store": {"path": str(tmp_path / "shared.db")},
    }
    first = await agent(daemon={"stop_sessions_on_shutdown": False, "drain_s": 0.5}, **common)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, open_line())
    await sim.wait_for(lambda: len(sim.world.speakings_of(call_id)) == 1, 5)
    first.stop()  # its POST /transcribes is still under way at VoIPBIN
    await asyncio.wait_for(first.stopped.wait(), 10)
    await sim.hangup(call_id)
    second = await agent(**common)
    await sim.wait_for(lambda: bool(sim.world.transcribes_of(call_id)), 5)  # made after all
    await asyncio.wait_for(second.dispatcher.wait_idle(), 15)
    assert sim.leaks() == []
    assert "stray" in kinds(second)
