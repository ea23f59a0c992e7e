"""Fault injection against the simulator: every call still ends cleanly, nothing leaks."""

from __future__ import annotations

import asyncio
import itertools
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from agentd.call import DEFAULT_GREETING
from agentd.events import STATUS_RANK, CallEvent, Parsed
from agentd.sim import Caller, Simulator, Utterance
from tests.support import OUR_NUMBER, StartAgent

# fault injection under load: seconds per test
pytestmark = pytest.mark.slow


def answers(sim: Simulator, call_id: str) -> Counter[str]:
    return Counter(li.planned for li in sim.get_call(call_id).conversation if li.who == "agent")


async def run_calls(sim: Simulator, n: int, *, limit_s: float = 30.0) -> list[str]:
    ids = [
        sim.inbound_call(
            f"+1555000{i:04d}",
            OUR_NUMBER,
            Caller(
                [Utterance(f"question one from {i}"), Utterance(f"question two from {i}")],
                hangup_after_s=0.05,
            ),
        )
        for i in range(n)
    ]
    await sim.wait_for(lambda: all(sim.get_call(c).status == "hangup" for c in ids), limit_s)
    return ids


async def test_duplicated_and_lost_events(sim: Simulator, agent: StartAgent) -> None:
    sim.settings.rate_limit = False
    sim.faults.seed(7)
    sim.faults.duplicate_rate = 0.10
    sim.faults.lose_rate = 0.02
    # a lost transcript or hangup is found by asking VoIPBIN: make the watch quick for the test
    daemon = await agent(agent={"watch_s": 1.0}, voipbin={"rate_per_s": 0})
    ids = await run_calls(sim, 20)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 15)
    assert daemon.dispatcher.counters["duplicates"] > 0
    for call_id in ids:
        said = answers(sim, call_id)
        assert max(said.values()) == 1, f"a reply was said twice: {said}"
    assert sim.leaks() == []


async def test_events_out_of_order(sim: Simulator, agent: StartAgent) -> None:
    """VoIPBIN keeps no order (docs/protocol.md §3.4): the events published together (a call's
    created/updated/progressing, a final's speech_ended and transcript, a call_hangup and its
    transcribe_done) arrive in any order. Held up to 15 ms each here, less than the simulated
    caller's 25 ms between words: every question is still answered, once."""
    sim.settings.rate_limit = False
    sim.faults.seed(11)
    sim.faults.jitter_s = 0.015
    sim.faults.duplicate_rate = 0.10
    daemon = await agent(agent={"watch_s": 1.0}, voipbin={"rate_per_s": 0})
    statuses: dict[str, list[str]] = {}  # each call's statuses, in the order agentd got them
    deliver = daemon.stream._on_parsed

    def record(parsed: Parsed) -> None:
        if isinstance(parsed.event, CallEvent):
            statuses.setdefault(parsed.event.call.id, []).append(parsed.event.call.status)
        deliver(parsed)

    daemon.stream._on_parsed = record
    ids = await run_calls(sim, 10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 15)
    for i, call_id in enumerate(ids):
        said = answers(sim, call_id)
        assert max(said.values()) == 1, f"a reply was said twice: {said}"
        assert f"You said: question one from {i}." in said, said
        assert f"You said: question two from {i}." in said, said
    assert sim.leaks() == []
    # the fault bit: some call's status went backwards on the way (ringing after progressing)
    ranks = [[STATUS_RANK[s] for s in seen] for seen in statuses.values()]
    assert any(b < a for seen in ranks for a, b in itertools.pairwise(seen))


async def test_bursts_of_5xx_and_429(sim: Simulator, agent: StartAgent) -> None:
    sim.settings.rate_limit = False
    daemon = await agent(voipbin={"rate_per_s": 0})
    sim.faults.fail("POST", r"/transcribes$", 503, count=3)
    sim.faults.fail("POST", r"/speakings$", 500, count=2)
    sim.faults.fail("POST", r"/stop$", 502, count=4)
    sim.faults.fail("GET", r".*", 429, count=3, retry_after=0.1)
    sim.faults.fail("POST", r"/say$", 429, count=3, retry_after=0.1)
    ids = await run_calls(sim, 5)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 15)
    for call_id in ids:
        said = answers(sim, call_id)
        assert max(said.values()) == 1
        assert f"You said: question two from {ids.index(call_id)}." in said
    assert sim.leaks() == []


async def test_the_greeting_waits_for_a_transcribe_that_is_slow_to_start(
    sim: Simulator, agent: StartAgent
) -> None:
    """The voice is up before the transcribe (its create refused 429 twice): a greeting said
    at once would be answered to nobody. It waits for the transcribe, and the answer is heard."""
    sim.settings.rate_limit = False
    daemon = await agent(voipbin={"rate_per_s": 0})
    sim.faults.fail("POST", r"/transcribes$", 429, count=2, retry_after=0.5)
    call_id = sim.inbound_call(
        "+15550001111", OUR_NUMBER, Caller([Utterance("hello there")], hangup_after_s=0.5)
    )
    await sim.wait_for(lambda: sim.get_call(call_id).status == "hangup", 20)
    said = [li.planned for li in sim.get_call(call_id).conversation if li.who == "agent"]
    assert said[1:] == ["You said: hello there."], said
    (created,) = [r for r in sim.requests_matching("POST", r"/transcribes$") if r.status == 200]
    first_say = sim.requests_matching("POST", r"/say$")[0]
    assert created.t < first_say.t  # someone was listening before the caller was greeted
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 15)
    assert sim.leaks() == []


async def test_an_outage_of_the_speaking_create_is_waited_out_and_the_caller_greeted(
    sim: Simulator, agent: StartAgent
) -> None:
    """POST /speakings answers 503 at the answer for a while (a gateway blip): the call retries,
    ever less often, and greets the caller once VoIPBIN answers again; the caller is answered."""
    sim.settings.rate_limit = False
    daemon = await agent(voipbin={"rate_per_s": 0})
    # VoIPBIN's pace, shrunk: retried from 0.2 s doubling to 0.4 s, for 3 s at most
    waits = {"retry_s": 0.2, "speaking_retry_max_s": 0.4, "speaking_outage_s": 3.0}
    daemon.config = replace(daemon.config, call=replace(daemon.config.call, **waits))
    sim.faults.fail("POST", r"/speakings$", 503, count=6)
    call_id = sim.inbound_call(
        "+15550001111", OUR_NUMBER, Caller([Utterance("hello there")], hangup_after_s=0.5)
    )
    await sim.wait_for(lambda: sim.get_call(call_id).status == "hangup", 20)
    said = [li.planned for li in sim.get_call(call_id).conversation if li.who == "agent"]
    assert said == [DEFAULT_GREETING, "You said: hello there."], said
    creates = [r.status for r in sim.requests_matching("POST", r"/speakings$")]
    assert creates == [503] * 6 + [201], creates
    assert sim.get_call(call_id).hangup_by != "local"  # the caller hung up, not agentd
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 15)
    assert sim.leaks() == []


async def test_a_hangup_does_not_wait_behind_a_slow_say(sim: Simulator, agent: StartAgent) -> None:
    """The caller hangs up while the greeting's /say hangs: the speaking's stop goes out at once
    (it does not queue behind the say, keeping a billed session open), and nothing more is said."""
    sim.settings.rate_limit = False
    daemon = await agent(voipbin={"rate_per_s": 0})
    sim.faults.delay("POST", r"/say$", 5.0)
    call_id = sim.inbound_call("+15550001111", OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_for(lambda: sim.faults.held == 1, 10)  # the greeting's /say is held
    await sim.hangup(call_id)
    await sim.wait_for(lambda: bool(sim.requests_matching("POST", r"/speakings/[^/]+/stop$")), 10)
    assert sim.requests_matching("POST", r"/say$") == []  # still held when the stop came
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 15)
    assert sim.leaks() == []
    assert len(sim.requests_matching("POST", r"/say$")) <= 1  # the held one, never another


class LongReply:
    """A reply of sixty sentences: seconds of audio the caller can cut into."""

    async def reply(self, call_id: str, history: object) -> AsyncIterator[str]:
        yield " ".join(f"This is sentence number {i} of a long answer." for i in range(60))

    async def aclose(self) -> None:
        pass


async def test_a_barge_in_does_not_wait_behind_a_slow_say(
    sim: Simulator, agent: StartAgent
) -> None:
    """The reply's /say hangs (a slow tts pod) and the caller talks over the reply: its stop
    goes out at once, not seconds later behind the say, which would have the agent talk over
    the caller all that time. (With gcp/aws the flush follows the say in flight: a say that
    reached the server would play after a flush sent ahead of it; a stopped session refuses
    it: tests/test_executor.py.)"""
    cut = r"/speakings/[^/]+/stop$"
    sim.settings.rate_limit = False
    daemon = await agent(
        impl=LongReply(), voipbin={"rate_per_s": 0}, agent={"tts_provider": "elevenlabs"}
    )
    caller = Caller([Utterance("tell me everything")], hangup_after_s=None)
    call_id = sim.inbound_call("+15550001111", OUR_NUMBER, caller)
    await sim.wait_for(lambda: len(sim.requests_matching("POST", r"/say$")) == 1, 10)
    sim.faults.delay("POST", r"/say$", 5.0)  # the reply's first /say
    await sim.wait_for(lambda: sim.faults.held == 1, 10)
    await sim.caller_says(call_id, "wait wait stop please")
    await sim.wait_for(lambda: bool(sim.requests_matching("POST", cut)), 10)
    assert len(sim.requests_matching("POST", r"/say$")) == 1  # the reply's still held
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 15)
    assert sim.leaks() == []


async def test_twice_the_load_the_budget_allows(sim: Simulator, agent: StartAgent) -> None:
    # the real limits: 17 requests/s, burst 33. Twelve calls answered at once need about 34
    # requests in the first second, then a stream of says, and stops at the end.
    sim.settings.rate_per_s = 17.0
    sim.settings.burst = 33
    daemon = await agent()
    ids = await run_calls(sim, 12, limit_s=60)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 30)
    refused = [r for r in sim.requests if r.status == 429]
    assert len(refused) <= 3, f"a 429 storm: {len(refused)} refusals"
    for call_id in ids:
        assert max(answers(sim, call_id).values()) == 1
    assert sim.leaks() == []


async def test_sigterm_during_a_reply_lets_it_finish(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    from agentd.backends import last_user_text

    started = asyncio.Event()
    release = asyncio.Event()

    class Slow:
        async def reply(self, call_id: str, history: object):  # type: ignore[no-untyped-def]
            started.set()
            await release.wait()
            yield f"Finally, about {last_user_text(history)}."  # type: ignore[arg-type]

        async def aclose(self) -> None:
            pass

    store = {"path": str(tmp_path / "shared.db")}
    daemon = await agent(
        impl=Slow(), store=store, daemon={"stop_sessions_on_shutdown": False, "drain_s": 5}
    )
    call_id = sim.inbound_call(
        "+15550001111", OUR_NUMBER, Caller([Utterance("the weather")], hangup_after_s=None)
    )
    await asyncio.wait_for(started.wait(), 5)
    daemon.stop()
    release.set()  # the reply completes during the drain
    await sim.wait_for(lambda: "Finally, about the weather." in answers(sim, call_id), 5)
    await asyncio.wait_for(daemon.stopped.wait(), 10)
    # the call outlived that agentd, its sessions still up; it ends, then the next agentd starts
    await sim.hangup(call_id)
    assert sim.leaks()
    await agent(store=store)
    await sim.wait_for(lambda: not sim.leaks(), 10)


async def test_sigterm_waits_for_a_reply_whose_say_waits_out_a_429(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    # the reply is done on agentd's side, its /say is answered 429: the drain must not end
    # before it went out (the next agentd takes the turn, saved as answered, for said)
    store = {"path": str(tmp_path / "shared.db")}
    daemon = await agent(store=store, daemon={"stop_sessions_on_shutdown": False, "drain_s": 5})
    call_id = sim.inbound_call(
        "+15550001111", OUR_NUMBER, Caller([Utterance("the weather")], hangup_after_s=None)
    )
    await sim.wait_for(lambda: len(sim.requests_matching("POST", r"/say$")) == 1, 10)
    sim.faults.fail("POST", r"/say$", 429, retry_after=1.0)
    refused = lambda: [r for r in sim.requests_matching("POST", r"/say$") if r.status == 429]  # noqa: E731
    await sim.wait_for(lambda: bool(refused()), 10)
    daemon.stop()
    await asyncio.wait_for(daemon.stopped.wait(), 10)
    [*_, said] = sim.requests_matching("POST", r"/say$")
    assert (said.status, said.body) == (200, {"text": "You said: the weather."})
    await sim.hangup(call_id)
    await agent(store=store)
    await sim.wait_for(lambda: not sim.leaks(), 10)


async def test_session_creates_retried_after_the_caller_hung_up_leave_nothing_running(
    sim: Simulator, agent: StartAgent
) -> None:
    """Both creates are refused 429 at the gate (nothing made) and the caller hangs up while
    agentd waits out the Retry-After: the retries reach a call that is gone. VoIPBIN makes no
    session then (a transcribe wants the call dialing, ringing or progressing,
    bin-transcribe-manager `start.go` `isValidReference`; a speaking's snoop on the dead
    channel fails, bin-call-manager `externalmediahandler/start.go`): 500, and agentd leaves it
    so, with no speaking left billing. The transcribe's 500 is not sent again (it was, for
    4 s: five more requests of the account's budget on a call that was gone)."""
    sim.settings.rate_limit = False
    daemon = await agent(voipbin={"rate_per_s": 0})
    sim.faults.fail("POST", r"/transcribes$", 429, count=1, retry_after=1)
    sim.faults.fail("POST", r"/speakings$", 429, count=1, retry_after=1)
    call_id = sim.inbound_call("+15550001111", OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_for(lambda: len(sim.requests_matching("POST", r"/speakings$")) == 1, 10)
    await sim.wait_for(lambda: len(sim.requests_matching("POST", r"/transcribes$")) == 1, 10)
    await sim.hangup(call_id)
    await sim.wait_for(lambda: len(sim.requests_matching("POST", r"/speakings$")) == 2, 10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 15)
    creates = [r.status for r in sim.requests_matching("POST", r"/(speakings|transcribes)$")]
    seq = [(round(r.t, 2), r.method, r.path.rsplit("/", 1)[-1], r.status) for r in sim.requests]
    assert sorted(creates) == [429, 429, 500, 500], seq
    assert [s for s in sim.speakings.values() if s.reference_id == call_id] == []
    assert sim.leaks() == []
