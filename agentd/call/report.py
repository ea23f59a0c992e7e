"""A call's report: what it cost and how it went, summed up once when the call is finished.

The call core feeds `Report` as it goes (the records it emits, when each billed session was
created and when its end was confirmed, when VoIPBIN answered and hung up the call), always
with the `now` the machine was handed: no clock is read here. When the call is `Finished`,
`Report.record()` gives one `call_report` record: the daemon logs it (one journal line), keeps
it in the store (what `agentd calls show` reads) and counts its session seconds in metrics.

Why session seconds: VoIPBIN bills a speaking (TTS) and a transcribe (STT) session from its
creation until it is stopped. A session counts from the create's answer (the first time its id
is seen) to the first confirmation that it is gone: a stop answered 200/404, VoIPBIN's own
`transcribe done`, or — for a transcribe only — the call's hangup, since VoIPBIN ends a
call's transcribes itself when it hangs up (docs/protocol.md). A speaking session whose stop was
never confirmed is counted up to the report and marked unconfirmed: it may still be billing.

Backend tokens (`backend_tokens`) are the sum of what the backend reported for the replies
the call used (the `openai` kind asks for `usage`; the other kinds report none, and then the
report has no tokens). A reply dropped before it was complete, because the caller went on,
never got its count: speculation's cost shows in the `turn_joined` records instead.
"""

from __future__ import annotations

import math
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final, Literal

from agentd.commands import Command, Record
from agentd.names import Kind

SessionKind = Literal["speaking", "transcribe"]

# how a session's end was confirmed
STOPPED: Final = "stopped"  # our stop was answered (200, or 404: already gone)
ENDED: Final = "ended"  # VoIPBIN said the transcribe was done
HANGUP: Final = "hangup"  # the call hung up: VoIPBIN ends its transcribes itself
GONE: Final = "gone"  # VoIPBIN answered 404 for the session: it was not there any more

# records that say something went wrong on the call (counted as "errors")
ERROR_KINDS: Final = frozenset(
    {
        Kind.ERROR,
        Kind.BACKEND_FAILED,
        Kind.SPEAKING_LOST,
        Kind.TRANSCRIBE_DOWN,
        Kind.LEAK,
        Kind.ANOMALY,
        Kind.FAILED,
    }
)


def _count(value: object) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0-100) of `values`, nearest rank: always a value that occurred.

    Nearest rank rather than interpolation: with the handful of turns a call has, an
    interpolated p90 would be a latency no caller ever waited."""
    if not values:
        raise ValueError("no values")
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


@dataclass(slots=True)
class SessionSpan:
    """One billed session: when it was created and when its end was confirmed (and how)."""

    kind: SessionKind
    id: str
    opened: float
    closed: float | None = None
    how: str = ""  # STOPPED / ENDED / HANGUP; "" while not confirmed

    def seconds(self, until: float) -> float:
        """How long it was open; an unconfirmed one counts up to `until`."""
        end = self.closed if self.closed is not None else until
        return max(0.0, end - self.opened)


def talked_over(record: Record) -> bool:
    """Whether a barge-in record is the caller talking over the agent: a reply retracted
    before its audio, because the caller went on, interrupted nobody (the report, `agentd
    status` and the metrics count the same ones)."""
    return record.what is Kind.BARGE_IN and record.data.get("by") != "caller went on"


class Report:
    """The pure accumulator of one call's report. Every method takes the machine's `now`."""

    __slots__ = (
        "answered_at",
        "backchannels",
        "barge_ins",
        "errors",
        "first_say_ms",
        "first_seen",
        "hangup_at",
        "last_seen",
        "leaks",
        "sessions",
        "tokens_in",
        "tokens_out",
        "turn_records",
    )

    def __init__(self) -> None:
        self.first_seen: float | None = None  # the first input of the call
        self.last_seen: float | None = None  # the latest input: when the report is made
        self.answered_at: float | None = None
        self.hangup_at: float | None = None
        # per timed turn, from its `turn` record: 4 bytes each (a float object and its slot, 32)
        self.first_say_ms = array("f")
        self.turn_records = 0
        self.tokens_in = 0  # backend tokens of the replies used, where the backend reports them
        self.tokens_out = 0
        self.barge_ins = 0
        self.backchannels = 0
        self.errors = 0
        self.leaks = 0
        self.sessions: dict[str, SessionSpan] = {}

    def tick(self, now: float) -> None:
        """The machine was handed an input at `now`."""
        if self.first_seen is None:
            self.first_seen = now
        self.last_seen = now if self.last_seen is None else max(self.last_seen, now)

    def answered(self, now: float) -> None:
        """VoIPBIN says the call is up (the first time counts)."""
        self.tick(now)
        if self.answered_at is None:
            self.answered_at = now

    def hung_up(self, now: float) -> None:
        """VoIPBIN says the call is over: its transcribes end with it."""
        self.tick(now)
        if self.hangup_at is None:
            self.hangup_at = now
        for span in self.sessions.values():
            if span.kind == "transcribe" and span.closed is None:
                span.closed, span.how = now, HANGUP

    def opened(self, kind: SessionKind, session_id: str, now: float) -> None:
        """A session's id was seen for the first time: it bills from here."""
        self.tick(now)
        if session_id and session_id not in self.sessions:
            self.sessions[session_id] = SessionSpan(kind, session_id, now)

    def closed(self, session_id: str, now: float, how: str) -> None:
        """A session's end was confirmed; only the first confirmation counts."""
        self.tick(now)
        span = self.sessions.get(session_id)
        if span is not None and span.closed is None:
            span.closed, span.how = now, how

    def saw(self, commands: Iterable[Command]) -> None:
        """Count what the call's records say: turns timed, barge-ins, backchannels, errors."""
        for cmd in commands:
            if not isinstance(cmd, Record):
                continue
            what = cmd.what
            if what is Kind.TURN:
                self.turn_records += 1
                ms = cmd.data.get("first_say_ms")
                if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms >= 0:
                    self.first_say_ms.append(float(ms))
            elif talked_over(cmd):
                self.barge_ins += 1
            elif what is Kind.BACKCHANNEL:
                self.backchannels += 1
            elif what is Kind.TOKENS:
                self.tokens_in += _count(cmd.data.get("input"))
                self.tokens_out += _count(cmd.data.get("output"))
            if what in ERROR_KINDS:
                self.errors += 1
            if what is Kind.LEAK:
                self.leaks += 1

    def session_seconds(self, until: float) -> dict[str, float]:
        """Seconds open, summed per kind (both kinds always present)."""
        out = {"speaking": 0.0, "transcribe": 0.0}
        for span in self.sessions.values():
            out[span.kind] += span.seconds(until)
        return {k: round(v, 3) for k, v in out.items()}

    def data(self, *, turns: int, restored: bool = False) -> dict[str, object]:
        """The report as plain JSON values; `turns`: the caller turns the call opened."""
        until = self.last_seen if self.last_seen is not None else 0.0
        end = self.hangup_at if self.hangup_at is not None else until
        duration = end - self.answered_at if self.answered_at is not None else 0.0
        out: dict[str, object] = {
            "duration_s": round(max(0.0, duration), 3),
            "answered": self.answered_at is not None,
            "turns": turns,
            "barge_ins": self.barge_ins,
            "backchannels": self.backchannels,
            "errors": self.errors,
            "leaks": self.leaks,
            "session_seconds": self.session_seconds(until),
            "sessions": [
                {
                    "kind": s.kind,
                    "id": s.id,
                    "open_s": round(s.seconds(until), 3),
                    "confirmed": s.how or None,
                }
                for s in self.sessions.values()
            ],
        }
        if self.first_say_ms:
            v = [round(ms, 1) for ms in self.first_say_ms]  # the records' 0.1 ms, not float32's
            out["first_say_ms"] = {
                "n": len(v),
                "p50": percentile(v, 50),
                "p90": percentile(v, 90),
                "max": max(v),
            }
        if self.tokens_in or self.tokens_out:
            out["backend_tokens"] = {"input": self.tokens_in, "output": self.tokens_out}
        if restored:
            # sessions resumed after the restart count from it (they were not seen being
            # created), and those that ended before it are missing
            out["restored"] = True
        return out

    def record(self, call_id: str, *, turns: int, restored: bool = False) -> Record:
        """The `call_report` record, made once when the call is finished."""
        return Record(call_id, Kind.REPORT, self.data(turns=turns, restored=restored))
