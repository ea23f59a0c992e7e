"""Prometheus metrics: a real daemon, a real scrape over loopback, and the loopback-only rule."""

from __future__ import annotations

import asyncio
import os
import sqlite3
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agentd import status
from agentd.commands import Record
from agentd.config import ConfigError, load, parse_listen
from agentd.metrics import Metrics
from agentd.names import Kind
from agentd.sim import Caller, Simulator, Utterance
from tests.stubs import OpenAIStub, Script
from tests.support import CALLER, OUR_NUMBER, StartAgent

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{port}/metrics") as resp,
    ):
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        text = await resp.text()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def listening() -> set[tuple[str, int]]:
    """TCP sockets this process listens on (from /proc: no dependency, no guessing)."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "0A" and fields[9] in inodes:  # 0A: LISTEN
                addr, port = fields[1].split(":")
                out.add((addr, int(port, 16)))
    return out


needs_proc = pytest.mark.skipif(
    not os.path.exists("/proc/net/tcp"), reason="needs Linux /proc/net/tcp"
)


@pytest.mark.slow  # a whole call
@needs_proc
async def test_a_call_moves_the_counters_and_the_histogram(
    sim: Simulator, agent: StartAgent
) -> None:
    before_start = listening()
    daemon = await agent(
        metrics={"listen": "127.0.0.1:0"},
        agent={"tts_provider": "gcp"},  # barge-in flushes: one session, no restart
        backend={"prefix": "Let me repeat " + ("what you said, word for word: " * 4)},
    )
    assert daemon.metrics is not None
    port = daemon.metrics.port
    assert port > 0
    assert listening() - before_start == {("0100007F", port)}  # 127.0.0.1 only

    first = await scrape(port)
    assert value(first, "agentd_connected") == 1
    assert value(first, "agentd_calls_total", direction="incoming") == 0
    assert value(first, "agentd_turn_first_say_seconds_count") == 0
    assert value(first, "agentd_live_calls") == 0
    assert value(first, "agentd_rest_queue_depth") == 0
    names = (
        "reconnects",
        "connections_lost",
        "rest_errors",
        "rest_requests_failed",
        "leaks",
        "rejected_frames",
        "barge_ins",
        "backend_failures",
    )
    for name in names:
        assert value(first, f"agentd_{name}_total") == 0, name
    buckets = {dict(labels)["le"] for name, labels in first if name.endswith("_bucket")}
    assert {"0.001", "0.01", "0.1", "1.0", "5.0", "+Inf"} <= buckets

    # a rejected frame, a REST error that is retried, a dropped WebSocket, then a whole call
    # with two turns and a barge-in
    await sim.faults.send_raw("not json")
    sim.faults.fail("POST", r"/transcribes$", 503, count=1)
    connects = daemon.stream.stats.connects
    sim.faults.drop_websockets()
    await sim.wait_for(lambda: daemon.stream.stats.connects > connects, 10)
    await asyncio.wait_for(daemon.stream.ready.wait(), 10)
    caller = Caller(
        [
            Utterance("first question"),
            Utterance("no wait stop", barge_in_after_s=0.1),
            Utterance("thanks"),
        ],
        hangup_after_s=None,
    )
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, caller)
    await asyncio.wait_for(
        daemon.dispatcher.wait_until(lambda: bool(daemon.dispatcher.live_calls())), 10
    )
    during = await scrape(port)
    assert value(during, "agentd_live_calls") == 1

    await sim.wait_for(lambda: daemon.tallies["turn"] >= 2, 10)
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    after = await scrape(port)
    assert value(after, "agentd_calls_total", direction="incoming") == 1
    assert value(after, "agentd_calls_total", direction="outgoing") == 0
    ended = [r.data["reason"] for r in daemon.records if r.what == "ended"]
    assert len(ended) == 1
    assert value(after, "agentd_calls_ended_total", reason=str(ended[0])) == 1
    assert value(after, "agentd_barge_ins_total") == 1
    assert value(after, "agentd_rejected_frames_total") == 1
    assert value(after, "agentd_rest_errors_total") == 1
    assert value(after, "agentd_rest_requests_failed_total") == 0  # the retry was answered
    assert value(after, "agentd_reconnects_total") == 1
    assert value(after, "agentd_connections_lost_total") == 1
    assert value(after, "agentd_connected") == 1
    assert value(after, "agentd_live_calls") == 0
    assert value(after, "agentd_leaks_total") == 0
    says = [
        float(ms) / 1000
        for r in daemon.records
        if r.what == "turn" and isinstance(ms := r.data.get("first_say_ms"), (int, float))
    ]
    assert len(says) >= 2
    assert value(after, "agentd_turn_first_say_seconds_count") == len(says)
    assert value(after, "agentd_turn_first_say_seconds_sum") == pytest.approx(sum(says))
    assert value(after, "agentd_turn_first_say_seconds_bucket", le="+Inf") == len(says)
    assert value(after, "agentd_turn_first_say_seconds_bucket", le="5.0") == len(says)

    daemon.stop()
    await asyncio.wait_for(daemon.stopped.wait(), 10)
    assert listening() == before_start  # the endpoint closed with the daemon


async def test_answers_expected_at_a_hangup_are_no_failed_requests(
    sim: Simulator, agent: StartAgent
) -> None:
    # at a hangup VoIPBIN may have ended a session already: its stop answered 404 is what
    # agentd expects (as good as stopped), and counted as a failed request it raised the
    # operator's alarm at a normal hangup
    daemon = await agent(metrics={"listen": "127.0.0.1:0"})
    assert daemon.metrics is not None
    stop = r"/speakings/[^/]+/stop$"
    sim.faults.fail("POST", stop, 404, apply=True)
    caller = Caller([Utterance("hello")], hangup_after_s=0.05)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, caller)
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    assert [r.status for r in sim.requests_matching("POST", stop)] == [404]
    assert [r.what for r in daemon.records if r.what == "leak"] == []
    assert daemon.status_snapshot().counters.rest_requests_failed == 0
    scraped = await scrape(daemon.metrics.port)
    assert value(scraped, "agentd_rest_requests_failed_total") == 0
    assert value(scraped, "agentd_rest_errors_total") == 0


@pytest.mark.slow  # the store's busy timeout (5 s) runs out once
async def test_a_locked_store_is_told_by_status_and_the_metrics(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    socket = str(tmp_path / "s.sock")
    daemon = await agent(metrics={"listen": "127.0.0.1:0"}, status={"socket": socket})
    assert daemon.metrics is not None and daemon.persister is not None
    doc = await asyncio.to_thread(status.fetch, socket)
    assert doc["counters"]["store_write_failures"] == 0
    assert value(await scrape(daemon.metrics.port), "agentd_store_write_failures_total") == 0

    # another process holds SQLite's write lock past the busy timeout (a sqlite3 shell, a backup)
    lock = sqlite3.connect(daemon.config.store_path, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")
    try:
        call_id = sim.inbound_call(
            CALLER, OUR_NUMBER, Caller([Utterance("hello")], hangup_after_s=None)
        )
        await asyncio.wait_for(
            daemon.dispatcher.wait_until(lambda: call_id in daemon.dispatcher.calls), 10
        )
        saving = daemon.persister.saving(call_id)
        assert saving is not None
        await asyncio.wait_for(saving, 15)  # it fails: the store said "database is locked"
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    failed = daemon.persister.failures
    assert failed > 0

    doc = await asyncio.to_thread(status.fetch, socket)
    assert doc["counters"]["store_write_failures"] >= failed
    assert f"store write failures  {doc['counters']['store_write_failures']}" in status.render(doc)
    scraped = value(await scrape(daemon.metrics.port), "agentd_store_write_failures_total")
    assert scraped >= failed
    # the call is served all the same
    await asyncio.wait_for(
        daemon.dispatcher.wait_until(
            lambda: any(c.id == call_id and c.turn >= 1 for c in daemon.dispatcher.live_calls())
        ),
        15,
    )
    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)


@pytest.mark.slow  # a whole call
async def test_a_backend_timeout_is_counted_by_the_metrics_as_by_status(
    llm: OpenAIStub, sim: Simulator, agent: StartAgent
) -> None:
    # the model does not answer within backend.timeout_s: the caller gets the fallback
    llm.script(Script("Too late.", first_token_s=30))
    daemon = await agent(
        metrics={"listen": "127.0.0.1:0"},
        backend={"kind": "openai", "base_url": llm.base_url, "model": "m", "timeout_s": 0.3},
    )
    assert daemon.metrics is not None
    assert value(await scrape(daemon.metrics.port), "agentd_backend_failures_total") == 0
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("hello there")]))
    await sim.wait_call_status(call_id, "hangup", timeout=15)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    failed = [r for r in daemon.records if r.what == "backend_failed"]
    assert [r.data["error"] for r in failed] == ["backend timed out"]
    assert daemon.status_snapshot().counters.backend_failures == 1
    assert value(await scrape(daemon.metrics.port), "agentd_backend_failures_total") == 1


@pytest.mark.slow  # waits out the reconnect backoff of two refused attempts
async def test_an_outage_is_one_lost_connection_and_a_reconnect_per_attempt(
    sim: Simulator, agent: StartAgent
) -> None:
    # an operator alerts on lost connections (flapping) and on agentd_connected (an outage):
    # the attempts during an outage are counted, but as what they are
    daemon = await agent(metrics={"listen": "127.0.0.1:0"})
    assert daemon.metrics is not None
    sim.faults.refuse_ws(503, count=2)
    sim.faults.drop_websockets()
    await sim.wait_for(lambda: daemon.stream.stats.connects == 2, 15)
    await asyncio.wait_for(daemon.stream.ready.wait(), 10)
    samples = await scrape(daemon.metrics.port)
    assert value(samples, "agentd_reconnects_total") == 3  # after the drop and each refusal
    assert value(samples, "agentd_connections_lost_total") == 1
    assert value(samples, "agentd_connected") == 1
    counters = daemon.status_snapshot().counters
    assert (counters.reconnects, counters.connections_lost) == (3, 1)


@needs_proc
async def test_metrics_are_off_by_default(agent: StartAgent) -> None:
    before = listening()
    daemon = await agent()
    assert daemon.config.metrics_listen == ""
    assert daemon.metrics is None
    assert listening() == before  # agentd opened no TCP port at all


async def test_two_daemons_keep_their_own_registries(agent: StartAgent) -> None:
    one = await agent(metrics={"listen": "127.0.0.1:0"})
    two = await agent(metrics={"listen": "[::1]:0"} if _has_ipv6() else {"listen": "127.0.0.1:0"})
    assert one.metrics is not None and two.metrics is not None
    assert one.metrics.registry is not two.metrics.registry
    assert one.metrics.port != two.metrics.port or one.metrics.host != two.metrics.host


async def test_a_reply_retracted_because_the_caller_went_on_is_no_barge_in_anywhere(
    agent: StartAgent,
) -> None:
    # the call report leaves it out (tests/test_call_report.py): status and metrics agree
    daemon = await agent(metrics={"listen": "127.0.0.1:0"})
    assert daemon.metrics is not None
    daemon._record(Record("c1", Kind.BARGE_IN, {"turn": 1, "by": "caller went on"}))
    daemon._record(Record("c1", Kind.BARGE_IN, {"turn": 2, "by": "speech"}))
    assert daemon.status_snapshot().counters.barge_ins == 1
    assert value(await scrape(daemon.metrics.port), "agentd_barge_ins_total") == 1


def _has_ipv6() -> bool:
    import socket

    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


BASE = {"voipbin": {"accesskey": "vb_x"}, "agent": {"numbers": ["*"]}}


@pytest.mark.parametrize(
    "listen", ["0.0.0.0:9464", "192.168.1.5:9464", "[::]:9464", "example.com:9464", "[fe80::1]:1"]
)
def test_a_non_loopback_listen_address_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^metrics\.listen: .* is not a loopback address"):
        load(None, env={}, overrides={**BASE, "metrics": {"listen": listen}})


@pytest.mark.parametrize("listen", ["9464", "127.0.0.1", "127.0.0.1:port", ":9464", "1:99999"])
def test_a_malformed_listen_address_is_refused(listen: str) -> None:
    with pytest.raises(ConfigError, match=r"^metrics\.listen: expected host:port"):
        load(None, env={}, overrides={**BASE, "metrics": {"listen": listen}})


def test_loopback_addresses_are_accepted(tmp_path: Path) -> None:
    assert parse_listen("127.0.0.1:9464") == ("127.0.0.1", 9464)
    assert parse_listen("127.0.0.2:0") == ("127.0.0.2", 0)
    assert parse_listen("localhost:9464") == ("127.0.0.1", 9464)
    assert parse_listen("[::1]:9464") == ("::1", 9464)
    config = tmp_path / "agentd.toml"
    config.write_text(
        '[voipbin]\naccesskey = "vb_x"\n[agent]\nnumbers = ["*"]\n'
        '[metrics]\nlisten = "127.0.0.1:9464"\n'
    )
    assert load(config, env={}).metrics_listen == "127.0.0.1:9464"
    env = {"AGENTD_METRICS_LISTEN": "0.0.0.0:9464"}
    with pytest.raises(ConfigError, match="not a loopback address"):
        load(config, env=env)


def test_a_call_report_adds_its_session_seconds_and_turns() -> None:
    m = Metrics("127.0.0.1:0", lambda: {})
    data: dict[str, object] = {"session_seconds": {"speaking": 12.5, "transcribe": 10.0}}
    m.record(Record("c1", Kind.REPORT, {**data, "turns": 3}))
    m.record(Record("c2", Kind.REPORT, {"session_seconds": {"speaking": -1}, "turns": True}))
    value = m.registry.get_sample_value
    assert value("agentd_session_seconds_total", {"kind": "speaking"}) == 12.5
    assert value("agentd_session_seconds_total", {"kind": "transcribe"}) == 10.0
    assert value("agentd_turns_total") == 3.0


LIVE = {
    "reconnects": 0.0,
    "connections_lost": 0.0,
    "rest_errors": 0.0,
    "rest_requests_failed": 0.0,
    "rejected_frames": 0.0,
    "live_calls": 2.0,
    "rest_queue_depth": 0.0,
    "connected": 1.0,
    "log_lines_dropped": 0.0,
    "store_write_failures": 0.0,
}


def test_a_replica_shows_its_leases_takeovers_and_the_store() -> None:
    replica = {
        "leases_held": 2.0,
        "replicas_live": 2.0,
        "store_reachable": 1.0,
        "lease_claims": 5.0,
        "lease_claims_lost": 4.0,
        "takeovers": 1.0,
        "calls_lost": 0.0,
    }
    value = Metrics("127.0.0.1:0", lambda: {**LIVE, **replica}).registry.get_sample_value
    assert value("agentd_leases_held") == 2.0
    assert value("agentd_replicas_live") == 2.0
    assert value("agentd_store_reachable") == 1.0
    assert value("agentd_lease_claims_total", {"won": "true"}) == 5.0
    assert value("agentd_lease_claims_total", {"won": "false"}) == 4.0
    assert value("agentd_takeovers_total") == 1.0
    assert value("agentd_calls_lost_total") == 0.0
    # one agentd on SQLite: no replica series at all
    alone = Metrics("127.0.0.1:0", lambda: LIVE).registry.get_sample_value
    assert alone("agentd_leases_held") is None and alone("agentd_live_calls") == 2.0


def test_every_metric_served_is_named_in_the_readme() -> None:
    # the README is the operator's list of what to scrape and alert on: one served but not
    # named there is one nobody alerts on
    replica = dict.fromkeys(
        (
            "leases_held",
            "replicas_live",
            "store_reachable",
            "lease_claims",
            "lease_claims_lost",
            "takeovers",
            "calls_lost",
        ),
        0.0,
    )
    registry = Metrics("127.0.0.1:0", lambda: {**LIVE, **replica}).registry
    names = {
        f"{family.name}_total" if family.type == "counter" else family.name
        for family in registry.collect()
    }
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert len(names) > 20
    assert sorted(name for name in names if f"`{name}" not in readme) == []
