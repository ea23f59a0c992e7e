"""Soak: thousands of simulated calls through a real `agentd run` process with every fault on.

    python -m tests.soak --calls 2000 --out soak-report.json     (what `make soak` runs)

The simulator runs in this process; agentd runs as a child process that is SIGKILLed and
restarted every `--kill-every` seconds. Meanwhile the simulator duplicates 10% and loses 2% of
the events, drops the WebSocket, expires the JWT, answers bursts of 5xx, 429 and `/say` 404s,
kills tts pods under live calls, and deafens or orphans their transcribes. Each caller asks two
questions, the second one two sentences the STT splits into two finals, and hangs up once
answered; a caller left waiting too long is hung up by the
driver and counted as not served. The report counts calls served, leaked sessions, replies said
twice and restarts survived.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from agentd.call import CallSettings
from agentd.sim import Caller, SimSettings, Simulator, Utterance

OUR_NUMBER = "+15551234567"
PLAYBACK = 200.0
LATENCY_SCALE = 0.08  # the service's TTS/STT latencies, shrunk about as much as the playback
SAY_LATENCY = SimSettings().scaled(LATENCY_SCALE).say_latency_s  # agentd is told the simulator's
FAULTS = ("drop", "expire", "5xx", "429", "say500", "say404", "pod", "deaf", "orphan")
CONFIG = """
[voipbin]
api_url = "{api}"
username = "{user}"
password = "{password}"
rate_per_s = 0
[agent]
numbers = ["{number}"]
chars_per_s = {playback}
say_latency_s = {latency}
final_hold_s = {hold}
final_wait_s = {wait}
# the default reply_on = "interim", on the caller's pace here (a word every 33 ms)
end_of_turn_s = 0.1
end_of_turn_stop_s = 0.15
speculate_s = 0.06
watch_s = 2.0
# shorter than the short soak's 3 s between SIGKILLs: a deaf STT is found between restarts
silence_s = 1.5
[store]
path = "{store}"
[log]
level = "warning"
format = "json"
"""


def subscribed(sim: Simulator) -> int:
    return sum(1 for c in sim.ws_connections if c.subscriptions and not c.closed)


class Soak:
    def __init__(self, sim: Simulator, workdir: Path, seed: int) -> None:
        self.sim = sim
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.proc: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.restarts_survived = 0
        self.faults: Counter[str] = Counter()
        self.config = workdir / "agentd.toml"
        self.config.write_text(
            CONFIG.format(
                api=sim.api_url,
                user=sim.settings.username,
                password=sim.settings.password,
                number=OUR_NUMBER,
                playback=PLAYBACK,
                latency=SAY_LATENCY,
                hold=CallSettings().final_hold_s * LATENCY_SCALE,
                wait=CallSettings().final_wait_s * LATENCY_SCALE,
                store=workdir / "agentd.db",
            )
        )

    async def start_agent(self) -> None:
        log = open(self.workdir / "agentd.log", "ab")  # noqa: ASYNC230, SIM115 (child's stdout)
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentd",
            "run",
            "--config",
            str(self.config),
            stdout=log,
            stderr=log,
            env={**os.environ, "NOTIFY_SOCKET": ""},
        )
        log.close()
        await self.sim.wait_for(lambda: subscribed(self.sim) >= 1, 30)

    async def kill_agent(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()
        await self.sim.wait_for(lambda: subscribed(self.sim) == 0, 10)

    async def chaos(self, kill_every: float, stop: asyncio.Event) -> None:
        """Faults at random moments; a SIGKILL + restart every `kill_every` seconds."""
        last_kill = time.monotonic()
        f = self.sim.faults
        while not stop.is_set():
            with_timeout = asyncio.wait_for(stop.wait(), self.rng.uniform(0.2, 1.0))
            try:
                await with_timeout
                return
            except TimeoutError:
                pass
            if time.monotonic() - last_kill > kill_every:
                self.restarts += 1
                await self.kill_agent()
                await self.start_agent()
                self.restarts_survived += 1
                last_kill = time.monotonic()
                continue
            fault = self.rng.choice(FAULTS)
            self.faults[fault] += 1
            if fault == "drop":
                f.drop_websockets()
            elif fault == "expire":
                f.expire_tokens()
                f.drop_websockets()  # the reconnect must log in again
            elif fault == "5xx":
                f.fail("POST", r"/(stop|transcribes)$", 503, count=3)
            elif fault == "429":
                f.fail(r"(GET|POST)", r".*", 429, count=5, retry_after=0.2)
            elif fault == "say500":
                f.fail("POST", r"/say$", 500, count=1)
            elif fault == "say404":
                f.fail("POST", r"/say$", 404, count=3)
            else:
                self.call_fault(fault)

    def call_fault(self, fault: str) -> None:
        """A fault under one live call: its tts pod dies, or its STT goes deaf or orphaned."""
        live = [c for c in self.sim.world.calls.values() if c.status == "progressing"]
        if not live:
            return
        call = self.rng.choice(live)
        if fault == "pod":
            if any(s.status == "active" for s in self.sim.world.speakings_of(call.id)):
                self.sim.faults.kill_tts_pod(call_id=call.id)
        elif fault == "deaf":
            self.sim.faults.deafen_stt(call.id)
        else:
            self.sim.faults.orphan_stt(call.id)

    async def one_call(self, i: int, limit_s: float) -> dict[str, Any]:
        caller = Caller(
            [
                Utterance(f"first question {i}"),
                # one turn the STT delivers as two finals: it must get one answer
                Utterance(f"second question {i}. And a detail."),
            ],
            hangup_after_s=0.05,
        )
        call_id = self.sim.inbound_call(f"+1555{i:07d}", OUR_NUMBER, caller)
        call = self.sim.get_call(call_id)
        try:
            await self.sim.wait_for(lambda: call.status == "hangup", limit_s)
            served = True
        except TimeoutError:
            served = False
            await self.sim.hangup(call_id)
        said = Counter(li.planned for li in call.conversation if li.who == "agent")
        doubles = sum(n - 1 for text, n in said.items() if text.startswith("You said") and n > 1)
        # the split turn answered before its second final came (lost, or late past the hold):
        # not a double reply, but worth counting
        partial = f"You said: second question {i}." in said
        story = [f"{li.who}: {li.planned}" for li in call.conversation]
        return {
            "served": served,
            "doubles": doubles,
            "partial": partial,
            "call_id": call_id,
            "story": story,
        }


async def run(
    calls: int,
    concurrency: int,
    kill_every: float,
    seed: int,
    *,
    out: Path | None = None,
    workdir: Path | None = None,
) -> dict[str, Any]:
    settings = SimSettings(
        playback_chars_per_s=PLAYBACK,
        speech_words_per_s=30.0,
        rate_limit=False,
        username="soak",
        password="soak-password-1",
        playback_cjk_chars_per_s=PLAYBACK * 0.4,
    ).scaled(LATENCY_SCALE)
    started = time.monotonic()
    async with Simulator(settings) as sim:
        sim.faults.seed(seed)
        sim.faults.duplicate_rate = 0.10
        sim.faults.lose_rate = 0.02
        with tempfile.TemporaryDirectory(prefix="agentd-soak-") as tmp:
            if workdir is not None:
                os.makedirs(workdir, exist_ok=True)
            soak = Soak(sim, workdir or Path(tmp), seed)
            await soak.start_agent()
            stop = asyncio.Event()
            chaos = asyncio.create_task(soak.chaos(kill_every, stop))
            gate = asyncio.Semaphore(concurrency)

            async def guarded(i: int) -> dict[str, Any]:
                async with gate:
                    return await soak.one_call(i, limit_s=30.0)

            results = await asyncio.gather(*(guarded(i) for i in range(calls)))
            stop.set()
            await chaos
            sim.faults.duplicate_rate = sim.faults.lose_rate = 0.0
            # everything has ended: the (restarted) agentd must have stopped every session
            with contextlib.suppress(TimeoutError):
                await sim.wait_for(lambda: not sim.leaks(), 60)
            leaks = sim.leaks()
            if soak.proc is not None and soak.proc.returncode is None:
                soak.proc.send_signal(signal.SIGTERM)
                await soak.proc.wait()
            report = {
                "calls": calls,
                "served": sum(r["served"] for r in results),
                "not_served": sum(not r["served"] for r in results),
                "leaked_sessions": len(leaks),
                "double_replies": sum(r["doubles"] for r in results),
                "split_turns_answered_in_part": sum(r["partial"] for r in results),
                "daemon_restarts": soak.restarts,
                "daemon_restarts_survived": soak.restarts_survived,
                "faults": dict(soak.faults) | {"duplicate_rate": 0.10, "lose_rate": 0.02},
                "rest_requests": len(sim.requests),
                "not_served_examples": [
                    {"call_id": r["call_id"], "heard": r["story"]}
                    for r in results
                    if not r["served"]
                ][:5],
                "double_reply_examples": [
                    {"call_id": r["call_id"], "heard": r["story"]} for r in results if r["doubles"]
                ][:5],
                "seconds": round(time.monotonic() - started, 1),
            }
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--kill-every", type=float, default=20.0, help="seconds between SIGKILLs")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("soak-report.json"))
    p.add_argument("--workdir", type=Path, help="keep agentd's config, store and log here")
    args = p.parse_args(argv)
    report = asyncio.run(
        run(args.calls, args.concurrency, args.kill_every, args.seed, workdir=args.workdir)
    )
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    ok = report["leaked_sessions"] == 0 and report["double_replies"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
