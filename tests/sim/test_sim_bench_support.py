"""What benchmarks need from the simulator: timestamps, bulk calls, request views, webhooks."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from simhelpers import post, subscribe, ws_connect

from agentd.sim import Simulator
from agentd.sim.bench import request_kind
from agentd.sim.standalone import _parser


@pytest.fixture
async def ctl(sim: Simulator) -> AsyncIterator[Any]:
    """POST /_sim/bench/<route> with a JSON body -> (status, answer)."""
    async with aiohttp.ClientSession() as s:

        async def call(route: str, body: Any = None) -> tuple[int, Any]:
            status, data, _ = await post(s, f"{sim.base_url}/_sim/bench/{route}", body or {})
            return status, data

        yield call


def test_request_kind_drops_ids() -> None:
    assert request_kind("POST", "/v1.0/speakings/abc/say") == "POST /speakings/say"
    assert request_kind("POST", "/v1.0/speakings") == "POST /speakings"
    assert request_kind("GET", "/v1.0/calls/abc") == "GET /calls/{id}"
    assert request_kind("GET", "/v1.0/customer") == "GET /customer"
    assert request_kind("GET", "/") == "GET /"


async def test_every_event_has_its_publish_time(sim: Simulator, ctl: Any) -> None:
    before = time.monotonic()
    status, now = await ctl("now")
    assert status == 200 and now["t"] >= before
    sim.inbound_call()
    await sim.wait_for(lambda: any(t == "call_progressing" for t, _ in sim.events))
    assert len(sim.world.event_times) == len(sim.events)
    assert sim.world.event_times == sorted(sim.world.event_times)
    assert sim.world.event_times[0] >= before


async def test_bulk_calls_spread_answers_and_speak_without_waiting(
    sim: Simulator, ctl: Any
) -> None:
    status, data = await ctl(
        "calls", {"count": 3, "spread_s": 0.2, "every_s": 0.05, "turns": 2, "text": "hi there"}
    )
    assert status == 200 and len(data["ids"]) == 3
    ids = data["ids"]
    # nobody ever says anything back, yet every caller speaks twice and stays on the line
    await sim.wait_for(lambda: all(len(sim.get_call(i).conversation) == 2 for i in ids), timeout=5)
    answers = [sim.get_call(i).t_answer for i in ids]
    assert all(a is not None for a in answers)
    assert answers[2] - answers[0] >= 0.1  # type: ignore[operator]
    assert all(sim.get_call(i).status == "progressing" for i in ids)
    status, hung = await ctl("hangup_all")
    assert (status, hung["count"]) == (200, 3)
    assert all(sim.get_call(i).ended for i in ids)
    assert (await ctl("hangup_all"))[1]["count"] == 0


async def test_events_and_requests_are_resolved_to_their_call(
    sim: Simulator, ctl: Any, http: aiohttp.ClientSession
) -> None:
    t0 = (await ctl("now"))[1]["t"]
    _, data = await ctl("calls", {"count": 1, "every_s": 0.3, "turns": 1, "text": "hello"})
    call_id = data["ids"][0]
    await sim.wait_call_status(call_id, "progressing")
    api = sim.api_url
    _, trn, _ = await post(
        http,
        api + "/transcribes",
        {
            "reference_type": "call",
            "reference_id": call_id,
            "language": "en-US",
            "direction": "in",
        },
    )
    _, spk, _ = await post(
        http, api + "/speakings", {"reference_type": "call", "reference_id": call_id}
    )
    await post(http, f"{api}/speakings/{spk['id']}/say", {"text": "Hi."})
    await sim.wait_for(
        lambda: any(t == "transcript_created" and p["direction"] == "in" for t, p in sim.events),
        timeout=5,
    )

    _, events = await ctl("events", {"since": t0, "types": ["transcript_created"]})
    assert [(e["type"], e["call_id"]) for e in events if e["direction"] == "in"] == [
        ("transcript_created", call_id)
    ]
    assert all(e["t"] >= t0 for e in events)
    _, everything = await ctl("events", {"since": t0})
    assert {e["type"] for e in everything} >= {"call_created", "transcribe_created"}
    assert all(e["call_id"] == call_id for e in everything)

    _, reqs = await ctl("requests", {"since": t0})
    assert [(r["kind"], r["status"], r["call_id"]) for r in reqs] == [
        ("POST /transcribes", 200, call_id),
        ("POST /speakings", 201, call_id),
        ("POST /speakings/say", 200, call_id),
    ]
    assert trn["id"]
    _, later = await ctl("requests", {"since": time.monotonic() + 60})
    assert later == []


async def test_burst_makes_every_live_caller_speak_at_one_instant(
    sim: Simulator, ctl: Any, http: aiohttp.ClientSession
) -> None:
    _, data = await ctl("calls", {"count": 3, "turns": 0})
    ids = data["ids"]
    await sim.wait_for(lambda: all(sim.get_call(i).status == "progressing" for i in ids))
    for call_id in ids:
        body = {
            "reference_type": "call",
            "reference_id": call_id,
            "language": "en-US",
            "direction": "in",
        }
        assert (await post(http, sim.api_url + "/transcribes", body))[0] == 200
    ended = sim.inbound_call()  # a call that is over says nothing
    await sim.wait_call_status(ended, "progressing")
    await sim.hangup(ended)

    status, burst = await ctl("burst", {"text": "what is my balance"})
    assert status == 200 and burst["count"] == 3

    def transcripts() -> list[float]:
        return [
            t
            for (kind, p), t in zip(sim.events, sim.world.event_times, strict=True)
            if kind == "transcript_created" and p["direction"] == "in"
        ]

    await sim.wait_for(lambda: len(transcripts()) == 3, timeout=5)
    # every caller started at the route's instant, so every final was due at the same time
    starts = {sim.get_call(i).conversation[-1].t_start for i in ids}
    assert starts == {burst["t"]}
    published = transcripts()
    assert min(published) >= burst["t"] and max(published) - min(published) < 0.05
    assert [line.who for line in sim.get_call(ended).conversation] == []


async def test_ws_view_and_drop(sim: Simulator, ctl: Any) -> None:
    ws = await ws_connect(sim)
    try:
        await sim.wait_for(lambda: len(sim.ws_connections) == 1)
        _, conns = await ctl("ws")
        assert conns[0]["subscribed_at"] is None and conns[0]["subscriptions"] == 0
        await subscribe(sim, ws, [f"customer_id:{sim.customer_id}:call:"])
        _, conns = await ctl("ws")
        assert conns[0]["subscribed_at"] >= conns[0]["connected_at"]
        assert conns[0]["subscriptions"] == 1
        status, dropped = await ctl("drop_ws")
        assert status == 200 and dropped["t"] >= conns[0]["subscribed_at"]
        await sim.wait_for(lambda: not sim.ws_connections)
        assert (await ctl("ws"))[1] == []
    finally:
        await ws.close()


async def test_webhooks_deliver_every_event_wrapped(sim: Simulator, ctl: Any) -> None:
    got: list[dict[str, Any]] = []
    progressing = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        got.append(json.loads(await request.read()))
        if got[-1]["type"] == "call_progressing":
            progressing.set()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/hook", hook)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        status, _ = await ctl("webhook", {"url": f"http://127.0.0.1:{port}/hook"})
        assert status == 200
        call_id = sim.inbound_call()
        await sim.wait_call_status(call_id, "progressing")
        await asyncio.wait_for(progressing.wait(), 5)
        assert {e["type"] for e in got} >= {"call_created", "call_progressing"}
        assert all(e["data"]["id"] == call_id for e in got if e["type"].startswith("call_"))
        assert sim.webhooks.failed == 0 and sim.webhooks.delivered >= 2
        await ctl("webhook", {"url": None})
        before = len(got)
        await sim.hangup(call_id)
        assert not sim.webhooks._tasks  # delivery off: nothing in flight, nothing sent
        assert len(got) == before
    finally:
        await runner.cleanup()


async def test_webhook_failures_are_counted_not_fatal(sim: Simulator, ctl: Any) -> None:
    await ctl("webhook", {"url": "http://127.0.0.1:9/nothing-listens-here"})
    call_id = sim.inbound_call()
    await sim.wait_call_status(call_id, "progressing")
    await sim.wait_for(lambda: sim.webhooks.failed >= 1, timeout=5)
    assert sim.get_call(call_id).status == "progressing"


@pytest.mark.parametrize(
    ("route", "body"),
    [
        ("calls", {"count": 0}),
        ("calls", {"count": 1, "text": ""}),
        ("calls", {"count": "many"}),
        ("events", {"types": "transcript_created"}),
        ("burst", {"text": " "}),
        ("webhook", {"url": 5}),
    ],
)
async def test_bad_bench_requests_are_400(ctl: Any, route: str, body: Any) -> None:
    status, data = await ctl(route, body)
    assert status == 400 and data["error"]


async def test_unknown_bench_route_is_404(ctl: Any) -> None:
    assert (await ctl("nope"))[0] == 404


def test_standalone_takes_the_caller_speed() -> None:
    args = _parser().parse_args(["--speech-words-per-s", "12.5", "--port", "0"])
    assert args.speech_words_per_s == 12.5
    assert _parser().parse_args([]).speech_words_per_s == 3.0
