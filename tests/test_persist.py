"""Persister: live calls written to a real SQLite store as they change, and read back on restart.

The calls are real `Call` machines stepped with `Call.handle`, shown to the persister after every
step the way the dispatcher does; the store is a real file in tmp_path.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from agentd.call import Call, CallSettings, Phase
from agentd.commands import (
    AskBackend,
    Finished,
    PollSpeaking,
    Record,
    ReplyDone,
    ReplySentence,
    SpeakingStarted,
    StartTimer,
    Stopped,
    StopSpeaking,
    TranscribeStarted,
)
from agentd.events import CallEvent, CallInfo, Event, TranscribeEvent, TranscriptEvent
from agentd.names import TimerKind
from agentd.persist import Persister
from agentd.store import Batch, CallRecord, Store

# fast playback: the caller's turns come after the agent finished talking (no barge-in)
SETTINGS = CallSettings(
    greeting="Hello, how can I help?",
    system_prompt="be brief",
    chars_per_s=1000.0,
    say_latency_s=0.0,
    final_hold_s=0.0,
    reply_on="final",  # these tests step final transcripts; interims: test_listen
)


class SpyStore(Store):
    """The real store, also keeping a list of every call state it was asked to save."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.saved: list[CallRecord] = []
        self.batches = 0
        self.durable: list[bool] = []  # each batch's `durable`
        self.written = asyncio.Event()  # set after each batch

    async def save_call(self, rec: CallRecord) -> None:
        self.saved.append(rec)
        await super().save_call(rec)

    async def write(self, batch: Batch) -> int:
        self.saved += [rec for rec, _ in batch.calls]
        self.batches += 1
        self.durable.append(batch.durable)
        try:
            return await super().write(batch)
        finally:
            self.written.set()


def status(call_id: str, s: str, *, by: str = "", reason: str = "") -> CallEvent:
    return CallEvent(CallInfo(call_id, s, "incoming", "+15550001111", "+15551234567", by, reason))


def transcript(call_id: str, tid: str, text: str, direction: str = "in") -> TranscriptEvent:
    return TranscriptEvent(tid, f"tr-{call_id}", direction, text)


class Shell:
    """What the dispatcher does around one call, minus the network: step it, show it to the
    persister, hand over transcripts, records and the end."""

    def __init__(self, persister: Persister, call: Call) -> None:
        self.persister = persister
        self.call = call
        self.records: list[Record] = []
        self.now = 0.0

    def step(self, event: Event | Any) -> list[object]:
        self.now += 0.5
        cmds = self.call.handle(event, self.now)
        self.persister.changed(self.call)
        if isinstance(event, TranscriptEvent):
            self.persister.transcript(self.call.id, event.id, event.direction, event.message)
        for cmd in cmds:
            if isinstance(cmd, Record):
                self.records.append(cmd)
                self.persister.record(cmd)
            elif isinstance(cmd, Finished):
                self.persister.finished(self.call, cmd.call_id)
        return list(cmds)

    def answer(self) -> None:
        """Ring, answer, both sessions up, greeting sent."""
        cid = self.call.id
        self.step(status(cid, "ringing"))
        self.step(status(cid, "progressing"))
        self.answer_rest()
        assert self.call.phase is Phase.ACTIVE

    def answer_rest(self) -> None:
        """Both sessions up after the answer, greeting sent."""
        self.step(TranscribeStarted(f"tr-{self.call.id}"))
        self.step(SpeakingStarted(f"sp-{self.call.id}", "active"))

    def turn(self, tid: str, said: str, reply: str) -> None:
        """The caller says something and the backend answers it."""
        cmds = self.step(transcript(self.call.id, tid, said))
        ask = [c for c in cmds if isinstance(c, AskBackend)]
        assert len(ask) == 1
        self.step(ReplySentence(ask[0].turn, reply))
        self.step(ReplyDone(ask[0].turn))


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "agentd.db")


@pytest.fixture
async def store(db: str) -> AsyncIterator[SpyStore]:
    s = await SpyStore.open(db)
    assert isinstance(s, SpyStore)
    yield s
    await s.close()


@pytest.fixture
async def persister(store: SpyStore) -> AsyncIterator[Persister]:
    p = Persister(store)
    yield p
    await p.flush()


@contextlib.contextmanager
def read_only(db: str) -> Iterator[sqlite3.Connection]:
    """A second connection to the file, to see what is really on disk."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        yield conn
    finally:
        conn.close()


def record_of(call: Call) -> CallRecord:
    return CallRecord(**call.snapshot())


# ---- saving -------------------------------------------------------------------------------------


async def test_a_changed_call_is_saved_and_saving_is_the_write_in_flight(
    store: SpyStore, persister: Persister
) -> None:
    shell = Shell(persister, Call("c1", SETTINGS))
    assert persister.saving("c1") is None
    shell.step(status("c1", "ringing"))
    task = persister.saving("c1")
    assert task is not None
    assert not task.done()  # never awaited on the event path: the step returned first
    await task
    assert await store.live_calls() == [record_of(shell.call)]
    assert (await store.live_calls())[0].phase == "ringing"
    assert persister.saving("c1") is None  # on disk: nothing to wait for
    assert persister.saving("never-seen") is None


async def test_a_step_that_changes_nothing_durable_is_not_saved_again(
    store: SpyStore, persister: Persister
) -> None:
    shell = Shell(persister, Call("c1", SETTINGS))
    shell.step(status("c1", "ringing"))
    shell.step(status("c1", "ringing"))  # a duplicate event
    shell.step(status("c1", "dialing"))  # a stale status: ignored by the machine
    shell.step(transcript("c1", "x1", "too early"))  # before the answer: not a turn
    await persister.flush()
    assert [r.phase for r in store.saved] == ["ringing"]

    shell.step(status("c1", "progressing"))
    await persister.flush()
    assert [r.phase for r in store.saved] == ["ringing", "answered"]


async def test_changes_within_the_window_are_one_write_of_the_latest_state(
    store: SpyStore, persister: Persister
) -> None:
    shell = Shell(persister, Call("c1", SETTINGS))
    shell.answer()  # four steps, four changes, nothing awaited in between
    task = persister.saving("c1")
    assert task is not None
    await task  # the latest state is on disk
    assert [(r.phase, r.transcribe_id, r.speaking_id) for r in store.saved] == [
        ("active", "tr-c1", "sp-c1"),
    ]
    assert store.batches == 1
    (rec,) = await store.live_calls()
    assert rec == record_of(shell.call)
    assert rec.greeted
    assert rec.history == (("system", "be brief"), ("assistant", "Hello, how can I help?"))


async def test_the_write_ahead_does_not_wait_for_the_window(store: SpyStore) -> None:
    persister = Persister(store, coalesce_s=3600.0)  # the window would never end in this test
    shell = Shell(persister, Call("c1", SETTINGS))
    shell.step(status("c1", "ringing"))
    assert store.batches == 0  # nothing written on the event path
    task = persister.saving("c1")  # the daemon asks before it creates a billed session
    assert task is not None
    await task
    assert [r.phase for r in await store.live_calls()] == ["ringing"]
    shell.step(status("c1", "progressing"))
    assert persister.saving("c1") is not None
    await persister.flush()
    assert [r.phase for r in store.saved] == ["ringing", "answered"]


async def test_only_the_windows_writes_skip_the_fsync(store: SpyStore) -> None:
    """The coalesced per-turn write is the one the disk is not waited for; the write-ahead a
    billed session waits on, and the flush at shutdown, are durable."""
    persister = Persister(store, coalesce_s=0.001)
    shell = Shell(persister, Call("c1", SETTINGS))
    shell.step(status("c1", "ringing"))
    await persister.flush()  # the shutdown's flush
    shell.step(status("c1", "progressing"))
    task = persister.saving("c1")  # the write-ahead
    assert task is not None
    await task
    store.written.clear()
    shell.answer_rest()
    await asyncio.wait_for(store.written.wait(), 5)  # the window's timer wrote the session ids
    assert store.durable == [True, True, False]
    (rec,) = await store.live_calls()
    assert (rec.transcribe_id, rec.speaking_id) == ("tr-c1", "sp-c1")


async def test_changes_after_the_window_are_written_again(
    store: SpyStore, persister: Persister
) -> None:
    shell = Shell(persister, Call("c1", SETTINGS))
    shell.step(status("c1", "ringing"))
    await persister.flush()
    shell.step(status("c1", "progressing"))
    await persister.flush()
    assert [r.phase for r in store.saved] == ["ringing", "answered"]
    assert store.batches == 2


async def test_records_and_transcripts_of_a_conversation_are_written(
    store: SpyStore, persister: Persister
) -> None:
    shell = Shell(persister, Call("c1", SETTINGS))
    shell.answer()
    shell.turn("in-1", "I lost my card", "I have blocked it.")
    shell.step(transcript("c1", "out-1", "I have blocked it.", direction="out"))
    shell.step(transcript("c1", "in-1", "I lost my card"))  # a redelivery
    await persister.flush()

    assert await store.transcript("c1") == [
        ("in", "I lost my card"),
        ("out", "I have blocked it."),
    ]
    events = await store.events("c1")
    assert [what for _, what, _ in events] == [r.what for r in shell.records]
    assert [what for _, what, _ in events] == ["status", "answered", "turn"]
    assert [data for _, _, data in events] == [dict(r.data) for r in shell.records]
    (rec,) = await store.live_calls()
    assert rec.turn == 1
    assert rec.history[-2:] == (("user", "I lost my card"), ("assistant", "I have blocked it."))
    assert rec.seen_transcripts == ("in-1",)
    assert persister.failures == 0


async def test_a_finished_call_is_recorded_as_ended_with_its_reason(
    db: str, store: SpyStore, persister: Persister
) -> None:
    shell = Shell(persister, Call("c1", SETTINGS))
    shell.answer()
    shell.step(status("c1", "hangup", by="remote", reason="normal"))
    assert shell.call.phase is Phase.ENDING  # the speaking is stopping, the transcribe ending
    shell.step(Stopped("speaking", "sp-c1", True))
    cmds = shell.step(TranscribeEvent("tr-c1", "call", "c1", "done"))  # VoIPBIN ended it
    assert Finished("c1") in cmds
    assert persister.saving("c1") is None  # a finished call has nothing to wait for
    await persister.flush()

    assert await store.live_calls() == []
    assert await store.ended_call_ids() == ["c1"]
    with read_only(db) as conn:
        row = conn.execute(
            "SELECT phase, hangup_reason, ended_at IS NOT NULL FROM calls WHERE call_id = 'c1'"
        ).fetchone()
    assert row == ("ended", "normal", 1)
    ended = [data for _, what, data in await store.events("c1") if what == "ended"]
    assert ended == [{"hangup_by": "remote", "reason": "normal", "answered": True}]
    # a call that was never saved (it ended before we took it) is not invented
    persister.finished(None, "never-seen")
    await persister.flush()
    assert await store.ended_call_ids() == ["c1"]
    assert persister.failures == 0


# ---- restoring ----------------------------------------------------------------------------------


async def test_restore_gives_back_the_live_calls_with_their_state(db: str) -> None:
    store = await SpyStore.open(db)
    before = Persister(store)
    talking = Shell(before, Call("c-talking", SETTINGS))
    talking.answer()
    talking.turn("in-1", "What is my balance?", "It is twelve dollars.")
    ringing = Shell(before, Call("c-ringing", SETTINGS))
    ringing.step(status("c-ringing", "ringing"))
    gone = Shell(before, Call("c-gone", SETTINGS))
    gone.step(status("c-gone", "ringing"))
    gone.step(status("c-gone", "hangup", reason="cancel"))  # nothing started: finished at once
    assert gone.call.phase is Phase.ENDED
    await before.flush()
    await store.close()

    # a new agentd on the same file
    store = await SpyStore.open(db)
    assert isinstance(store, SpyStore)
    after = Persister(store)
    try:
        calls = await after.restore(SETTINGS)
        assert [c.id for c in calls] == ["c-talking", "c-ringing"]
        restored = {c.id: c for c in calls}
        assert record_of(restored["c-talking"]) == record_of(talking.call)
        assert record_of(restored["c-ringing"]) == record_of(ringing.call)
        call = restored["c-talking"]
        assert (call.phase, call.turn, call.greeted) == (Phase.ACTIVE, 1, True)

        # what was restored is already known: showing it again writes nothing
        for c in calls:
            after.changed(c)
        assert after.saving("c-talking") is None
        await after.flush()
        assert store.saved == []

        # the sessions from before are re-attached, and an answered transcript stays answered
        assert PollSpeaking("c-talking", "sp-c-talking") in call.resume(100.0)
        redelivered = call.handle(transcript("c-talking", "in-1", "What is my balance?"), 101.0)
        assert not [c for c in redelivered if isinstance(c, AskBackend)]
    finally:
        await after.flush()
        await store.close()


async def test_an_unconfirmed_stop_survives_a_restart_and_is_sent_again(db: str) -> None:
    store = await Store.open(db)
    before = Persister(store)
    shell = Shell(before, Call("c1", SETTINGS))
    shell.answer()
    shell.step(status("c1", "hangup", by="remote", reason="normal"))
    shell.step(TranscribeEvent("tr-c1", "call", "c1", "done"))  # VoIPBIN ended it
    shell.step(Stopped("speaking", "sp-c1", False))  # the stop failed: VoIPBIN still bills it
    assert shell.call.phase is Phase.ENDING
    await before.flush()
    await store.close()

    store = await Store.open(db)
    after = Persister(store)
    try:
        (call,) = await after.restore(SETTINGS)
        assert call.phase is Phase.ENDING
        assert record_of(call).pending_stops == (("speaking", "sp-c1"),)
        assert StopSpeaking("c1", "sp-c1") in call.resume(100.0)
    finally:
        await after.flush()
        await store.close()


async def test_a_resumed_call_keeps_its_time_limit_from_its_original_start(db: str) -> None:
    wall = [1000.0]
    store = await Store.open(db, clock=lambda: wall[0])
    before = Persister(store)
    Shell(before, Call("c1", SETTINGS)).answer()
    await before.flush()
    await store.close()

    wall[0] += 3000.0  # the call has been up 50 minutes when agentd comes back
    store = await Store.open(db, clock=lambda: wall[0])
    after = Persister(store)
    try:
        (call,) = await after.restore(SETTINGS)
        [limit] = [
            c
            for c in call.resume(5.0)
            if isinstance(c, StartTimer) and c.timer.kind is TimerKind.MAX_CALL
        ]
        # VoIPBIN's one-hour cap does not restart with agentd: the goodbye still comes first
        assert limit.delay_s == pytest.approx(SETTINGS.max_call_s - 3000.0)
    finally:
        await after.flush()
        await store.close()


# ---- failures -----------------------------------------------------------------------------------


async def test_a_store_that_fails_is_counted_and_never_raises_into_the_call(db: str) -> None:
    store = await Store.open(db)
    persister = Persister(store)
    await store.close()  # every write now fails with StoreError
    shell = Shell(persister, Call("c1", SETTINGS))
    shell.step(status("c1", "ringing"))  # a save and a record
    shell.step(transcript("c1", "x", "hello"))  # a transcript (not a turn: not answered yet)
    await persister.flush()
    assert persister.failures == 3
    assert persister.saving("c1") is None
    assert shell.call.phase is Phase.RINGING
    # a later change is still written (and fails again): the persister keeps going
    shell.step(status("c1", "progressing"))
    await persister.flush()
    assert persister.failures == 5  # the save and the "answered" record


async def test_flush_waits_for_every_queued_write(store: SpyStore, persister: Persister) -> None:
    shells = [Shell(persister, Call(f"c{i}", SETTINGS)) for i in range(5)]
    for shell in shells:
        shell.answer()
    await persister.flush()
    assert [r.call_id for r in await store.live_calls()] == [f"c{i}" for i in range(5)]
    for shell in shells:
        assert persister.saving(shell.call.id) is None
        assert [w for _, w, _ in await store.events(shell.call.id)] == ["status", "answered"]
