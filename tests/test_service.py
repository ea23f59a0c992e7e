"""`agentd run` as systemd runs it: a real process, sd_notify on a datagram socket, signals."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import uuid
from pathlib import Path

import pytest

from agentd.sim import Caller, Simulator, Utterance
from tests.support import CALLER, FINAL_HOLD, OUR_NUMBER, PLAYBACK, SAY_LATENCY

# a real `agentd run` process with signals and sd_notify
pytestmark = pytest.mark.slow

CONFIG = """
[voipbin]
api_url = "{api}"
accesskey_file = "{keyfile}"
[agent]
numbers = ["{number}"]
greeting = "{greeting}"
chars_per_s = {playback}
say_latency_s = {latency}
final_hold_s = {hold}
[log]
format = "json"
[store]
path = "{store}"
[daemon]
stop_sessions_on_shutdown = true
"""


async def recv_until(sock: socket.socket, prefix: bytes, limit_s: float = 10.0) -> list[bytes]:
    """Datagrams received until one starts with `prefix` (inclusive)."""
    loop = asyncio.get_running_loop()
    got: list[bytes] = []
    async with asyncio.timeout(limit_s):
        while True:
            msg = await loop.sock_recv(sock, 4096)
            got.append(msg)
            if msg.startswith(prefix) or b"\n" + prefix in msg:
                return got


def write_config(path: Path, sim: Simulator, greeting: str) -> None:
    keyfile = path.parent / "accesskey"
    keyfile.write_text(sim.accesskey)
    path.write_text(
        CONFIG.format(
            api=sim.api_url,
            keyfile=keyfile,
            number=OUR_NUMBER,
            greeting=greeting,
            playback=PLAYBACK,
            latency=SAY_LATENCY,
            hold=FINAL_HOLD,
            store=path.parent / "agentd.db",
        )
    )


async def test_run_notifies_systemd_reloads_on_sighup_and_drains_on_sigterm(
    sim: Simulator, tmp_path: Path
) -> None:
    config = tmp_path / "agentd.toml"
    write_config(config, sim, "Hello from the first config.")
    name = f"agentd-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)  # the abstract namespace, as systemd's "@" notation means
    sock.setblocking(False)
    env = {**os.environ, "NOTIFY_SOCKET": "@" + name}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentd",
        "run",
        "--config",
        str(config),
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        ready = await recv_until(sock, b"READY=1")
        assert b"VoIPBIN ready" in ready[-1]  # READY only once subscribed

        first = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("hi")], hangup_after_s=None))
        await sim.wait_for(lambda: bool(sim.get_call(first).conversation), 10)
        write_config(config, sim, "Hello from the reloaded config.")
        proc.send_signal(signal.SIGHUP)
        await recv_until(sock, b"RELOADING=1")
        await recv_until(sock, b"READY=1")
        second = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("hey")]))
        await sim.wait_call_status(second, "hangup", timeout=10)
        await sim.wait_for(
            lambda: any(li.text == "You said: hi." for li in sim.get_call(first).conversation), 10
        )

        proc.send_signal(signal.SIGTERM)
        await recv_until(sock, b"STOPPING=1")
        # an impatient operator in the drain: systemctl stop again, Ctrl-C, a reload
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            proc.send_signal(sig)
        output, _ = await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 0, output.decode()[-2000:]
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        sock.close()

    def greeting(call_id: str) -> str:
        return sim.get_call(call_id).conversation[0].text

    assert greeting(first) == "Hello from the first config."  # the live call kept its config
    assert greeting(second) == "Hello from the reloaded config."
    # SIGTERM ended the call that was still up, and stopped every session
    assert sim.get_call(first).status == "hangup"
    assert sim.leaks() == []
    lines = output.decode().splitlines()
    assert lines and all(line.startswith("{") for line in lines)
    assert sim.accesskey not in output.decode()
    assert '"reason":"stopping"' in output.decode()  # the SIGHUP came in the drain
