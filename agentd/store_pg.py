"""The PostgreSQL store: the `Store` API on asyncpg, plus call leases for several replicas.

Theory of operation
-------------------
Several agentd processes (replicas) may share one PostgreSQL database (`[store] url`). The calls,
events and transcripts are the SQLite store's (`agentd.store`), with the same methods, semantics
and `CallRecord`; on top come two tables that let the replicas share the calls:

- `replicas`: every replica upserts its row every few seconds (`heartbeat`). The live ones
  (`live_replicas`) split VoIPBIN's rate limit between them.
- `leases`: each call is owned by one replica through a lease (owner, epoch, expiry). The first
  replica to `claim` a new call gets epoch 1; the others get None and ignore the call's events.
  The owner `renew`s all its leases in one statement every few seconds. When an owner dies its
  leases expire, and the next `claim` by another replica takes the call over with epoch + 1.
  Fencing (`agentd.replicas`): the owner acts on a call only before the lease's deadline as
  counted on its own clock from when it sent the claim or renew, which comes before the
  database's expiry; a replica that lost its lease (paused past the expiry, cut off) never acts
  on that call again, even if it never noticed the takeover. `holds` asks the database the same
  question, for whoever wants it answered there (a round trip per side effect is too dear for
  the daemon's hot path).

Every lease statement is one atomic SQL statement, and its clock is the database's `now()`:
replicas whose clocks disagree still agree on who holds what. A lease row is never deleted
while its call lives, so an epoch is never handed out twice (`release` expires it instead).

Call rows keep the SQLite store's unix-time columns (`created_at`, event times) on the
store's clock, `now()`: the database's clock read once, at open, and carried on by the local
monotonic clock (so a call taken over by another replica keeps its age, within a few
milliseconds, even if a replica's wall clock is off or stepped).

"First saved first" is by `created_at`, then by row id: the SQLite store's order is the order of
the calls to `save_call`, and here the first saves of different calls may commit out of that
order on the pool, while `created_at` is taken when `save_call` is called.

Ordering: like the SQLite store, the operations on one call run in the order they were called
(a later `save_call` wins, `events()` sees the `add_event`s before it), and a read of every call
(`live_calls`, `ended_call_ids`, `prune`) waits for the writes queued before it. Writes of
different calls run concurrently on the connection pool. A write whose awaiting task is
cancelled still runs to its end.

Schema: versioned in the table `agentd_schema` (one row per applied version) and migrated
forward by `MIGRATIONS`, in one transaction under an advisory lock, so replicas starting together
do not race. A database with a newer version than this code knows is refused.

Credentials: the URL's password is a `Secret` handed to asyncpg beside a DSN that has none. Every
asyncpg or socket error becomes a `StoreError` whose text is redacted.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias, TypeVar

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from agentd.config import PgUrl
from agentd.secret import redact
from agentd.store import _CALL_COLUMNS, SEEN_LIMIT, Batch, _dumps, _row_to_record, _text
from agentd.store_schema import CallRecord, StoreError, StoreUnreachable

__all__ = [
    "LATEST_PG_VERSION",
    "MIGRATIONS",
    "Lease",
    "PgReader",
    "PgStore",
    "Replica",
    "StoreError",
    "pg_schema_version",
]

T = TypeVar("T")
Keys: TypeAlias = "str | tuple[str, ...] | None"  # the calls an operation is ordered with
# a connection of its own (check-config) or one lent by the pool
Conn: TypeAlias = "asyncpg.Connection[asyncpg.Record] | PoolConnectionProxy[asyncpg.Record]"

_LOCK_KEY: Final = 0x6167_656E_7464  # "agentd": the advisory lock migrations run under
_CONNECT_TIMEOUT_S: Final = 10.0
_COMMAND_TIMEOUT_S: Final = 30.0

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # version 1: calls, their events and their transcripts (SQLite's versions 1 and 2). JSON is
    # kept as text, written exactly as the SQLite store writes it: jsonb refuses \u0000
    (
        """CREATE TABLE calls (
            id               bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,  -- oldest first
            call_id          text NOT NULL UNIQUE,
            direction        text NOT NULL,
            phase            text NOT NULL,
            status           text NOT NULL,
            transcribe_id    text,
            speaking_id      text,
            pending_stops    text NOT NULL DEFAULT '[]',   -- JSON [[kind, session id], ...]
            greeted          boolean NOT NULL DEFAULT false,
            turn             integer NOT NULL DEFAULT 0,
            history          text NOT NULL DEFAULT '[]',   -- JSON [[role, text], ...]
            hangup_reason    text NOT NULL DEFAULT '',
            seen_transcripts text NOT NULL DEFAULT '[]',   -- JSON [transcript id, ...]
            created_at       double precision NOT NULL,    -- unix time, the store's clock
            updated_at       double precision NOT NULL,
            ended_at         double precision              -- set when phase becomes 'ended'
        )""",
        "CREATE INDEX calls_phase ON calls (phase)",
        """CREATE TABLE events (
            id      bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            call_id text NOT NULL,
            at      double precision NOT NULL,
            what    text NOT NULL,
            data    text NOT NULL                          -- JSON object
        )""",
        "CREATE INDEX events_call ON events (call_id, id)",
        """CREATE TABLE transcripts (
            id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            call_id       text NOT NULL,
            transcript_id text NOT NULL UNIQUE,
            direction     text NOT NULL,
            text          text NOT NULL,
            at            double precision NOT NULL
        )""",
        "CREATE INDEX transcripts_call ON transcripts (call_id, id)",
    ),
    # version 2: the replicas and the calls' leases (the database's clock)
    (
        """CREATE TABLE replicas (
            replica_id text PRIMARY KEY,
            info       text NOT NULL DEFAULT '{}',         -- JSON object: host, pid, version...
            started_at timestamptz NOT NULL DEFAULT now(),
            last_seen  timestamptz NOT NULL
        )""",
        """CREATE TABLE leases (
            call_id     text PRIMARY KEY,
            owner       text NOT NULL,
            epoch       bigint NOT NULL CHECK (epoch > 0),
            acquired_at timestamptz NOT NULL,              -- when this epoch began
            expires_at  timestamptz NOT NULL
        )""",
        "CREATE INDEX leases_owner ON leases (owner)",
        "CREATE INDEX leases_expires ON leases (expires_at)",
    ),
    # version 3: our hangup not yet confirmed, the action after the goodbye (SQLite's 3)
    (
        "ALTER TABLE calls ADD COLUMN hangup_pending boolean NOT NULL DEFAULT false",
        "ALTER TABLE calls ADD COLUMN after_reply text NOT NULL DEFAULT ''",
    ),
)
LATEST_PG_VERSION: Final = len(MIGRATIONS)

# "now" of every lease statement: the database's clock, plus the store's test-only skew ($1)
_NOW: Final = "(now() + $1::float8 * interval '1 second')"
_SAVE_SQL: Final = f"""INSERT INTO calls ({_CALL_COLUMNS}, created_at, updated_at, ended_at)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $15, $16)
    ON CONFLICT (call_id) DO UPDATE SET
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
                        END"""
_END_SQL: Final = """UPDATE calls SET phase = 'ended', hangup_reason = $1, updated_at = $2,
        ended_at = coalesce(ended_at, $2)
    WHERE call_id = $3"""
_EVENT_SQL: Final = "INSERT INTO events (call_id, at, what, data) VALUES ($1, $2, $3, $4)"
_TRANSCRIPT_SQL: Final = """INSERT INTO transcripts (call_id, transcript_id, direction, text, at)
    VALUES ($1, $2, $3, $4, $5) ON CONFLICT (transcript_id) DO NOTHING"""
# what one write of a batch can raise for its own values (the others still go in)
_UNSTORABLE: Final = (
    TypeError,
    ValueError,
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
)


def _save_args(rec: CallRecord, now: float) -> tuple[object, ...]:
    """`_SAVE_SQL`'s arguments (TypeError/ValueError: a value JSON cannot hold)."""
    return (
        _pg_text(rec.call_id),
        _pg_text(rec.direction),
        _pg_text(rec.phase),
        _pg_text(rec.status),
        _pg_opt(rec.transcribe_id),
        _pg_opt(rec.speaking_id),
        _dumps([list(p) for p in rec.pending_stops]),
        bool(rec.greeted),
        rec.turn,
        _dumps([list(m) for m in rec.history]),
        _pg_text(rec.hangup_reason),
        _dumps(list(rec.seen_transcripts[-SEEN_LIMIT:])),
        bool(rec.hangup_pending),
        _pg_text(rec.after_reply),
        now,
        now if rec.phase == "ended" else None,
    )


def _end_args(call_id: str, reason: str, now: float) -> tuple[object, ...]:
    return (_pg_text(reason), now, _pg_text(call_id))


def _event_args(call_id: str, what: str, raw: str, now: float) -> tuple[object, ...]:
    return (_pg_text(call_id), now, _pg_text(what), raw)


def _transcript_args(
    call_id: str, transcript_id: str, direction: str, text: str, now: float
) -> tuple[object, ...]:
    return (_pg_text(call_id), _pg_text(transcript_id), _pg_text(direction), _pg_text(text), now)


def _event_data_args(
    call_id: str, what: str, data: dict[str, object], now: float
) -> tuple[object, ...]:
    return _event_args(call_id, what, _dumps(data), now)


def _line_args(line: tuple[str, str, str, str], now: float) -> tuple[object, ...]:
    return _transcript_args(*line, now)


async def _write_rows(
    conn: Conn, steps: list[tuple[str, list[tuple[object, ...]]]], *, durable: bool = True
) -> int:
    """Every (statement, rows) of `steps` in one transaction; how many rows failed for their
    own values. The usual case is one `executemany` per statement; if one fails, its rows go
    again one by one, each under a savepoint, so a bad row loses only itself. Not `durable`:
    the commit does not wait for the server's WAL flush (visible to every session at once; a
    crash of the server, not of agentd, may lose it)."""
    failed = 0
    async with conn.transaction():
        if not durable:
            await conn.execute("SET LOCAL synchronous_commit = off")
        for sql, rows in steps:
            if not rows:
                continue
            try:
                async with conn.transaction():  # a savepoint
                    await conn.executemany(sql, rows)
                continue
            except _UNSTORABLE:
                pass
            for row in rows:
                try:
                    async with conn.transaction():
                        await conn.execute(sql, *row)
                except _UNSTORABLE:
                    failed += 1
    return failed


@dataclass(frozen=True)
class Lease:
    """One call's lease. Times are unix seconds on the database's clock."""

    call_id: str
    owner: str  # the replica id
    epoch: int  # 1 for the first owner, +1 at each takeover
    acquired_at: float  # when this epoch began
    expires_at: float
    expires_in_s: float  # from the database's now; <= 0: expired, up for takeover


@dataclass(frozen=True)
class Replica:
    """One replica's heartbeat row."""

    replica_id: str
    info: dict[str, object]
    started_at: float  # unix seconds, the database's clock
    last_seen: float
    age_s: float  # since the last heartbeat, by the database's clock


def _pg_text(s: str) -> str:
    """A text value PostgreSQL takes: no lone surrogate (as SQLite's), and no NUL character."""
    return _text(s).replace("\x00", "\ufffd")


def _pg_opt(s: str | None) -> str | None:
    return None if s is None else _pg_text(s)


def _safe(exc: BaseException, url: PgUrl) -> str:
    """An error's text with the password (and any other known secret) taken out."""
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if url.password is not None and url.password.reveal():
        text = text.replace(url.password.reveal(), "***")
    return redact(text)


# a server that is down, starting, stopping or full: the same URL may work a moment later
_UNREACHABLE: Final = (
    OSError,
    TimeoutError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
)


def _wrap(exc: BaseException, url: PgUrl, doing: str) -> StoreError:
    cls = StoreUnreachable if isinstance(exc, _UNREACHABLE) else StoreError
    return cls(f"PostgreSQL {url.shown}: {doing}: {_safe(exc, url)}")


_DB_ERRORS: Final = (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError)


def _as_url(url: PgUrl | str) -> PgUrl:
    if isinstance(url, PgUrl):
        return url
    from agentd.config import ConfigError

    try:
        return PgUrl.parse(url, key="PostgreSQL URL")
    except ConfigError as exc:
        raise StoreError(str(exc)) from None


async def _connect_pool(url: PgUrl, min_size: int, max_size: int) -> asyncpg.Pool:
    password = url.password.reveal() if url.password is not None else None
    try:
        return await asyncpg.create_pool(
            url.dsn,
            password=password,
            min_size=min_size,
            max_size=max_size,
            timeout=_CONNECT_TIMEOUT_S,
            command_timeout=_COMMAND_TIMEOUT_S,
        )
    except (*_DB_ERRORS, ValueError) as exc:  # ValueError: asyncpg's DSN parsing
        raise _wrap(exc, url, "cannot connect") from None


async def pg_schema_version(url: PgUrl | str) -> int:
    """The database's agentd schema version, without migrating: 0 for a database agentd has
    not used yet. For `check-config`. Raises StoreError (redacted) if it cannot be read."""
    url = _as_url(url)
    password = url.password.reveal() if url.password is not None else None
    try:
        conn = await asyncpg.connect(
            url.dsn, password=password, timeout=_CONNECT_TIMEOUT_S, command_timeout=10.0
        )
    except (*_DB_ERRORS, ValueError) as exc:
        raise _wrap(exc, url, "cannot connect") from None
    try:
        return await _read_version(conn)
    except _DB_ERRORS as exc:
        raise _wrap(exc, url, "cannot read the schema version") from None
    finally:
        await conn.close()


class PgReader:
    """`agentd calls` on PostgreSQL: one read-only session, driven from synchronous code.

    Queries are written for SQLite (`?` marks); the reader numbers the marks as PostgreSQL
    wants them (`$1`, `$2`...). The session refuses every write, so reading beside running
    replicas can change nothing. Errors are `StoreError`s, with no password in them."""

    def __init__(
        self, url: PgUrl, loop: asyncio.AbstractEventLoop, conn: asyncpg.Connection[Any]
    ) -> None:
        self._url = url
        self._loop = loop
        self._conn = conn

    @classmethod
    def open(cls, url: PgUrl | str) -> PgReader:
        """Connect; StoreError if the database cannot be read or agentd never used it."""
        url = _as_url(url)
        loop = asyncio.new_event_loop()
        try:
            conn = loop.run_until_complete(_connect_read_only(url))
        except BaseException:
            loop.close()
            raise
        return cls(url, loop, conn)

    def rows(self, sql: str, params: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        """The rows of one query."""
        query = _numbered(sql)
        try:
            records = self._loop.run_until_complete(self._conn.fetch(query, *params))
        except _DB_ERRORS as exc:
            raise _wrap(exc, self._url, "cannot read") from None
        return [tuple(r) for r in records]

    def close(self) -> None:
        """Close the session."""
        try:
            self._loop.run_until_complete(self._conn.close(timeout=5))
        except _DB_ERRORS:
            pass  # closing: nothing is lost
        finally:
            self._loop.close()


def _numbered(sql: str) -> str:
    """`?` marks as PostgreSQL's `$1`, `$2`... (agentd's queries have no `?` in a literal)."""
    count = itertools.count(1)
    return re.sub(r"\?", lambda _: f"${next(count)}", sql)


async def _connect_read_only(url: PgUrl) -> asyncpg.Connection[Any]:
    password = url.password.reveal() if url.password is not None else None
    try:
        conn = await asyncpg.connect(
            url.dsn,
            password=password,
            timeout=_CONNECT_TIMEOUT_S,
            command_timeout=_COMMAND_TIMEOUT_S,
            server_settings={"default_transaction_read_only": "on"},
        )
    except (*_DB_ERRORS, ValueError) as exc:
        raise _wrap(exc, url, "cannot connect") from None
    try:
        version = await _read_version(conn)
    except _DB_ERRORS as exc:
        await conn.close()
        raise _wrap(exc, url, "cannot read the schema version") from None
    if version < 1:
        await conn.close()
        raise StoreError(
            f"PostgreSQL {url.shown} has no agentd store: has agentd run with this config yet?"
        )
    return conn


async def _read_version(conn: Conn) -> int:
    if await conn.fetchval("SELECT to_regclass('agentd_schema')") is None:
        return 0
    return int(await conn.fetchval("SELECT coalesce(max(version), 0) FROM agentd_schema"))


def _check_version(version: int, url: PgUrl) -> None:
    if version > LATEST_PG_VERSION:
        raise StoreError(
            f"PostgreSQL {url.shown} has agentd schema version {version}; this agentd knows up to "
            f"{LATEST_PG_VERSION} (an agentd newer than this one migrated it)"
        )


async def _migrate(conn: Conn, url: PgUrl) -> int:
    """Bring the schema to LATEST_PG_VERSION; returns it. One transaction, one advisory lock."""
    version = await _read_version(conn)
    _check_version(version, url)
    if version == LATEST_PG_VERSION:
        return version  # the usual start: no lock, no DDL
    async with conn.transaction():
        # a transaction-scoped lock: a second replica waits here, then finds the work done
        await conn.execute("SELECT pg_advisory_xact_lock($1)", _LOCK_KEY)
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS agentd_schema (
                   version    integer PRIMARY KEY,
                   applied_at timestamptz NOT NULL DEFAULT now()
               )"""
        )
        version = await _read_version(conn)  # re-read under the lock
        _check_version(version, url)
        if version == 0 and await conn.fetchval("SELECT to_regclass('calls')") is not None:
            raise StoreError(
                f"PostgreSQL {url.shown} already has a calls table that is not agentd's: give "
                "agentd its own database (or schema)"
            )
        for target in range(version + 1, LATEST_PG_VERSION + 1):
            for statement in MIGRATIONS[target - 1]:
                await conn.execute(statement)
            await conn.execute("INSERT INTO agentd_schema (version) VALUES ($1)", target)
    return LATEST_PG_VERSION


async def _corrected_clock(conn: Conn) -> Callable[[], float]:
    """The database's clock, read once and carried on by the local monotonic clock: not the
    local wall clock plus an offset, which a later step of that clock (NTP setting a box right
    after boot) would shift by the whole step, and with it the age of every call it stamps."""
    before = time.monotonic()
    db_now = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))
    read_at = (before + time.monotonic()) / 2

    def clock() -> float:
        return db_now + (time.monotonic() - read_at)

    return clock


def _count(status: str) -> int:
    """asyncpg's command status ("DELETE 3", "UPDATE 1") -> 3, 1."""
    tail = status.rsplit(" ", 1)[-1]
    return int(tail) if tail.isdigit() else 0


def _lease(row: asyncpg.Record) -> Lease:
    return Lease(
        call_id=row["call_id"],
        owner=row["owner"],
        epoch=int(row["epoch"]),
        acquired_at=float(row["acquired_at"]),
        expires_at=float(row["expires_at"]),
        expires_in_s=float(row["expires_in_s"]),
    )


# the leases that matter: of calls still live in the store
_LIVE_CALL: Final = "call_id IN (SELECT call_id FROM calls WHERE phase != 'ended')"
_LEASE_COLUMNS: Final = f"""call_id, owner, epoch,
    extract(epoch FROM acquired_at)::float8 AS acquired_at,
    extract(epoch FROM expires_at)::float8 AS expires_at,
    extract(epoch FROM expires_at - {_NOW})::float8 AS expires_in_s"""


class PgStore:
    """agentd's PostgreSQL store. Open with `await PgStore.open(url)`; methods are coroutines.

    The call methods are `agentd.store.Store`'s (`save_call`, `live_calls`, `ended_call_ids`,
    `end_call`, `add_event`, `events`, `add_transcript`, `transcript`, `write` of a `Batch`,
    `prune`, `now`, `close`), with the same semantics and `CallRecord`; the lease and replica
    methods are for several replicas sharing the database (see the module's docstring).
    """

    schema_version: int

    def __init__(
        self,
        pool: asyncpg.Pool,
        url: PgUrl,
        schema_version: int,
        clock: Callable[[], float],
        *,
        db_skew_s: float = 0.0,
    ) -> None:
        """Use `PgStore.open`; this only wires an already opened pool."""
        self._pool = pool
        self._url = url
        self._clock = clock
        self._skew = float(db_skew_s)
        self._closed = False
        self._tails: dict[str, asyncio.Task[Any]] = {}  # the last operation queued per call
        self._pending: set[asyncio.Task[Any]] = set()  # every queued operation, for close()
        self.schema_version = schema_version

    def __repr__(self) -> str:
        return f"PgStore({self._url.shown!r}, schema_version={self.schema_version})"

    @property
    def dsn(self) -> str:
        """The database's URL without its password, `sslpassword` masked: fit to print."""
        return self._url.shown

    def now(self) -> float:
        """The store's clock (unix time): what `created_at` and event times are measured on."""
        return self._clock()

    @classmethod
    async def open(
        cls,
        url: PgUrl | str,
        *,
        clock: Callable[[], float] | None = None,
        min_size: int = 1,
        max_size: int = 10,
        db_skew_s: float = 0.0,
    ) -> PgStore:
        """Connect a pool of `min_size`..`max_size` connections and migrate to the latest schema.

        `clock`: the unix time stamped on calls and events and used by `prune` (tests inject
        one); by default the local clock, corrected by the database's as measured here.
        `db_skew_s` (tests only): added to the database's `now()` in every lease and heartbeat
        statement of this store, to act as a replica whose leases see time pass (a lease of
        ttl 5 is expired for a store with skew 10) without sleeping.
        Raises StoreError (never with the password in it) if the database cannot be reached,
        is not agentd's, or has a schema newer than this code knows.
        """
        url = _as_url(url)
        pool = await _connect_pool(url, min_size, max_size)
        try:
            async with pool.acquire() as conn:
                version = await _migrate(conn, url)
                if clock is None:
                    clock = await _corrected_clock(conn)
        except StoreError:
            await pool.close()
            raise
        except _DB_ERRORS as exc:
            await pool.close()
            raise _wrap(exc, url, "cannot migrate") from None
        except BaseException:
            pool.terminate()
            raise
        return cls(pool, url, version, clock, db_skew_s=db_skew_s)

    async def close(self) -> None:
        """Wait for the queued operations, then close the pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._pending:
            await asyncio.wait(list(self._pending))
        try:
            await asyncio.wait_for(self._pool.close(), _COMMAND_TIMEOUT_S)
        except (TimeoutError, *_DB_ERRORS):
            self._pool.terminate()

    # ---- running statements ----

    async def _with_conn(self, fn: Callable[[Conn], Awaitable[T]], doing: str) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        return await self._on_conn(fn, doing)

    async def _on_conn(self, fn: Callable[[Conn], Awaitable[T]], doing: str) -> T:
        """Run `fn` on a pooled connection (queued work still runs while `close` waits)."""
        try:
            async with self._pool.acquire() as conn:
                return await fn(conn)
        except _DB_ERRORS as exc:
            raise _wrap(exc, self._url, doing) from None

    def _queue(self, key: Keys, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        """Run `coro` after the operations queued before it on call `key` (a tuple: on each of
        those calls; None: on any call)."""
        keys = (key,) if isinstance(key, str) else key
        if keys is None:
            before = list(self._tails.values())
        else:
            before = list(
                {id(t): t for k in keys if (t := self._tails.get(k)) is not None}.values()
            )

        async def after() -> T:
            if before:
                await asyncio.wait(before)  # their outcomes are their callers' business
            return await coro

        task = asyncio.get_running_loop().create_task(after())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        for k in keys or ():
            self._tails[k] = task

        def forget(t: asyncio.Task[Any]) -> None:
            for k in keys or ():
                if self._tails.get(k) is t:
                    del self._tails[k]

        task.add_done_callback(forget)
        return task

    async def _write(self, key: Keys, fn: Callable[[Conn], Awaitable[T]], doing: str) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        # shielded: the write goes on even if our caller is cancelled
        return await asyncio.shield(self._queue(key, self._on_conn(fn, doing)))

    async def _read(self, key: Keys, fn: Callable[[Conn], Awaitable[T]], doing: str) -> T:
        if self._closed:
            raise StoreError("the store is closed")
        return await self._queue(key, self._on_conn(fn, doing))

    # ---- calls ----

    async def save_call(self, rec: CallRecord) -> None:
        """Insert or replace the call's state; returns once it is committed."""
        args = _save_args(rec, self._clock())

        async def save(conn: Conn) -> None:
            await conn.execute(_SAVE_SQL, *args)

        await self._write(str(args[0]), save, "cannot save the call")

    async def save_call_fenced(self, rec: CallRecord, replica_id: str, epoch: int) -> bool:
        """`save_call`, only while `replica_id` holds the call's lease at `epoch`, expired or
        not (nobody took the call over since). The lease row is locked meanwhile: a takeover
        claiming it waits, then reads this state. True if it was saved; False too for a
        state with a value the database cannot hold (it is given up, as a batch's would be)."""
        try:
            args = _save_args(rec, self._clock())
        except _UNSTORABLE:
            return False
        me = _pg_text(replica_id)

        async def save(conn: Conn) -> bool:
            try:
                async with conn.transaction():
                    ours = await conn.fetchval(
                        """SELECT 1 FROM leases WHERE call_id = $1 AND owner = $2 AND epoch = $3
                           FOR UPDATE""",
                        args[0],
                        me,
                        epoch,
                    )
                    if ours is None:
                        return False
                    await conn.execute(_SAVE_SQL, *args)
                    return True
            except _UNSTORABLE:
                return False  # never storable: kept parked, it would hold every takeover back

        return await self._write(str(args[0]), save, "cannot save the call")

    async def has_call(self, call_id: str) -> bool:
        """Whether the store has a row for the call, live or ended."""
        key = _pg_text(call_id)

        async def read(conn: Conn) -> bool:
            return bool(
                await conn.fetchval("SELECT EXISTS (SELECT 1 FROM calls WHERE call_id = $1)", key)
            )

        return await self._read(key, read, "cannot read the call")

    async def live_calls(self) -> list[CallRecord]:
        """Every call whose phase is not "ended", the first saved first."""

        async def read(conn: Conn) -> list[CallRecord]:
            rows = await conn.fetch(
                f"SELECT {_CALL_COLUMNS}, created_at FROM calls WHERE phase != 'ended' "
                "ORDER BY created_at, id"
            )
            return [_row_to_record(tuple(r)) for r in rows]

        return await self._read(None, read, "cannot read the live calls")

    async def ended_call_ids(self, limit: int = 10_000) -> list[str]:
        """The most recently ended calls, oldest first: calls we left must stay left."""

        async def read(conn: Conn) -> list[str]:
            rows = await conn.fetch(
                "SELECT call_id FROM calls WHERE phase = 'ended' "
                "ORDER BY created_at DESC, id DESC LIMIT $1",
                limit,
            )
            return [str(r[0]) for r in reversed(rows)]

        return await self._read(None, read, "cannot read the ended calls")

    async def end_call(self, call_id: str, reason: str) -> None:
        """Mark the call ended (the row stays, for history, until `prune`). Unknown id: no-op."""
        args = _end_args(call_id, reason, self._clock())

        async def end(conn: Conn) -> None:
            await conn.execute(_END_SQL, *args)

        await self._write(str(args[2]), end, "cannot end the call")

    # ---- events and transcripts ----

    async def add_event(self, call_id: str, what: str, data: dict[str, object]) -> None:
        """Record a fact about a call ("turn" timings, "barge_in", "leak", ...) with the time."""
        # serialised here, not later: the caller may mutate `data` right after
        args = _event_args(call_id, what, _dumps(data), self._clock())

        async def add(conn: Conn) -> None:
            await conn.execute(_EVENT_SQL, *args)

        await self._write(str(args[0]), add, "cannot add the event")

    async def events(self, call_id: str) -> list[tuple[float, str, dict[str, object]]]:
        """The call's events as (unix time, what, data), in the order they were added."""
        key = _pg_text(call_id)

        async def read(conn: Conn) -> list[tuple[float, str, dict[str, object]]]:
            rows = await conn.fetch(
                "SELECT at, what, data FROM events WHERE call_id = $1 ORDER BY id", key
            )
            return [(float(at), what, json.loads(data)) for at, what, data in rows]

        return await self._read(key, read, "cannot read the events")

    async def add_transcript(
        self, call_id: str, transcript_id: str, direction: str, text: str
    ) -> None:
        """Append a transcript line; a transcript id already stored is ignored (redeliveries)."""
        args = _transcript_args(call_id, transcript_id, direction, text, self._clock())

        async def add(conn: Conn) -> None:
            await conn.execute(_TRANSCRIPT_SQL, *args)

        await self._write(str(args[0]), add, "cannot add the transcript")

    async def write(self, batch: Batch) -> int:
        """Every write of `batch` in one transaction: call states, then events and
        transcripts, then ends. Returns how many writes failed for their own values (a value
        JSON cannot hold, ...); the others are committed. A database that cannot be reached
        fails the whole batch with StoreError, as for the SQLite store."""
        failed = 0
        steps: list[tuple[str, list[tuple[object, ...]]]] = []
        for sql, make, items in (
            (_SAVE_SQL, _save_args, [(rec, at) for rec, at in batch.calls]),
            (_EVENT_SQL, _event_data_args, list(batch.events)),
            (_TRANSCRIPT_SQL, _line_args, list(batch.transcripts)),
            (_END_SQL, _end_args, list(batch.ends)),
        ):
            rows = []
            for item in items:
                try:
                    rows.append(make(*item))
                except _UNSTORABLE:
                    failed += 1
            steps.append((sql, rows))
        calls = {
            *(rec.call_id for rec, _ in batch.calls),
            *(c for c, *_ in batch.events),
            *(line[0] for line, _ in batch.transcripts),
            *(c for c, *_ in batch.ends),
        }
        keys = tuple(_pg_text(c) for c in calls)

        async def write(conn: Conn) -> int:
            return await _write_rows(conn, steps, durable=batch.durable)

        return failed + await self._write(keys, write, "cannot write")

    async def transcript(self, call_id: str) -> list[tuple[str, str]]:
        """The call's transcript as (direction, text), in the order it was added."""
        key = _pg_text(call_id)

        async def read(conn: Conn) -> list[tuple[str, str]]:
            rows = await conn.fetch(
                "SELECT direction, text FROM transcripts WHERE call_id = $1 ORDER BY id", key
            )
            return [(d, t) for d, t in rows]

        return await self._read(key, read, "cannot read the transcript")

    async def prune(self, older_than_s: float) -> int:
        """Delete calls that ended more than `older_than_s` ago, with their events, transcripts
        and leases.

        Events and transcripts of calls that never had a row go too once they are that old, and
        so do leases of such calls that expired that long ago (on the database's clock). Returns
        how many calls were deleted. Live calls are never touched.
        """
        cutoff = self._clock() - older_than_s
        skew = self._skew

        async def prune(conn: Conn) -> int:
            old = "SELECT call_id FROM calls WHERE phase = 'ended' AND ended_at < $1"
            async with conn.transaction():
                await conn.execute(f"DELETE FROM events WHERE call_id IN ({old})", cutoff)
                await conn.execute(f"DELETE FROM transcripts WHERE call_id IN ({old})", cutoff)
                await conn.execute(f"DELETE FROM leases WHERE call_id IN ({old})", cutoff)
                n = _count(
                    await conn.execute(
                        "DELETE FROM calls WHERE phase = 'ended' AND ended_at < $1", cutoff
                    )
                )
                orphan = "call_id NOT IN (SELECT call_id FROM calls)"
                await conn.execute(f"DELETE FROM events WHERE at < $1 AND {orphan}", cutoff)
                await conn.execute(f"DELETE FROM transcripts WHERE at < $1 AND {orphan}", cutoff)
                await conn.execute(
                    f"""DELETE FROM leases WHERE {orphan}
                        AND expires_at < {_NOW} - $2::float8 * interval '1 second'""",
                    skew,
                    older_than_s,
                )
            return n

        return await self._write(None, prune, "cannot prune")

    # ---- replicas ----

    async def heartbeat(self, replica_id: str, info: Mapping[str, object] | None = None) -> None:
        """Say `replica_id` is alive now (the database's clock): upsert its row and its `info`
        (JSON: host, pid, version...). Every few seconds, well within `live_replicas`' window."""
        raw = _dumps(dict(info or {}))

        async def beat(conn: Conn) -> None:
            await conn.execute(
                f"""INSERT INTO replicas (replica_id, info, started_at, last_seen)
                    VALUES ($2, $3, {_NOW}, {_NOW})
                    ON CONFLICT (replica_id) DO UPDATE
                    SET info = excluded.info, last_seen = excluded.last_seen""",
                self._skew,
                _pg_text(replica_id),
                raw,
            )

        await self._with_conn(beat, "cannot record the heartbeat")

    async def live_replicas(self, within_s: float) -> list[Replica]:
        """The replicas seen within the last `within_s` seconds, by replica id (so each one
        finds its own place among them, e.g. to take its share of VoIPBIN's rate limit)."""

        async def read(conn: Conn) -> list[Replica]:
            rows = await conn.fetch(
                f"""SELECT replica_id, info,
                           extract(epoch FROM started_at)::float8 AS started_at,
                           extract(epoch FROM last_seen)::float8 AS last_seen,
                           extract(epoch FROM {_NOW} - last_seen)::float8 AS age_s
                    FROM replicas
                    WHERE last_seen > {_NOW} - $2::float8 * interval '1 second'
                    ORDER BY replica_id""",
                self._skew,
                within_s,
            )
            return [
                Replica(
                    replica_id=r["replica_id"],
                    info=json.loads(r["info"]),
                    started_at=float(r["started_at"]),
                    last_seen=float(r["last_seen"]),
                    age_s=max(0.0, float(r["age_s"])),
                )
                for r in rows
            ]

        return await self._with_conn(read, "cannot read the replicas")

    async def leave(self, replica_id: str) -> None:
        """Delete the replica's heartbeat row (a clean stop): the others' shares grow at once.
        Its leases are not touched: `release` them, or let them expire."""

        async def leave(conn: Conn) -> None:
            await conn.execute("DELETE FROM replicas WHERE replica_id = $1", _pg_text(replica_id))

        await self._with_conn(leave, "cannot remove the replica")

    # ---- leases ----

    async def claim(self, call_id: str, replica_id: str, ttl_s: float) -> int | None:
        """Try to own `call_id` for `ttl_s` seconds; the epoch on success, None if another
        replica holds a lease on it that has not expired.

        One atomic statement, on the database's clock:
        - no lease yet: a new one, epoch 1 (the first replica to claim a new call serves it;
          two claiming at once: exactly one gets 1, the other None);
        - `replica_id` holds it, not expired: renewed, same epoch;
        - expired (its owner died, or released it; even if that owner was `replica_id`): taken
          over, epoch + 1. The old owner's `holds(..., old epoch)` is False from then on.
        """
        key = _pg_text(call_id)
        me = _pg_text(replica_id)

        async def claim(conn: Conn) -> int | None:
            value = await conn.fetchval(
                f"""INSERT INTO leases AS l (call_id, owner, epoch, acquired_at, expires_at)
                    VALUES ($2, $3, 1, {_NOW}, {_NOW} + $4::float8 * interval '1 second')
                    ON CONFLICT (call_id) DO UPDATE SET
                        owner = excluded.owner,
                        epoch = CASE WHEN l.expires_at > {_NOW} THEN l.epoch ELSE l.epoch + 1 END,
                        acquired_at = CASE WHEN l.expires_at > {_NOW} THEN l.acquired_at
                                           ELSE excluded.acquired_at END,
                        expires_at = excluded.expires_at
                    WHERE l.expires_at <= {_NOW} OR l.owner = excluded.owner
                    RETURNING epoch""",
                self._skew,
                key,
                me,
                ttl_s,
            )
            return None if value is None else int(value)

        return await self._with_conn(claim, "cannot claim the call")

    async def renew(self, replica_id: str, ttl_s: float, call_ids: Iterable[str]) -> set[str]:
        """Extend to now + `ttl_s` every lease in `call_ids` that `replica_id` still owns; the
        call ids renewed. One statement for all of them, every few seconds (well within ttl).

        A call missing from the answer was taken over (or never held, or pruned): stop serving
        it. A lease of ours that expired but that nobody took over yet is renewed with its epoch
        unchanged: nobody else can have acted on the call in between (they would have had to
        `claim` it, which changes the owner), and our `holds` was False while it was expired.
        """
        ids = [_pg_text(c) for c in call_ids]
        if not ids:
            return set()

        async def renew(conn: Conn) -> set[str]:
            rows = await conn.fetch(
                f"""UPDATE leases SET expires_at = {_NOW} + $3::float8 * interval '1 second'
                    WHERE owner = $2 AND call_id = ANY($4::text[])
                    RETURNING call_id""",
                self._skew,
                _pg_text(replica_id),
                ttl_s,
                ids,
            )
            return {str(r[0]) for r in rows}

        return await self._with_conn(renew, "cannot renew the leases")

    async def release(self, call_id: str, replica_id: str, epoch: int) -> bool:
        """Give the call up (its call ended, or a clean stop hands it to another replica).

        The lease is expired, not deleted, so the next `claim` by anyone gets epoch + 1 and an
        epoch is never handed out twice. True if `replica_id` held that epoch (expired or not);
        False (and nothing changes) if the call was taken over in between.
        """

        async def release(conn: Conn) -> bool:
            status = await conn.execute(
                f"""UPDATE leases SET expires_at = least(expires_at, {_NOW})
                    WHERE call_id = $2 AND owner = $3 AND epoch = $4""",
                self._skew,
                _pg_text(call_id),
                _pg_text(replica_id),
                epoch,
            )
            return _count(status) > 0

        return await self._with_conn(release, "cannot release the lease")

    async def holds(self, call_id: str, replica_id: str, epoch: int) -> bool:
        """The fencing check, before every side effect on the call: True only while
        `replica_id` owns the call's lease at `epoch` and it has not expired (database clock).
        Once False for an epoch it stays False: a takeover raises the epoch, and an expired
        lease is only renewed by its owner if nobody claimed it (see `renew`)."""

        async def holds(conn: Conn) -> bool:
            return bool(
                await conn.fetchval(
                    f"""SELECT EXISTS (
                            SELECT 1 FROM leases WHERE call_id = $2 AND owner = $3
                            AND epoch = $4 AND expires_at > {_NOW})""",
                    self._skew,
                    _pg_text(call_id),
                    _pg_text(replica_id),
                    epoch,
                )
            )

        return await self._with_conn(holds, "cannot check the lease")

    async def expired_leases(self) -> list[Lease]:
        """The calls up for takeover: their lease expired (owner dead, or released) and the call
        is still live in the store. Longest expired first. `claim` each to take it over."""

        async def read(conn: Conn) -> list[Lease]:
            rows = await conn.fetch(
                f"""SELECT {_LEASE_COLUMNS} FROM leases
                    WHERE expires_at <= {_NOW} AND {_LIVE_CALL}
                    ORDER BY expires_at, call_id""",
                self._skew,
            )
            return [_lease(r) for r in rows]

        return await self._with_conn(read, "cannot read the leases")

    async def live_leases(self) -> list[Lease]:
        """The leases of the calls still live in the store, by call id: who serves what."""

        async def read(conn: Conn) -> list[Lease]:
            rows = await conn.fetch(
                f"""SELECT {_LEASE_COLUMNS} FROM leases
                    WHERE {_LIVE_CALL}
                    ORDER BY call_id""",
                self._skew,
            )
            return [_lease(r) for r in rows]

        return await self._with_conn(read, "cannot read the leases")

    async def leases(self, owner: str | None = None) -> list[Lease]:
        """Every lease (or `owner`'s), expired ones too, ended calls' too, by call id."""

        async def read(conn: Conn) -> list[Lease]:
            rows = await conn.fetch(
                f"""SELECT {_LEASE_COLUMNS} FROM leases
                    WHERE $2::text IS NULL OR owner = $2 ORDER BY call_id""",
                self._skew,
                None if owner is None else _pg_text(owner),
            )
            return [_lease(r) for r in rows]

        return await self._with_conn(read, "cannot read the leases")
