"""Restarts: SIGKILL mid-call, the default SIGTERM that leaves calls for the next start."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import sqlite3
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from agentd.sim import Caller, Simulator, Utterance
from agentd.store_schema import LATEST_VERSION, MIGRATIONS
from tests.support import CALLER, FINAL_HOLD, OUR_NUMBER, PLAYBACK, SAY_LATENCY, run_cli

pytest_plugins = ["tests.pg"]  # the fixture pg_url: a fresh database of a real PostgreSQL

# real agentd processes, killed and started again
pytestmark = pytest.mark.slow

CONFIG = """
[voipbin]
api_url = "{api}"
accesskey = "{key}"
[agent]
numbers = ["{number}"]
chars_per_s = {playback}
say_latency_s = {latency}
final_hold_s = {hold}
[store]
{store}
[log]
format = "json"
"""


async def start(config: Path, stdout: Path | None = None) -> asyncio.subprocess.Process:
    """`agentd run` in its own process; its JSON log to `stdout` when given."""
    out = stdout.open("wb") if stdout is not None else asyncio.subprocess.DEVNULL
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentd",
        "run",
        "--config",
        str(config),
        stdout=out,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "NOTIFY_SOCKET": ""},
    )


async def terminate(*procs: asyncio.subprocess.Process | None) -> None:
    """Stop the agentd processes still running (a test's end, whatever it left)."""
    for proc in procs:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()


def config_text(sim: Simulator, store: str) -> str:
    """The tests' agentd config against `sim`, with `store` as its `[store]` table's body."""
    return CONFIG.format(
        api=sim.api_url,
        key=sim.accesskey,
        number=OUR_NUMBER,
        playback=PLAYBACK,
        latency=SAY_LATENCY,
        hold=FINAL_HOLD,
        store=store,
    )


def write_config(sim: Simulator, tmp_path: Path, store_url: str | None = None) -> Path:
    """One config for every agentd of a test: the same store, so a restart finds the calls."""
    store = f'url = "{store_url}"' if store_url else f'path = "{tmp_path / "agentd.db"}"'
    config = tmp_path / "agentd.toml"
    config.write_text(config_text(sim, store))
    return config


def subscribed(sim: Simulator) -> int:
    return sum(1 for c in sim.ws_connections if c.subscriptions and not c.closed)


def agent_lines(sim: Simulator, call_id: str) -> list[str]:
    return [li.text for li in sim.get_call(call_id).conversation if li.who == "agent"]


async def test_a_second_agentd_on_the_same_store_exits_and_every_call_is_answered_once(
    sim: Simulator, tmp_path: Path
) -> None:
    # both would take every call: each greeting and reply said twice, rows overwritten
    config = write_config(sim, tmp_path)
    first = await start(config)
    try:
        await sim.wait_for(lambda: subscribed(sim) == 1, 15)
        code, _, err = await run_cli("run", "--config", str(config), limit_s=30)
        assert code == 2  # RestartPreventExitStatus: systemd does not loop on it
        assert "another agentd is running with the store" in err
        assert subscribed(sim) == 1
        call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("just once")]))
        await sim.wait_call_status(call_id, "hangup", timeout=15)
        assert agent_lines(sim, call_id)[1:] == ["You said: just once."]
    finally:
        await terminate(first)


async def crash_and_restart(
    sim: Simulator,
    tmp_path: Path,
    kill: signal.Signals,
    store_url: str | None = None,
    between: Callable[[Path], None] | None = None,
) -> None:
    """`between`: done to the SQLite store while no agentd runs (an upgrade, say)."""
    config = write_config(sim, tmp_path, store_url)
    first = await start(config)
    second = None
    try:
        await sim.wait_for(lambda: subscribed(sim) == 1, 15)
        call_id = sim.inbound_call(
            CALLER, OUR_NUMBER, Caller([Utterance("before the restart")], hangup_after_s=None)
        )
        await sim.wait_for(lambda: "You said: before the restart." in agent_lines(sim, call_id), 10)
        speaking = sim.requests_matching("POST", r"/speakings$")[0]
        first.send_signal(kill)
        assert await asyncio.wait_for(first.wait(), 15) == (-9 if kill == signal.SIGKILL else 0)
        await sim.wait_for(lambda: subscribed(sim) == 0, 10)
        if between is not None:
            between(tmp_path / "agentd.db")

        second = await start(config)
        await sim.wait_for(lambda: subscribed(sim) == 1, 15)
        # the restarted daemon re-checks the call and re-attaches to its sessions
        await sim.wait_for(
            lambda: (
                len(sim.requests_matching("GET", rf"/calls/{call_id}$")) > 0
                and len(sim.requests_matching("GET", r"/transcribes$")) > 0
            ),
            10,
        )
        await sim.caller_says(call_id, "after the restart")
        await sim.wait_for(lambda: "You said: after the restart." in agent_lines(sim, call_id), 10)
        await sim.hangup(call_id)
        await sim.wait_for(lambda: not sim.leaks(), 10)
        lines = agent_lines(sim, call_id)
        assert lines.count("Hello, thank you for calling. How can I help you today?") == 1
        assert lines.count("You said: before the restart.") == 1  # not answered twice
        assert speaking.status == 201
        # the session from before the restart was still good: no second one was created
        assert len(sim.requests_matching("POST", r"/speakings$")) == 1
    finally:
        await terminate(first, second)


async def test_sigkill_mid_call_then_restart_resumes_the_conversation(
    sim: Simulator, tmp_path: Path
) -> None:
    await crash_and_restart(sim, tmp_path, signal.SIGKILL)


async def test_sigkill_then_restart_resumes_the_conversation_from_postgresql(
    sim: Simulator, tmp_path: Path, pg_url: str
) -> None:
    await crash_and_restart(sim, tmp_path, signal.SIGKILL, store_url=pg_url)


async def test_sigterm_leaves_live_calls_for_the_next_start(sim: Simulator, tmp_path: Path) -> None:
    await crash_and_restart(sim, tmp_path, signal.SIGTERM)


def as_an_older_agentd_left_it(store: Path, version: int = 1) -> None:
    """Rewrite `store` as an agentd at schema `version` would have: its tables, the columns it
    knew, the same rows."""
    old = store.with_name("old.db")
    conn = sqlite3.connect(old, isolation_level=None)
    for step in MIGRATIONS[:version]:
        for statement in step:
            conn.execute(statement)
    conn.execute("ATTACH ? AS new", (str(store),))  # also reads what the kill left in the -wal
    for table in ("calls", "events", "transcripts"):
        columns = ", ".join(r[1] for r in conn.execute(f"PRAGMA main.table_info({table})"))
        conn.execute(f"INSERT INTO main.{table} ({columns}) SELECT {columns} FROM new.{table}")
    conn.execute("DETACH new")
    conn.execute(f"PRAGMA user_version = {version}")
    conn.close()
    for leftover in (store, Path(f"{store}-wal"), Path(f"{store}-shm")):
        leftover.unlink(missing_ok=True)
    old.rename(store)


@pytest.mark.parametrize("version", range(1, LATEST_VERSION))
async def test_an_upgrade_migrates_the_store_once_and_resumes_the_call_an_older_agentd_left(
    sim: Simulator, tmp_path: Path, version: int
) -> None:
    await crash_and_restart(
        sim, tmp_path, signal.SIGKILL, between=lambda db: as_an_older_agentd_left_it(db, version)
    )
    db = tmp_path / "agentd.db"
    conn = sqlite3.connect(db)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == LATEST_VERSION
    conn.close()
    # a downgrade: this agentd is now the older one, on a store a newer one migrated. It is
    # refused, the file untouched, rather than written with columns missing
    conn = sqlite3.connect(db)
    conn.execute(f"PRAGMA user_version = {LATEST_VERSION + 1}")
    conn.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    code, _, err = await run_cli("run", "--config", str(tmp_path / "agentd.toml"))
    assert code == 2, err  # the unit's RestartPreventExitStatus: no restart loop
    assert err.strip().splitlines() == [
        f"agentd: store: {db} has schema version {LATEST_VERSION + 1}; this agentd knows up "
        f"to {LATEST_VERSION} (an agentd newer than this one migrated it)"
    ]
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before


async def test_a_call_that_ended_while_agentd_was_down_is_cleaned_up(
    sim: Simulator, tmp_path: Path
) -> None:
    config = write_config(sim, tmp_path)
    first = await start(config)
    second = None
    try:
        await sim.wait_for(lambda: subscribed(sim) == 1, 15)
        call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
        await sim.wait_for(lambda: len(sim.requests_matching("POST", r"/say$")) == 1, 10)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        await sim.hangup(call_id)
        assert sim.leaks()  # the speaking session bills on: nobody stopped it
        second = await start(config)
        await sim.wait_for(lambda: not sim.leaks(), 15)
    finally:
        await terminate(first, second)


async def test_our_hangup_unconfirmed_at_a_kill_is_sent_again_by_the_next_start(
    sim: Simulator, tmp_path: Path
) -> None:
    # the time limit's goodbye, then our hangup, which VoIPBIN keeps refusing until the kill
    config = tmp_path / "agentd.toml"
    store = f'path = "{tmp_path / "agentd.db"}"'
    config.write_text(config_text(sim, store).replace("[agent]\n", "[agent]\nmax_call_s = 2\n"))
    sim.faults.fail("POST", r"/calls/[^/]+/hangup$", 503, count=1000)
    first = await start(config)
    second = None
    try:
        await sim.wait_for(lambda: subscribed(sim) == 1, 15)
        call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
        hangups = rf"/calls/{call_id}/hangup$"
        # a retry: the first refusal is on disk by then
        await sim.wait_for(lambda: len(sim.requests_matching("POST", hangups)) >= 2, 15)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        assert sim.get_call(call_id).status == "progressing"  # the caller is still on the line
        sim.faults.heal()
        second = await start(config)
        await sim.wait_call_status(call_id, "hangup", 15)
        await sim.wait_for(lambda: not sim.leaks(), 15)
        lines = agent_lines(sim, call_id)
        assert lines.count("We have reached the time limit for this call. Goodbye!") == 1
    finally:
        await terminate(first, second)


async def test_a_restart_while_the_stream_is_down_hears_the_caller_once_it_is_back(
    sim: Simulator, tmp_path: Path
) -> None:
    # killed mid-call; VoIPBIN refuses the WebSocket meanwhile, and the caller speaks. The next
    # agentd restores the call before any event can reach it: the quiet that follows is the
    # stream's, not the caller's (no reprompt, no transcribe replaced for "deaf"); once the
    # stream is back, what the caller said is read back and answered
    config = tmp_path / "agentd.toml"
    store = f'path = "{tmp_path / "agentd.db"}"'
    quick = "[agent]\nsilence_s = 1.0\nwatch_s = 3.0\n"
    config.write_text(config_text(sim, store).replace("[agent]\n", quick))
    first = await start(config)
    second = None
    try:
        await sim.wait_for(lambda: subscribed(sim) == 1, 15)
        call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
        greeting = "Hello, thank you for calling. How can I help you today?"
        await sim.wait_for(lambda: greeting in agent_lines(sim, call_id), 10)  # saved by then
        first.send_signal(signal.SIGKILL)
        await first.wait()
        sim.faults.refuse_ws(503, count=1000)
        await sim.caller_says(call_id, "can you hear me")
        checks = rf"/calls/{call_id}$"
        before = len(sim.requests_matching("GET", checks))
        second = await start(config, tmp_path / "second.log")
        # the restored call is checked at once, then again after watch_s of quiet: by then
        # its silence timer (1 s) has run out more than once
        await sim.wait_for(lambda: len(sim.requests_matching("GET", checks)) >= before + 2, 15)
        sim.faults.accept_ws()
        await sim.wait_for(lambda: "You said: can you hear me." in agent_lines(sim, call_id), 20)
        assert "Are you still there?" not in agent_lines(sim, call_id)
        assert len(sim.requests_matching("POST", r"/transcribes$")) == 1  # none replaced
        await sim.hangup(call_id)
        await sim.wait_for(lambda: not sim.leaks(), 10)
    finally:
        await terminate(first, second)
