"""The WebSocket event hub: subscriptions, topic validation, fan-out, keepalive.

Server behaviour from docs/protocol.md §3: text JSON ``subscribe``/``unsubscribe`` messages with
no ack; a binary frame or any invalid topic drops the TCP connection without a close frame; plain
string-prefix matching, delivered once per published topic (each event is published under two
topics, so a 3-part prefix gets two copies); ping every ``ping_interval_s`` and drop a client whose
last pong is older than ``pong_timeout_s``; a bounded per-connection queue that silently drops.

Subscriptions bind asynchronously (``bin-api-manager/pkg/websockhandler/subscription.go``,
``scoperefcount.go``, ``bindpattern.go``): the in-process subscription is immediate, but events
reach the pod only once its queue is bound to the topic's scope (``customer_id.<id>.#``) on the
AMQP exchange. Events published before that are never delivered. The simulator binds each
connection's scopes ``subscribe_bind_s`` after its first subscribe to them, the worst case (no
other connection on the pod already holds the scope); :attr:`WsConnection.subscriptions` holds
only topics whose scope is bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import structlog
from aiohttp import WSMsgType, web

from agentd.sim.auth import Identity
from agentd.sim.faults import Faults
from agentd.sim.settings import SimSettings

log = structlog.get_logger("agentd.sim.ws")

Frame = str | bytes


def topic_valid(topic: str, identity: Identity) -> bool:
    """The server's ``validateTopics`` rule for one topic (docs/protocol.md §3.1,
    ``bin-api-manager/pkg/websockhandler/etc.go``)."""
    parts = topic.split(":")
    if len(parts) < 2:
        return False
    try:
        scope_id = uuid.UUID(parts[1])
    except ValueError:
        return False
    if scope_id.int == 0:
        return False
    if parts[0] == "customer_id":
        # etc.go validateTopics: customer topics need CustomerAdmin|CustomerManager.
        return identity.customer_admin and scope_id == uuid.UUID(identity.customer_id)
    if parts[0] == "agent_id":
        return identity.agent_id is not None and scope_id == uuid.UUID(identity.agent_id)
    return False


def bind_pattern(topic: str) -> str:
    """The AMQP binding a topic needs (``bindpattern.go``, ``topicToBindPattern``)."""
    parts = topic.split(":")
    return f"{parts[0]}.{parts[1]}.#"


def topics_for(customer_id: str, event_type: str, resource_id: str) -> list[str]:
    """The "old" 4-part and "new" 5-part topics an event is published under (no owner)."""
    resource = event_type.split("_", 1)[0]
    return [
        f"customer_id:{customer_id}:{resource}:{resource_id}",
        f"customer_id:{customer_id}:{resource}:{event_type}:{resource_id}",
    ]


class WsConnection:
    """One client connection: its subscriptions, outgoing queue and counters."""

    def __init__(
        self,
        *,
        ws: web.WebSocketResponse,
        request: web.Request,
        identity: Identity,
        settings: SimSettings,
        faults: Faults,
        notify: Callable[[], None],
    ) -> None:
        self.ws = ws
        self.identity = identity
        #: Topics that receive events: subscribed, and their scope is bound.
        self.subscriptions: set[str] = set()
        #: Subscribed topics waiting for their scope's binding.
        self.pending: set[str] = set()
        #: Bound scopes, and the timers of those being bound.
        self._bound: set[str] = set()
        self._binding: dict[str, asyncio.TimerHandle] = {}
        #: The timers of frames held back by ``Faults.jitter_s``.
        self._late: dict[int, asyncio.TimerHandle] = {}
        self._late_seq = itertools.count()
        #: Frames queued for this client, handed to the socket, and dropped (queue full).
        self.offered = 0
        self.sent = 0
        self.dropped = 0
        self.closed = False
        self.close_reason = ""
        self.last_pong = time.monotonic()
        #: ``time.monotonic()`` of the upgrade, and of the first ``subscribe`` (``None`` before).
        self.connected_at = self.last_pong
        self.subscribed_at: float | None = None
        self._transport = request.transport
        self._settings = settings
        self._faults = faults
        self._notify = notify
        self._queue: asyncio.Queue[Frame] = asyncio.Queue(maxsize=max(1, settings.ws_queue_limit))

    def matches(self, topic: str) -> bool:
        """Whether any subscription is a string prefix of ``topic``."""
        return any(topic.startswith(sub) for sub in self.subscriptions)

    def offer(self, frame: Frame, *, faulty: bool = True) -> None:
        """Queue a frame (lost/duplicated/late per the fault knobs); drop it when the queue is
        full."""
        copies = self._faults.copies() if faulty else 1
        for _ in range(copies):
            late = self._faults.lateness() if faulty else 0.0
            if late <= 0:
                self._enqueue(frame)
                continue
            token = next(self._late_seq)
            loop = asyncio.get_running_loop()
            self._late[token] = loop.call_later(late, self._enqueue_late, token, frame)

    def _enqueue_late(self, token: int, frame: Frame) -> None:
        del self._late[token]
        if not self.closed:
            self._enqueue(frame)

    def _enqueue(self, frame: Frame) -> None:
        try:
            self._queue.put_nowait(frame)
            self.offered += 1
        except asyncio.QueueFull:
            self.dropped += 1
            self._notify()

    def abort(self, reason: str) -> None:
        """Drop the TCP connection without a close frame (the client sees 1006)."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        log.info("ws_dropped", reason=reason)
        if self._transport is not None:
            self._transport.close()
        self._notify()

    async def _send(self, frame: Frame) -> None:
        if isinstance(frame, bytes):
            await self.ws.send_bytes(frame)
        else:
            await self.ws.send_str(frame)
        self.sent += 1
        self._notify()

    async def writer(self) -> None:
        """Drain the queue onto the socket, optionally swapping adjacent frames."""
        try:
            while not self.closed:
                frame = await self._queue.get()
                if self._faults.reorder:
                    # Hold the frame briefly; if another arrives, maybe send that one first.
                    try:
                        nxt = await asyncio.wait_for(self._queue.get(), 0.02)
                    except TimeoutError:
                        nxt = None
                    if nxt is not None and self._faults.rng.random() < 0.5:
                        frame, nxt = nxt, frame
                    await self._send(frame)
                    if nxt is not None:
                        await self._send(nxt)
                    continue
                await self._send(frame)
        except (ConnectionError, RuntimeError):
            self.abort("write failed")

    async def keepalive(self) -> None:
        """Ping every ``ping_interval_s``; drop the client after ``pong_timeout_s`` with no pong."""
        loop = asyncio.get_running_loop()
        next_ping = loop.time() + self._settings.ping_interval_s
        try:
            while not self.closed:
                deadline = self.last_pong + self._settings.pong_timeout_s
                now_mono = time.monotonic()
                wait = min(next_ping - loop.time(), deadline - now_mono)
                if wait > 0:
                    await asyncio.sleep(wait)
                if time.monotonic() >= self.last_pong + self._settings.pong_timeout_s:
                    self.abort("pong timeout")
                    return
                if loop.time() >= next_ping:
                    await self.ws.ping(b"")
                    next_ping = loop.time() + self._settings.ping_interval_s
        except (ConnectionError, RuntimeError):
            self.abort("ping failed")

    def _apply(self, text: str) -> None:
        """Handle one client text frame (bad JSON and unknown types are ignored)."""
        try:
            msg = json.loads(text)
        except ValueError:
            return
        if msg is None:
            msg = {}
        if not isinstance(msg, dict):
            return
        kind = msg.get("type", "")
        topics = msg.get("topics")
        if topics is None:
            topics = []
        # Go's json.Unmarshal into {Type string; Topics []string} fails on other shapes: ignored.
        if not isinstance(kind, str) or not isinstance(topics, list):
            return
        if not all(isinstance(t, str) for t in topics):
            return
        if not all(topic_valid(t, self.identity) for t in topics):
            self.abort("invalid topic")
            return
        if kind == "subscribe":
            for topic in topics:
                self._subscribe(topic)
            if self.subscribed_at is None and topics:
                self.subscribed_at = time.monotonic()
        elif kind == "unsubscribe":
            for topic in topics:
                self._unsubscribe(topic)
        self._notify()

    def _subscribe(self, topic: str) -> None:
        pattern = bind_pattern(topic)
        if pattern in self._bound:
            self.subscriptions.add(topic)
            return
        self.pending.add(topic)
        if pattern in self._binding:
            return
        delay = self._settings.subscribe_bind_s
        if delay <= 0:
            self._bind(pattern)
            return
        loop = asyncio.get_running_loop()
        self._binding[pattern] = loop.call_later(delay, self._bind, pattern)

    def _bind(self, pattern: str) -> None:
        self._binding.pop(pattern, None)
        if self.closed:
            return
        self._bound.add(pattern)
        ready = {t for t in self.pending if bind_pattern(t) == pattern}
        self.pending -= ready
        self.subscriptions |= ready
        self._notify()

    def _unsubscribe(self, topic: str) -> None:
        self.subscriptions.discard(topic)
        self.pending.discard(topic)
        pattern = bind_pattern(topic)
        if any(bind_pattern(t) == pattern for t in self.subscriptions | self.pending):
            return
        # The last topic of a scope releases its binding (scoperefcount.go, Release).
        self._bound.discard(pattern)
        timer = self._binding.pop(pattern, None)
        if timer is not None:
            timer.cancel()

    def cancel_binds(self) -> None:
        """Forget pending bindings and held frames (the connection is gone)."""
        for timer in [*self._binding.values(), *self._late.values()]:
            timer.cancel()
        self._binding.clear()
        self._late.clear()

    async def reader(self) -> None:
        """Read client frames until the connection ends."""
        while not self.closed:
            msg = await self.ws.receive()
            if msg.type == WSMsgType.TEXT:
                self._apply(msg.data)
            elif msg.type == WSMsgType.BINARY:
                self.abort("binary frame")
            elif msg.type == WSMsgType.PING:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.ws.pong(msg.data)
            elif msg.type == WSMsgType.PONG:
                self.last_pong = time.monotonic()
            elif msg.type == WSMsgType.CLOSE:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.ws.close()
                self.closed = True
                self.close_reason = "client closed"
            else:  # CLOSED, CLOSING, ERROR
                self.closed = True
                self.close_reason = self.close_reason or "connection lost"


class Hub:
    """All live connections and the fan-out of published events."""

    def __init__(self, customer_id: str, settings: SimSettings, notify: Callable[[], None]) -> None:
        self.customer_id = customer_id
        self.settings = settings
        self.faults: Faults | None = None
        self.connections: list[WsConnection] = []
        self._notify = notify

    def publish(self, event_type: str, payload: dict[str, Any]) -> None:
        """Fan an event out to every connection with a matching subscription, per topic."""
        if self.settings.wrapped_frames:
            body: dict[str, Any] = {"type": event_type, "data": payload}
        else:
            body = payload
        frame = json.dumps(body, separators=(",", ":"))
        topics = topics_for(self.customer_id, event_type, str(payload.get("id", "")))
        for conn in list(self.connections):
            if conn.closed:
                continue
            for topic in topics:
                if conn.matches(topic):
                    conn.offer(frame)

    def drop_all(self) -> None:
        """Abruptly close every connection."""
        for conn in list(self.connections):
            conn.abort("fault: drop_websockets")

    async def send_raw(self, frame: Frame) -> None:
        """Queue ``frame`` verbatim to every open connection (no fault knobs applied)."""
        for conn in list(self.connections):
            if not conn.closed:
                conn.offer(frame, faulty=False)
        await asyncio.sleep(0)

    async def serve(self, request: web.Request, identity: Identity) -> web.StreamResponse:
        """Upgrade ``request`` and run the connection until it ends."""
        ws = web.WebSocketResponse(autoping=False, heartbeat=None, max_msg_size=0)
        if not ws.can_prepare(request).ok:
            # gorilla's plain-text answer to a non-WebSocket GET.
            return web.Response(status=400, text="Bad Request")
        assert self.faults is not None
        await ws.prepare(request)
        conn = WsConnection(
            ws=ws,
            request=request,
            identity=identity,
            settings=self.settings,
            faults=self.faults,
            notify=self._notify,
        )
        self.connections.append(conn)
        self._notify()
        writer = asyncio.create_task(conn.writer(), name="sim-ws-writer")
        keepalive = asyncio.create_task(conn.keepalive(), name="sim-ws-keepalive")
        try:
            await conn.reader()
        finally:
            conn.closed = True
            conn.cancel_binds()
            for task in (writer, keepalive):
                task.cancel()
            for task in (writer, keepalive):
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            with contextlib.suppress(ValueError):
                self.connections.remove(conn)
            self._notify()
        return ws
