"""Calls: outbound outcomes, flows, inbound numbers, hangups, errors."""

from __future__ import annotations

import uuid
from typing import Any

import aiohttp
import pytest
from simhelpers import SLEEP_ACTIONS, answered_call, envelope, fast_settings, get, post

from agentd.sim import Outcome, Simulator

SRC = {"type": "tel", "target": "+15550000001"}
DST = {"type": "tel", "target": "+15550000002"}


def _types(sim: Simulator, call_id: str) -> list[str]:
    return [t for t, p in sim.events if t.startswith("call_") and p["id"] == call_id]


async def test_outbound_with_sleep_stays_up(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, data, _ = await post(
        http,
        sim.api_url + "/calls",
        {"source": SRC, "destinations": [DST], "actions": SLEEP_ACTIONS},
    )
    assert status == 200
    assert data["groupcalls"] == []
    call = data["calls"][0]
    assert call["status"] == "dialing"
    assert call["direction"] == "outgoing"
    assert call["destination"] == DST
    assert call["groupcall_id"] == "00000000-0000-0000-0000-000000000000"
    await sim.wait_call_status(call["id"], "progressing")
    await sim.wait_for(lambda: _types(sim, call["id"])[-1:] == ["call_updated"])
    assert _types(sim, call["id"]) == [
        "call_created",
        "call_ringing",
        "call_progressing",
        "call_updated",
    ]
    status, got, _ = await get(http, f"{sim.api_url}/calls/{call['id']}")
    assert status == 200
    assert got["status"] == "progressing"
    assert got["action"]["type"] == "sleep"
    assert got["tm_progressing"] and got["tm_ringing"]
    status, listed, _ = await get(http, sim.api_url + "/calls")
    assert [c["id"] for c in listed["result"]] == [call["id"]]
    assert listed["next_page_token"]


async def test_call_without_actions_hangs_up_after_answer(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    _, data, _ = await post(http, sim.api_url + "/calls", {"source": SRC, "destinations": [DST]})
    call_id = data["calls"][0]["id"]
    await sim.wait_call_status(call_id, "hangup")
    call = sim.get_call(call_id)
    assert (call.hangup_by, call.hangup_reason) == ("local", "normal")
    assert _types(sim, call_id)[-3:] == ["call_progressing", "call_terminating", "call_hangup"]


async def test_flow_id_keeps_the_call_up(sim: Simulator, http: aiohttp.ClientSession) -> None:
    flow_id = sim.create_flow(SLEEP_ACTIONS)
    call_id = await answered_call(sim, http, flow_id=flow_id, actions=None)
    assert sim.get_call(call_id).to_json()["flow_id"] == flow_id
    with pytest.raises(TimeoutError):
        await sim.wait_for(lambda: sim.get_call(call_id).ended, timeout=0.3)


@pytest.mark.parametrize("result", ["busy", "noanswer", "failed"])
async def test_outbound_failures(sim: Simulator, http: aiohttp.ClientSession, result: str) -> None:
    sim.on_outbound(Outcome(result=result, ring_after_s=0.0, answer_after_s=0.01))  # type: ignore[arg-type]
    _, data, _ = await post(
        http,
        sim.api_url + "/calls",
        {"source": SRC, "destinations": [DST], "actions": SLEEP_ACTIONS},
    )
    call_id = data["calls"][0]["id"]
    await sim.wait_call_status(call_id, "hangup")
    call = sim.get_call(call_id)
    assert (call.hangup_by, call.hangup_reason) == ("remote", result)
    assert "call_progressing" not in _types(sim, call_id)


async def test_outcome_per_destination(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.on_outbound(
        Outcome(result="busy", ring_after_s=0.0, answer_after_s=0.0), destination="+1999"
    )
    _, data, _ = await post(
        http,
        sim.api_url + "/calls",
        {
            "source": SRC,
            "destinations": [{"type": "tel", "target": "+1999"}, DST],
            "actions": SLEEP_ACTIONS,
        },
    )
    busy, ok = (c["id"] for c in data["calls"])
    await sim.wait_call_status(busy, "hangup")
    await sim.wait_call_status(ok, "progressing")
    assert sim.get_call(busy).hangup_reason == "busy"


async def test_agent_destinations_become_groupcalls(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    _, data, _ = await post(
        http,
        sim.api_url + "/calls",
        {
            "source": SRC,
            "destinations": [{"type": "extension", "target": str(uuid.uuid4())}],
            "actions": SLEEP_ACTIONS,
        },
    )
    assert data["calls"] == []
    group = data["groupcalls"][0]
    assert len(group["call_ids"]) == 1
    await sim.wait_call_status(group["call_ids"][0], "progressing")
    assert any(t == "groupcall_created" for t, _ in sim.events)


async def test_hangup_answered_call(sim: Simulator, http: aiohttp.ClientSession) -> None:
    call_id = await answered_call(sim, http)
    status, snap, _ = await post(http, f"{sim.api_url}/calls/{call_id}/hangup")
    assert status == 200
    assert snap["status"] == "terminating"
    await sim.wait_call_status(call_id, "hangup")
    call = sim.get_call(call_id)
    assert (call.hangup_by, call.hangup_reason) == ("local", "normal")
    # Idempotent: a second hangup answers the final state.
    status, snap, _ = await post(http, f"{sim.api_url}/calls/{call_id}/hangup")
    assert status == 200
    assert snap["status"] == "hangup"
    assert snap["hangup_by"] == "local"


async def test_hangup_before_answer_cancels(sim: Simulator, http: aiohttp.ClientSession) -> None:
    sim.on_outbound(Outcome(ring_after_s=0.0, answer_after_s=30.0))
    _, data, _ = await post(
        http,
        sim.api_url + "/calls",
        {"source": SRC, "destinations": [DST], "actions": SLEEP_ACTIONS},
    )
    call_id = data["calls"][0]["id"]
    await sim.wait_call_status(call_id, "ringing")
    _, snap, _ = await post(http, f"{sim.api_url}/calls/{call_id}/hangup")
    assert snap["status"] == "canceling"
    await sim.wait_call_status(call_id, "hangup")
    assert sim.get_call(call_id).hangup_reason == "cancel"
    assert _types(sim, call_id)[-2:] == ["call_canceling", "call_hangup"]


async def _delete(http: aiohttp.ClientSession, url: str) -> tuple[int, Any, None]:
    async with http.delete(url) as resp:
        return resp.status, await resp.json(), None


async def test_delete_hangs_a_live_call_up_and_then_it_is_409(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    call_id = await answered_call(sim, http)
    url = f"{sim.api_url}/calls/{call_id}"
    status, snap, _ = await _delete(http, url)
    # deleted at once, while the channel is still going: terminating, with tm_delete
    assert (status, snap["status"]) == (200, "terminating")
    assert snap["tm_delete"]
    await sim.wait_call_status(call_id, "hangup")
    assert _types(sim, call_id)[-3:] == ["call_terminating", "call_deleted", "call_hangup"]
    [hungup] = [p for t, p in sim.events if t == "call_hangup" and p["id"] == call_id]
    assert hungup["tm_delete"] == snap["tm_delete"]
    # from then on the gateway refuses the call: read, hangup and delete alike
    for status, data, _ in (
        await get(http, url),
        await post(http, url + "/hangup"),
        await _delete(http, url),
    ):
        assert (status, envelope(data)) == (409, ("FAILED_PRECONDITION", "STATE_INVALID")), data
    _, listed, _ = await get(http, sim.api_url + "/calls")
    assert call_id not in [c["id"] for c in listed["result"]]
    status, data, _ = await _delete(http, f"{sim.api_url}/calls/{uuid.uuid4()}")
    assert (status, envelope(data)[1]) == (404, "CALL_NOT_FOUND")


async def test_inbound_call_flow(sim: Simulator) -> None:
    call_id = sim.inbound_call(source="+15557770000", destination="+15551234567")
    first = sim.events[-1][1]
    assert first["status"] == "ringing"
    assert first["direction"] == "incoming"
    await sim.wait_for(lambda: len(_types(sim, call_id)) == 4)
    assert _types(sim, call_id) == [
        "call_created",
        "call_updated",
        "call_progressing",
        "call_updated",
    ]
    actions = [p["action"].get("type") for t, p in sim.events if p.get("id") == call_id]
    assert actions == [None, "answer", "answer", "sleep"]
    await sim.hangup(call_id)
    call = sim.get_call(call_id)
    assert (call.status, call.hangup_by, call.hangup_reason) == ("hangup", "remote", "normal")


async def test_max_call_duration() -> None:
    async with Simulator(fast_settings(max_call_s=0.1)) as sim:
        call_id = sim.inbound_call()
        await sim.wait_call_status(call_id, "hangup")
        call = sim.get_call(call_id)
        assert (call.hangup_by, call.hangup_reason) == ("local", "timeout")


async def test_call_errors(sim: Simulator, http: aiohttp.ClientSession) -> None:
    status, data, resp = await get(http, f"{sim.api_url}/calls/not-a-uuid")
    assert status == 400
    assert envelope(data) == ("INVALID_ARGUMENT", "INVALID_ID")
    assert resp.headers["X-Request-Id"] == data["error"]["request_id"]
    assert data["error"]["request_id"].startswith("req_")
    status, data, _ = await get(http, f"{sim.api_url}/calls/{uuid.uuid4()}")
    assert status == 404
    assert envelope(data) == ("NOT_FOUND", "CALL_NOT_FOUND")
    status, data, _ = await post(http, f"{sim.api_url}/calls/{uuid.uuid4()}/hangup")
    assert status == 404
    status, data, _ = await post(http, sim.api_url + "/calls", {"source": SRC})
    assert status == 400
    async with http.post(sim.api_url + "/calls", data=b"{oops") as resp:
        assert resp.status == 400
        assert envelope(await resp.json()) == ("INVALID_ARGUMENT", "INVALID_JSON_BODY")


async def test_unknown_route_and_request_id_echo(sim: Simulator) -> None:
    async with (
        aiohttp.ClientSession() as s,
        s.get(sim.api_url + "/nothing-here", headers={"X-Request-Id": "abc-123"}) as resp,
    ):
        assert resp.status == 404
        data = await resp.json()
        assert envelope(data) == ("NOT_FOUND", "ROUTE_NOT_FOUND")
        assert data["error"]["request_id"] == "abc-123"
        assert resp.headers["X-Request-Id"] == "abc-123"


async def test_transfers_need_a_confbridge(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """bin-transfer-manager/pkg/transferhandler/transfer.go: "no confbridge id found" -> 500.

    The rest of the transfer model is in test_sim_platform.py.
    """
    call_id = await answered_call(sim, http)
    body = {
        "transfer_type": "blind",
        "transferer_call_id": call_id,
        "transferee_addresses": [{"type": "tel", "target": "+15550009999"}],
    }
    status, data, _ = await post(http, sim.api_url + "/transfers", body)
    assert (status, envelope(data)) == (500, ("INTERNAL", "INTERNAL"))
    assert sim.get_call(call_id).status == "progressing"
    assert sim.transfers == {}
    unknown = {**body, "transferer_call_id": str(uuid.uuid4())}
    status, data, _ = await post(http, sim.api_url + "/transfers", unknown)
    assert (status, envelope(data)[1]) == (404, "CALL_NOT_FOUND")
