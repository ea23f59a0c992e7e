"""The call report: the pure accumulator, and a call stepped to its end that emits it."""

from __future__ import annotations

import pytest

from agentd.call.report import ENDED, GONE, HANGUP, STOPPED, Report, percentile
from agentd.commands import (
    Finished,
    Record,
    ReplyDone,
    ReplySentence,
    SpeakingStarted,
    Stopped,
    TranscribeStarted,
)
from agentd.events import TranscribeEvent
from agentd.names import Kind
from tests.test_call import CID, answered, status, step, transcript


def test_percentile_is_nearest_rank() -> None:
    assert percentile([300.0], 50) == 300.0
    values = [100.0, 400.0, 200.0, 300.0]
    assert percentile(values, 50) == 200.0
    assert percentile(values, 90) == 400.0
    with pytest.raises(ValueError):
        percentile([], 50)


def test_sessions_are_counted_from_creation_to_the_first_confirmation() -> None:
    r = Report()
    r.answered(1.0)
    r.opened("transcribe", "t1", 1.0)
    r.opened("speaking", "s1", 1.5)
    r.opened("speaking", "s1", 3.0)  # a poll answering again: still created at 1.5
    r.closed("s1", 4.5, STOPPED)  # a barge-in cut
    r.closed("s1", 9.0, STOPPED)  # a second confirmation changes nothing
    r.opened("speaking", "s2", 5.0)
    r.hung_up(11.0)  # the transcribe ends with the call, the speaking does not
    r.closed("t1", 12.0, STOPPED)
    r.closed("s2", 12.5, STOPPED)
    data = r.data(turns=2)
    assert data["session_seconds"] == {"speaking": 3.0 + 7.5, "transcribe": 10.0}
    assert data["duration_s"] == 10.0
    assert data["answered"] is True
    assert data["sessions"] == [
        {"kind": "transcribe", "id": "t1", "open_s": 10.0, "confirmed": HANGUP},
        {"kind": "speaking", "id": "s1", "open_s": 3.0, "confirmed": STOPPED},
        {"kind": "speaking", "id": "s2", "open_s": 7.5, "confirmed": STOPPED},
    ]


def test_an_unconfirmed_session_counts_up_to_the_report_and_says_so() -> None:
    r = Report()
    r.opened("speaking", "s1", 0.0)
    r.opened("transcribe", "t1", 0.0)
    r.closed("t1", 2.0, ENDED)
    r.closed("unknown", 2.0, GONE)  # a session the report never saw created: ignored
    r.tick(30.0)
    data = r.data(turns=0)
    assert data["session_seconds"] == {"speaking": 30.0, "transcribe": 2.0}
    sessions = data["sessions"]
    assert isinstance(sessions, list)
    assert sessions[0]["confirmed"] is None
    assert data["answered"] is False and data["duration_s"] == 0.0


def test_records_are_counted_and_latency_summarised() -> None:
    r = Report()
    r.saw(
        [
            Record(CID, Kind.TURN, {"turn": 1, "first_say_ms": 400.0}),
            Record(CID, Kind.TURN, {"turn": 2, "first_say_ms": 200.0}),
            Record(CID, Kind.TURN, {"turn": 3}),  # never said: no latency
            Record(CID, Kind.BARGE_IN, {"turn": 2}),
            Record(CID, Kind.BACKCHANNEL, {"text": "mm-hmm"}),
            Record(CID, Kind.ERROR, {"what": "say failed"}),
            Record(CID, Kind.LEAK, {"kind": "speaking"}),
            Finished(CID),
        ]
    )
    data = r.data(turns=3, restored=True)
    assert data["first_say_ms"] == {"n": 2, "p50": 200.0, "p90": 400.0, "max": 400.0}
    assert (data["barge_ins"], data["backchannels"], data["errors"], data["leaks"]) == (1, 1, 2, 1)
    assert data["restored"] is True
    assert "tokens" not in data  # no backend reports its usage


def test_a_stepped_call_ends_with_its_report_just_before_finished() -> None:
    call = answered()  # both sessions created at t=0
    step(call, transcript("What time is it"), 10)
    step(call, ReplySentence(1, "It is noon."), 10.5)
    tokens = [
        c.data
        for c in call.handle(ReplyDone(1, first_chunk_at=10.2, tokens=(120, 9)), 10.6)
        if isinstance(c, Record) and c.what is Kind.TOKENS
    ]
    assert tokens == [{"turn": 1, "input": 120, "output": 9}]
    step(call, status("hangup", "normal", "remote"), 20)
    assert call.handle(Stopped("speaking", "s1", True), 21) == []
    # VoIPBIN ended the transcribe itself at the hangup: no stop was sent, its `done` comes
    cmds = call.handle(TranscribeEvent("t1", "call", CID, "done"), 22)
    assert isinstance(cmds[-1], Finished)
    report = cmds[-2]
    assert isinstance(report, Record) and report.what is Kind.REPORT
    data = report.data
    # the speaking bills until its stop is confirmed; the transcribe ends with the call
    assert data["session_seconds"] == {"speaking": 21.0, "transcribe": 20.0}
    assert data["duration_s"] == 20.0
    assert data["turns"] == 1
    assert data["first_say_ms"] == {"n": 1, "p50": 500.0, "p90": 500.0, "max": 500.0}
    assert data["backend_tokens"] == {"input": 120, "output": 9}
    assert [s["confirmed"] for s in data["sessions"]] == [HANGUP, STOPPED]  # type: ignore[attr-defined]


def test_a_session_created_as_stopped_or_gone_is_closed_at_once() -> None:
    call = answered(speaking="initiating")
    call.handle(SpeakingStarted("s1", "stopped"), 1.0)
    assert call.report.sessions["s1"].how == GONE
    call.handle(TranscribeStarted("t1"), 1.0)  # the same id again: still created at 0
    assert call.report.sessions["t1"].opened == 0.0


def test_a_reply_retracted_because_the_caller_went_on_is_no_interruption() -> None:
    report = Report()
    report.saw(
        [
            Record("c1", Kind.BARGE_IN, {"turn": 1, "by": "caller went on"}),
            Record("c1", Kind.BARGE_IN, {"turn": 2, "by": "speech"}),
        ]
    )
    assert report.data(turns=2)["barge_ins"] == 1


def test_a_restored_call_s_duration_counts_from_its_answer_before_the_restart() -> None:
    from agentd.call import Call
    from tests.test_call import SETTINGS

    call = answered()
    data = call.snapshot()
    data["age_s"] = 30.0  # what the store says: answered 30 s before the restart
    again = Call.restore(data, SETTINGS)
    again.resume(100)
    again.handle(status("hangup"), 104)
    assert again.report.data(turns=0, restored=True)["duration_s"] == 34.0
    # a call still ringing at the restart was not answered before it
    ringing = Call(CID, SETTINGS)
    step(ringing, status("ringing"), 0)
    data = ringing.snapshot()
    data["age_s"] = 30.0
    later = Call.restore(data, SETTINGS)
    later.resume(100)
    assert later.report.answered_at is None
