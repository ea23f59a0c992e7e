"""Writes each call's state to the store as it changes, so a restart can pick the calls up again.

The state machine stays pure: after each step the dispatcher shows the call to `Persister`, which
notes it as touched. Nothing is written on the event path, nor compared: every `COALESCE_S` at
most, each touched call's cheap fingerprint is compared with the last one written, and the latest
state of those that changed, with the records, transcripts and ends gathered meanwhile, goes to
the store as one job (one transaction on the store's thread). A call that stepped nine times in
that window (a turn: six speech events, the transcript, the reply) is compared and written once.

The one write that is not coalesced is the write-ahead: before a billed session is created the
daemon waits on `saving(call_id)`, which writes that call at once. What a SIGKILL can cause
(tests/test_crash_points.py shows each case):

- before the write-ahead is on disk: nothing was started; the next agentd finds the answered
  call in VoIPBIN's list and serves it;
- while a session is being created: the call is on disk, the session id not yet; the next agentd
  finds the session by its call and stops it, and greets once;
- within `COALESCE_S` of a turn: that turn is not on disk; the next agentd reads the caller's
  words back from VoIPBIN and may answer them once more. No session leaks.

The coalesced writes are committed without an fsync (`Batch.durable`): agentd's own crash loses
none of them, a power loss may lose the last ones (a turn answered again, as above); the
write-ahead, the writes `saving` forces and the flush at shutdown wait for the disk.

A store that stays stuck past SQLite's busy_timeout (5 s) fails the write-ahead: the call is then
served without it rather than left in silence, and the failure is logged.
"""

from __future__ import annotations

import asyncio

from agentd import logs
from agentd.call import Call, CallSettings
from agentd.call.history import Msg
from agentd.commands import Record
from agentd.names import Kind
from agentd.store import Batch, CallRecord, CallStore, StoreError

log = logs.get_logger("agentd.persist")

#: how long a change may wait to be written with others (what a SIGKILL can lose of a turn)
COALESCE_S = 0.02


class Persister:
    """The bridge from live calls to the store."""

    def __init__(self, store: CallStore, *, coalesce_s: float = COALESCE_S) -> None:
        self.store = store
        self.coalesce_s = coalesce_s
        self._seen: dict[str, tuple[object, ...]] = {}  # the fingerprint last written
        self._touched: dict[str, Call] = {}  # stepped since the last write, by call id
        self._batch = Batch()  # records, transcripts and ends waiting for the next write
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writing: dict[str, asyncio.Task[None]] = {}  # call id -> write of its latest state
        self.failures = 0  # writes lost

    # ---- what the daemon shows us ------------------------------------------------------------

    def changed(self, call: Call) -> None:
        """After a step: write the call soon if anything that must survive a restart changed
        (told at the write: most steps, the speech events, change nothing that is saved)."""
        self._touched[call.id] = call
        self._soon()

    def saving(self, call_id: str) -> asyncio.Task[None] | None:
        """The write that puts the call's latest state on disk, while it is not there yet.

        A call still waiting for the coalescing window is written now: whoever asks (the
        write-ahead before a billed session) is about to wait for it."""
        if call_id in self._touched:
            self.write_now()
        task = self._writing.get(call_id)
        if task is not None and task.done():
            del self._writing[call_id]
            return None
        return task

    def record(self, record: Record) -> None:
        """A fact about a call (turn timings, ended, barge-in, ...)."""
        self._batch.events.append(
            (record.call_id, record.what, dict(record.data), self.store.now())
        )
        self._soon()

    def history_left(self, call_id: str, msgs: list[Msg]) -> None:
        """Messages that left the call's kept history in its last step: they go in the same
        write as the row that no longer has them, so the store loses neither."""
        messages = [[m.role, m.text] for m in msgs]
        self._batch.events.append((call_id, Kind.HISTORY, {"messages": messages}, self.store.now()))
        self._soon()

    def transcript(self, call_id: str, transcript_id: str, direction: str, text: str) -> None:
        """A final transcript of the call."""
        self._batch.transcripts.append(
            ((call_id, transcript_id, direction, text), self.store.now())
        )
        self._soon()

    def finished(self, call: Call | None, call_id: str) -> None:
        """Nothing is left to stop: the call is no longer live in the store."""
        self._writing.pop(call_id, None)
        last = self._touched.pop(call_id, None)
        now = self.store.now()
        if last is not None and self._changed(last):
            # its final state (the last turn's history) comes before the end
            self._batch.calls.append((CallRecord(**last.snapshot()), now))
        self._seen.pop(call_id, None)
        reason = call.hangup_reason if call is not None else ""
        self._batch.ends.append((call_id, reason, now))
        self._soon()

    # ---- writing -------------------------------------------------------------------------------

    def _soon(self) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.coalesce_s, self._coalesced)

    def _coalesced(self) -> None:
        # the window's write: a process crash cannot lose it, a power loss may (see Batch);
        # an fsync per turn is what it saves
        self._timer = None
        self.write_now(durable=False)

    def write_now(self, *, durable: bool = True) -> None:
        """Send everything waiting to the store as one job (without waiting for it)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = self.store.now()
        batch, self._batch = self._batch, Batch()
        batch.durable = durable
        touched, self._touched = self._touched, {}
        dirty = {call_id: c for call_id, c in touched.items() if self._changed(c)}
        # the states come first: an end gathered meanwhile must not be undone by an older save
        batch.calls[:0] = [(CallRecord(**c.snapshot()), now) for c in dirty.values()]
        if not batch:
            return
        task = asyncio.get_running_loop().create_task(self._write(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        for call_id in dirty:
            self._writing[call_id] = task
        task.add_done_callback(lambda t: self._written(t, dirty))

    def _changed(self, call: Call) -> bool:
        """Whether what must survive a restart changed since the call was last written."""
        key = call.fingerprint()
        if self._seen.get(call.id) == key:
            return False
        self._seen[call.id] = key
        return True

    def _written(self, task: asyncio.Task[None], calls: dict[str, Call]) -> None:
        for call_id in calls:  # done: nothing to wait for (and no task kept per call)
            if self._writing.get(call_id) is task:
                del self._writing[call_id]

    async def _write(self, batch: Batch) -> None:
        try:
            failed = await self.store.write(batch)
        except StoreError as exc:
            # the calls go on; a restart may just not find the latest state of them
            self.failures += len(batch)
            log.error("store.write_failed", error=str(exc), writes=len(batch))
            return
        if failed:
            self.failures += failed
            log.error("store.write_failed", error=f"{failed} writes could not be stored")

    # ---- restart -------------------------------------------------------------------------------

    def forget(self, call_id: str) -> None:
        """Another replica serves the call now: nothing more of it is written from here."""
        self._seen.pop(call_id, None)
        self._writing.pop(call_id, None)
        self._touched.pop(call_id, None)

    async def restore(self, settings: CallSettings, call_ids: set[str] | None = None) -> list[Call]:
        """The calls that were live when the last agentd stopped (of `call_ids`: those only)."""
        calls = []
        now = self.store.now()
        for rec in await self.store.live_calls():
            if call_ids is not None and rec.call_id not in call_ids:
                continue
            data = {f: getattr(rec, f) for f in CallRecord.__dataclass_fields__}
            # VoIPBIN cuts a call an hour after it began, whoever restarted in between
            data["age_s"] = max(0.0, now - rec.created_at) if rec.created_at else 0.0
            call = Call.restore(data, settings)
            self._seen[call.id] = call.fingerprint()
            calls.append(call)
        return calls

    async def flush(self) -> None:
        """Write what is waiting now and wait for every write."""
        self.write_now()
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
