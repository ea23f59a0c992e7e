"""`agentd.value.value`: frozen to mypy, equal and hashable by value at run time."""

from __future__ import annotations

from pathlib import Path

from mypy import api

from agentd.commands import CancelTimer, StartTimer
from agentd.names import Timer, TimerKind


def test_equal_values_are_equal_and_hash_alike_and_match_by_position() -> None:
    a, b = Timer(TimerKind.RETRY_STOP, "s1"), Timer(TimerKind.RETRY_STOP, "s1")
    assert a == b and hash(a) == hash(b) and len({a, b}) == 1
    assert StartTimer("c1", a, 1.0) != CancelTimer("c1", a)
    match StartTimer("c1", a, 2.5):
        case StartTimer(call_id, timer, delay):
            assert (call_id, timer, delay) == ("c1", b, 2.5)


def test_mypy_refuses_to_change_a_field(tmp_path: Path) -> None:
    # what freezing did at run time, mypy does before: `make lint` fails on such a line
    snippet = tmp_path / "mutate.py"
    snippet.write_text(
        "from agentd.names import Timer, TimerKind\n"
        "t = Timer(TimerKind.HOLD)\n"
        "t.kind = TimerKind.FILLER\n"
    )
    out, _, status = api.run([str(snippet), "--no-incremental", "--follow-imports=silent"])
    assert status == 1, out
    assert 'Property "kind" defined in "Timer" is read-only' in out
