"""The :class:`Simulator`: one aiohttp server (loopback) with the REST API, the WebSocket and the
``/_sim/`` control API, plus the Python control surface tests use."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from types import TracebackType
from typing import Any

import structlog
from aiohttp import web

from agentd.sim.auth import Authenticator, AuthError
from agentd.sim.calls import Calls
from agentd.sim.control import ControlApi
from agentd.sim.errors import ApiError, error_response, request_id_for
from agentd.sim.faults import FailRule, Faults
from agentd.sim.model import (
    JSON,
    Caller,
    Outcome,
    SimCall,
    SimConfbridge,
    SimFlow,
    SimSpeaking,
    SimTranscribe,
    SimTranscript,
    new_id,
)
from agentd.sim.ratelimit import TokenBucket, retry_after_header
from agentd.sim.records import Request, matching, redact_body, redact_query
from agentd.sim.rest import Req, RestApi, compile_routes
from agentd.sim.settings import SimSettings
from agentd.sim.speech import Speech
from agentd.sim.state import World
from agentd.sim.webhook import Webhooks
from agentd.sim.ws import Hub, WsConnection

log = structlog.get_logger("agentd.sim")

WS_PATH = "/v1.0/ws"
LOGIN_PATH = "/auth/login"


class Simulator:
    """A local VoIPBIN: REST + WebSocket over loopback, with a scripted caller and fault knobs.

    Use ``async with Simulator(settings) as sim:`` or :meth:`start` / :meth:`stop`.
    """

    def __init__(self, settings: SimSettings | None = None) -> None:
        self.settings = settings or SimSettings()
        self.customer_id = new_id()
        self.agent_id = new_id()
        self.hub = Hub(self.customer_id, self.settings, notify=self._notify)
        #: Webhook delivery of every published event (off until a URL is set).
        self.webhooks = Webhooks()
        self.world = World(self.settings, self.customer_id, publish=self._publish)
        self.auth = Authenticator(
            self.customer_id,
            self.agent_id,
            self.settings.username,
            self.settings.token_ttl_s,
            plain_username=self.settings.agent_username,
        )
        self.speech = Speech(self.world)
        self.faults = Faults(
            self.hub.drop_all, self.auth.revoke_all, self.hub.send_raw, self.speech
        )
        self.hub.faults = self.faults
        self._calls = Calls(self.world, self.speech)
        self.rest = RestApi(self.world, self._calls, self.speech, self.auth)
        self._routes = compile_routes(self.rest.routes())
        self._bucket = TokenBucket(self.settings.rate_per_s, self.settings.burst)
        self._control = ControlApi(self)
        #: Every REST request served (not the ``/_sim/`` control API), oldest first.
        self.requests: list[Request] = []
        self._runner: web.AppRunner | None = None
        self._host = "127.0.0.1"
        self._port = 0

    def _publish(self, event_type: str, payload: JSON) -> None:
        self.hub.publish(event_type, payload)
        self.webhooks.offer(event_type, payload)

    def _notify(self) -> None:
        # The hub is built before the world exists; forward lazily.
        world = getattr(self, "world", None)
        if world is not None:
            world.notify()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        """Listen on ``host:port`` (port 0 = any free port)."""
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self._host = host
        self._port = int(self._runner.addresses[0][1])
        log.info("sim_started", api_url=self.api_url)

    async def stop(self) -> None:
        """Close every connection, cancel every timer, stop listening."""
        self.hub.drop_all()
        await self.world.cancel_all()
        await self.webhooks.close()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> Simulator:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- addresses and credentials ----------------------------------------------------------------

    @property
    def port(self) -> int:
        """The listening port."""
        return self._port

    @property
    def base_url(self) -> str:
        """``http://host:port``."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._port}"

    @property
    def api_url(self) -> str:
        """``base_url + "/v1.0"``."""
        return self.base_url + "/v1.0"

    @property
    def ws_url(self) -> str:
        """``ws://host:port/v1.0/ws``."""
        return "ws" + self.base_url[4:] + WS_PATH

    @property
    def accesskey(self) -> str:
        """A valid ``vb_...`` access key."""
        return self.auth.accesskey

    def make_token(self, ttl_s: float | None = None, *, admin: bool = True) -> str:
        """A JWT (HS256) valid for ``ttl_s`` seconds (default ``token_ttl_s``).

        ``admin=False``: the second agent's, with CustomerAgent permission only (403 on the
        customer's resources, dropped on customer topics).
        """
        return self.auth.make_token(ttl_s, admin=admin)

    @property
    def plain_agent_id(self) -> str:
        """The agent id of the second (non-admin) agent."""
        return self.auth.plain_agent_id

    # -- state ------------------------------------------------------------------------------------

    @property
    def calls(self) -> dict[str, SimCall]:
        """Every call by id."""
        return self.world.calls

    @property
    def speakings(self) -> dict[str, SimSpeaking]:
        """Every speaking session by id."""
        return self.world.speakings

    @property
    def transcribes(self) -> dict[str, SimTranscribe]:
        """Every transcribe session by id."""
        return self.world.transcribes

    @property
    def transcripts(self) -> dict[str, SimTranscript]:
        """Every transcript by id."""
        return self.world.transcripts

    @property
    def events(self) -> list[tuple[str, JSON]]:
        """Every published event ``(event_type, payload)``, in publication order."""
        return self.world.events

    @property
    def ws_connections(self) -> list[WsConnection]:
        """Open WebSocket connections (``.subscriptions``, ``.sent``, ``.dropped``)."""
        return self.hub.connections

    @property
    def flows(self) -> dict[str, SimFlow]:
        """Every flow by id."""
        return self._calls.flows

    @property
    def confbridges(self) -> dict[str, SimConfbridge]:
        """Every confbridge by id (made by ``connect`` actions)."""
        return self._calls.confbridges

    @property
    def transfers(self) -> dict[str, JSON]:
        """Every transfer by id, as ``POST /transfers`` answered it (kept up to date)."""
        return self.world.transfers

    def create_flow(self, actions: list[JSON], *, customer_id: str | None = None) -> str:
        """Store a flow (of another customer with ``customer_id``); returns its id."""
        return self._calls.create_flow(actions, customer_id).id

    def get_call(self, call_id: str) -> SimCall:
        """The call ``call_id`` (``KeyError`` if unknown)."""
        return self.world.calls[call_id]

    def requests_matching(self, method: str, path_regex: str) -> list[Request]:
        """Recorded requests with that method whose path matches ``path_regex`` (``re.search``)."""
        return matching(self.requests, method, path_regex)

    def leaks(self) -> list[JSON]:
        """Open sessions on ended calls: active/initiating speakings (not deleted by the
        client), progressing transcribes."""
        return self.world.leaks()

    def stranded(self) -> list[str]:
        """Speakings deleted by the client that still bill, their tts pod being dead."""
        return self.world.stranded()

    async def wait_for(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:  # noqa: ASYNC109 (public API)
        """Wait until ``predicate()`` holds (re-checked on every state change); ``TimeoutError``."""
        await self.world.wait_for(predicate, timeout)

    async def wait_call_status(self, call_id: str, status: str, timeout: float = 5.0) -> None:  # noqa: ASYNC109 (public API)
        """Wait until the call has ``status``."""
        await self.wait_for(
            lambda: call_id in self.world.calls and self.world.calls[call_id].status == status,
            timeout,
        )

    # -- calls ------------------------------------------------------------------------------------

    def inbound_call(
        self,
        source: str = "+15550001111",
        destination: str = "+15551234567",
        caller: Caller | None = None,
        answer_after_s: float = 0.0,
        flow_id: str | None = None,
    ) -> str:
        """Start an incoming call on a number whose flow is ``flow_id`` (default: answer + sleep
        1 h); returns its id."""
        flow = self._calls.flows[flow_id] if flow_id is not None else None
        return self._calls.create_inbound(source, destination, caller, answer_after_s, flow).id

    def on_outbound(
        self, outcome: Outcome, caller: Caller | None = None, destination: str | None = None
    ) -> None:
        """How the far end of every later ``POST /calls`` (to ``destination``, or any) behaves."""
        self._calls.set_outbound(outcome, caller, destination)

    async def hangup(self, call_id: str, by: str = "remote", timeout: float = 5.0) -> None:  # noqa: ASYNC109 (public API)
        """Hang the call up from the far end (``remote``) or our side (``local``); waits for it."""
        call = self.world.calls[call_id]
        if by == "local":
            self._calls.hangup_local(call)
        else:
            self._calls.hangup_remote(call)
        await self.wait_for(lambda: call.ended, timeout)

    async def caller_says(self, call_id: str, text: str) -> None:
        """Make the caller say ``text`` now, outside any script (speech events, transcript)."""
        await self.speech.caller_says(self.world.calls[call_id], text)

    # -- HTTP -------------------------------------------------------------------------------------

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        if request.path == "/_sim" or request.path.startswith("/_sim/"):
            return await self._control.handle(request)
        request_id = request_id_for(request)
        raw = await request.read()
        try:
            parsed: Any = json.loads(raw) if raw else None
        except ValueError:
            parsed = None
        rec = Request(
            t=time.monotonic(),
            method=request.method.upper(),
            path=request.path,
            query=redact_query(dict(request.query)),
            body=redact_body(parsed),
            status=0,
        )
        try:
            resp = await self._serve(request, raw, rec, request_id)
        except ApiError as err:
            resp = error_response(err, request_id)
        if rec.status == 0:
            rec.status = resp.status
            self.requests.append(rec)
        self.world.notify()
        return resp

    def _fault_error(self, rule: FailRule) -> ApiError:
        headers: dict[str, str] = {}
        if rule.retry_after is not None or rule.status == 429:
            headers["Retry-After"] = retry_after_header(rule.retry_after or 1.0)
        details = [{"limited_by": "customer"}] if rule.status == 429 else None
        return ApiError(rule.status, headers=headers, details=details)

    async def _serve_login(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        if request.method.upper() != "POST":
            raise ApiError(404, "ROUTE_NOT_FOUND")
        # the login has a gateway too: its own per-IP rate limit (the `auth_public` tier,
        # 10/s, burst 20: a 429) and an api-manager that is down or restarting (a 503), both
        # answered before any password is read (REFERENCE.md §9.2): `faults.fail` on its path
        rule = self.faults.take_fail("POST", LOGIN_PATH)
        if rule is not None:
            raise self._fault_error(rule)
        return await self.rest.login(Req(request, {}, raw, None))

    async def _serve(
        self, request: web.Request, raw: bytes, rec: Request, request_id: str
    ) -> web.StreamResponse:
        method = request.method.upper()
        path = request.path
        if path == LOGIN_PATH:
            return await self._serve_login(request, raw)
        handler = None
        params: dict[str, str] = {}
        if not (path == WS_PATH and method == "GET"):
            for m, pattern, h in self._routes:
                match = pattern.match(path)
                if match and m == method:
                    handler, params = h, match.groupdict()
                    break
            if handler is None:
                raise ApiError(404, "ROUTE_NOT_FOUND")
        delay = self.faults.take_delay(method, path)
        if delay > 0:
            await asyncio.sleep(delay)
        try:
            identity = self.auth.authenticate(request)
        except AuthError as err:
            raise ApiError(401, err.reason) from None
        if self.settings.rate_limit:
            wait = self._bucket.take()
            if wait > 0:
                raise ApiError(
                    429,
                    "RATE_LIMIT_EXCEEDED",
                    details=[{"limited_by": "customer"}],
                    headers={"Retry-After": retry_after_header(wait)},
                )
        rule = self.faults.take_fail(method, path)
        if rule is not None and not rule.apply:
            raise self._fault_error(rule)
        if handler is None:  # the WebSocket upgrade
            refused = self.faults.take_refuse_ws()
            if refused is not None:
                raise ApiError(refused)
            ws_ok = web.WebSocketResponse().can_prepare(request).ok
            rec.status = 101 if ws_ok else 400
            self.requests.append(rec)
            self.world.notify()
            return await self.hub.serve(request, identity)
        status, payload = await handler(Req(request, params, raw, identity))
        if rule is not None:
            raise self._fault_error(rule)
        return web.json_response(payload, status=status, headers={"X-Request-Id": request_id})
