"""What a long call costs: `python -m bench.longcall [--turns N]`.

One call's state machine, answered, then stepped through N caller turns (a question, a
two-sentence reply) in this process, with agentd's default settings: the memory the call holds
(tracemalloc, allocations still live since the answer) and the size of the row the store
rewrites on each turn, at a few points of its life. `make bench` measures young calls (a few
turns each); this shows that their cost does not grow with the call. See bench/PROFILE.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tracemalloc
import uuid

from agentd.call import Call, CallSettings
from agentd.commands import ReplyDone, ReplySentence, SpeakingStarted, TranscribeStarted
from agentd.events import CallEvent, CallInfo, TranscriptEvent

QUESTION = "I would like to know the balance of my account please"
REPLY = ("Your balance is one hundred and twenty three dollars.", "Anything else I can do?")


def answered(settings: CallSettings) -> Call:
    """A call that is up, with both sessions and the greeting sent."""
    call = Call("c1", settings)
    for status in ("ringing", "progressing"):
        call.handle(CallEvent(CallInfo("c1", status, "incoming", "+1555", "+1666")), 0.0)
    call.handle(TranscribeStarted("t1"), 0.0)
    call.handle(SpeakingStarted("s1", "active"), 0.0)
    return call


def _snapshot() -> tracemalloc.Snapshot:
    """What is allocated now, less tracemalloc's own (the previous snapshot's traces)."""
    return tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)]
    )


def run(turns: int, marks: tuple[int, ...]) -> list[tuple[int, float, float]]:
    """(turn, KiB held since the answer, KiB of the saved row) at each of `marks`."""
    settings = CallSettings(reply_on="final", final_hold_s=0.0, say_latency_s=0.0)
    tracemalloc.start()
    call = answered(settings)
    base = _snapshot()
    out = []
    for n in range(1, turns + 1):
        now = 10.0 * n
        call.handle(TranscriptEvent(str(uuid.uuid4()), "t1", "in", QUESTION), now)
        for sentence in REPLY:
            call.handle(ReplySentence(call.turn, sentence), now + 1)
        call.handle(ReplyDone(call.turn), now + 1)
        call.history.take_left()  # as the daemon does, for the store
        if n in marks:
            held = sum(s.size_diff for s in _snapshot().compare_to(base, "filename"))
            row = len(json.dumps(call.snapshot()).encode())
            out.append((n, held / 1024, row / 1024))
    tracemalloc.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.longcall", description=__doc__)
    parser.add_argument("--turns", type=int, default=500)
    args = parser.parse_args(argv)
    marks = tuple(m for m in (10, 50, 100, args.turns) if m <= args.turns)
    print("turn  held since answered  saved row")
    for n, held, row in run(args.turns, marks):
        print(f"{n:4d}  {held:14.1f} KiB  {row:5.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
