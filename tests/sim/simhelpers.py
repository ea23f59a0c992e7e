"""Helpers for simulator tests: fast settings, WebSocket and HTTP helpers."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp
import websockets
from websockets.asyncio.client import ClientConnection

from agentd.sim import SimSettings, Simulator


def fast_settings(**overrides: Any) -> SimSettings:
    """Settings that keep tests quick: fast speech and playback, no rate limit."""
    values: dict[str, Any] = {
        "playback_chars_per_s": 200.0,
        "speech_words_per_s": 50.0,
        "rate_limit": False,
        "stt_final_delay_s": 0.05,
        "stt_final_delay_gcp_s": 0.04,
        "stt_split_gap_s": 0.03,
        "speaking_create_s": 0.01,
        "say_latency_s": 0.02,
        "stop_latency_s": 0.01,
        "playback_cjk_chars_per_s": 80.0,
        "pod_rpc_timeout_s": 0.05,
        "pod_breaker_open_s": 0.3,
    }
    values.update(overrides)
    return SimSettings(**values)


async def ws_connect(sim: Simulator, **kwargs: Any) -> ClientConnection:
    """A plain ``websockets`` client authenticated with the access key cookie."""
    return await websockets.connect(
        sim.ws_url,
        additional_headers={"Cookie": f"accesskey={sim.accesskey}"},
        open_timeout=2,
        **kwargs,
    )


async def subscribe(sim: Simulator, ws: ClientConnection, topics: list[str]) -> None:
    """Subscribe and wait until the server has applied it (the protocol has no ack)."""
    await ws.send(json.dumps({"type": "subscribe", "topics": topics}))
    await sim.wait_for(lambda: any(set(topics) <= c.subscriptions for c in sim.ws_connections))


async def recv_json(ws: ClientConnection, wait_s: float = 2.0) -> Any:
    """The next frame, parsed (``TimeoutError`` after ``wait_s``)."""
    return json.loads(await asyncio.wait_for(ws.recv(), wait_s))


async def post(
    http: aiohttp.ClientSession, url: str, body: Any = None
) -> tuple[int, Any, aiohttp.ClientResponse]:
    """POST JSON; returns status, parsed body (or None) and the response."""
    async with http.post(url, json=body) as resp:
        return resp.status, _parse(await resp.text()), resp


def _parse(text: str) -> Any:
    try:
        return json.loads(text) if text else None
    except ValueError:
        return text


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any, aiohttp.ClientResponse]:
    """GET; returns status, parsed body (or None) and the response."""
    async with http.get(url) as resp:
        return resp.status, _parse(await resp.text()), resp


SLEEP_ACTIONS = [{"type": "sleep", "option": {"duration": 3600000}}]


async def answered_call(sim: Simulator, http: aiohttp.ClientSession, **body: Any) -> str:
    """Place an outbound call that stays up and wait until it is answered."""
    payload = {
        "source": {"type": "tel", "target": "+15550000001"},
        "destinations": [{"type": "tel", "target": "+15550000002"}],
        "actions": SLEEP_ACTIONS,
        **body,
    }
    status, data, _ = await post(http, sim.api_url + "/calls", payload)
    assert status == 200, data
    call_id: str = data["calls"][0]["id"]
    await sim.wait_call_status(call_id, "progressing")
    return call_id


def envelope(data: Any) -> tuple[str, str]:
    """``(status, reason)`` of an error envelope, checking its required fields."""
    err = data["error"]
    assert err["request_id"]
    assert err["message"]
    return err["status"], err["reason"]
