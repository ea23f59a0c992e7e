"""The SQLite store, on real files: round trips, migrations, bad files, kill -9, concurrency."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import sys
import tempfile
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agentd.store import (
    LATEST_VERSION,
    MIGRATIONS,
    SEEN_LIMIT,
    Batch,
    CallRecord,
    Store,
    StoreError,
)

ROOT = Path(__file__).resolve().parent.parent


def record(call_id: str = "c1", **changes: object) -> CallRecord:
    base = CallRecord(
        call_id=call_id,
        direction="incoming",
        phase="active",
        status="progressing",
        transcribe_id="t-1",
        speaking_id="s-1",
        pending_stops=(("speaking", "s-0"),),
        greeted=True,
        turn=2,
        history=(("assistant", "Hello."), ("user", "Hi")),
    )
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


class Clock:
    """A hand-driven unix clock, so prune needs no sleeping."""

    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "agentd.db")


@pytest.fixture
async def store(db: str) -> AsyncIterator[Store]:
    s = await Store.open(db)
    yield s
    await s.close()


# ---- one daemon per store ------------------------------------------------------------------------


async def test_a_store_held_by_a_daemon_is_refused_to_a_second_until_it_is_closed(db: str) -> None:
    first = await Store.open(db, exclusive=True)
    with pytest.raises(StoreError, match="another agentd is running with the store"):
        await Store.open(db, exclusive=True)
    reader = await Store.open(db)  # `agentd calls` reads beside the daemon
    assert await reader.live_calls() == []
    await reader.close()
    await first.close()
    second = await Store.open(db, exclusive=True)  # released with the close
    await second.close()


async def test_a_store_that_cannot_be_opened_releases_its_lock(tmp_path: Path) -> None:
    db = tmp_path / "agentd.db"
    db.write_bytes(b"not a database, " * 512)
    for _ in range(2):  # the second try is refused for the file, not for a lock left behind
        with pytest.raises(StoreError) as refused:
            await Store.open(str(db), exclusive=True)
        assert "another agentd" not in str(refused.value)


# ---- calls -------------------------------------------------------------------------------------


async def test_round_trip_with_unicode_survives_reopen(db: str) -> None:
    rec = record(
        history=(
            ("system", "be brief"),
            ("assistant", "こんにちは、ご用件は？ 👋"),
            ("user", 'Grüße — "quotes", \\backslash\\, \n newline, \x00 nul'),
            ("user", "a lone surrogate \ud800 from the wire"),
        ),
        pending_stops=(("speaking", "s-0"), ("transcribe", "t-0")),
        hangup_reason="",
        seen_transcripts=("tr-1", "tr-2"),
        hangup_pending=True,
        after_reply="transfer:+15550002222",
    )
    s = await Store.open(db)
    await s.save_call(rec)
    assert await s.live_calls() == [rec]
    await s.close()

    s = await Store.open(db)
    assert await s.live_calls() == [rec]
    assert s.schema_version == LATEST_VERSION
    await s.close()


async def test_none_session_ids_and_defaults(store: Store) -> None:
    rec = CallRecord("c9", "outgoing", "dialing", "dialing", None, None, (), False, 0, ())
    await store.save_call(rec)
    assert await store.live_calls() == [rec]


async def test_live_calls_excludes_ended_oldest_first(store: Store) -> None:
    for cid in ("a", "b", "c", "d"):
        await store.save_call(record(cid))
    await store.end_call("b", "normal")
    await store.save_call(record("d", phase="ended"))
    assert [r.call_id for r in await store.live_calls()] == ["a", "c"]


async def test_upsert_replaces_and_keeps_position(store: Store) -> None:
    await store.save_call(record("a"))
    await store.save_call(record("b"))
    newer = record("a", phase="ending", speaking_id=None, turn=7, history=(("user", "bye"),))
    await store.save_call(newer)
    assert await store.live_calls() == [newer, record("b")]


async def test_end_call_keeps_the_row_and_the_reason(store: Store, db: str) -> None:
    await store.save_call(record("a"))
    await store.end_call("a", "caller hung up")
    await store.end_call("nobody", "x")  # unknown call: nothing to do, no error
    assert await store.live_calls() == []
    row = sqlite3.connect(db).execute("SELECT phase, hangup_reason FROM calls").fetchall()
    assert row == [("ended", "caller hung up")]


async def test_seen_transcripts_are_bounded(store: Store) -> None:
    ids = tuple(f"tr-{i}" for i in range(SEEN_LIMIT + 50))
    await store.save_call(record(seen_transcripts=ids))
    (back,) = await store.live_calls()
    assert back.seen_transcripts == ids[-SEEN_LIMIT:]


# ---- events and transcripts --------------------------------------------------------------------


async def test_events_in_order_with_time(db: str) -> None:
    clock = Clock()
    s = await Store.open(db, clock=clock)
    await s.add_event("c1", "turn", {"turn": 1, "first_say_ms": 12.5})
    clock.now += 1
    await s.add_event("c2", "barge_in", {"by": "speech"})
    data: dict[str, object] = {"kind": "speaking", "session_id": "s-1", "nested": {"ü": [1, None]}}
    await s.add_event("c1", "leak", data)
    data["kind"] = "mutated after the call"  # the store has its own copy
    await s.add_event("c1", "ended", {})
    assert await s.events("c1") == [
        (clock.now - 1, "turn", {"turn": 1, "first_say_ms": 12.5}),
        (clock.now, "leak", {"kind": "speaking", "session_id": "s-1", "nested": {"ü": [1, None]}}),
        (clock.now, "ended", {}),
    ]
    assert [w for _, w, _ in await s.events("c2")] == ["barge_in"]
    assert await s.events("nobody") == []
    await s.close()


async def test_unserialisable_event_data_fails_the_caller_only(store: Store) -> None:
    with pytest.raises(TypeError):
        await store.add_event("c1", "bad", {"x": object()})
    await store.add_event("c1", "good", {})
    assert [w for _, w, _ in await store.events("c1")] == ["good"]


async def test_transcript_in_order_and_idempotent(store: Store) -> None:
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


# ---- prune -------------------------------------------------------------------------------------


async def test_prune_deletes_only_old_ended_calls_and_their_rows(db: str) -> None:
    clock = Clock()
    s = await Store.open(db, clock=clock)
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
    assert len(await s.events("live")) == 1

    assert await s.prune(older_than_s=600) == 0
    clock.now += 3600
    assert await s.prune(older_than_s=600) == 1  # "recent" now; "live" never
    assert [r.call_id for r in await s.live_calls()] == ["live"]
    await s.close()


async def test_a_revived_call_is_not_pruned(db: str) -> None:
    clock = Clock()
    s = await Store.open(db, clock=clock)
    await s.save_call(record("a"))
    await s.end_call("a", "normal")
    await s.save_call(record("a", phase="ending"))  # the latest state wins
    clock.now += 10_000
    assert await s.prune(1) == 0
    assert [r.call_id for r in await s.live_calls()] == ["a"]
    await s.close()


# ---- migrations and bad files ------------------------------------------------------------------


def make_v1(path: str) -> None:
    """A version-1 database as an older agentd left it, with a call, an event and a transcript."""
    conn = sqlite3.connect(path)
    for statement in MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute(
        """INSERT INTO calls (call_id, direction, phase, status, transcribe_id, speaking_id,
               pending_stops, greeted, turn, history, hangup_reason, created_at, updated_at)
           VALUES ('old-call', 'incoming', 'active', 'progressing', 't-1', 's-1',
                   '[["speaking", "s-0"]]', 1, 3, '[["user", "héllo"]]', '', 1.0, 1.0)"""
    )
    conn.execute(
        "INSERT INTO events (call_id, at, what, data) VALUES ('old-call', 2, 'turn', '{}')"
    )
    conn.execute(
        "INSERT INTO transcripts (call_id, transcript_id, direction, text, at) "
        "VALUES ('old-call', 'tr-1', 'in', 'héllo', 2)"
    )
    conn.execute("PRAGMA user_version = 1")
    conn.commit()
    conn.close()


async def test_migrates_a_version_1_file_and_keeps_its_data(db: str) -> None:
    assert LATEST_VERSION >= 2
    make_v1(db)
    s = await Store.open(db)
    assert s.schema_version == LATEST_VERSION
    assert await s.live_calls() == [
        CallRecord(
            "old-call",
            "incoming",
            "active",
            "progressing",
            "t-1",
            "s-1",
            (("speaking", "s-0"),),
            True,
            3,
            (("user", "héllo"),),
            seen_transcripts=(),
        )
    ]
    assert await s.events("old-call") == [(2.0, "turn", {})]
    assert await s.transcript("old-call") == [("in", "héllo")]
    await s.save_call(record("old-call", seen_transcripts=("tr-1",)))  # the v2 column works
    assert (await s.live_calls())[0].seen_transcripts == ("tr-1",)
    await s.close()

    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='index'")}
    assert {"events_call", "transcripts_call"} <= indexes
    conn.close()


async def test_new_file_is_wal_and_latest(db: str) -> None:
    s = await Store.open(db)
    assert s.schema_version == LATEST_VERSION
    await s.close()
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"  # persistent in the file
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    conn.close()


async def test_a_new_store_and_its_wal_are_owner_only_whatever_the_umask(db: str) -> None:
    # outside systemd (umask 022) the transcripts were world-readable (0644)
    old = os.umask(0o022)
    try:
        s = await Store.open(db)
        await s.save_call(record())  # a write: the -wal and -shm exist while the store is open
        modes = {p: os.stat(p).st_mode & 0o777 for p in (db, db + "-wal", db + "-shm")}
        await s.close()
    finally:
        os.umask(old)
    assert modes == {db: 0o600, db + "-wal": 0o600, db + "-shm": 0o600}


async def test_an_existing_store_keeps_the_mode_its_owner_chose(db: str) -> None:
    os.close(os.open(db, os.O_WRONLY | os.O_CREAT, 0o640))
    os.chmod(db, 0o640)  # e.g. a group that may read the history
    s = await Store.open(db)
    await s.save_call(record())
    wal = os.stat(db + "-wal").st_mode & 0o777
    await s.close()
    assert os.stat(db).st_mode & 0o777 == 0o640
    assert wal == 0o640  # SQLite gives the WAL the file's own mode


async def test_newer_schema_is_refused_clearly(tmp_path: Path) -> None:
    path = str(tmp_path / "agentd.db")
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 99")
    conn.close()
    with pytest.raises(StoreError) as err:
        await Store.open(path)
    assert str(err.value) == (
        f"{path} has schema version 99; this agentd knows up to {LATEST_VERSION} "
        "(an agentd newer than this one migrated it)"
    )


def write_bytes(path: str, content: bytes) -> None:
    Path(path).write_bytes(content)


def read_bytes(path: str) -> bytes:
    return Path(path).read_bytes()


@pytest.mark.parametrize(
    "content",
    [b"this is not a database at all\n" * 100, b"SQLite format 3\x00" + b"\xff" * 4000],
    ids=["text", "bad-header"],
)
async def test_garbage_file_is_a_store_error(db: str, content: bytes) -> None:
    write_bytes(db, content)
    with pytest.raises(StoreError, match="is not a usable agentd database") as err:
        await Store.open(db)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert read_bytes(db) == content  # and left untouched


async def test_foreign_sqlite_file_is_refused(db: str) -> None:
    conn = sqlite3.connect(db)
    conn.execute("CREATE TABLE calls (x)")
    conn.close()
    with pytest.raises(StoreError, match="not agentd's"):
        await Store.open(db)


async def test_missing_directory_is_a_store_error(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="cannot open"):
        await Store.open(str(tmp_path / "no" / "such" / "agentd.db"))


async def test_closed_store_refuses_work_and_close_is_idempotent(db: str) -> None:
    s = await Store.open(db)
    await s.close()
    await s.close()
    with pytest.raises(StoreError, match="closed"):
        await s.save_call(record())


# ---- durability and concurrency ----------------------------------------------------------------

KILL_SELF = textwrap.dedent(
    """
    import asyncio, os, signal, sys
    from agentd.store import Batch, CallRecord, Store

    async def main() -> None:
        store = await Store.open(sys.argv[1])
        rec = CallRecord("killed-call", "incoming", "active", "progressing", "t-9", "s-9",
                         (("speaking", "s-8"),), True, 4, (("user", "ça va ?"),))
        await store.save_call(rec)
        # a per-turn save is committed without an fsync: a crash of the process keeps it too
        turn = CallRecord("turn-call", "incoming", "active", "progressing", "t-7", "s-7",
                          (), True, 2, (("user", "hello"), ("assistant", "hi")))
        await store.write(Batch(calls=[(turn, 1.0)], durable=False))
        print("SAVED", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    asyncio.run(main())
    """
)


async def test_a_committed_save_survives_kill_9(db: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        KILL_SELF,
        db,
        cwd=ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, errout = await proc.communicate()
    assert proc.returncode == -9, errout.decode()
    assert out == b"SAVED\n"
    assert read_bytes(db + "-wal")  # never closed: the call is only in the WAL

    s = await Store.open(db)
    rec, turn = await s.live_calls()
    assert (turn.call_id, turn.turn, turn.history) == (
        "turn-call",
        2,
        (("user", "hello"), ("assistant", "hi")),
    )
    assert rec.call_id == "killed-call"
    assert (rec.transcribe_id, rec.speaking_id, rec.pending_stops) == (
        "t-9",
        "s-9",
        (("speaking", "s-8"),),
    )
    assert rec.history == (("user", "ça va ?"),)
    await s.close()


async def test_only_a_batch_marked_not_durable_commits_without_the_fsync(db: str) -> None:
    """SQLite's `synchronous` is what decides the fsync at commit: FULL (2) for the
    write-ahead and every other write, NORMAL (1) for the coalesced per-turn saves."""
    seen: list[int] = []
    s = await Store.open(db)
    try:

        async def mode() -> int:
            # a read changes nothing: it sees the setting the last commit ran with
            def read(conn: sqlite3.Connection) -> int:
                return int(conn.execute("PRAGMA synchronous").fetchone()[0])

            return await s._run(read, write=False)

        for durable in (False, True, False):
            await s.write(Batch(calls=[(record(), 1.0)], durable=durable))
            seen.append(await mode())
            await s.save_call(record())
            seen.append(await mode())
    finally:
        await s.close()
    assert seen == [1, 2, 2, 2, 1, 2]


async def test_concurrent_saves_from_many_tasks_all_land(store: Store) -> None:
    async def one_call(i: int) -> None:
        for turn in range(5):
            await store.save_call(record(f"c{i:03}", turn=turn))
            await store.add_event(f"c{i:03}", "turn", {"turn": turn})

    await asyncio.gather(*(one_call(i) for i in range(100)))
    calls = await store.live_calls()
    assert [r.call_id for r in calls] == [f"c{i:03}" for i in range(100)]
    assert all(r.turn == 4 for r in calls)
    for i in (0, 57, 99):
        assert [d["turn"] for _, _, d in await store.events(f"c{i:03}")] == [0, 1, 2, 3, 4]


async def test_event_loop_keeps_running_while_writes_wait_on_the_disk(
    store: Store, db: str
) -> None:
    # Another connection holds the write lock: the store's writes wait in SQLite's busy handler
    # (a slow disk, as far as the worker can tell). The loop must keep running meanwhile.
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    order: list[str] = []
    saves = [asyncio.ensure_future(store.save_call(record(f"c{i:04}"))) for i in range(1000)]
    for s in saves:
        s.add_done_callback(lambda _: order.append("saved"))

    for _ in range(200):
        order.append("tick")
        await asyncio.sleep(0)  # a yield, not a wait: the ticker needs the loop, nothing else
    assert not any(s.done() for s in saves)  # all still in flight behind the lock ...
    assert order == ["tick"] * 200  # ... and the loop ran the ticker 200 times meanwhile

    blocker.execute("COMMIT")
    blocker.close()
    await asyncio.gather(*saves)
    assert order.count("saved") == 1000
    assert len(await store.live_calls()) == 1000


async def test_a_failing_write_does_not_spoil_its_batch(store: Store) -> None:
    bad = record("bad", history=(("user", object()),))  # json cannot encode it
    results = await asyncio.gather(
        store.save_call(record("a")),
        store.save_call(bad),
        store.save_call(record("c")),
        return_exceptions=True,
    )
    assert results[0] is None and results[2] is None
    assert isinstance(results[1], TypeError)
    assert [r.call_id for r in await store.live_calls()] == ["a", "c"]


async def test_a_batch_is_one_job_and_a_bad_value_in_it_loses_only_itself(store: Store) -> None:
    bad = record("bad", history=(("user", object()),))  # json cannot encode it
    batch = Batch(
        calls=[(record("a"), 1.0), (bad, 1.0), (record("c", phase="active"), 1.0)],
        events=[("a", "turn", {"n": 1}, 2.0), ("a", "odd", {"x": object()}, 2.0)],
        transcripts=[(("a", "tr-1", "in", "hello"), 3.0)],
        ends=[("c", "normal", 4.0)],
    )
    assert len(batch) == 7
    assert await store.write(batch) == 2  # the unstorable call and event
    assert [r.call_id for r in await store.live_calls()] == ["a"]  # c ended in the same job
    assert [(w, d) for _, w, d in await store.events("a")] == [("turn", {"n": 1})]
    assert await store.transcript("a") == [("in", "hello")]
    assert await store.ended_call_ids() == ["c"]


async def test_reads_see_writes_queued_before_them(store: Store) -> None:
    # not awaited one by one: the read is queued behind the write, in the same batch
    write = asyncio.ensure_future(store.save_call(record("a")))
    read = asyncio.ensure_future(store.live_calls())
    await write
    assert [r.call_id for r in await read] == ["a"]


async def test_close_flushes_queued_writes(db: str) -> None:
    s = await Store.open(db)
    pending = [asyncio.ensure_future(s.save_call(record(f"c{i}"))) for i in range(50)]
    await asyncio.sleep(0)  # one yield: each task runs up to its queued write
    assert not any(p.done() for p in pending)
    await s.close()
    await asyncio.gather(*pending)
    s = await Store.open(db)
    assert len(await s.live_calls()) == 50
    await s.close()


# ---- property: live_calls follows a simple model -----------------------------------------------

CALL_IDS = st.sampled_from(["a", "b", "c", "d", "ü-☎"])
PHASES = st.sampled_from(["new", "dialing", "ringing", "answered", "active", "ending", "ended"])
TEXT = st.text(max_size=20)
SAVE = st.builds(
    CallRecord,
    call_id=CALL_IDS,
    direction=st.sampled_from(["incoming", "outgoing"]),
    phase=PHASES,
    status=st.sampled_from(["dialing", "ringing", "progressing", "hangup"]),
    transcribe_id=st.none() | TEXT,
    speaking_id=st.none() | TEXT,
    pending_stops=st.lists(st.tuples(st.sampled_from(["speaking", "transcribe"]), TEXT)).map(tuple),
    greeted=st.booleans(),
    turn=st.integers(0, 1000),
    history=st.lists(st.tuples(st.sampled_from(["user", "assistant"]), TEXT), max_size=5).map(
        tuple
    ),
    hangup_reason=TEXT,
    seen_transcripts=st.lists(TEXT, max_size=3).map(tuple),
)
END = st.tuples(st.just("end"), CALL_IDS, TEXT)
OPS = st.lists(SAVE | END, max_size=25)


def model_live(ops: list[CallRecord | tuple[str, str, str]]) -> list[CallRecord]:
    calls: dict[str, CallRecord] = {}  # insertion order = first save
    for op in ops:
        if isinstance(op, CallRecord):
            calls[op.call_id] = op
        elif op[1] in calls:
            calls[op[1]] = dataclasses.replace(calls[op[1]], phase="ended", hangup_reason=op[2])
    return [r for r in calls.values() if r.phase != "ended"]


@pytest.mark.slow  # a property run against a real SQLite file
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS)
def test_live_calls_match_a_simple_model(ops: list[CallRecord | tuple[str, str, str]]) -> None:
    async def run(path: str) -> None:
        s = await Store.open(path)
        # fired all at once, so batching and in-batch ordering are exercised too
        pending = [
            s.save_call(op) if isinstance(op, CallRecord) else s.end_call(op[1], op[2])
            for op in ops
        ]
        await asyncio.gather(*pending)
        assert await s.live_calls() == model_live(ops)
        await s.close()
        s = await Store.open(path)
        assert await s.live_calls() == model_live(ops)
        await s.close()

    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(run(os.path.join(tmp, "agentd.db")))
