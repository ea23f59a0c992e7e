"""`agentd calls`: the call history read back from the store, and the store's retention."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from agentd import calls, cli
from agentd.calls import HistoryError, open_read_only, parse_since, render_show, store_path
from agentd.daemon import Daemon, prune_expired
from agentd.sim import Caller, Simulator, Utterance
from agentd.store import CallRecord, Store
from tests.support import CALLER, OUR_NUMBER, StartAgent, run_cli


def config_file(tmp_path: Path, store: str) -> str:
    path = tmp_path / "agentd.toml"
    # no credentials: the history needs only [store] path
    path.write_text(f"[store]\npath = {json.dumps(store)}\n", encoding="utf-8")
    return str(path)


@pytest.mark.slow
async def served_call(sim: Simulator, daemon: Daemon) -> str:
    """One call: the caller asks one thing and hangs up; its id once the store has it all."""
    caller = Caller([Utterance("what are your hours")], hangup_after_s=0.05)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, caller)
    await sim.wait_call_status(call_id, "hangup", timeout=15)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    assert daemon.persister is not None
    await daemon.persister.flush()
    return call_id


async def test_a_served_call_is_listed_and_shown_with_transcript_timings_and_cleanup(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    daemon = await agent(agent={"greeting": "Hello there."})
    call_id = await served_call(sim, daemon)
    # the report went out once, as a record (logged, stored, counted)
    reports = [r for r in daemon.records if r.what == "call_report"]
    assert len(reports) == 1 and reports[0].call_id == call_id
    cfg = config_file(tmp_path, daemon.config.store_path)

    # read while the daemon still has the store open: read-only, beside the writer
    code, out, err = await run_cli("calls", "--config", cfg)
    assert code == 0, err
    header, row = out.splitlines()[:2]
    assert header.split()[:3] == ["CALL", "STARTED", "DIRECTION"]
    assert row.startswith(call_id) and "incoming" in row

    code, out, err = await run_cli("calls", "--json", "--since", "1h", "--config", cfg)
    assert code == 0, err
    [listed] = json.loads(out)
    assert listed["call_id"] == call_id and listed["turns"] == 1 and listed["errors"] == 0

    code, out, err = await run_cli("calls", "show", call_id[:8], "--config", cfg)
    assert code == 0, err
    assert "Conversation (from the call's history" in out
    assert "agent: Hello there." in out
    assert "caller: what are your hours" in out
    assert "Turns (ms from the end of the caller's turn" in out
    assert "confirmed stopped" in out  # the speaking session's stop was confirmed
    assert "NOT confirmed" not in out

    code, out, err = await run_cli("calls", "show", call_id, "--json", "--config", cfg)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["conversation_source"] == "history"
    assert [t["turn"] for t in doc["turn_timings"]] == [1]
    assert doc["turn_timings"][0]["first_say_ms"] >= 0
    report = doc["report"]
    kinds = {s["kind"]: s for s in report["sessions"]}
    assert set(kinds) == {"speaking", "transcribe"}
    assert all(s["confirmed"] for s in report["sessions"])
    assert report["session_seconds"]["speaking"] > 0


@pytest.mark.slow
async def test_a_long_call_is_shown_whole_though_the_call_kept_only_its_last_turns(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    # history_limit 2: the call keeps 10 messages, the older ones go to the store as they leave
    daemon = await agent(agent={"greeting": "Hello there.", "history_limit": 2})
    said = [f"question number {n}" for n in range(12)]
    call_id = sim.inbound_call(
        CALLER, OUR_NUMBER, Caller([Utterance(t) for t in said], hangup_after_s=0.05)
    )
    await sim.wait_call_status(call_id, "hangup", timeout=30)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    assert daemon.persister is not None
    await daemon.persister.flush()
    with sqlite3.connect(daemon.config.store_path) as conn:  # some did leave, with the row
        (left,) = conn.execute(
            "SELECT count(*) FROM events WHERE call_id = ? AND what = 'history'", (call_id,)
        ).fetchone()
    assert left > 0
    cfg = config_file(tmp_path, daemon.config.store_path)
    code, out, err = await run_cli("calls", "show", call_id, "--json", "--config", cfg)
    assert code == 0, err
    doc = json.loads(out)
    assert doc["conversation_source"] == "history"
    lines = [(line["who"], line["text"]) for line in doc["conversation"]]
    assert lines == [("agent", "Hello there.")] + [
        pair for t in said for pair in (("caller", t), ("agent", f"You said: {t}."))
    ]


async def test_the_store_off_or_missing_exits_2_with_a_clear_message(tmp_path: Path) -> None:
    code, _, err = await run_cli("calls", "--config", config_file(tmp_path, ""))
    assert code == 2 and 'the store is off (store.path = "")' in err
    missing = str(tmp_path / "nothing.db")
    code, _, err = await run_cli("calls", "show", "x", "--config", config_file(tmp_path, missing))
    assert code == 2 and f"no store at {missing}" in err


@pytest.mark.parametrize("limit", ["0", "-1"])
def test_a_limit_below_1_is_a_usage_error(limit: str, capsys: pytest.CaptureFixture[str]) -> None:
    # SQLite read LIMIT 0 as no calls ("no calls in the store") and -1 as every call
    with pytest.raises(SystemExit) as info:
        cli._parser().parse_args(["calls", "--limit", limit])
    assert info.value.code == 2
    assert f"argument --limit: must be 1 or more, not {limit}" in capsys.readouterr().err


def test_an_empty_store_argument_is_named_not_taken_for_the_config(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # the config was not read: "store.path" would send the user to the wrong place
    assert calls.main(None, store="") == 2
    err = capsys.readouterr().err
    assert err.startswith("agentd calls: --store: empty path") and "store.path" not in err


async def test_an_unknown_call_exits_1_and_a_bad_since_exits_2(tmp_path: Path) -> None:
    db = str(tmp_path / "agentd.db")
    store = await Store.open(db)
    await store.close()
    cfg = config_file(tmp_path, db)
    code, out, err = await run_cli("calls", "--config", cfg)
    assert (code, out.strip()) == (0, "no calls in the store")
    code, _, err = await run_cli("calls", "show", "nope", "--config", cfg)
    assert code == 1 and "no call 'nope'" in err
    code, _, err = await run_cli("calls", "--since", "yesterday", "--config", cfg)
    assert code == 2 and "--since 'yesterday'" in err


def test_since_takes_durations_and_dates() -> None:
    assert parse_since("90s", 1000.0) == 910.0
    assert parse_since("2h", 10_000.0) == 10_000.0 - 7200
    assert parse_since("2025-01-31T00:00:00+00:00", 0) == 1738281600.0
    with pytest.raises(HistoryError):
        parse_since("soon", 0)


def test_the_store_path_comes_from_the_environment_or_the_config(tmp_path: Path) -> None:
    cfg = config_file(tmp_path, "/var/lib/agentd/agentd.db")
    assert store_path(cfg, env={}) == "/var/lib/agentd/agentd.db"
    assert store_path(cfg, env={"AGENTD_STORE_PATH": ""}) == ""
    assert store_path(None, env={}) == "agentd.db"


async def test_the_history_is_opened_read_only(tmp_path: Path) -> None:
    db = str(tmp_path / "agentd.db")
    store = await Store.open(db)
    await store.close()
    conn = open_read_only(db)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        conn.execute("DELETE FROM calls")
    conn.close()


def ended(call_id: str) -> CallRecord:
    return CallRecord(call_id, "incoming", "ended", "hangup", None, None, (), True, 1, ())


async def test_retention_prunes_calls_ended_longer_ago_than_keep_days(tmp_path: Path) -> None:
    now = [1_000_000.0]
    store = await Store.open(str(tmp_path / "agentd.db"), clock=lambda: now[0])
    try:
        await store.save_call(ended("old"))
        await store.add_transcript("old", "tr1", "in", "my card number is ...")
        now[0] += 20 * 86400
        await store.save_call(ended("recent"))
        now[0] += 11 * 86400  # "old" ended 31 days ago, "recent" 11
        assert await prune_expired(store, 0) == 0  # 0 keeps everything
        assert await prune_expired(store, 30) == 1
        assert await store.ended_call_ids() == ["recent"]
        assert await store.transcript("old") == []
    finally:
        await store.close()


def test_a_call_that_was_never_answered_says_so() -> None:
    doc = {
        "call_id": "c1",
        "direction": "outgoing",
        "started_at": 1_700_000_000.0,
        "ended_at": 1_700_000_030.0,
        "phase": "ended",
        "hangup_reason": "busy",
        "hangup_by": "remote",
        "report": {"answered": False, "duration_s": 0.0, "turns": 0},
        "conversation_source": "none",
        "conversation": [],
        "not_answered": [],
        "turn_timings": [],
        "barge_ins": [],
        "errors": [],
        "unconfirmed_stops": [],
    }
    shown = render_show(doc).splitlines()
    assert "  not answered" in shown and not any(" answered, " in line for line in shown)


@pytest.mark.slow
async def test_a_call_resumed_after_a_restart_says_its_sessions_are_timed_from_the_restart(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    # the sessions the next agentd resumed are listed, with the time it saw them open: the
    # footnote said they were not listed, which left the short times to be read as the bill
    store = {"path": str(tmp_path / "shared.db")}
    first = await agent(daemon={"stop_sessions_on_shutdown": False, "drain_s": 0.5}, store=store)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_for(lambda: len(sim.world.speakings_of(call_id)) == 1, 5)
    [speaking] = sim.world.speakings_of(call_id)
    first.stop()  # the call stays up for the next start
    await asyncio.wait_for(first.stopped.wait(), 10)
    second = await agent(store=store)
    await sim.hangup(call_id)
    await asyncio.wait_for(second.dispatcher.wait_idle(), 15)
    assert second.persister is not None
    await second.persister.flush()
    code, out, err = await run_cli(
        "calls", "show", call_id, "--config", config_file(tmp_path, store["path"])
    )
    assert code == 0, err
    assert f"speaking   {speaking.id}  open" in out  # created before the restart, listed
    assert "sessions created before it are not listed" not in out
    assert "open times count from the restart" in out
