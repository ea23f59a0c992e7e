"""Typed names the core and the shell share: timers, after-reply actions and record kinds.

They were strings matched in five modules, where a typo failed silently; an enum member that does
not exist fails at import, and mypy checks every match.
"""

from __future__ import annotations

import enum

from agentd.value import value


class TimerKind(enum.StrEnum):
    """What a call is waiting for."""

    WATCH = "watch"  # nothing heard of the call for a while: ask VoIPBIN
    MAX_CALL = "max_call"  # the call's time limit
    SILENCE = "silence"  # the caller has been quiet since our audio ended
    POLL_SPEAKING = "poll_speaking"  # an `initiating` speaking: is it active yet
    RETRY_SPEAKING = "retry_speaking"
    RETRY_TRANSCRIBE = "retry_transcribe"
    RETRY_STOP = "retry_stop"  # one per unconfirmed stop (`Timer.session_id` says which)
    RETRY_HANGUP = "retry_hangup"
    RETRY_SWEEP = "retry_sweep"  # a sweep of the call's speakings got no clear answer
    TRANSCRIPT_DUE = "transcript_due"  # speech ended, its transcript has not come
    AFTER_REPLY = "after_reply"  # the reply has played: run the action it asked for
    HOLD = "hold"  # the caller's turn seems over: say the reply held back so far
    ENDPOINT = "endpoint"  # the caller's words stopped growing: ask, or end their turn
    FILLER = "filler"  # the turn is over and the reply is slow: say a filler
    INCOMPLETE = "incomplete"  # the backend judged the caller unfinished: ask again, later
    GREET = "greet"  # the voice is up, the transcribe not yet: greet all the same
    SWEEP_TRANSCRIBES = "sweep_transcribes"  # a start cut short by a restart may have made one
    PACE = "pace"  # the audio ahead has played down: send the next piece (aws)


@value
class Timer:
    """A timer of a call: its kind, and for a stop retry the session it retries."""

    kind: TimerKind
    session_id: str = ""

    def __str__(self) -> str:
        return f"{self.kind}:{self.session_id}" if self.session_id else str(self.kind)


@value
class EndCall:
    """Hang up once the reply has played."""

    def __str__(self) -> str:
        return "end_call"


@value
class TransferTo:
    """Hand the caller over to `number` once the reply has played."""

    number: str

    def __str__(self) -> str:
        return f"transfer:{self.number}"


Action = EndCall | TransferTo


def normalise_number(number: str) -> str:
    """Compare numbers by their digits and a leading `+` only."""
    keep = "".join(ch for ch in number if ch.isdigit())
    return ("+" + keep) if number.strip().startswith("+") else keep


#: A `turn` record's timings, in the order they happen (each `<name>_ms` from the end of the
#: caller's turn).
TURN_TIMINGS = ("first_token", "first_sentence", "first_say", "last_say")


class Kind(enum.StrEnum):
    """What a `Record` says happened (kept in the store, logged, counted in metrics)."""

    STATUS = "status"
    ANSWERED = "answered"
    ENDED = "ended"
    TURN = "turn"
    BARGE_IN = "barge_in"
    BACKCHANNEL = "backchannel"  # "mm-hmm" while the agent talks: no barge-in, no turn
    TURN_JOINED = "turn_joined"  # another final before the reply was said: asked again
    FILLER = "filler"  # the reply was slow: "One moment."
    TOKENS = "tokens"  # what a reply cost, as the backend reported it
    TURN_INCOMPLETE = "turn_incomplete"  # the backend judged the caller unfinished (○ / ◐)
    CUT_IN = "cut_in"  # the caller's turn ran past agent.max_turn_s: answered what was heard
    ECHO = "echo"  # the caller's side repeated the agent's own words: no turn, no barge-in
    ACTION = "action"
    TRANSFERRED = "transferred"
    TRANSCRIBE_RESTARTED = "transcribe_restarted"
    SILENCE_HANGUP = "silence_hangup"
    TIME_LIMIT = "time_limit"
    # what an operator should see with `journalctl -p warning`
    SPEAKING_LOST = "speaking_lost"
    STT_QUIET = "stt_quiet"
    # no transcribe on the call after `max_attempts` failed creates (an outage): nobody hears
    # the caller while agentd keeps trying
    TRANSCRIBE_DOWN = "transcribe_down"
    BACKEND_FAILED = "backend_failed"
    ERROR = "error"
    LEAK = "leak"
    STRAY = "stray"  # a session of the call agentd did not know of (a start cut by a restart)
    ANOMALY = "anomaly"  # an internal transition the machines do not allow: a bug to report
    FAILED = "failed"  # the call's handler raised: the call was ended
    REPORT = "call_report"  # once, when the call is finished: its duration, turns, sessions
    # no record: the store's event for the messages that left a long call's kept history
    # (`History`), written with the row that no longer has them (`Persister.history_left`)
    HISTORY = "history"

    @property
    def warns(self) -> bool:
        """Logged at warning level."""
        return self in _WARN


_WARN = frozenset(
    {
        Kind.SPEAKING_LOST,
        Kind.STT_QUIET,
        Kind.TRANSCRIBE_DOWN,
        Kind.BACKEND_FAILED,
        Kind.ERROR,
        Kind.LEAK,
        Kind.STRAY,
        Kind.ANOMALY,
        Kind.FAILED,
    }
)
