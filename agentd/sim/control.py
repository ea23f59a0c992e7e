"""The HTTP control API under ``/_sim/`` (no auth, loopback clients only, never recorded).

Routes (JSON bodies and answers):

* ``GET /_sim/info``: urls, customer id, access key, a fresh JWT, and ``agent_token``: a JWT of
  the second agent, who has no customer-admin rights.
* ``POST /_sim/flows`` ``{"actions": [...], "customer_id"?}`` -> ``{"id"}``; ``GET /_sim/flows``.
* ``POST /_sim/calls`` ``{"source", "destination", "utterances": [{"text", "pause_s",
  "barge_in_after_s", "wait_for_agent", "backchannel_after_s"}],
  "answer_after_s", "hangup_after_s", "flow_id"?}`` -> ``{"id"}``: an inbound call with a scripted
  caller, on a number whose flow is ``flow_id`` (default: answer + sleep 1 h).
* ``GET /_sim/confbridges``, ``GET /_sim/transfers``.
* ``GET /_sim/calls``, ``GET /_sim/calls/{id}``: status and conversation.
* ``POST /_sim/calls/{id}/hangup`` ``{"by": "remote"|"local"}``.
* ``GET /_sim/requests``, ``GET /_sim/leaks``.
* ``POST /_sim/faults`` ``{"action": "drop_websockets"|"expire_tokens"|"fail"|"delay"|
  "refuse_ws"|"send_raw", ...}`` and/or ``duplicate_rate``, ``lose_rate``, ``reorder``,
  ``jitter_s``, ``seed``.
* ``POST /_sim/bench/...``: what benchmarks need (see :mod:`agentd.sim.bench`).
* ``POST /_sim/outbound`` ``{"result", "ring_after_s", "answer_after_s", "destination",
  "utterances", "hangup_after_s"}``.
"""

from __future__ import annotations

import ipaddress
import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from agentd.sim.bench import BenchApi, BenchError
from agentd.sim.model import JSON, Caller, Outcome, SimCall, Utterance

if TYPE_CHECKING:
    from agentd.sim.simulator import Simulator

_OUTCOMES = ("answer", "busy", "noanswer", "failed")
_NO_ROUTE = object()


class ControlError(Exception):
    """A bad control request (answered 400 with ``{"error": message}``)."""


def _caller_from(body: JSON) -> Caller | None:
    raw = body.get("utterances")
    if raw is None and "hangup_after_s" not in body:
        return None
    if raw is None:
        raw = []
    if not isinstance(raw, list):
        raise ControlError("utterances must be a list")
    utterances: list[Utterance] = []
    for item in raw:
        if isinstance(item, str):
            utterances.append(Utterance(item))
            continue
        if not isinstance(item, dict) or not isinstance(item.get("text"), str):
            raise ControlError("each utterance needs a text")
        utterances.append(
            Utterance(
                text=item["text"],
                pause_s=float(item.get("pause_s", 0.05)),
                barge_in_after_s=(
                    float(item["barge_in_after_s"])
                    if item.get("barge_in_after_s") is not None
                    else None
                ),
                wait_for_agent=bool(item.get("wait_for_agent", True)),
                backchannel_after_s=(
                    float(item["backchannel_after_s"])
                    if item.get("backchannel_after_s") is not None
                    else None
                ),
            )
        )
    hangup = body.get("hangup_after_s", 0.2)
    return Caller(utterances, float(hangup) if hangup is not None else None)


def _actions_from(body: JSON) -> list[JSON]:
    actions = body.get("actions")
    if not isinstance(actions, list) or not all(isinstance(a, dict) for a in actions):
        raise ControlError("actions must be a list of objects")
    customer_id = body.get("customer_id")
    if customer_id is not None and not isinstance(customer_id, str):
        raise ControlError("customer_id must be a string")
    return actions


def call_view(call: SimCall) -> JSON:
    """A call as the control API shows it."""
    return {
        "id": call.id,
        "status": call.status,
        "direction": call.direction,
        "source": call.source,
        "destination": call.destination,
        "hangup_by": call.hangup_by,
        "hangup_reason": call.hangup_reason,
        "conversation": [line.to_json() for line in call.conversation],
        "transfers": call.transfers,
        "confbridge_id": call.confbridge_id,
        "master_call_id": call.master_call_id,
        "chained_call_ids": list(call.chained_call_ids),
        "on_hold": call.moh,
    }


def _is_loopback(remote: str | None) -> bool:
    if not remote:
        return False
    try:
        return ipaddress.ip_address(remote.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


class ControlApi:
    """Dispatches ``/_sim/`` requests to the :class:`Simulator`'s Python API."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim
        self.bench = BenchApi(sim)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Serve one control request."""
        # The control API has no auth: it must never be reachable from another host.
        if not _is_loopback(request.remote):
            return web.json_response({"error": "loopback only"}, status=403)
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else {}
        except ValueError:
            return web.json_response({"error": "invalid JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be an object"}, status=400)
        parts = [p for p in request.path.split("/") if p][1:]
        try:
            result = await self._route(request.method.upper(), parts, body)
        except (ControlError, BenchError) as exc:
            return web.json_response({"error": str(exc)}, status=400)
        except (TypeError, ValueError) as exc:
            return web.json_response({"error": f"bad value: {exc}"}, status=400)
        except KeyError:
            return web.json_response({"error": "not found"}, status=404)
        if result is None:
            return web.json_response({"error": "no such control route"}, status=404)
        return web.json_response(result)

    def _platform(self, method: str, parts: list[str], body: JSON) -> Any:
        """Flows, confbridges and transfers; :data:`_NO_ROUTE` for anything else."""
        sim = self.sim
        match method, parts:
            case "POST", ["flows"]:
                return {
                    "id": sim.create_flow(_actions_from(body), customer_id=body.get("customer_id"))
                }
            case "GET", ["flows"]:
                return [
                    {"id": f.id, "customer_id": f.customer_id, "actions": f.actions}
                    for f in sim.flows.values()
                ]
            case "GET", ["confbridges"]:
                return [cb.to_json() for cb in sim.confbridges.values()]
            case "GET", ["transfers"]:
                return list(sim.transfers.values())
        return _NO_ROUTE

    async def _route(self, method: str, parts: list[str], body: JSON) -> Any:
        sim = self.sim
        platform = self._platform(method, parts, body)
        if platform is not _NO_ROUTE:
            return platform
        match method, parts:
            case "POST", ["bench", *rest]:
                return await self.bench.route(rest, body)
            case "GET", ["info"]:
                return {
                    "api_url": sim.api_url,
                    "ws_url": sim.ws_url,
                    "customer_id": sim.customer_id,
                    "accesskey": sim.accesskey,
                    "token": sim.make_token(),
                    "agent_token": sim.make_token(admin=False),
                }
            case "POST", ["calls"]:
                flow_id = body.get("flow_id")
                call_id = sim.inbound_call(
                    source=str(body.get("source", "+15550001111")),
                    destination=str(body.get("destination", "+15551234567")),
                    caller=_caller_from(body),
                    answer_after_s=float(body.get("answer_after_s", 0.0)),
                    flow_id=str(flow_id) if flow_id is not None else None,
                )
                return {"id": call_id}
            case "GET", ["calls"]:
                return [call_view(c) for c in sim.calls.values()]
            case "GET", ["calls", call_id]:
                return call_view(sim.get_call(call_id))
            case "POST", ["calls", call_id, "hangup"]:
                await sim.hangup(call_id, by=str(body.get("by", "remote")))
                return call_view(sim.get_call(call_id))
            case "GET", ["requests"]:
                return [r.to_json() for r in sim.requests]
            case "GET", ["leaks"]:
                return sim.leaks()
            case "POST", ["faults"]:
                await self._faults(body)
                return {"ok": True}
            case "POST", ["outbound"]:
                result = body.get("result", "answer")
                if result not in _OUTCOMES:
                    raise ControlError(f"result must be one of {_OUTCOMES}")
                outcome = Outcome(
                    result=result,
                    ring_after_s=float(body.get("ring_after_s", 0.05)),
                    answer_after_s=float(body.get("answer_after_s", 0.1)),
                )
                dest = body.get("destination")
                sim.on_outbound(outcome, _caller_from(body), str(dest) if dest else None)
                return {"ok": True}
        return None

    async def _faults(self, body: JSON) -> None:
        faults = self.sim.faults
        if "seed" in body:
            faults.seed(int(body["seed"]))
        if "duplicate_rate" in body:
            faults.duplicate_rate = float(body["duplicate_rate"])
        if "lose_rate" in body:
            faults.lose_rate = float(body["lose_rate"])
        if "reorder" in body:
            faults.reorder = bool(body["reorder"])
        if "jitter_s" in body:
            faults.jitter_s = float(body["jitter_s"])
        action = body.get("action")
        if action is None:
            return
        if action == "drop_websockets":
            faults.drop_websockets()
        elif action == "expire_tokens":
            faults.expire_tokens()
        elif action == "fail":
            retry = body.get("retry_after")
            faults.fail(
                str(body["method"]),
                str(body["path_regex"]),
                int(body["status"]),
                int(body.get("count", 1)),
                float(retry) if retry is not None else None,
                apply=bool(body.get("apply", False)),
            )
        elif action == "delay":
            faults.delay(
                str(body["method"]),
                str(body["path_regex"]),
                float(body["seconds"]),
                int(body.get("count", 1)),
            )
        elif action == "refuse_ws":
            faults.refuse_ws(int(body.get("status", 503)), int(body.get("count", 1)))
        elif action == "send_raw":
            await faults.send_raw(str(body["frame"]))
        else:
            raise ControlError(f"unknown fault action {action!r}")
