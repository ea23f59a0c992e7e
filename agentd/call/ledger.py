"""The cleanup ledger: what a call must still stop or have confirmed before it is `Finished`.

A speaking session is billed until it is stopped, and VoIPBIN does not stop it at hangup
(docs/protocol.md §8.4), so every stop is kept until VoIPBIN confirms it (200, or 404: already gone)
and retried ever less often, never given up. Our own hangup is kept until VoIPBIN confirms it too.

Per session:   UNKNOWN ─stop→ PENDING ─ok→ CONFIRMED      PENDING ─failed→ PENDING (retry)
               UNKNOWN / PENDING ─ended (by itself)→ CONFIRMED
               CONFIRMED ─stop / ok / ended→ CONFIRMED (nothing more to do)
               PENDING ─give up→ ABANDONED (after a bounded number of stops and deletes)
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
    PENDING = "pending"
    CONFIRMED = "confirmed"
    ABANDONED = "abandoned"  # every stop and delete failed: reported, no longer retried


class StopInput(enum.Enum):
    """What happened to a session's stop."""

    STOP = "stop"
    OK = "ok"
    FAILED = "failed"
    ENDED = "ended"  # the session ended by itself (a transcribe `done`)
    GIVE_UP = "give_up"


U, P, C, A = StopState.UNKNOWN, StopState.PENDING, StopState.CONFIRMED, StopState.ABANDONED
STOP_TABLE: dict[tuple[StopState, StopInput], StopState] = {
    (U, StopInput.STOP): P,
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
del U, P, C, A

_CONFIRMED_KEEP = 4000  # stopped ids remembered, so a late duplicate stop is not sent again


class Ledger:
    """Unconfirmed stops and our unconfirmed hangup."""

    __slots__ = ("_abandoned", "_confirmed", "hangup_pending", "pending", "sweep_needed")

    def __init__(self) -> None:
        self.pending: dict[str, tuple[SessionKind, int]] = {}  # id -> (kind, attempts)
        self._confirmed: OrderedDict[str, None] = OrderedDict()
        self._abandoned: dict[str, SessionKind] = {}
        self.hangup_pending = False
        # a session may exist whose id we never learned (a crash or a lost create answer)
        self.sweep_needed = False

    def state(self, sid: str) -> StopState:
        """The stop state of session `sid`."""
        if sid in self.pending:
            return StopState.PENDING
        if sid in self._abandoned:
            return StopState.ABANDONED
        return StopState.CONFIRMED if sid in self._confirmed else StopState.UNKNOWN

    def step(self, sid: str, inp: StopInput, kind: SessionKind = "speaking") -> StopState:
        """Apply `inp` to the stop of `sid`; returns the new state."""
        old = self.state(sid)
        nxt = STOP_TABLE.get((old, inp))
        if nxt is None:
            raise Illegal("ledger", old.value, inp.value)
        if nxt is StopState.PENDING:
            k, attempts = self.pending.get(sid, (kind, 0))
            self.pending[sid] = (k, attempts + 1)
        elif nxt is StopState.ABANDONED:
            k, _ = self.pending.pop(sid, (kind, 0))
            self._abandoned[sid] = k
        elif nxt is StopState.CONFIRMED:
            self.pending.pop(sid, None)
            self._abandoned.pop(sid, None)
            self._confirmed[sid] = None
            if len(self._confirmed) > _CONFIRMED_KEEP:
                self._confirmed.popitem(last=False)
        return nxt

    def stop(self, sid: str, kind: SessionKind) -> bool:
        """Ask for `sid` to be stopped; True when a stop must be sent now (not already asked)."""
        if self.state(sid) is not StopState.UNKNOWN:
            return False
        self.step(sid, StopInput.STOP, kind)
        return True

    def attempts(self, sid: str) -> int:
        """Stops sent for `sid` so far (0: none pending)."""
        return self.pending[sid][1] if sid in self.pending else 0

    def kind_of(self, sid: str) -> SessionKind | None:
        """The kind of a pending stop."""
        entry = self.pending.get(sid)
        return entry[0] if entry else None

    def known(self) -> frozenset[str]:
        """Every session this call asked to stop: never to be adopted again."""
        return frozenset((*self.pending, *self._confirmed, *self._abandoned))

    def unconfirmed(self) -> tuple[tuple[SessionKind, str], ...]:
        """Every stop not confirmed, given up ones included (for the store): a restart sends
        them all again, and never adopts one of those sessions."""
        pending = [(kind, sid) for sid, (kind, _) in self.pending.items()]
        return (*pending, *((kind, sid) for sid, kind in self._abandoned.items()))

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
        """Nothing left to stop or confirm."""
        return not self.pending and not self.hangup_pending
