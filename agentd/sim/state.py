"""The simulator's shared state: resources, the event log, change notification and task tracking."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any

import structlog

from agentd.sim.clock import UniqueClock
from agentd.sim.model import JSON, SimCall, SimGroupcall, SimSpeaking, SimTranscribe, SimTranscript
from agentd.sim.settings import SimSettings

log = structlog.get_logger("agentd.sim")

#: Safety net for predicates that depend on time alone: re-check this often even without changes.
_WAIT_TICK_S = 0.05


class World:
    """Everything the REST handlers, the call engine and the caller scripts share.

    Every state change calls :meth:`notify`, which wakes :meth:`wait_for` waiters.
    """

    def __init__(
        self,
        settings: SimSettings,
        customer_id: str,
        publish: Callable[[str, JSON], None],
    ) -> None:
        self.settings = settings
        self.customer_id = customer_id
        self.clock = UniqueClock()
        self.calls: dict[str, SimCall] = {}
        self.groupcalls: dict[str, SimGroupcall] = {}
        self.transcribes: dict[str, SimTranscribe] = {}
        self.transcripts: dict[str, SimTranscript] = {}
        self.speakings: dict[str, SimSpeaking] = {}
        self.transfers: dict[str, JSON] = {}
        #: Every event published, in order: ``(event_type, payload)``.
        self.events: list[tuple[str, JSON]] = []
        #: ``time.monotonic()`` of each entry of :attr:`events`, when it was published.
        self.event_times: list[float] = []
        self._publish = publish
        self._waiters: set[asyncio.Future[None]] = set()
        self._tasks: set[asyncio.Task[Any]] = set()

    # -- change notification ----------------------------------------------------------------------

    def notify(self) -> None:
        """Wake every :meth:`wait_for` so it re-evaluates its predicate."""
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float | None = 5.0) -> None:  # noqa: ASYNC109 (public API)
        """Return once ``predicate()`` is true; raises ``TimeoutError`` after ``timeout`` s."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while not predicate():
                fut: asyncio.Future[None] = loop.create_future()
                self._waiters.add(fut)
                handle = loop.call_later(_WAIT_TICK_S, _wake, fut)
                try:
                    await fut
                finally:
                    handle.cancel()
                    self._waiters.discard(fut)

    # -- events -----------------------------------------------------------------------------------

    def emit(self, event_type: str, payload: JSON) -> None:
        """Record and publish an event (to WebSocket subscribers), then notify."""
        self.events.append((event_type, payload))
        self.event_times.append(time.monotonic())
        self._publish(event_type, payload)
        self.notify()

    # -- tasks ------------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """Run ``coro`` as a tracked background task (cancelled on stop; errors logged)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("sim_task_failed", task=task.get_name(), exc_info=task.exception())
        self.notify()

    async def cancel_all(self) -> None:
        """Cancel every background task and wait for them to finish."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- queries ----------------------------------------------------------------------------------

    def speakings_of(self, call_id: str) -> list[SimSpeaking]:
        """Speaking sessions that reference ``call_id``."""
        return [s for s in self.speakings.values() if s.reference_id == call_id]

    def transcribes_of(self, call_id: str) -> list[SimTranscribe]:
        """Transcribe sessions that reference ``call_id``."""
        return [t for t in self.transcribes.values() if t.reference_id == call_id]

    def agent_busy(self, call_id: str) -> bool:
        """Whether agent audio is playing or queued on the call."""
        return any(s.busy for s in self.speakings_of(call_id))

    def leaks(self) -> list[JSON]:
        """Sessions still open on ended calls (a speaking is never stopped by a hangup) that
        the client did not delete: see :meth:`stranded` for the ones it did."""
        out: list[JSON] = []
        for spk in self.speakings.values():
            call = self.calls.get(spk.reference_id)
            if (
                call is not None
                and call.ended
                and spk.status in ("initiating", "active")
                and spk.tm_delete is None
            ):
                out.append(
                    {"kind": "speaking", "id": spk.id, "call_id": call.id, "status": spk.status}
                )
        for trn in self.transcribes.values():
            call = self.calls.get(trn.reference_id)
            if call is not None and call.ended and trn.status == "progressing":
                out.append(
                    {"kind": "transcribe", "id": trn.id, "call_id": call.id, "status": trn.status}
                )
        return out

    def stranded(self) -> list[str]:
        """Speakings a client deleted that still bill: their tts pod died, so nothing will ever
        stop them (``servicehandler/speaking.go`` deletes the row whatever the pod's stop did).
        The client did all the service allows; the bill is VoIPBIN's to fix."""
        return [
            spk.id
            for spk in self.speakings.values()
            if spk.tm_delete is not None and spk.status in ("initiating", "active")
        ]


def _wake(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
