"""The call phase: where the call is, as agentd sees it (docs/protocol.md §4.1).

    NEW ─dialing→ DIALING ─ringing→ RINGING ─progressing→ ANSWERED ─greeted→ ACTIVE
    (NEW ─ringing→ RINGING and NEW/DIALING ─progressing→ ANSWERED skip ahead)
    any phase before ENDING ─terminating / canceling / hangup / local_end→ ENDING ─clean→ ENDED

VoIPBIN's statuses only move forward and `hangup` is final, so a status with no row (a ringing
after progressing, an updated after hangup, a duplicate) is stale remote input: a quiet no-op.
The internal inputs (`greeted`, `local_end`, `clean`) come from agentd itself; one with no row is
a bug, raised as `Illegal` with the phase unchanged.
"""

from __future__ import annotations

import enum

from agentd.call.table import Illegal


class Phase(enum.Enum):
    """Where the call is."""

    NEW = "new"
    DIALING = "dialing"
    RINGING = "ringing"
    ANSWERED = "answered"  # progressing; sessions being set up
    ACTIVE = "active"  # the speaking session was active and the greeting went out
    ENDING = "ending"  # call ending or ended; cleanup in flight
    ENDED = "ended"  # nothing left to clean up

    @property
    def live(self) -> bool:
        """Answered and not ending."""
        return self in (Phase.ANSWERED, Phase.ACTIVE)

    @property
    def ringing(self) -> bool:
        """Not answered yet."""
        return self in (Phase.NEW, Phase.DIALING, Phase.RINGING)

    @property
    def over(self) -> bool:
        """Ending or ended."""
        return self in (Phase.ENDING, Phase.ENDED)


class PhaseInput(enum.StrEnum):
    """A VoIPBIN call status, or one of agentd's own phase inputs."""

    DIALING = "dialing"
    RINGING = "ringing"
    PROGRESSING = "progressing"
    TERMINATING = "terminating"
    CANCELING = "canceling"
    HANGUP = "hangup"
    GREETED = "greeted"  # the first speaking session is active: the greeting goes out
    LOCAL_END = "local_end"  # we hang up, the call is gone, or a human took it over
    CLEAN = "clean"  # everything the call started is stopped or confirmed


REMOTE = frozenset(
    {
        PhaseInput.DIALING,
        PhaseInput.RINGING,
        PhaseInput.PROGRESSING,
        PhaseInput.TERMINATING,
        PhaseInput.CANCELING,
        PhaseInput.HANGUP,
    }
)


class Effect(enum.Enum):
    """What the router does on a transition."""

    NOTE = "note"  # record the status
    ANSWER = "answer"  # start the sessions
    GREET = "greet"  # say the greeting
    END = "end"  # stop everything the call started
    HUNGUP = "hungup"  # VoIPBIN confirmed the end (only `hangup` carries the reason)
    FINISH = "finish"  # forget the call


_PRE_ANSWER = (Phase.NEW, Phase.DIALING, Phase.RINGING)
_NOT_OVER = (*_PRE_ANSWER, Phase.ANSWERED, Phase.ACTIVE)
_ENDS = (PhaseInput.TERMINATING, PhaseInput.CANCELING, PhaseInput.HANGUP, PhaseInput.LOCAL_END)

# (phase, input) -> (next phase, effect): every transition the call can make.
PHASE_TABLE: dict[tuple[Phase, PhaseInput], tuple[Phase, Effect]] = {
    (Phase.NEW, PhaseInput.DIALING): (Phase.DIALING, Effect.NOTE),
    (Phase.NEW, PhaseInput.RINGING): (Phase.RINGING, Effect.NOTE),
    (Phase.DIALING, PhaseInput.RINGING): (Phase.RINGING, Effect.NOTE),
    **{(p, PhaseInput.PROGRESSING): (Phase.ANSWERED, Effect.ANSWER) for p in _PRE_ANSWER},
    (Phase.ANSWERED, PhaseInput.GREETED): (Phase.ACTIVE, Effect.GREET),
    **{(p, i): (Phase.ENDING, Effect.END) for p in _NOT_OVER for i in _ENDS},
    (Phase.ENDING, PhaseInput.HANGUP): (Phase.ENDING, Effect.HUNGUP),
    (Phase.ENDED, PhaseInput.HANGUP): (Phase.ENDED, Effect.HUNGUP),
    (Phase.ENDING, PhaseInput.CLEAN): (Phase.ENDED, Effect.FINISH),
}


class PhaseMachine:
    """The call's phase; `step` applies one input from `PHASE_TABLE`."""

    __slots__ = ("phase",)

    def __init__(self, phase: Phase = Phase.NEW) -> None:
        self.phase = phase

    def step(self, inp: PhaseInput) -> Effect | None:
        """Move on `inp`. A status with no row is a no-op (None); an internal input raises."""
        row = PHASE_TABLE.get((self.phase, inp))
        if row is None:
            if inp in REMOTE:
                return None
            raise Illegal("phase", self.phase.value, inp.value)
        self.phase, effect = row
        return effect
