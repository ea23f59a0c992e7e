"""One machine for a call's billed sessions: the speaking (TTS) and the transcribe (STT).

    NONE ─start→ STARTING ─initiating→ INITIATING ─active→ ACTIVE ─cut→ STOPPING ─stopped→ STOPPED
      ↑  (STARTING ─active→ ACTIVE when the create says active, the usual case)        │
      └──────────────── failed / lost ───────────── STOPPED ─start→ STARTING (restart) ┘

A create is synchronous on VoIPBIN (docs/protocol.md §4.5): it answers `active` (speak at once) or
`initiating` (poll until active); a transcribe is active when created. `lost` is a session that
ended without us: a transcribe `done`, a `/say` or poll answered 404. `release` is the end of the
call: what must still be stopped is the cleanup ledger's business from then on; a create still in
flight stays STARTING until its answer comes (and is then stopped). `verify` is a restart that
remembers a session id whose state it must poll.

Every input here comes from agentd (its commands and their results), so an input with no row
raises `Illegal` and leaves the machine as it was.
"""

from __future__ import annotations

import enum
from typing import Literal

from agentd.call.table import Illegal

SessionKind = Literal["speaking", "transcribe"]


class SessionState(enum.Enum):
    """Where a session is."""

    NONE = "none"
    STARTING = "starting"  # a create is in flight
    INITIATING = "initiating"  # created, not active yet: polled
    ACTIVE = "active"
    STOPPING = "stopping"  # stopped to cut the audio; a new one follows
    STOPPED = "stopped"


class SessionInput(enum.Enum):
    """What happened to the session."""

    START = "start"
    VERIFY = "verify"
    INITIATING = "initiating"
    ACTIVE = "active"
    FAILED = "failed"
    CUT = "cut"
    STOPPED = "stopped"
    LOST = "lost"
    RELEASE = "release"
    ABANDON = "abandon"  # a create answered after the call ended: the ledger stops it


S, In = SessionState, SessionInput
_HAS_ID = (S.INITIATING, S.ACTIVE, S.STOPPING, S.STOPPED)

# (state, input) -> next state
SESSION_TABLE: dict[tuple[SessionState, SessionInput], SessionState] = {
    (S.NONE, In.START): S.STARTING,
    (S.STOPPED, In.START): S.STARTING,
    (S.NONE, In.VERIFY): S.INITIATING,
    (S.STARTING, In.INITIATING): S.INITIATING,
    (S.INITIATING, In.INITIATING): S.INITIATING,
    (S.STARTING, In.ACTIVE): S.ACTIVE,
    (S.INITIATING, In.ACTIVE): S.ACTIVE,
    (S.STARTING, In.FAILED): S.NONE,
    (S.INITIATING, In.FAILED): S.NONE,
    (S.ACTIVE, In.CUT): S.STOPPING,
    (S.STOPPING, In.STOPPED): S.STOPPED,
    (S.NONE, In.LOST): S.NONE,
    **{(s, In.LOST): S.NONE for s in _HAS_ID},
    (S.NONE, In.RELEASE): S.NONE,
    (S.STARTING, In.RELEASE): S.STARTING,
    **{(s, In.RELEASE): S.NONE for s in _HAS_ID},
    (S.STARTING, In.ABANDON): S.NONE,
    (S.NONE, In.ABANDON): S.NONE,
}
del S, In


class SessionMachine:
    """One session slot of a call: its state, its id, and how its creation is going."""

    __slots__ = ("attempts", "failing_since", "id", "kind", "poll_delay", "poll_started", "state")

    def __init__(self, kind: SessionKind, session_id: str | None = None) -> None:
        self.kind: SessionKind = kind
        self.state = SessionState.NONE
        self.id = session_id
        self.attempts = 0  # failed creates in a row
        self.failing_since = 0.0  # when the first of them failed
        self.poll_delay = 0.0
        self.poll_started = 0.0

    def step(self, inp: SessionInput, session_id: str | None = None) -> SessionState:
        """Apply `inp` (with the session's id when the input reports one)."""
        nxt = SESSION_TABLE.get((self.state, inp))
        if nxt is None:
            raise Illegal(self.kind, self.state.value, inp.value)
        if inp is SessionInput.START:
            self.id = None  # a new session: nothing sent to the old one plays any more
        elif session_id is not None:
            self.id = session_id
        if inp is SessionInput.ACTIVE:
            self.attempts = 0
        elif inp is SessionInput.FAILED:
            self.attempts += 1
        self.state = nxt
        return nxt

    def failed(self, now: float) -> None:
        """A create (or its poll) failed at `now`; the first of a run starts the outage's clock."""
        if not self.attempts:
            self.failing_since = now
        self.step(SessionInput.FAILED)

    @property
    def active(self) -> bool:
        """Active, with an id: ready for /say."""
        return self.state is SessionState.ACTIVE and self.id is not None

    @property
    def starting(self) -> bool:
        """A create is in flight."""
        return self.state is SessionState.STARTING

    def next_poll(self, now: float, first_delay: float, max_delay: float) -> float:
        """How long to wait before polling an `initiating` session again (doubling, capped)."""
        if self.state is not SessionState.INITIATING:
            self.poll_started = now
            self.poll_delay = first_delay
        delay = self.poll_delay
        self.poll_delay = min(self.poll_delay * 2, max_delay)
        return delay
