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

Durability: WAL with `synchronous=FULL` (see `_PRAGMAS`); a batch marked not durable (the
coalesced per-turn saves) commits with `synchronous=NORMAL`, safe against agentd's own crash,
not against a power loss. Schema: versioned with
`PRAGMA user_version`, migrated forward by the ordered steps in `MIGRATIONS`.

Where it lives: this module is the API (`Store`) and the conversion of values to columns;
`agentd.store_worker` is the worker thread and its batching (`_MAX_BATCH`); `agentd.store_schema`
is the file itself (`_PRAGMAS`, `MIGRATIONS`, opening and migrating) and `CallRecord`.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Final, Protocol, TypeVar

import orjson

from agentd.store_schema import LATEST_VERSION, MIGRATIONS, CallRecord, StoreError, open_connection
from agentd.store_worker import Worker, close_fn, submit

__all__ = [
    "LATEST_VERSION",
    "MIGRATIONS",
    "SEEN_LIMIT",
    "Batch",
    "CallRecord",
    "CallStore",
    "Store",
    "StoreError",
]

T = TypeVar("T")

SEEN_LIMIT: Final = 200
"""At most this many of a call's answered transcript ids are saved (a call remembers 16)."""


# ---- value conversion (runs on the worker thread) -----------------------------------------------


def _dumps(obj: object) -> str:
    """JSON for a column: readable UTF-8 normally, exact \\u escapes if the text cannot be UTF-8.

    orjson writes it (a call's history is rewritten on every turn: the stdlib takes ~9 µs for
    thirty messages, orjson under one); what orjson refuses goes to the stdlib. A lone surrogate
    (possible in text decoded from JSON off the wire) cannot be encoded as UTF-8, and sqlite3
    would refuse the whole write: ASCII-escaped JSON stores it exactly.
    """
    try:
        return orjson.dumps(obj).decode()
    except orjson.JSONEncodeError:
        pass  # a lone surrogate, an integer beyond 64 bits, a key that is not a string
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
    "turn, history, hangup_reason, seen_transcripts, hangup_pending, after_reply"
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
        hangup_pending=bool(row[12]),
        after_reply=str(row[13]),
        created_at=float(row[14]) if len(row) > 14 else 0.0,
    )


def _save(conn: sqlite3.Connection, rec: CallRecord, now: float) -> None:
    ended = rec.phase == "ended"
    conn.execute(
        f"""INSERT INTO calls ({_CALL_COLUMNS}, created_at, updated_at, ended_at)
            VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
            ON CONFLICT(call_id) DO UPDATE SET
                direction = excluded.direction, phase = excluded.phase,
                status = excluded.status, transcribe_id = excluded.transcribe_id,
                speaking_id = excluded.speaking_id,
                pending_stops = excluded.pending_stops, greeted = excluded.greeted,
                turn = excluded.turn, history = excluded.history,
                hangup_reason = excluded.hangup_reason,
                seen_transcripts = excluded.seen_transcripts,
                hangup_pending = excluded.hangup_pending,
                after_reply = excluded.after_reply,
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
            int(rec.hangup_pending),
            _text(rec.after_reply),
            now,
            now,
            now if ended else None,
        ),
    )


def _end(conn: sqlite3.Connection, call_id: str, reason: str, now: float) -> None:
    conn.execute(
        """UPDATE calls SET phase = 'ended', hangup_reason = ?, updated_at = ?,
               ended_at = coalesce(ended_at, ?)
           WHERE call_id = ?""",
        (_text(reason), now, now, _text(call_id)),
    )


def _event(conn: sqlite3.Connection, call_id: str, what: str, raw: str, now: float) -> None:
    conn.execute(
        "INSERT INTO events (call_id, at, what, data) VALUES (?, ?, ?, ?)",
        (_text(call_id), now, _text(what), raw),
    )


def _event_data(
    conn: sqlite3.Connection, call_id: str, what: str, data: dict[str, object], now: float
) -> None:
    _event(conn, call_id, what, _dumps(data), now)


# what one write of a batch can raise for its own values, leaving the transaction usable
_UNSTORABLE = (
    sqlite3.IntegrityError,
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    TypeError,
    ValueError,
)


def _transcript(conn: sqlite3.Connection, line: tuple[str, str, str, str], now: float) -> None:
    call_id, transcript_id, direction, text = line
    conn.execute(
        """INSERT INTO transcripts (call_id, transcript_id, direction, text, at)
           VALUES (?, ?, ?, ?, ?) ON CONFLICT(transcript_id) DO NOTHING""",
        (_text(call_id), _text(transcript_id), _text(direction), _text(text), now),
    )


@dataclass
class Batch:
    """Writes gathered on the event loop, done by `Store.write` in one job. Each carries the
    unix time it happened; event data is serialised on the store's thread, not the loop.

    `durable=False` (the coalesced per-turn saves) lets the commit skip waiting for the disk:
    the batch survives agentd's own crash (SIGKILL, OOM) as any other, but a power loss or OS
    crash in the next moment may lose it. The write-ahead before a billed session stays durable."""

    calls: list[tuple[CallRecord, float]] = field(default_factory=list)
    events: list[tuple[str, str, dict[str, object], float]] = field(default_factory=list)
    transcripts: list[tuple[tuple[str, str, str, str], float]] = field(default_factory=list)
    ends: list[tuple[str, str, float]] = field(default_factory=list)
    durable: bool = True

    def __len__(self) -> int:
        return len(self.calls) + len(self.events) + len(self.transcripts) + len(self.ends)


# ---- the public face ----------------------------------------------------------------------------


class CallStore(Protocol):
    """What the daemon needs of a store: SQLite (`Store`) and PostgreSQL (`PgStore`) both are."""

    def now(self) -> float:
        """The store's clock (unix time)."""
        ...

    async def write(self, batch: Batch) -> int:
        """One batch of writes; how many failed."""
        ...

    async def live_calls(self) -> list[CallRecord]:
        """Every call not ended."""
        ...

    async def ended_call_ids(self, limit: int = 10_000) -> list[str]:
        """The calls that ended, newest first."""
        ...

    async def prune(self, older_than_s: float) -> int:
        """Delete what ended long ago."""
        ...

    async def close(self) -> None:
        """Write what is queued and close."""
        ...


def lock_exclusive(path: str) -> int:
    """Lock `<path>.lock` for as long as the returned descriptor is open.

    Two daemons on one store would both answer every call (each greeting and reply said twice)
    and overwrite each other's rows: the second one is refused. A `flock` on a file of its own,
    as SQLite's locks on the database are POSIX ones it takes and drops per transaction; the
    kernel releases it when the process dies, so a SIGKILL leaves nothing stale."""
    lock_path = f"{path}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise StoreError(f"cannot open {path}: {exc.strerror} (its lock {lock_path})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise StoreError(
            f"another agentd is running with the store {os.path.abspath(path)} "
            "(one daemon per SQLite store; replicas share a PostgreSQL store)"
        ) from None
    return fd


class Store:
    """agentd's SQLite store. Open with `await Store.open(path)`; every method is a coroutine.

    Jobs run in the order they were called, so the last `save_call`/`end_call` of a call wins.
    A write whose awaiting task is cancelled is still committed.
    """

    schema_version: int

    def __init__(
        self,
        worker: Worker,
        schema_version: int,
        clock: Callable[[], float] = time.time,
        lock_fd: int | None = None,
    ) -> None:
        """Use `Store.open`; this only wires an already opened worker."""
        self._worker = worker
        self._closed = False
        self._clock = clock
        self._lock_fd = lock_fd
        self.schema_version = schema_version

    def now(self) -> float:
        """The store's clock (wall time): what `created_at` is measured on."""
        return self._clock()

    @classmethod
    async def open(
        cls, path: str, *, clock: Callable[[], float] = time.time, exclusive: bool = False
    ) -> Store:
        """Open (creating the file if missing, not its directory), use WAL, migrate to the latest.

        `clock` gives the unix time stamped on events and used by `prune` (tests inject one).
        `exclusive`: the daemon's open, held until `close` (see `lock_exclusive`); the operator's
        tools read beside it. Raises StoreError for a missing directory, a file that is not
        SQLite or is corrupt, a schema newer than this code knows, or (`exclusive`) another
        agentd holding it.
        """
        path = os.fspath(path)
        lock_fd = lock_exclusive(path) if exclusive else None
        worker = Worker(path)

        def connect(_: sqlite3.Connection) -> int:
            worker.conn, version = open_connection(worker.path)
            return version

        worker.thread.start()
        try:
            version = await submit(worker, connect, write=False, needs_conn=False)
        except BaseException:
            await submit(worker, close_fn(worker), write=False, stop=True, needs_conn=False)
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(worker, version, clock, lock_fd)

    async def close(self) -> None:
        """Commit what is queued, close the connection and stop the thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            await submit(
                self._worker, close_fn(self._worker), write=False, stop=True, needs_conn=False
            )
        finally:
            if self._lock_fd is not None:
                os.close(self._lock_fd)  # the next agentd may open it now

    async def _run(
        self, fn: Callable[[sqlite3.Connection], T], *, write: bool, durable: bool = True
    ) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        return await submit(self._worker, fn, write=write, durable=durable)

    # ---- calls ----

    async def save_call(self, rec: CallRecord) -> None:
        """Insert or replace the call's state; returns once it is committed to disk."""
        now = self._clock()
        await self._run(lambda conn: _save(conn, rec, now), write=True)

    async def live_calls(self) -> list[CallRecord]:
        """Every call whose phase is not "ended", the first saved first."""

        def read(conn: sqlite3.Connection) -> list[CallRecord]:
            rows = conn.execute(
                f"SELECT {_CALL_COLUMNS}, created_at FROM calls WHERE phase != 'ended' ORDER BY id"
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
        await self._run(lambda conn: _end(conn, call_id, reason, now), write=True)

    # ---- events and transcripts ----

    async def add_event(self, call_id: str, what: str, data: dict[str, object]) -> None:
        """Record a fact about a call ("turn" timings, "barge_in", "leak", ...) with the time."""
        now = self._clock()
        # serialised here, not on the worker: the caller may mutate `data` right after
        raw = _dumps(data)
        await self._run(lambda conn: _event(conn, call_id, what, raw, now), write=True)

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
        line = (call_id, transcript_id, direction, text)
        await self._run(lambda conn: _transcript(conn, line, now), write=True)

    async def write(self, batch: Batch) -> int:
        """Every write of `batch` in one job (one transaction): call states, then events and
        transcripts, then ends. Returns how many writes failed; the others are committed."""

        def write(conn: sqlite3.Connection) -> int:
            failed = 0
            steps: list[Callable[[], None]] = [
                *(partial(_save, conn, rec, at) for rec, at in batch.calls),
                *(partial(_event_data, conn, c, w, d, at) for c, w, d, at in batch.events),
                *(partial(_transcript, conn, line, at) for line, at in batch.transcripts),
                *(partial(_end, conn, c, reason, at) for c, reason, at in batch.ends),
            ]
            for step in steps:
                try:
                    step()
                except _UNSTORABLE:
                    failed += 1  # this value cannot be stored; the rest of the batch can
            return failed

        return await self._run(write, write=True, durable=batch.durable)

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
