"""WebSocket: topics, duplicate delivery, abrupt closes, frame shapes, keepalive, overflow."""

from __future__ import annotations

import asyncio
import json
import uuid

import aiohttp
import pytest
import websockets
from simhelpers import answered_call, fast_settings, post, recv_json, subscribe, ws_connect

from agentd.sim import Simulator


async def _expect_1006(ws: websockets.ClientConnection) -> None:
    with pytest.raises(websockets.ConnectionClosedError) as info:
        await asyncio.wait_for(ws.recv(), 2.0)
    # No close frame was received: websockets reports 1006 (abnormal closure).
    assert info.value.rcvd is None
    assert ws.close_code == 1006


async def test_three_part_prefix_gets_two_copies_event_type_prefix_one(sim: Simulator) -> None:
    cid = sim.customer_id
    ws3 = await ws_connect(sim)
    ws5 = await ws_connect(sim)
    wsid = await ws_connect(sim)
    await subscribe(sim, ws3, [f"customer_id:{cid}:call"])
    await subscribe(sim, ws5, [f"customer_id:{cid}:call:call_"])
    call_id = sim.inbound_call()
    await subscribe(sim, wsid, [f"customer_id:{cid}:call:{call_id}"])
    await sim.hangup(call_id)
    n_events = len([t for t, p in sim.events if p["id"] == call_id])
    conns = {c.subscriptions.copy().pop(): c for c in sim.ws_connections}
    assert conns[f"customer_id:{cid}:call"].offered == 2 * n_events
    assert conns[f"customer_id:{cid}:call:call_"].offered == n_events
    first = await recv_json(ws3)
    second = await recv_json(ws3)
    assert first == second  # identical copies
    assert (await recv_json(ws5))["status"] == "ringing"
    for ws in (ws3, ws5, wsid):
        await ws.close()


async def test_star_is_literal_and_receives_nothing(sim: Simulator) -> None:
    cid = sim.customer_id
    star = await ws_connect(sim)
    good = await ws_connect(sim)
    await subscribe(sim, star, [f"customer_id:{cid}:call:*"])
    await subscribe(sim, good, [f"customer_id:{cid}:call:call_created"])
    call_id = sim.inbound_call()
    assert (await recv_json(good))["id"] == call_id
    star_conn = next(
        c for c in sim.ws_connections if f"customer_id:{cid}:call:*" in c.subscriptions
    )
    assert star_conn.offered == 0
    await star.close()
    await good.close()


@pytest.mark.parametrize(
    "topic",
    [
        "customer_id:{other}:call",  # another customer
        "customer_id:not-a-uuid:call",
        "customer_id:00000000-0000-0000-0000-000000000000:call",  # nil uuid
        "project:{cid}:call",  # unknown scope
        "customer_id",  # fewer than 2 parts
        "agent_id:{cid}:call",  # accesskeys have no agent id
    ],
)
async def test_invalid_topic_drops_connection_and_applies_nothing(
    sim: Simulator, topic: str
) -> None:
    ws = await ws_connect(sim)
    await sim.wait_for(lambda: len(sim.ws_connections) == 1)
    conn = sim.ws_connections[0]
    bad = topic.format(cid=sim.customer_id, other=uuid.uuid4())
    good = f"customer_id:{sim.customer_id}:call:call_"
    await ws.send(json.dumps({"type": "subscribe", "topics": [good, bad]}))
    await _expect_1006(ws)
    assert conn.closed and conn.close_reason == "invalid topic"
    assert conn.subscriptions == set()


async def test_invalid_topic_in_unsubscribe_also_drops(sim: Simulator) -> None:
    ws = await ws_connect(sim)
    good = f"customer_id:{sim.customer_id}:call:call_"
    await subscribe(sim, ws, [good])
    conn = sim.ws_connections[0]
    await ws.send(json.dumps({"type": "unsubscribe", "topics": [good, "bogus"]}))
    await _expect_1006(ws)
    assert conn.subscriptions == {good}  # nothing applied


async def test_binary_frame_drops_connection(sim: Simulator) -> None:
    ws = await ws_connect(sim)
    await ws.send(b'{"type":"subscribe","topics":[]}')
    await _expect_1006(ws)


async def test_bad_json_and_unknown_type_are_ignored(sim: Simulator) -> None:
    ws = await ws_connect(sim)
    await ws.send("{not json")
    await ws.send("[1, 2]")
    await ws.send(json.dumps({"type": "hello", "topics": [f"customer_id:{sim.customer_id}"]}))
    await subscribe(sim, ws, [f"customer_id:{sim.customer_id}:call:call_created"])
    call_id = sim.inbound_call()
    assert (await recv_json(ws))["id"] == call_id
    await ws.close()


async def test_unsubscribe_removes_exact_string(sim: Simulator) -> None:
    cid = sim.customer_id
    ws = await ws_connect(sim)
    topics = [f"customer_id:{cid}:call:call_", f"customer_id:{cid}:call:call_created"]
    await subscribe(sim, ws, topics)
    await ws.send(json.dumps({"type": "unsubscribe", "topics": [f"customer_id:{cid}:call"]}))
    await ws.send(json.dumps({"type": "unsubscribe", "topics": [topics[0]]}))
    await sim.wait_for(lambda: sim.ws_connections[0].subscriptions == {topics[1]})
    await ws.close()


async def test_agent_topic_with_jwt(sim: Simulator) -> None:
    async with websockets.connect(f"{sim.ws_url}?token={sim.make_token()}") as ws:
        await subscribe(sim, ws, [f"agent_id:{sim.agent_id}:call"])


async def test_frames_are_unwrapped_resources(sim: Simulator, http: aiohttp.ClientSession) -> None:
    cid = sim.customer_id
    ws = await ws_connect(sim)
    await subscribe(
        sim,
        ws,
        [
            f"customer_id:{cid}:call:call_progressing",
            f"customer_id:{cid}:transcribe:transcribe_created",
        ],
    )
    call_id = await answered_call(sim, http)
    frame = await recv_json(ws)
    assert frame["id"] == call_id and frame["status"] == "progressing"
    assert "type" in frame and frame["type"] == "flow"  # the call's own `type`, not an envelope
    assert "data" not in frame
    await post(
        http,
        sim.api_url + "/transcribes",
        {"reference_type": "call", "reference_id": call_id, "language": "en-US"},
    )
    frame = await recv_json(ws)
    assert frame["reference_id"] == call_id and frame["status"] == "progressing"
    await ws.close()


async def test_wrapped_frames_setting() -> None:
    async with Simulator(fast_settings(wrapped_frames=True)) as sim:
        ws = await ws_connect(sim)
        await subscribe(sim, ws, [f"customer_id:{sim.customer_id}:call:call_created"])
        call_id = sim.inbound_call()
        frame = await recv_json(ws)
        assert frame["type"] == "call_created"
        assert frame["data"]["id"] == call_id
        await ws.close()


async def test_server_drops_client_that_never_pongs() -> None:
    async with (
        Simulator(fast_settings(ping_interval_s=0.05, pong_timeout_s=0.3)) as sim,
        aiohttp.ClientSession() as s,
        # autoping=False and not reading: pings are never answered.
        s.ws_connect(f"{sim.ws_url}?accesskey={sim.accesskey}", autoping=False) as ws,
    ):
        await sim.wait_for(lambda: len(sim.ws_connections) == 1)
        conn = sim.ws_connections[0]
        await sim.wait_for(lambda: conn.closed, timeout=2.0)
        assert conn.close_reason == "pong timeout"
        msg = await ws.receive(timeout=2.0)
        while msg.type == aiohttp.WSMsgType.PING:
            msg = await ws.receive(timeout=2.0)
        assert msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)


async def test_client_that_pongs_stays_connected() -> None:
    async with Simulator(fast_settings(ping_interval_s=0.05, pong_timeout_s=0.2)) as sim:
        ws = await ws_connect(sim, ping_interval=None)
        await sim.wait_for(lambda: len(sim.ws_connections) == 1)
        conn = sim.ws_connections[0]
        # websockets answers pings by itself; the connection outlives several pong deadlines.
        with pytest.raises(TimeoutError):
            await sim.wait_for(lambda: conn.closed, timeout=0.6)
        await ws.close()


async def test_queue_overflow_drops_silently() -> None:
    async with Simulator(fast_settings(ws_queue_limit=5)) as sim:
        ws = await ws_connect(sim)
        await subscribe(sim, ws, [f"customer_id:{sim.customer_id}:call:call_created"])
        # Published synchronously: the writer gets no chance to drain in between.
        ids = [sim.inbound_call() for _ in range(20)]
        conn = sim.ws_connections[0]
        assert (conn.offered, conn.dropped) == (5, 15)
        got = [(await recv_json(ws))["id"] for _ in range(5)]
        assert got == ids[:5]
        await ws.close()
