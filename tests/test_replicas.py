"""Several agentd on one PostgreSQL: leases, fencing, failover, partitions, an unreachable store.

The first tests drive `agentd.replicas.Replica` against a real PostgreSQL with a hand-turned
clock. The others run real agentd processes beside the simulator: the owner of a call is killed,
paused past its lease, or cut off from the database, and the caller must hear every answer once.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import agentd.otel
from agentd.replicas import Replica, new_replica_id
from agentd.sim import Caller, Simulator, Utterance
from agentd.status import fetch, render
from agentd.store_pg import PgStore
from tests.support import CALLER, OUR_NUMBER, StartAgent, run_cli
from tests.test_restart import agent_lines, config_text, start, subscribed
from tests.test_store import Clock, record

if TYPE_CHECKING:
    from tests.pg import PgServer

pytest_plugins = ["tests.pg"]

GREETING = "Hello, thank you for calling. How can I help you today?"
LEASE_S = 2.0


# ---- the lease view of one replica ------------------------------------------------------------


async def test_the_first_claim_wins_and_the_other_replica_stays_out(pg_url: str) -> None:
    store = await PgStore.open(pg_url)
    try:
        a = Replica(store, new_replica_id("a"), lease_s=LEASE_S)
        b = Replica(store, new_replica_id("b"), lease_s=LEASE_S)
        first, second = await asyncio.gather(a.claim("call-1"), b.claim("call-1"))
        assert sorted([first, second]) == [0, 1]
        winner = a if first else b
        loser = b if first else a
        assert winner.holds("call-1")
        assert not loser.holds("call-1")
        assert loser.counters["taken_by_others"] == 1
    finally:
        await store.close()


async def test_a_lease_is_usable_only_until_its_local_deadline_unless_renewed(pg_url: str) -> None:
    store = await PgStore.open(pg_url)
    clock = Clock(1000.0)
    try:
        a = Replica(store, "a", lease_s=LEASE_S, clock=clock)
        assert await a.claim("call-1") == 1
        clock.now += a.usable_s - 0.01
        assert a.holds("call-1")
        assert await a.renew() == []  # still ours: the deadline moves on
        clock.now += a.usable_s - 0.01
        assert a.holds("call-1")
        clock.now += 0.02
        assert not a.holds("call-1")
        assert a.lapsed() == ["call-1"]
        # the margin: the replica stops acting before the database would let anyone take over
        assert a.usable_s < a.lease_s
    finally:
        await store.close()


async def test_a_call_taken_over_is_reported_lost_at_the_next_renew(pg_url: str) -> None:
    store = await PgStore.open(pg_url)
    # a replica whose database clock runs ahead: for it, the lease of `a` has expired
    later = await PgStore.open(pg_url, db_skew_s=LEASE_S + 1)
    try:
        a = Replica(store, "a", lease_s=LEASE_S)
        b = Replica(later, "b", lease_s=LEASE_S)
        c = Replica(store, "c", lease_s=LEASE_S)
        assert await a.claim("call-1") == 1
        await store.save_call(record("call-1"))
        assert await c.claim("call-1") == 0  # live for the owner's clock...
        assert await b.expired() == ["call-1"]  # ...but expired for the later one
        assert await b.claim("call-1") == 2
        assert b.counters["takeovers"] == 1
        assert await a.renew() == ["call-1"]
    finally:
        await store.close()
        await later.close()


async def test_replicas_count_each_other_and_a_clean_leave_hands_calls_over(pg_url: str) -> None:
    store = await PgStore.open(pg_url)
    try:
        a = Replica(store, "a", lease_s=LEASE_S)
        b = Replica(store, "b", lease_s=LEASE_S)
        await a.beat(calls=0)
        await b.beat(calls=0)
        await a.beat(calls=0)
        assert a.replicas == 2
        assert await a.claim("call-1") == 1
        await store.save_call(record("call-1"))
        await a.leave()
        assert a.held == {}
        assert await b.expired() == ["call-1"]  # at once: released, not left to expire
        assert await b.claim("call-1") == 2
        await b.beat(calls=1)
        assert b.replicas == 1
    finally:
        await store.close()


async def test_a_parked_state_is_written_only_if_nobody_took_the_call_over(pg_url: str) -> None:
    store = await PgStore.open(pg_url)
    later = await PgStore.open(pg_url, db_skew_s=LEASE_S + 1)  # a's leases expired for it
    try:
        a = Replica(store, "a", lease_s=LEASE_S)
        b = Replica(later, "b", lease_s=LEASE_S)
        for call_id in ("kept", "taken"):
            assert await a.claim(call_id) == 1
            await store.save_call(record(call_id, turn=1))
            a.park(record(call_id, turn=2), a.held.pop(call_id).epoch)  # lapsed at turn 2
        assert await b.claim("taken") == 2
        # a state the database cannot hold is given up, not kept to hold the takeovers back
        assert await a.claim("odd") == 1
        a.park(record("odd", history=(("user", object()),)), a.held.pop("odd").epoch)
        assert await a.unpark() and a.parked == {}
        turns = {r.call_id: r.turn for r in await store.live_calls()}
        assert turns == {"kept": 2, "taken": 1}  # the new owner's state is never overwritten
    finally:
        await store.close()
        await later.close()


async def test_an_unreachable_store_answers_none_and_is_logged_once(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    store = await PgStore.open(pg_url)
    a = Replica(store, "a", lease_s=LEASE_S)
    assert await a.claim("call-1") == 1
    await store.close()
    assert await a.claim("call-2") is None
    assert await a.renew() == []  # nothing known to be lost: the leases just lapse
    assert await a.expired() == []
    assert not a.reachable
    assert capsys.readouterr().out.count("store.unreachable") == 1


# ---- real agentd processes ---------------------------------------------------------------------


@pytest.mark.slow
async def test_a_database_not_up_yet_at_start_is_retried_by_systemd_a_wrong_password_is_not(
    sim: Simulator, tmp_path: Path, pg_server: PgServer
) -> None:
    # both boxes and the database boot together after a power cut: the database answers last.
    # Exit code 2 is the unit's RestartPreventExitStatus: agentd would never be started again
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    dsn = f"postgresql://agentd@127.0.0.1:{port}/agentd"
    code, _, err = await run_cli("run", "--config", str(agent_config(sim, tmp_path, dsn, "down")))
    assert code == 1, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"agentd: store: PostgreSQL {dsn}: cannot connect: ")
    wrong = pg_server.url(user=pg_server.pw_user, password="not-the-password")
    code, _, err = await run_cli("run", "--config", str(agent_config(sim, tmp_path, wrong, "pw")))
    assert code == 2 and "password authentication failed" in err  # no restart can fix it


@dataclass
class Agent:
    """One agentd process of the test, by its replica name."""

    name: str
    config: Path
    log: Path
    proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.proc = await start(self.config, stdout=self.log)

    async def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(sig)
            await asyncio.wait_for(self.proc.wait(), 30)

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def status(self) -> dict[str, Any]:
        """Its `agentd status --json` document."""
        return fetch(str(self.config.with_suffix(".sock")))

    def events(self, event: str, call_id: str) -> list[dict[str, object]]:
        """The JSON log lines of `event` about the call."""
        out = []
        for line in self.log.read_text().splitlines():
            if f'"{event}"' in line and call_id in line:
                fields = json.loads(line)
                if fields.get("event") == event and fields.get("call_id") == call_id:
                    out.append(fields)
        return out


def agent_config(
    sim: Simulator, tmp_path: Path, store_url: str, name: str, lease_s: float = LEASE_S
) -> Path:
    store = f'url = "{store_url}"\nlease_s = {lease_s}\nreplica = "{name}"'
    config = tmp_path / f"{name}.toml"
    config.write_text(config_text(sim, store) + f'[status]\nsocket = "{tmp_path / name}.sock"\n')
    return config


@asynccontextmanager
async def replicas(
    sim: Simulator, tmp_path: Path, urls: dict[str, str], lease_s: float = LEASE_S
) -> AsyncIterator[dict[str, Agent]]:
    """agentd processes named by `urls` (each with its own database URL: the same database,
    maybe as different roles), subscribed; stopped at the end."""
    agents = {
        name: Agent(name, agent_config(sim, tmp_path, url, name, lease_s), tmp_path / f"{name}.log")
        for name, url in urls.items()
    }
    try:
        for agent in agents.values():
            await agent.start()
        await sim.wait_for(lambda: subscribed(sim) == len(agents), 20)
        yield agents
    finally:
        for agent in agents.values():
            if agent.proc is not None and agent.proc.returncode is None:
                agent.signal(signal.SIGCONT)
            await agent.stop()


def _status_shows(doc: dict[str, Any], owner: str, call_id: str) -> bool:
    replicas = doc["replicas"]
    owners = {o["call_id"]: o["owner"].split(":")[0] for o in replicas["owners"]}
    return (
        [r["id"].split(":")[0] for r in replicas["live"]] == [owner]
        and owners.get(call_id) == owner
        and replicas["takeovers"] == 1
        and replicas["rate_per_s"] == 15.0  # alone again: the whole budget
    )


async def owner_of(url: str, call_id: str) -> str:
    """The replica name that holds the call's lease now."""
    store = await PgStore.open(url)
    try:
        leases = {lease.call_id: lease.owner for lease in await store.leases()}
    finally:
        await store.close()
    return leases[call_id].split(":")[0]


async def eventually(predicate: Callable[[], bool], timeout: float = 15.0) -> None:  # noqa: ASYNC109
    """Wait until `predicate()` holds, for things no simulator state shows (a log line)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError
        await asyncio.sleep(0.05)


def says(sim: Simulator, text: str) -> list[float]:
    """When each POST /say carrying `text` was served."""
    return [
        r.t
        for r in sim.requests_matching("POST", r"/speakings/[^/]+/say$")
        if text in str((r.body or {}).get("text", ""))
    ]


async def answered(sim: Simulator, call_id: str, words: str) -> None:
    await sim.caller_says(call_id, words)
    await sim.wait_for(lambda: f"You said: {words}." in agent_lines(sim, call_id), 20)


async def first_turn(sim: Simulator, pg_url: str) -> tuple[str, str, str]:
    """A call answered once by one of replicas a and b: (its id, its owner, the other)."""
    call_id = sim.inbound_call(
        CALLER, OUR_NUMBER, Caller([Utterance("first turn")], hangup_after_s=None)
    )
    await sim.wait_for(lambda: "You said: first turn." in agent_lines(sim, call_id), 15)
    owner = await owner_of(pg_url, call_id)
    return call_id, owner, "b" if owner == "a" else "a"


def assert_each_once(sim: Simulator, call_id: str, *turns: str) -> None:
    lines = agent_lines(sim, call_id)
    assert lines.count(GREETING) == 1
    for words in turns:
        assert lines.count(f"You said: {words}.") == 1, lines
        assert len(says(sim, f"You said: {words}.")) == 1


@pytest.mark.slow
async def test_sigkill_of_the_owner_the_other_replica_answers_the_next_turn(
    sim: Simulator, tmp_path: Path, pg_url: str
) -> None:
    async with replicas(sim, tmp_path, {"a": pg_url, "b": pg_url}) as agents:
        call_id, owner, other = await first_turn(sim, pg_url)
        await agents[owner].stop(signal.SIGKILL)
        await answered(sim, call_id, "second turn")  # spoken while nobody serves the call
        assert await owner_of(pg_url, call_id) == other
        assert agents[other].events("call.restored", call_id)
        # `agentd status` on the survivor: the dead one's heartbeat ages out, the call is its own
        await eventually(lambda: _status_shows(agents[other].status(), other, call_id))
        report = render(agents[other].status())
        assert "replicas:   1 live" in report and "(this one)" in report
        assert call_id in report.split("calls by owner:")[1]
        await answered(sim, call_id, "third turn")
        await sim.hangup(call_id)
        await sim.wait_for(lambda: not sim.leaks(), 15)
        assert_each_once(sim, call_id, "first turn", "second turn", "third turn")
        # the session of the dead owner was still good: it was re-attached, not replaced
        assert len(sim.requests_matching("POST", r"/speakings$")) == 1


@pytest.mark.slow
async def test_a_replica_paused_past_its_lease_says_nothing_more_on_the_call(
    sim: Simulator, tmp_path: Path, pg_url: str
) -> None:
    async with replicas(sim, tmp_path, {"a": pg_url, "b": pg_url}) as agents:
        call_id, owner, other = await first_turn(sim, pg_url)
        checks = len(sim.requests_matching("GET", rf"/calls/{call_id}$"))
        agents[owner].signal(signal.SIGSTOP)
        # the other replica takes the call over: its resume checks the call
        await sim.wait_for(
            lambda: len(sim.requests_matching("GET", rf"/calls/{call_id}$")) > checks, 15
        )
        await answered(sim, call_id, "during the pause")
        agents[owner].signal(signal.SIGCONT)
        await answered(sim, call_id, "after the pause")
        await eventually(lambda: bool(agents[owner].events("call.lost", call_id)))
        await agents[owner].stop()  # whatever it would still send, it has sent by its exit
        await sim.hangup(call_id)
        await sim.wait_for(lambda: not sim.leaks(), 15)
        assert_each_once(sim, call_id, "first turn", "during the pause", "after the pause")
        assert await owner_of(pg_url, call_id) == other


@pytest.mark.slow
async def test_while_postgresql_is_unreachable_calls_go_quiet_then_resume(
    sim: Simulator, tmp_path: Path, pg_url: str, pg_server: PgServer
) -> None:
    database = urlsplit(pg_url).path.lstrip("/")
    async with replicas(sim, tmp_path, {"a": pg_url}) as agents:
        a = agents["a"]
        call_id = sim.inbound_call(
            CALLER, OUR_NUMBER, Caller([Utterance("first turn")], hangup_after_s=None)
        )
        await sim.wait_for(lambda: "You said: first turn." in agent_lines(sim, call_id), 15)
        pg_server.execute(
            f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false',
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{database}' AND pid <> pg_backend_pid()",
        )
        await eventually(lambda: bool(a.events("call.lost", call_id)))
        await sim.caller_says(call_id, "during the outage")
        # a call that comes in meanwhile is not taken: no replica could claim it
        second = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
        await eventually(lambda: bool(a.events("call.refused", second)))
        back = time.monotonic()
        pg_server.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        # the quiet call is taken over from the store and its missed turn read back, once
        await sim.wait_for(lambda: "You said: during the outage." in agent_lines(sim, call_id), 20)
        assert all(t > back for t in says(sim, "You said: during the outage."))
        # the refused call is picked up once the store answers again
        await sim.wait_for(lambda: GREETING in agent_lines(sim, second), 20)
        await answered(sim, second, "late but served")
        for cid in (call_id, second):
            await sim.hangup(cid)
        await sim.wait_for(lambda: not sim.leaks(), 15)
        assert_each_once(sim, call_id, "first turn", "during the outage")


@pytest.mark.slow
async def test_a_turn_answered_while_postgresql_was_down_is_not_answered_again(
    sim: Simulator, tmp_path: Path, pg_url: str, pg_server: PgServer
) -> None:
    # the owner answers a turn before its lease lapses, but cannot write it down: whoever takes
    # the call over when the database is back must know that turn was answered
    database = urlsplit(pg_url).path.lstrip("/")
    async with replicas(sim, tmp_path, {"a": pg_url, "b": pg_url}, lease_s=5.0) as agents:
        call_id, owner, _ = await first_turn(sim, pg_url)
        pg_server.execute(
            f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS false',
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{database}' AND pid <> pg_backend_pid()",
        )
        await answered(sim, call_id, "during the outage")  # within the lease: answered at once
        assert not agents[owner].events("call.lost", call_id)
        await eventually(lambda: bool(agents[owner].events("call.lost", call_id)))
        pg_server.execute(f'ALTER DATABASE "{database}" ALLOW_CONNECTIONS true')
        await eventually(lambda: any(a.events("call.restored", call_id) for a in agents.values()))
        await answered(sim, call_id, "after the outage")
        await sim.hangup(call_id)
        await sim.wait_for(lambda: not sim.leaks(), 15)
        assert_each_once(sim, call_id, "first turn", "during the outage", "after the outage")


@pytest.mark.slow
async def test_after_a_takeover_a_turn_like_the_last_one_is_answered(
    sim: Simulator, tmp_path: Path, pg_url: str
) -> None:
    # the caller corrects themselves ("Monday", then "Tuesday") just after the owner died: the
    # new owner must not take the new turn for the late final of the one answered before
    async with replicas(sim, tmp_path, {"a": pg_url, "b": pg_url}) as agents:
        monday, tuesday = "book a table for four on monday", "book a table for four on tuesday"
        call_id = sim.inbound_call(
            CALLER, OUR_NUMBER, Caller([Utterance(monday)], hangup_after_s=None)
        )
        await sim.wait_for(lambda: f"You said: {monday}." in agent_lines(sim, call_id), 15)
        owner = await owner_of(pg_url, call_id)
        other = "b" if owner == "a" else "a"
        await agents[owner].stop(signal.SIGKILL)
        await answered(sim, call_id, tuesday)  # said while nobody serves the call
        assert agents[other].events("call.restored", call_id)
        await sim.hangup(call_id)
        await sim.wait_for(lambda: not sim.leaks(), 15)
        assert_each_once(sim, call_id, monday, tuesday)


@pytest.mark.slow
async def test_a_call_whose_first_owner_died_before_writing_it_is_served(
    sim: Simulator, tmp_path: Path, pg_url: str
) -> None:
    # a replica claimed the call (epoch 1) and was SIGKILLed before its first write: the next
    # claim is a takeover (epoch 2) with nothing in the store to resume. Nothing was started
    # (the write-ahead comes before any session): the call must be served as a new one
    call_id = sim.inbound_call(
        CALLER, OUR_NUMBER, Caller([Utterance("anyone there")], hangup_after_s=None)
    )
    await sim.wait_call_status(call_id, "progressing", timeout=10)
    store = await PgStore.open(pg_url)
    try:
        assert await Replica(store, "dead", lease_s=0.001).claim(call_id) == 1
    finally:
        await store.close()
    async with replicas(sim, tmp_path, {"a": pg_url}) as agents:
        await sim.wait_for(lambda: "You said: anyone there." in agent_lines(sim, call_id), 20)
        assert agents["a"].events("lease.claimed", call_id)[0]["epoch"] == 2
        await sim.hangup(call_id)
        await sim.wait_for(lambda: not sim.leaks(), 15)
        assert_each_once(sim, call_id, "anyone there")


@pytest.mark.slow
async def test_a_call_lost_to_another_replica_ends_its_span_there(
    sim: Simulator, agent: StartAgent, pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    exporters: list[InMemorySpanExporter] = []

    def exporter(endpoint: str) -> InMemorySpanExporter:
        exporters.append(InMemorySpanExporter())
        return exporters[-1]

    monkeypatch.setattr(agentd.otel, "otlp_exporter", exporter)
    store = {"path": "agentd.db", "url": pg_url, "lease_s": 1}
    one = await agent(otel={"enabled": True}, store={**store, "replica": "one"})
    two = await agent(otel={"enabled": True}, store={**store, "replica": "two"})
    call_id = sim.inbound_call(
        CALLER, OUR_NUMBER, Caller([Utterance("first turn")], hangup_after_s=None)
    )
    await sim.wait_for(lambda: "You said: first turn." in agent_lines(sim, call_id), 15)
    owner, other = (one, two) if call_id in one.dispatcher.calls else (two, one)
    assert owner.tracing is not None and other.tracing is not None
    mine = exporters[0] if owner is one else exporters[1]
    # the other replica saw the call and left it to its owner: its traces keep nothing of it
    assert call_id not in other.tracing._seen

    # the owner's lease lapses (its renewals went unanswered): it stops serving the call, and
    # its span of the call ends there, not when that agentd stops, hours later
    owner._lose(call_id, "its lease lapsed: the store did not answer the renewals")
    assert owner.tracing.force_flush()
    [span] = [s for s in mine.get_finished_spans() if s.name == "call"]
    attrs = span.attributes or {}
    assert attrs["agentd.call.id"] == call_id
    assert attrs["agentd.call.lost"] is True
    assert "agentd.call.unfinished" not in attrs

    await answered(sim, call_id, "second turn")  # the other replica took the call over
    await sim.hangup(call_id)
    await asyncio.wait_for(other.dispatcher.wait_idle(), 10)
    await sim.wait_for(lambda: not sim.leaks(), 15)
    assert_each_once(sim, call_id, "first turn", "second turn")
