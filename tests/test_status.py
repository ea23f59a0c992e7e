"""`agentd status`: the daemon's read-only Unix socket, asked by the real CLI in a subprocess."""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agentd import status
from agentd.config import ConfigError, load, resolve_status_socket
from agentd.daemon import Daemon
from agentd.sim import Caller, Simulator, Utterance
from agentd.status import (
    Connection,
    Counters,
    LiveCall,
    OwnerRow,
    ReplicaRow,
    Replicas,
    Snapshot,
    client_socket,
    duration,
    render,
)
from tests.support import CALLER, OUR_NUMBER, StartAgent, run_cli


async def ask_raw(path: Path, send: bytes) -> bytes:
    """Connect, send `send`, read until the server hangs up (a reset after the data is fine)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    got = b""
    try:
        await loop.sock_connect(sock, str(path))
        if send:
            await loop.sock_sendall(sock, send)
        async with asyncio.timeout(10):
            while True:
                try:
                    chunk = await loop.sock_recv(sock, 65536)
                except ConnectionResetError:
                    break
                if not chunk:
                    break
                got += chunk
    finally:
        sock.close()
    return got


async def live_call_in_turn(sim: Simulator, daemon: Daemon) -> str:
    """An answered call whose first turn was answered, kept up (the caller does not hang up)."""
    call_id = sim.inbound_call(
        CALLER, OUR_NUMBER, Caller([Utterance("hello")], hangup_after_s=None)
    )
    await asyncio.wait_for(
        daemon.dispatcher.wait_until(
            lambda: any(c.id == call_id and c.turn >= 1 for c in daemon.dispatcher.live_calls())
        ),
        10,
    )
    return call_id


@pytest.mark.slow  # an `agentd status` process during a live call
async def test_status_cli_reports_the_live_call_the_connection_and_the_counters(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    old_umask = os.umask(0o077)  # as under systemd's UMask=0077: the mode must not depend on it
    try:
        daemon = await agent(status={"socket": str(path)})
    finally:
        os.umask(old_umask)
    assert stat.S_ISSOCK(path.stat().st_mode)
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    call_id = await live_call_in_turn(sim, daemon)

    code, out, err = await run_cli("status", "--socket", str(path))
    assert code == 0, err
    assert err == ""
    lines = out.splitlines()
    assert lines[0].startswith("agentd ") and f"(pid {os.getpid()})" in lines[0]
    assert lines[1].startswith("VoIPBIN:    ready for ")
    assert "(1 connect, 0 reconnects)" in lines[1]
    assert "live calls: 1" in lines
    row = next(line for line in lines if call_id in line)
    assert row.split()[:4] == [call_id, "incoming", "active", "1"]
    counters = dict(
        line.strip().rsplit(maxsplit=1) for line in lines[lines.index("counters:") + 1 :]
    )
    assert counters["calls served"] == "1"
    assert counters["leaked sessions"] == counters["REST errors"] == "0"

    code, out, err = await run_cli("status", "--socket", str(path), "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["connection"]["state"] == "ready"
    assert doc["connection"]["since_s"] >= 0
    assert doc["last_event_age_s"] >= 0
    assert [(c["id"], c["direction"], c["phase"], c["turn"]) for c in doc["calls"]] == [
        (call_id, "incoming", "active", 1)
    ]
    assert doc["calls"][0]["age_s"] >= 0
    counters = doc["counters"]
    assert counters["calls_served"] == 1
    assert counters["events"] >= counters["duplicates"] >= 0
    assert counters["events"] > 0
    assert counters["rejected_frames"] == 0
    assert counters["reconnects"] == 0
    assert counters["rest_errors"] == 0
    assert counters["rest_queue_depth"] == 0
    assert counters["leaks"] == 0
    assert call_id in render(doc)

    await sim.hangup(call_id)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    doc = json.loads(await ask_raw(path, b""))
    assert doc["calls"] == []
    assert doc["counters"]["calls_served"] == 1

    daemon.stop()
    await asyncio.wait_for(daemon.stopped.wait(), 10)
    assert not path.exists()  # removed on shutdown


async def test_garbage_from_a_client_changes_nothing(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    daemon = await agent(status={"socket": str(path)})
    before = json.loads(await ask_raw(path, b""))
    for junk in (
        b'{"command": "stop"}\n',
        b"STOP\r\nshutdown\r\n\x00\xff" * 1000,
        b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
    ):
        doc = json.loads(await ask_raw(path, junk))
        assert doc.keys() == before.keys()
        assert doc["connection"]["state"] == "ready"
    # the daemon did not stop, drain or reconnect, and still serves calls
    assert daemon.dispatcher.accepting
    assert daemon.stream.stats.reconnects == 0
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("still there?")]))
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    assert daemon.tallies["answered"] == 1


async def test_no_daemon_means_exit_1_and_one_clear_line(tmp_path: Path) -> None:
    missing = tmp_path / "none.sock"
    code, out, err = await run_cli("status", "--socket", str(missing))
    assert code == 1
    assert out == ""
    assert err == f"agentd is not running (no status socket at {missing})\n"

    # a socket file that nobody listens on any more (agentd was killed)
    stale = tmp_path / "stale.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(stale))
    sock.close()
    code, out, err = await run_cli("status", "--socket", str(stale), "--json")
    assert code == 1
    assert err.startswith("agentd is not running (") and str(stale) in err
    assert err.count("\n") == 1


async def test_a_stale_socket_is_replaced_a_live_one_and_other_files_are_not(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    crashed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    crashed.bind(str(path))  # left behind by a crashed agentd: bound, nobody listening
    crashed.close()
    first = await agent(status={"socket": str(path)})
    assert first.status_server is not None
    assert json.loads(await ask_raw(path, b""))["pid"] == os.getpid()

    # a second agentd on the same socket must not steal it from the running one
    second = await agent(status={"socket": str(path)})
    assert second.status_server is None
    assert path.exists() and first.status_server is not None

    # a file that is not a socket is never deleted
    regular = tmp_path / "notes.txt"
    regular.write_text("mine")
    third = await agent(status={"socket": str(regular)})
    assert third.status_server is None
    assert regular.read_text() == "mine"


async def test_the_socket_can_be_turned_off(agent: StartAgent, tmp_path: Path) -> None:
    daemon = await agent(status={"socket": ""})
    assert daemon.config.status_socket == ""
    assert daemon.status_server is None


def test_default_socket_paths(tmp_path: Path) -> None:
    run = tmp_path / "run"
    # systemd (RuntimeDirectory=agentd) sets $RUNTIME_DIRECTORY
    assert resolve_status_socket(None, {"RUNTIME_DIRECTORY": str(run)}, "/var/lib/x.db") == str(
        run / "agentd.sock"
    )
    # otherwise next to the store, or in the current directory without one
    assert resolve_status_socket(None, {}, str(tmp_path / "agentd-3.db")) == str(
        tmp_path / "agentd-3.sock"
    )
    assert resolve_status_socket(None, {}, "") == os.path.abspath("agentd.sock")
    assert resolve_status_socket("", {}, "agentd.db") == ""
    # a store deep in the tree: its socket would not bind, and `agentd status` could not ask
    deep = "/srv/" + "voice-agents/" * 8 + "agentd.db"
    with pytest.raises(ConfigError, match=r"the default beside the store, .* is too long"):
        resolve_status_socket(None, {}, deep)
    assert resolve_status_socket("", {}, deep) == ""  # turned off: no socket to bind
    config = load(
        None,
        env={
            "AGENTD_VOIPBIN_ACCESSKEY": "vb_x",
            "AGENTD_AGENT_NUMBERS": "*",
            "AGENTD_STATUS_SOCKET": str(tmp_path / "e.sock"),
        },
    )
    assert config.status_socket == str(tmp_path / "e.sock")


def test_the_client_finds_the_socket_without_reading_secrets(tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(
        f'[voipbin]\naccesskey_file = "/nonexistent"\n[status]\nsocket = "{tmp_path}/c.sock"\n'
    )
    assert client_socket(None, str(config), env={}) == str(tmp_path / "c.sock")
    assert client_socket(str(tmp_path / "a.sock"), str(config), env={}) == str(tmp_path / "a.sock")
    env = {"AGENTD_STATUS_SOCKET": str(tmp_path / "env.sock")}
    assert client_socket(None, str(config), env=env) == str(tmp_path / "env.sock")
    config.write_text(f'[store]\npath = "{tmp_path}/agentd.db"\n')
    assert client_socket(None, str(config), env={}) == str(tmp_path / "agentd.sock")
    run = tmp_path / "run"
    assert client_socket(None, str(config), env={"RUNTIME_DIRECTORY": str(run)}) == str(
        run / "agentd.sock"
    )


def test_a_config_the_user_may_not_read_is_said_so_not_taken_for_no_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # /etc/agentd/agentd.toml is 0640 root:agentd: as another user (root reads everything,
    # as the tests run, so the refusal is played) its socket cannot be known from it
    config = tmp_path / "agentd.toml"
    config.write_text('[status]\nsocket = "/run/agentd/agentd.sock"\n')
    real = Path.read_text

    def refuse(self: Path, *args: Any, **kwargs: Any) -> str:
        if self == config:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", refuse)
    assert status.main(None, False, str(config)) == 1
    err = capsys.readouterr().err
    assert f"cannot read {config}: permission denied (run with sudo" in err
    assert "not running" not in err


def test_a_config_that_cannot_be_read_is_said_so_not_taken_for_no_daemon(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # a config being edited (a quote left open) or a mistyped --config: the socket it names
    # is unknown, and the default one's "agentd is not running" was said of a running daemon
    config = tmp_path / "agentd.toml"
    config.write_text(f'[status]\nsocket = "{tmp_path}/s.sock"\n[agent]\ngreeting = "Hi\n')
    assert status.main(None, False, str(config)) == 1
    err = capsys.readouterr().err
    assert f"agentd status: {config}: not valid TOML" in err and "--socket" in err
    assert "not running" not in err
    missing = tmp_path / "nothing.toml"
    assert status.main(None, False, str(missing)) == 1
    err = capsys.readouterr().err
    assert f"agentd status: cannot read {missing}: No such file or directory" in err
    assert "not running" not in err


def test_a_socket_in_a_directory_the_user_may_not_search_is_asked_all_the_same(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the service's /run/agentd is 0700: its socket cannot be seen to exist, but connecting
    # says "permission denied" rather than "not running"
    hidden = tmp_path / "run"
    hidden.mkdir()
    monkeypatch.setattr("agentd.status.RUNTIME_SOCKET", str(hidden / "agentd.sock"))
    real_access = os.access
    monkeypatch.setattr(
        "agentd.status.os.access",
        lambda path, mode: False if str(path) == str(hidden) else real_access(path, mode),
    )
    config = tmp_path / "agentd.toml"
    config.write_text(f'[store]\npath = "{tmp_path}/agentd.db"\n')
    assert client_socket(None, str(config), env={}) == str(hidden / "agentd.sock")


async def test_status_says_why_voipbin_is_not_connected(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    path = tmp_path / "s.sock"
    daemon = await agent(status={"socket": str(path)})
    sim.faults.refuse_ws(503, count=1000)
    sim.faults.drop_websockets()
    await sim.wait_for(lambda: daemon.stream.stats.reconnects >= 2, 10)
    doc = json.loads(await ask_raw(path, b""))
    assert doc["connection"]["state"] != "ready"
    assert "503" in doc["connection"]["last_error"]
    assert "last error: " in render(doc).splitlines()[1]
    sim.faults.accept_ws()
    await asyncio.wait_for(daemon.stream.ready.wait(), 10)
    doc = json.loads(await ask_raw(path, b""))
    assert doc["connection"]["state"] == "ready" and doc["connection"]["last_error"] is None


@contextlib.asynccontextmanager
async def starting(sim: Simulator, socket_path: Path) -> AsyncIterator[Daemon]:
    """A daemon on `sim` with its status socket at `socket_path`, not waited for: it may be
    stuck at start (the `agent` fixture waits for the stream)."""
    overrides = {
        "voipbin": {"api_url": sim.api_url, "accesskey": sim.accesskey},
        "agent": {"numbers": [OUR_NUMBER]},
        "status": {"socket": str(socket_path)},
    }
    daemon = Daemon(load(None, env={}, overrides=overrides))
    task = asyncio.create_task(daemon.run())
    try:
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)


async def test_status_says_why_the_first_lookup_of_the_customer_fails(
    sim: Simulator, tmp_path: Path
) -> None:
    # VoIPBIN failing at start: before any connection, the status says what is being retried
    # rather than "starting" with no error
    path = tmp_path / "s.sock"
    sim.faults.fail("GET", r"/customer$", 503, count=1000)
    async with starting(sim, path) as daemon:
        await sim.wait_for(lambda: len(sim.requests_matching("GET", r"/customer$")) >= 2, 10)
        doc = json.loads(await ask_raw(path, b""))
        assert doc["connection"]["state"] == "connecting"
        assert doc["connection"]["last_error"] == "GET /customer: HTTP 503"
        assert "last error: GET /customer: HTTP 503" in render(doc).splitlines()[1]
        sim.faults.heal()
        await asyncio.wait_for(daemon.stream.ready.wait(), 10)
        doc = json.loads(await ask_raw(path, b""))
        assert doc["connection"]["state"] == "ready" and doc["connection"]["last_error"] is None


async def test_status_drops_the_lookups_error_once_the_customer_is_known(
    sim: Simulator, tmp_path: Path
) -> None:
    # the lookup failed once, then succeeded: while the first WebSocket upgrade is under way
    # the status must not go on blaming the lookup (an upgrade may take its 10 s)
    path = tmp_path / "s.sock"
    sim.faults.fail("GET", r"/customer$", 503)
    sim.faults.delay("GET", r"/ws$", 5.0)
    async with starting(sim, path):
        await sim.wait_for(lambda: sim.faults.held >= 1, 10)  # the upgrade is held
        assert len(sim.requests_matching("GET", r"/customer$")) == 2
        doc = json.loads(await ask_raw(path, b""))
        assert doc["connection"]["state"] == "connecting"
        assert doc["connection"]["last_error"] is None


def test_durations() -> None:
    assert duration(None) == "-"
    assert duration(4.25) == "4.2 s"
    assert duration(192) == "3m 12s"
    assert duration(2 * 3600 + 3 * 60 + 9) == "2h 03m"
    assert duration(3 * 86400 + 4 * 3600) == "3d 04h"


def test_the_document_is_built_from_a_plain_snapshot() -> None:
    snap = Snapshot(
        uptime_s=3725.12345,
        accepting_calls=False,
        connection=Connection("reconnecting", None, 3, 2, -0.01, "HTTP 401 INVALID_CREDENTIALS"),
        last_event_age_s=None,
        calls=(LiveCall("c1", "", "active", 4, 61.0004),),
        counters=Counters(1, 2, 30, 1, 0, 0, 2, 0, 0, 1, 0, 0, 0),
    )
    doc = snap.document()
    assert list(doc) == [
        "version",
        "pid",
        "uptime_s",
        "accepting_calls",
        "connection",
        "last_event_age_s",
        "calls",
        "counters",
        "replicas",
    ]
    assert doc["replicas"] is None  # one agentd: no replicas section
    assert doc["pid"] == os.getpid()
    assert doc["uptime_s"] == 3725.123
    assert doc["connection"] == {
        "state": "reconnecting",
        "since_s": None,
        "connects": 3,
        "reconnects": 2,
        "last_frame_age_s": 0.0,  # clocks a hair apart never show a negative age
        "last_error": "HTTP 401 INVALID_CREDENTIALS",
    }
    assert doc["calls"] == [
        {"id": "c1", "direction": "", "phase": "active", "turn": 4, "age_s": 61.0}
    ]
    assert doc["counters"]["calls_served"] == 1 and doc["counters"]["barge_ins"] == 1
    assert json.loads(json.dumps(doc)) == doc
    lines = render(doc).splitlines()
    assert lines[0].endswith(", up 1h 02m, shutting down")
    assert lines[1] == (
        "VoIPBIN:    reconnecting (3 connects, 2 reconnects); "
        "last error: HTTP 401 INVALID_CREDENTIALS"
    )
    assert lines[2] == "last event: none yet"
    assert "  c1    -          active  4     1m 01s" in lines
    assert not any(line.startswith("replica") for line in lines)


def test_the_replicas_section_shows_who_owns_which_call() -> None:
    replicas = Replicas(
        id="box-a:12:ab",
        lease_s=3.0,
        store_reachable=True,
        rate_per_s=7.5,
        leases_held=1,
        live=(
            ReplicaRow("box-a:12:ab", "box-a", 12, 1, 0.4),
            ReplicaRow("box-b:7:cd", "b", 7, 2, 1.2),
        ),
        owners=(OwnerRow("c1", "box-a:12:ab", 1, 2.5), OwnerRow("c2", "box-b:7:cd", 2, -0.3)),
        claimed=3,
        taken_by_others=4,
        takeovers=1,
        lost=0,
    )
    snap = Snapshot(
        uptime_s=10.0,
        accepting_calls=True,
        connection=Connection("subscribed", 9.0, 1, 0, 0.1),
        last_event_age_s=0.2,
        calls=(LiveCall("c1", "incoming", "active", 1, 5.0),),
        counters=Counters(1, 1, 30, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0),
        replicas=replicas,
    )
    doc = snap.document()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["replicas"]["owners"][1] == {
        "call_id": "c2",
        "owner": "box-b:7:cd",
        "epoch": 2,
        "expires_in_s": -0.3,
    }
    report = render(doc)
    assert "replica:    box-a:12:ab (lease 3.0 s, PostgreSQL reachable, 7.5 req/s" in report
    assert "replicas:   2 live" in report
    assert "box-a:12:ab (this one)" in report
    assert "c2    box-b:7:cd   2      expired: up for takeover" in report


def test_status_knows_nothing_of_the_daemon() -> None:
    tree = ast.parse(Path(status.__file__).read_text(encoding="utf-8"))
    imported = {
        node.module if isinstance(node, ast.ImportFrom) else alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    assert not {name for name in imported if name and name.startswith("agentd.daemon")}
