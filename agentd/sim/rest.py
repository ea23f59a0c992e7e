"""REST handlers under ``/v1.0`` (and the root ``/auth/login``), as the server code behaves.

Handlers return ``(http_status, json)`` or raise :class:`~agentd.sim.errors.ApiError`; the
dispatcher, :meth:`agentd.sim.simulator.Simulator._dispatch`, does routing (over the table
:func:`compile_routes` builds), auth, rate limiting, faults and recording.

This module holds the route table and the login, customer, calls and transfers handlers; the
transcribe, transcript and speaking handlers are in :mod:`agentd.sim.rest_speech`, and what every
handler shares (:class:`Req`, paging, id checks, the state) in :mod:`agentd.sim.rest_core`.
"""

from __future__ import annotations

import json
import re

from aiohttp import web

from agentd.sim.calls import INBOUND_FLOW, clean_address
from agentd.sim.clock import go_time
from agentd.sim.errors import ApiError
from agentd.sim.model import JSON, NIL_UUID, SimGroupcall, new_id
from agentd.sim.rest_core import Handler, Req, Result, paginate, path_id, uuid_or
from agentd.sim.rest_speech import SAY_MAX_BYTES, SpeechRoutes

__all__ = [
    "SAY_MAX_BYTES",
    "Handler",
    "Req",
    "RestApi",
    "Result",
    "compile_routes",
    "paginate",
    "path_id",
]


class RestApi(SpeechRoutes):
    """The handlers, bound to the simulator's state (the speech ones come from SpeechRoutes)."""

    def routes(self) -> list[tuple[str, str, Handler]]:
        """``(method, path regex, handler)`` for every ``/v1.0`` route except the WebSocket."""
        return [
            ("GET", r"/v1\.0/customer", self.get_customer),
            ("POST", r"/v1\.0/calls", self.post_calls),
            ("GET", r"/v1\.0/calls", self.list_calls),
            ("GET", r"/v1\.0/calls/(?P<id>[^/]+)", self.get_call),
            ("POST", r"/v1\.0/calls/(?P<id>[^/]+)/hangup", self.hangup_call),
            ("POST", r"/v1\.0/transcribes", self.post_transcribes),
            ("GET", r"/v1\.0/transcribes", self.list_transcribes),
            ("GET", r"/v1\.0/transcribes/(?P<id>[^/]+)", self.get_transcribe),
            ("POST", r"/v1\.0/transcribes/(?P<id>[^/]+)/stop", self.stop_transcribe),
            ("GET", r"/v1\.0/transcripts", self.list_transcripts),
            ("POST", r"/v1\.0/speakings", self.post_speakings),
            ("GET", r"/v1\.0/speakings", self.list_speakings),
            ("GET", r"/v1\.0/speakings/(?P<id>[^/]+)", self.get_speaking),
            ("DELETE", r"/v1\.0/speakings/(?P<id>[^/]+)", self.delete_speaking),
            ("POST", r"/v1\.0/speakings/(?P<id>[^/]+)/say", self.say),
            ("POST", r"/v1\.0/speakings/(?P<id>[^/]+)/flush", self.flush),
            ("POST", r"/v1\.0/speakings/(?P<id>[^/]+)/stop", self.stop_speaking),
            ("POST", r"/v1\.0/transfers", self.post_transfers),
        ]

    # -- auth -------------------------------------------------------------------------------------

    async def login(self, req: Req) -> web.Response:
        """``POST /auth/login``: a JWT, or a bare 400 (no envelope) on any failure."""
        try:
            body = json.loads(req.raw_body) if req.raw_body else None
        except ValueError:
            body = None
        settings = self.world.settings
        if (
            not isinstance(body, dict)
            or body.get("username") != settings.username
            or body.get("password") != settings.password
        ):
            return web.Response(status=400)
        token = self.auth.make_token()
        resp = web.json_response({"username": settings.username, "token": token})
        resp.set_cookie(
            "token",
            token,
            max_age=int(settings.token_ttl_s),
            path="/",
            secure=True,
            httponly=True,
            samesite="Strict",
        )
        return resp

    # -- customer ---------------------------------------------------------------------------------

    async def get_customer(self, req: Req) -> Result:
        """``GET /customer``: the caller's customer (its ``id`` is the topic scope)."""
        tm = go_time(self.customer_tm_create)
        return 200, {
            "id": self.world.customer_id,
            "name": "agentd simulator",
            "detail": "local VoIPBIN simulator",
            "email": "sim@example.com",
            "phone_number": "+15550000000",
            "address": "",
            "webhook_method": "",
            "webhook_uri": "",
            "billing_account_id": NIL_UUID,
            "metadata": {"rtp_debug": False},
            "email_verified": True,
            "status": "active",
            "identity_verification_status": "verified",
            "tm_create": tm,
            "tm_update": tm,
        }

    # -- calls ------------------------------------------------------------------------------------

    async def post_calls(self, req: Req) -> Result:
        """``POST /calls``: tel/sip destinations -> ``calls``; agent/extension -> ``groupcalls``."""
        body = req.json()
        source = clean_address(body.get("source"))
        dests = body.get("destinations")
        if not isinstance(dests, list) or not dests:
            raise ApiError(400, "INVALID_ARGUMENT", "destinations must be a non-empty list.")
        flow_id = body.get("flow_id")
        raw_actions = body.get("actions")
        if flow_id:
            flow_id = uuid_or(flow_id, 400, "INVALID_ARGUMENT", "flow_id")
            # A flow we do not model: behave like a flow that keeps the call up.
            actions: list[JSON] = [dict(a) for a in INBOUND_FLOW]
        elif raw_actions is not None:
            if not isinstance(raw_actions, list) or not raw_actions:
                raise ApiError(400, "INVALID_ARGUMENT", "actions must be a non-empty list.")
            if not all(isinstance(a, dict) for a in raw_actions):
                raise ApiError(400, "INVALID_ARGUMENT", "actions must be objects.")
            actions = [dict(a) for a in raw_actions]
        else:
            # An empty temporary flow: the call is hung up right after answer.
            actions = []
        calls: list[JSON] = []
        groupcalls: list[JSON] = []
        for raw in dests:
            dest = clean_address(raw)
            kind = dest.get("type", "")
            if kind in ("tel", "sip"):
                call = self.calls.create_outbound(source, dest, actions, None)
                if flow_id:
                    call.flow_id = flow_id
                calls.append(call.to_json())
            elif kind in ("agent", "extension"):
                gc = SimGroupcall(
                    id=new_id(),
                    customer_id=self.world.customer_id,
                    source=source,
                    destinations=[dest],
                    flow_id=flow_id or new_id(),
                    call_ids=[],
                    status="progressing",
                    tm_create=self.world.clock.now(),
                )
                self.world.groupcalls[gc.id] = gc
                call = self.calls.create_outbound(source, dest, actions, gc)
                gc.call_ids.append(call.id)
                self.world.emit("groupcall_created", gc.to_json())
                groupcalls.append(gc.to_json())
        if not calls and not groupcalls:
            raise ApiError(500, "INTERNAL", "Could not create any call.")
        return 200, {"calls": calls, "groupcalls": groupcalls}

    async def list_calls(self, req: Req) -> Result:
        """``GET /calls``."""
        return 200, paginate(list(self.world.calls.values()), lambda c: c.tm_create, req.query)

    async def get_call(self, req: Req) -> Result:
        """``GET /calls/{id}``."""
        return 200, self._call(path_id(req)).to_json()

    async def hangup_call(self, req: Req) -> Result:
        """``POST /calls/{id}/hangup``: idempotent; answers the immediate snapshot."""
        call = self._call(path_id(req))
        self.calls.hangup_local(call)
        return 200, call.to_json()

    # -- transfers --------------------------------------------------------------------------------

    async def post_transfers(self, req: Req) -> Result:
        """``POST /transfers``: recorded on the call; the far end is connected to the addresses."""
        body = req.json()
        kind = body.get("transfer_type")
        if kind not in ("blind", "attended"):
            raise ApiError(400, "INVALID_ARGUMENT", "transfer_type is invalid.")
        call_id = uuid_or(
            body.get("transferer_call_id"), 400, "INVALID_ARGUMENT", "transferer_call_id"
        )
        addrs = body.get("transferee_addresses")
        if not isinstance(addrs, list) or not addrs:
            raise ApiError(400, "INVALID_ARGUMENT", "transferee_addresses must be non-empty.")
        call = self._call(call_id)
        if call.status != "progressing":
            raise ApiError(409, "STATE_INVALID", status="FAILED_PRECONDITION")
        now = go_time(self.world.clock.now())
        transfer: JSON = {
            "id": new_id(),
            "customer_id": self.world.customer_id,
            "type": kind,
            "transferer_call_id": call.id,
            "transferee_addresses": [clean_address(a) for a in addrs],
            "transferee_call_id": NIL_UUID,
            "groupcall_id": new_id(),
            "confbridge_id": NIL_UUID,
            "tm_create": now,
            "tm_update": now,
        }
        self.world.transfers[transfer["id"]] = transfer
        call.transfers.append(transfer)
        self.world.notify()
        return 200, transfer


def compile_routes(
    routes: list[tuple[str, str, Handler]],
) -> list[tuple[str, re.Pattern[str], Handler]]:
    """Anchor the route regexes."""
    return [(m, re.compile(f"^{p}$"), h) for m, p, h in routes]
