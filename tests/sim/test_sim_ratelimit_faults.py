"""Rate limiting and every fault knob."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import pytest
import websockets
from simhelpers import (
    answered_call,
    envelope,
    fast_settings,
    get,
    post,
    recv_json,
    subscribe,
    ws_connect,
)

from agentd.sim import Simulator


async def test_rate_limit_429_with_retry_after() -> None:
    async with (
        Simulator(fast_settings(rate_limit=True, rate_per_s=0.5, burst=3)) as sim,
        aiohttp.ClientSession(headers={"Cookie": f"accesskey={sim.accesskey}"}) as http,
    ):
        statuses = [(await get(http, sim.api_url + "/customer"))[0] for _ in range(3)]
        assert statuses == [200, 200, 200]
        status, data, resp = await get(http, sim.api_url + "/customer")
        assert status == 429
        assert envelope(data) == ("RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED")
        assert data["error"]["details"] == [{"limited_by": "customer"}]
        assert resp.headers["Retry-After"] == "2"
        # The WebSocket upgrade counts too.
        with pytest.raises(websockets.InvalidStatus) as info:
            await ws_connect(sim)
        assert info.value.response.status_code == 429


async def test_rate_limit_can_be_switched_off(sim: Simulator, http: aiohttp.ClientSession) -> None:
    statuses = {(await get(http, sim.api_url + "/customer"))[0] for _ in range(60)}
    assert statuses == {200}


async def test_fail_fault(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.fail("GET", r"^/v1\.0/customer$", 503, count=2)
    assert (await get(http, sim.api_url + "/customer"))[0] == 503
    status, data, _ = await get(http, sim.api_url + "/customer")
    assert (status, envelope(data)[0]) == (503, "UNAVAILABLE")
    assert (await get(http, sim.api_url + "/customer"))[0] == 200
    sim.faults.fail("GET", "/customer", 429, retry_after=2.5)
    status, data, resp = await get(http, sim.api_url + "/customer")
    assert (status, resp.headers["Retry-After"]) == (429, "3")
    assert [r.status for r in sim.requests_matching("GET", "customer")] == [503, 503, 200, 429]


async def test_fail_fault_on_the_login(sim: Simulator) -> None:
    """The login's gateway refuses too (its per-IP limit's 429, a 503) before any password is
    read; the login after them gets its JWT."""
    login = sim.api_url.removesuffix("/v1.0") + "/auth/login"
    body = {"username": sim.settings.username, "password": sim.settings.password}
    sim.faults.fail("POST", r"^/auth/login$", 429, retry_after=1)
    sim.faults.fail("POST", r"^/auth/login$", 503)
    async with aiohttp.ClientSession() as http:
        status, data, resp = await post(http, login, body)
        assert (status, envelope(data), resp.headers["Retry-After"]) == (
            429,
            ("RESOURCE_EXHAUSTED", "RATE_LIMIT_EXCEEDED"),
            "1",
        )
        assert (await post(http, login, body))[0] == 503
        status, data, _ = await post(http, login, body)
    assert status == 200 and data["token"]
    assert [r.status for r in sim.requests_matching("POST", "/auth/login")] == [429, 503, 200]


async def test_fail_after_apply(sim: Simulator, http: aiohttp.ClientSession) -> None:
    call_id = await answered_call(sim, http)
    body = {"reference_type": "call", "reference_id": call_id, "direction": "out"}
    _, spk, _ = await post(http, sim.api_url + "/speakings", body)
    sim.faults.fail("POST", "/say$", 503, apply=True)
    status, _, _ = await post(http, f"{sim.api_url}/speakings/{spk['id']}/say", {"text": "once"})
    assert status == 503
    # The say took effect although the client saw an error.
    await sim.wait_for(lambda: len(sim.get_call(call_id).conversation) == 1)


async def test_delay_fault(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.faults.delay("GET", "/customer", 0.2)
    t0 = time.monotonic()
    assert (await get(http, sim.api_url + "/customer"))[0] == 200
    assert time.monotonic() - t0 >= 0.2
    t0 = time.monotonic()
    await get(http, sim.api_url + "/customer")
    assert time.monotonic() - t0 < 0.2


async def test_refuse_ws(sim: Simulator) -> None:
    sim.faults.refuse_ws(503)
    with pytest.raises(websockets.InvalidStatus) as info:
        await ws_connect(sim)
    assert info.value.response.status_code == 503
    ws = await ws_connect(sim)
    await ws.close()


async def test_drop_websockets(sim: Simulator) -> None:
    ws1 = await ws_connect(sim)
    ws2 = await ws_connect(sim)
    await sim.wait_for(lambda: len(sim.ws_connections) == 2)
    sim.faults.drop_websockets()
    for ws in (ws1, ws2):
        with pytest.raises(websockets.ConnectionClosedError):
            await asyncio.wait_for(ws.recv(), 2.0)
        assert ws.close_code == 1006


async def test_duplicate_and_lose(sim: Simulator) -> None:
    ws = await ws_connect(sim)
    await subscribe(sim, ws, [f"customer_id:{sim.customer_id}:call:call_created"])
    sim.faults.duplicate_rate = 1.0
    call_id = sim.inbound_call()
    assert (await recv_json(ws))["id"] == call_id
    assert (await recv_json(ws))["id"] == call_id
    sim.faults.duplicate_rate = 0.0
    sim.faults.lose_rate = 1.0
    sim.inbound_call()
    conn = sim.ws_connections[0]
    assert conn.offered == 2  # the second call_created was never queued
    sim.faults.lose_rate = 0.0
    third = sim.inbound_call()
    assert (await recv_json(ws))["id"] == third
    await ws.close()


async def test_reorder_is_seeded_and_keeps_every_frame(sim: Simulator) -> None:
    ws = await ws_connect(sim)
    await subscribe(sim, ws, [f"customer_id:{sim.customer_id}:call:call_created"])
    sim.faults.seed(7)
    sim.faults.reorder = True
    ids = [sim.inbound_call() for _ in range(12)]
    got = [(await recv_json(ws))["id"] for _ in range(12)]
    assert sorted(got) == sorted(ids)
    assert got != ids
    await ws.close()


async def test_jitter_delivers_every_frame_late_and_out_of_order(sim: Simulator) -> None:
    ws = await ws_connect(sim)
    await subscribe(sim, ws, [f"customer_id:{sim.customer_id}:call:call_created"])
    sim.faults.seed(7)
    sim.faults.jitter_s = 0.2
    [conn] = sim.ws_connections
    ids = [sim.inbound_call() for _ in range(12)]
    assert conn.offered == 0  # every one held back, none lost
    got = [(await recv_json(ws))["id"] for _ in range(12)]
    assert sorted(got) == sorted(ids)
    assert got != ids
    await ws.close()


async def test_frames_held_by_jitter_die_with_their_connection(sim: Simulator) -> None:
    ws = await ws_connect(sim)
    await subscribe(sim, ws, [f"customer_id:{sim.customer_id}:call:call_created"])
    sim.faults.jitter_s = 30.0
    [conn] = sim.ws_connections
    sim.inbound_call()
    assert conn.offered == 0
    sim.faults.drop_websockets()
    await sim.wait_for(lambda: not sim.ws_connections)
    assert conn.offered == 0 and not conn._late  # the timers went with it
    await ws.close()


async def test_send_raw(sim: Simulator) -> None:
    ws = await ws_connect(sim)
    await sim.wait_for(lambda: len(sim.ws_connections) == 1)
    await sim.faults.send_raw("{broken")
    assert await asyncio.wait_for(ws.recv(), 2.0) == "{broken"
    await sim.faults.send_raw(b"\x00\x01")
    assert await asyncio.wait_for(ws.recv(), 2.0) == b"\x00\x01"
    await sim.faults.send_raw(json.dumps({"hello": 1}))
    assert await recv_json(ws) == {"hello": 1}
    await ws.close()
