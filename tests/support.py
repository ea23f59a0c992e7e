"""Constants and types the tests share."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web

from agentd.daemon import Daemon
from agentd.sim import Simulator

OUR_NUMBER = "+15551234567"
CALLER = "+15550001111"
# fast audio and speech keep the tests short; the daemon is told the same playback speed,
# TTS latency, and a turn hold that outlasts the simulator's (shrunk) gap between split finals
PLAYBACK = 400.0
SAY_LATENCY = 0.03
FINAL_HOLD = 0.15
FINAL_WAIT = 0.3  # interims after a final: how long their own final is waited for
# reply_on = "interim" (the default): no new words for this long ends a turn (the simulator's
# caller says a word every 25 ms)
END_OF_TURN = 0.1
SPECULATE = 0.06

StartAgent = Callable[..., Awaitable[Daemon]]


async def run_cli(*args: str, limit_s: float = 60.0) -> tuple[int, str, str]:
    """`python -m agentd ...` as a user runs it, without blocking the test's event loop."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentd",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()  # a command that should have exited (a second `agentd run`) must not linger
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def pod_killer(sim: Simulator, call_id: str) -> tuple[Callable[[], bool], list[str]]:
    """A `sim.wait_for` predicate that kills the tts pod of the call's first speaking as soon
    as its row exists (inside the create), and the list it puts that speaking's id in."""
    killed: list[str] = []

    def kill_the_first_create() -> bool:
        rows = sim.world.speakings_of(call_id)
        if rows and not killed:
            killed.append(rows[0].id)
            sim.faults.kill_tts_pod(rows[0].id)
        return bool(killed)

    return kill_the_first_create, killed


@contextlib.asynccontextmanager
async def serving(app: web.Application) -> AsyncIterator[int]:
    """`app` served on a free loopback port for the block: yields the port."""
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
