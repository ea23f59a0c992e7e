"""The executor: runs a call's commands and feeds every outcome back as a result event.

Commands of one call run in lanes: speaking commands (start, say, flush, stop) in order on one lane,
transcribe commands on another, call commands on a third, so says play in order and a stop comes
after the says it follows, while setting up the two sessions still happens in parallel. Backend
replies are tasks of their own and timers are loop callbacks: a slow backend never holds up any
lane or any other call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from agentd import fence, logs
from agentd.backends import Backend
from agentd.commands import (
    NOT_FOUND,
    ORPHAN,
    AskBackend,
    CallGone,
    CancelBackend,
    CancelTimer,
    CheckCall,
    Command,
    FetchTranscripts,
    FindTranscribe,
    Finished,
    Flush,
    Hangup,
    HangupDone,
    PollSpeaking,
    Record,
    Result,
    Say,
    SayFailed,
    SpeakingFailed,
    SpeakingStarted,
    StartSpeaking,
    StartTimer,
    StartTranscribe,
    Stopped,
    StopSpeaking,
    StopTranscribe,
    SweepDone,
    SweepSpeakings,
    SweepTranscribes,
    TimerFired,
    TranscribeFailed,
    TranscribesFound,
    TranscribeStarted,
    TranscriptsRead,
    Transfer,
    TransferDone,
    WriteAhead,
)
from agentd.events import CallEvent, Event, TranscriptEvent, event_of
from agentd.names import Kind, Timer
from agentd.reply import stream_reply
from agentd.secret import redact
from agentd.sentences import split_for_say
from agentd.voipbin import CALL_OVER, GONE, SAY_LIMIT_BYTES, ApiError, VoipbinClient

log = logs.get_logger("agentd.executor")

#: How long a speaking row left `initiating` by a create that failed is waited for before it is
#: taken for a dead pod's: the pod's external-media request alone may take 3 s
#: (bin-common-handler `requestTimeoutDefault`), queued behind its other work
SETUP_GRACE_S = 10.0

NO_BRIDGE = (
    "the caller is in no confbridge: a transfer needs the number's flow to `connect` the caller "
    "to a second leg (README: Transfers)"
)

Feed = Callable[[str, "Event | Result"], None]


@dataclass
class _Lanes:
    queues: dict[str, deque[Command]] = field(default_factory=dict)
    workers: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    timers: dict[Timer, asyncio.TimerHandle] = field(default_factory=dict)
    replies: dict[int, asyncio.Task[None]] = field(default_factory=dict)
    saying: Say | None = None  # the /say the speaking lane is running now
    cut: Say | None = None  # ... which a stop of its session cut short
    # the backend the call's replies come from: the one when the call began (a reload gives
    # new calls the new one; a live call keeps its own, as does a reply streaming from it)
    backend: Backend | None = None
    # the most characters a /say of the call carries: its own tts_provider's, kept as the
    # backend is (a reload that changes the provider does not re-cut a live call's replies)
    say_chars: int = SAY_LIMIT_BYTES


def _cancel_timer(lanes: _Lanes, timer: Timer) -> None:
    handle = lanes.timers.pop(timer, None)
    if handle is not None:
        handle.cancel()


class Executor:
    """Runs commands for every call; results go to `feed(call_id, result)`."""

    def __init__(
        self,
        client: VoipbinClient,
        backend: Backend,
        feed: Feed,
        *,
        backend_timeout_s: float = 15.0,
        clock: Callable[[], float] = time.monotonic,
        on_record: Callable[[Record], None] | None = None,
        on_finished: Callable[[str], None] | None = None,
        may_act: Callable[[str], bool] | None = None,
        on_fenced: Callable[[str], None] | None = None,
        say_chars: int = SAY_LIMIT_BYTES,
    ) -> None:
        self.client = client
        # the most characters a /say of a new call carries (`say_max_chars`)
        self.say_chars = say_chars
        self.setup_grace_s = SETUP_GRACE_S
        self.backend = backend
        self.feed = feed
        self.backend_timeout_s = backend_timeout_s
        self.clock = clock  # the dispatcher's: reply timings are compared with its times
        self.on_record = on_record
        self.on_finished = on_finished
        # replicas: a call's requests go out only while this replica holds its lease
        self.may_act = may_act
        self.on_fenced = on_fenced
        self._calls: dict[str, _Lanes] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self._retired: list[Backend] = []  # replaced by a reload, still used by live calls
        self._lane_moved: list[asyncio.Future[None]] = []  # `until_said` waits on them

    def execute(self, call_id: str, commands: list[Command]) -> None:
        """Schedule `commands`; never blocks."""
        if not commands:
            return  # most speech events: nothing to do, no lanes to make
        lanes = self._lanes(call_id)
        for cmd in commands:
            if isinstance(cmd, Record):
                self._record(cmd)
                continue
            log.info("command", call_id=call_id, **_describe(cmd))
            match cmd:
                case AskBackend():
                    self._spawn_reply(lanes, cmd)
                case CancelBackend():
                    task = lanes.replies.pop(cmd.turn, None)
                    if task is not None:
                        task.cancel()
                case StartTimer() | CancelTimer():
                    self._set_timer(call_id, lanes, cmd)
                case WriteAhead():
                    pass  # the daemon held the commands after it until the call was saved
                case Finished():
                    self._forget(call_id)
                case _:
                    self._enqueue(call_id, lanes, cmd)

    def _record(self, record: Record) -> None:
        """Log a record and hand it on (`on_record`: the daemon's store, metrics and traces)."""
        if record.what.warns:
            # a session agentd gave up stopping bills until someone stops it by hand
            loud = log.error if record.data.get("gave_up") else log.warning
            loud("command", call_id=record.call_id, **_describe(record))
        else:
            log.info("command", call_id=record.call_id, **_describe(record))
        if self.on_record is not None:
            self.on_record(record)

    def set_timers(self, call_id: str, timers: list[StartTimer | CancelTimer]) -> None:
        """Arm and cancel a call's timers (the dispatcher logged them on the step's line)."""
        lanes = self._lanes(call_id)
        for cmd in timers:
            self._set_timer(call_id, lanes, cmd)

    def _lanes(self, call_id: str) -> _Lanes:
        lanes = self._calls.get(call_id)
        if lanes is None:
            lanes = _Lanes(backend=self.backend, say_chars=self.say_chars)
            self._calls[call_id] = lanes
        return lanes

    def replace_backend(self, backend: Backend) -> None:
        """New calls get `backend`; the one it replaces is closed once no live call uses it."""
        if backend is self.backend:
            return
        self._retired.append(self.backend)
        self.backend = backend
        self._close_retired()

    def _close_retired(self) -> None:
        if not self._retired:
            return
        used = {id(lanes.backend) for lanes in self._calls.values()}
        for old in [b for b in self._retired if id(b) not in used]:
            self._retired.remove(old)
            self._spawn(old.aclose())

    def _set_timer(self, call_id: str, lanes: _Lanes, cmd: StartTimer | CancelTimer) -> None:
        _cancel_timer(lanes, cmd.timer)
        if isinstance(cmd, StartTimer):
            # a handle, not a task: timers are re-armed on nearly every event
            lanes.timers[cmd.timer] = asyncio.get_running_loop().call_later(
                cmd.delay_s, self._fire, call_id, cmd.timer
            )

    def _enqueue(self, call_id: str, lanes: _Lanes, cmd: Command) -> None:
        """A REST command waits its turn on its lane; the lane's worker runs them in order."""
        queue = lanes.queues.get(cmd.lane)
        if queue is None:
            queue = lanes.queues[cmd.lane] = deque()
        if isinstance(cmd, StopSpeaking) and cmd.abandon:
            _abandon_says(call_id, lanes, queue, cmd.speaking_id)
        elif isinstance(cmd, Flush):
            # a say in flight is not cut: it may be on the server already and play after the
            # flush (a stopped session refuses it; a flushed one does not)
            _abandon_says(call_id, lanes, queue, cmd.speaking_id, in_flight=False)
        queue.append(cmd)
        worker = lanes.workers.get(cmd.lane)
        if worker is None or worker.done():
            lanes.workers[cmd.lane] = worker = self._spawn(self._drain(call_id, queue, lanes))
            # a finished task keeps its coroutine and context: at a thousand calls, holding
            # on to the last one of each lane costs memory and GC time for nothing
            worker.add_done_callback(partial(_drop_task, lanes.workers, cmd.lane))

    def _forget(self, call_id: str) -> None:
        self._cancel(call_id)  # the lanes finish what they hold: the last stops
        if self.on_finished is not None:
            self.on_finished(call_id)

    def drop(self, call_id: str) -> None:
        """Stop everything of a call this replica lost, requests in flight too, silently:
        another replica serves it now."""
        self._cancel(call_id, lanes_too=True)

    def _cancel(self, call_id: str, *, lanes_too: bool = False) -> None:
        """Forget the call's lanes: cancel its timers and replies (and its lane workers)."""
        lanes = self._calls.pop(call_id, None)
        if lanes is None:
            return
        self._close_retired()
        if self._lane_moved:
            self._moved()
        for handle in lanes.timers.values():
            handle.cancel()
        if not lanes_too:
            for task in lanes.replies.values():
                task.cancel()
            return
        for task in (*lanes.replies.values(), *lanes.workers.values()):
            if task is not asyncio.current_task():  # the lane that found the lease gone
                task.cancel()

    def _spawn(self, coro: Any) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            exc = task.exception()
            log.error("task.crashed", error=redact(f"{type(exc).__name__}: {exc}"))

    async def close(self) -> None:
        """Cancel everything still running (timers, replies, lanes)."""
        for lanes in self._calls.values():
            for handle in lanes.timers.values():
                handle.cancel()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        retired, self._retired = self._retired, []
        for old in retired:  # the current one is the daemon's to close
            await old.aclose()

    # ---- lanes ---------------------------------------------------------------------------

    async def _drain(self, call_id: str, queue: deque[Command], lanes: _Lanes) -> None:
        may_act = self.may_act
        guard = fence.guarded(partial(may_act, call_id)) if may_act else contextlib.nullcontext()
        with logs.bound(call_id=call_id), guard:
            while queue:
                cmd = queue.popleft()
                if isinstance(cmd, Say):
                    cmd = lanes.saying = _merge_says(cmd, queue, lanes.say_chars)
                try:
                    result = await self._run(cmd)
                except asyncio.CancelledError:
                    if lanes.cut is not cmd:
                        raise
                    # the /say was cut short by the stop queued behind it; the lane goes on
                    lanes.cut = None
                    task = asyncio.current_task()
                    if task is not None and task.uncancel() > 0:
                        raise  # cancelled for good as well (the call dropped, agentd closing)
                    continue
                except fence.Fenced:
                    log.warning("command.fenced", command=type(cmd).__name__)
                    if self.on_fenced is not None:
                        self.on_fenced(call_id)
                    return
                except Exception as exc:  # a bug must not kill the lane: report and go on
                    log.exception(
                        "command.crashed", command=type(cmd).__name__, error=redact(str(exc))
                    )
                    result = _failure(cmd)  # so the call never waits for ever
                finally:
                    lanes.saying = None
                if result is not None:
                    try:
                        self.feed(call_id, result)
                    except Exception:
                        log.exception("feed.crashed", result=type(result).__name__)
                if self._lane_moved:
                    self._moved()

    def saying(self) -> bool:
        """Whether a `/say` of a live call is queued or in flight."""
        for lanes in self._calls.values():
            if lanes.saying is not None:
                return True
            for queue in lanes.queues.values():
                if any(isinstance(cmd, Say) for cmd in queue):
                    return True
        return False

    async def until_said(self) -> None:
        """Return once no `/say` is queued or in flight (a shutdown lets the replies out)."""
        while self.saying():
            moved = asyncio.get_running_loop().create_future()
            self._lane_moved.append(moved)
            try:
                await moved
            finally:
                if moved in self._lane_moved:
                    self._lane_moved.remove(moved)

    def _moved(self) -> None:
        """A lane ran a command, or a call's lanes were dropped: `until_said` looks again."""
        moved, self._lane_moved = self._lane_moved, []
        for fut in moved:
            if not fut.done():
                fut.set_result(None)

    async def _run(self, cmd: Command) -> Event | Result | None:
        runner = _RUNNERS.get(type(cmd))
        return None if runner is None else await runner(self, cmd)

    async def _start_transcribe(self, cmd: StartTranscribe) -> Result:
        try:
            tid = await self.client.start_transcribe(
                cmd.call_id, cmd.language, cmd.provider, cmd.direction
            )
        except ApiError as e:
            return TranscribeFailed(e.status, e.reason)
        return TranscribeStarted(tid)

    async def _find_transcribe(self, cmd: FindTranscribe) -> Result:
        try:
            found = await self.client.find_transcribe(cmd.call_id, cmd.language)
            if found and found in cmd.avoid:
                # the one we gave up on still says progressing (an orphan of a restarted pod
                # does): it blocks a new one with 409 until it is deleted
                log.warning("transcribe.orphan_deleted", transcribe_id=found)
                await self.client.delete_transcribe(found)
                return TranscribeFailed(409, ORPHAN)
        except ApiError as e:
            return TranscribeFailed(e.status, e.reason)
        return TranscribeStarted(found) if found else TranscribeFailed(404, NOT_FOUND)

    async def _sweep_transcribes(self, cmd: SweepTranscribes) -> Result:
        try:
            live = await self.client.live_transcribes(cmd.call_id, cmd.language)
        except ApiError as e:
            log.warning("sweep.failed", error=str(e))
            return TranscribesFound((), ok=False, status=e.status)
        return TranscribesFound(tuple(t for t in live if t != cmd.keep))

    async def _stop_transcribe(self, cmd: StopTranscribe) -> Result:
        c = self.client
        stop = c.delete_transcribe if cmd.delete else c.stop_transcribe
        status = await _stop(stop(cmd.transcribe_id))
        return Stopped("transcribe", cmd.transcribe_id, status is None, status or 0)

    async def _poll_speaking(self, cmd: PollSpeaking) -> Result:
        try:
            spk = await self.client.get_speaking(cmd.speaking_id)
        except ApiError as e:
            return SpeakingFailed(e.status, e.reason, cmd.speaking_id)
        return SpeakingStarted(cmd.speaking_id, str(spk.get("status", "")))

    async def _say(self, cmd: Say) -> Result | None:
        lanes = self._calls.get(cmd.call_id)
        limit = self.say_chars if lanes is None else lanes.say_chars
        for piece in split_for_say(cmd.text, SAY_LIMIT_BYTES, limit):
            try:
                await self.client.say(cmd.speaking_id, piece)
            except ApiError as e:
                return SayFailed(cmd.speaking_id, piece, cmd.turn, e.status)
        return None

    async def _flush(self, cmd: Flush) -> None:
        with contextlib.suppress(ApiError):
            await self.client.flush(cmd.speaking_id)  # 404: nothing was playing any more

    async def _stop_speaking(self, cmd: StopSpeaking) -> Result:
        sid = cmd.speaking_id
        if not cmd.delete:
            status = await _stop(self.client.stop_speaking(sid))
            return Stopped("speaking", sid, status is None, status or 0)
        status, running = await _stop_left(self.client.delete_speaking(sid))
        return Stopped("speaking", sid, status is None, status or 0, running)

    async def _hangup(self, cmd: Hangup) -> Result:
        try:
            await self.client.hangup(cmd.call_id)
        except ApiError as e:
            if e.status in (403, 404):
                return CallGone()
            log.warning("hangup.failed", error=str(e))
            return HangupDone(False)
        return HangupDone(True)

    async def _sweep(self, cmd: SweepSpeakings) -> Result:
        try:
            speakings = await self.client.list_speakings()
        except ApiError as e:
            log.warning("sweep.failed", error=str(e))
            return SweepDone(False, e.status)
        failure: int | None = None  # the first stop that failed: its status (0: no answer)
        for spk in speakings:
            if _billing(spk, cmd.call_id):
                sid = str(spk.get("id"))
                log.warning("sweep.stopping", speaking_id=sid)
                if await _stop(self.client.stop_speaking(sid)) is not None:
                    # its pod may be gone: only a delete ends it then
                    status, running = await _stop_left(self.client.delete_speaking(sid))
                    if status is not None:
                        failure = status if failure is None else failure  # swept again later
                    elif running:  # VoIPBIN bills it on: only its support can end it now
                        # the record a call makes of a session it knew (README: "leak")
                        leak = {
                            "kind": "speaking",
                            "session_id": sid,
                            "status": 200,
                            "gave_up": True,
                            "unstopped": True,
                        }
                        self._record(Record(cmd.call_id, Kind.LEAK, leak))
        return SweepDone(failure is None, failure or 0)

    async def _transfer(self, cmd: Transfer) -> Result:
        # VoIPBIN transfers only a call in a confbridge, and a blind transfer hangs up the
        # transferer: the caller's call must not be it. The number's flow `connect`s the caller
        # to a second leg; that leg is the transferer, and the caller stays, ringing the human
        # into their confbridge (docs/protocol.md §9, README "Transfers").
        try:
            call = event_of(await self.client.get_call(cmd.call_id))
            legs = call.call.chained_call_ids if isinstance(call, CallEvent) else ()
            if not legs:
                return TransferDone(False, NO_BRIDGE)
            await self.client.transfer(legs[0], cmd.number)
        except ApiError as e:
            return TransferDone(False, str(e))
        return TransferDone(True)

    async def _fetch_transcripts(self, cmd: FetchTranscripts) -> Result | None:
        # transcripts whose events were lost, among those seen: the call tells them apart
        try:
            read = await self.client.transcripts_in_order(cmd.transcribe_id)
        except ApiError as e:
            log.warning("fetch_transcripts.failed", error=str(e))
            return None
        events = (event_of(raw) for raw in read)
        return TranscriptsRead(tuple(ev for ev in events if isinstance(ev, TranscriptEvent)))

    async def _check_call(self, cmd: CheckCall) -> Event | Result | None:
        try:
            raw = await self.client.get_call(cmd.call_id, expected=CALL_OVER)
        except ApiError as e:
            if e.status in (403, 404, 409):
                return CallGone()
            log.warning("check_call.failed", error=str(e))
            return None
        event = event_of(raw)
        return replace(event, checked=True) if isinstance(event, CallEvent) else None

    async def _start_speaking(self, cmd: StartSpeaking) -> Result:
        c = self.client
        for _ in range(2):  # a second try only after deleting a dead session in the way
            sent = asyncio.get_running_loop().time()
            try:
                spk = await c.start_speaking(cmd.call_id, cmd.language, cmd.provider, cmd.voice_id)
                return SpeakingStarted(str(spk.get("id", "")), str(spk.get("status", "")))
            except ApiError as e:
                failure = SpeakingFailed(e.status, e.reason)
            if not (failure.status in (0, 409) or failure.status >= 500):
                return failure
            # one live session per call: it may exist already (a 409/500 says so), or the
            # create may have happened despite the error. Adopt an active one, unless the call
            # gave up on it: a dead pod's row stays active and blocks every create until it is
            # deleted.
            try:
                dead = []
                for row in await c.list_speakings():
                    if not _billing(row, cmd.call_id):
                        continue
                    sid, status = str(row.get("id")), str(row.get("status"))
                    if sid in cmd.avoid:
                        dead.append(sid)
                        continue
                    if status == "initiating":
                        status = await self._settled(sid, sent + self.setup_grace_s)
                    if status == "active":
                        log.info("speaking.adopted", speaking_id=sid)
                        return SpeakingStarted(sid, status)
                    if status == "initiating":
                        dead.append(sid)
                for sid in dead:
                    log.warning("speaking.dead_deleted", speaking_id=sid)
                    await c.delete_speaking(sid)
            except ApiError:
                return failure
            if not dead:
                return failure
        return failure

    async def _settled(self, speaking_id: str, until: float) -> str:
        """The status a row still `initiating` after our create failed settles on by `until`.

        A create slower than the gateway's 3 s budget answers 503 while the pod goes on (its
        request has no deadline) and then sets the row `active` whatever became of it meanwhile
        (bin-tts-manager `speakinghandler/speaking.go` Create): deleted now, it would stream on
        from a deleted row, billed and out of every client's reach. So it is waited for; one
        still `initiating` after `setup_grace_s` is the row of a pod that died inside the create
        (docs/protocol.md §8.3), which never becomes active."""
        loop = asyncio.get_running_loop()
        pause = 0.25
        while (left := until - loop.time()) > 0:
            await asyncio.sleep(min(pause, left))
            pause = min(2 * pause, 2.0)
            try:
                spk = await self.client.get_speaking(speaking_id, expected=GONE)
                status = str(spk.get("status", ""))
            except ApiError as e:
                if e.status == 404:
                    return "stopped"  # gone: nothing to adopt or delete
                continue
            if status != "initiating":
                return status
        return "initiating"

    # ---- backend replies -----------------------------------------------------------------

    def _spawn_reply(self, lanes: _Lanes, cmd: AskBackend) -> None:
        for turn, task in list(lanes.replies.items()):
            if turn < cmd.turn:  # a newer turn makes any older reply stale
                task.cancel()
                del lanes.replies[turn]
        task = lanes.replies[cmd.turn] = self._spawn(
            self._reply(cmd, lanes.backend or self.backend)
        )
        task.add_done_callback(partial(_drop_task, lanes.replies, cmd.turn))

    async def _reply(self, cmd: AskBackend, backend: Backend) -> None:
        with logs.bound(call_id=cmd.call_id, turn=cmd.turn):
            await stream_reply(
                backend,
                cmd,
                lambda result: self.feed(cmd.call_id, result),
                clock=self.clock,
                timeout_s=self.backend_timeout_s,
            )

    def _fire(self, call_id: str, timer: Timer) -> None:
        lanes = self._calls.get(call_id)
        if lanes is not None:
            lanes.timers.pop(timer, None)
        with logs.bound(call_id=call_id):
            self.feed(call_id, TimerFired(timer))


def _drop_task(tasks: dict[Any, asyncio.Task[None]], key: object, task: asyncio.Task[None]) -> None:
    """Forget a finished task, unless a newer one took its place."""
    if tasks.get(key) is task:
        del tasks[key]


def _billing(speaking: dict[str, Any], call_id: str) -> bool:
    """A speaking of `call_id` that is still live, so still billed."""
    return speaking.get("reference_id") == call_id and speaking.get("status") in (
        "initiating",
        "active",
    )


Runner = Callable[[Executor, Any], Awaitable["Event | Result | None"]]
# one row per command that runs on a lane: the coroutine that runs it
_RUNNERS: dict[type, Runner] = {
    StartTranscribe: Executor._start_transcribe,
    FindTranscribe: Executor._find_transcribe,
    StopTranscribe: Executor._stop_transcribe,
    SweepTranscribes: Executor._sweep_transcribes,
    StartSpeaking: Executor._start_speaking,
    PollSpeaking: Executor._poll_speaking,
    Say: Executor._say,
    Flush: Executor._flush,
    StopSpeaking: Executor._stop_speaking,
    Hangup: Executor._hangup,
    SweepSpeakings: Executor._sweep,
    Transfer: Executor._transfer,
    FetchTranscripts: Executor._fetch_transcripts,
    CheckCall: Executor._check_call,
}


async def _stop(coro: Awaitable[Any]) -> int | None:
    """Run a stop: None when done, else the failure's HTTP status (0: no answer).

    A 404 means already gone, which is as good as stopped."""
    return (await _stop_left(coro))[0]


async def _stop_left(coro: Awaitable[str | None]) -> tuple[int | None, bool]:
    """Run a stop or delete: as `_stop`, and whether VoIPBIN said it left the session running
    (a deleted speaking still `active`: the stop before the delete failed on its side)."""
    try:
        left = await coro
    except ApiError as e:
        if e.status == 404:
            return None, False
        log.warning("stop.failed", error=str(e))
        return e.status, False
    return None, left in ("active", "initiating")


def _failure(cmd: Command) -> Result | None:
    """What a command that crashed reports back: a plain failure the call knows how to handle."""
    match cmd:
        case StartTranscribe() | FindTranscribe():
            return TranscribeFailed(0, "crashed")
        case StartSpeaking():
            return SpeakingFailed(0, "crashed")
        case PollSpeaking():
            return SpeakingFailed(0, "crashed", cmd.speaking_id)
        case StopSpeaking():
            return Stopped("speaking", cmd.speaking_id, False)
        case StopTranscribe():
            return Stopped("transcribe", cmd.transcribe_id, False)
        case Hangup():
            return HangupDone(False)
        case SweepSpeakings():
            return SweepDone(False)  # tried again: the call waits for its sweep
        case Transfer():
            return TransferDone(False, "crashed")
    return None


def _abandon_says(
    call_id: str,
    lanes: _Lanes,
    queue: deque[Command],
    speaking_id: str,
    *,
    in_flight: bool = True,
) -> None:
    """The call is over, or the caller cut in, and a stop or flush of `speaking_id` is queued:
    what would still be said or flushed on that session is dropped, and (`in_flight`) a /say of
    it in flight (slow, or waiting out a 429) is cut short, so the cut goes out now. Nobody is
    to hear them any more: each would talk over the caller, spend the account's budget, or
    keep a billed session open, for no one."""
    kept = [c for c in queue if not (isinstance(c, _ON_SESSION) and c.speaking_id == speaking_id)]
    dropped = len(queue) - len(kept)
    if dropped:
        queue.clear()
        queue.extend(kept)
    saying = lanes.saying
    # a second stop of the session: the say is being cut already (another cancel would end
    # the lane)
    cut = (
        in_flight
        and saying is not None
        and saying.speaking_id == speaking_id
        and lanes.cut is not saying
    )
    worker = lanes.workers.get("speaking")
    if cut and worker is not None and not worker.done():
        lanes.cut = saying
        worker.cancel()
    if dropped or cut:
        log.info("says.abandoned", call_id=call_id, queued=dropped, in_flight=cut)


_ON_SESSION = (Say, Flush)


def _merge_says(first: Say, queue: deque[Command], max_chars: int = SAY_LIMIT_BYTES) -> Say:
    """Sentences queued behind a say on the same session go out as one request (saves budget),
    within the gateway's bytes and the provider's characters."""
    text = first.text
    while queue:
        nxt = queue[0]
        if not (
            isinstance(nxt, Say) and nxt.speaking_id == first.speaking_id and nxt.turn == first.turn
        ):
            break
        merged = f"{text} {nxt.text}"
        if len(merged.encode()) > SAY_LIMIT_BYTES or len(merged) > max_chars:
            break
        text = merged
        queue.popleft()
    if text == first.text:
        return first
    return Say(first.call_id, first.speaking_id, text, first.turn)


_IDS: dict[type, tuple[str, ...]] = {}


def _ids_of(kind: type) -> tuple[str, ...]:
    """The ids a command of this class carries, of those its log line shows (found once)."""
    ids = _IDS.get(kind)
    if ids is None:
        fields = getattr(kind, "__dataclass_fields__", {})
        names = ("speaking_id", "transcribe_id", "turn")
        ids = _IDS[kind] = tuple(n for n in names if n in fields or hasattr(kind, n))
    return ids


def _describe(cmd: Command) -> dict[str, Any]:
    out: dict[str, Any] = {"command": type(cmd).__name__}
    for name in _ids_of(type(cmd)):
        value = getattr(cmd, name, None)
        if value is not None:
            out[name] = value
    if isinstance(cmd, (StartTimer, CancelTimer)):  # a tuple: a union is built per call
        out["timer"] = str(cmd.timer)
    elif isinstance(cmd, Say):
        out["text"] = cmd.text
    elif isinstance(cmd, Record):
        out["what"] = cmd.what.value
        # an error record says what failed in data["what"]: shown as `detail`, not dropped
        data = {("detail" if k == "what" else k): v for k, v in cmd.data.items()}
        out.update({k: v for k, v in data.items() if k not in out})
    return out
