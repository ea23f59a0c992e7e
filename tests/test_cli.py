"""The command line's plumbing: `agentd sim` passes its own options through."""

from __future__ import annotations

import asyncio
import signal
import sys

import aiohttp


async def test_agentd_sim_accepts_its_options_and_serves() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentd",
        "sim",
        "--port",
        "0",
        "--no-rate-limit",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            while not (line := (await proc.stdout.readline()).decode()).startswith("api url:"):
                assert line, "agentd sim exited before printing its URL"
            api = line.split()[-1]
            key = ""
            while not key:
                line = (await proc.stdout.readline()).decode()
                if line.startswith("access key:"):
                    key = line.split()[-1]
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"{api}/customer", params={"accesskey": key}) as resp,
        ):
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
