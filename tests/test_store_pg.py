"""The PostgreSQL store against a real server: the SQLite store's behaviours, migrations, leases,
heartbeats, and a password that never shows."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest

from agentd.config import PgUrl
from agentd.store import SEEN_LIMIT, Batch, CallRecord, Store, StoreError
from agentd.store_pg import LATEST_PG_VERSION, MIGRATIONS, PgStore, pg_schema_version
from tests.test_store import Clock, record

if TYPE_CHECKING:
    from tests.pg import PgServer

pytest_plugins = ["tests.pg"]  # the fixtures pg_server and pg_url

AnyStore = Store | PgStore


async def rows(url: str, sql: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql))
    finally:
        await conn.close()


# ---- both stores: the behaviours of tests/test_store.py -----------------------------------------


@pytest.fixture(params=["sqlite", "postgres"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> object:
    """A function that opens the store under test (again and again: the same database)."""
    if request.param == "sqlite":
        path = str(tmp_path / "agentd.db")

        async def open_sqlite(clock: Clock | None = None) -> AnyStore:
            return await Store.open(path) if clock is None else await Store.open(path, clock=clock)

        return open_sqlite
    url = request.getfixturevalue("pg_url")

    async def open_pg(clock: Clock | None = None) -> AnyStore:
        return await PgStore.open(url, clock=clock)

    return open_pg


@pytest.fixture
async def store(opener: object) -> AsyncIterator[AnyStore]:
    s = await opener()  # type: ignore[operator]
    yield s
    await s.close()


async def test_round_trip_with_unicode_survives_reopen(opener: object) -> None:
    rec = record(
        history=(
            ("system", "be brief"),
            ("assistant", "こんにちは、ご用件は？ 👋"),
            ("user", 'Grüße — "quotes", \\backslash\\, \n newline, \x00 nul'),
            ("user", "a lone surrogate \ud800 from the wire"),
        ),
        pending_stops=(("speaking", "s-0"), ("transcribe", "t-0")),
        seen_transcripts=("tr-1", "tr-2"),
        hangup_pending=True,
        after_reply="transfer:+15550002222",
    )
    s = await opener()  # type: ignore[operator]
    await s.save_call(rec)
    assert await s.live_calls() == [rec]
    await s.close()
    s = await opener()  # type: ignore[operator]
    assert await s.live_calls() == [rec]
    await s.close()


async def test_none_session_ids_and_defaults(store: AnyStore) -> None:
    rec = CallRecord("c9", "outgoing", "dialing", "dialing", None, None, (), False, 0, ())
    await store.save_call(rec)
    assert await store.live_calls() == [rec]


async def test_live_calls_excludes_ended_oldest_first(store: AnyStore) -> None:
    for cid in ("a", "b", "c", "d"):
        await store.save_call(record(cid))
    await store.end_call("b", "normal")
    await store.end_call("nobody", "x")  # unknown call: nothing to do, no error
    await store.save_call(record("d", phase="ended"))
    assert [r.call_id for r in await store.live_calls()] == ["a", "c"]
    assert await store.ended_call_ids() == ["b", "d"]
    assert await store.ended_call_ids(limit=1) == ["d"]


async def test_upsert_replaces_and_keeps_position(store: AnyStore) -> None:
    await store.save_call(record("a"))
    await store.save_call(record("b"))
    newer = record("a", phase="ending", speaking_id=None, turn=7, history=(("user", "bye"),))
    await store.save_call(newer)
    assert await store.live_calls() == [newer, record("b")]


async def test_seen_transcripts_are_bounded(store: AnyStore) -> None:
    ids = tuple(f"tr-{i}" for i in range(SEEN_LIMIT + 50))
    await store.save_call(record(seen_transcripts=ids))
    (back,) = await store.live_calls()
    assert back.seen_transcripts == ids[-SEEN_LIMIT:]


async def test_created_at_is_the_first_save_on_the_stores_clock(opener: object) -> None:
    clock = Clock()
    s = await opener(clock)  # type: ignore[operator]
    await s.save_call(record("a"))
    clock.now += 50
    await s.save_call(record("a", turn=3))
    (back,) = await s.live_calls()
    assert back.created_at == 1_700_000_000.0 and s.now() == clock.now
    await s.close()


async def test_a_wall_clock_stepped_after_open_does_not_move_the_stores_clock(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a box that booted with its clock an hour off, set right by NTP once agentd runs: its
    # calls' created_at must stay on the database's clock, or the replica that takes one over
    # finds it an hour old (VoIPBIN's cap: ended at once) or an hour younger than it is
    store = await PgStore.open(pg_url)
    try:
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 3600.0)
        (row,) = await rows(pg_url, "SELECT extract(epoch FROM clock_timestamp())::float8")
        assert abs(store.now() - row[0]) < 1.0
    finally:
        await store.close()


async def test_events_in_order_with_time(opener: object) -> None:
    clock = Clock()
    s = await opener(clock)  # type: ignore[operator]
    await s.add_event("c1", "turn", {"turn": 1, "first_say_ms": 12.5})
    clock.now += 1
    await s.add_event("c2", "barge_in", {"by": "speech"})
    data: dict[str, object] = {"kind": "speaking", "nested": {"ü": [1, None]}, "nul": "\x00"}
    await s.add_event("c1", "leak", data)
    data["kind"] = "mutated after the call"  # the store has its own copy
    await s.add_event("c1", "ended", {})
    assert await s.events("c1") == [
        (clock.now - 1, "turn", {"turn": 1, "first_say_ms": 12.5}),
        (clock.now, "leak", {"kind": "speaking", "nested": {"ü": [1, None]}, "nul": "\x00"}),
        (clock.now, "ended", {}),
    ]
    assert [w for _, w, _ in await s.events("c2")] == ["barge_in"]
    assert await s.events("nobody") == []
    await s.close()


async def test_unserialisable_data_fails_the_caller_only(store: AnyStore) -> None:
    with pytest.raises(TypeError):
        await store.add_event("c1", "bad", {"x": object()})
    await store.add_event("c1", "good", {})
    assert [w for _, w, _ in await store.events("c1")] == ["good"]
    bad = record("bad", history=(("user", object()),))
    results = await asyncio.gather(
        store.save_call(record("a")),
        store.save_call(bad),
        store.save_call(record("c")),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None and isinstance(results[1], TypeError)
    assert [r.call_id for r in await store.live_calls()] == ["a", "c"]


@pytest.mark.parametrize("durable", [True, False], ids=["durable", "coalesced"])
async def test_a_batch_is_one_job_and_a_bad_value_in_it_loses_only_itself(
    store: AnyStore, durable: bool
) -> None:
    bad = record("bad", history=(("user", object()),))  # json cannot encode it
    batch = Batch(
        calls=[(record("a"), 1.0), (bad, 1.0), (record("c", phase="active"), 1.0)],
        events=[("a", "turn", {"n": 1}, 2.0), ("a", "odd", {"x": object()}, 2.0)],
        transcripts=[(("a", "tr-1", "in", "hello"), 3.0), (("a", "tr-1", "in", "again"), 3.0)],
        ends=[("c", "normal", 4.0)],
        durable=durable,  # a per-turn save commits without waiting for the disk, same rows
    )
    assert await store.write(batch) == 2  # the unstorable call and event
    assert [r.call_id for r in await store.live_calls()] == ["a"]  # c ended in the same job
    assert [(at, w, d) for at, w, d in await store.events("a")] == [(2.0, "turn", {"n": 1})]
    assert await store.transcript("a") == [("in", "hello")]
    assert await store.ended_call_ids() == ["c"]
    assert await store.write(Batch()) == 0


async def test_batches_fired_without_waiting_land_in_order(store: AnyStore) -> None:
    writes = [
        asyncio.ensure_future(store.write(Batch(calls=[(record("a", turn=t), float(t))])))
        for t in range(20)
    ]
    live = asyncio.ensure_future(store.live_calls())
    assert await asyncio.gather(*writes) == [0] * 20
    assert [r.turn for r in await live] == [19]


async def test_transcript_in_order_and_idempotent(store: AnyStore) -> None:
    await store.add_transcript("c1", "tr-1", "out", "Hello, how can I help?")
    await store.add_transcript("c1", "tr-2", "in", "残高を教えて")
    await store.add_transcript("c1", "tr-1", "out", "Hello, how can I help?")  # redelivered
    await store.add_transcript("c2", "tr-3", "in", "other call")
    await store.add_transcript("c1", "tr-2", "in", "a different text, same id")
    await store.add_transcript("c1", "tr-4", "out", "Sure.")
    assert await store.transcript("c1") == [
        ("out", "Hello, how can I help?"),
        ("in", "残高を教えて"),
        ("out", "Sure."),
    ]
    assert await store.transcript("c2") == [("in", "other call")]


async def test_prune_deletes_only_old_ended_calls_and_their_rows(opener: object) -> None:
    clock = Clock()
    s = await opener(clock)  # type: ignore[operator]
    for cid in ("old", "recent", "live"):
        await s.save_call(record(cid))
        await s.add_event(cid, "turn", {"turn": 1})
        await s.add_transcript(cid, f"tr-{cid}", "in", "hi")
    await s.add_event("stranger", "ended", {})  # a call we never took
    await s.end_call("old", "normal")
    clock.now += 3600
    await s.end_call("recent", "normal")
    clock.now += 60
    assert await s.prune(older_than_s=600) == 1
    assert [r.call_id for r in await s.live_calls()] == ["live"]
    assert await s.events("old") == [] and await s.transcript("old") == []
    assert await s.events("stranger") == []
    assert len(await s.events("recent")) == 1 and await s.transcript("recent") == [("in", "hi")]
    assert await s.prune(older_than_s=600) == 0
    clock.now += 3600
    assert await s.prune(older_than_s=600) == 1  # "recent" now; "live" never
    assert [r.call_id for r in await s.live_calls()] == ["live"]
    await s.close()


async def test_a_revived_call_is_not_pruned(opener: object) -> None:
    clock = Clock()
    s = await opener(clock)  # type: ignore[operator]
    await s.save_call(record("a"))
    await s.end_call("a", "normal")
    await s.save_call(record("a", phase="ending"))  # the latest state wins
    clock.now += 10_000
    assert await s.prune(1) == 0
    assert [r.call_id for r in await s.live_calls()] == ["a"]
    await s.close()


async def test_closed_store_refuses_work_and_close_is_idempotent(opener: object) -> None:
    s = await opener()  # type: ignore[operator]
    await s.close()
    await s.close()
    with pytest.raises(StoreError, match="closed"):
        await s.save_call(record())


async def test_concurrent_saves_from_many_tasks_all_land_in_order(store: AnyStore) -> None:
    async def one_call(i: int) -> None:
        for turn in range(5):
            await store.save_call(record(f"c{i:03}", turn=turn))
            await store.add_event(f"c{i:03}", "turn", {"turn": turn})

    await asyncio.gather(*(one_call(i) for i in range(60)))
    calls = await store.live_calls()
    assert [r.call_id for r in calls] == [f"c{i:03}" for i in range(60)]
    assert all(r.turn == 4 for r in calls)
    for i in (0, 37, 59):
        assert [d["turn"] for _, _, d in await store.events(f"c{i:03}")] == [0, 1, 2, 3, 4]


async def test_unawaited_writes_of_one_call_land_in_call_order(store: AnyStore) -> None:
    # fired without waiting, as the Persister does: the last save must win, on a pool too
    saves = [asyncio.ensure_future(store.save_call(record("a", turn=t))) for t in range(30)]
    ended = asyncio.ensure_future(store.end_call("a", "bye"))
    read = asyncio.ensure_future(store.ended_call_ids())  # sees the writes queued before it
    await asyncio.gather(*saves, ended)
    assert await read == ["a"]
    revived = [asyncio.ensure_future(store.save_call(record("a", turn=t))) for t in range(31, 40)]
    live = asyncio.ensure_future(store.live_calls())
    await asyncio.gather(*revived)
    assert [r.turn for r in await live] == [39]


async def test_a_write_whose_caller_is_cancelled_still_lands(store: AnyStore) -> None:
    task = asyncio.ensure_future(store.save_call(record("a")))
    await asyncio.sleep(0)
    task.cancel()
    assert [r.call_id for r in await store.live_calls()] == ["a"]


async def test_close_flushes_queued_writes(opener: object) -> None:
    s = await opener()  # type: ignore[operator]
    pending = [asyncio.ensure_future(s.save_call(record(f"c{i}"))) for i in range(30)]
    await asyncio.sleep(0)
    await s.close()
    await asyncio.gather(*pending)
    s = await opener()  # type: ignore[operator]
    assert len(await s.live_calls()) == 30
    await s.close()


# ---- PostgreSQL only: text it cannot hold, migrations ------------------------------------------


async def test_nul_in_plain_text_is_replaced_not_refused(pg_url: str) -> None:
    s = await PgStore.open(pg_url)
    await s.save_call(record("a", hangup_reason="x\x00y", transcribe_id="t\x00"))
    await s.add_transcript("a", "tr\x00", "in", "he\x00llo")
    (back,) = await s.live_calls()
    assert (back.hangup_reason, back.transcribe_id) == ("x\ufffdy", "t\ufffd")
    assert await s.transcript("a") == [("in", "he\ufffdllo")]
    await s.close()


async def test_a_row_the_database_refuses_loses_only_itself(pg_url: str) -> None:
    s = await PgStore.open(pg_url)
    huge = record("huge", turn=2**40)  # beyond PostgreSQL's integer: refused by the driver
    batch = Batch(calls=[(record("a"), 1.0), (huge, 1.0), (record("b"), 1.0)])
    assert await s.write(batch) == 1  # the fallback: row by row, each under a savepoint
    assert [r.call_id for r in await s.live_calls()] == ["a", "b"]
    with pytest.raises(StoreError, match="cannot save the call: DataError"):
        await s.save_call(huge)
    await s.close()


async def test_a_fresh_database_is_migrated_and_reopening_changes_nothing(pg_url: str) -> None:
    assert await pg_schema_version(pg_url) == 0
    s = await PgStore.open(pg_url)
    assert s.schema_version == LATEST_PG_VERSION == len(MIGRATIONS)
    await s.close()
    before = await rows(pg_url, "SELECT version, applied_at FROM agentd_schema ORDER BY version")
    assert [r["version"] for r in before] == list(range(1, LATEST_PG_VERSION + 1))
    s = await PgStore.open(pg_url)
    await s.close()
    assert await rows(pg_url, "SELECT version, applied_at FROM agentd_schema ORDER BY 1") == before
    assert await pg_schema_version(pg_url) == LATEST_PG_VERSION
    tables = {r[0] for r in await rows(pg_url, "SELECT tablename FROM pg_tables")}
    assert {"calls", "events", "transcripts", "leases", "replicas", "agentd_schema"} <= tables


async def test_two_replicas_migrating_at_once_both_start(pg_url: str) -> None:
    stores = await asyncio.gather(*(PgStore.open(pg_url) for _ in range(4)))
    assert {s.schema_version for s in stores} == {LATEST_PG_VERSION}
    versions = await rows(pg_url, "SELECT version FROM agentd_schema ORDER BY version")
    assert [r[0] for r in versions] == list(range(1, LATEST_PG_VERSION + 1))  # each step once
    await stores[0].save_call(record("a"))
    assert [r.call_id for r in await stores[3].live_calls()] == ["a"]
    for s in stores:
        await s.close()


async def test_a_version_1_database_is_migrated_and_keeps_its_calls(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    await conn.execute(
        "CREATE TABLE agentd_schema (version integer PRIMARY KEY, applied_at "
        "timestamptz NOT NULL DEFAULT now())"
    )
    for statement in MIGRATIONS[0]:
        await conn.execute(statement)
    await conn.execute("INSERT INTO agentd_schema (version) VALUES (1)")
    await conn.execute(
        """INSERT INTO calls (call_id, direction, phase, status, pending_stops, greeted, turn,
               history, created_at, updated_at)
           VALUES ('old', 'incoming', 'active', 'progressing', '[]', true, 3,
                   '[["user", "héllo"]]', 1.0, 1.0)"""
    )
    await conn.close()
    s = await PgStore.open(pg_url)
    assert s.schema_version == LATEST_PG_VERSION
    (rec,) = await s.live_calls()
    assert (rec.call_id, rec.turn, rec.history) == ("old", 3, (("user", "héllo"),))
    assert await s.claim("old", "r1", 30) == 1  # the version 2 tables work
    await s.close()


async def test_a_newer_schema_is_refused_clearly(pg_url: str) -> None:
    s = await PgStore.open(pg_url)
    await s.close()
    conn = await asyncpg.connect(pg_url)
    await conn.execute("INSERT INTO agentd_schema (version) VALUES (99)")
    await conn.close()
    with pytest.raises(StoreError) as err:
        await PgStore.open(pg_url)
    dsn = PgUrl.parse(pg_url).dsn
    assert str(err.value) == (
        f"PostgreSQL {dsn} has agentd schema version 99; this agentd knows up to "
        f"{LATEST_PG_VERSION} (an agentd newer than this one migrated it)"
    )


async def test_a_foreign_calls_table_is_refused(pg_url: str) -> None:
    conn = await asyncpg.connect(pg_url)
    await conn.execute("CREATE TABLE calls (x integer)")
    await conn.close()
    with pytest.raises(StoreError, match="not agentd's"):
        await PgStore.open(pg_url)
    assert [tuple(r) for r in await rows(pg_url, "SELECT to_regclass('agentd_schema')")] == [
        (None,)
    ]  # rolled back


# ---- the password never shows -------------------------------------------------------------------


async def test_a_wrong_password_is_a_store_error_without_it(
    pg_server: PgServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    name = pg_server.create_database(owner=pg_server.pw_user)
    wrong = "Wrong-Password-93b1d7"
    try:
        with pytest.raises(StoreError) as err:
            await PgStore.open(pg_server.url(name, pg_server.pw_user, wrong))
        text = str(err.value)
        assert "password authentication failed" in text and pg_server.pw_user in text
        assert err.value.__cause__ is None and err.value.__suppress_context__
        with pytest.raises(StoreError) as err2:
            await pg_schema_version(pg_server.url(name, pg_server.pw_user, wrong))
        # and with the right one (in the URL, percent-encoded as a URL must be) it works
        good = await PgStore.open(pg_server.url(name, pg_server.pw_user, pg_server.pw_password))
        assert pg_server.pw_password not in repr(good) and pg_server.pw_password not in good.dsn
        await good.save_call(record("a"))
        await good.close()
    finally:
        pg_server.drop_database(name)
    for shown in (text, repr(err.value), str(err2.value), caplog.text):
        assert wrong not in shown and pg_server.pw_password not in shown


async def test_an_unreachable_server_is_a_store_error_without_the_password(
    tmp_path: Path,
) -> None:
    secret = "Unreachable-Secret-5e2a"
    url = PgUrl.parse(f"postgresql://agentd:{secret}@/agentd?host={tmp_path}&port=1")
    with pytest.raises(StoreError) as err:
        await PgStore.open(url)
    assert str(err.value).startswith(f"PostgreSQL {url.dsn}: cannot connect: ")
    assert secret not in str(err.value) and secret not in repr(url)


async def test_a_failing_statement_is_a_redacted_store_error(pg_server: PgServer) -> None:
    name = pg_server.create_database(owner=pg_server.pw_user)
    try:
        s = await PgStore.open(pg_server.url(name, pg_server.pw_user, pg_server.pw_password))
        pg_server.execute("DROP TABLE events", database=name)
        with pytest.raises(StoreError) as err:
            await s.add_event("c1", pg_server.pw_password, {"echo": pg_server.pw_password})
        assert 'relation "events" does not exist' in str(err.value)
        await s.close()
    finally:
        pg_server.drop_database(name)
    assert pg_server.pw_password not in str(err.value)


# ---- leases ------------------------------------------------------------------------------------


@pytest.fixture
async def replicas(pg_url: str) -> AsyncIterator[tuple[PgStore, PgStore, PgStore]]:
    """Replicas a and b, and `later`: a view of the same database 60 s in the future."""
    a = await PgStore.open(pg_url)
    b = await PgStore.open(pg_url)
    later = await PgStore.open(pg_url, db_skew_s=60.0)
    yield a, b, later
    for s in (a, b, later):
        await s.close()


async def test_the_first_claim_wins_exactly_once(
    replicas: tuple[PgStore, PgStore, PgStore],
) -> None:
    a, b, _ = replicas
    for i in range(20):
        got = await asyncio.gather(a.claim(f"c{i}", "a", 30), b.claim(f"c{i}", "b", 30))
        assert sorted(got, key=str) == [1, None]
        winner = "a" if got[0] == 1 else "b"
        assert await a.holds(f"c{i}", winner, 1)
        assert not await a.holds(f"c{i}", "b" if winner == "a" else "a", 1)
    assert await a.claim("c0", "a", 30) in (1, None)  # only the owner renews; same epoch


async def test_the_owner_reclaiming_renews_with_the_same_epoch(
    replicas: tuple[PgStore, PgStore, PgStore],
) -> None:
    a, b, _ = replicas
    assert await a.claim("c", "a", 30) == 1
    (before,) = await a.leases()
    assert await a.claim("c", "a", 300) == 1
    (after,) = await a.leases()
    assert after.epoch == 1 and after.acquired_at == before.acquired_at
    assert after.expires_at > before.expires_at and 290 < after.expires_in_s <= 300
    assert await b.claim("c", "b", 30) is None


async def test_an_expired_lease_is_taken_over_and_the_old_owner_is_fenced(
    replicas: tuple[PgStore, PgStore, PgStore],
) -> None:
    a, _, later = replicas
    assert await a.claim("c", "a", 30) == 1
    await a.save_call(record("c"))
    assert [x.call_id for x in await later.expired_leases()] == ["c"]  # 60 s on: expired
    assert await a.expired_leases() == []
    assert await later.claim("c", "b", 30) == 2  # b, its clock 60 s on, takes it over
    assert not await a.holds("c", "a", 1)  # from now on a never acts on the call again
    assert not await later.holds("c", "a", 1)
    assert await later.holds("c", "b", 2)
    assert await a.renew("a", 30, ["c"]) == set()  # a's renewal does not bring it back
    assert not await a.release("c", "a", 1)
    assert await a.claim("c", "a", 30) is None  # b's lease is live (from a's now)
    (lease,) = await a.leases()
    assert (lease.owner, lease.epoch) == ("b", 2)


async def test_renew_returns_only_what_is_still_held(
    replicas: tuple[PgStore, PgStore, PgStore],
) -> None:
    a, _, later = replicas
    for cid in ("c1", "c2", "c3"):
        assert await a.claim(cid, "a", 30) == 1
    assert await later.claim("c2", "b", 30) == 2
    assert await a.renew("a", 30, ["c1", "c2", "c3", "never-held"]) == {"c1", "c3"}
    assert await a.renew("a", 30, []) == set()
    # a lease that lapsed but that nobody took over is renewed, epoch unchanged
    assert await later.renew("a", 30, ["c1"]) == {"c1"}
    assert await later.holds("c1", "a", 1)
    assert {x.call_id: x.owner for x in await a.leases(owner="a")} == {"c1": "a", "c3": "a"}


async def test_release_hands_the_call_over_at_once_with_a_new_epoch(
    replicas: tuple[PgStore, PgStore, PgStore],
) -> None:
    a, b, _ = replicas
    assert await a.claim("c", "a", 30) == 1
    await a.save_call(record("c"))
    assert not await a.release("c", "a", 7)  # not our epoch: nothing changes
    assert not await a.release("c", "b", 1)
    assert await a.holds("c", "a", 1)
    assert await a.release("c", "a", 1)
    assert not await a.holds("c", "a", 1)
    assert [x.call_id for x in await b.expired_leases()] == ["c"]  # up for takeover now
    assert await b.claim("c", "b", 30) == 2
    assert await b.expired_leases() == []
    await b.end_call("c", "normal")
    assert await b.release("c", "b", 2)
    assert await b.expired_leases() == []  # an ended call is nobody's to take over
    assert await a.claim("c", "a", 30) == 3  # epochs only grow


async def test_prune_deletes_the_leases_of_pruned_calls(pg_url: str) -> None:
    clock = Clock()
    s = await PgStore.open(pg_url, clock=clock)
    later = await PgStore.open(pg_url, db_skew_s=7200.0)
    for cid in ("old", "live"):
        await s.save_call(record(cid))
        assert await s.claim(cid, "a", 30) == 1
    assert await s.claim("never-saved", "a", 30) == 1
    await s.end_call("old", "normal")
    clock.now += 3600
    assert await s.prune(600) == 1
    assert sorted(x.call_id for x in await s.leases()) == ["live", "never-saved"]
    assert await later.prune(600) == 0  # 2 h on: the lease of a call never saved goes
    assert sorted(x.call_id for x in await s.leases()) == ["live"]
    await s.close()
    await later.close()


# ---- heartbeats --------------------------------------------------------------------------------


async def test_heartbeats_and_live_replicas(replicas: tuple[PgStore, PgStore, PgStore]) -> None:
    a, b, later = replicas
    await b.heartbeat("b", {"pid": 2})
    await a.heartbeat("a", {"pid": 1, "host": "box-1"})
    live = await a.live_replicas(15)
    assert [(r.replica_id, r.info) for r in live] == [
        ("a", {"pid": 1, "host": "box-1"}),
        ("b", {"pid": 2}),
    ]
    assert all(0 <= r.age_s < 15 and r.last_seen >= r.started_at for r in live)
    assert await later.live_replicas(15) == []  # 60 s without a heartbeat: gone
    await later.heartbeat("a", {"pid": 11})  # a beats again (a minute later)
    (again,) = await later.live_replicas(15)
    assert again.replica_id == "a" and again.info == {"pid": 11}
    assert again.started_at == live[0].started_at  # the same replica, not a new one
    await a.leave("b")
    assert [r.replica_id for r in await a.live_replicas(15)] == ["a"]
