"""What the caller hears: the agent's audio as estimated from the text, and says waiting to go out.

VoIPBIN reports no playback events (docs/protocol.md §11), so playback is estimated from the text's
length (`chars_per_s`), as VoIPBIN's own client does, after the TTS latency (a /say's audio starts
about a second after it is sent when nothing is playing). Says queue and play back to back.
"""

from __future__ import annotations

from dataclasses import dataclass

_GAP_S = 0.05  # pieces closer than this play as one stretch of audio


@dataclass(slots=True)
class Piece:
    """One /say as the caller hears it: estimated start and end of its playback."""

    turn: int
    text: str
    start: float
    end: float


class Playback:
    """The agent's estimated audio, and the says waiting for an active speaking session."""

    __slots__ = ("paced", "pieces", "queued", "until")

    def __init__(self) -> None:
        self.pieces: list[Piece] = []
        self.until = 0.0  # when the last piece ends
        self.queued: list[tuple[int, str]] = []  # (turn, text) waiting for a session
        # (turn, text) waiting for room in the session's audio buffer (aws): sent as it plays
        self.paced: list[tuple[int, str]] = []

    def talking(self, now: float) -> bool:
        """Audio is (estimated to be) playing, or says wait for a session or for room.

        No pad here: cutting audio that already ended costs a stop and a new session."""
        return bool(self.queued) or bool(self.paced) or now < self.until

    def remaining(self, now: float) -> float:
        """Seconds until the audio sent so far has played."""
        return max(0.0, self.until - now)

    def play(
        self, turn: int, text: str, now: float, chars_per_s: float, latency_s: float = 0.0
    ) -> None:
        """A /say goes out now: it plays after what is already playing, or after the latency."""
        start = max(now + latency_s, self.until)
        end = start + len(text) / chars_per_s
        self.pieces.append(Piece(turn, text, start, end))
        self.pieces = [p for p in self.pieces if p.end > now or p.turn == turn]
        self.until = end

    def talk_started(self, now: float) -> float:
        """When the agent's current stretch of audio began: the start of the piece playing at
        `now`, or of the one it follows without a gap (far past when none has started).

        Pieces queued back to back are one stretch: a later piece's start is no new onset."""
        began = -1e9
        prev_end = -1e9
        for p in sorted(self.pieces, key=lambda p: p.start):
            if p.start > now:
                break
            if p.start > prev_end + _GAP_S:
                began = p.start
            prev_end = max(prev_end, p.end)
        return began

    def playing(self, now: float) -> bool:
        """Some piece is still playing at `now`."""
        return any(p.end > now for p in self.pieces)

    def lost(self, now: float) -> None:
        """The speaking session is gone: nothing sent to it plays any more, and what waited
        for room on it waits for the next one."""
        self.pieces = [p for p in self.pieces if p.end <= now]
        self.until = now
        self.queued += self.paced
        self.paced.clear()

    def cut(self, now: float) -> dict[int, str]:
        """Stop everything at `now`; for each turn whose audio was cut, the text heard of it."""
        heard: dict[int, list[str]] = {}
        cut_turns: set[int] = set()
        for p in self.pieces:
            if p.end <= now:
                heard.setdefault(p.turn, []).append(p.text)
                continue
            cut_turns.add(p.turn)
            if p.start < now:
                # as far as it played (each piece at its own script's pace)
                n = int(len(p.text) * (now - p.start) / max(p.end - p.start, 1e-9))
                partial = p.text[:n].rsplit(" ", 1)[0] if " " in p.text[:n] else ""
                if partial:
                    heard.setdefault(p.turn, []).append(partial + " —")
        self.queued.clear()
        self.paced.clear()
        self.pieces = []
        self.until = now
        return {turn: " ".join(heard.get(turn, [])) for turn in cut_turns}
