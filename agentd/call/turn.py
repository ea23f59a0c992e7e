"""The turn machine: whose turn it is in the conversation, and which reply is current.

    LISTENING ─transcript→ THINKING ─sentence→ SPEAKING ─done / failed→ LISTENING
    THINKING / SPEAKING ─transcript→ THINKING (a newer turn: the older reply is stale)
    any state ─cut→ CUT ─transcript→ THINKING
    THINKING / SPEAKING ─end→ LISTENING (the call ends, or a goodbye replaces the reply)

A caller's final transcript opens a turn and asks the backend (THINKING); each sentence of the
reply is spoken as it comes (SPEAKING). The audio may still play after the reply is complete
(LISTENING): `Playback` knows that, not this machine. A barge-in cuts the reply and the audio
(CUT). Replies are matched to their turn by number, never by timing: a sentence or a `done` of
another turn is stale remote input, dropped before it reaches this machine.
"""

from __future__ import annotations

import enum
from collections import deque

from agentd.call.table import Illegal


class TurnState(enum.Enum):
    """Where the conversation is."""

    LISTENING = "listening"
    THINKING = "thinking"  # the backend is asked; nothing of its reply spoken yet
    SPEAKING = "speaking"  # sentences of the reply are being spoken; more may come
    CUT = "cut"  # the caller barged in; their words are on the way


class TurnInput(enum.Enum):
    """What moves the conversation."""

    TRANSCRIPT = "transcript"
    SENTENCE = "sentence"
    DONE = "done"
    FAILED = "failed"
    CUT = "cut"
    END = "end"


L, T, S, C = TurnState.LISTENING, TurnState.THINKING, TurnState.SPEAKING, TurnState.CUT
TURN_TABLE: dict[tuple[TurnState, TurnInput], TurnState] = {
    **{(s, TurnInput.TRANSCRIPT): T for s in (L, T, S, C)},
    (T, TurnInput.SENTENCE): S,
    (S, TurnInput.SENTENCE): S,
    (T, TurnInput.DONE): L,
    (S, TurnInput.DONE): L,
    (T, TurnInput.FAILED): L,
    (S, TurnInput.FAILED): L,
    **{(s, TurnInput.CUT): C for s in (L, T, S, C)},
    (T, TurnInput.END): L,
    (S, TurnInput.END): L,
}
del L, T, S, C

#: the caller transcripts a call remembers answering (and saves): a duplicate frame comes at once,
#: and a read-back (`TranscriptsRead`) needs only the newest one answered to tell old from lost
SEEN_KEEP = 16


class TurnMachine:
    """The turn number, the reply state, and the caller transcripts already answered."""

    __slots__ = ("_seen", "_seen_set", "state", "turn")

    def __init__(self, turn: int = 0) -> None:
        self.state = TurnState.LISTENING
        self.turn = turn
        self._seen: deque[str] = deque(maxlen=SEEN_KEEP)
        self._seen_set: set[str] = set()

    def step(self, inp: TurnInput) -> TurnState:
        """Apply `inp`; a transcript opens the next turn."""
        nxt = TURN_TABLE.get((self.state, inp))
        if nxt is None:
            raise Illegal("turn", self.state.value, inp.value)
        if inp is TurnInput.TRANSCRIPT:
            self.turn += 1
        self.state = nxt
        return nxt

    @property
    def replying(self) -> bool:
        """The backend is working on the current turn's reply."""
        return self.state in (TurnState.THINKING, TurnState.SPEAKING)

    def current(self, turn: int) -> bool:
        """Whether a reply event for `turn` belongs to the reply under way."""
        return turn == self.turn and self.replying

    def seen(self, transcript_id: str) -> bool:
        """Whether this transcript was answered already."""
        return transcript_id in self._seen_set

    def mark_seen(self, transcript_id: str) -> bool:
        """Remember a transcript; True when it was new."""
        if transcript_id in self._seen_set:
            return False
        if len(self._seen) == self._seen.maxlen:
            self._seen_set.discard(self._seen[0])
        self._seen.append(transcript_id)
        self._seen_set.add(transcript_id)
        return True

    def seen_ids(self) -> tuple[str, ...]:
        """The answered transcript ids remembered, oldest first (for the store)."""
        return tuple(self._seen)
