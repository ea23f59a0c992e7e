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
import uuid

from aiohttp import web

from agentd.sim.calls import clean_address
from agentd.sim.clock import go_time
from agentd.sim.errors import ApiError
from agentd.sim.model import JSON, NIL_UUID, SimCall, SimGroupcall, new_id
from agentd.sim.rest_core import (
    PERMISSION_DENIED_MESSAGE,
    Handler,
    Req,
    Result,
    admin_only,
    paginate,
    path_id,
    require_admin,
)
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
        """``(method, path regex, handler)`` for every ``/v1.0`` route except the WebSocket.

        Every one needs customer-admin rights (``bin-api-manager/pkg/servicehandler/call.go``,
        ``transcribe.go``, ``transcript.go``, ``speaking.go``, ``transfer.go``,
        ``customer.go`` ``CustomerSelfGet``): the calls, customer and transfer handlers check
        it where the server does, the speech ones before they run.
        """
        speech: list[tuple[str, str, Handler]] = [
            ("POST", r"/v1\.0/transcribes", self.post_transcribes),
            ("GET", r"/v1\.0/transcribes", self.list_transcribes),
            ("GET", r"/v1\.0/transcribes/(?P<id>[^/]+)", self.get_transcribe),
            ("DELETE", r"/v1\.0/transcribes/(?P<id>[^/]+)", self.delete_transcribe),
            ("POST", r"/v1\.0/transcribes/(?P<id>[^/]+)/stop", self.stop_transcribe),
            ("GET", r"/v1\.0/transcripts", self.list_transcripts),
            ("POST", r"/v1\.0/speakings", self.post_speakings),
            ("GET", r"/v1\.0/speakings", self.list_speakings),
            ("GET", r"/v1\.0/speakings/(?P<id>[^/]+)", self.get_speaking),
            ("DELETE", r"/v1\.0/speakings/(?P<id>[^/]+)", self.delete_speaking),
            ("POST", r"/v1\.0/speakings/(?P<id>[^/]+)/say", self.say),
            ("POST", r"/v1\.0/speakings/(?P<id>[^/]+)/flush", self.flush),
            ("POST", r"/v1\.0/speakings/(?P<id>[^/]+)/stop", self.stop_speaking),
        ]
        return [
            ("GET", r"/v1\.0/customer", self.get_customer),
            ("POST", r"/v1\.0/calls", self.post_calls),
            ("GET", r"/v1\.0/calls", self.list_calls),
            ("GET", r"/v1\.0/calls/(?P<id>[^/]+)", self.get_call),
            ("DELETE", r"/v1\.0/calls/(?P<id>[^/]+)", self.delete_call),
            ("POST", r"/v1\.0/calls/(?P<id>[^/]+)/hangup", self.hangup_call),
            *((m, p, admin_only(h)) for m, p, h in speech),
            ("POST", r"/v1\.0/transfers", self.post_transfers),
        ]

    # -- auth -------------------------------------------------------------------------------------

    async def login(self, req: Req) -> web.Response:
        """``POST /auth/login``: a JWT, or a bare 400 (no envelope) on any failure.

        Two agents: ``username`` (CustomerAdmin) and ``agent_username`` (CustomerAgent only).
        """
        try:
            body = json.loads(req.raw_body) if req.raw_body else None
        except ValueError:
            body = None
        settings = self.world.settings
        users = {
            settings.username: (settings.password, True),
            settings.agent_username: (settings.agent_password, False),
        }
        name = body.get("username") if isinstance(body, dict) else None
        known = users.get(name) if isinstance(name, str) else None
        if known is None or not isinstance(body, dict) or body.get("password") != known[0]:
            return web.Response(status=400)
        token = self.auth.make_token(admin=known[1])
        resp = web.json_response({"username": name, "token": token})
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
        """``GET /customer``: the caller's customer (its ``id`` is the topic scope); 403 without
        customer-admin rights (``bin-api-manager/pkg/servicehandler/customer.go``,
        ``CustomerSelfGet``)."""
        require_admin(req)
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
        """``POST /calls``: tel/sip destinations -> ``calls``; agent/extension -> ``groupcalls``.

        ``bin-api-manager/pkg/servicehandler/call.go`` ``CallCreate``: permission first; a
        ``flow_id`` that is not a uuid counts as none (``server/calls.go``,
        ``uuid.FromStringOrNil``), and then the actions make a temporary flow; a given flow must
        exist (404 ``FLOW_NOT_FOUND``, ``bin-flow-manager/pkg/flowhandler/db.go``) and be the
        customer's (403).
        """
        require_admin(req)
        body = req.json()
        source = clean_address(body.get("source"))
        dests = body.get("destinations")
        if not isinstance(dests, list) or not dests:
            raise ApiError(400, "INVALID_ARGUMENT", "destinations must be a non-empty list.")
        flow_id = _uuid_or_nil(body.get("flow_id"))
        if flow_id != NIL_UUID:
            actions = self._flow_actions(flow_id)
        else:
            flow_id = ""
            actions = _inline_actions(body.get("actions"))
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

    def _flow_actions(self, flow_id: str) -> list[JSON]:
        """The actions of the customer's flow ``flow_id`` (404 unknown, 403 not ours)."""
        flow = self.calls.flows.get(flow_id)
        if flow is None:
            raise ApiError(404, "FLOW_NOT_FOUND", "The flow was not found.")
        if flow.deleted:
            raise ApiError(404, "RESOURCE_NOT_FOUND")
        if flow.customer_id != self.world.customer_id:
            raise ApiError(403, "PERMISSION_DENIED", PERMISSION_DENIED_MESSAGE)
        return [dict(a) for a in flow.actions]

    async def list_calls(self, req: Req) -> Result:
        """``GET /calls``: the customer's calls not deleted (``CallList`` filters
        ``deleted: false``)."""
        require_admin(req)
        calls = [c for c in self.world.calls.values() if c.tm_delete is None]
        return 200, paginate(calls, lambda c: c.tm_create, req.query)

    def _undeleted_call(self, call_id: str) -> SimCall:
        """``callGet`` (``bin-api-manager/pkg/servicehandler/call.go``), behind ``GET``,
        ``DELETE`` and ``/hangup`` of a call: 404 unknown, **409 ``STATE_INVALID`` once
        deleted** (``ErrStateInvalid``, ``server/error_translate.go``)."""
        call = self._call(call_id)
        if call.tm_delete is not None:
            raise ApiError(
                409,
                "STATE_INVALID",
                "The operation is invalid for the current resource state.",
                status="FAILED_PRECONDITION",
            )
        return call

    async def get_call(self, req: Req) -> Result:
        """``GET /calls/{id}``: 404 (409 deleted) before 403 (``CallGet`` fetches, then
        checks)."""
        call = self._undeleted_call(path_id(req))
        require_admin(req)
        return 200, call.to_json()

    async def delete_call(self, req: Req) -> Result:
        """``DELETE /calls/{id}``: a call not over yet is hung up first (``call_terminating``,
        or ``call_canceling`` before an outgoing answer), then deleted at once with
        ``call_deleted``: that event, and the answer, still say ``terminating``; its
        ``call_hangup`` follows when the channel is gone (``bin-call-manager/pkg/callhandler/
        call.go`` ``Delete``, ``db.go`` ``dbDelete``)."""
        call = self._undeleted_call(path_id(req))
        require_admin(req)
        self.calls.hangup_local(call)
        call.tm_delete = call.tm_update = self.world.clock.now()
        self.world.emit("call_deleted", call.to_json())
        return 200, call.to_json()

    async def hangup_call(self, req: Req) -> Result:
        """``POST /calls/{id}/hangup``: idempotent (409 once deleted); answers the immediate
        snapshot."""
        call = self._undeleted_call(path_id(req))
        require_admin(req)
        self.calls.hangup_local(call)
        return 200, call.to_json()

    # -- transfers --------------------------------------------------------------------------------

    async def post_transfers(self, req: Req) -> Result:
        """``POST /transfers`` (``bin-api-manager/server/transfers.go``,
        ``pkg/servicehandler/transfer.go``): the transferer call is fetched (a missing or bad id
        is the nil uuid: 404), permission is checked, then the transfer manager decides
        (:meth:`~agentd.sim.calls.Calls.start_transfer`: 500 unless the call is in a confbridge).
        Neither checks ``transfer_type`` nor the addresses before that."""
        body = req.json()
        kind = body.get("transfer_type", "")
        addrs = body.get("transferee_addresses")
        if addrs is None:
            addrs = []
        # gin's BindJSON into the generated struct refuses other JSON types.
        if not isinstance(kind, str) or not isinstance(addrs, list):
            raise ApiError(400, "INVALID_JSON_BODY")
        call = self._transferer(body.get("transferer_call_id"))
        require_admin(req)
        return 200, self.calls.start_transfer(kind, call, addrs)

    def _transferer(self, raw: object) -> SimCall:
        call_id = _uuid_or_nil(raw)
        if call_id == NIL_UUID:
            raise ApiError(404, "CALL_NOT_FOUND")
        return self._call(call_id)


def _uuid_or_nil(value: object) -> str:
    """Go's ``uuid.FromStringOrNil``: anything that is not a uuid is the nil uuid."""
    if not isinstance(value, str):
        return NIL_UUID
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return NIL_UUID


def _inline_actions(raw: object) -> list[JSON]:
    """The actions of a temporary flow; none = an empty flow (hung up right after answer)."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not raw:
        raise ApiError(400, "INVALID_ARGUMENT", "actions must be a non-empty list.")
    if not all(isinstance(a, dict) for a in raw):
        raise ApiError(400, "INVALID_ARGUMENT", "actions must be objects.")
    return [dict(a) for a in raw]


def compile_routes(
    routes: list[tuple[str, str, Handler]],
) -> list[tuple[str, re.Pattern[str], Handler]]:
    """Anchor the route regexes."""
    return [(m, re.compile(f"^{p}$"), h) for m, p, h in routes]
