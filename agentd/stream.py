"""The event stream: one outbound WebSocket to VoIPBIN, kept open for as long as the daemon runs.

Connect, subscribe with the exactly-once topic prefixes, read frames, and on any failure reconnect
with capped exponential backoff and jitter, started over after a subscription that was ready
for a second (agentd/backoff.py).
Subscriptions are forgotten by the server on disconnect, and events sent before a subscription
takes effect are lost, so after every subscribe — the first included — the daemon reconciles its
calls over REST. VoIPBIN never acknowledges a subscribe: a connection that survives `settle_s`
after subscribing counts as ready. Our own pings find a half-open connection behind NAT. Bad
frames are counted, never fatal; an event read from a frame VoIPBIN would not send so (no
`direction`, no `streaming_id`) is dispatched and logged as `frame.irregular`.

The credentials go in the upgrade request's headers (`Cookie: accesskey=` or a Bearer JWT),
never in the URL. The one failure that ends the loop is `PermissionDenied`: GET /customer
answered 403 because the login lacks a permission, which no retry can fix. Credentials refused
(a 401 no login can answer, or a refused login) keep it trying at least 5 s apart, in state
`unauthorised`.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import websockets
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.protocol import Event
from websockets.typing import BytesLike

from agentd import logs
from agentd.backoff import HEALTHY_AFTER_S, ConnectVerdict, Reconnects, classify_connect
from agentd.events import Parsed, Rejected, parse_frame
from agentd.secret import redact
from agentd.voipbin import ApiError, LoginError, LoginRefused, PermissionDenied, customer_hint

log = logs.get_logger("agentd.stream")

#: distinct reasons `StreamStats.rejections` counts apart; the rest are "other"
REJECTION_KINDS = 32


def topics(customer_id: str) -> list[str]:
    """Prefixes that match each event once (the event-type topic format only)."""
    return [
        f"customer_id:{customer_id}:call:call_",
        f"customer_id:{customer_id}:transcript:transcript_created",
        f"customer_id:{customer_id}:transcribe:transcribe_",
    ]


def classify(exc: BaseException) -> ConnectVerdict:
    """What a failed connection means: log in again, back off longer, or just retry."""
    if isinstance(exc, LoginRefused):
        return "slow"  # a wrong password: VoIPBIN unreachable it is not
    status = exc.response.status_code if isinstance(exc, InvalidStatus) else None
    if isinstance(exc, ApiError):
        status = exc.status or 503  # the REST lookup of our customer id got no answer
    return classify_connect(status)


class DirectConnection(ClientConnection):
    """A connection that hands each message to `on_message` as its last frame is parsed.

    websockets' own path queues a message and wakes the task that awaits `recv()`: a loop hop
    per frame, a quarter of a frame's CPU when frames come one at a time (bench/PROFILE.md).
    Here a message is handled in `data_received`, in arrival order; the handshake and control
    frames (ping, pong, close) still go through websockets, and so do messages until
    `on_message` is set (VoIPBIN sends none before the subscribe)."""

    on_message: Callable[[BytesLike, bool], None] | None = None  # (payload, is text)
    _parts: list[BytesLike] | None = None  # the frames so far of a fragmented message
    _text = False

    def process_event(self, event: Event) -> None:
        handler = self.on_message
        if handler is None or self.response is None or not isinstance(event, Frame):
            super().process_event(event)
            return
        opcode = event.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY:
            if event.fin:
                handler(event.data, opcode is Opcode.TEXT)
            else:
                self._parts, self._text = [event.data], opcode is Opcode.TEXT
        elif opcode is Opcode.CONT and self._parts is not None:
            self._parts.append(event.data)
            if event.fin:
                data, self._parts = b"".join(self._parts), None
                handler(data, self._text)
        else:
            super().process_event(event)


@dataclass
class StreamStats:
    """What `agentd status` and the logs report about the connection."""

    state: str = "starting"
    connects: int = 0
    # each retry after a failure: a lost connection, then every attempt that fails while
    # VoIPBIN stays unreachable (an outage keeps counting)
    reconnects: int = 0
    lost: int = 0  # connections that were open and ended: once each, however long the retries
    frames: int = 0
    rejected: int = 0
    last_frame_at: float | None = None
    connected_since: float | None = None
    rejections: dict[str, int] = field(default_factory=dict)
    # why the last attempt failed or the connection dropped; "" once a subscription is ready
    last_error: str = ""


class EventStream:
    """Keeps the WebSocket up and hands every parsed frame to `on_parsed`."""

    def __init__(
        self,
        ws_url: str,
        *,
        auth: Callable[[], dict[str, str]],
        customer_id: Callable[[], Awaitable[str]],
        on_parsed: Callable[[Parsed], None],
        on_ready: Callable[[bool], None],
        reauth: Callable[[], Awaitable[bool]],
        credential: Callable[[], str] = lambda: "the credentials",
        on_lost: Callable[[], None] | None = None,
        settle_s: float = 0.3,
        ping_interval_s: float = 10.0,
        ping_timeout_s: float = 20.0,
        healthy_after_s: float = HEALTHY_AFTER_S,
        max_delay_s: float = 30.0,
    ) -> None:
        self.ws_url = ws_url
        self._auth = auth
        self._customer_id = customer_id
        self._on_parsed = on_parsed
        self._on_ready = on_ready
        self._on_lost = on_lost  # a subscription that was ready is gone: events are not arriving
        self._reauth = reauth
        self._credential = credential  # what the upgrade sends, in words: "the access key (…)"
        # why VoIPBIN refuses us, when no login of ours can change it ("" otherwise)
        self._refused = ""
        self.settle_s = settle_s
        self.ping_interval_s = ping_interval_s
        self.ping_timeout_s = ping_timeout_s
        self.healthy_after_s = healthy_after_s
        self.max_delay_s = max_delay_s
        self.stats = StreamStats()
        self._ws: ClientConnection | None = None
        self._ever_ready = False  # a subscribe has become ready in this process
        self._ready_at = 0.0  # when the current subscription became ready
        self._cid: str | None = None
        self.ready = asyncio.Event()

    @property
    def customer_unknown(self) -> bool:
        """The lookup of our customer (before the first connection) has not succeeded yet."""
        return self._cid is None

    async def run(self) -> None:
        """Connect and read forever (until cancelled); never raises on network trouble.

        Raises `PermissionDenied` when VoIPBIN refuses the credentials a permission they need:
        retrying for ever would only hide the problem, so the daemon stops and says why."""
        delays = Reconnects(cap=self.max_delay_s, healthy_after_s=self.healthy_after_s)
        while True:
            verdict: ConnectVerdict
            hint: dict[str, str] = {}
            self._refused = ""
            connects = self.stats.connects
            try:
                # "first" is the first subscribe that became ready, not the first attempt
                await self._session(not self._ever_ready)
                reason = "closed by server"
            except asyncio.CancelledError:
                raise
            except PermissionDenied as exc:
                self.stats.state = "forbidden"
                log.error("stream.forbidden", error=str(exc))
                raise
            except (OSError, TimeoutError, ConnectionClosed, InvalidHandshake, ApiError) as exc:
                reason = _reason(exc)
                hint = _hint(exc)
                if isinstance(exc, LoginRefused):
                    # the first lookup of our customer logs in: this is where a wrong
                    # password shows at start, not on the upgrade's 401
                    self._refused = _login_refused(exc)
                verdict = await self._after_failure(classify(exc), reason)
            except Exception as exc:  # last resort: the reconnect loop must never die
                reason = redact(f"{type(exc).__name__}: {exc}")
                log.exception("stream.crashed")
                verdict = "slow"
            else:
                verdict = "retry"
            if self.stats.connects > connects:
                self.stats.lost += 1
            # how long the subscription was ready, not how long the attempt took: a
            # connection that never became ready proves nothing about the server
            ready_for_s = time.monotonic() - self._ready_at if self.ready.is_set() else 0.0
            if self.ready.is_set() and self._on_lost is not None:
                self._on_lost()
            self.ready.clear()
            self._ws = None
            # refused credentials are no outage: the status says so until VoIPBIN takes them
            self.stats.state = "unauthorised" if self._refused else "reconnecting"
            self.stats.connected_since = None
            delay = delays.next_delay(ready_for_s, verdict)
            self.stats.reconnects += 1
            self.stats.last_error = self._refused or reason
            log.warning("stream.disconnected", reason=reason, retry_in_s=round(delay, 2), **hint)
            await asyncio.sleep(delay)

    async def _after_failure(self, verdict: ConnectVerdict, reason: str) -> ConnectVerdict:
        """Log in again when the server said 401; a refused or failed login backs off longer.

        A 401 that no login can answer (an access key, or a JWT given in the config) is told at
        error, and in the status, but retried all the same: VoIPBIN answers 401 as well when
        its own lookup of the key fails (bin-api-manager `lib/middleware/authenticate.go`), so
        a 401 alone does not prove the key revoked."""
        if verdict != "reauth":
            return verdict
        try:
            if await self._reauth():
                return verdict
            self._refused = (
                f"{reason}: VoIPBIN refused {self._credential()}: revoked, expired or wrong"
            )
            log.error("stream.unauthorised", error=self._refused)
        except LoginRefused as err:
            self._refused = _login_refused(err)
        except LoginError as err:
            # no answer, a 5xx or the login's own 429: VoIPBIN's outage, retried until it
            # passes (a warning, as the reconnects it causes); anything else needs a person
            transient = err.status in (0, 429) or err.status >= 500
            (log.warning if transient else log.error)("stream.login_failed", error=redact(str(err)))
        except Exception as err:
            log.error("stream.login_failed", error=redact(str(err)))
        return "slow"

    async def _session(self, first: bool) -> None:
        self.stats.state = "connecting"  # the customer's lookup too: no longer "starting"
        if self._cid is None:
            self._cid = await self._customer_id()
        async with connect(
            self.ws_url,
            additional_headers=self._auth(),
            ping_interval=self.ping_interval_s,
            ping_timeout=self.ping_timeout_s,
            open_timeout=10,
            close_timeout=2,
            max_size=2**22,
            max_queue=None,  # never stall the read loop; the dispatcher keeps up
            compression=None,
            proxy=None,
            create_connection=DirectConnection,
        ) as ws:
            self._ws = ws
            if isinstance(ws, DirectConnection):
                ws.on_message = self._message
            self.stats.connects += 1
            await ws.send(json.dumps({"type": "subscribe", "topics": topics(self._cid)}))
            self.stats.state = "subscribed"
            self.stats.connected_since = time.monotonic()
            log.info("stream.subscribed", first=first)
            settle = asyncio.get_running_loop().call_later(
                self.settle_s, self._mark_ready, ws, first
            )
            try:
                async for frame in ws:
                    self._frame(frame)
            finally:
                settle.cancel()

    def _mark_ready(self, ws: ClientConnection, first: bool) -> None:
        if self._ws is ws:
            self.stats.state = "ready"
            self.stats.last_error = ""
            self._ready_at = time.monotonic()
            self.ready.set()
            self._ever_ready = True
            self._on_ready(first)

    def _message(self, data: BytesLike, text: bool) -> None:
        """A whole message from `DirectConnection`: a text frame's UTF-8, or a binary frame."""
        if not text:
            self._frame(bytes(data))
            return
        try:
            frame = str(data, "utf-8")
        except UnicodeDecodeError:
            self._frame(bytes(data), Rejected("not UTF-8"))
            return
        self._frame(frame)

    def _frame(self, frame: str | bytes, rejected: Rejected | None = None) -> None:
        """One message: counted, parsed (unless already `rejected`) and dispatched."""
        self.stats.frames += 1
        self.stats.last_frame_at = time.monotonic()
        parsed = rejected or parse_frame(frame)
        if isinstance(parsed, Rejected):
            if not parsed.ignorable:
                self.stats.rejected += 1
                rejections = self.stats.rejections
                # a reason may quote the frame (an unknown status): a bounded set of keys
                reason = parsed.reason
                if reason not in rejections and len(rejections) >= REJECTION_KINDS:
                    reason = "other"
                rejections[reason] = rejections.get(reason, 0) + 1
                log.warning("frame.rejected", reason=parsed.reason, size=len(frame))
            return
        if parsed.irregular:
            # taken all the same (its words may be the caller's), but VoIPBIN never sends it
            # so: a broken frame or a changed server, which someone should hear of
            log.warning("frame.irregular", reason=parsed.irregular, size=len(frame))
        try:
            self._on_parsed(parsed)
        except Exception:  # a bug downstream must not drop the connection
            log.exception("frame.dispatch_failed")

    async def close(self) -> None:
        """Close the connection politely (the run task is cancelled separately)."""
        if self._ws is not None:
            await self._ws.close()


def _login_refused(exc: LoginRefused) -> str:
    # an error, not the warning of an outage: only someone changing the credentials (on
    # VoIPBIN's side, or in the config and a restart) ends it; the stream keeps trying meanwhile
    log.error("stream.login_refused", error=str(exc))
    return str(exc)


def _hint(exc: BaseException) -> dict[str, str]:
    """What an operator should check, for a failure no retry is likely to fix by itself."""
    hint = customer_hint(exc)
    return {"hint": hint} if hint else {}


def _reason(exc: BaseException) -> str:
    if isinstance(exc, InvalidStatus):
        return f"HTTP {exc.response.status_code} on connect"
    if isinstance(exc, ConnectionClosed):
        rcvd = exc.rcvd
        return f"connection closed ({rcvd.code if rcvd else 1006})"
    return redact(f"{type(exc).__name__}: {exc}")


__all__ = ["DirectConnection", "EventStream", "StreamStats", "classify", "topics", "websockets"]
