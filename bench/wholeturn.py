"""A whole caller turn through agentd's daemon, in one process: `python -m bench.wholeturn`.

Every frame of a turn (the caller's speech started, four interims, speech ended, the final
transcript) for each of `--calls` answered calls goes through the daemon's own pieces: its
stream handler, dispatcher, call machines, executor, echo backend, persister and SQLite store,
JSON log lines at info written to /dev/null by the log thread. The REST client answers at once
(no network, no simulator): what is measured is agentd's own work, every thread of it.

Two measures:

- `python -m bench.wholeturn`: CPU time of the process (every thread) per turn. It drifts with
  the machine (±30 % on a shared VM): compare runs taken alternately.
- `python -m bench.wholeturn --instructions`: instructions per turn, counted by valgrind's
  callgrind (`apt install valgrind`). Two runs of `--rounds` 2 and 6 under it; the difference,
  over the turns between them, leaves start-up out. Runs back to back agree within about
  0.5 %, runs taken apart within 3 % (timers fire at other points of the slowed-down run):
  a change of a few percent of a turn shows where CPU time would not (a run takes a minute).

See bench/PROFILE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import json
import os
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agentd import logs
from agentd.commands import SpeakingStarted, TranscribeStarted
from agentd.config import load
from agentd.daemon import Daemon
from agentd.events import CallEvent, CallInfo
from agentd.persist import Persister
from agentd.stores import open_store
from bench.procs import AGENT_TIMING, agent_config
from bench.run import FAST_PLAYBACK, UTTERANCE

CUSTOMER = str(uuid.uuid4())


@dataclass(frozen=True)
class _Nowhere:
    """What the config points agentd at: nothing listens there (the REST client is replaced)."""

    api_url: str = "http://127.0.0.1:9/v1.0"
    accesskey: str = "vb_9f8e7d6c5b4a39281706f5e4d3c2b1a0"


class _Client:
    """Answers every REST call at once and counts the `/say`s."""

    def __init__(self) -> None:
        self.said = 0
        self.expected = 0
        self.all_said = asyncio.Event()

    async def say(self, speaking_id: str, text: str) -> None:
        self.said += 1
        if self.said >= self.expected:
            self.all_said.set()

    async def until_said(self, count: int) -> None:
        """Wait for `count` /says in all."""
        self.expected = count
        if self.said < count:
            self.all_said.clear()
            await self.all_said.wait()

    def __getattr__(self, name: str) -> Callable[..., Any]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            return None

        return call


def _templates(transcribe_id: str) -> list[str]:
    """The seven frames of one caller turn, as VoIPBIN sends them (unwrapped), each with an
    `{id}` to fill: made once per call, so that making a round's frames costs next to nothing
    (uuid4 and json.dumps would cost a sixth of the turn in the instruction count)."""

    def frame(**fields: Any) -> str:
        base = {"id": "ID", "customer_id": CUSTOMER, "transcribe_id": transcribe_id}
        text = json.dumps({**base, "direction": "in", **fields}, separators=(",", ":"))
        return text.replace("{", "{{").replace("}", "}}").replace('"ID"', '"{id}"')

    def speech(second: int, **fields: Any) -> str:
        # VoIPBIN's times: the end boundary is published after the last interim, so it is
        # taken for the end of the utterance (a transcript due, as in the daemon under load)
        at = f"2026-12-06T05:00:0{second}.000000Z"
        return frame(streaming_id="s" + transcribe_id[1:], tm_event=at, tm_create=at, **fields)

    words = UTTERANCE.split()
    return [
        speech(0),
        *(speech(n, message=" ".join(words[: n + 1])) for n in range(4)),
        speech(5),
        frame(message=UTTERANCE, offset_ms=1234, tm_create="2026-12-06T05:00:05.000000Z"),
    ]


_ids = itertools.count()


def _frames(templates: list[str]) -> list[str]:
    """A new turn's frames: every one with an id of its own (the dispatcher drops repeats)."""
    return [t.format(id=f"00000000-0000-4000-8000-{next(_ids):012x}") for t in templates]


async def run(
    calls: int, rounds: int, *, store: bool, profile: bool, final_only: bool = False
) -> float:
    """CPU seconds per turn over `rounds` rounds of one turn per call (logs configured)."""
    with tempfile.TemporaryDirectory() as tmp:
        # the section-1 load's agent settings (bench/run.py): echo backend, replies on finals,
        # fast playback, the SQLite store beside the config
        agent = {"chars_per_s": FAST_PLAYBACK, **AGENT_TIMING}
        config = load(agent_config(_Nowhere(), Path(tmp) / "agentd.toml", agent=agent))
        daemon = Daemon(config)
        client = _Client()
        daemon.client = client  # type: ignore[assignment]
        daemon.executor.client = client  # type: ignore[assignment]
        opened = await open_store(config) if store else None
        daemon.persister = Persister(opened) if opened is not None else None
        templates = []
        for _ in range(calls):
            call_id = str(uuid.uuid4())
            info = CallInfo(call_id, "progressing", "incoming", "+15550001111", "+15551234567")
            daemon.dispatcher.on_event(CallEvent(info))
            transcribe_id = str(uuid.uuid4())
            daemon.dispatcher.feed(call_id, TranscribeStarted(transcribe_id))
            daemon.dispatcher.feed(call_id, SpeakingStarted(str(uuid.uuid4()), "active"))
            templates.append(_templates(transcribe_id))
        await asyncio.sleep(0.5)  # the greetings have played
        handle = daemon.stream._frame
        profiler = cProfile.Profile() if profile else None
        cpu = 0.0
        for _ in range(rounds):
            turns = [_frames(t[-1:] if final_only else t) for t in templates]
            said = client.said
            if profiler is not None:
                profiler.enable()
            started = time.process_time()
            for frames in turns:
                for frame in frames:
                    handle(frame)
                await asyncio.sleep(0)  # the callers' frames come apart, not in one chunk
            await client.until_said(said + calls)
            if daemon.persister is not None:
                await daemon.persister.flush()  # the turns' saves, in this round's time
            cpu += time.process_time() - started
            if profiler is not None:
                profiler.disable()
            await asyncio.sleep(0.15)  # every reply has played: the next transcript is a turn
        if daemon.persister is not None:
            await daemon.persister.flush()
        if opened is not None:
            await opened.close()
        logs.flush()
    if profiler is not None:
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(30)
    return cpu / (rounds * calls)


def instructions(argv: list[str], calls: int) -> float:
    """Instructions per turn: callgrind's count at 6 rounds minus at 2, per turn between."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (apt install valgrind)")
    counts = []
    for rounds in (2, 6):
        cmd = [
            "valgrind",
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            sys.executable,
            "-m",
            "bench.wholeturn",
            *argv,
            "--rounds",
            str(rounds),
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True)
        found = re.search(r"Collected : (\d+)", out.stderr)
        if found is None:
            raise SystemExit(f"no count in callgrind's output:\n{out.stderr[-2000:]}")
        counts.append(int(found.group(1)))
    return (counts[1] - counts[0]) / (4 * calls)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.wholeturn", description=__doc__)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-store", action="store_true", help="no SQLite store")
    parser.add_argument("--log-level", default="info")
    parser.add_argument(
        "--final-only", action="store_true", help="only the final transcript, no speech events"
    )
    parser.add_argument("--profile", action="store_true", help="cProfile the turns (stderr)")
    parser.add_argument(
        "--instructions", action="store_true", help="count instructions with callgrind"
    )
    args = parser.parse_args(argv)
    if args.instructions:
        passed = ["--calls", str(args.calls), "--log-level", args.log_level]
        passed += ["--no-store"] if args.no_store else []
        passed += ["--final-only"] if args.final_only else []
        per_turn = instructions(passed, args.calls)
        print(f"{per_turn / 1e3:.0f}k instructions per turn (callgrind, every thread)")
        return 0
    with open(os.devnull, "w") as devnull:
        logs.configure(args.log_level, "json", stream=devnull, background=True)
        cpu = asyncio.run(
            run(
                args.calls,
                args.rounds,
                store=not args.no_store,
                profile=args.profile,
                final_only=args.final_only,
            )
        )
    print(f"{cpu * 1e6:.0f} µs of CPU per turn ({args.rounds * args.calls} turns, every thread)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
