"""The persistent store: which calls agentd owns, their session ids, what is left to clean up.

Theory of operation
-------------------
VoIPBIN bills every transcribe and speaking session until someone stops it. If agentd dies (a
crash, `kill -9`, the OOM killer) it must learn on restart which calls it owned, which session ids
they had and which stops were never confirmed. So each call's state is written to SQLite as it
changes, and `live_calls()` gives it back.

One connection, one thread. Python's `sqlite3` blocks, so the connection lives on a dedicated
worker thread (`agentd-store`) and is used there only. Coroutines put jobs on a queue and await a
future; the worker runs them in order (FIFO: a read sees every write queued before it) and hands
results back with `call_soon_threadsafe`. The event loop never waits for the disk.

Writes are grouped: the worker takes whatever is queued (up to `_MAX_BATCH` jobs), runs the writes
in one transaction and commits once, so a burst of saves costs one commit, not one each. A write's
future is resolved only after its COMMIT returned: `await save_call(...)` means "on disk". If
anything in a batch fails, the batch is rolled back and its writes are retried one transaction
each, so one bad write cannot take its neighbours down with it.

Durability: WAL with `synchronous=FULL` (see `_PRAGMAS`). Schema: versioned with
`PRAGMA user_version`, migrated forward by the ordered steps in `MIGRATIONS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

__all__ = ["LATEST_VERSION", "MIGRATIONS", "SEEN_LIMIT", "CallRecord", "Store", "StoreError"]

T = TypeVar("T")

SEEN_LIMIT: Final = 200
"""How many answered transcript ids a call keeps (the newest ones): enough to drop a redelivery."""

_MAX_BATCH: Final = 128  # jobs per transaction: big enough to amortise a commit, small enough
# that the first writer of a burst does not wait behind a thousand others

_BUSY_TIMEOUT_MS: Final = 5000  # another process (sqlite3 CLI, a backup) may hold the lock briefly

# WAL: readers never block the writer and a commit is one append to the -wal file.
# synchronous=FULL: every commit fsyncs the WAL. NORMAL would already survive `kill -9` of the
# process (a commit is in the OS page cache once write() returned), but on a power cut or a VM
# reset it can lose the last commits, and a lost commit here is a lost session id that VoIPBIN
# bills until someone stops it. The fsync is paid once per batch, off the per-turn hot path.
_PRAGMAS: Final = (
    f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
)

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # version 1: calls, their events and their transcripts
    (
        """CREATE TABLE calls (
            id            INTEGER PRIMARY KEY,   -- explicit, so VACUUM keeps "oldest first"
            call_id       TEXT NOT NULL UNIQUE,
            direction     TEXT NOT NULL,
            phase         TEXT NOT NULL,
            status        TEXT NOT NULL,
            transcribe_id TEXT,
            speaking_id   TEXT,
            pending_stops TEXT NOT NULL DEFAULT '[]',   -- JSON [[kind, session id], ...]
            greeted       INTEGER NOT NULL DEFAULT 0,
            turn          INTEGER NOT NULL DEFAULT 0,
            history       TEXT NOT NULL DEFAULT '[]',   -- JSON [[role, text], ...]
            hangup_reason TEXT NOT NULL DEFAULT '',
            created_at    REAL NOT NULL,
            updated_at    REAL NOT NULL,
            ended_at      REAL                          -- set when phase becomes 'ended'
        )""",
        "CREATE INDEX calls_phase ON calls(phase)",
        """CREATE TABLE events (
            id      INTEGER PRIMARY KEY,
            call_id TEXT NOT NULL,
            at      REAL NOT NULL,
            what    TEXT NOT NULL,
            data    TEXT NOT NULL                        -- JSON object
        )""",
        """CREATE TABLE transcripts (
            id            INTEGER PRIMARY KEY,
            call_id       TEXT NOT NULL,
            transcript_id TEXT NOT NULL UNIQUE,
            direction     TEXT NOT NULL,
            text          TEXT NOT NULL,
            at            REAL NOT NULL
        )""",
    ),
    # version 2: the transcript ids a call already answered (so a redelivered transcript after a
    # restart is not answered twice), and per-call indexes: events() and transcript() were full
    # table scans, and so was prune's delete
    (
        "ALTER TABLE calls ADD COLUMN seen_transcripts TEXT NOT NULL DEFAULT '[]'",
        "CREATE INDEX events_call ON events(call_id, id)",
        "CREATE INDEX transcripts_call ON transcripts(call_id, id)",
    ),
)
LATEST_VERSION: Final = len(MIGRATIONS)


class StoreError(Exception):
    """The store cannot be used: wrong or corrupt file, newer schema, disk error, closed."""


@dataclass(frozen=True)
class CallRecord:
    """Everything needed to pick a call up again after a restart (immutable, so thread-safe)."""

    call_id: str
    direction: str  # incoming / outgoing
    phase: str  # new/dialing/ringing/answered/active/ending/ended
    status: str  # last VoIPBIN call status seen
    transcribe_id: str | None
    speaking_id: str | None
    pending_stops: tuple[tuple[str, str], ...]  # (kind, session id) not yet confirmed stopped
    greeted: bool
    turn: int
    history: tuple[tuple[str, str], ...]  # (role, text)
    hangup_reason: str = ""
    seen_transcripts: tuple[str, ...] = ()  # transcript ids already answered, newest last


# ---- value conversion (runs on the worker thread) -----------------------------------------------


def _dumps(obj: object) -> str:
    """JSON for a column: readable UTF-8 normally, exact \\u escapes if the text cannot be UTF-8.

    A lone surrogate (possible in text decoded from JSON off the wire) cannot be encoded as UTF-8,
    and sqlite3 would refuse the whole write. ASCII-escaped JSON stores it exactly.
    """
    s = json.dumps(obj, ensure_ascii=False)
    if s.isascii():
        return s
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return json.dumps(obj)
    return s


def _text(s: str) -> str:
    """A plain TEXT value: a lone surrogate becomes U+FFFD rather than failing the write."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return s.encode("utf-8", "replace").decode("utf-8")
    return s


def _opt(s: str | None) -> str | None:
    return None if s is None else _text(s)


def _pairs(raw: str) -> tuple[tuple[str, str], ...]:
    return tuple((str(a), str(b)) for a, b in json.loads(raw))


_CALL_COLUMNS: Final = (
    "call_id, direction, phase, status, transcribe_id, speaking_id, pending_stops, greeted, "
    "turn, history, hangup_reason, seen_transcripts"
)


def _row_to_record(row: Sequence[Any]) -> CallRecord:
    return CallRecord(
        call_id=row[0],
        direction=row[1],
        phase=row[2],
        status=row[3],
        transcribe_id=row[4],
        speaking_id=row[5],
        pending_stops=_pairs(row[6]),
        greeted=bool(row[7]),
        turn=int(row[8]),
        history=_pairs(row[9]),
        hangup_reason=row[10],
        seen_transcripts=tuple(str(t) for t in json.loads(row[11])),
    )


# ---- the worker thread --------------------------------------------------------------------------


@dataclass(eq=False)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    stop: bool = False  # the last job: the worker thread ends after it
    needs_conn: bool = True  # False only for the jobs that open and close the connection


_Outcome = tuple[asyncio.Future[Any], Any, BaseException | None]


def _settle(outcomes: list[_Outcome]) -> None:
    """On the event loop: hand each job its result (a cancelled waiter simply misses it)."""
    for fut, result, exc in outcomes:
        if fut.done():
            continue
        if exc is None:
            fut.set_result(result)
        else:
            fut.set_exception(exc)


def _wrap(exc: BaseException) -> BaseException:
    """sqlite3's errors become StoreError, so callers need to know one exception type."""
    if isinstance(exc, sqlite3.Error):
        err = StoreError(f"database error: {exc}")
        err.__cause__ = exc
        return err
    return exc


class _Worker:
    """The one thread that owns the connection. Everything here runs on that thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self.jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        # daemon: a process that exits without close() must not hang on this thread; SQLite's
        # atomic commit means an interrupted transaction is simply not there after restart
        self.thread = threading.Thread(target=self._run, name="agentd-store", daemon=True)

    def _run(self) -> None:
        while True:
            batch = [self.jobs.get()]
            while len(batch) < _MAX_BATCH and not batch[-1].stop:
                try:
                    batch.append(self.jobs.get_nowait())
                except queue.Empty:
                    break
            self._run_batch(batch)
            if batch[-1].stop:
                return

    def _run_batch(self, batch: list[_Job]) -> None:
        done: list[tuple[_Job, Any, BaseException | None]] = []
        writes: list[_Job] = []
        for job in batch:
            if job.write:
                writes.append(job)
                continue
            # a read (or open/close) must see the writes queued before it, committed
            done += self._commit(writes)
            writes = []
            done.append(self._call(job))
        done += self._commit(writes)
        by_loop: dict[asyncio.AbstractEventLoop, list[_Outcome]] = {}
        for job, result, exc in done:
            by_loop.setdefault(job.loop, []).append((job.future, result, exc))
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # that loop is closed: nobody waits any more
                loop.call_soon_threadsafe(_settle, outcomes)

    def _call(self, job: _Job) -> tuple[_Job, Any, BaseException | None]:
        try:
            if self.conn is None and job.needs_conn:
                raise StoreError("the store is not open")
            return job, job.fn(cast(sqlite3.Connection, self.conn)), None
        except BaseException as exc:
            return job, None, _wrap(exc)

    def _commit(self, writes: list[_Job]) -> list[tuple[_Job, Any, BaseException | None]]:
        """Run `writes` in one transaction; resolve them only once COMMIT has returned."""
        if not writes:
            return []
        conn = self.conn
        if conn is None:
            return [(j, None, StoreError("the store is not open")) for j in writes]
        failed: int | None = None  # which write raised, if one did
        try:
            conn.execute("BEGIN IMMEDIATE")
            results = []
            for i, job in enumerate(writes):
                failed = i
                results.append(job.fn(conn))
            failed = None
            conn.execute("COMMIT")
            return [(j, r, None) for j, r in zip(writes, results, strict=True)]
        except BaseException as exc:
            if conn.in_transaction:
                # SQLite may have rolled back by itself (e.g. SQLITE_FULL)
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            error = _wrap(exc)
        if failed is None:
            # BEGIN or COMMIT failed (locked past busy_timeout, disk full, I/O error): nothing
            # was written, and the same would happen to each write on its own
            return [(j, None, error) for j in writes]
        # one write spoilt the batch: it alone fails, the others are committed without it
        rest = writes[:failed] + writes[failed + 1 :]
        return [(writes[failed], None, error), *self._commit(rest)]


# ---- opening and migrating ----------------------------------------------------------------------


def _open_connection(path: str) -> tuple[sqlite3.Connection, int]:
    """Connect, set the pragmas, migrate. Runs on the worker thread. Returns (conn, version)."""
    try:
        # isolation_level=None: no implicit BEGINs, the worker writes BEGIN/COMMIT itself
        conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    try:
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        version = _migrate(conn, path)
    except StoreError:
        conn.close()
        raise
    except sqlite3.DatabaseError as exc:
        conn.close()
        # "file is not a database", "database disk image is malformed": a clear one-liner
        raise StoreError(f"{path} is not a usable agentd database: {exc}") from None
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"cannot open {path}: {exc}") from None
    return conn, version


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _check_version(version: int, path: str) -> None:
    if version > LATEST_VERSION:
        raise StoreError(
            f"{path} has schema version {version}; this agentd knows up to {LATEST_VERSION}"
        )


def _migrate(conn: sqlite3.Connection, path: str) -> int:
    version = _version(conn)
    _check_version(version, path)
    if version == LATEST_VERSION:
        return version
    # IMMEDIATE: two agentd processes starting together must not both run step N
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _version(conn)  # re-read under the lock
        _check_version(version, path)
        if version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise StoreError(f"{path} is an SQLite database, but not agentd's")
        for target in range(version + 1, LATEST_VERSION + 1):
            for statement in MIGRATIONS[target - 1]:
                conn.execute(statement)
        # user_version is part of the transaction: the steps and the number commit together
        conn.execute(f"PRAGMA user_version = {LATEST_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return LATEST_VERSION


# ---- the public face ----------------------------------------------------------------------------


class Store:
    """agentd's SQLite store. Open with `await Store.open(path)`; every method is a coroutine.

    Jobs run in the order they were called, so the last `save_call`/`end_call` of a call wins.
    A write whose awaiting task is cancelled is still committed.
    """

    schema_version: int

    def __init__(
        self, worker: _Worker, schema_version: int, clock: Callable[[], float] = time.time
    ) -> None:
        """Use `Store.open`; this only wires an already opened worker."""
        self._worker = worker
        self._closed = False
        self._clock = clock
        self.schema_version = schema_version

    @classmethod
    async def open(cls, path: str, *, clock: Callable[[], float] = time.time) -> Store:
        """Open (creating the file if missing, not its directory), use WAL, migrate to the latest.

        `clock` gives the unix time stamped on events and used by `prune` (tests inject one).
        Raises StoreError for a missing directory, a file that is not SQLite or is corrupt, or a
        schema newer than this code knows.
        """
        worker = _Worker(os.fspath(path))

        def connect(_: sqlite3.Connection) -> int:
            worker.conn, version = _open_connection(worker.path)
            return version

        worker.thread.start()
        try:
            version = await _submit(worker, connect, write=False, needs_conn=False)
        except BaseException:
            await _submit(worker, _close_fn(worker), write=False, stop=True, needs_conn=False)
            raise
        return cls(worker, version, clock)

    async def close(self) -> None:
        """Commit what is queued, close the connection and stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await _submit(
            self._worker, _close_fn(self._worker), write=False, stop=True, needs_conn=False
        )

    async def _run(self, fn: Callable[[sqlite3.Connection], T], *, write: bool) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        return await _submit(self._worker, fn, write=write)

    # ---- calls ----

    async def save_call(self, rec: CallRecord) -> None:
        """Insert or replace the call's state; returns once it is committed to disk."""
        now = self._clock()

        def save(conn: sqlite3.Connection) -> None:
            ended = rec.phase == "ended"
            conn.execute(
                f"""INSERT INTO calls ({_CALL_COLUMNS}, created_at, updated_at, ended_at)
                    VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                    ON CONFLICT(call_id) DO UPDATE SET
                        direction = excluded.direction, phase = excluded.phase,
                        status = excluded.status, transcribe_id = excluded.transcribe_id,
                        speaking_id = excluded.speaking_id,
                        pending_stops = excluded.pending_stops, greeted = excluded.greeted,
                        turn = excluded.turn, history = excluded.history,
                        hangup_reason = excluded.hangup_reason,
                        seen_transcripts = excluded.seen_transcripts,
                        updated_at = excluded.updated_at,
                        -- the first time it ended counts for prune; a revived call has none
                        ended_at = CASE WHEN excluded.phase = 'ended'
                                        THEN coalesce(calls.ended_at, excluded.ended_at)
                                        END""",
                (
                    _text(rec.call_id),
                    _text(rec.direction),
                    _text(rec.phase),
                    _text(rec.status),
                    _opt(rec.transcribe_id),
                    _opt(rec.speaking_id),
                    _dumps([list(p) for p in rec.pending_stops]),
                    int(rec.greeted),
                    rec.turn,
                    _dumps([list(m) for m in rec.history]),
                    _text(rec.hangup_reason),
                    _dumps(list(rec.seen_transcripts[-SEEN_LIMIT:])),
                    now,
                    now,
                    now if ended else None,
                ),
            )

        await self._run(save, write=True)

    async def live_calls(self) -> list[CallRecord]:
        """Every call whose phase is not "ended", the first saved first."""

        def read(conn: sqlite3.Connection) -> list[CallRecord]:
            rows = conn.execute(
                f"SELECT {_CALL_COLUMNS} FROM calls WHERE phase != 'ended' ORDER BY id"
            ).fetchall()
            return [_row_to_record(r) for r in rows]

        return await self._run(read, write=False)

    async def ended_call_ids(self, limit: int = 10_000) -> list[str]:
        """The most recently ended calls, oldest first: calls we left must stay left."""

        def read(conn: sqlite3.Connection) -> list[str]:
            rows = conn.execute(
                "SELECT call_id FROM calls WHERE phase = 'ended' ORDER BY id DESC LIMIT ?",
                (limit,),
            ).fetchall()
            return [str(r[0]) for r in reversed(rows)]

        return await self._run(read, write=False)

    async def end_call(self, call_id: str, reason: str) -> None:
        """Mark the call ended (the row stays, for history, until `prune`). Unknown id: no-op."""
        now = self._clock()

        def end(conn: sqlite3.Connection) -> None:
            conn.execute(
                """UPDATE calls SET phase = 'ended', hangup_reason = ?, updated_at = ?,
                       ended_at = coalesce(ended_at, ?)
                   WHERE call_id = ?""",
                (_text(reason), now, now, _text(call_id)),
            )

        await self._run(end, write=True)

    # ---- events and transcripts ----

    async def add_event(self, call_id: str, what: str, data: dict[str, object]) -> None:
        """Record a fact about a call ("turn" timings, "barge_in", "leak", ...) with the time."""
        now = self._clock()
        # serialised here, not on the worker: the caller may mutate `data` right after
        raw = _dumps(data)

        def add(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO events (call_id, at, what, data) VALUES (?, ?, ?, ?)",
                (_text(call_id), now, _text(what), raw),
            )

        await self._run(add, write=True)

    async def events(self, call_id: str) -> list[tuple[float, str, dict[str, object]]]:
        """The call's events as (unix time, what, data), in the order they were added."""

        def read(conn: sqlite3.Connection) -> list[tuple[float, str, dict[str, object]]]:
            rows = conn.execute(
                "SELECT at, what, data FROM events WHERE call_id = ? ORDER BY id",
                (_text(call_id),),
            ).fetchall()
            return [(float(at), what, json.loads(data)) for at, what, data in rows]

        return await self._run(read, write=False)

    async def add_transcript(
        self, call_id: str, transcript_id: str, direction: str, text: str
    ) -> None:
        """Append a transcript line; a transcript id already stored is ignored (redeliveries)."""
        now = self._clock()

        def add(conn: sqlite3.Connection) -> None:
            conn.execute(
                """INSERT INTO transcripts (call_id, transcript_id, direction, text, at)
                   VALUES (?, ?, ?, ?, ?) ON CONFLICT(transcript_id) DO NOTHING""",
                (_text(call_id), _text(transcript_id), _text(direction), _text(text), now),
            )

        await self._run(add, write=True)

    async def transcript(self, call_id: str) -> list[tuple[str, str]]:
        """The call's transcript as (direction, text), in the order it was added."""

        def read(conn: sqlite3.Connection) -> list[tuple[str, str]]:
            rows = conn.execute(
                "SELECT direction, text FROM transcripts WHERE call_id = ? ORDER BY id",
                (_text(call_id),),
            ).fetchall()
            return [(d, t) for d, t in rows]

        return await self._run(read, write=False)

    async def prune(self, older_than_s: float) -> int:
        """Delete calls that ended more than `older_than_s` ago, with their events and transcripts.

        Events and transcripts of calls that never had a row (a call agentd did not take) go too
        once they are that old. Returns how many calls were deleted. Live calls are never touched.
        """
        cutoff = self._clock() - older_than_s

        def prune(conn: sqlite3.Connection) -> int:
            old = "SELECT call_id FROM calls WHERE phase = 'ended' AND ended_at < ?"
            conn.execute(f"DELETE FROM events WHERE call_id IN ({old})", (cutoff,))
            conn.execute(f"DELETE FROM transcripts WHERE call_id IN ({old})", (cutoff,))
            n = conn.execute(
                "DELETE FROM calls WHERE phase = 'ended' AND ended_at < ?", (cutoff,)
            ).rowcount
            orphan = "call_id NOT IN (SELECT call_id FROM calls)"
            conn.execute(f"DELETE FROM events WHERE at < ? AND {orphan}", (cutoff,))
            conn.execute(f"DELETE FROM transcripts WHERE at < ? AND {orphan}", (cutoff,))
            return int(n)

        return await self._run(prune, write=True)


def _close_fn(worker: _Worker) -> Callable[[sqlite3.Connection], None]:
    def close(_: sqlite3.Connection) -> None:
        conn, worker.conn = worker.conn, None
        if conn is not None:
            try:
                conn.execute("PRAGMA optimize")  # cheap; keeps the planner's statistics fresh
            finally:
                conn.close()  # the last connection checkpoints the WAL into the main file

    return close


async def _submit(
    worker: _Worker,
    fn: Callable[[sqlite3.Connection], T],
    *,
    write: bool,
    stop: bool = False,
    needs_conn: bool = True,
) -> T:
    """Queue `fn` for the worker thread and wait for its outcome without blocking the loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()
    worker.jobs.put(_Job(fn, write, fut, loop, stop=stop, needs_conn=needs_conn))
    return await fut
