"""What every REST handler shares: the request, ids, paging, and the simulator state it acts on.

`agentd.sim.rest.RestApi` is this core plus the route groups: the speech routes
(:mod:`agentd.sim.rest_speech`) and the calls, customer, transfers and login routes (rest.py).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar

from aiohttp import web

from agentd.sim.auth import Authenticator, Identity
from agentd.sim.calls import Calls
from agentd.sim.clock import fixed_time, parse_fixed_time
from agentd.sim.errors import ApiError
from agentd.sim.model import JSON, SimCall
from agentd.sim.speech import Speech
from agentd.sim.state import World

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


def uuid_or(value: Any, status: int, reason: str, what: str) -> str:
    if not isinstance(value, str):
        raise ApiError(status, reason, f"{what} is not a valid UUID.")
    try:
        return str(uuid.UUID(value))
    except ValueError as exc:
        raise ApiError(status, reason, f"{what} is not a valid UUID.") from exc


def path_id(req: Req) -> str:
    """The ``{id}`` path parameter; 400 ``INVALID_ID`` when it is not a uuid."""
    return uuid_or(req.params["id"], 400, "INVALID_ID", "id")


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


def require_admin(req: Req) -> None:
    """403 unless the caller has customer-admin rights (``bin-api-manager/pkg/servicehandler/
    etc.go`` ``hasPermission`` with CustomerAdmin|CustomerManager; an access key always has
    them, ``models/auth/auth.go``)."""
    if req.identity is not None and not req.identity.customer_admin:
        raise ApiError(403, "PERMISSION_DENIED", PERMISSION_DENIED_MESSAGE)


#: ``bin-api-manager/server/error_translate.go`` for ``serviceerrors.ErrPermissionDenied``.
PERMISSION_DENIED_MESSAGE = "You do not have permission to access this resource."


def admin_only(handler: Handler) -> Handler:
    """``handler`` behind :func:`require_admin` (checked before the handler runs)."""

    async def gated(req: Req) -> Result:
        require_admin(req)
        return await handler(req)

    return gated


class RestCore:
    """The simulator's state, bound for the handlers, and the lookups they share."""

    def __init__(self, world: World, calls: Calls, speech: Speech, auth: Authenticator) -> None:
        self.world = world
        self.calls = calls
        self.speech = speech
        self.auth = auth
        self.customer_tm_create = world.clock.now()

    def _call(self, call_id: str) -> SimCall:
        call = self.world.calls.get(call_id)
        if call is None:
            raise ApiError(404, "CALL_NOT_FOUND")
        return call
