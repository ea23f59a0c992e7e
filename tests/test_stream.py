"""EventStream against a small real WebSocket server on 127.0.0.1: subscribe, reconnect,
frames, re-authentication and shutdown, observed from the server's side and the callbacks."""

from __future__ import annotations

import asyncio
import json
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import pytest
from structlog.testing import capture_logs
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.http11 import Request, Response

from agentd.config import load
from agentd.daemon import Daemon
from agentd.events import CallEvent, Parsed, SpeechEvent, TranscriptEvent
from agentd.sim import Simulator
from agentd.stream import REJECTION_KINDS, EventStream, classify, topics
from agentd.voipbin import LOGIN_REFUSED, ApiError, LoginError, LoginRefused, PermissionDenied

if TYPE_CHECKING:
    from pathlib import Path

CUSTOMER = "cust-7"
LIMIT_S = 5.0  # a safety net on every wait: a broken stream fails the test instead of hanging it


def call_frame(call_id: str = "call-1", status: str = "progressing", **extra: Any) -> str:
    """A bare Call resource as VoIPBIN sends it over the WebSocket."""
    return json.dumps(
        {
            "id": call_id,
            "status": status,
            "direction": "incoming",
            "source": {"type": "tel", "target": "+15550001111"},
            "destination": {"type": "tel", "target": "+15551234567"},
            "tm_update": "2024-01-01 00:00:00.000001",
            **extra,
        }
    )


@dataclass
class Conn:
    """One accepted WebSocket connection as the server saw it."""

    ws: ServerConnection
    received: asyncio.Queue[str | bytes] = field(default_factory=asyncio.Queue)
    closed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def request(self) -> Request:
        assert self.ws.request is not None
        return self.ws.request

    async def subscription(self) -> dict[str, Any]:
        """The first message: what the client subscribed to."""
        msg = await asyncio.wait_for(self.received.get(), LIMIT_S)
        assert isinstance(msg, str)
        body = json.loads(msg)
        assert isinstance(body, dict)
        return body


class WsServer:
    """A WebSocket server that records every upgrade request and can refuse the next ones."""

    def __init__(self) -> None:
        self.accepted: asyncio.Queue[Conn] = asyncio.Queue()
        self.refused: asyncio.Queue[Request] = asyncio.Queue()
        self.requests: list[Request] = []
        self.refuse: deque[int] = deque()  # HTTP statuses for the next upgrade requests
        self._server: Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}/v1.0/ws"

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        self.requests.append(request)
        if self.refuse:
            status = self.refuse.popleft()
            self.refused.put_nowait(request)
            return connection.respond(HTTPStatus(status), "refused by the test\n")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        conn = Conn(ws)
        self.accepted.put_nowait(conn)
        try:
            async for msg in ws:
                conn.received.put_nowait(msg)
        finally:
            conn.closed.set()

    async def next_conn(self) -> Conn:
        return await asyncio.wait_for(self.accepted.get(), LIMIT_S)

    async def __aenter__(self) -> WsServer:
        self._server = await serve(
            self._handler,
            "127.0.0.1",
            0,
            process_request=self._process_request,
            ping_interval=None,
            close_timeout=1,
        )
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


@dataclass
class Client:
    """An EventStream and everything its callbacks reported."""

    stream: EventStream
    task: asyncio.Task[None]
    parsed: asyncio.Queue[Parsed]
    readies: asyncio.Queue[bool]
    reauths: list[str]
    reauth_calls: asyncio.Queue[str]
    customer_lookups: list[int]

    async def next_parsed(self) -> Parsed:
        return await asyncio.wait_for(self.parsed.get(), LIMIT_S)

    async def next_ready(self) -> bool:
        return await asyncio.wait_for(self.readies.get(), LIMIT_S)


StartClient = Callable[..., Awaitable[Client]]


@pytest.fixture
async def server() -> AsyncIterator[WsServer]:
    async with WsServer() as s:
        yield s


@pytest.fixture
async def client(server: WsServer) -> AsyncIterator[StartClient]:
    """Start an EventStream against `server`; at the end cancel it and check it stopped."""
    started: list[Client] = []

    async def start(
        *,
        token: list[str] | None = None,
        accesskey: str | None = None,
        reauth_result: bool | Exception = True,
        on_parsed: Callable[[Parsed], None] | None = None,
        customer_failures: list[BaseException] | None = None,
        auth_failures: list[BaseException] | None = None,
        **options: Any,
    ) -> Client:
        creds = token if token is not None else ["token-1"]
        parsed: asyncio.Queue[Parsed] = asyncio.Queue()
        readies: asyncio.Queue[bool] = asyncio.Queue()
        reauths: list[str] = []
        reauth_calls: asyncio.Queue[str] = asyncio.Queue()
        lookups: list[int] = []
        customer_errors = list(customer_failures or [])
        auth_errors = list(auth_failures or [])

        def auth() -> dict[str, str]:
            if auth_errors:
                raise auth_errors.pop(0)
            if accesskey is not None:
                return {"Cookie": f"accesskey={accesskey}"}
            return {"Authorization": f"Bearer {creds[0]}"}

        async def customer_id() -> str:
            lookups.append(1)
            if customer_errors:
                raise customer_errors.pop(0)
            return CUSTOMER

        async def reauth() -> bool:
            reauths.append(creds[0])
            reauth_calls.put_nowait(creds[0])
            if isinstance(reauth_result, Exception):
                raise reauth_result
            if reauth_result:
                creds[0] = f"token-{len(reauths) + 1}"
            return reauth_result

        defaults: dict[str, Any] = {"settle_s": 0.05, "max_delay_s": 0.05}
        stream = EventStream(
            server.url,
            auth=auth,
            customer_id=customer_id,
            on_parsed=on_parsed or parsed.put_nowait,
            on_ready=readies.put_nowait,
            reauth=reauth,
            **{**defaults, **options},
        )
        task = asyncio.create_task(stream.run())
        c = Client(stream, task, parsed, readies, reauths, reauth_calls, lookups)
        started.append(c)
        return c

    yield start
    for c in started:
        if c.task.done() and not c.task.cancelled():
            continue  # it gave up by itself (a missing permission), and its test awaited that
        c.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(c.task, LIMIT_S)


# ---- connect and subscribe ----------------------------------------------------------------------


def test_topics_are_the_exactly_once_prefixes_of_one_customer() -> None:
    assert topics("c9") == [
        "customer_id:c9:call:call_",
        "customer_id:c9:transcript:transcript_created",
        "customer_id:c9:transcribe:transcribe_",
    ]


async def test_subscribes_with_the_customers_topics_and_credentials_then_reports_ready(
    server: WsServer, client: StartClient
) -> None:
    c = await client()
    conn = await server.next_conn()
    assert await conn.subscription() == {"type": "subscribe", "topics": topics(CUSTOMER)}
    # the credentials go in the upgrade's headers, never in the URL
    assert conn.request.path == "/v1.0/ws"
    assert conn.request.headers["Authorization"] == "Bearer token-1"

    assert await c.next_ready() is True
    assert c.stream.ready.is_set()
    assert c.stream.stats.state == "ready"
    assert c.stream.stats.connects == 1
    assert c.stream.stats.reconnects == 0
    assert c.stream.stats.connected_since is not None


async def test_an_access_key_goes_in_a_cookie_header_never_in_the_url(
    server: WsServer, client: StartClient
) -> None:
    c = await client(accesskey="vb_key_1")
    conn = await server.next_conn()
    await conn.subscription()
    await c.next_ready()
    assert conn.request.path == "/v1.0/ws"
    assert conn.request.headers["Cookie"] == "accesskey=vb_key_1"
    assert "Authorization" not in conn.request.headers
    assert all("vb_key_1" not in r.path for r in server.requests)


async def test_not_ready_until_the_subscription_has_settled_but_frames_flow_already(
    server: WsServer, client: StartClient
) -> None:
    # VoIPBIN never acknowledges a subscribe: only a connection that survives settle_s is ready
    c = await client(settle_s=3600.0)
    conn = await server.next_conn()
    await conn.subscription()
    await conn.ws.send(call_frame())
    parsed = await c.next_parsed()
    assert isinstance(parsed.event, CallEvent)
    assert c.stream.stats.state == "subscribed"
    assert not c.stream.ready.is_set()
    assert c.readies.empty()


# ---- reconnect ----------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_resubscribes_after_the_server_drops_it_and_reports_the_gap(
    server: WsServer, client: StartClient, how: str
) -> None:
    c = await client()
    first = await server.next_conn()
    await first.subscription()
    assert await c.next_ready() is True

    server.refuse.append(503)  # the first attempt after the drop fails: watch the gap
    if how == "close":
        await first.ws.close(1001, "going away")  # a clean close (a server restart)
    else:
        assert first.ws.transport is not None
        first.ws.transport.abort()  # TCP reset: no closing handshake at all
    await asyncio.wait_for(server.refused.get(), LIMIT_S)
    assert not c.stream.ready.is_set()  # during the gap nobody may think events are flowing

    second = await server.next_conn()
    # subscriptions die with the connection: the same topics are sent again
    assert await second.subscription() == {"type": "subscribe", "topics": topics(CUSTOMER)}
    assert await c.next_ready() is False  # not the first: the daemon must reconcile the gap
    assert c.stream.ready.is_set()
    assert c.stream.stats.connects == 2
    assert c.stream.stats.reconnects == 2  # the drop and the refused attempt
    assert c.stream.stats.lost == 1  # one connection lost, however many attempts it took
    assert len(c.customer_lookups) == 1  # the customer id is looked up once, not per connect

    await second.ws.send(call_frame("call-after-gap"))
    parsed = await c.next_parsed()
    assert isinstance(parsed.event, CallEvent)
    assert parsed.event.call.id == "call-after-gap"


@pytest.mark.slow  # the client waits its 2 s close timeout for a peer that never answers
async def test_a_silent_half_open_connection_is_found_by_pings_and_replaced(
    server: WsServer, client: StartClient
) -> None:
    c = await client(ping_interval_s=0.05, ping_timeout_s=0.2)
    first = await server.next_conn()
    await first.subscription()
    assert await c.next_ready() is True
    assert first.ws.transport is not None
    first.ws.transport.pause_reading()  # the peer is gone behind a NAT: no pongs come back
    try:
        second = await server.next_conn()
        assert await second.subscription() == {"type": "subscribe", "topics": topics(CUSTOMER)}
        assert await c.next_ready() is False
        assert c.stream.stats.connects == 2
    finally:
        first.ws.transport.abort()


async def test_a_failing_customer_lookup_or_a_bug_does_not_kill_the_reconnect_loop(
    server: WsServer, client: StartClient
) -> None:
    c = await client(
        customer_failures=[ApiError(503, "UNAVAILABLE", "try later")],
        auth_failures=[RuntimeError("a bug in the credentials code")],
    )
    conn = await server.next_conn()
    assert await conn.subscription() == {"type": "subscribe", "topics": topics(CUSTOMER)}
    await c.next_ready()
    assert len(c.customer_lookups) == 2
    assert c.stream.stats.reconnects == 2
    assert c.stream.stats.connects == 1
    assert c.stream.stats.lost == 0  # attempts that never connected lost nothing


async def test_a_customer_lookup_answered_404_says_which_setting_to_check(
    server: WsServer, client: StartClient
) -> None:
    # an api_url without /v1.0: every retry gets the same 404, the log line says why
    with capture_logs() as logs:
        c = await client(customer_failures=[ApiError(404, "NOT_FOUND", "")])
        await server.next_conn()
        await c.next_ready()
    [line] = [e for e in logs if e["event"] == "stream.disconnected"]
    assert "voipbin.api_url" in line["hint"] and "/v1.0" in line["hint"]


async def test_the_backoff_starts_over_after_a_ready_subscription_not_after_a_long_attempt(
    server: WsServer, client: StartClient
) -> None:
    """Drops close together after the subscription was ready (a rolling restart of VoIPBIN's
    pods) are each retried at once; attempts that never became ready back off."""
    with capture_logs() as logs:
        c = await client(healthy_after_s=0.0, max_delay_s=1.0)
        for _ in range(3):
            conn = await server.next_conn()
            await conn.subscription()
            await c.next_ready()
            await conn.ws.close(1001, "going away")
        c.stream.settle_s = 3600.0  # from now on no subscription becomes ready
        for _ in range(3):
            conn = await server.next_conn()
            await conn.subscription()
            await conn.ws.close(1001, "going away")
        await server.next_conn()
    delays = [e["retry_in_s"] for e in logs if e["event"] == "stream.disconnected"]
    assert len(delays) == 6
    assert all(d <= 0.5 for d in delays[:3])  # the base step, each time
    assert max(delays[3:]) > 0.5  # the step doubled: these proved nothing about the server


async def test_a_missing_permission_ends_the_loop_with_a_clear_error(
    server: WsServer, client: StartClient
) -> None:
    # a login without the CustomerAdmin/CustomerManager permission: no retry can fix that, so
    # the stream says why and gives up instead of retrying for ever in silence
    denied = PermissionDenied(403, "PERMISSION_DENIED", "the login lacks the CustomerAdmin ...")
    with capture_logs() as logs:
        c = await client(customer_failures=[ApiError(503, "UNAVAILABLE"), denied])
        with pytest.raises(PermissionDenied):
            await asyncio.wait_for(c.task, LIMIT_S)
    assert len(c.customer_lookups) == 2  # a 503 first is retried as before
    assert server.requests == []  # no WebSocket without the customer id
    assert c.stream.stats.state == "forbidden"
    (error,) = [entry for entry in logs if entry["event"] == "stream.forbidden"]
    assert error["log_level"] == "error"
    assert "CustomerAdmin" in error["error"]


# ---- frames -------------------------------------------------------------------------------------


async def test_frames_are_parsed_into_events_in_order(
    server: WsServer, client: StartClient
) -> None:
    c = await client()
    conn = await server.next_conn()
    await conn.subscription()
    await conn.ws.send(call_frame("call-1", "ringing"))
    await conn.ws.send(
        json.dumps(
            {"id": "tr-1", "transcribe_id": "t-1", "direction": "in", "message": "Hello there"}
        )
    )
    first, second = await c.next_parsed(), await c.next_parsed()
    assert isinstance(first.event, CallEvent)
    assert (first.event.call.id, first.event.call.status) == ("call-1", "ringing")
    assert first.event.call.source == "+15550001111"
    assert second.key == "transcript:tr-1"
    assert getattr(second.event, "message", None) == "Hello there"
    assert c.stream.stats.frames == 2
    assert c.stream.stats.rejected == 0
    assert c.stream.stats.last_frame_at is not None


async def test_malformed_and_binary_frames_are_counted_and_the_connection_survives(
    server: WsServer, client: StartClient
) -> None:
    c = await client()
    conn = await server.next_conn()
    await conn.subscription()
    await conn.ws.send("{not json")
    await conn.ws.send(b"\x00\x01binary")
    await conn.ws.send("[1, 2, 3]")
    await conn.ws.send(call_frame(status="exploded"))  # a call status nobody knows
    await conn.ws.send(call_frame(status=42))  # a field of the wrong type
    # a well-formed event of a kind agentd does not use is not an error
    await conn.ws.send(json.dumps({"type": "recording_started", "data": {"id": "r1"}}))
    await conn.ws.send(call_frame("call-ok"))

    parsed = await c.next_parsed()  # frames are handled in order: all the others were seen
    assert isinstance(parsed.event, CallEvent)
    assert parsed.event.call.id == "call-ok"
    assert c.parsed.empty()
    stats = c.stream.stats
    assert stats.frames == 7
    assert stats.rejected == 5
    assert stats.rejections == {
        "not JSON": 1,
        "binary frame": 1,
        "not a JSON object": 1,
        "unknown call status 'exploded'": 1,
        "malformed field: TypeError": 1,
    }
    # reasons that quote the frame are counted apart only so far: no key per bad frame
    for n in range(100):
        await conn.ws.send(call_frame(status=f"odd-{n}"))
    await conn.ws.send(call_frame("call-ok-2"))
    await c.next_parsed()
    assert stats.rejected == 105
    assert len(stats.rejections) == REJECTION_KINDS + 1
    assert stats.rejections["other"] == 100 - (REJECTION_KINDS - 5)
    assert (stats.connects, stats.reconnects) == (1, 0)
    assert not conn.closed.is_set()


async def test_bad_input_that_still_carries_words_is_dispatched_and_said_at_warning(
    server: WsServer, client: StartClient
) -> None:
    # VoIPBIN always sends `direction` and `streaming_id`; a frame without them is bad input,
    # but its words are the caller's: dispatched (nothing lost), and the log says what was odd
    c = await client()
    conn = await server.next_conn()
    await conn.subscription()
    transcript = {"id": "tr-1", "transcribe_id": "t-1", "message": "Hello there"}
    interim = {"id": "sp-1", "transcribe_id": "t-1", "direction": "in", "message": "Hel"}
    interim["tm_event"] = "2026-08-20T10:00:12.000123456Z"
    with capture_logs() as logs:
        await conn.ws.send(json.dumps(transcript))
        await conn.ws.send(json.dumps(interim))
        first, second = await c.next_parsed(), await c.next_parsed()
    assert first.event == TranscriptEvent("tr-1", "t-1", "in", "Hello there")
    assert isinstance(second.event, SpeechEvent) and second.event.kind == "interim"
    odd = [(e["log_level"], e["reason"]) for e in logs if e["event"] == "frame.irregular"]
    assert odd == [
        ("warning", "transcript without direction: taken as the caller's"),
        ("warning", "speech event without streaming_id"),
    ]
    assert (c.stream.stats.frames, c.stream.stats.rejected) == (2, 0)


async def test_fragmented_messages_and_bad_utf8_keep_their_order_and_the_connection(
    server: WsServer, client: StartClient
) -> None:
    # frames are handled as they are parsed, not queued for a reader task: a message sent in
    # fragments (with a ping between them) is whole and in its place, and a text frame that is
    # not UTF-8 is a rejected frame, not a broken connection
    c = await client()
    conn = await server.next_conn()
    await conn.subscription()
    await conn.ws.send(call_frame("call-1"))
    whole = call_frame("call-2")
    await conn.ws.send(iter([whole[:10], whole[10:40], whole[40:]]))
    await conn.ws.send(b"\xff\xfe not utf-8", text=True)
    await conn.ws.send(iter([b"\x00binary", b" in parts"]))
    pong = await conn.ws.ping()
    await conn.ws.send(call_frame("call-3"))

    ids = []
    for _ in range(3):
        parsed = await c.next_parsed()
        assert isinstance(parsed.event, CallEvent)
        ids.append(parsed.event.call.id)
    assert ids == ["call-1", "call-2", "call-3"]
    await asyncio.wait_for(pong, LIMIT_S)  # control frames are still websockets' to answer
    stats = c.stream.stats
    assert (stats.frames, stats.rejected) == (5, 2)
    assert stats.rejections == {"not UTF-8": 1, "binary frame": 1}
    assert (stats.connects, stats.reconnects) == (1, 0)
    assert not conn.closed.is_set()


async def test_an_exception_in_the_dispatcher_does_not_drop_the_connection(
    server: WsServer, client: StartClient
) -> None:
    seen: asyncio.Queue[str] = asyncio.Queue()

    def on_parsed(parsed: Parsed) -> None:
        assert isinstance(parsed.event, CallEvent)
        seen.put_nowait(parsed.event.call.id)
        if parsed.event.call.id == "boom":
            raise RuntimeError("a bug downstream")

    c = await client(on_parsed=on_parsed)
    conn = await server.next_conn()
    await conn.subscription()
    await conn.ws.send(call_frame("boom"))
    await conn.ws.send(call_frame("after"))
    assert await asyncio.wait_for(seen.get(), LIMIT_S) == "boom"
    assert await asyncio.wait_for(seen.get(), LIMIT_S) == "after"
    assert (c.stream.stats.connects, c.stream.stats.reconnects) == (1, 0)
    assert not conn.closed.is_set()


# ---- authentication -----------------------------------------------------------------------------


async def test_a_401_upgrade_refusal_logs_in_again_and_connects_with_the_new_token(
    server: WsServer, client: StartClient
) -> None:
    server.refuse.append(401)
    c = await client(token=["stale"])
    refused = await asyncio.wait_for(server.refused.get(), LIMIT_S)
    assert refused.headers["Authorization"] == "Bearer stale"

    conn = await server.next_conn()
    assert c.reauths == ["stale"]  # one login, for the token that was refused
    assert conn.request.headers["Authorization"] == "Bearer token-2"
    assert await conn.subscription() == {"type": "subscribe", "topics": topics(CUSTOMER)}
    # the first subscribe of the process, though not the first attempt
    assert await c.next_ready() is True
    assert c.stream.ready.is_set()
    assert c.stream.stats.connects == 1
    assert c.stream.stats.reconnects == 1


@pytest.mark.parametrize("outcome", [False, RuntimeError("login server down")])
async def test_refused_credentials_keep_retrying_without_dying(
    server: WsServer, client: StartClient, outcome: bool | Exception
) -> None:
    # the login cannot help (no password, or it fails): back off and try again, never give up
    server.refuse.extend([401, 401])
    c = await client(reauth_result=outcome)
    await asyncio.wait_for(server.refused.get(), LIMIT_S)
    await asyncio.wait_for(server.refused.get(), LIMIT_S)
    conn = await server.next_conn()
    await conn.subscription()
    await c.next_ready()
    assert c.reauths == ["token-1", "token-1"]
    assert conn.request.headers["Authorization"] == "Bearer token-1"
    assert c.stream.stats.reconnects == 2


@pytest.mark.parametrize(
    ("failure", "level"),
    [
        (LoginError(503, "LOGIN_FAILED", "login failed"), "warning"),
        (LoginError(429, "LOGIN_FAILED", "login failed"), "warning"),
        (LoginError(0, "ClientConnectorError", "login failed: cannot connect"), "warning"),
        (LoginError(404, "LOGIN_FAILED", "login failed"), "error"),
        (RuntimeError("a bug in the login"), "error"),
    ],
)
async def test_a_login_that_fails_in_an_outage_is_a_warning_anything_else_an_error(
    server: WsServer, client: StartClient, failure: Exception, level: str
) -> None:
    # VoIPBIN's gateway down or its login's rate limit: retried until it passes, like the
    # reconnects it causes (warnings); a login path that is not found needs a person
    server.refuse.append(401)
    with capture_logs() as logs:
        c = await client(reauth_result=failure)
        await asyncio.wait_for(server.refused.get(), LIMIT_S)
        await server.next_conn()
        await c.next_ready()
    [line] = [e for e in logs if e["event"] == "stream.login_failed"]
    assert line["log_level"] == level


async def test_a_refused_login_is_an_error_that_names_the_credentials_and_backs_off(
    server: WsServer, client: StartClient
) -> None:
    # at start the customer lookup logs in; later a 401 on the upgrade does: both say so
    refused = LoginRefused(400, "LOGIN_FAILED", LOGIN_REFUSED)
    server.refuse.append(401)
    with capture_logs() as logs:
        c = await client(customer_failures=[refused], reauth_result=refused)
        await asyncio.wait_for(server.refused.get(), LIMIT_S)
        await server.next_conn()
        await c.next_ready()
    errors = [e for e in logs if e["event"] == "stream.login_refused"]
    assert [e["log_level"] for e in errors] == ["error", "error"]
    assert all("check voipbin.username and voipbin.password" in e["error"] for e in errors)
    assert c.reauths == ["token-1"]  # the lookup's refusal was the login's: none more
    assert c.stream.stats.reconnects == 2
    # not an unreachable VoIPBIN: the longer backoff of a refusal
    assert classify(refused) == "slow"


async def test_a_revoked_access_key_is_told_as_such_in_the_status_and_at_error(
    server: WsServer, client: StartClient
) -> None:
    # VoIPBIN answers 401 INVALID_CREDENTIALS to a deleted or expired key, and to a key it
    # could not look up (bin-api-manager lib/middleware/authenticate.go): no login can fix
    # it, so the stream keeps trying, slowly, and its status says why it is not connected
    server.refuse.extend([401, 401])
    lost = asyncio.Event()
    with capture_logs() as logs:
        c = await client(
            accesskey="vb_revoked",
            reauth_result=False,
            max_delay_s=0.05,
            credential=lambda: "the access key (voipbin.accesskey)",
            on_lost=lost.set,
        )
        await asyncio.wait_for(c.reauth_calls.get(), LIMIT_S)
        stats = c.stream.stats
        assert stats.state == "unauthorised"
        assert stats.last_error == (
            "HTTP 401 on connect: VoIPBIN refused the access key (voipbin.accesskey): "
            "revoked, expired or wrong"
        )
        await asyncio.wait_for(c.reauth_calls.get(), LIMIT_S)
        conn = await server.next_conn()  # it is back (a key VoIPBIN failed to look up)
        await conn.subscription()
        await c.next_ready()
    assert (stats.state, stats.last_error) == ("ready", "")
    await conn.ws.close()  # a drop after that is an outage again, not the old refusal
    await asyncio.wait_for(lost.wait(), LIMIT_S)
    assert (stats.state, stats.last_error) == ("reconnecting", "closed by server")
    errors = [e for e in logs if e["event"] == "stream.unauthorised"]
    assert [e["log_level"] for e in errors] == ["error", "error"]
    assert all("VoIPBIN refused the access key" in e["error"] for e in errors)
    # no secret in what is told
    assert not [e for e in logs if "vb_revoked" in repr(e)]


async def test_a_refused_login_is_told_in_the_status(server: WsServer, client: StartClient) -> None:
    refused = LoginRefused(400, "LOGIN_FAILED", LOGIN_REFUSED)
    server.refuse.append(401)
    c = await client(reauth_result=refused, max_delay_s=3600.0)
    await asyncio.wait_for(c.reauth_calls.get(), LIMIT_S)
    assert c.stream.stats.state == "unauthorised"
    assert "check voipbin.username and voipbin.password" in c.stream.stats.last_error


async def test_other_refusals_do_not_log_in_again(server: WsServer, client: StartClient) -> None:
    server.refuse.extend([403, 500])
    c = await client()
    conn = await server.next_conn()
    await conn.subscription()
    await c.next_ready()
    assert c.reauths == []
    assert c.stream.stats.reconnects == 2


# ---- stopping -----------------------------------------------------------------------------------


async def test_cancel_while_connected_closes_the_connection(
    server: WsServer, client: StartClient
) -> None:
    c = await client()
    conn = await server.next_conn()
    await conn.subscription()
    await c.next_ready()
    c.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(c.task, LIMIT_S)
    await asyncio.wait_for(conn.closed.wait(), LIMIT_S)  # the server saw the connection end
    assert c.task.cancelled()


async def test_cancel_while_waiting_to_reconnect_stops_at_once(
    server: WsServer, client: StartClient
) -> None:
    # refused credentials that no login can fix: the stream backs off for at least 5 s
    server.refuse.append(401)
    c = await client(reauth_result=False, max_delay_s=3600.0)
    await asyncio.wait_for(c.reauth_calls.get(), LIMIT_S)
    # nothing is awaited between the refused login and the backoff sleep: it is sleeping now
    assert c.stream.stats.state == "unauthorised"
    c.task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(c.task, LIMIT_S)
    assert not c.stream.ready.is_set()
    assert len(server.requests) == 1  # it did not try again on its way out


async def test_close_says_goodbye_with_a_normal_close_code(
    server: WsServer, client: StartClient
) -> None:
    c = await client()
    conn = await server.next_conn()
    await conn.subscription()
    await c.next_ready()
    await c.stream.close()
    await asyncio.wait_for(conn.closed.wait(), LIMIT_S)
    assert conn.ws.close_code == 1000


# ---- the daemon: a missing permission stops it -------------------------------------------------


async def test_the_daemon_stops_and_raises_when_the_login_lacks_a_permission(
    sim: Simulator, tmp_path: Path
) -> None:
    # a real login of an agent with the CustomerAgent permission only: VoIPBIN refuses it
    # /customer (bin-api-manager servicehandler) and every customer topic
    s = sim.settings
    config = load(
        None,
        env={},
        overrides={
            "voipbin": {
                "api_url": sim.api_url,
                "username": s.agent_username,
                "password": s.agent_password,
            },
            "agent": {"numbers": ["*"]},
            "store": {"path": str(tmp_path / "agentd.db")},
        },
    )
    daemon = Daemon(config)
    with pytest.raises(PermissionDenied, match="CustomerAdmin or CustomerManager"):
        await asyncio.wait_for(daemon.run(), LIMIT_S)
    assert daemon.stopped.is_set()  # after the clean-up of any stop
    # logged in (the first try has no token yet), refused, and never tried again
    assert [r.status for r in sim.requests_matching("GET", r"/customer$")] == [401, 403]
    assert not [r for r in sim.requests if r.path == "/v1.0/ws"]
