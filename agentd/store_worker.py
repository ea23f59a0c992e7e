"""The store's worker thread: the one thread that owns the SQLite connection.

Coroutines `submit` jobs; the worker runs them in order and groups queued writes into one
transaction (see `agentd.store` for the theory of operation).
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final, TypeVar, cast

from agentd.store_schema import StoreError

__all__ = ["Worker", "close_fn", "submit"]

T = TypeVar("T")

_MAX_BATCH: Final = 128  # jobs per transaction: big enough to amortise a commit, small enough
# that the first writer of a burst does not wait behind a thousand others


@dataclass(eq=False)
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    stop: bool = False  # the last job: the worker thread ends after it
    needs_conn: bool = True  # False only for the jobs that open and close the connection
    durable: bool = True  # False: committed without waiting for the disk (see `Batch`)


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


class Worker:
    """The one thread that owns the connection. Everything here runs on that thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.conn: sqlite3.Connection | None = None
        self._synced = True  # the connection's synchronous is FULL (as opened), not NORMAL
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
            durable = any(j.durable for j in writes)
            if durable != self._synced:
                # in WAL mode NORMAL skips the fsync at commit: the WAL is still written, so a
                # crash of this process loses nothing; a power loss may lose the last commits
                conn.execute(f"PRAGMA synchronous = {'FULL' if durable else 'NORMAL'}")
                self._synced = durable
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


def close_fn(worker: Worker) -> Callable[[sqlite3.Connection], None]:
    def close(_: sqlite3.Connection) -> None:
        conn, worker.conn = worker.conn, None
        if conn is not None:
            try:
                conn.execute("PRAGMA optimize")  # cheap; keeps the planner's statistics fresh
            finally:
                conn.close()  # the last connection checkpoints the WAL into the main file

    return close


async def submit(
    worker: Worker,
    fn: Callable[[sqlite3.Connection], T],
    *,
    write: bool,
    stop: bool = False,
    needs_conn: bool = True,
    durable: bool = True,
) -> T:
    """Queue `fn` for the worker thread and wait for its outcome without blocking the loop."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()
    worker.jobs.put(_Job(fn, write, fut, loop, stop=stop, needs_conn=needs_conn, durable=durable))
    return await fut
