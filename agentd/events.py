"""Typed VoIPBIN events, and the parser that turns a WebSocket frame into one.

VoIPBIN's WebSocket frames are the bare resource JSON (a Call, a Transcript, ...) with no type:
the kind of event is inferred from the fields (docs/protocol.md §3.3). The legacy wrapped
`{"type", "data"}` shape (what webhooks carry) is accepted too. `parse_frame` never raises: a frame
it cannot use comes back as a `Rejected` with a short reason that the stream logs and counts.
"""

from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

import orjson

from agentd.value import value

# Later statuses never go back to earlier ones; terminating and canceling are both "ending".
STATUS_RANK = {
    "dialing": 0,
    "ringing": 1,
    "progressing": 2,
    "terminating": 3,
    "canceling": 3,
    "hangup": 4,
}
MAX_TEXT = 20_000  # a transcript longer than this is not speech: reject rather than carry it around
MAX_FRAME = 1_000_000

SpeechKind = Literal["started", "interim", "ended", "boundary"]


@value
class CallInfo:
    """The fields of a VoIPBIN Call that agentd uses."""

    id: str
    status: str
    direction: str
    source: str
    destination: str
    hangup_by: str = ""
    hangup_reason: str = ""
    tm_update: str = ""
    # a leg a flow's `connect` (or a transfer) dialled for another call: never the agent's
    master_call_id: str = ""
    # the legs dialled for this call: the second leg of a `connect` flow is the one a blind
    # transfer hangs up (docs/protocol.md §9)
    chained_call_ids: tuple[str, ...] = ()


@value
class CallEvent:
    """A call_* event (or a Call read back over REST: `checked`)."""

    call: CallInfo
    deleted: bool = False
    checked: bool = False  # VoIPBIN's answer to our GET, now; a stream event may be stale


@value
class TranscribeEvent:
    """transcribe_created / transcribe_done: a transcribe session's lifecycle."""

    id: str
    reference_type: str
    reference_id: str
    status: str
    language: str = ""


@value
class TranscriptEvent:
    """transcript_created: one final utterance of one direction (`in` = the caller)."""

    id: str
    transcribe_id: str
    direction: str
    message: str


@value
class SpeechEvent:
    """transcribe_speech_started / _interim / _ended.

    Unwrapped frames cannot tell started from ended (neither carries `message`): that is `boundary`.
    """

    id: str
    transcribe_id: str
    kind: SpeechKind
    direction: str = "in"
    message: str = ""
    at: str = ""  # `tm_event`: when VoIPBIN published it, by its clock ("" when absent)


@value
class Rejected:
    """A frame that is not a usable event; `reason` is safe to log (it never echoes the payload)."""

    reason: str
    ignorable: bool = (
        False  # a well-formed event of a kind we do not use (groupcall, recording, ...)
    )


Event = CallEvent | TranscribeEvent | TranscriptEvent | SpeechEvent


@value
class Parsed:
    """A parsed frame: the event and the key that identifies a duplicate of it."""

    event: Event
    key: str
    # why the frame was bad input taken all the same ("" for a sound one): the stream says so
    irregular: str = ""


@value
class _Irregular:
    """An event read from a frame the server should not have sent so, and what was wrong."""

    event: Event
    reason: str


#: a transcript's or speech event's `direction` as VoIPBIN sends it (transcript/transcript.go)
_DIRECTIONS = frozenset(("in", "out"))

_WRAPPED_SPEECH: dict[str, SpeechKind] = {
    "transcribe_speech_started": "started",
    "transcribe_speech_interim": "interim",
    "transcribe_speech_ended": "ended",
}


def parse_frame(frame: str | bytes) -> Parsed | Rejected:
    """Turn one WebSocket text frame into an event, or say why not."""
    if isinstance(frame, bytes):
        return Rejected("binary frame")
    if len(frame) > MAX_FRAME:
        return Rejected("frame too large")
    try:
        obj = orjson.loads(frame)
    except orjson.JSONDecodeError:
        # what orjson refuses and the stdlib reads (NaN, huge integers, a lone surrogate escape)
        try:
            obj = _without_lone_surrogates(json.loads(frame))
        except (ValueError, RecursionError):
            return Rejected("not JSON")
    if not isinstance(obj, dict):
        return Rejected("not a JSON object")
    return parse_object(obj, frame)


def _without_lone_surrogates(obj: Any) -> Any:
    """`obj` with each lone surrogate (a `\\ud83d` escape without its pair) made U+FFFD: no
    UTF-8 encoder takes one, so a log line, a store row or a `/say` body of it would fail."""
    if isinstance(obj, str):
        return obj.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    if isinstance(obj, dict):
        return {_without_lone_surrogates(k): _without_lone_surrogates(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_without_lone_surrogates(v) for v in obj]
    return obj


def parse_object(obj: dict[str, Any], raw: str | None = None) -> Parsed | Rejected:
    """Classify a decoded frame (wrapped or unwrapped)."""
    hint: str | None = None
    data = obj.get("data")
    etype = obj.get("type")
    if etype is None:
        etype = obj.get("event_type")
    # An envelope has no `id` of its own; a resource always has one. A Call carries a `type`
    # ("flow") and may carry a `data` object too (the server's Call struct has one): it is
    # the event, not an envelope around it
    if isinstance(data, dict) and isinstance(etype, str) and ("id" not in obj or "id" in data):
        hint, obj = etype, data
    try:
        result = _classify(obj, hint)
    except (TypeError, ValueError, AttributeError) as exc:
        return Rejected(f"malformed field: {type(exc).__name__}")
    if isinstance(result, Rejected):
        return result
    if isinstance(result, _Irregular):
        return Parsed(result.event, _dedupe_key(result.event, raw), result.reason)
    return Parsed(result, _dedupe_key(result, raw))


def timestamp(value: object) -> datetime | None:
    """A VoIPBIN timestamp (`2006-01-02T15:04:05.000000Z`, UTC), or None if it is not one."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return None
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def event_of(obj: object) -> Event | None:
    """The event in a resource read over REST, or None if it is not one we can use."""
    if not isinstance(obj, dict):
        return None
    parsed = parse_object(obj)
    return parsed.event if isinstance(parsed, Parsed) else None


def _str(obj: dict[str, Any], key: str, *, required: bool = True) -> str:
    value = obj.get(key)
    if value is None:
        if required:
            raise ValueError(key)
        return ""
    if not isinstance(value, str):
        raise TypeError(key)
    return value


def _target(obj: dict[str, Any], key: str) -> str:
    addr = obj.get(key)
    if addr is None:
        return ""
    if not isinstance(addr, dict):
        raise TypeError(key)
    return _str(addr, "target", required=False)


def _speech(obj: dict[str, Any], hint: str | None) -> SpeechEvent | _Irregular | Rejected:
    # the most frequent frame (four to six a turn): its fields read inline, not through _str
    get = obj.get
    message, event_id, transcribe_id = get("message"), get("id"), get("transcribe_id")
    direction, at = get("direction"), get("tm_event")
    if (
        type(event_id) is not str
        or type(transcribe_id) is not str
        or (message is not None and type(message) is not str)
        or (direction is not None and type(direction) is not str)
        or (at is not None and type(at) is not str)
        or direction not in _DIRECTIONS
        or "streaming_id" not in obj
    ):
        return _speech_checked(obj, hint)
    if message is not None and len(message) > MAX_TEXT:
        return Rejected("speech text too long")
    return SpeechEvent(
        event_id,
        transcribe_id,
        _WRAPPED_SPEECH.get(hint or "", "interim" if message else "boundary"),
        direction,
        message or "",
        at or "",
    )


def _speech_checked(obj: dict[str, Any], hint: str | None) -> SpeechEvent | _Irregular | Rejected:
    """A speech event with a field missing, not a string, or not as VoIPBIN sends it: what it
    is rejected for, or what it is taken as."""
    message = obj.get("message")
    if message is not None and not isinstance(message, str):
        raise TypeError("message")
    kind: SpeechKind = _WRAPPED_SPEECH.get(hint or "", "interim" if message else "boundary")
    if len(message or "") > MAX_TEXT:
        return Rejected("speech text too long")
    direction, odd = _direction(_str(obj, "direction", required=False), "speech event")
    event = SpeechEvent(
        id=_str(obj, "id"),
        transcribe_id=_str(obj, "transcribe_id"),
        kind=kind,
        direction=direction,
        message=message or "",
        at=_str(obj, "tm_event", required=False),
    )
    if not odd and "streaming_id" not in obj:
        odd = "speech event without streaming_id"
    return _Irregular(event, odd) if odd else event


def _transcript(obj: dict[str, Any], hint: str | None) -> TranscriptEvent | _Irregular | Rejected:
    message = _str(obj, "message")
    if len(message) > MAX_TEXT:
        return Rejected("transcript too long")
    direction, odd = _direction(_str(obj, "direction", required=False), "transcript")
    event = TranscriptEvent(
        id=_str(obj, "id"),
        transcribe_id=_str(obj, "transcribe_id"),
        direction=direction,
        message=message,
    )
    return _Irregular(event, odd) if odd else event


def _direction(value: str, what: str) -> tuple[str, str]:
    """The direction of a transcript or speech event, and what was wrong with it ("" if
    nothing). VoIPBIN sends `in` or `out` only. Anything else is taken as the caller's (`in`):
    agentd transcribes the caller's leg alone, so the words are theirs whatever the label, and
    a caller's words dropped leave the caller unanswered."""
    if value in _DIRECTIONS:
        return value, ""
    if not value:
        return "in", f"{what} without direction: taken as the caller's"
    shown = repr(value[:20])
    folded = value.strip().lower()
    if folded in _DIRECTIONS:
        return folded, f"{what} direction {shown} read as {folded!r}"
    return "in", f"{what} direction {shown} unknown: taken as the caller's"


def _transcribe(obj: dict[str, Any], hint: str | None) -> TranscribeEvent:
    return TranscribeEvent(
        id=_str(obj, "id"),
        reference_type=_str(obj, "reference_type"),
        reference_id=_str(obj, "reference_id"),
        status=obj["status"],
        language=_str(obj, "language", required=False),
    )


def _call(obj: dict[str, Any], hint: str | None) -> CallEvent | Rejected:
    if "call_ids" in obj or "ring_method" in obj:
        return Rejected("groupcall", ignorable=True)
    status = obj.get("status")
    if not isinstance(status, str):
        raise TypeError("status")
    if status not in STATUS_RANK:
        return Rejected(f"unknown call status {status[:20]!r}")
    info = CallInfo(
        id=_str(obj, "id"),
        status=status,
        direction=_str(obj, "direction"),
        source=_target(obj, "source"),
        destination=_target(obj, "destination"),
        hangup_by=_str(obj, "hangup_by", required=False),
        hangup_reason=_str(obj, "hangup_reason", required=False),
        tm_update=_str(obj, "tm_update", required=False),
        master_call_id=_call_id(obj.get("master_call_id")),
        chained_call_ids=_call_ids(obj.get("chained_call_ids")),
    )
    return CallEvent(info, deleted=hint == "call_deleted" or is_real_time(obj.get("tm_delete")))


def _is_speech(obj: dict[str, Any], hint: str | None) -> bool:
    # `tm_event` too: a transcript never has one, and an interim taken for a transcript would be
    # answered as a final, half a sentence
    return ("transcribe_id" in obj and ("streaming_id" in obj or "tm_event" in obj)) or (
        hint or ""
    ) in _WRAPPED_SPEECH


def _is_transcript(obj: dict[str, Any], hint: str | None) -> bool:
    return "transcribe_id" in obj and "message" in obj


def _is_transcribe(obj: dict[str, Any], hint: str | None) -> bool:
    return "reference_type" in obj and obj.get("status") in ("progressing", "done")


def _is_call(obj: dict[str, Any], hint: str | None) -> bool:
    return "direction" in obj and ("source" in obj or "destination" in obj)


# What a frame carries, told by its fields (docs/protocol.md §3.3); the first matching shape wins.
# A speech event has a `transcribe_id` (and a `message` when interim): it goes before transcripts.
_SHAPES: tuple[
    tuple[
        Callable[[dict[str, Any], str | None], bool],
        Callable[[dict[str, Any], str | None], Event | _Irregular | Rejected],
    ],
    ...,
] = (
    (_is_speech, _speech),
    (_is_transcript, _transcript),
    (_is_transcribe, _transcribe),
    (_is_call, _call),
)


def _classify(obj: dict[str, Any], hint: str | None) -> Event | _Irregular | Rejected:
    if hint is not None and not hint.startswith(("call_", "transcribe_", "transcript_")):
        return Rejected(f"unused event type {hint[:40]}", ignorable=True)
    for matches, build in _SHAPES:
        if matches(obj, hint):
            return build(obj, hint)
    if hint is not None:
        return Rejected(f"event {hint[:40]} has an unexpected shape")
    if "call_ids" in obj or ("recording_id" in obj and "format" in obj):
        return Rejected("unused resource", ignorable=True)
    return Rejected("unknown resource shape")


_NIL_UUID = "00000000-0000-0000-0000-000000000000"


def _call_id(value: object) -> str:
    """A call id, or "" for none (absent, not a string, or the nil uuid)."""
    return value if isinstance(value, str) and value and value != _NIL_UUID else ""


def _call_ids(value: object) -> tuple[str, ...]:
    if not isinstance(value, list):
        return ()
    return tuple(i for i in map(_call_id, value[:16]) if i)


def is_real_time(value: object) -> bool:
    """A timestamp that happened: not empty, null, or a legacy `9999-01-01…` "never" sentinel
    (VoIPBIN's docs show unset times so; its server omits them or sends null)."""
    return isinstance(value, str) and bool(value) and not value.startswith("9999")


def _dedupe_key(event: Event, raw: str | None) -> str:
    match event:  # the most frequent first: each case is an isinstance
        case SpeechEvent():
            return f"speech:{event.id}"
        case TranscriptEvent():
            return f"transcript:{event.id}"
        case CallEvent(call=c):
            # call_updated repeats a status with a new tm_update; without tm_update, hash the frame
            if c.tm_update or raw is None:
                return f"call:{c.id}:{c.status}:{c.tm_update}"
            return "call:" + hashlib.blake2b(raw.encode(), digest_size=12).hexdigest()
        case TranscribeEvent():
            return f"transcribe:{event.id}:{event.status}"


@dataclass
class Deduper:
    """Remembers the last `size` event keys; `seen(key)` is true for a repeat."""

    size: int = 10_000
    _keys: OrderedDict[str, None] = field(default_factory=OrderedDict)

    def seen(self, key: str) -> bool:
        """Record `key`; return whether it had been seen already."""
        if key in self._keys:
            self._keys.move_to_end(key)
            return True
        self._keys[key] = None
        if len(self._keys) > self.size:
            self._keys.popitem(last=False)
        return False
