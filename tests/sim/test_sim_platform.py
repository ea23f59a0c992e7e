"""Platform behaviour from ``voipbin/monorepo``: confbridges and transfers, flows, permissions,
and WebSocket subscriptions that bind asynchronously.

Each test names the server file it follows.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import aiohttp
import pytest
import websockets
from simhelpers import (
    SLEEP_ACTIONS,
    envelope,
    fast_settings,
    get,
    post,
    recv_json,
    subscribe,
    ws_connect,
)

from agentd.sim import Outcome, Simulator
from agentd.sim.model import NIL_UUID

OUR_NUMBER = {"type": "tel", "target": "+15551234567"}
HOLD_LINE = "+15550000100"
HUMAN = "+15550000200"
#: A number flow that bridges the caller with a second leg, and keeps the caller up if the bridge
#: ends (a failed transfer).
CONNECT_FLOW = [
    {"type": "answer"},
    {
        "type": "connect",
        "option": {"source": OUR_NUMBER, "destinations": [{"type": "tel", "target": HOLD_LINE}]},
    },
    *SLEEP_ACTIONS,
]


def _transfer_body(kind: str, transferer: str, target: str = HUMAN) -> dict[str, Any]:
    return {
        "transfer_type": kind,
        "transferer_call_id": transferer,
        "transferee_addresses": [{"type": "tel", "target": target}],
    }


async def _bridged_caller(sim: Simulator) -> tuple[str, str]:
    """An inbound caller on CONNECT_FLOW, once bridged with its answered second leg."""
    caller_id = sim.inbound_call(flow_id=sim.create_flow(CONNECT_FLOW))
    caller = sim.get_call(caller_id)
    await sim.wait_for(lambda: len(caller.chained_call_ids) == 1)
    leg = sim.get_call(caller.chained_call_ids[0])
    await sim.wait_for(lambda: leg.confbridge_id == caller.confbridge_id != NIL_UUID)
    return caller_id, leg.id


def _human_call(sim: Simulator, transfer: dict[str, Any]) -> str:
    return sim.world.groupcalls[transfer["groupcall_id"]].call_ids[0]


# ----------------------------------------------------------------------------- confbridges


async def test_connect_bridges_the_caller_with_a_chained_leg(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """bin-flow-manager/pkg/activeflowhandler/actionhandle.go (actionHandleConnect),
    bin-call-manager/pkg/callhandler/chained_call.go, confbridgehandler/joined.go."""
    caller_id, leg_id = await _bridged_caller(sim)
    caller, leg = sim.get_call(caller_id), sim.get_call(leg_id)
    cb = sim.confbridges[caller.confbridge_id]
    assert (cb.type, cb.call_ids) == ("connect", [caller_id, leg_id])
    assert (leg.direction, leg.destination["target"]) == ("outgoing", HOLD_LINE)
    _, got, _ = await get(http, f"{sim.api_url}/calls/{caller_id}")
    assert got["chained_call_ids"] == [leg_id]
    assert got["action"]["type"] == "confbridge_join"
    # The external Call shape has no confbridge_id (bin-call-manager/models/call/webhook.go).
    assert "confbridge_id" not in got
    _, got, _ = await get(http, f"{sim.api_url}/calls/{leg_id}")
    assert got["master_call_id"] == caller_id


async def test_connect_bridge_ends_when_one_call_is_left(sim: Simulator) -> None:
    """bin-call-manager/pkg/confbridgehandler/leaved.go: a connect confbridge with one call left
    terminates; callhandler/bridge.go: the caller moves on to its next action (sleep here)."""
    caller_id, leg_id = await _bridged_caller(sim)
    cb = sim.confbridges[sim.get_call(caller_id).confbridge_id]
    await sim.hangup(leg_id)
    caller = sim.get_call(caller_id)
    await sim.wait_for(lambda: caller.action.get("type") == "sleep")
    assert (cb.status, cb.call_ids, caller.confbridge_id) == ("terminated", [], NIL_UUID)
    assert caller.status == "progressing"


async def test_caller_hangup_takes_its_chained_leg_down(sim: Simulator) -> None:
    """bin-call-manager/pkg/callhandler/hangup.go: the chained calls are hung up."""
    caller_id, leg_id = await _bridged_caller(sim)
    await sim.hangup(caller_id)
    await sim.wait_call_status(leg_id, "hangup")


# ----------------------------------------------------------------------------- transfers


async def test_blind_transfer_from_the_second_leg_hands_the_caller_over(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """bin-transfer-manager/pkg/transferhandler/blind.go (hang the transferer up, ring the
    bridge, dial the transferee into it) and transferee.go (TransfereeAnswerTypeBlind)."""
    sim.on_outbound(Outcome(ring_after_s=0.0, answer_after_s=0.2), destination=HUMAN)
    caller_id, leg_id = await _bridged_caller(sim)
    caller = sim.get_call(caller_id)
    cb = sim.confbridges[caller.confbridge_id]
    status, transfer, _ = await post(
        http, sim.api_url + "/transfers", _transfer_body("blind", leg_id)
    )
    assert status == 200
    assert (transfer["type"], transfer["confbridge_id"]) == ("blind", cb.id)
    assert transfer["transferee_call_id"] == NIL_UUID and transfer["tm_delete"] is None
    assert sim.get_call(leg_id).status == "terminating"
    assert cb.ringing and "no_auto_leave" in cb.flags
    await sim.wait_call_status(leg_id, "hangup")
    assert cb.call_ids == [caller_id]  # the flag kept the bridge alive
    human_id = _human_call(sim, transfer)
    await sim.wait_for(lambda: sim.get_call(human_id).confbridge_id == cb.id)
    assert cb.call_ids == [caller_id, human_id]
    assert not cb.ringing and "no_auto_leave" not in cb.flags
    assert sim.transfers[transfer["id"]]["transferee_call_id"] == human_id
    assert caller.status == "progressing"
    # The transferee is chained to the transferer's master: the caller.
    assert sim.get_call(human_id).master_call_id == caller_id


async def test_blind_transfer_from_the_callers_own_leg_hangs_the_caller_up(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """bin-transfer-manager/pkg/transferhandler/blind.go: the transferer is hung up first."""
    caller_id, leg_id = await _bridged_caller(sim)
    status, _, _ = await post(http, sim.api_url + "/transfers", _transfer_body("blind", caller_id))
    assert status == 200
    await sim.wait_call_status(caller_id, "hangup")
    assert sim.get_call(caller_id).hangup_by == "local"
    await sim.wait_call_status(leg_id, "hangup")


async def test_blind_transfer_nobody_answers_ends_the_bridge(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """bin-transfer-manager/pkg/transferhandler/transferee.go (transfereeHangupTypeBlind:
    terminate the confbridge); the caller moves on to the sleep after its connect."""
    sim.on_outbound(Outcome(result="noanswer", answer_after_s=0.05), destination=HUMAN)
    caller_id, leg_id = await _bridged_caller(sim)
    caller = sim.get_call(caller_id)
    cb = sim.confbridges[caller.confbridge_id]
    status, transfer, _ = await post(
        http, sim.api_url + "/transfers", _transfer_body("blind", leg_id)
    )
    assert status == 200
    await sim.wait_for(lambda: cb.status == "terminated")
    await sim.wait_for(lambda: caller.action.get("type") == "sleep")
    assert caller.status == "progressing" and caller.confbridge_id == NIL_UUID
    assert sim.transfers[transfer["id"]]["transferee_call_id"] == NIL_UUID


async def test_attended_transfer_keeps_the_transferer_and_holds_the_others(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """bin-transfer-manager/pkg/transferhandler/attended.go (music on hold and inbound mute for
    the others, transferer stays) and transferer.go (TransfererHangup completes it)."""
    caller_id, leg_id = await _bridged_caller(sim)
    caller, leg = sim.get_call(caller_id), sim.get_call(leg_id)
    cb = sim.confbridges[caller.confbridge_id]
    status, transfer, _ = await post(
        http, sim.api_url + "/transfers", _transfer_body("attended", caller_id)
    )
    assert status == 200
    assert (leg.moh, leg.to_json()["mute_direction"]) == (True, "in")
    assert "no_auto_leave" not in cb.flags
    human_id = _human_call(sim, transfer)
    await sim.wait_for(lambda: sim.get_call(human_id).confbridge_id == cb.id)
    assert caller.status == "progressing"
    assert sim.transfers[transfer["id"]]["transferee_call_id"] == NIL_UUID
    await sim.hangup(caller_id)
    assert sim.transfers[transfer["id"]]["transferee_call_id"] == human_id
    assert not leg.moh and leg.mute_direction == ""


async def test_attended_transfer_transferee_hangs_up_first_unholds(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """bin-transfer-manager/pkg/transferhandler/transferee.go (transfereeHangupTypeAttended)."""
    sim.on_outbound(Outcome(result="busy", answer_after_s=0.05), destination=HUMAN)
    caller_id, leg_id = await _bridged_caller(sim)
    leg = sim.get_call(leg_id)
    status, _, _ = await post(
        http, sim.api_url + "/transfers", _transfer_body("attended", caller_id)
    )
    assert status == 200 and leg.moh
    await sim.wait_for(lambda: not leg.moh)
    assert leg.mute_direction == "" and sim.get_call(caller_id).status == "progressing"


async def test_transfer_errors_follow_the_server(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """bin-api-manager/server/transfers.go and pkg/servicehandler/transfer.go (fetch, then
    permission, no validation), bin-transfer-manager transfer.go (unknown type -> 500 after the
    confbridge check), blind.go (the transferer is hung up before the groupcall, which fails
    without destinations: bin-call-manager/pkg/groupcallhandler/start.go)."""
    _, leg_id = await _bridged_caller(sim)
    url = sim.api_url + "/transfers"
    status, data, _ = await post(http, url, _transfer_body("warm", leg_id))
    assert (status, envelope(data)) == (500, ("INTERNAL", "INTERNAL"))
    status, data, _ = await post(http, url, {"transfer_type": "blind"})
    assert (status, envelope(data)[1]) == (404, "CALL_NOT_FOUND")
    status, data, _ = await post(http, url, {**_transfer_body("blind", leg_id), "transfer_type": 1})
    assert (status, envelope(data)[1]) == (400, "INVALID_JSON_BODY")
    assert sim.get_call(leg_id).status == "progressing"
    no_one = {**_transfer_body("blind", leg_id), "transferee_addresses": []}
    status, data, _ = await post(http, url, no_one)
    assert status == 500
    await sim.wait_call_status(leg_id, "hangup")  # gone all the same
    assert sim.transfers == {}


# ----------------------------------------------------------------------------- flows


async def test_post_calls_checks_the_flow(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """bin-api-manager/pkg/servicehandler/call.go (CallCreate: flowGet, customer check),
    bin-flow-manager/pkg/flowhandler/db.go (FLOW_NOT_FOUND), server/calls.go (FromStringOrNil)."""
    url = sim.api_url + "/calls"
    base = {
        "source": {"type": "tel", "target": "+1"},
        "destinations": [{"type": "tel", "target": "+2"}],
    }
    status, data, _ = await post(http, url, {**base, "flow_id": str(uuid.uuid4())})
    assert (status, envelope(data)) == (404, ("NOT_FOUND", "FLOW_NOT_FOUND"))
    theirs = sim.create_flow(SLEEP_ACTIONS, customer_id=str(uuid.uuid4()))
    status, data, _ = await post(http, url, {**base, "flow_id": theirs})
    assert (status, envelope(data)) == (403, ("PERMISSION_DENIED", "PERMISSION_DENIED"))
    assert sim.calls == {}
    # Not a uuid: no flow; the actions make the temporary flow.
    status, data, _ = await post(http, url, {**base, "flow_id": "nope", "actions": SLEEP_ACTIONS})
    assert status == 200
    assert data["calls"][0]["flow_id"] != "nope"
    ours = sim.create_flow([{"type": "talk", "option": {"text": "hi"}}, *SLEEP_ACTIONS])
    status, data, _ = await post(
        http, url, {**base, "flow_id": ours, "actions": [{"type": "hangup"}]}
    )
    call = sim.get_call(data["calls"][0]["id"])
    assert call.flow_id == ours
    await sim.wait_for(lambda: call.action.get("type") == "sleep")  # the flow won over actions


async def test_inbound_call_runs_the_numbers_flow(sim: Simulator) -> None:
    """bin-call-manager/pkg/callhandler/start.go: the number's call_flow_id runs."""
    flow_id = sim.create_flow([{"type": "answer"}, {"type": "hangup"}])
    call_id = sim.inbound_call(flow_id=flow_id)
    await sim.wait_call_status(call_id, "hangup")
    assert sim.get_call(call_id).flow_id == flow_id


async def test_control_api_flows_confbridges_transfers(sim: Simulator) -> None:
    """The control API's view of the platform (flows: bin-flow-manager/models/flow)."""
    async with aiohttp.ClientSession() as s:
        ctl = sim.base_url + "/_sim"
        status, data, _ = await post(s, ctl + "/flows", {"actions": CONNECT_FLOW})
        assert status == 200
        flow_id = data["id"]
        assert (await get(s, ctl + "/flows"))[1][0]["id"] == flow_id
        status, data, _ = await post(
            s, ctl + "/calls", {"flow_id": flow_id, "hangup_after_s": None}
        )
        caller = sim.get_call(data["id"])
        await sim.wait_for(lambda: caller.confbridge_id != NIL_UUID)
        _, view, _ = await get(s, f"{ctl}/calls/{caller.id}")
        assert view["confbridge_id"] == caller.confbridge_id
        _, bridges, _ = await get(s, ctl + "/confbridges")
        assert bridges[0]["type"] == "connect" and caller.id in bridges[0]["call_ids"]
        assert (await get(s, ctl + "/transfers"))[1] == []
        assert (await post(s, ctl + "/flows", {"actions": "x"}))[0] == 400
        assert (await post(s, ctl + "/calls", {"flow_id": str(uuid.uuid4())}))[0] == 404
        _, info, _ = await get(s, ctl + "/info")
        status, _, _ = await get(s, f"{sim.api_url}/customer?token={info['agent_token']}")
        assert status == 403


# ----------------------------------------------------------------------------- permissions


async def _login(sim: Simulator, username: str, password: str) -> str:
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            sim.base_url + "/auth/login", json={"username": username, "password": password}
        ) as r,
    ):
        assert r.status == 200
        data = await r.json()
        assert data["username"] == username
        token: str = data["token"]
        return token


async def test_agent_without_admin_rights_gets_403(
    sim: Simulator, http: aiohttp.ClientSession
) -> None:
    """bin-api-manager/pkg/servicehandler/customer.go (CustomerSelfGet), call.go, speaking.go,
    etc.go (hasPermission: CustomerAdmin|CustomerManager); models/auth/auth.go (an access key is
    always CustomerAdmin)."""
    settings = sim.settings
    token = await _login(sim, settings.agent_username, settings.agent_password)
    demo = await _login(sim, settings.username, settings.password)
    call_id = sim.inbound_call()
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as agent:
        status, data, _ = await get(agent, sim.api_url + "/customer")
        assert (status, envelope(data)) == (403, ("PERMISSION_DENIED", "PERMISSION_DENIED"))
        assert data["error"]["message"] == "You do not have permission to access this resource."
        assert (await get(agent, f"{sim.api_url}/calls/{call_id}"))[0] == 403
        assert (await get(agent, f"{sim.api_url}/calls/{uuid.uuid4()}"))[0] == 404  # fetch first
        assert (await get(agent, sim.api_url + "/calls"))[0] == 403
        body = {"source": OUR_NUMBER, "destinations": [OUR_NUMBER], "actions": SLEEP_ACTIONS}
        assert (await post(agent, sim.api_url + "/calls", body))[0] == 403
        speak = {"reference_type": "call", "reference_id": call_id, "language": "en-US"}
        assert (await post(agent, sim.api_url + "/speakings", speak))[0] == 403
        assert (await post(agent, sim.api_url + "/transfers", _transfer_body("blind", call_id)))[
            0
        ] == 403
    assert sim.speakings == {}
    async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {demo}"}) as admin:
        assert (await get(admin, sim.api_url + "/customer"))[0] == 200
    assert (await get(http, sim.api_url + "/customer"))[0] == 200


async def test_agent_without_admin_rights_is_dropped_on_customer_topics(sim: Simulator) -> None:
    """bin-api-manager/pkg/websockhandler/etc.go (validateTopics) and subscription.go (an
    invalid topic returns an error: the connection is closed without a close frame)."""
    token = sim.make_token(admin=False)
    async with websockets.connect(f"{sim.ws_url}?token={token}") as ws:
        await subscribe(sim, ws, [f"agent_id:{sim.plain_agent_id}:call"])  # its own: fine
        conn = sim.ws_connections[0]
        await ws.send(
            json.dumps({"type": "subscribe", "topics": [f"customer_id:{sim.customer_id}:call"]})
        )
        with pytest.raises(websockets.ConnectionClosedError) as info:
            await asyncio.wait_for(ws.recv(), 2.0)
        assert info.value.rcvd is None
    assert conn.close_reason == "invalid topic"


# ----------------------------------------------------------------------------- subscriptions


async def test_events_before_the_scope_is_bound_are_lost() -> None:
    """bin-api-manager/pkg/websockhandler/subscription.go + scoperefcount.go: the AMQP QueueBind
    of the topic's scope (bindpattern.go) comes after the subscribe; events published before the
    binding never reach the pod."""
    async with Simulator(fast_settings(subscribe_bind_s=0.2)) as sim:
        ws = await ws_connect(sim)
        topic = f"customer_id:{sim.customer_id}:call:call_"
        await ws.send(json.dumps({"type": "subscribe", "topics": [topic]}))
        await sim.wait_for(lambda: any(topic in c.pending for c in sim.ws_connections))
        conn = sim.ws_connections[0]
        call_id = sim.inbound_call()  # call_created now, inside the gap
        assert conn.subscriptions == set()
        await sim.wait_for(lambda: topic in conn.subscriptions)
        await sim.hangup(call_id)
        frames = []
        while not frames or frames[-1]["status"] != "hangup":
            frames.append(await recv_json(ws))
        assert all("type" in f["action"] for f in frames)  # never call_created (start action)
        await ws.close()


async def test_a_bound_scope_takes_new_topics_at_once_and_unbinds_when_empty() -> None:
    """bin-api-manager/pkg/websockhandler/scoperefcount.go: Acquire binds on the first topic of
    a scope only; Release unbinds on the last."""
    async with Simulator(fast_settings(subscribe_bind_s=0.2)) as sim:
        cid = sim.customer_id
        ws = await ws_connect(sim)
        first, second = f"customer_id:{cid}:call:call_", f"customer_id:{cid}:transcribe:"
        await subscribe(sim, ws, [first])
        conn = sim.ws_connections[0]
        await ws.send(json.dumps({"type": "subscribe", "topics": [second]}))
        await sim.wait_for(lambda: second in conn.subscriptions, timeout=0.15)
        await ws.send(json.dumps({"type": "unsubscribe", "topics": [first, second]}))
        await sim.wait_for(lambda: not conn.subscriptions)
        await ws.send(json.dumps({"type": "subscribe", "topics": [first]}))
        await sim.wait_for(lambda: first in conn.pending)
        await subscribe(sim, ws, [first])  # bound again after the delay
        await ws.close()


async def test_zero_bind_delay_applies_at_once() -> None:
    """subscribe_bind_s=0: the subscription receives events as soon as it is applied."""
    async with Simulator(fast_settings(subscribe_bind_s=0.0)) as sim:
        ws = await ws_connect(sim)
        topic = f"customer_id:{sim.customer_id}:call:call_created"
        await ws.send(json.dumps({"type": "subscribe", "topics": [topic]}))
        await sim.wait_for(lambda: any(topic in c.subscriptions for c in sim.ws_connections))
        assert not sim.ws_connections[0].pending
        call_id = sim.inbound_call()
        assert (await recv_json(ws))["id"] == call_id
        await ws.close()
