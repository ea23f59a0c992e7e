"""Writes each call's state to the store as it changes, so a restart can pick the calls up again.

The state machine stays pure: after each step the dispatcher shows the call to `Persister`, which
compares a cheap fingerprint with the last one written and, if it changed, queues a save. Saves
are ordered (one writer thread, FIFO) and never awaited on the event path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

import structlog

from agentd.call import Call, CallSettings
from agentd.commands import Record
from agentd.store import CallRecord, Store, StoreError

log = structlog.get_logger("agentd.persist")


class Persister:
    """The bridge from live calls to the SQLite store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._seen: dict[str, tuple[object, ...]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._saving: dict[str, asyncio.Task[None]] = {}
        self.failures = 0

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(self._guard(coro))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _guard(self, coro: Coroutine[Any, Any, None]) -> None:
        try:
            await coro
        except StoreError as exc:
            # the call goes on; a restart may just not find the latest state of it
            self.failures += 1
            log.error("store.write_failed", error=str(exc))

    def changed(self, call: Call) -> None:
        """After a step: save the call if anything that must survive a restart changed."""
        key = call.fingerprint()
        if self._seen.get(call.id) == key:
            return
        self._seen[call.id] = key
        self._saving[call.id] = self._spawn(self.store.save_call(CallRecord(**call.snapshot())))

    def saving(self, call_id: str) -> asyncio.Task[None] | None:
        """The latest save of the call, while it is not on disk yet."""
        task = self._saving.get(call_id)
        if task is not None and task.done():
            del self._saving[call_id]
            return None
        return task

    def record(self, record: Record) -> None:
        """A fact about a call (turn timings, ended, barge-in, ...)."""
        self._spawn(self.store.add_event(record.call_id, record.what, dict(record.data)))

    def transcript(self, call_id: str, transcript_id: str, direction: str, text: str) -> None:
        """A final transcript of the call."""
        self._spawn(self.store.add_transcript(call_id, transcript_id, direction, text))

    def finished(self, call: Call | None, call_id: str) -> None:
        """Nothing is left to stop: the call is no longer live in the store."""
        self._seen.pop(call_id, None)
        self._saving.pop(call_id, None)
        reason = call.hangup_reason if call is not None else ""
        self._spawn(self.store.end_call(call_id, reason))

    async def restore(self, settings: CallSettings) -> list[Call]:
        """The calls that were live when the last agentd stopped."""
        calls = []
        now = self.store.now()
        for rec in await self.store.live_calls():
            data = {f: getattr(rec, f) for f in CallRecord.__dataclass_fields__}
            # VoIPBIN cuts a call an hour after it began, whoever restarted in between
            data["age_s"] = max(0.0, now - rec.created_at) if rec.created_at else 0.0
            call = Call.restore(data, settings)
            self._seen[call.id] = call.fingerprint()
            calls.append(call)
        return calls

    async def flush(self) -> None:
        """Wait for every queued write."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
