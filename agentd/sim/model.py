"""Resources the simulator keeps (calls, transcribes, transcripts, speakings) and their JSON shapes.

The JSON follows the server's Go structs (docs/protocol.md §4.6): uuid fields are never omitted
(nil uuid when unset), ``omitempty`` strings and times are left out when empty, key order is the
struct's field order.
"""

from __future__ import annotations

import asyncio
import collections
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from agentd.sim.clock import go_time, year_one_time

NIL_UUID = "00000000-0000-0000-0000-000000000000"
#: Reserved flow action id of the "start" pseudo-action a call shows before its flow runs.
START_ACTION_ID = "00000000-0000-0000-0000-000000000001"

JSON = dict[str, Any]


def new_id() -> str:
    """A fresh random uuid string."""
    return str(uuid.uuid4())


def _tm(dt: datetime | None) -> str | None:
    return go_time(dt) if dt is not None else None


def _put_tm(out: JSON, key: str, dt: datetime | None) -> None:
    """``omitempty`` time: only present when set."""
    if dt is not None:
        out[key] = go_time(dt)


# ----------------------------------------------------------------------------- scripting types


@dataclass
class Utterance:
    """One thing the simulated caller says.

    By default it is said ``pause_s`` after the agent has finished speaking (and has said
    something since the previous utterance). ``barge_in_after_s`` makes it start that long after
    the agent starts playing its next reply (a barge-in); ``wait_for_agent=False`` says it
    ``pause_s`` after the previous utterance whatever the agent does; ``backchannel_after_s``
    makes it a backchannel.
    """

    text: str
    pause_s: float = 0.05
    barge_in_after_s: float | None = None
    wait_for_agent: bool = True
    #: The final transcripts this utterance arrives as, in order (their words must be the
    #: text's); ``None`` splits at sentence ends, up to 3 (:func:`agentd.sim.stt.split_finals`),
    #: ``[text]`` keeps it one final.
    finals: list[str] | None = None
    #: A backchannel ("mm-hmm") said this long after the agent starts playing its next reply,
    #: while it talks: the caller expects no answer to it, so the next utterance still waits
    #: for the reply it was said over.
    backchannel_after_s: float | None = None
    #: The last final as the STT settles it when it differs from the interims (which show
    #: ``text`` word by word): a filler dropped, a word heard again, numbers written as digits,
    #: punctuation. VoIPBIN publishes the provider's final result's text as the transcript's
    #: ``message`` and each interim's as the speech event's (``bin-transcribe-manager``
    #: ``pkg/streaminghandler/result.go``); Google's and AWS's streaming recognisers revise
    #: their partials in the final. ``None`` keeps the interims' words.
    settled_as: str | None = None

    def __post_init__(self) -> None:
        if self.finals is not None and " ".join(self.finals).split() != self.text.split():
            raise ValueError(f"finals {self.finals!r} do not make up the text {self.text!r}")


@dataclass
class Caller:
    """A scripted remote party: what it says, and when it hangs up after the last answer.

    ``hangup_after_s=None`` keeps the line open forever.
    """

    utterances: list[Utterance] = field(default_factory=list)
    hangup_after_s: float | None = 0.2
    #: When set (a ``time.monotonic()`` instant), utterances with ``wait_for_agent=False`` keep
    #: to a timeline from it: each starts ``pause_s`` after the previous one was due to end, not
    #: after it really ended, so lateness does not carry over (the bench's staggered callers).
    paced_from: float | None = None


OutcomeResult = Literal["answer", "busy", "noanswer", "failed"]


@dataclass
class Outcome:
    """How the far end treats an outbound call: rings after ``ring_after_s``, then ``result``
    ``answer_after_s`` later (answer, or a hangup with that reason)."""

    result: OutcomeResult = "answer"
    ring_after_s: float = 0.05
    answer_after_s: float = 0.1


@dataclass
class Line:
    """One turn of the conversation as the call heard it.

    ``text`` is what was actually heard (an agent line is truncated where its audio was cut),
    ``planned`` the full text sent with ``/say`` (or the caller's full utterance).
    """

    who: Literal["agent", "caller"]
    text: str
    planned: str
    t_start: float
    t_end: float | None = None
    cut: bool = False

    def to_json(self) -> JSON:
        """Plain dict for the control API."""
        return {
            "who": self.who,
            "text": self.text,
            "planned": self.planned,
            "t_start": self.t_start,
            "t_end": self.t_end,
            "cut": self.cut,
        }


# ----------------------------------------------------------------------------- resources


@dataclass
class SimCall:
    """A call and everything the simulator tracks about it."""

    id: str
    customer_id: str
    source: JSON
    destination: JSON
    direction: Literal["incoming", "outgoing"]
    status: str
    tm_create: datetime
    flow_id: str = field(default_factory=new_id)
    activeflow_id: str = field(default_factory=new_id)
    action: JSON = field(
        default_factory=lambda: {"id": START_ACTION_ID, "next_id": NIL_UUID, "tm_execute": None}
    )
    hangup_by: str = ""
    hangup_reason: str = ""
    tm_ringing: datetime | None = None
    tm_progressing: datetime | None = None
    tm_hangup: datetime | None = None
    tm_update: datetime | None = None
    conversation: list[Line] = field(default_factory=list)
    #: Monotonic time the call was answered (``progressing``), for timing predicates.
    t_answer: float | None = None
    #: Count of heard ``/say`` requests on this call so far (the caller waits for "an answer").
    say_seq: int = 0
    #: ``(say_seq, t_start)`` of each agent audio that started playing.
    play_log: list[tuple[int, float]] = field(default_factory=list)
    #: Transfers requested on this call (``POST /transfers``).
    transfers: list[JSON] = field(default_factory=list)
    groupcall_id_internal: str | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    #: The confbridge the call is joined to (internal: the server's ``WebhookMessage`` has no
    #: ``confbridge_id``, ``bin-call-manager/models/call/webhook.go``).
    confbridge_id: str = NIL_UUID
    #: The call whose ``connect`` (or transfer) created this one, and the calls this one created
    #: (``bin-call-manager/pkg/callhandler/outgoing_call.go``, ``ChainedCallIDAdd``).
    master_call_id: str = NIL_UUID
    chained_call_ids: list[str] = field(default_factory=list)
    #: ``mute_direction`` and music on hold (an attended transfer puts the others on hold and
    #: mutes them, ``bin-transfer-manager/pkg/transferhandler/attended.go``).
    mute_direction: str = ""
    moh: bool = False
    #: ``DELETE /calls/{id}``: set once, by then the call is ending.
    tm_delete: datetime | None = None

    @property
    def ended(self) -> bool:
        """True once the call reached the final ``hangup`` status."""
        return self.status == "hangup"

    @property
    def ending(self) -> bool:
        """True from our hangup on (``terminating``, ``canceling``) and once it is over."""
        return self.status in ("terminating", "canceling", "hangup")

    def to_json(self) -> JSON:
        """The ``WebhookMessage`` shape (REST and WebSocket)."""
        out: JSON = {
            "id": self.id,
            "customer_id": self.customer_id,
            "owner_type": "",
            "owner_id": NIL_UUID,
            "flow_id": self.flow_id,
            "activeflow_id": self.activeflow_id,
            "type": "flow",
            "master_call_id": self.master_call_id,
        }
        if self.chained_call_ids:
            out["chained_call_ids"] = list(self.chained_call_ids)
        out.update(
            {
                "recording_id": NIL_UUID,
                # The server never copies groupcall_id into the external shape (protocol §4.6).
                "groupcall_id": NIL_UUID,
                "source": dict(self.source),
                "destination": dict(self.destination),
                "status": self.status,
                "action": dict(self.action),
                "direction": self.direction,
            }
        )
        if self.mute_direction:
            out["mute_direction"] = self.mute_direction
        if self.hangup_by:
            out["hangup_by"] = self.hangup_by
        if self.hangup_reason:
            out["hangup_reason"] = self.hangup_reason
        _put_tm(out, "tm_progressing", self.tm_progressing)
        _put_tm(out, "tm_ringing", self.tm_ringing)
        _put_tm(out, "tm_hangup", self.tm_hangup)
        _put_tm(out, "tm_create", self.tm_create)
        _put_tm(out, "tm_update", self.tm_update)
        _put_tm(out, "tm_delete", self.tm_delete)
        return out


@dataclass
class SimGroupcall:
    """A groupcall created for ``agent``/``extension`` destinations."""

    id: str
    customer_id: str
    source: JSON
    destinations: list[JSON]
    flow_id: str
    call_ids: list[str]
    status: str
    tm_create: datetime
    answer_call_id: str = NIL_UUID
    tm_update: datetime | None = None

    def to_json(self) -> JSON:
        """The groupcall ``WebhookMessage`` shape."""
        out: JSON = {
            "id": self.id,
            "customer_id": self.customer_id,
            "owner_type": "",
            "owner_id": NIL_UUID,
            "status": self.status,
            "flow_id": self.flow_id,
            "source": dict(self.source),
            "destinations": [dict(d) for d in self.destinations],
            "master_call_id": NIL_UUID,
            "master_groupcall_id": NIL_UUID,
            "ring_method": "ring_all",
            "answer_method": "hangup_others",
            "answer_call_id": self.answer_call_id,
            "call_ids": list(self.call_ids),
            "answer_groupcall_id": NIL_UUID,
            "call_count": len(self.call_ids),
        }
        _put_tm(out, "tm_create", self.tm_create)
        _put_tm(out, "tm_update", self.tm_update)
        return out


@dataclass
class SimTranscribe:
    """A live STT session on a call."""

    id: str
    customer_id: str
    reference_type: str
    reference_id: str
    language: str
    direction: str
    provider: str
    tm_create: datetime
    #: Monotonic start, the origin of transcripts' ``offset_ms``.
    t_start: float
    status: str = "progressing"
    tm_update: datetime | None = None
    #: Hears nothing: created before the call was answered (production measurement), or
    #: deafened (a fault, Google's 5-minute limit, an orphan); it stays ``progressing``.
    deaf: bool = False
    streaming_in: str = field(default_factory=new_id)
    streaming_out: str = field(default_factory=new_id)
    #: The provider actually transcribing (``""`` = none could start): the requested one, or
    #: the server's silent fallback (``streaminghandler/start.go`` ``runSTT``). Not in the JSON.
    engine: str = ""
    #: Its pod restarted: the streams are gone, the row still says ``progressing``.
    orphaned: bool = False
    tm_delete: datetime | None = None

    def hears(self, direction: Literal["in", "out"]) -> bool:
        """Whether this session transcribes audio of ``direction`` right now."""
        return (
            self.status == "progressing" and not self.deaf and self.direction in (direction, "both")
        )

    def to_json(self) -> JSON:
        """The transcribe ``WebhookMessage`` shape (times are ``null`` when unset)."""
        return {
            "id": self.id,
            "customer_id": self.customer_id,
            "activeflow_id": NIL_UUID,
            "on_end_flow_id": NIL_UUID,
            "reference_type": self.reference_type,
            "reference_id": self.reference_id,
            "status": self.status,
            "language": self.language,
            "direction": self.direction,
            "provider": self.provider,
            "tm_create": _tm(self.tm_create),
            "tm_update": _tm(self.tm_update),
            "tm_delete": _tm(self.tm_delete),
        }


@dataclass
class SimTranscript:
    """One final STT result."""

    id: str
    customer_id: str
    transcribe_id: str
    direction: str
    message: str
    offset_ms: int
    tm_create: datetime
    #: Soft-deleted with its transcribe (``DELETE /transcribes/{id}``): no longer listed.
    tm_delete: datetime | None = None
    #: Made by a server older than 2026-09 (``SimSettings.legacy_transcripts``).
    legacy: bool = False

    def to_json(self) -> JSON:
        """The transcript shape of the current server (``offset_ms``, no ``tm_transcript``), or
        of the older one: ``tm_transcript``, year 1 plus the offset (``time.Time{}.Add``,
        ``bin-transcribe-manager/pkg/streaminghandler/result.go``), no ``offset_ms``."""
        out: JSON = {
            "id": self.id,
            "customer_id": self.customer_id,
            "transcribe_id": self.transcribe_id,
            "direction": self.direction,
            "message": self.message,
        }
        if self.legacy:
            out["tm_transcript"] = year_one_time(self.offset_ms)
        else:
            out["offset_ms"] = self.offset_ms
        out["tm_create"] = go_time(self.tm_create)
        return out


@dataclass
class SayItem:
    """Text queued on a speaking session, and its playback record once it starts."""

    text: str
    seq: int
    line: Line | None = None
    #: Monotonic time of its ``/say``: the audio cannot start before ``t_said + say_latency_s``.
    t_said: float = 0.0
    #: Monotonic time an ``aws`` flush ends it (the end of the chunk being written).
    cut_at: float | None = None


@dataclass
class SimSpeaking:
    """A TTS session streaming into a call."""

    id: str
    customer_id: str
    reference_type: str
    reference_id: str
    language: str
    provider: str
    voice_id: str
    direction: str
    status: str
    tm_create: datetime
    tm_update: datetime | None = None
    tm_delete: datetime | None = None
    deaf: bool = False
    queue: collections.deque[SayItem] = field(default_factory=collections.deque)
    current: SayItem | None = None
    #: Set to cut the audio that is playing now.
    cut_event: asyncio.Event = field(default_factory=asyncio.Event)
    player: asyncio.Task[None] | None = None
    #: The tts-manager pod that owns the stream (internal: not in the JSON); say, flush and stop
    #: are routed to it.
    pod_id: str = ""

    @property
    def flush_kind(self) -> str:
        """Flush behaviour of the provider (anything unknown streams through ElevenLabs)."""
        return self.provider if self.provider in ("gcp", "aws") else "elevenlabs"

    @property
    def busy(self) -> bool:
        """Audio playing or queued."""
        return self.current is not None or bool(self.queue)

    def to_json(self) -> JSON:
        """The speaking ``WebhookMessage`` shape (REST only: never on the WebSocket)."""
        out: JSON = {"id": self.id, "customer_id": self.customer_id}
        if self.reference_type:
            out["reference_type"] = self.reference_type
        out["reference_id"] = self.reference_id
        for key in ("language", "provider", "voice_id", "direction"):
            value = getattr(self, key)
            if value:
                out[key] = value
        out["status"] = self.status
        _put_tm(out, "tm_create", self.tm_create)
        _put_tm(out, "tm_update", self.tm_update)
        _put_tm(out, "tm_delete", self.tm_delete)
        return out


@dataclass
class SimFlow:
    """A flow (``bin-flow-manager/models/flow``): what ``POST /calls`` ``flow_id`` and a number's
    ``call_flow_id`` name."""

    id: str
    customer_id: str
    actions: list[JSON]
    tm_create: datetime
    name: str = ""
    detail: str = ""
    deleted: bool = False


ConfbridgeType = Literal["connect", "conference"]


@dataclass
class SimConfbridge:
    """A confbridge (``bin-call-manager/models/confbridge``): calls bridged together.

    A ``connect`` one (made by the ``connect`` action) terminates when one call is left, unless
    it has the ``no_auto_leave`` flag a blind transfer sets (``confbridgehandler/leaved.go``).
    """

    id: str
    customer_id: str
    type: ConfbridgeType
    call_ids: list[str] = field(default_factory=list)
    flags: set[str] = field(default_factory=set)
    status: str = "progressing"
    #: The bridge plays ringback to its calls (``ringanswer.go``): a transferee is being rung.
    ringing: bool = False

    def to_json(self) -> JSON:
        """The control API's view."""
        return {
            "id": self.id,
            "type": self.type,
            "call_ids": list(self.call_ids),
            "flags": sorted(self.flags),
            "status": self.status,
            "ringing": self.ringing,
        }
