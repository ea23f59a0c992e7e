"""What a `Call` asks the shell to do (commands), and what the shell tells it back (results).

Commands are plain data: the executor turns each into REST requests, backend streams or timers, and
feeds the outcome back into the call as a result event, so the state machine sees failures as well
as successes. Every command names its call; `lane` says which commands must run in order.
"""

from __future__ import annotations

from dataclasses import field
from typing import Literal

from agentd.events import CallInfo, TranscriptEvent
from agentd.names import Action, Kind, Timer
from agentd.value import value

Lane = Literal["call", "speaking", "transcribe", "none"]
Message = tuple[str, str]  # (role, content) with role in system/user/assistant


#: `TranscribeFailed.reason` when a transcribe the call gave up on blocked a new one and was
#: deleted: start again (docs/protocol.md §10).
ORPHAN = "orphan deleted"
#: `TranscribeFailed.reason` when a find found no live transcribe on the call.
NOT_FOUND = "not found"

# ---- commands -----------------------------------------------------------------------------------


@value
class StartTranscribe:
    """POST /transcribes for the call."""

    call_id: str
    language: str
    provider: str
    direction: str = "in"
    lane: Lane = "transcribe"


@value
class FindTranscribe:
    """GET /transcribes?reference_type=call&reference_id= (after a 409 on start).

    A live one in `avoid` (one this call gave up on: deaf, or orphaned by a pod restart) is
    never adopted: it is deleted, since it blocks a new one with 409."""

    call_id: str
    language: str
    avoid: frozenset[str] = frozenset()
    lane: Lane = "transcribe"


@value
class SweepTranscribes:
    """GET /transcribes of the call: the live ones in `language` other than `keep` (one a
    start cut short by a restart created after all; `keep` "": every one, the call is over)
    come back as `TranscribesFound`."""

    call_id: str
    language: str
    keep: str
    lane: Lane = "transcribe"


@value
class StopTranscribe:
    """POST /transcribes/{id}/stop (idempotent); DELETE /transcribes/{id} when `delete`."""

    call_id: str
    transcribe_id: str
    delete: bool = False
    lane: Lane = "transcribe"


@value
class StartSpeaking:
    """POST /speakings on the call, direction out.

    When the create fails because a session exists, the live one is adopted unless it is in
    `avoid` (one this call gave up on): that one is deleted and the create tried again."""

    call_id: str
    language: str
    provider: str
    voice_id: str
    avoid: frozenset[str] = frozenset()
    lane: Lane = "speaking"


@value
class PollSpeaking:
    """GET /speakings/{id}: is an `initiating` session active yet."""

    call_id: str
    speaking_id: str
    lane: Lane = "speaking"


@value
class Say:
    """POST /speakings/{id}/say. Never retried once it may have reached the server."""

    call_id: str
    speaking_id: str
    text: str
    turn: int
    lane: Lane = "speaking"


@value
class Flush:
    """POST /speakings/{id}/flush: drop queued speech (cuts audio only with some providers).

    A barge-in's: the says queued before it are dropped. One in flight goes on (it may have
    reached VoIPBIN, and would play after the flush): only a stop makes a late say harmless."""

    call_id: str
    speaking_id: str
    lane: Lane = "speaking"


@value
class StopSpeaking:
    """POST /speakings/{id}/stop (idempotent); the only hard cut, and what ends the billing.

    With `delete`, DELETE /speakings/{id}: it removes the session without the tts pod that
    owns it, when that pod is gone and every /stop answers 503 (docs/protocol.md §8.3).

    `abandon`: nothing more is to be heard on the session (the call is ending, or the caller
    cut in): the says queued before the stop are dropped and one in flight is cut short, so the
    stop (and the end of the audio, and of the billing) does not wait behind them. A session
    replaced keeps the lane's order: what failed on the old session is said on the new one."""

    call_id: str
    speaking_id: str
    delete: bool = False
    lane: Lane = "speaking"
    # how the executor runs it, not which stop it is: equal to the same stop without it
    abandon: bool = field(default=False, compare=False)


@value
class AskBackend:
    """Start a backend reply for `turn`; its text comes back as ReplySentence / ReplyDone."""

    call_id: str
    turn: int
    history: tuple[Message, ...]
    lane: Lane = "none"
    marker: bool = False  # the reply starts with a turn-completion marker (agent.turn_marker)


@value
class CancelBackend:
    """Cancel the backend reply of `turn` (barge-in or hangup): nothing more of it is spoken."""

    call_id: str
    turn: int
    lane: Lane = "none"


@value
class Hangup:
    """POST /calls/{id}/hangup."""

    call_id: str
    lane: Lane = "call"


@value
class SweepSpeakings:
    """Stop every live speaking session on the call (ids we may never have learned)."""

    call_id: str
    lane: Lane = "speaking"


@value
class Transfer:
    """POST /transfers: hand the caller over to a human (blind transfer)."""

    call_id: str
    number: str
    lane: Lane = "call"


@value
class CheckCall:
    """GET /calls/{id}: reconcile a call whose events may have been lost."""

    call_id: str
    lane: Lane = "call"


@value
class FetchTranscripts:
    """GET /transcripts?transcribe_id=: read back transcripts whose events may have been lost."""

    call_id: str
    transcribe_id: str
    lane: Lane = "call"


@value
class StartTimer:
    """Feed `TimerFired(timer)` back after `delay_s` (replaces a running timer of the same name)."""

    call_id: str
    timer: Timer
    delay_s: float
    lane: Lane = "none"


@value
class CancelTimer:
    """Stop a running timer whose reason went away: it would only fire to be ignored."""

    call_id: str
    timer: Timer
    lane: Lane = "none"


@value
class Record:
    """A fact worth logging and keeping: call answered, ended (with reason), turn timings, ..."""

    call_id: str
    what: Kind
    data: dict[str, object] = field(default_factory=dict)
    lane: Lane = "none"


@value
class WriteAhead:
    """Put the call on disk before the commands after this one run.

    Sent just before a billed session is created: a crash right after the create must find the
    call in the store on restart, or nobody would ever stop that session."""

    call_id: str
    lane: Lane = "none"


@value
class Finished:
    """The call has ended and everything it started is cleaned up: forget it."""

    call_id: str
    lane: Lane = "none"


Command = (
    StartTranscribe
    | FindTranscribe
    | SweepTranscribes
    | StopTranscribe
    | StartSpeaking
    | PollSpeaking
    | Say
    | Flush
    | StopSpeaking
    | SweepSpeakings
    | AskBackend
    | CancelBackend
    | Hangup
    | Transfer
    | CheckCall
    | FetchTranscripts
    | StartTimer
    | CancelTimer
    | Record
    | WriteAhead
    | Finished
)


# ---- results fed back by the shell --------------------------------------------------------------


@value
class TranscribeStarted:
    """A transcribe session exists on the call (created, or found after a 409)."""

    transcribe_id: str


@value
class TranscribeFailed:
    """POST /transcribes failed; `status` 0 means no HTTP answer."""

    status: int
    reason: str = ""


@value
class SpeakingStarted:
    """POST /speakings (or a poll) answered with this session and status."""

    speaking_id: str
    status: str


@value
class SpeakingFailed:
    """POST /speakings or a poll failed."""

    status: int
    reason: str = ""
    speaking_id: str = ""


@value
class SayFailed:
    """A /say was refused; 404 means the speaking session is not active any more."""

    speaking_id: str
    text: str
    turn: int
    status: int


@value
class Stopped:
    """A stop was confirmed (200 or 404) or finally failed (`ok` false)."""

    kind: Literal["speaking", "transcribe"]
    session_id: str
    ok: bool
    status: int = 0  # the failed stop's HTTP status (0: no answer)
    # deleted, but VoIPBIN answered that its stream still ran: nothing a client can do ends it
    unstopped: bool = False


@value
class ReplySentence:
    """One complete sentence of the backend's reply to `turn`."""

    turn: int
    text: str


@value
class ReplyDone:
    """The backend's reply to `turn` is complete."""

    turn: int
    action: Action | None = None  # what the backend asked for once the reply has played
    first_chunk_at: float | None = None  # when the backend's first text arrived (monotonic)
    tokens: tuple[int, int] | None = None  # (input, output) as the backend reported them


@value
class ReplyFailed:
    """The backend failed or timed out on `turn`; `error` is safe to log."""

    turn: int
    error: str


@value
class ReplyIncomplete:
    """The backend judged the caller unfinished (a ○ or ◐ marker): no reply to `turn`."""

    turn: int
    long: bool = False  # ◐: they need longer


@value
class StreamState:
    """The event stream went down (`up` false), or is subscribed again after it did."""

    up: bool


@value
class TimerFired:
    """A `StartTimer` ran out."""

    timer: Timer


@value
class TransferDone:
    """POST /transfers answered: `ok` false means the caller is still with us."""

    ok: bool
    error: str = ""


@value
class HangupDone:
    """POST /calls/{id}/hangup answered (`ok`), or finally failed."""

    ok: bool


@value
class TranscribesFound:
    """`SweepTranscribes` ran: the live transcribes of the call besides the one it keeps;
    not `ok` when VoIPBIN could not list them (`status`: its HTTP status, 0 for no answer)."""

    ids: tuple[str, ...]
    ok: bool = True
    status: int = 0


@value
class SweepDone:
    """`SweepSpeakings` ran: `ok` when every speaking it found is stopped (or known to bill on
    beyond our reach); not `ok` when the list or a stop failed (`status`: its HTTP status, 0
    for no answer)."""

    ok: bool
    status: int = 0


@value
class CallGone:
    """GET /calls/{id} answered 404/403: the call no longer exists for us."""


@value
class TranscriptsRead:
    """The transcripts of the call's transcribe read over REST (`FetchTranscripts`), oldest
    first: those the stream lost are among them."""

    transcripts: tuple[TranscriptEvent, ...]


Result = (
    TranscribeStarted
    | TranscribeFailed
    | SpeakingStarted
    | SpeakingFailed
    | SayFailed
    | Stopped
    | ReplySentence
    | ReplyDone
    | ReplyFailed
    | ReplyIncomplete
    | TimerFired
    | StreamState
    | TransferDone
    | HangupDone
    | SweepDone
    | TranscribesFound
    | CallGone
    | TranscriptsRead
)

__all__ = ["CallInfo", "Command", "Message", "Result"]
