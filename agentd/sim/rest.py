"""REST handlers under ``/v1.0`` (and the root ``/auth/login``), as the server code behaves.

Handlers return ``(http_status, json)`` or raise :class:`~agentd.sim.errors.ApiError`; the
dispatcher in :mod:`agentd.sim.server` does routing, auth, rate limiting, faults and recording.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from aiohttp import web

from agentd.sim.auth import Authenticator, Identity
from agentd.sim.calls import INBOUND_FLOW, Calls, clean_address
from agentd.sim.clock import fixed_time, go_time, parse_fixed_time
from agentd.sim.errors import ApiError
from agentd.sim.model import (
    JSON,
    NIL_UUID,
    SimCall,
    SimGroupcall,
    SimSpeaking,
    SimTranscribe,
    new_id,
)
from agentd.sim.speech import Speech
from agentd.sim.state import World

#: Go's ``len(text)`` limit on ``/say`` (bytes, not characters).
SAY_MAX_BYTES = 5000
_MAX_PAGE = 100


class _Listable(Protocol):
    def to_json(self) -> JSON: ...


T = TypeVar("T", bound=_Listable)


@dataclass
class Req:
    """What a handler gets: the request, path parameters, parsed body and identity."""

    request: web.Request
    params: dict[str, str]
    raw_body: bytes
    identity: Identity | None

    def json(self) -> JSON:
        """The JSON object body; 400 ``INVALID_JSON_BODY`` otherwise."""
        try:
            body = json.loads(self.raw_body) if self.raw_body else None
        except ValueError:
            body = None
        if not isinstance(body, dict):
            raise ApiError(400, "INVALID_JSON_BODY")
        return body

    @property
    def query(self) -> dict[str, str]:
        """Query parameters (last value wins)."""
        return dict(self.request.query)


Result = tuple[int, Any]
Handler = Callable[[Req], Awaitable[Result]]


def _uuid_or(value: Any, status: int, reason: str, what: str) -> str:
    if not isinstance(value, str):
        raise ApiError(status, reason, f"{what} is not a valid UUID.")
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise ApiError(status, reason, f"{what} is not a valid UUID.") from exc


def path_id(req: Req) -> str:
    """The ``{id}`` path parameter; 400 ``INVALID_ID`` when it is not a uuid."""
    return _uuid_or(req.params["id"], 400, "INVALID_ID", "id")


def paginate(items: Sequence[T], created: Callable[[T], datetime], query: dict[str, str]) -> JSON:
    """``{"result", "next_page_token"}``: newest first, ``page_token`` = strictly older."""
    raw_size = query.get("page_size", "")
    try:
        size = int(raw_size) if raw_size else _MAX_PAGE
    except ValueError as exc:
        raise ApiError(400, "INVALID_REQUEST_PARAMETER", "page_size must be an integer.") from exc
    if size <= 0 or size > _MAX_PAGE:
        size = _MAX_PAGE
    rows = sorted(items, key=created, reverse=True)
    token = query.get("page_token", "")
    if token:
        cutoff = parse_fixed_time(token)
        rows = [r for r in rows if cutoff is not None and created(r) < cutoff]
    page = rows[:size]
    return {
        "result": [r.to_json() for r in page],
        "next_page_token": fixed_time(created(page[-1])) if page else "",
    }


class RestApi:
    """The handlers, bound to the simulator's state."""

    def __init__(self, world: World, calls: Calls, speech: Speech, auth: Authenticator) -> None:
        self.world = world
        self.calls = calls
        self.speech = speech
        self.auth = auth
        self.customer_tm_create = world.clock.now()

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

    def _call(self, call_id: str) -> SimCall:
        call = self.world.calls.get(call_id)
        if call is None:
            raise ApiError(404, "CALL_NOT_FOUND")
        return call

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
            flow_id = _uuid_or(flow_id, 400, "INVALID_ARGUMENT", "flow_id")
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

    # -- transcribes ------------------------------------------------------------------------------

    def _transcribe(self, trn_id: str) -> SimTranscribe:
        trn = self.world.transcribes.get(trn_id)
        if trn is None:
            raise ApiError(404, "TRANSCRIBE_NOT_FOUND")
        return trn

    async def post_transcribes(self, req: Req) -> Result:
        """``POST /transcribes``: 200 ``progressing``; 409 when one runs for the call+language."""
        body = req.json()
        ref_type = body.get("reference_type")
        if ref_type not in ("call", "conference", "recording"):
            # The spec's `confbridge` is refused by the handler (it wants `conference`).
            raise ApiError(400, "INVALID_ARGUMENT", "reference_type is invalid.")
        ref_id = _uuid_or(body.get("reference_id"), 400, "INVALID_ARGUMENT", "reference_id")
        language = body.get("language")
        if not isinstance(language, str) or not language:
            raise ApiError(400, "INVALID_ARGUMENT", "language is required.")
        direction = body.get("direction")
        if direction not in ("both", "in", "out"):
            direction = "both"
        provider = body.get("provider", "")
        if provider not in ("", "gcp", "aws"):
            raise ApiError(400, "INVALID_ARGUMENT", "provider is invalid.")
        if ref_type != "call":
            raise ApiError(404, "RESOURCE_NOT_FOUND")
        call = self._call(ref_id)
        if call.status not in ("dialing", "ringing", "progressing"):
            raise ApiError(500, "INTERNAL")
        for trn in self.world.transcribes_of(call.id):
            if trn.status == "progressing" and trn.language == language:
                raise ApiError(409, "TRANSCRIBE_ALREADY_PROGRESSING", status="ALREADY_EXISTS")
        trn = self.speech.start_transcribe(call, language, str(direction), str(provider))
        return 200, trn.to_json()

    async def list_transcribes(self, req: Req) -> Result:
        """``GET /transcribes`` (``reference_type`` and ``reference_id``: both or neither)."""
        query = req.query
        ref_type = query.get("reference_type", "")
        ref_id = query.get("reference_id", "")
        if bool(ref_type) != bool(ref_id):
            raise ApiError(
                400,
                "INVALID_REFERENCE_FILTER",
                "reference_type and reference_id must be given together.",
            )
        items = list(self.world.transcribes.values())
        if ref_type:
            items = [t for t in items if t.reference_type == ref_type and t.reference_id == ref_id]
        return 200, paginate(items, lambda t: t.tm_create, query)

    async def get_transcribe(self, req: Req) -> Result:
        """``GET /transcribes/{id}``."""
        return 200, self._transcribe(path_id(req)).to_json()

    async def stop_transcribe(self, req: Req) -> Result:
        """``POST /transcribes/{id}/stop`` (idempotent)."""
        trn = self._transcribe(path_id(req))
        self.speech.stop_transcribe(trn)
        return 200, trn.to_json()

    async def list_transcripts(self, req: Req) -> Result:
        """``GET /transcripts?transcribe_id=``: paging honoured (since 2026-09), newest first."""
        query = req.query
        raw = query.get("transcribe_id", "")
        if not raw:
            raise ApiError(400, "MISSING_REQUEST_PARAMETER", "transcribe_id is required.")
        trn_id = _uuid_or(raw, 400, "INVALID_REQUEST_PARAMETER", "transcribe_id")
        self._transcribe(trn_id)
        items = [t for t in self.world.transcripts.values() if t.transcribe_id == trn_id]
        return 200, paginate(items, lambda t: t.tm_create, query)

    # -- speakings --------------------------------------------------------------------------------

    def _speaking(self, spk_id: str) -> SimSpeaking:
        spk = self.world.speakings.get(spk_id)
        if spk is None:
            raise ApiError(404, "RESOURCE_NOT_FOUND")
        return spk

    async def post_speakings(self, req: Req) -> Result:
        """``POST /speakings``: 201 ``active``; 500 on a second live session or a dead call."""
        body = req.json()
        ref_type = body.get("reference_type")
        if ref_type not in ("call", "confbridge"):
            raise ApiError(400, "INVALID_ARGUMENT", "reference_type is invalid.")
        ref_id = _uuid_or(body.get("reference_id"), 400, "INVALID_ARGUMENT", "reference_id")
        direction = body.get("direction", "")
        if direction not in ("", "in", "out", "both"):
            raise ApiError(400, "INVALID_ARGUMENT", "direction is invalid.")
        strings = {}
        for key in ("language", "provider", "voice_id"):
            value = body.get(key, "")
            if not isinstance(value, str):
                raise ApiError(400, "INVALID_ARGUMENT", f"{key} must be a string.")
            strings[key] = value
        # tts-manager answers a bare 500 for everything below (the gateway maps it to INTERNAL).
        call = self.world.calls.get(ref_id) if ref_type == "call" else None
        if call is None or call.status in ("hangup", "terminating", "canceling"):
            raise ApiError(500, "INTERNAL")
        if any(s.status in ("initiating", "active") for s in self.world.speakings_of(ref_id)):
            raise ApiError(500, "INTERNAL")
        spk = self.speech.create_speaking(
            call, strings["language"], strings["provider"], strings["voice_id"], str(direction)
        )
        return 201, spk.to_json()

    async def list_speakings(self, req: Req) -> Result:
        """``GET /speakings``: the ``{result, next_page_token}`` shape (the spec says an array)."""
        items = [s for s in self.world.speakings.values() if s.tm_delete is None]
        return 200, paginate(items, lambda s: s.tm_create, req.query)

    async def get_speaking(self, req: Req) -> Result:
        """``GET /speakings/{id}``."""
        return 200, self._speaking(path_id(req)).to_json()

    async def delete_speaking(self, req: Req) -> Result:
        """``DELETE /speakings/{id}``: stops first, then soft-deletes."""
        spk = self._speaking(path_id(req))
        self.speech.stop(spk)
        if spk.tm_delete is None:
            spk.tm_delete = self.world.clock.now()
        return 200, spk.to_json()

    async def say(self, req: Req) -> Result:
        """``POST /speakings/{id}/say``: queue; 404 unless active; 400 empty or > 5,000 bytes."""
        spk = self._speaking(path_id(req))
        body = req.json()
        text = body.get("text")
        if not isinstance(text, str) or not text:
            raise ApiError(400, "INVALID_ARGUMENT", "text is required.")
        if len(text.encode("utf-8")) > SAY_MAX_BYTES:
            raise ApiError(400, "INVALID_ARGUMENT", "text exceeds the 5000 character limit.")
        if spk.status != "active":
            raise ApiError(404, "RESOURCE_NOT_FOUND")
        before = spk.to_json()
        self.speech.say(spk, text)
        return 200, before

    async def flush(self, req: Req) -> Result:
        """``POST /speakings/{id}/flush``: provider-dependent; 404 unless active."""
        spk = self._speaking(path_id(req))
        if spk.status != "active":
            raise ApiError(404, "RESOURCE_NOT_FOUND")
        self.speech.flush(spk)
        return 200, spk.to_json()

    async def stop_speaking(self, req: Req) -> Result:
        """``POST /speakings/{id}/stop``: silences at once; idempotent."""
        spk = self._speaking(path_id(req))
        self.speech.stop(spk)
        return 200, spk.to_json()

    # -- transfers --------------------------------------------------------------------------------

    async def post_transfers(self, req: Req) -> Result:
        """``POST /transfers``: recorded on the call; the far end is connected to the addresses."""
        body = req.json()
        kind = body.get("transfer_type")
        if kind not in ("blind", "attended"):
            raise ApiError(400, "INVALID_ARGUMENT", "transfer_type is invalid.")
        call_id = _uuid_or(
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
