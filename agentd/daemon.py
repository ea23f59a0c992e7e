"""The daemon: wires config, REST client, backend, dispatcher, executor and stream together."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import replace
from functools import partial
from typing import TYPE_CHECKING, Any, cast

from agentd import logs
from agentd.backends import Backend
from agentd.backends.echo import EchoBackend
from agentd.backoff import RECONCILE_BASE_S, RECONCILE_CAP_S, delays
from agentd.call import Call
from agentd.call.report import talked_over
from agentd.commands import (
    FetchTranscripts,
    Record,
    Result,
    StreamState,
    TranscriptsRead,
    WriteAhead,
)
from agentd.config import SHUTDOWN_HANG_UP_S, Config, ConfigError, load, restart_needed
from agentd.dispatcher import Dispatcher
from agentd.events import CallEvent, Event, TranscriptEvent, event_of
from agentd.executor import Executor
from agentd.names import Kind, normalise_number
from agentd.persist import Persister
from agentd.ratelimit import tool_budget
from agentd.replicas import Replica, new_replica_id
from agentd.sdnotify import Notifier, ProgressStamp, watchdog_loop
from agentd.secret import display_url
from agentd.status import (
    Connection,
    Counters,
    LiveCall,
    OwnerRow,
    ReplicaRow,
    Replicas,
    Snapshot,
    StatusError,
    StatusServer,
)
from agentd.store import CallRecord, CallStore, StoreError
from agentd.stores import open_store
from agentd.stream import EventStream
from agentd.voipbin import ApiError, Credentials, PermissionDenied, VoipbinClient, say_max_chars

if TYPE_CHECKING:
    from agentd.metrics import Metrics
    from agentd.otel import Tracing
    from agentd.store_pg import PgStore

log = logs.get_logger("agentd.daemon")


Gate = asyncio.Task[None]


def _int(value: object) -> int | None:
    return value if isinstance(value, int) else None


def _forget_gate(gates: dict[str, Gate], call_id: str, task: Gate) -> None:
    if gates.get(call_id) is task:  # a done task would keep its coroutine and context
        del gates[call_id]


def _writes_ahead(commands: list[Any]) -> bool:
    return any(isinstance(c, WriteAhead) for c in commands)


def make_backend(config: Config) -> Backend:
    """The configured backend kind. A python callable that cannot be imported is a config
    error, so agentd refuses to start (and SIGHUP keeps the old config) rather than failing at
    the first caller."""
    # imported here: the kinds a config does not use cost nothing at start
    from agentd.backends.http import HttpBackend
    from agentd.backends.openai import OpenAIBackend
    from agentd.backends.python import BackendConfigError, PythonBackend

    b = config.backend
    kind = b.kind
    if kind == "echo":
        return EchoBackend(b.prefix)
    if kind == "openai":
        return OpenAIBackend(
            base_url=b.base_url,
            model=b.model,
            api_key=b.api_key,
            temperature=b.temperature,
            max_tokens=b.max_tokens,
            tools=b.tools,
            timeout_s=b.timeout_s,
            transfer_numbers=config.call.transfer_numbers,
            usage=b.usage,
        )
    if kind == "http":
        return HttpBackend(url=b.url, api_key=b.api_key, timeout_s=b.timeout_s)
    if kind == "python":
        try:
            return PythonBackend(target=b.callable)
        except BackendConfigError as exc:
            raise ConfigError(f"backend.callable: {exc}") from None
    raise ConfigError(f"backend.kind: unknown kind {kind!r}")


TOOL_DEADLINE_S = 5.0  # a command line tool's retries of one request, at most


def make_client(config: Config, *, tool: bool = False) -> VoipbinClient:
    """A REST client with the configured credentials and budget; `tool`: a command line tool's
    small share of it (`agentd call`, `check-config`), spent beside a running daemon's."""
    v = config.voipbin
    creds = Credentials(
        accesskey=v.accesskey, token=v.token, username=v.username, password=v.password
    )
    rate, burst = tool_budget(v.rate_per_s, v.burst) if tool else (v.rate_per_s, v.burst)
    client = VoipbinClient(v.api_url, creds, rate_per_s=rate, burst=burst, timeout_s=v.timeout_s)
    if tool:
        # someone waits at a terminal: a VoIPBIN that does not answer is said within seconds
        client.deadline_s = TOOL_DEADLINE_S
    return client


RETENTION_EVERY_S = 3600.0  # how often ended calls past store.keep_days are deleted


async def prune_expired(store: CallStore, keep_days: float) -> int:
    """Delete the calls that ended more than `keep_days` ago (their transcripts, history and
    events with them); 0 keeps everything. A failed prune is logged, never fatal: the calls
    are served either way, and the next round tries again."""
    if keep_days <= 0:
        return 0
    try:
        deleted = await store.prune(keep_days * 86400.0)
    except StoreError as exc:
        log.error("store.prune_failed", error=str(exc))
        return 0
    if deleted:
        log.info("store.pruned", calls=deleted, keep_days=keep_days)
    return deleted


async def retention_loop(
    store: CallStore, keep_days: float, every_s: float = RETENTION_EVERY_S
) -> None:
    """Prune at start, then every `every_s`, until cancelled."""
    while True:
        await prune_expired(store, keep_days)
        await asyncio.sleep(every_s)


class Daemon:
    """One agentd process: serves every call that is ours until stopped."""

    def __init__(
        self,
        config: Config,
        *,
        backend: Backend | None = None,
        notifier: Notifier | None = None,
        ready_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        # what was read once at start and runs until a restart, whatever reloads came since:
        # each reload names what still differs from it
        self.started_config = config
        self.clock = clock  # one clock for the calls, the dispatcher and the executor
        self.notifier = notifier or Notifier(None)
        self.ready_timeout_s = ready_timeout_s
        self.progress = ProgressStamp()
        self.client = make_client(config)
        self.backend = backend or make_backend(config)
        self.records: list[Record] = []
        self.persister: Persister | None = None
        self.dispatcher = Dispatcher(
            lambda: self.config.call,
            self._execute,
            numbers=config.numbers,
            clock=clock,
            on_step=self._on_step,
            on_finished=self._on_finished,
        )
        self.executor = Executor(
            self.client,
            self.backend,
            self.dispatcher.feed,
            backend_timeout_s=config.backend.timeout_s,
            clock=clock,
            on_record=self._record,
            on_finished=self.dispatcher.finished,
            say_chars=say_max_chars(config.call.tts_provider),
        )
        self.dispatcher.set_timers = self.executor.set_timers
        self.stream = EventStream(
            config.voipbin.ws_url,
            auth=self.client.auth,
            customer_id=self.client.customer_id,
            on_parsed=self.dispatcher.on_parsed,
            on_ready=self._on_ready,
            on_lost=self._on_lost,
            reauth=lambda: self.client.reauthenticate(self.client.credentials.token),
            credential=lambda: self.client.credentials.sent,
        )
        self.started_at = clock()
        self._stop = asyncio.Event()
        self.stopped = asyncio.Event()  # set once run() has cleaned up and returned
        self._tasks: set[asyncio.Task[Any]] = set()
        self._gates: dict[str, asyncio.Task[None]] = {}  # per call: commands waiting for a save
        self._reconciling: asyncio.Task[None] | None = None  # running, or waiting to retry
        # several replicas on PostgreSQL: the leases this one holds (None: the only agentd)
        self.replica: Replica | None = None
        self._claims: dict[str, asyncio.Task[bool]] = {}  # first claims of new calls
        self.record_limit = 1000
        # observability: `agentd status` (agentd/status.py) and Prometheus (agentd/metrics.py)
        self.tallies: Counter[Kind] = Counter()  # records by `what` since start
        self.call_seen: dict[str, float] = {}  # call id -> when this agentd took it on
        self.status_server: StatusServer | None = None
        self.metrics: Metrics | None = None
        if config.metrics_listen:
            from agentd.metrics import Metrics  # prometheus_client only when metrics are on

            self.metrics = Metrics(config.metrics_listen, self._live_metrics)
        self.tracing: Tracing | None = None
        if config.otel.enabled:
            from agentd.otel import Tracing  # OpenTelemetry only when traces are on

            self.tracing = Tracing(config, clock=clock)

    def _execute(self, call_id: str, commands: list[Any]) -> None:
        """Run a call's commands; a batch with a `WriteAhead` waits for the call's save, and
        with replicas a new call's batches wait for its lease.

        The call asks for the write-ahead before it creates a billed session: a crash right
        after POST /speakings must find the call in the store on restart, or nobody would ever
        stop that session. Later batches of the same call queue behind it to keep their order."""
        gate = self._gates.get(call_id)
        if not commands and gate is None and self.replica is None:
            return  # most speech events: nothing to run, nothing to order behind a gate
        if gate is not None and gate.done():
            del self._gates[call_id]
            gate = None
        replica = self.replica
        claims = replica is not None and call_id not in replica.held
        if replica is not None and not claims and not replica.holds(call_id):
            self._lose(call_id, "its lease lapsed: the store did not answer the renewals")
            return
        writes_ahead = self.persister is not None and _writes_ahead(commands)
        saving = None
        if writes_ahead and not claims and self.persister is not None:
            saving = self.persister.saving(call_id)
        if gate is None and saving is None and not claims:
            self.executor.execute(call_id, commands)
            return

        async def after(
            previous: asyncio.Task[None] | None, saving: asyncio.Task[None] | None
        ) -> None:
            if previous is not None:
                await asyncio.wait([previous])
            if replica is not None and call_id not in replica.held:
                if call_id not in self.dispatcher.calls or not await self._claimed(call_id):
                    return
                if writes_ahead and self.persister is not None:
                    saving = self.persister.saving(call_id)  # not saved before it was ours
            if saving is not None:
                await asyncio.wait([saving])
            if replica is not None and not replica.holds(call_id):
                return  # lost meanwhile: another replica serves it
            self.executor.execute(call_id, commands)

        task = asyncio.get_running_loop().create_task(after(gate, saving))
        self._gates[call_id] = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(partial(_forget_gate, self._gates, call_id))

    # ---- replicas: leases on the calls ---------------------------------------------------------

    async def _claimed(self, call_id: str) -> bool:
        """Claim a new call once, however many batches wait for it: True if it is ours."""
        task = self._claims.get(call_id)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._claim(call_id))
            self._claims[call_id] = task
            task.add_done_callback(lambda _: self._claims.pop(call_id, None))
        return await asyncio.shield(task)

    async def _claim(self, call_id: str) -> bool:
        assert self.replica is not None
        asking = self.dispatcher.calls.get(call_id)
        epoch = await self.replica.claim(call_id)
        if asking is None or self.dispatcher.calls.get(call_id) is not asking:
            return False  # dropped, or replaced by a takeover, while the claim was out
        if epoch is None:
            log.warning("call.refused", call_id=call_id, reason="the store does not answer")
            self._drop(call_id, never_ours=True, foreign=False)
            return False
        if epoch == 0:
            log.info("call.foreign", call_id=call_id, reason="another replica serves it")
            self._drop(call_id, never_ours=True)
            return False
        if epoch > 1:
            if await self._stored(call_id):
                # served before, by a replica that is gone: the call built here from one event
                # knows nothing of its greeting, sessions or turns; the store does
                self._drop(call_id, never_ours=True, foreign=False)
                await self._resume({call_id})
                return False
            if self.dispatcher.calls.get(call_id) is not asking:
                return False
            # its last owner died between its claim and its first write: it started nothing
            # (the write-ahead comes before any session), so the call is served as a new one.
            # Resumed from the empty store it would be forgotten, and claimed again for ever
        if self.persister is not None:
            self.persister.changed(asking)  # it was not saved while it was not ours yet
        return True

    async def _stored(self, call_id: str) -> bool:
        """Whether the store has the call; True when it cannot say (the resume from the store
        then logs why and leaves the call to the next claim)."""
        assert self.persister is not None
        try:
            return await cast("PgStore", self.persister.store).has_call(call_id)
        except StoreError:
            return True

    def _lose(self, call_id: str, reason: str, *, taken: bool = False) -> None:
        """This replica may no longer act on the call: another one serves it (`taken`), or
        will."""
        if self.replica is None or (held := self.replica.forget(call_id)) is None:
            return
        call = self.dispatcher.calls.get(call_id)
        if not taken and call is not None and self.persister is not None:
            # lapsed: the store may not have taken its last writes (a turn answered); written
            # when it answers again, unless another replica took the call over meanwhile
            self.replica.park(CallRecord(**call.snapshot()), held.epoch)
        self.replica.counters["lost"] += 1
        log.warning("call.lost", call_id=call_id, reason=reason)
        self._drop(call_id)

    def _drop(self, call_id: str, *, never_ours: bool = False, foreign: bool = True) -> None:
        """Forget the call here without touching it or its row in the store."""
        self.executor.drop(call_id)
        if self.persister is not None:
            self.persister.forget(call_id)
        self.call_seen.pop(call_id, None)
        if self.tracing is not None:
            self.tracing.dropped(call_id)
        gate = self._gates.pop(call_id, None)
        if gate is not None and gate is not asyncio.current_task():
            gate.cancel()
        self.dispatcher.disown(call_id, never_ours=never_ours, foreign=foreign)

    def _store_back(self) -> None:
        if self.dispatcher.accepting:
            # the calls refused while nobody could claim them are still up: find them
            self._reconcile_soon()

    def _on_fenced(self, call_id: str) -> None:
        self._lose(call_id, "its lease ran out before a request could go")

    async def _lease_loop(self, replica: Replica) -> None:
        """Heartbeat and renew every lease_s / 3; drop the calls lost or lapsed meanwhile; split
        the rate limit by the live replicas."""
        v = self.config.voipbin
        share = 1
        while True:
            try:
                for call_id in await replica.renew():
                    self._lose(call_id, "another replica took it over", taken=True)
                for call_id in replica.lapsed():
                    self._lose(call_id, "its lease lapsed: the store did not answer the renewals")
                await replica.beat(len(self.dispatcher.calls))
                if replica.replicas != share:
                    share = replica.replicas
                    self.client.limiter.set_budget(v.rate_per_s / share, v.burst / share)
                    rate = round(v.rate_per_s / share, 2)
                    log.info("replicas.changed", live=share, rate_per_s=rate)
            except Exception:  # a bug here must not stop the renewals: every call would go quiet
                log.exception("lease_loop.crashed")
            await asyncio.sleep(replica.renew_every_s)

    async def _takeover_loop(self, replica: Replica) -> None:
        """Take over the live calls whose owner stopped renewing, as a restart resumes them."""
        every_s = min(0.5, replica.lease_s / 6)
        while self.dispatcher.accepting:
            try:
                # first the last state of calls lost to a lapse, then (the database answering
                # again, after the others had the time to do the same) the takeovers. Settling
                # is asked after the read: the read may be what finds the database back
                if await replica.unpark():
                    expired = [c for c in await replica.expired() if c not in replica.held]
                    if replica.settling:
                        expired = []
                    taken = {c for c in expired if await replica.claim(c)}
                    if taken:
                        for call_id in taken & set(self.dispatcher.calls):
                            self._drop(call_id, foreign=False)  # a fresh claim of ours raced it
                        await self._resume(taken)
            except Exception:
                log.exception("takeover_loop.crashed")
            await asyncio.sleep(every_s)

    async def _resume(self, call_ids: set[str]) -> None:
        """Take over these calls from the store (their leases are ours now) and resume each."""
        assert self.persister is not None and self.replica is not None
        try:
            calls = await self.persister.restore(self.config.call, call_ids)
        except StoreError as exc:
            log.error("store.restore_failed", error=str(exc))
            calls = []
        for call_id in call_ids - {c.id for c in calls}:
            self.replica.forget(call_id)  # it ended meanwhile: nothing to serve
        # a late first claim of ours may serve one already
        self._adopt_restored([c for c in calls if c.id not in self.dispatcher.calls], True)

    def _adopt_restored(self, calls: list[Call], takeover: bool) -> None:
        """Serve calls restored from the store: check each, re-attach or clean up."""
        now = self.clock()
        deaf = not self.stream.ready.is_set()
        for call in calls:
            self.dispatcher.adopt(call)
            log.info("call.restored", call_id=call.id, phase=call.phase.value)
            self._execute(call.id, call.resume(now))
            if deaf and call.phase.live:
                # no subscription yet (a start, the stream down): the caller's silence is not
                # theirs, no reprompt nor "deaf transcribe" replaced until the stream is up
                self.dispatcher.feed(call.id, StreamState(False))
            if takeover and call.transcribe_id and call.phase.live:
                # the stream is up: what the caller said while nobody served the call reached
                # no replica (or one that left it alone); read it back. (After a restart the
                # reconcile on subscribing does it.)
                self._execute(call.id, [FetchTranscripts(call.id, call.transcribe_id)])
        if calls:
            log.info("agentd.restored", calls=len(calls), takeover=takeover)

    def _on_step(self, call: Call, event: Event | Result) -> None:
        if call.id not in self.call_seen:
            self.call_seen[call.id] = self.clock()
            if self.tracing is not None:
                self.tracing.started(call.id)
        # the store's outbox: taken even without a store, or the call would hold them after all
        left = call.history.take_left() if call.history.left else None
        if self.persister is None:
            return
        if self.replica is not None and not self.replica.holds(call.id):
            return  # not ours (yet): its owner saves it
        self.persister.changed(call)
        if left:
            self.persister.history_left(call.id, left)
        # a read-back's transcripts are stored too: those the stream lost are among them (the
        # store ignores the ones it has)
        if isinstance(event, TranscriptEvent):
            self.persister.transcript(call.id, event.id, event.direction, event.message)
        elif isinstance(event, TranscriptsRead):
            for t in event.transcripts:
                if isinstance(t, TranscriptEvent):
                    self.persister.transcript(call.id, t.id, t.direction, t.message)

    def _on_finished(self, call: Call | None, call_id: str) -> None:
        self.call_seen.pop(call_id, None)
        if self.replica is not None:
            # not released: the lease lapses after the end is written, so nobody takes it over.
            # Kept one more lease meanwhile: the commands queued behind the end (the sweep for a
            # session a dead owner never recorded) still go out under it
            asyncio.get_running_loop().call_later(
                self.replica.lease_s, self.replica.forget, call_id
            )
        if self.tracing is not None:
            self.tracing.finished(call_id, call)
        if self.persister is not None:
            self.persister.finished(call, call_id)

    def _record(self, record: Record) -> None:
        if record.what is not Kind.BARGE_IN or talked_over(record):
            self.tallies[record.what] += 1
        if self.metrics is not None:
            self.metrics.record(record)
        if self.tracing is not None:
            self.tracing.record(record, self.dispatcher.calls.get(record.call_id))
        if self.persister is not None:
            self.persister.record(record)
        self.records.append(record)
        if len(self.records) > self.record_limit:
            del self.records[: len(self.records) - self.record_limit]

    def _on_ready(self, first: bool) -> None:
        log.info("stream.ready", first=first, live_calls=len(self.dispatcher.calls))
        self.notifier.ready(self.status_line())
        # calls restored before it, or left by a lost subscription, were deaf until now (before
        # the read-back: its words count from now)
        self._stream_state(up=True)
        self._reconcile_soon()

    def _on_lost(self) -> None:
        self._stream_state(up=False)

    def _stream_state(self, *, up: bool) -> None:
        """Tell every live call whether the caller's words can reach us."""
        for call in list(self.dispatcher.calls.values()):
            if call.phase.live:
                self.dispatcher.feed(call.id, StreamState(up))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _reconcile_soon(self) -> None:
        """Reconcile in place of the one still running or waiting to retry: what that one reads
        may predate this subscribe, and two at once would read every page of calls twice."""
        previous = self._reconciling
        if previous is not None:
            previous.cancel()
        task = asyncio.get_running_loop().create_task(self._reconcile_after(previous))
        self._reconciling = task
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reconcile_after(self, previous: asyncio.Task[None] | None) -> None:
        if previous is not None:
            await asyncio.wait([previous])  # cancelled: let it unwind before this one reads
        await self.reconcile()

    async def _stop_taking_calls(self) -> None:
        """At a stop, before the drain: no new call, nor a reconcile still looking for them."""
        self.dispatcher.accepting = False
        if self._reconciling is not None:
            self._reconciling.cancel()
            await asyncio.wait([self._reconciling])

    async def reconcile(self) -> None:
        """After every subscribe: check known calls, pick up answered calls we missed, and read
        back transcripts that arrived while we were not listening."""
        self.dispatcher.reconcile()
        calls = await self._recent_calls()
        if calls is None:
            return
        for raw in calls:
            event = event_of(raw)
            if isinstance(event, CallEvent) and event.call.status == "progressing":
                self.dispatcher.on_event(replace(event, checked=True))  # VoIPBIN's state now
        for call in list(self.dispatcher.calls.values()):
            if call.transcribe_id and call.phase.live:
                self._execute(call.id, [FetchTranscripts(call.id, call.transcribe_id)])

    async def _find_calls_loop(self, every_s: float) -> None:
        """With the stream up, read the newest page of calls every `every_s`: an answered call
        of ours whose every event was lost (a subscription still taking effect, a client 2,000
        messages behind) is found by nothing else, and its caller would hear silence until
        VoIPBIN's one-hour cap. One request each time, the budget's lowest priority."""
        while self.dispatcher.accepting:
            await asyncio.sleep(every_s)
            reconciling = self._reconciling is not None and not self._reconciling.done()
            if not self.stream.ready.is_set() or reconciling:
                continue  # the next subscribe reconciles, or the one running finds them
            try:
                found = await self.client.recent_calls(max_pages=1)
            except ApiError as exc:
                log.warning("find_calls.failed", error=str(exc), retry_in_s=every_s)
                continue
            except Exception:  # a bug here must not end the look for the rest of the run
                log.exception("find_calls.crashed")
                continue
            self._found_calls(found)

    def _found_calls(self, found: list[dict[str, Any]]) -> None:
        """Calls read from VoIPBIN outside a reconcile: take up those answered we never saw;
        answer or end those of ours whose `progressing` or `call_hangup` was lost as well (the
        watch would find out only after `agent.watch_s` of quiet)."""
        calls = self.dispatcher.calls
        for raw in found:
            event = event_of(raw)
            if not isinstance(event, CallEvent):
                continue
            status, call_id = event.call.status, event.call.id
            known = calls.get(call_id)
            if known is not None:
                # a hangup is final, an answer news to a call still ringing: neither is stale
                if status == "hangup" or (status == "progressing" and known.phase.ringing):
                    self.dispatcher.on_event(replace(event, checked=True))
                continue
            if status != "progressing" or not self.dispatcher.unheard_of(call_id):
                continue  # (not counted again as ignored every time it is listed)
            if not self.dispatcher.accepting:
                return
            self.dispatcher.on_event(replace(event, checked=True))
            if call_id in calls:
                log.warning(
                    "call.missed",
                    call_id=call_id,
                    why="answered, and none of its events came: found by the look for calls",
                )

    async def _recent_calls(self) -> list[dict[str, Any]] | None:
        """The account's recent calls, asked for again after each failure while the stream is up
        and new calls are taken; None once it is not (the next subscribe reconciles anew).

        A call answered while the stream was down is found by this read only: given up after
        one failure (VoIPBIN answering 503 past the request's deadline), its caller would hear
        silence until VoIPBIN's one-hour cap."""
        waits = delays(RECONCILE_BASE_S, RECONCILE_CAP_S)
        while True:
            try:
                return await self.client.recent_calls()
            except ApiError as exc:
                error = str(exc)
            if not self.stream.ready.is_set() or not self.dispatcher.accepting:
                log.warning("reconcile.failed", error=error, retry="at the next subscribe")
                return None
            wait = next(waits)
            log.warning("reconcile.failed", error=error, retry_in_s=round(wait, 2))
            await asyncio.sleep(wait)
            if not self.stream.ready.is_set() or not self.dispatcher.accepting:
                return None  # lost meanwhile (its next subscribe reconciles), or stopping

    async def run(self) -> None:
        """Serve until `stop()`; then end live calls and clean up every session.

        Raises the stream's `PermissionDenied` (after the same clean-up) when VoIPBIN refuses
        the credentials a permission: `agentd run` exits non-zero with the reason."""
        log.info(
            "agentd.start",
            api_url=display_url(self.config.voipbin.api_url),
            numbers=list(self.config.numbers) or "all",
            backend=self.config.backend.kind,
        )
        store = await open_store(self.config)
        loop = asyncio.get_running_loop()
        helpers = []
        leases = None
        if store is not None:
            self.persister = Persister(store)
            if self.config.store_url is not None:
                replica = self._replica(cast("PgStore", store))
                # the calls the last agentd left are taken over as their leases expire
                self.dispatcher.remember_ended(await store.ended_call_ids())
                leases = loop.create_task(self._lease_loop(replica))
                helpers.append(loop.create_task(self._takeover_loop(replica)))
            else:
                await self._restore()
        await self._start_observability()
        stream_task = loop.create_task(self.stream.run())
        # the stream only ends by itself on a fatal refusal: stop rather than serve nothing
        stream_task.add_done_callback(lambda _: self._stop.set())
        helpers += self._background(stream_task)
        try:
            await self._stop.wait()
        finally:
            self.notifier.stopping()
            await self._stop_taking_calls()
            for task in helpers:
                task.cancel()
            await self._drain()  # the leases are still renewed meanwhile
            stream_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, PermissionDenied):
                await stream_task
            for task in list(self._tasks):
                task.cancel()
            await self.executor.close()
            await self.backend.aclose()
            await self.client.close()
            if self.persister is not None:
                await self.persister.flush()
            if leases is not None and self.replica is not None:
                leases.cancel()
                # after the flush: whoever takes the calls over reads their latest state
                await self.replica.leave()
            if self.persister is not None:
                await self.persister.store.close()
            await self._stop_observability()
            log.info("agentd.stopped")
            self.stopped.set()
        fatal = None if stream_task.cancelled() else stream_task.exception()
        if isinstance(fatal, PermissionDenied):
            raise fatal

    def _background(self, stream_task: asyncio.Task[None]) -> list[asyncio.Task[None]]:
        """The loops that run beside the stream until the stop: cancelled at its start."""
        loop = asyncio.get_running_loop()
        tasks = [
            loop.create_task(self._heartbeat(stream_task)),
            loop.create_task(watchdog_loop(self.notifier, self.progress.fresh_within(5.0))),
        ]
        every_s = self.config.voipbin.find_calls_s
        if every_s > 0:
            tasks.append(loop.create_task(self._find_calls_loop(every_s)))
        if self.persister is not None and self.config.store_keep_days > 0:
            keep = self.config.store_keep_days
            tasks.append(loop.create_task(retention_loop(self.persister.store, keep)))
        return tasks

    def _replica(self, store: PgStore) -> Replica:
        """This process as one of the replicas sharing `store`."""
        replica = Replica(
            store, new_replica_id(self.config.replica_name), lease_s=self.config.lease_s
        )
        self.replica = replica
        self.executor.may_act = replica.holds
        self.executor.on_fenced = self._on_fenced
        replica.on_reachable = self._store_back
        log.info("replica.start", replica_id=replica.id, lease_s=replica.lease_s)
        return replica

    async def _restore(self) -> None:
        """Pick up the calls the last agentd left live: check each, re-attach or clean up."""
        assert self.persister is not None
        self.dispatcher.remember_ended(await self.persister.store.ended_call_ids())
        self._adopt_restored(await self.persister.restore(self.config.call), False)

    async def _drain(self) -> None:
        """Let in-flight replies finish (up to drain_s). Then, when configured or without a
        store, end every live call with a goodbye and stop its sessions; otherwise leave the
        calls up, recorded in the store, for the next agentd to resume."""
        live = self.dispatcher.live_calls()
        if not live:
            return
        d = self.config.daemon
        stop = d.stop_sessions_on_shutdown or self.persister is None
        log.info("agentd.draining", live_calls=len(live), stop_sessions=stop)
        deadline = time.monotonic() + d.drain_s
        if stop:
            now = self.clock()
            for call in live:
                self._execute(call.id, call.shutdown(now, d.shutdown_goodbye))
            waiting = self.dispatcher.wait_idle()
        else:
            waiting = self._replies_out()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(waiting, max(0.0, deadline - time.monotonic()))
        left = self.dispatcher.live_calls()
        if left and stop:
            # a goodbye still playing (a long one, a slow VoIPBIN): hang up now, cutting it.
            # Left as it is, the caller stays on a call with no agent and, without a store, no
            # later agentd stops its sessions; the unit's TimeoutStopSec leaves room for this
            log.warning("agentd.drain_expired", calls=[c.id for c in left])
            now = self.clock()
            for call in left:
                self._execute(call.id, call.shutdown(now))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.dispatcher.wait_idle(), SHUTDOWN_HANG_UP_S)
            left = self.dispatcher.live_calls()
        if left and stop:
            self._drain_incomplete(left)
        elif left:
            log.info("agentd.left_for_restart", calls=[c.id for c in left])

    def _drain_incomplete(self, left: list[Call]) -> None:
        """The drain ran out with calls not clean: their stops were refused or unanswered
        (retried all the budget long). Named, session by session, for the operator. Without a
        store nothing stops them later: each is a `leak`, given up (an error, counted in
        `agentd_leaks_total`); with one, the next start stops them."""
        sessions = [
            {"call_id": c.id, "kind": kind, "session_id": sid}
            for c in left
            for kind, sid in c.unstopped()
        ]
        stored = self.persister is not None
        log.error(
            "agentd.drain_incomplete",
            calls=[c.id for c in left],
            sessions=sessions,
            hint="recorded in the store: the next start stops them"
            if stored
            else "no store: nothing will stop these sessions; stop them by hand",
        )
        if not stored:
            for call in left:
                self.executor.execute(call.id, call.left_running())

    async def _replies_out(self) -> None:
        """Until no live call prepares a reply and every `/say` queued has gone out (one may
        wait out a 429): the next agentd takes a turn saved as answered for said."""

        def none_replying() -> bool:
            return not any(c.replying for c in self.dispatcher.live_calls())

        while True:
            await self.dispatcher.wait_until(none_replying)
            await self.executor.until_said()
            if none_replying():
                return

    # ---- observability: the status socket and the metrics endpoint ----------------------------

    async def _start_observability(self) -> None:
        """Open the status socket and the metrics endpoint. Never fatal: agentd serves calls
        even when it cannot be watched, and says so in the log."""
        path = self.config.status_socket
        if path:
            server = StatusServer(path, self.status_snapshot)
            try:
                await server.start()
                self.status_server = server
            except (OSError, StatusError) as exc:
                log.error("status.unavailable", socket=path, error=str(exc))
        if self.metrics is not None:
            try:
                await self.metrics.start()
            except OSError as exc:
                log.error("metrics.unavailable", listen=self.config.metrics_listen, error=str(exc))

    async def _stop_observability(self) -> None:
        if self.status_server is not None:
            await self.status_server.close()
        if self.metrics is not None:
            await self.metrics.close()
        if self.tracing is not None:
            await self.tracing.close()

    def status_snapshot(self) -> Snapshot:
        """What `agentd status` shows, as plain values (agentd/status.py serves and renders it)."""
        now = self.clock()
        stats = self.stream.stats
        d = self.dispatcher

        def since(then: float | None, at: float = now) -> float | None:
            return None if then is None else at - then

        return Snapshot(
            uptime_s=since(self.started_at),
            accepting_calls=d.accepting,
            connection=Connection(
                state=stats.state,
                since_s=since(stats.connected_since),
                connects=stats.connects,
                reconnects=stats.reconnects,
                last_frame_age_s=since(stats.last_frame_at),
                last_error=stats.last_error or self._lookup_error(),
            ),
            last_event_age_s=since(d.last_event_at),
            calls=tuple(
                LiveCall(c.id, c.direction, c.phase.value, c.turn, since(self.call_seen.get(c.id)))
                for c in d.live_calls()
            ),
            counters=Counters(
                calls_served=self.tallies[Kind.ANSWERED],
                calls_taken=d.counters["calls"],
                events=d.counters["events"],
                duplicates=d.counters["duplicates"],
                ignored=d.counters["ignored"],
                rejected_frames=stats.rejected,
                reconnects=stats.reconnects,
                rest_errors=self.client.errors,
                rest_queue_depth=self.client.limiter.queue_depth,
                barge_ins=self.tallies[Kind.BARGE_IN],
                backend_failures=self.tallies[Kind.BACKEND_FAILED],
                leaks=self.tallies[Kind.LEAK],
                log_lines_dropped=logs.dropped(),
                store_write_failures=self._store_write_failures(),
                connections_lost=stats.lost,
                rest_requests_failed=self.client.failures,
            ),
            replicas=self._replicas_status(),
        )

    def _lookup_error(self) -> str:
        """Why the first lookup of our customer (before any connection) is being retried.
        Not once it succeeded: the first upgrade may then take its 10 s, and a retry the
        lookup needed is no error of the connection's any more."""
        stats = self.stream.stats
        first = stats.state == "connecting" and not (stats.connects or stats.reconnects)
        return self.client.last_retry if first and self.stream.customer_unknown else ""

    def _replicas_status(self) -> Replicas | None:
        r = self.replica
        if r is None:
            return None
        c = r.counters
        return Replicas(
            id=r.id,
            lease_s=r.lease_s,
            store_reachable=r.reachable,
            rate_per_s=self.client.limiter.rate,
            leases_held=len(r.held),
            live=tuple(
                ReplicaRow(
                    h.replica_id,
                    str(h.info.get("host", "")),
                    _int(h.info.get("pid")),
                    _int(h.info.get("calls")),
                    h.age_s,
                )
                for h in r.live
            ),
            owners=tuple(OwnerRow(o.call_id, o.owner, o.epoch, o.expires_in_s) for o in r.owners),
            claimed=c["claimed"],
            taken_by_others=c["taken_by_others"],
            takeovers=c["takeovers"],
            lost=c["lost"],
        )

    def _live_metrics(self) -> dict[str, float]:
        """What the metrics read at scrape time from the counters the daemon keeps anyway."""
        stats = self.stream.stats
        return {
            "reconnects": stats.reconnects,
            "connections_lost": stats.lost,
            "rest_errors": self.client.errors,
            "rest_requests_failed": self.client.failures,
            "rejected_frames": stats.rejected,
            "live_calls": len(self.dispatcher.live_calls()),
            "rest_queue_depth": self.client.limiter.queue_depth,
            "connected": 0.0 if stats.connected_since is None else 1.0,
            "log_lines_dropped": logs.dropped(),
            "store_write_failures": self._store_write_failures(),
            **self._replica_metrics(),
        }

    def _store_write_failures(self) -> int:
        # the journal's store.write_failed lines scroll by; a locked or unreachable store must
        # show where an operator looks without grepping for it
        return 0 if self.persister is None else self.persister.failures

    def _replica_metrics(self) -> dict[str, float]:
        r = self.replica
        if r is None:
            return {}
        return {
            "leases_held": len(r.held),
            "replicas_live": r.replicas,
            "store_reachable": 1.0 if r.reachable else 0.0,
            "lease_claims": r.counters["claimed"],
            "lease_claims_lost": r.counters["taken_by_others"],
            "takeovers": r.counters["takeovers"],
            "calls_lost": r.counters["lost"],
        }

    def status_line(self) -> str:
        """One line for systemd's STATUS= and `systemctl status`."""
        live = len(self.dispatcher.live_calls())
        return f"{live} live call{'s' if live != 1 else ''}, VoIPBIN {self.stream.stats.state}"

    async def _heartbeat(self, stream_task: asyncio.Task[None]) -> None:
        """Mark progress while the loop runs and the stream is alive; tell systemd the status.

        READY=1 is sent once subscribed — or after `ready_timeout_s` of trying, so a box that
        boots without network does not fail its start: the status line tells the truth."""
        started = time.monotonic()
        last = ""
        sent_ready = False
        while True:
            if not stream_task.done():
                self.progress.mark()
            line = self.status_line()
            if line != last:
                self.notifier.status(line)
                last = line
            if (
                not sent_ready
                and not self.stream.ready.is_set()
                and time.monotonic() - started > self.ready_timeout_s
            ):
                sent_ready = self.notifier.ready(line) or True
            await asyncio.sleep(1.0)

    def stop(self) -> None:
        """Ask `run()` to finish."""
        self._stop.set()

    def reload(self) -> None:
        """SIGHUP: re-read the config; new calls get the new greeting, backend and numbers."""
        if not self.config.source:
            log.warning("reload.skipped", reason="no config file")
            return
        if self._stop.is_set():
            # stopping takes no new call, and a backend made now, after the executor closed
            # the old ones, would never be closed; nor does systemd want RELOADING after STOPPING
            log.info("reload.skipped", reason="stopping")
            return
        self.notifier.reloading()
        try:
            fresh = load(self.config.source)
            backend = make_backend(fresh)
        except ConfigError as exc:
            log.error("reload.failed", error=str(exc), hint="keeping the running config")
            self.notifier.ready(self.status_line())
            return
        if needs_restart := restart_needed(self.started_config, fresh):
            log.warning("reload.restart_needed", keys=needs_restart, hint="kept until a restart")
        for warning in fresh.warnings:  # as at start: a doubtful voice is applied all the same
            log.warning("config.warning", warning=warning)
        # live calls keep the backend they began with (a reply streaming from the old one is
        # not cut); the executor closes it once the last of them is over
        self.backend = backend
        self.executor.replace_backend(backend)
        # as every [agent] setting, the provider's /say limit is for new calls: a live one
        # keeps its provider, and its replies are cut for it
        self.executor.say_chars = say_max_chars(fresh.call.tts_provider)
        self.config = fresh
        self.dispatcher.numbers = {normalise_number(n) for n in fresh.numbers}
        if left := self.dispatcher.left_to_others():
            # the new numbers are for new calls, as the rest: one not ours when it came has
            # something else serving it (a flow of its own), and it is not talked over mid-call
            hint = "live calls that came before their number was added; new calls are answered"
            log.info("reload.calls_left_alone", calls=left, hint=hint)
        log.info("reload.done", source=fresh.source)
        self.notifier.ready(self.status_line())

    def install_signal_handlers(self) -> None:
        """SIGTERM / SIGINT stop the daemon gracefully; SIGHUP reloads the config."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
