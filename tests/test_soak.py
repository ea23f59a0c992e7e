"""The short soak (the long one is `make soak`): faults, SIGKILL restarts, and still no leaks;
then the same with two replicas on one PostgreSQL, one of them SIGKILLed at a time."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import soak

pytest_plugins = ["tests.pg"]  # the fixture pg_url: a fresh database of a real PostgreSQL

# the short soaks: faults and SIGKILL restarts, about 10 s and 20 s
pytestmark = pytest.mark.slow


async def test_short_soak(tmp_path: Path) -> None:
    report = await soak.run(calls=40, concurrency=20, kill_every=3.0, seed=3, workdir=tmp_path)
    assert report["leaked_sessions"] == 0
    assert report["double_replies"] == 0
    assert report["served"] == report["calls"], report["not_served_examples"]
    assert report["daemon_restarts_survived"] == report["daemon_restarts"] >= 1
    assert (tmp_path / "agentd.db").exists()  # the restarted agentd resumed calls from this store


async def test_short_soak_with_two_replicas(tmp_path: Path, pg_url: str) -> None:
    """Two agentd on one PostgreSQL, a random one SIGKILLed every 3 s: the other takes its
    calls over, and every caller is still answered once, with no session left behind."""
    report = await soak.run(
        calls=40,
        concurrency=10,  # about 15 s of calls: 3 to 5 SIGKILLs, most of them under live calls
        kill_every=3.0,
        seed=6,
        workdir=tmp_path,
        replicas=2,
        store_url=pg_url,
    )
    assert report["served"] == report["calls"], report["not_served_examples"]
    assert report["leaked_sessions"] == 0, report["leak_examples"]
    assert report["double_replies"] == 0, report["double_reply_examples"]
    assert report["daemon_restarts_survived"] == report["daemon_restarts"] >= 1
    assert report["calls_taken_over"] >= 1, report["replica_events"]


def test_a_run_that_is_not_clean_keeps_agentds_logs_a_clean_one_does_not(tmp_path: Path) -> None:
    # a soak's work directory is a temporary one: without this, the log of the one run in
    # several that lost a call is gone with it
    work = tmp_path / "work"
    work.mkdir()
    (work / "a.log").write_text('{"event": "call.new"}\n')
    (work / "a.sock").write_text("")
    kept = tmp_path / "soak-logs"
    report = {"not_served": 0, "leaked_sessions": 0, "double_replies": 0}
    assert soak.keep_logs(work, report, kept) is None
    assert not kept.exists()
    assert soak.keep_logs(work, {**report, "not_served": 4}, kept) == kept
    assert (kept / "a.log").read_text() == '{"event": "call.new"}\n'
    assert not (kept / "a.sock").exists()
