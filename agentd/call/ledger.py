"""The cleanup ledger: what a call must still stop or have confirmed before it is `Finished`.

A speaking session is billed until it is stopped, and VoIPBIN does not stop it at hangup
(docs/protocol.md §8.4), so every stop is kept until VoIPBIN confirms it (200, or 404: already gone)
and retried ever less often (a minute apart at most) through any outage; it is given up only when
VoIPBIN refuses it (a 4xx) `max_stop_attempts` times. Our own hangup is kept until VoIPBIN
confirms it too.

A transcribe is ended by VoIPBIN itself when its call hangs up (bin-transcribe-manager
`subscribehandler/call_manager.go` → `transcribehandler/event.go` `EventCMCallHangup` → `Stop`,
which sets `done` and publishes `transcribe_done`): at a hangup it is *awaited* rather than
stopped. An awaited session still keeps the call from being finished and is still saved for a
restart (which stops it); the call sends the stop after all when its end does not come in time.

Per session:   UNKNOWN ─stop→ PENDING ─ok→ CONFIRMED      PENDING ─failed→ PENDING (retry)
               UNKNOWN ─expect→ AWAITING ─ended→ CONFIRMED   AWAITING ─stop→ PENDING (too late)
               UNKNOWN / PENDING ─ended (by itself)→ CONFIRMED
               CONFIRMED ─stop / ok / ended / expect→ CONFIRMED (nothing more to do)
               PENDING ─give up→ ABANDONED (after a bounded number of refusals)
Our hangup:    NONE ─request→ PENDING ─confirmed→ NONE     PENDING ─failed→ PENDING (retry)
A `failed` or `ok` for a session never stopped (UNKNOWN) is an answer to nothing: `Illegal`.
"""

from __future__ import annotations

import enum
from collections import OrderedDict

from agentd.call.session import SessionKind
from agentd.call.table import Illegal


class StopState(enum.Enum):
    """How far a session's stop has got."""

    UNKNOWN = "unknown"  # never asked to stop
    AWAITING = "awaiting"  # left to end by itself (a transcribe at hangup): no stop sent yet
    PENDING = "pending"
    CONFIRMED = "confirmed"
    ABANDONED = "abandoned"  # every stop and delete failed: reported, no longer retried


class StopInput(enum.Enum):
    """What happened to a session's stop."""

    STOP = "stop"
    OK = "ok"
    FAILED = "failed"
    ENDED = "ended"  # the session ended by itself (a transcribe `done`)
    EXPECT = "expect"  # it will end by itself (a transcribe at hangup): await that, no stop
    GIVE_UP = "give_up"


U, P, C, A = StopState.UNKNOWN, StopState.PENDING, StopState.CONFIRMED, StopState.ABANDONED
W = StopState.AWAITING
STOP_TABLE: dict[tuple[StopState, StopInput], StopState] = {
    (U, StopInput.STOP): P,
    (U, StopInput.EXPECT): W,
    (W, StopInput.EXPECT): W,
    (W, StopInput.STOP): P,  # its end did not come in time (or cannot be waited for): stop it
    (W, StopInput.ENDED): C,
    (P, StopInput.EXPECT): P,  # a stop is under way already: it stays the way to the end
    (C, StopInput.EXPECT): C,
    (A, StopInput.EXPECT): A,
    (P, StopInput.STOP): P,
    (C, StopInput.STOP): C,
    (P, StopInput.OK): C,
    (C, StopInput.OK): C,
    (P, StopInput.FAILED): P,
    (C, StopInput.FAILED): C,  # an old failure after a later success: still stopped
    (U, StopInput.ENDED): C,
    (P, StopInput.ENDED): C,
    (C, StopInput.ENDED): C,
    (P, StopInput.GIVE_UP): A,
    # a late answer to a stop given up on: it did end after all
    (A, StopInput.OK): C,
    (A, StopInput.ENDED): C,
    (A, StopInput.FAILED): A,
    (A, StopInput.STOP): A,
}
del U, P, C, A, W

_CONFIRMED_KEEP = 4000  # stopped ids remembered, so a late duplicate stop is not sent again


class Ledger:
    """Unconfirmed stops and our unconfirmed hangup."""

    __slots__ = (
        "_abandoned",
        "_confirmed",
        "awaiting",
        "hangup_failures",
        "hangup_pending",
        "pending",
        "sweep_failures",
        "sweep_needed",
        "sweeping",
        "transcribe_sweep_failures",
        "transcribes_to_sweep",
        "transcribes_unsure",
    )

    def __init__(self) -> None:
        self.pending: dict[str, tuple[SessionKind, int]] = {}  # id -> (kind, attempts)
        self.awaiting: dict[str, SessionKind] = {}  # id -> kind: to end by itself, not stopped
        self._confirmed: OrderedDict[str, None] = OrderedDict()
        self._abandoned: dict[str, SessionKind] = {}
        self.hangup_pending = False
        self.hangup_failures = 0  # our hangup answered with an error, times in a row
        # a session may exist whose id we never learned (a crash or a lost create answer)
        self.sweep_needed = False
        # a sweep is under way or to be tried again: the call is not finished before it is done
        # (its speakings bill on, and a finished call is not restored to sweep them)
        self.sweeping = False
        self.sweep_failures = 0
        # a transcribe start was under way when the last agentd died: VoIPBIN may create it
        # after the next agentd started its own (its duplicate check comes first)
        self.transcribes_unsure = False
        # the call ended while that was so: its transcribes are looked for once such a start
        # must have made its one (no hangup ends a transcribe made after it); then it is done
        self.transcribes_to_sweep = False
        self.transcribe_sweep_failures = 0  # its lists failed, in a row (the speakings' apart)

    def state(self, sid: str) -> StopState:
        """The stop state of session `sid`."""
        if sid in self.pending:
            return StopState.PENDING
        if sid in self.awaiting:
            return StopState.AWAITING
        if sid in self._abandoned:
            return StopState.ABANDONED
        return StopState.CONFIRMED if sid in self._confirmed else StopState.UNKNOWN

    def step(self, sid: str, inp: StopInput, kind: SessionKind = "speaking") -> StopState:
        """Apply `inp` to the stop of `sid`; returns the new state."""
        old = self.state(sid)
        nxt = STOP_TABLE.get((old, inp))
        if nxt is None:
            raise Illegal("ledger", old.value, inp.value)
        if nxt is StopState.AWAITING:
            self.awaiting.setdefault(sid, kind)
        elif nxt is StopState.PENDING:
            k, attempts = self.pending.get(sid, (self.awaiting.pop(sid, kind), 0))
            self.pending[sid] = (k, attempts + 1)
        elif nxt is StopState.ABANDONED:
            k, _ = self.pending.pop(sid, (kind, 0))
            self._abandoned[sid] = k
        elif nxt is StopState.CONFIRMED:
            self.pending.pop(sid, None)
            self.awaiting.pop(sid, None)
            self._abandoned.pop(sid, None)
            self._confirmed[sid] = None
            if len(self._confirmed) > _CONFIRMED_KEEP:
                self._confirmed.popitem(last=False)
        return nxt

    def stop(self, sid: str, kind: SessionKind) -> bool:
        """Ask for `sid` to be stopped; True when a stop must be sent now (not already asked;
        an awaited end is given up on)."""
        if self.state(sid) not in (StopState.UNKNOWN, StopState.AWAITING):
            return False
        self.step(sid, StopInput.STOP, kind)
        return True

    def expect(self, sid: str, kind: SessionKind) -> bool:
        """Await the end `sid` comes to by itself instead of stopping it; True when it was
        not awaited, stopped or confirmed before (the caller then arms a late stop)."""
        if self.state(sid) is not StopState.UNKNOWN:
            return False
        self.step(sid, StopInput.EXPECT, kind)
        return True

    def attempts(self, sid: str) -> int:
        """Stops sent for `sid` so far (0: none pending)."""
        return self.pending[sid][1] if sid in self.pending else 0

    def kind_of(self, sid: str) -> SessionKind | None:
        """The kind of a pending stop or an awaited end."""
        entry = self.pending.get(sid)
        return entry[0] if entry else self.awaiting.get(sid)

    def known(self) -> frozenset[str]:
        """Every session this call asked to stop or left to end: never to be adopted again."""
        return frozenset((*self.pending, *self.awaiting, *self._confirmed, *self._abandoned))

    def unconfirmed(self) -> tuple[tuple[SessionKind, str], ...]:
        """Every stop not confirmed, given up ones and awaited ends included (for the store):
        a restart sends them all (again), and never adopts one of those sessions. An awaited
        end is not awaited across a restart: whether it came is unknown, and a stop is cheap."""
        pending = [(kind, sid) for sid, (kind, _) in self.pending.items()]
        awaited = [(kind, sid) for sid, kind in self.awaiting.items()]
        return (*pending, *awaited, *((kind, sid) for sid, kind in self._abandoned.items()))

    def restore(self, stops: list[tuple[SessionKind, str]]) -> None:
        """Stops left unconfirmed by the agentd before a restart."""
        for kind, sid in stops:
            self.pending[sid] = (kind, 1)

    def take_sweep(self) -> bool:
        """Whether a sweep of the call's speakings is owed (then it is not any more)."""
        owed, self.sweep_needed = self.sweep_needed, False
        return owed

    @property
    def clean(self) -> bool:
        """Nothing left to stop, confirm, sweep or await."""
        return (
            not self.pending
            and not self.awaiting
            and not self.hangup_pending
            and not self.sweeping
            and not self.transcribes_to_sweep
        )
