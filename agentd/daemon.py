"""The daemon: wires config, REST client, backend, dispatcher, executor and stream together."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from typing import Any

import structlog

from agentd.backends import Backend
from agentd.backends.echo import EchoBackend
from agentd.commands import Record
from agentd.config import Config, ConfigError
from agentd.dispatcher import Dispatcher
from agentd.events import CallEvent, TranscriptEvent, parse_object
from agentd.executor import Executor
from agentd.stream import EventStream
from agentd.voipbin import ApiError, Credentials, VoipbinClient

log = structlog.get_logger("agentd.daemon")


def make_backend(config: Config) -> Backend:
    """The configured backend kind."""
    kind = config.backend["kind"]
    if kind == "echo":
        return EchoBackend(config.backend["prefix"])
    raise ConfigError(f"backend.kind: unknown kind {kind!r}")


def make_client(config: Config) -> VoipbinClient:
    """A REST client with the configured credentials and budget."""
    v = config.voipbin
    creds = Credentials(
        accesskey=v.accesskey, token=v.token, username=v.username, password=v.password
    )
    return VoipbinClient(
        v.api_url, creds, rate_per_s=v.rate_per_s, burst=v.burst, timeout_s=v.timeout_s
    )


class Daemon:
    """One agentd process: serves every call that is ours until stopped."""

    def __init__(self, config: Config, *, backend: Backend | None = None) -> None:
        self.config = config
        self.client = make_client(config)
        self.backend = backend or make_backend(config)
        self.records: list[Record] = []
        self.dispatcher = Dispatcher(
            lambda: self.config.call, self._execute, numbers=config.numbers
        )
        self.executor = Executor(
            self.client,
            self.backend,
            self.dispatcher.feed,
            backend_timeout_s=float(config.backend["timeout_s"]),
            on_record=self._record,
            on_finished=self.dispatcher.finished,
        )
        self.stream = EventStream(
            config.voipbin.ws_url,
            auth=self.client.auth,
            customer_id=self.client.customer_id,
            on_parsed=self.dispatcher.on_parsed,
            on_ready=self._on_ready,
            reauth=lambda: self.client.reauthenticate(self.client.credentials.token),
        )
        self.started_at = time.monotonic()
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self.record_limit = 1000

    def _execute(self, call_id: str, commands: list[Any]) -> None:
        self.executor.execute(call_id, commands)

    def _record(self, record: Record) -> None:
        self.records.append(record)
        if len(self.records) > self.record_limit:
            del self.records[: len(self.records) - self.record_limit]

    def _on_ready(self, first: bool) -> None:
        log.info("stream.ready", first=first, live_calls=len(self.dispatcher.calls))
        task = asyncio.get_running_loop().create_task(self.reconcile())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def reconcile(self) -> None:
        """After every subscribe: check known calls, pick up answered calls we missed, and read
        back transcripts that arrived while we were not listening."""
        self.dispatcher.reconcile()
        try:
            calls = await self.client.list_calls()
        except ApiError as exc:
            log.warning("reconcile.failed", error=str(exc))
            return
        for raw in calls:
            parsed = parse_object(raw)
            event = getattr(parsed, "event", None)
            if isinstance(event, CallEvent) and event.call.status == "progressing":
                self.dispatcher.on_event(event)
        for call in list(self.dispatcher.calls.values()):
            if call.transcribe_id and call.phase.live:
                try:
                    async for t in self.client.transcripts(call.transcribe_id):
                        parsed = parse_object(t)
                        event = getattr(parsed, "event", None)
                        if isinstance(event, TranscriptEvent):
                            self.dispatcher.on_event(event)
                except ApiError as exc:
                    log.warning("reconcile.transcripts_failed", call_id=call.id, error=str(exc))

    async def run(self) -> None:
        """Serve until `stop()`; then end live calls and clean up every session."""
        log.info(
            "agentd.start",
            api_url=self.config.voipbin.api_url,
            numbers=list(self.config.numbers) or "all",
            backend=self.config.backend["kind"],
        )
        stream_task = asyncio.get_running_loop().create_task(self.stream.run())
        try:
            await self._stop.wait()
        finally:
            self.dispatcher.accepting = False
            await self._drain()
            stream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await stream_task
            for task in list(self._tasks):
                task.cancel()
            await self.executor.close()
            await self.backend.aclose()
            await self.client.close()
            log.info("agentd.stopped")

    async def _drain(self) -> None:
        """End every live call and wait (up to drain_s) until their sessions are stopped."""
        live = self.dispatcher.live_calls()
        if not live:
            return
        log.info("agentd.draining", live_calls=len(live))
        for call in live:
            self._execute(call.id, call.shutdown())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.dispatcher.wait_idle(), self.config.drain_s)
        left = self.dispatcher.live_calls()
        if left:
            log.error("agentd.drain_incomplete", calls=[c.id for c in left])

    def stop(self) -> None:
        """Ask `run()` to finish."""
        self._stop.set()

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT stop the daemon gracefully."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
