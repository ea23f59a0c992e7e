"""Webhook delivery: every published event POSTed as ``{"type", "data"}`` to one URL.

VoIPBIN can deliver events to a customer's webhook instead of (or besides) the WebSocket; the
tutorials build agents that way. Each event is its own POST, sent concurrently (a slow receiver
delays nothing else), with a short timeout; failures are counted, never retried. Off until a URL is
set (``POST /_sim/bench/webhook``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import aiohttp
import structlog

log = structlog.get_logger("agentd.sim.webhook")


class Webhooks:
    """Delivers published events to :attr:`url` (``None`` = delivery off)."""

    def __init__(self, timeout_s: float = 10.0) -> None:
        self.url: str | None = None
        self.timeout_s = timeout_s
        #: POSTs answered 2xx, and POSTs that failed (error status, timeout, refused).
        self.delivered = 0
        self.failed = 0
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def set_url(self, url: str | None) -> None:
        """Deliver to ``url`` from now on (``None`` or empty stops delivery)."""
        self.url = url or None

    def offer(self, event_type: str, payload: dict[str, Any]) -> None:
        """POST the event in the background when delivery is on."""
        if self.url is None:
            return
        body = json.dumps({"type": event_type, "data": payload}, separators=(",", ":"))
        task = asyncio.get_running_loop().create_task(self._post(self.url, body))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _post(self, url: str, body: str) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.timeout_s)
            )
        try:
            async with self._session.post(
                url, data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                await resp.read()
                ok = resp.status < 300
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.info("webhook_failed", error=type(exc).__name__)
            ok = False
        if ok:
            self.delivered += 1
        else:
            self.failed += 1

    async def close(self) -> None:
        """Cancel deliveries in flight and close the HTTP session."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._session is not None:
            await self._session.close()
            self._session = None
