"""`agentd calls` on a PostgreSQL store: what it shows of SQLite's, read-only, password kept out."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from agentd.names import Kind
from agentd.sim import Simulator
from agentd.store import Batch, Store, StoreError
from agentd.store_pg import PgReader, PgStore
from tests.support import StartAgent, run_cli
from tests.test_calls import served_call
from tests.test_store import record

if TYPE_CHECKING:
    from tests.pg import PgServer

pytest_plugins = ["tests.pg"]  # the fixtures pg_server and pg_url

T0 = 1_765_000_000.0
ENDED = "5b0c3f0e-0d6a-4a57-9a43-0c2f4a0e1d11"
LIVE = "5b0c9a77-8e2b-4f10-b1d5-77e0c6a1f2c3"


def pg_config(tmp_path: Path, url: str, password_file: Path | None = None) -> str:
    path = tmp_path / "pg.toml"
    # no VoIPBIN credentials: the history needs only [store]
    lines = ["[store]", f"url = {json.dumps(url)}"]
    if password_file is not None:
        lines.append(f"password_file = {json.dumps(str(password_file))}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def sqlite_config(tmp_path: Path, db: Path) -> str:
    path = tmp_path / "sqlite.toml"
    path.write_text(f"[store]\npath = {json.dumps(str(db))}\n", encoding="utf-8")
    return str(path)


def history() -> Batch:
    """Two calls as the daemon writes them: one ended (turns, a barge-in, an error, a report,
    older messages that left its kept history), one still live."""
    ended = record(
        ENDED,
        phase="ended",
        status="hangup",
        pending_stops=(),
        turn=2,
        history=(
            ("assistant", "Hello, how can I help?"),
            ("user", "my balance"),
            ("assistant", "It is 12 dollars —"),
        ),
        hangup_reason="normal",
    )
    batch = Batch()
    batch.calls += [(ended, T0), (record(LIVE, turn=1), T0 + 30)]
    batch.events += [
        (ENDED, Kind.HISTORY.value, {"messages": [["system", "Be brief."]]}, T0 + 5),
        (ENDED, Kind.TURN.value, {"turn": 1, "first_say_ms": 412.5, "last_say_ms": 980.0}, T0 + 6),
        (ENDED, Kind.BARGE_IN.value, {"turn": 2, "heard": "It is 12 dollars"}, T0 + 9),
        (ENDED, Kind.BACKEND_FAILED.value, {"error": "timeout"}, T0 + 10),
        (ENDED, Kind.ENDED.value, {"hangup_by": "caller"}, T0 + 20),
        (ENDED, Kind.REPORT.value, {"duration_s": 19.5, "turns": 2, "sessions": []}, T0 + 20),
    ]
    batch.transcripts += [
        ((ENDED, "tr-1", "in", "my balance"), T0 + 4),
        ((ENDED, "tr-2", "in", "wait, no"), T0 + 9),
        ((LIVE, "tr-3", "in", "hello?"), T0 + 31),
    ]
    batch.ends += [(ENDED, "normal", T0 + 20)]
    return batch


async def test_postgresql_shows_the_same_history_as_sqlite(tmp_path: Path, pg_url: str) -> None:
    db = tmp_path / "agentd.db"
    sqlite = await Store.open(str(db))
    assert await sqlite.write(history()) == 0
    await sqlite.close()
    pg = await PgStore.open(pg_url)
    assert await pg.write(history()) == 0
    await pg.close()
    on_sqlite, on_pg = sqlite_config(tmp_path, db), pg_config(tmp_path, pg_url)

    for args in (
        ("calls", "--json"),
        ("calls",),
        ("calls", "--since", "2025-01-01"),
        ("calls", "show", ENDED[:6] + ENDED[6:9]),  # an unambiguous start of the id
        ("calls", "show", ENDED, "--json"),
        ("calls", "show", LIVE),
    ):
        want = await run_cli(*args, "--config", on_sqlite)
        got = await run_cli(*args, "--config", on_pg)
        assert want[0] == 0, want
        assert got == want, args
    listed = json.loads((await run_cli("calls", "--json", "--config", on_pg))[1])
    assert [c["call_id"] for c in listed] == [LIVE, ENDED]  # newest first
    doc = json.loads((await run_cli("calls", "show", ENDED, "--json", "--config", on_pg))[1])
    assert doc["conversation"][0]["text"] == "Hello, how can I help?"
    assert doc["conversation"][-1]["cut_off"] is True
    assert [e["kind"] for e in doc["errors"]] == ["backend_failed"]
    assert doc["report"]["duration_s"] == 19.5

    # the same exit codes for what is not there
    for args in (("calls", "show", "5b0c"), ("calls", "show", "nope")):
        want = await run_cli(*args, "--config", on_sqlite)
        got = await run_cli(*args, "--config", on_pg)
        assert got == want and got[0] == 1, args
    assert "several calls" in (await run_cli("calls", "show", "5b0c", "--config", on_pg))[2]


async def test_the_postgresql_session_refuses_every_write(pg_url: str) -> None:
    store = await PgStore.open(pg_url)
    await store.write(Batch(calls=[(record("c1"), T0)]))
    await store.close()

    def read_and_try_writes() -> None:
        reader = PgReader.open(pg_url)
        try:
            rows = reader.rows("SELECT call_id, turn FROM calls WHERE call_id = ?", ("c1",))
            assert rows == [("c1", 2)]
            with pytest.raises(StoreError, match="read-only transaction"):
                reader.rows("UPDATE calls SET turn = ? WHERE call_id = ?", (9, "c1"))
            with pytest.raises(StoreError, match="read-only transaction"):
                reader.rows("DELETE FROM events")
        finally:
            reader.close()

    # on a thread with no event loop, as in `agentd calls` (the reader runs its own)
    await asyncio.to_thread(read_and_try_writes)


async def test_a_database_agentd_never_used_exits_2(tmp_path: Path, pg_url: str) -> None:
    code, out, err = await run_cli("calls", "--config", pg_config(tmp_path, pg_url))
    assert (code, out) == (2, "")
    assert "has no agentd store: has agentd run with this config yet?" in err


async def test_the_password_is_read_from_its_file_and_never_shown(
    tmp_path: Path, pg_server: PgServer
) -> None:
    name = pg_server.create_database(owner=pg_server.pw_user)
    try:
        url = pg_server.url(name, pg_server.pw_user)  # no password in the URL
        store = await PgStore.open(pg_server.url(name, pg_server.pw_user, pg_server.pw_password))
        await store.write(history())
        await store.close()
        secret = tmp_path / "store-password"
        secret.write_text(pg_server.pw_password + "\n", encoding="utf-8")
        code, out, err = await run_cli("calls", "--config", pg_config(tmp_path, url, secret))
        assert code == 0, err
        assert out.splitlines()[1].startswith(LIVE)

        secret.write_text("Not-The-Password-42\n", encoding="utf-8")
        code, out, err = await run_cli("calls", "--config", pg_config(tmp_path, url, secret))
        assert code == 2 and "password authentication failed" in err
        wrong = pg_server.url(name, pg_server.pw_user, "Not-The-Password-42")
        code, out, err = await run_cli("calls", "--config", pg_config(tmp_path, wrong))
        assert code == 2 and "password authentication failed" in err
        assert "Not-The-Password" not in out + err and pg_server.pw_password not in out + err
    finally:
        pg_server.drop_database(name)


@pytest.mark.slow
async def test_a_call_served_on_postgresql_is_listed_and_shown(
    sim: Simulator, agent: StartAgent, tmp_path: Path, pg_url: str
) -> None:
    # the fixture's default store is a SQLite path; the default path beside a url is no conflict
    daemon = await agent(
        agent={"greeting": "Hello there."}, store={"path": "agentd.db", "url": pg_url}
    )
    call_id = await served_call(sim, daemon)
    cfg = pg_config(tmp_path, pg_url)

    code, out, err = await run_cli("calls", "--config", cfg)
    assert code == 0, err
    assert out.splitlines()[1].startswith(call_id) and "incoming" in out
    code, out, err = await run_cli("calls", "show", call_id[:8], "--config", cfg)
    assert code == 0, err
    assert "agent: Hello there." in out
    assert "caller: what are your hours" in out
    assert "confirmed stopped" in out and "NOT confirmed" not in out
