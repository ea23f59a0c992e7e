"""The executor: lanes keep a call's REST commands in order; timers and replies come back."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Sequence

import pytest
import structlog.testing

from agentd.backends.echo import EchoBackend
from agentd.commands import (
    AskBackend,
    CancelBackend,
    Finished,
    Flush,
    Hangup,
    HangupDone,
    Message,
    Record,
    ReplyDone,
    ReplySentence,
    Result,
    Say,
    SayFailed,
    SpeakingStarted,
    StartSpeaking,
    StartTimer,
    Stopped,
    StopSpeaking,
    SweepDone,
    SweepSpeakings,
    SweepTranscribes,
    TranscribesFound,
    WriteAhead,
)
from agentd.events import Event
from agentd.executor import Executor, _failure
from agentd.names import Kind, Timer, TimerKind
from agentd.sim import Caller, Simulator
from agentd.voipbin import Credentials, Secret, VoipbinClient, say_max_chars
from tests.support import CALLER, OUR_NUMBER, pod_killer


class Results:
    """What the executor feeds back, and a way to wait for it."""

    def __init__(self) -> None:
        self.items: list[tuple[str, Event | Result]] = []
        self._changed = asyncio.Event()

    def feed(self, call_id: str, result: Event | Result) -> None:
        self.items.append((call_id, result))
        self._changed.set()

    async def until(self, predicate: Callable[[], bool]) -> None:
        async with asyncio.timeout(5.0):
            while not predicate():
                self._changed.clear()
                await self._changed.wait()

    def of(self, kind: type) -> list[Event | Result]:
        return [r for _, r in self.items if isinstance(r, kind)]


@pytest.fixture
async def client(sim: Simulator) -> AsyncIterator[VoipbinClient]:
    c = VoipbinClient(sim.api_url, Credentials(accesskey=Secret(sim.accesskey)))
    yield c
    await c.close()


@pytest.fixture
async def rig(client: VoipbinClient) -> AsyncIterator[tuple[Executor, Results]]:
    """An executor on the simulator with the echo backend, and what it feeds back."""
    results = Results()
    ex = Executor(client, EchoBackend(), results.feed)
    yield ex, results
    await ex.close()


async def live_call(sim: Simulator) -> str:
    """An answered inbound call whose caller says nothing and stays on the line."""
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_call_status(call_id, "progressing")
    return call_id


async def speaking(
    sim: Simulator, ex: Executor, results: Results, provider: str = "gcp", voice: str = "v"
) -> tuple[str, str]:
    call_id = await live_call(sim)
    ex.execute(call_id, [WriteAhead(call_id), StartSpeaking(call_id, "en-US", provider, voice)])
    await results.until(lambda: bool(results.of(SpeakingStarted)))
    [started] = results.of(SpeakingStarted)
    assert isinstance(started, SpeakingStarted) and started.status == "active"
    return call_id, started.speaking_id


async def test_says_queued_on_a_lane_go_out_in_order_as_one_request(
    sim: Simulator, rig: tuple[Executor, Results]
) -> None:
    ex, results = rig
    call_id, sid = await speaking(sim, ex, results)
    ex.execute(call_id, [Say(call_id, sid, t, 1) for t in ("One.", "Two.", "Three.")])
    await sim.wait_for(lambda: bool(sim.requests_matching("POST", r"/say$")), 5)
    ex.execute(call_id, [StopSpeaking(call_id, sid)])
    await results.until(lambda: bool(results.of(Stopped)))
    says = [r.body["text"] for r in sim.requests_matching("POST", r"/say$")]  # type: ignore[index]
    assert says == ["One. Two. Three."]  # merged: the budget is per request
    assert results.of(Stopped) == [Stopped("speaking", sid, True)]


async def test_a_stop_that_is_no_call_end_keeps_the_lanes_order(
    sim: Simulator, rig: tuple[Executor, Results]
) -> None:
    """A replaced session: the says before the stop go out before it (what fails on the old
    session is said on the new one)."""
    ex, results = rig
    call_id, sid = await speaking(sim, ex, results)
    ex.execute(call_id, [Say(call_id, sid, t, 1) for t in ("One.", "Two.")])
    ex.execute(call_id, [StopSpeaking(call_id, sid)])
    await results.until(lambda: bool(results.of(Stopped)))
    [say] = sim.requests_matching("POST", r"/say$")
    assert say.body["text"] == "One. Two."  # type: ignore[index]
    assert sim.requests_matching("POST", r"/stop$")[0].t >= say.t


async def test_a_barge_ins_flush_drops_what_was_queued_but_not_the_say_in_flight(
    sim: Simulator, rig: tuple[Executor, Results]
) -> None:
    """gcp/aws cut with a flush. What was queued behind a slow /say is dropped; the say in
    flight is not cut short: it may be on the server already, and would play after a flush
    sent ahead of it (only a stopped session refuses it). The flush follows it."""
    ex, results = rig
    call_id, sid = await speaking(sim, ex, results)
    sim.faults.delay("POST", r"/say$", 1.0)  # the first one only
    ex.execute(call_id, [Say(call_id, sid, "One.", 1)])
    await sim.wait_for(lambda: sim.faults.held == 1, 5)
    ex.execute(call_id, [Say(call_id, sid, "Two.", 1), Flush(call_id, sid)])
    ex.execute(call_id, [Say(call_id, sid, "Three.", 2)])  # the next reply
    await sim.wait_for(lambda: len(sim.requests_matching("POST", r"/say$")) == 2, 5)
    says = [r.body["text"] for r in sim.requests_matching("POST", r"/say$")]  # type: ignore[index]
    assert says == ["One.", "Three."]  # "Two." never sent
    [flush] = sim.requests_matching("POST", r"/flush$")
    assert sim.requests_matching("POST", r"/say$")[0].t < flush.t  # after the held say
    assert results.of(SayFailed) == []


async def test_a_stop_drops_what_was_still_to_be_said_on_its_session(
    sim: Simulator, rig: tuple[Executor, Results]
) -> None:
    """Says queued behind a slow one, then the session's stop (the caller hung up): the slow
    one is cut short, the queued ones are never sent, and the stop goes out at once."""
    ex, results = rig
    call_id, sid = await speaking(sim, ex, results)
    sim.faults.delay("POST", r"/say$", 5.0)
    ex.execute(call_id, [Say(call_id, sid, "One.", 1)])
    await sim.wait_for(lambda: sim.faults.held == 1, 5)  # it reached VoIPBIN, unanswered
    ex.execute(call_id, [Say(call_id, sid, "Two.", 1), Flush(call_id, sid)])
    ex.execute(call_id, [StopSpeaking(call_id, sid, abandon=True)])
    await results.until(lambda: bool(results.of(Stopped)))
    assert results.of(Stopped) == [Stopped("speaking", sid, True)]
    assert sim.requests_matching("POST", r"/say$") == []  # the held one is still held
    assert sim.requests_matching("POST", r"/flush$") == []


async def test_with_aws_no_say_carries_more_than_polly_takes(
    sim: Simulator, client: VoipbinClient
) -> None:
    # Polly refuses more than 3,000 characters, and VoIPBIN answers that 404 like a dead
    # session; the gateway alone would allow 5,000 bytes
    results = Results()
    ex = Executor(client, EchoBackend(), results.feed, say_chars=say_max_chars("aws"))
    call_id, sid = await speaking(sim, ex, results, "aws", "Joanna")
    # audio within what the aws pod buffers before it holds a say's answer (see sim.tts)
    sentences = [("word " * 320).strip() + ".", ("more " * 320).strip() + "."]  # 1,600 each
    long_one = ("long " * 620).strip() + "."  # 3,100 characters in one sentence
    ex.execute(call_id, [Say(call_id, sid, t, 1) for t in (*sentences, long_one)])
    await sim.wait_for(lambda: len(sim.requests_matching("POST", r"/say$")) >= 4, 10)
    ex.execute(call_id, [StopSpeaking(call_id, sid)])
    await results.until(lambda: bool(results.of(Stopped)))
    says = sim.requests_matching("POST", r"/say$")
    assert [r.status for r in says] == [200, 200, 200, 200]  # not merged past the limit
    texts = [r.body["text"] for r in says]  # type: ignore[index]
    assert all(len(t) <= 3000 for t in texts)
    assert " ".join(texts).split() == " ".join((*sentences, long_one)).split()
    assert results.of(SayFailed) == []
    await ex.close()


async def test_a_ready_reply_goes_in_one_say_sent_before_its_end_is_fed(
    sim: Simulator, client: VoipbinClient
) -> None:
    # the echo has both sentences at once: they go in one /say, and that /say is on its way
    # before the reply's end (and the bookkeeping it brings) is stepped
    results = Results()
    asked: list[str] = []
    said_when_done: list[list[str]] = []
    real_say = client.say

    async def say(speaking_id: str, text: str) -> None:
        asked.append(text)
        await real_say(speaking_id, text)

    client.say = say  # type: ignore[method-assign]
    ex: Executor

    def feed(call_id: str, result: Event | Result) -> None:
        results.feed(call_id, result)
        if isinstance(result, ReplySentence):  # what the call does with a sentence
            ex.execute(call_id, [Say(call_id, sid, result.text, result.turn)])
        if isinstance(result, ReplyDone):
            said_when_done.append(list(asked))

    ex = Executor(client, EchoBackend(), feed)
    call_id, sid = await speaking(sim, ex, results)
    ex.execute(call_id, [AskBackend(call_id, 1, (("user", "Book a table. For two"),))])
    await results.until(lambda: bool(results.of(ReplyDone)))
    assert said_when_done == [["You said: Book a table. For two."]]
    await ex.close()


async def test_a_request_waiting_for_the_budget_is_not_sent_once_the_lease_ran_out(
    sim: Simulator, client: VoipbinClient
) -> None:
    results = Results()
    ours = {"yes": True}
    fenced: list[str] = []
    seen = asyncio.Event()

    def on_fenced(call_id: str) -> None:
        fenced.append(call_id)
        seen.set()

    ex = Executor(
        client,
        EchoBackend(),
        results.feed,
        may_act=lambda call_id: ours["yes"],
        on_fenced=on_fenced,
    )
    call_id, sid = await speaking(sim, ex, results)
    client.limiter.set_budget(1.0, 1.0)
    client.limiter.penalise(0.5)  # the next request waits for a token...
    ex.execute(call_id, [Say(call_id, sid, "Too late.", 1)])
    ours["yes"] = False  # ...while the lease runs out
    await asyncio.wait_for(seen.wait(), 5)
    assert fenced == [call_id]
    assert sim.requests_matching("POST", r"/say$") == []
    await ex.close()


async def test_a_command_that_crashes_reports_a_failure_the_call_understands(
    sim: Simulator,
    client: VoipbinClient,
    rig: tuple[Executor, Results],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ex, results = rig
    call_id, sid = await speaking(sim, ex, results)

    async def broken(speaking_id: str) -> None:
        raise RuntimeError("a bug in the client")

    monkeypatch.setattr(client, "stop_speaking", broken)
    ex.execute(call_id, [StopSpeaking(call_id, sid)])
    await results.until(lambda: bool(results.of(Stopped)))
    assert results.of(Stopped) == [Stopped("speaking", sid, False)]  # retried by the call


async def test_timers_fire_typed_and_a_finished_call_fires_none() -> None:
    results = Results()
    ex = Executor(None, EchoBackend(), results.feed)  # type: ignore[arg-type]
    retry = Timer(TimerKind.RETRY_STOP, "s1")
    ex.execute("a", [StartTimer("a", Timer(TimerKind.WATCH), 0.01), StartTimer("a", retry, 0.01)])
    ex.execute("gone", [StartTimer("gone", Timer(TimerKind.WATCH), 0.01), Finished("gone")])
    ex.execute("b", [StartTimer("b", Timer(TimerKind.SILENCE), 0.05)])
    await results.until(lambda: any(cid == "b" for cid, _ in results.items))
    fired = {(cid, r.timer) for cid, r in results.items}  # type: ignore[union-attr]
    assert fired == {("a", Timer(TimerKind.WATCH)), ("a", retry), ("b", Timer(TimerKind.SILENCE))}
    await ex.close()


class Blocking:
    """A backend that says one sentence, then waits until it is cancelled."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def reply(self, call_id: str, history: Sequence[Message]) -> AsyncIterator[str]:
        try:
            yield "First sentence. "
            await asyncio.Event().wait()
            yield "never"
        finally:
            self.closed.set()

    async def aclose(self) -> None:
        return None


async def test_a_cancelled_reply_stops_its_backend_stream_and_says_nothing_more() -> None:
    results = Results()
    backend = Blocking()
    ex = Executor(None, backend, results.feed, clock=lambda: 42.0)  # type: ignore[arg-type]
    ex.execute("c", [AskBackend("c", 1, (("user", "hi"),))])
    await results.until(lambda: bool(results.of(ReplySentence)))
    ex.execute("c", [CancelBackend("c", 1)])
    await asyncio.wait_for(backend.closed.wait(), 5)
    assert results.of(ReplySentence) == [ReplySentence(1, "First sentence.")]
    assert results.of(ReplyDone) == []
    await ex.close()


async def test_reply_timings_use_the_injected_clock() -> None:
    results = Results()
    ex = Executor(None, EchoBackend(), results.feed, clock=lambda: 42.0)  # type: ignore[arg-type]
    ex.execute("c", [AskBackend("c", 1, (("user", "hi"),))])
    await results.until(lambda: bool(results.of(ReplyDone)))
    [done] = results.of(ReplyDone)
    assert isinstance(done, ReplyDone) and done.first_chunk_at == 42.0
    await ex.close()


async def test_a_create_whose_pod_died_is_not_adopted_its_row_is_deleted_and_created_again(
    sim: Simulator, rig: tuple[Executor, Results]
) -> None:
    """bin-tts-manager speaking.go: a pod that dies inside the create leaves the row
    `initiating` (it never becomes active) and the gateway answers 503; the row blocks the call
    (500 on a new create) until it is deleted."""
    ex, results = rig
    ex.setup_grace_s = 0.5  # as long as such a row is waited for (a slow create is, at first)
    call_id = await live_call(sim)
    kill_the_first_create, killed = pod_killer(sim, call_id)
    ex.execute(call_id, [StartSpeaking(call_id, "en-US", "gcp", "")])
    await sim.wait_for(kill_the_first_create, 5)
    await results.until(lambda: bool(results.of(SpeakingStarted)))
    [started] = results.of(SpeakingStarted)
    assert isinstance(started, SpeakingStarted)
    assert started.status == "active" and started.speaking_id != killed[0]
    assert sim.requests_matching("DELETE", rf"/speakings/{killed[0]}$")


async def test_a_row_the_call_gave_up_on_is_deleted_and_created_again(
    sim: Simulator, rig: tuple[Executor, Results]
) -> None:
    """A dead pod's row blocks the call (500 on a new create) until it is deleted."""
    ex, results = rig
    call_id = await live_call(sim)
    ex.execute(call_id, [StartSpeaking(call_id, "en-US", "gcp", "")])
    await results.until(lambda: bool(results.of(SpeakingStarted)))
    [first] = results.of(SpeakingStarted)
    assert isinstance(first, SpeakingStarted) and first.status == "active"
    sim.faults.kill_tts_pod(first.speaking_id)
    again = StartSpeaking(call_id, "en-US", "gcp", "", frozenset({first.speaking_id}))
    ex.execute(call_id, [again])
    await results.until(lambda: len(results.of(SpeakingStarted)) == 2)
    second = results.of(SpeakingStarted)[1]
    assert isinstance(second, SpeakingStarted)
    assert second.status == "active" and second.speaking_id != first.speaking_id
    assert sim.requests_matching("DELETE", rf"/speakings/{first.speaking_id}$")


async def test_an_error_records_own_what_is_logged_as_detail(client: VoipbinClient) -> None:
    ex = Executor(client, EchoBackend(), Results().feed)
    with structlog.testing.capture_logs() as logs:
        ex.execute("c1", [Record("c1", Kind.ERROR, {"what": "say failed", "status": 503})])
    [line] = [e for e in logs if e.get("command") == "Record"]
    assert (line["what"], line["detail"], line["status"]) == ("error", "say failed", 503)
    await ex.close()


async def test_a_leak_given_up_is_logged_as_an_error(client: VoipbinClient) -> None:
    # `journalctl -p err` must show a session that bills until someone stops it by hand
    ex = Executor(client, EchoBackend(), Results().feed)
    leak = {"kind": "speaking", "session_id": "s1", "status": 403}
    with structlog.testing.capture_logs() as logs:
        ex.execute("c1", [Record("c1", Kind.LEAK, leak)])
        ex.execute("c1", [Record("c1", Kind.LEAK, {**leak, "gave_up": True})])
    levels = [(e["log_level"], e.get("gave_up")) for e in logs if e.get("command") == "Record"]
    assert levels == [("warning", None), ("error", True)]
    await ex.close()


async def test_a_swept_session_its_delete_could_not_stop_is_recorded_as_a_leak(
    sim: Simulator, client: VoipbinClient
) -> None:
    # the sweep at a hangup stops a speaking the call never learned the id of (a create whose
    # answer was lost); on a dead tts pod only a delete removes it, and a row deleted `active`
    # bills on: the operator must get the same leak record (its line at error, `agentd calls
    # show`, the metric) as for a session the call knew, not a log line of its own
    records: list[Record] = []
    recorded = asyncio.Event()

    def on_record(record: Record) -> None:
        records.append(record)
        recorded.set()

    results = Results()
    ex = Executor(client, EchoBackend(), results.feed, on_record=on_record)
    call_id, sid = await speaking(sim, ex, results)
    sim.faults.kill_tts_pod(sid)
    with structlog.testing.capture_logs() as logs:
        ex.execute(call_id, [SweepSpeakings(call_id)])
        await asyncio.wait_for(recorded.wait(), 30)
    [record] = records
    assert (record.call_id, record.what) == (call_id, Kind.LEAK)
    assert record.data["session_id"] == sid
    assert record.data["unstopped"] is True and record.data["gave_up"] is True
    [line] = [e for e in logs if e.get("command") == "Record"]
    assert (line["log_level"], line["what"], line["session_id"]) == ("error", "leak", sid)
    assert sim.stranded() == [sid]
    await ex.close()


async def test_a_sweep_tells_the_call_whether_it_is_done(
    sim: Simulator, rig: tuple[Executor, Results]
) -> None:
    # the call is finished only once its sweep is done: a failed list is answered as failed
    ex, results = rig
    call_id, sid = await speaking(sim, ex, results)
    stops = rf"/speakings/{sid}/stop$"
    sim.faults.fail("GET", r"/speakings$", 403)
    ex.execute(call_id, [SweepSpeakings(call_id)])
    await results.until(lambda: bool(results.of(SweepDone)))
    assert results.of(SweepDone) == [SweepDone(False, 403)]
    assert sim.requests_matching("POST", stops) == []  # nothing was stopped
    ex.execute(call_id, [SweepSpeakings(call_id)])
    await results.until(lambda: len(results.of(SweepDone)) == 2)
    assert results.of(SweepDone)[1] == SweepDone(True)
    assert len(sim.requests_matching("POST", stops)) == 1


async def test_a_sweep_of_transcribes_finds_the_live_ones_but_the_one_kept(
    sim: Simulator, client: VoipbinClient, rig: tuple[Executor, Results]
) -> None:
    # two live transcribes on one call (a start the last agentd sent, created after the next
    # one started its own): the one the call does not use is found for it to stop
    ex, results = rig
    call_id = await live_call(sim)
    ours = await client.start_transcribe(call_id, "en-US", "")
    stray = sim.speech.stt.start_transcribe(sim.get_call(call_id), "en-US", "in", "").id
    ex.execute(call_id, [SweepTranscribes(call_id, "en-US", ours)])
    await results.until(lambda: bool(results.of(TranscribesFound)))
    assert results.of(TranscribesFound) == [TranscribesFound((stray,))]


def test_a_command_the_call_waits_on_answers_a_failure_when_it_crashes() -> None:
    # a bug inside a runner (say, a row VoIPBIN never sends) must not leave the call waiting
    # for ever: a sweep, a stop or a hangup the call waits on answers as failed, and is retried
    assert _failure(SweepSpeakings("c1")) == SweepDone(False)
    assert _failure(Hangup("c1")) == HangupDone(False)
    assert _failure(StopSpeaking("c1", "s1")) == Stopped("speaking", "s1", False)


async def test_until_said_returns_when_the_call_whose_say_it_waits_for_is_dropped(
    sim: Simulator, rig: tuple[Executor, Results]
) -> None:
    # another replica took the call over with its /say in flight: nothing is left to wait for
    ex, results = rig
    call_id, sid = await speaking(sim, ex, results)
    sim.faults.delay("POST", r"/say$", 30.0)
    ex.execute(call_id, [Say(call_id, sid, "Hello there.", 1)])
    await sim.wait_for(lambda: sim.faults.held == 1, 5)  # the /say reached VoIPBIN
    assert ex.saying()
    waiting = asyncio.ensure_future(ex.until_said())
    ex.drop(call_id)
    await asyncio.wait_for(waiting, 5)
    assert not ex.saying()
