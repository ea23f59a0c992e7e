"""One caller turn inside agentd, step by step: `python -m bench.turn [--turns N] [--profile]`.

The final transcript's frame goes through agentd's own parser, dispatcher, call machine,
executor and echo backend, in this process, with JSON log lines at info written to /dev/null by
the log thread. The REST client is replaced by one that records when `/say` was asked for, so
what is timed is agentd's code alone: no network, no simulator (`make bench` measures the whole
path over loopback). Each stage is timed from the `parse_frame` call by wrapping the method
that starts it. See bench/PROFILE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import pstats
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from agentd import executor as executor_module
from agentd import logs
from agentd import reply as reply_module
from agentd.backends.echo import EchoBackend
from agentd.call import CallSettings
from agentd.commands import SpeakingStarted, TranscribeStarted
from agentd.dispatcher import Dispatcher
from agentd.events import CallEvent, CallInfo, parse_frame
from agentd.executor import Executor

CALLS = 50
# the bench's load settings (bench/procs.py AGENT_TIMING, fast playback): the reply goes at once
SETTINGS = CallSettings(
    reply_on="final", final_hold_s=0.0, say_latency_s=0.05, chars_per_s=1000.0, playback_pad_s=0.0
)
STAGES = (
    "dispatcher steps the call",
    "AskBackend executed",
    "reply task runs",
    "first sentence fed back",
    "Say queued on its lane",
    "lane task runs",
)


class _Client:
    """Answers every REST call at once; `say` resolves the turn's future."""

    def __init__(self) -> None:
        self.said: asyncio.Future[float] | None = None

    async def say(self, speaking_id: str, text: str) -> None:
        if self.said is not None and not self.said.done():
            self.said.set_result(time.perf_counter())

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            return None

        return call


class _Marks:
    """When each stage of the current turn started (the first time only)."""

    def __init__(self) -> None:
        self.at: dict[str, float] = {}

    def hit(self, stage: str) -> None:
        self.at.setdefault(stage, time.perf_counter())

    def wrap(
        self, owner: Any, name: str, stage: str, when: Callable[..., bool] | None = None
    ) -> None:
        original = getattr(owner, name)
        if asyncio.iscoroutinefunction(original):

            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                self.hit(stage)
                return await original(*args, **kwargs)

            setattr(owner, name, async_wrapper)
            return

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if when is None or when(*args, **kwargs):
                self.hit(stage)
            return original(*args, **kwargs)

        setattr(owner, name, wrapper)


def _transcript_frame(transcribe_id: str) -> str:
    return json.dumps(
        {
            "id": str(uuid.uuid4()),
            "customer_id": str(uuid.uuid4()),
            "transcribe_id": transcribe_id,
            "direction": "in",
            "message": "what is my balance",
            "tm_transcript": "0001-01-01T00:00:08Z",
            "tm_create": "2026-12-01T10:00:12.000123Z",
        },
        separators=(",", ":"),
    )


def instrument() -> _Marks:
    """Log to /dev/null at info, and time the stages by wrapping the methods that start them."""
    logs.configure("info", "json", stream=open("/dev/null", "w"), background=True)  # noqa: SIM115
    marks = _Marks()

    def transcript(_d: object, _c: object, event: object) -> bool:
        return type(event).__name__ == "TranscriptEvent"

    marks.wrap(Dispatcher, "_handle", STAGES[0], transcript)
    marks.wrap(Executor, "_spawn_reply", STAGES[1])
    marks.wrap(reply_module, "stream_reply", STAGES[2])
    marks.wrap(Dispatcher, "feed", STAGES[3], lambda _d, _c, r: type(r).__name__ == "ReplySentence")
    marks.wrap(Executor, "_enqueue", STAGES[4], lambda _e, _c, _l, cmd: type(cmd).__name__ == "Say")
    marks.wrap(Executor, "_drain", STAGES[5])
    executor_module.stream_reply = reply_module.stream_reply  # the name the executor calls
    return marks


async def run(marks: _Marks, turns: int, profile: bool) -> dict[str, float]:
    """Median µs from the frame to each stage and to `say()`, over `turns` turns."""
    client = _Client()
    executor: Executor | None = None

    def execute(call_id: str, commands: list[Any]) -> None:
        assert executor is not None
        executor.execute(call_id, commands)

    dispatcher = Dispatcher(lambda: SETTINGS, execute)
    executor = Executor(client, EchoBackend(), dispatcher.feed)  # type: ignore[arg-type]
    transcribes = {}
    for _ in range(CALLS):
        call_id = str(uuid.uuid4())
        dispatcher.on_event(CallEvent(CallInfo(call_id, "progressing", "incoming", "+1", "+2")))
        transcribes[call_id] = str(uuid.uuid4())
        dispatcher.feed(call_id, TranscribeStarted(transcribes[call_id]))
        dispatcher.feed(call_id, SpeakingStarted(str(uuid.uuid4()), "active"))
    await asyncio.sleep(0.3)  # the greetings have played
    profiler = cProfile.Profile() if profile else None
    samples: dict[str, list[float]] = {stage: [] for stage in (*STAGES, "say() called")}
    loop = asyncio.get_running_loop()
    done = 0
    while done < turns:
        for transcribe_id in transcribes.values():
            frame = _transcript_frame(transcribe_id)
            client.said = loop.create_future()
            await asyncio.sleep(0.002)  # a quiet loop, as between two callers' turns
            marks.at.clear()
            if profiler is not None:
                profiler.enable()
            t0 = time.perf_counter()
            parsed = parse_frame(frame)
            dispatcher.on_parsed(parsed)  # type: ignore[arg-type]
            said = await asyncio.wait_for(client.said, 5.0)
            if profiler is not None:
                profiler.disable()
            for stage in STAGES:
                samples[stage].append(marks.at[stage] - t0)
            samples["say() called"].append(said - t0)
            done += 1
            if done == turns:
                break
        await asyncio.sleep(0.1)  # every reply has played: the next transcript opens a turn
    if profiler is not None:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    return {stage: sorted(xs)[len(xs) // 2] * 1e6 for stage, xs in samples.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.turn", description=__doc__)
    parser.add_argument("--turns", type=int, default=500)
    parser.add_argument("--profile", action="store_true", help="cProfile the turns (stderr)")
    args = parser.parse_args(argv)
    medians = asyncio.run(run(instrument(), args.turns, args.profile))
    print(f"one turn inside agentd, median of {args.turns} (µs from the frame):")
    for stage, us in medians.items():
        print(f"  {us:7.0f}  {stage}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
