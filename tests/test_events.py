"""Frame parsing: both payload shapes, every kind of bad input, duplicate keys."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agentd.events import (
    CallEvent,
    Deduper,
    Parsed,
    Rejected,
    SpeechEvent,
    TranscribeEvent,
    TranscriptEvent,
    parse_frame,
    timestamp,
)

NIL = "00000000-0000-0000-0000-000000000000"
CALL = {
    "id": "d499c4f4-2f07-488b-a5f7-4b49c00e9a2a",
    "customer_id": "5e4a0680",
    "owner_id": NIL,
    "flow_id": NIL,
    "type": "flow",
    "source": {"type": "tel", "target": "+15551230000"},
    "destination": {"type": "tel", "target": "+15557654321"},
    "status": "progressing",
    "action": {"id": NIL, "next_id": NIL, "tm_execute": None},
    "direction": "outgoing",
    "tm_update": "2026-08-20T10:00:07.512345Z",
}
TRANSCRIPT = {
    "id": "9d59",
    "customer_id": "5e4a",
    "transcribe_id": "550e",
    "direction": "in",
    "message": "Hi, I need help.",
    "offset_ms": 8991,
    "tm_create": "2026-08-20T10:00:15Z",
}


def parsed(frame: object) -> Parsed:
    result = parse_frame(json.dumps(frame))
    assert isinstance(result, Parsed), result
    return result


def test_unwrapped_call() -> None:
    event = parsed(CALL).event
    assert isinstance(event, CallEvent)
    assert (event.call.status, event.call.source, event.call.destination) == (
        "progressing",
        "+15551230000",
        "+15557654321",
    )


@pytest.mark.parametrize(
    "stamp", [{"offset_ms": 8991}, {"tm_transcript": "0001-01-01T00:00:08Z"}, {}]
)
def test_transcripts_of_old_and_new_servers(stamp: dict[str, object]) -> None:
    frame = {k: v for k, v in TRANSCRIPT.items() if k != "offset_ms"} | stamp
    assert parsed(frame).event == TranscriptEvent("9d59", "550e", "in", "Hi, I need help.")


SPEECH = {
    "id": "a1",
    "customer_id": "c",
    "streaming_id": "s",
    "transcribe_id": "t",
    "direction": "in",
    "tm_event": "2026-08-20T10:00:12.000123456Z",
}


def test_speech_events() -> None:
    base = SPEECH
    at = "2026-08-20T10:00:12.000123456Z"  # Go's RFC3339Nano: kept as sent
    assert parsed(base).event == SpeechEvent("a1", "t", "boundary", "in", "", at)
    assert parsed(base | {"message": "Hi I"}).event == SpeechEvent(
        "a1", "t", "interim", "in", "Hi I", at
    )
    wrapped = {"type": "transcribe_speech_started", "data": base}
    assert parsed(wrapped).event == SpeechEvent("a1", "t", "started", "in", "", at)
    assert parsed(base | {"tm_event": None}).event == SpeechEvent("a1", "t", "boundary")
    assert parsed(base | {"direction": None}).event == SpeechEvent("a1", "t", "boundary", at=at)
    assert parsed(base | {"message": ""}).event == SpeechEvent("a1", "t", "boundary", at=at)
    assert timestamp(at) == datetime(2026, 8, 20, 10, 0, 12, 123, tzinfo=UTC)
    assert timestamp("2026-08-20T10:00:07.5Z") == datetime(2026, 8, 20, 10, 0, 7, 500000, UTC)
    assert timestamp("soon") is None and timestamp(None) is None


def test_transcribe_lifecycle() -> None:
    frame = {
        "id": "550e",
        "customer_id": "c",
        "reference_type": "call",
        "reference_id": "d499",
        "status": "done",
        "language": "en-US",
        "direction": "in",
    }
    assert parsed(frame).event == TranscribeEvent("550e", "call", "d499", "done", "en-US")


def test_wrapped_frames_are_understood() -> None:
    assert parsed({"type": "call_progressing", "data": CALL}).event == parsed(CALL).event
    assert isinstance(
        parsed({"type": "transcript_created", "data": TRANSCRIPT}).event, TranscriptEvent
    )


@pytest.mark.parametrize("data", [{}, {"early_execution": True, "anonymous": "no"}])
def test_a_call_with_a_data_field_is_a_call_not_an_envelope(data: dict[str, object]) -> None:
    # A Call has a `type` of its own ("flow"), and the server's Call struct a `data` object
    # (REFERENCE.md §6.1, internal, but an extra field all the same): such a frame is the call,
    # not a `{"type", "data"}` envelope of an event type named "flow"
    assert parsed(CALL | {"data": data}).event == parsed(CALL).event


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\x00binary", "binary frame"),
        ("not json", "not JSON"),
        ("[1, 2]", "not a JSON object"),
        ("{}", "unknown resource shape"),
        (json.dumps(CALL | {"status": "exploded"}), "unknown call status 'exploded'"),
        (json.dumps(CALL | {"status": 5}), "malformed field: TypeError"),
        (json.dumps(CALL | {"source": "x"}), "malformed field: TypeError"),
        (json.dumps(TRANSCRIPT | {"message": 7}), "malformed field: TypeError"),
        (json.dumps(TRANSCRIPT | {"message": "x" * 30_000}), "transcript too long"),
        (json.dumps({k: v for k, v in CALL.items() if k != "id"}), "malformed field: ValueError"),
        # speech events: the most frequent frames, read on a path of their own
        (json.dumps(SPEECH | {"message": 7}), "malformed field: TypeError"),
        (json.dumps(SPEECH | {"direction": ["in"]}), "malformed field: TypeError"),
        (json.dumps(SPEECH | {"tm_event": 12}), "malformed field: TypeError"),
        (json.dumps(SPEECH | {"transcribe_id": None}), "malformed field: ValueError"),
        (json.dumps({k: v for k, v in SPEECH.items() if k != "id"}), "malformed field: ValueError"),
        (json.dumps(SPEECH | {"message": "x" * 30_000}), "speech text too long"),
        ("[" * 100_000, "not JSON"),
    ],
)
def test_bad_frames_are_rejected_with_a_reason(frame: str | bytes, reason: str) -> None:
    result = parse_frame(frame)
    assert isinstance(result, Rejected)
    assert result.reason == reason
    assert not result.ignorable


def test_events_we_do_not_use_are_ignorable() -> None:
    groupcall = {
        "id": "g",
        "status": "progressing",
        "source": {"target": "+1"},
        "destinations": [],
        "call_ids": [],
        "ring_method": "ring_all",
        "direction": "x",
    }
    assert parse_frame(json.dumps(groupcall)) == Rejected("groupcall", ignorable=True)
    result = parse_frame(json.dumps({"type": "recording_started", "data": {"id": "r"}}))
    assert isinstance(result, Rejected) and result.ignorable


def test_duplicate_keys() -> None:
    first = parsed(CALL).key
    assert parsed(CALL).key == first
    assert parsed(CALL | {"tm_update": "2026-08-20T10:00:08Z"}).key != first  # a new call_updated
    assert parsed(TRANSCRIPT).key == "transcript:9d59"
    dedupe = Deduper(size=2)
    # a repeat refreshes its key, so "c" evicts "b", the least recently seen
    assert [dedupe.seen(k) for k in ("a", "b", "a", "c", "b", "b")] == [
        False,
        False,
        True,
        False,
        False,
        True,
    ]


@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(
                    [
                        "id",
                        "status",
                        "direction",
                        "source",
                        "destination",
                        "message",
                        "transcribe_id",
                        "streaming_id",
                        "reference_type",
                        "reference_id",
                        "type",
                        "data",
                        "target",
                        "tm_update",
                        "tm_delete",
                    ]
                ),
                inner,
                max_size=8,
            )
        ),
        max_leaves=20,
    )
)
def test_no_frame_makes_the_parser_raise(value: object) -> None:
    result = parse_frame(json.dumps(value))
    assert isinstance(result, (Parsed, Rejected))


@pytest.mark.parametrize(
    ("tm_delete", "deleted"),
    [
        (None, False),
        ("", False),
        ("9999-01-01T00:00:00.000000Z", False),
        ("9999-01-01 00:00:00.000000", False),
        ("2026-08-20T10:03:12Z", True),
    ],
)
def test_only_a_real_tm_delete_means_deleted(tm_delete: str | None, deleted: bool) -> None:
    event = parsed(CALL | {"tm_delete": tm_delete}).event
    assert isinstance(event, CallEvent) and event.deleted is deleted


# ---- bad input the server never sends, read so that no words are lost -------------------------
# VoIPBIN always sends `streaming_id` and `direction` (in or out): bin-transcribe-manager
# models/streaming/webhook.go and models/transcript/webhook.go have neither field `omitempty`,
# and a transcript's direction is its streaming leg's (transcribehandler/start.go splits `both`
# into `in` and `out`). A frame without them is a broken or changed server: it is taken, and said.


def test_an_interim_without_a_streaming_id_is_speech_not_a_final_transcript() -> None:
    # an interim's fields but a transcript's: answering it would answer half a sentence
    frame = {k: v for k, v in SPEECH.items() if k != "streaming_id"} | {"message": "Hi I"}
    result = parsed(frame)
    at = SPEECH["tm_event"]
    assert result.event == SpeechEvent("a1", "t", "interim", "in", "Hi I", at)
    assert result.irregular == "speech event without streaming_id"
    boundary = parsed({k: v for k, v in SPEECH.items() if k != "streaming_id"})
    assert boundary.event == SpeechEvent("a1", "t", "boundary", "in", "", at)


@pytest.mark.parametrize(
    ("direction", "read", "irregular"),
    [
        ("in", "in", ""),
        ("out", "out", ""),
        (None, "in", "transcript without direction: taken as the caller's"),
        ("", "in", "transcript without direction: taken as the caller's"),
        ("IN", "in", "transcript direction 'IN' read as 'in'"),
        (" out", "out", "transcript direction ' out' read as 'out'"),
        ("both", "in", "transcript direction 'both' unknown: taken as the caller's"),
        ("caller", "in", "transcript direction 'caller' unknown: taken as the caller's"),
    ],
)
def test_a_transcript_without_a_known_direction_is_the_callers_and_said_so(
    direction: str | None, read: str, irregular: str
) -> None:
    # agentd transcribes the caller's leg only (`direction: "in"`): whatever the label says,
    # the words are the caller's, and dropping them leaves the caller unanswered
    frame = {k: v for k, v in TRANSCRIPT.items() if k != "direction"}
    if direction is not None:
        frame["direction"] = direction
    result = parsed(frame)
    assert result.event == TranscriptEvent("9d59", "550e", read, "Hi, I need help.")
    assert result.irregular == irregular


@pytest.mark.parametrize(
    ("direction", "read", "irregular"),
    [
        (None, "in", "speech event without direction: taken as the caller's"),
        ("In", "in", "speech event direction 'In' read as 'in'"),
        ("both", "in", "speech event direction 'both' unknown: taken as the caller's"),
    ],
)
def test_a_speech_event_without_a_known_direction_is_the_callers_and_said_so(
    direction: str | None, read: str, irregular: str
) -> None:
    frame = SPEECH | {"direction": direction, "message": "Hi I"}
    result = parsed(frame)
    assert result.event == SpeechEvent("a1", "t", "interim", read, "Hi I", SPEECH["tm_event"])
    assert result.irregular == irregular


def test_a_long_unknown_direction_is_not_quoted_whole() -> None:
    result = parsed(TRANSCRIPT | {"direction": "x" * 500})
    assert isinstance(result.event, TranscriptEvent) and result.event.direction == "in"
    assert len(result.irregular) < 100
