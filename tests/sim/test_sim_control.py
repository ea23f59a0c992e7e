"""The ``/_sim/`` HTTP control API and the standalone entry point."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

import aiohttp
import pytest
from simhelpers import answered_call, get, post

from agentd.sim import Simulator, standalone


async def test_control_calls_and_views(sim: Simulator) -> None:
    async with aiohttp.ClientSession() as s:
        ctl = sim.base_url + "/_sim"
        status, data, _ = await post(
            s,
            ctl + "/calls",
            {
                "source": "+1555",
                "destination": "+1666",
                "utterances": [{"text": "hello", "wait_for_agent": False}],
                "hangup_after_s": None,
            },
        )
        assert status == 200
        call_id = data["id"]
        await sim.wait_for(lambda: len(sim.get_call(call_id).conversation) == 1)
        _, view, _ = await get(s, f"{ctl}/calls/{call_id}")
        assert view["status"] == "progressing"
        assert view["conversation"][0]["text"] == "hello"
        _, calls, _ = await get(s, ctl + "/calls")
        assert [c["id"] for c in calls] == [call_id]
        _, view, _ = await post(s, f"{ctl}/calls/{call_id}/hangup", {"by": "remote"})
        assert (view["status"], view["hangup_by"]) == ("hangup", "remote")
        _, leaks, _ = await get(s, ctl + "/leaks")
        assert leaks == []
        _, info, _ = await get(s, ctl + "/info")
        assert info["customer_id"] == sim.customer_id
        status, _, _ = await get(s, f"{ctl}/calls/unknown")
        assert status == 404
        status, _, _ = await get(s, ctl + "/nothing")
        assert status == 404
    # Control requests are never recorded.
    assert sim.requests == []


async def test_control_faults_and_outbound(sim: Simulator, http: aiohttp.ClientSession) -> None:
    async with aiohttp.ClientSession() as s:
        ctl = sim.base_url + "/_sim"
        status, _, _ = await post(
            s,
            ctl + "/faults",
            {"action": "fail", "method": "GET", "path_regex": "/customer", "status": 500},
        )
        assert status == 200
        assert (await get(http, sim.api_url + "/customer"))[0] == 500
        await post(
            s,
            ctl + "/faults",
            {"duplicate_rate": 0.5, "lose_rate": 0.1, "reorder": True, "seed": 3},
        )
        assert (sim.faults.duplicate_rate, sim.faults.lose_rate, sim.faults.reorder) == (
            0.5,
            0.1,
            True,
        )
        status, _, _ = await post(s, ctl + "/faults", {"action": "nope"})
        assert status == 400
        await post(s, ctl + "/outbound", {"result": "busy", "ring_after_s": 0, "answer_after_s": 0})
        _, data, _ = await post(
            http,
            sim.api_url + "/calls",
            {
                "source": {"type": "tel", "target": "+1"},
                "destinations": [{"type": "tel", "target": "+2"}],
            },
        )
        call_id = data["calls"][0]["id"]
        await sim.wait_call_status(call_id, "hangup")
        assert sim.get_call(call_id).hangup_reason == "busy"
        _, reqs, _ = await get(s, ctl + "/requests")
        assert [r["path"] for r in reqs] == ["/v1.0/customer", "/v1.0/calls"]


async def test_control_leaks(sim: Simulator, http: aiohttp.ClientSession) -> None:
    call_id = await answered_call(sim, http)
    await post(
        http, sim.api_url + "/speakings", {"reference_type": "call", "reference_id": call_id}
    )
    await sim.hangup(call_id)
    async with aiohttp.ClientSession() as s:
        _, leaks, _ = await get(s, sim.base_url + "/_sim/leaks")
    assert [leak["kind"] for leak in leaks] == ["speaking"]


async def test_standalone_main_starts_answers_and_exits_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentd.sim.standalone",
        "--port",
        "0",
        "--no-rate-limit",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.stdout is not None
    try:
        lines: dict[str, str] = {}
        while "control api" not in lines:
            raw = await asyncio.wait_for(proc.stdout.readline(), 10.0)
            assert raw, "standalone exited early"
            key, _, value = raw.decode().partition(":")
            if value:
                lines[key.strip()] = value.strip()
        api = lines["api url"]
        assert api.startswith("http://127.0.0.1:") and not api.endswith(":0/v1.0")
        assert lines["ws url"].startswith("ws://127.0.0.1:")
        async with aiohttp.ClientSession(
            headers={"Cookie": f"accesskey={lines['access key']}"}
        ) as s:
            status, data, _ = await get(s, api + "/customer")
            assert (status, data["id"]) == (200, lines["customer id"])
            status, _, _ = await get(s, f"{api}/customer?token={lines['jwt']}")
            assert status == 200
    finally:
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.wait_for(proc.wait(), 10.0)
    assert rc == 0


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--port", "99999"], "argument --port: 99999 is not a port (0 to 65535"),
        (["--port", "-5"], "argument --port: -5 is not a port (0 to 65535"),
        (["--playback-chars-per-s", "0"], "argument --playback-chars-per-s: 0 is not above 0"),
        (["--speech-words-per-s", "0"], "argument --speech-words-per-s: 0 is not above 0"),
        (["--latency-scale", "-1"], "argument --latency-scale: -1 is negative"),
        (["--latency-scale", "inf"], "argument --latency-scale: not a finite number: 'inf'"),
    ],
)
def test_standalone_refuses_values_it_cannot_run_with(
    args: list[str], error: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # before anything starts: a port out of range was a traceback from bind(), a speed of 0
    # a division by zero in the middle of a call. The parser alone: a value it lets through
    # must not start a simulator that serves until a signal
    with pytest.raises(SystemExit) as info:
        standalone._parser().parse_args(args)
    assert info.value.code == 2
    assert f"agentd sim: error: {error}" in capsys.readouterr().err
