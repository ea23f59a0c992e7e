"""What a SIGKILL can and cannot cause, at each point where the store and VoIPBIN disagree.

Per-turn saves are coalesced (agentd/persist.py); only the write-ahead before a billed session is
awaited. Each test stops agentd dead at one point, starts a new one on the same store, and checks
what the caller and the bill see. A stalled store is made real: the test holds SQLite's write
lock from its own connection, as a backup tool or a slow disk would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from agentd.sim import Caller, Simulator, Utterance
from tests.stubs import HttpReply, HttpStub
from tests.support import CALLER, OUR_NUMBER
from tests.test_restart import agent_lines, start, subscribed, write_config

pytestmark = pytest.mark.slow  # real agentd processes, killed and started again

GREETING = "Hello, thank you for calling. How can I help you today?"


@contextlib.contextmanager
def store_locked(db: Path) -> Iterator[None]:
    """Hold the SQLite write lock: agentd's writes wait (busy_timeout) and then fail."""
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        yield
    finally:
        conn.execute("ROLLBACK")
        conn.close()


def logged(log: Path, **fields: str) -> bool:
    """Whether agentd's JSON log has a line with `fields` (lines reach the file within ~50 ms)."""
    if not log.exists():
        return False
    for line in log.read_text().splitlines():
        with contextlib.suppress(ValueError):
            data = json.loads(line)
            if all(data.get(k) == v for k, v in fields.items()):
                return True
    return False


async def kill(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGKILL)
    await proc.wait()


async def test_killed_while_the_write_ahead_waits_nothing_was_started_and_the_call_is_served(
    sim: Simulator, tmp_path: Path
) -> None:
    config = write_config(sim, tmp_path)
    db, log = tmp_path / "agentd.db", tmp_path / "first.log"
    procs = [await start(config, stdout=log)]
    try:
        await sim.wait_for(lambda: subscribed(sim) == 1 and (tmp_path / "agentd.db").exists(), 15)
        with store_locked(db):
            call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("hello")]))
            # agentd has the answered call and holds its sessions until the call is on disk
            # (a store that stays stuck past busy_timeout, 5 s, fails the write-ahead: the call
            # is then served without it rather than left in silence)
            await sim.wait_for(lambda: logged(log, type="CallEvent", status="progressing"), 10)
            assert not sim.requests_matching("POST", r"/(speakings|transcribes)$")
            await kill(procs[0])
        await sim.wait_for(lambda: subscribed(sim) == 0, 10)
        procs.append(await start(config, stdout=tmp_path / "second.log"))
        # the new agentd finds the answered call in VoIPBIN's list (GET /calls) and serves it
        await sim.wait_for(lambda: "You said: hello." in agent_lines(sim, call_id), 15)
        await sim.hangup(call_id)
        await sim.wait_for(lambda: not sim.leaks(), 10)
        assert agent_lines(sim, call_id).count(GREETING) == 1
        assert len(sim.requests_matching("POST", r"/speakings$")) == 1
    finally:
        for proc in procs:
            if proc.returncode is None:
                await kill(proc)


async def test_killed_while_creating_the_speaking_its_session_is_found_and_no_second_greeting(
    sim: Simulator, tmp_path: Path
) -> None:
    config = write_config(sim, tmp_path)
    procs = [await start(config, stdout=tmp_path / "first.log")]
    try:
        await sim.wait_for(lambda: subscribed(sim) == 1, 15)
        sim.faults.delay("POST", r"/speakings$", 1.0)  # VoIPBIN creates it after agentd died
        call_id = sim.inbound_call(
            CALLER, OUR_NUMBER, Caller([Utterance("after the crash")], hangup_after_s=None)
        )
        await sim.wait_for(lambda: sim.faults.held == 1, 10)  # the POST reached the server
        await kill(procs[0])
        await sim.wait_for(lambda: len(sim.world.speakings_of(call_id)) == 1, 10)
        procs.append(await start(config, stdout=tmp_path / "second.log"))
        await sim.wait_for(lambda: "You said: after the crash." in agent_lines(sim, call_id), 15)
        await sim.hangup(call_id)
        await sim.wait_for(lambda: not sim.leaks(), 10)  # the orphan session was stopped too
        assert agent_lines(sim, call_id).count(GREETING) == 1
    finally:
        for proc in procs:
            if proc.returncode is None:
                await kill(proc)


async def test_a_turn_not_yet_on_disk_is_what_a_kill_can_lose_and_no_session_leaks(
    sim: Simulator, tmp_path: Path
) -> None:
    config = write_config(sim, tmp_path)
    db = tmp_path / "agentd.db"
    procs = [await start(config, stdout=tmp_path / "first.log")]
    try:
        await sim.wait_for(lambda: subscribed(sim) == 1, 15)
        call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
        await sim.wait_for(lambda: GREETING in agent_lines(sim, call_id), 10)
        with store_locked(db):
            # the turn does not wait for the store: the caller is answered while it is stalled
            await sim.caller_says(call_id, "while the disk is stuck")
            await sim.wait_for(
                lambda: "You said: while the disk is stuck." in agent_lines(sim, call_id), 10
            )
            await kill(procs[0])
        await sim.wait_for(lambda: subscribed(sim) == 0, 10)
        procs.append(await start(config, stdout=tmp_path / "second.log"))
        await sim.wait_for(lambda: subscribed(sim) == 1, 15)
        await sim.caller_says(call_id, "and now")
        await sim.wait_for(lambda: any("and now" in li for li in agent_lines(sim, call_id)), 15)
        await sim.hangup(call_id)
        await sim.wait_for(lambda: not sim.leaks(), 10)
        lines = agent_lines(sim, call_id)
        assert lines.count(GREETING) == 1  # the greeting was on disk before the kill
        # what a kill in the window loses is the turn itself: the restarted agentd reads the
        # caller's words back from VoIPBIN (GET /transcripts) and answers them once more, here
        # in one reply with what the caller said next
        stuck = [li for li in lines if "while the disk is stuck" in li]
        assert 1 <= len(stuck) <= 2
    finally:
        for proc in procs:
            if proc.returncode is None:
                await kill(proc)


def saved_history(db: Path) -> str:
    """The conversations on disk, as the store's rows hold them (read with a connection of the
    test's own: WAL lets it read while agentd writes)."""
    if not db.exists():
        return ""
    conn = sqlite3.connect(db)
    try:
        return "".join(row[0] for row in conn.execute("SELECT history FROM calls"))
    except sqlite3.OperationalError:
        return ""  # the schema is not there yet
    finally:
        conn.close()


@pytest.mark.parametrize("reply_on", ["interim", "final"])
async def test_killed_while_the_backend_thinks_the_question_is_answered_once_after_the_restart(
    sim: Simulator, tmp_path: Path, reply_on: str
) -> None:
    # the turn is on disk, asked for and unanswered (its final handled, so never read back as
    # new): the next agentd asks it again, once, in either mode
    async with HttpStub() as backend:
        backend.script(
            HttpReply("sse", ["Ten dollars."], first_s=60.0),  # the first agentd dies waiting
            HttpReply("json", [{"text": "Ten dollars."}]),
            HttpReply("json", [{"text": "You are welcome."}]),
        )
        config = write_config(sim, tmp_path)
        text = config.read_text().replace("[agent]\n", f'[agent]\nreply_on = "{reply_on}"\n')
        config.write_text(f'{text}[backend]\nkind = "http"\nurl = "{backend.reply_url}"\n')
        db = tmp_path / "agentd.db"
        procs = [await start(config, stdout=tmp_path / "first.log")]
        try:
            await sim.wait_for(lambda: subscribed(sim) == 1, 15)
            call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
            await sim.wait_for(lambda: GREETING in agent_lines(sim, call_id), 10)
            await sim.caller_says(call_id, "what is my balance?")
            await sim.wait_for(
                lambda: len(backend.requests) == 1 and "balance" in saved_history(db), 10
            )
            await kill(procs[0])
            await sim.wait_for(lambda: subscribed(sim) == 0, 10)
            procs.append(await start(config, stdout=tmp_path / "second.log"))
            await sim.wait_for(lambda: "Ten dollars." in agent_lines(sim, call_id), 15)
            await sim.caller_says(call_id, "thank you")
            await sim.wait_for(lambda: "You are welcome." in agent_lines(sim, call_id), 15)
            await sim.hangup(call_id)
            await sim.wait_for(lambda: not sim.leaks(), 10)
            assert agent_lines(sim, call_id) == [GREETING, "Ten dollars.", "You are welcome."]
            asked = [seen.messages[-1]["content"] for seen in backend.requests]
            assert asked[:2] == ["what is my balance?"] * 2, asked
            assert len(asked) == 3
        finally:
            for proc in procs:
                if proc.returncode is None:
                    await kill(proc)
