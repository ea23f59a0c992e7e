"""Soak: thousands of simulated calls through a real `agentd run` process with every fault on.

    python -m tests.soak --calls 2000 --out soak-report.json     (what `make soak` runs)
    python -m tests.soak --replicas 2 --store-url postgresql://agentd@/soak?host=/run/postgresql
        --calls 500 --concurrency 30 --kill-every 5 --workdir soak-work     (one command line)

The simulator runs in this process; agentd runs as a child process that is SIGKILLed and
restarted every `--kill-every` seconds. Meanwhile the simulator duplicates 10% and loses 2% of
the events, drops the WebSocket, expires the JWT, answers bursts of 5xx, 429 and `/say` 404s,
kills tts pods under live calls, and deafens or orphans their transcribes. Each caller asks two
questions, the second one two sentences the STT splits into two finals, and hangs up once
answered; a caller left waiting too long is hung up by the
driver and counted as not served. The report counts calls served, leaked sessions, replies said
twice and restarts survived.

With `--replicas 2` (and `--store-url`, an empty PostgreSQL database agentd may migrate) two
agentd processes share that database as replicas (`[store] replica` "a" and "b", `lease_s` 2,
each its own status socket and JSON log `a.log` / `b.log` in the workdir, at level info). Both
are subscribed before the first call; every `--kill-every` seconds a random one of them is
SIGKILLed and restarted at once, never both, so the other one takes the dead one's calls over
when their leases expire. The report adds how many calls were taken over (`calls_taken_over`:
leases whose epoch is 2 or more at the end; `takeovers`: `lease.claimed` log lines with such an
epoch, a call taken over twice counts twice) and a count of the replica events worth reading
when something goes wrong (`call.lost`, `command.fenced`, `call.restored`, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
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
{store}
[log]
level = "{level}"
format = "json"
"""
LEASE_S = 2.0  # a replica's lease: a dead replica's calls wait this long for the other one
# the replica log events the report counts: what to grep the logs for when a call goes wrong
REPLICA_EVENTS = (
    "lease.claimed",
    "call.restored",
    "call.lost",
    "command.fenced",
    "call.foreign",
    "call.refused",
    "store.unreachable",
)


def subscribed(sim: Simulator) -> int:
    return sum(1 for c in sim.ws_connections if c.subscriptions and not c.closed)


@dataclass
class Agent:
    """One agentd process of the soak, restarted under the same name, config and log."""

    name: str
    config: Path
    log: Path
    proc: asyncio.subprocess.Process | None = None

    def events(self, event: str) -> list[dict[str, Any]]:
        """The JSON log lines of `event`, from every process that ran under this name."""
        out: list[dict[str, Any]] = []
        if not self.log.exists():
            return out
        for line in self.log.read_text(errors="replace").splitlines():
            if f'"{event}"' not in line:
                continue
            with contextlib.suppress(ValueError):
                fields = json.loads(line)
                if isinstance(fields, dict) and fields.get("event") == event:
                    out.append(fields)
        return out


class Soak:
    """The agentd under test (one, or several replicas on one PostgreSQL), the chaos that
    kills them and injects faults, and the callers."""

    def __init__(
        self,
        sim: Simulator,
        workdir: Path,
        seed: int,
        *,
        replicas: int = 1,
        store_url: str | None = None,
    ) -> None:
        self.sim = sim
        self.workdir = workdir
        self.rng = random.Random(seed)
        self.restarts = 0
        self.restarts_survived = 0
        self.faults: Counter[str] = Counter()
        if replicas == 1:
            store = f'path = "{workdir / "agentd.db"}"'
            self.agents = [self._agent("agentd", store, level="info")]
        else:
            if not store_url:
                raise ValueError("several replicas need a PostgreSQL store_url")
            # info: the replica events (lease.claimed, call.restored, call.lost) are info
            self.agents = [
                self._agent(
                    name,
                    f'url = "{store_url}"\nlease_s = {LEASE_S}\nreplica = "{name}"\n'
                    f'[status]\nsocket = "{workdir / name}.sock"',
                    level="info",
                )
                for name in "abcdefgh"[:replicas]
            ]

    def _agent(self, name: str, store: str, level: str) -> Agent:
        config = self.workdir / f"{name}.toml"
        config.write_text(
            CONFIG.format(
                api=self.sim.api_url,
                user=self.sim.settings.username,
                password=self.sim.settings.password,
                number=OUR_NUMBER,
                playback=PLAYBACK,
                latency=SAY_LATENCY,
                hold=CallSettings().final_hold_s * LATENCY_SCALE,
                wait=CallSettings().final_wait_s * LATENCY_SCALE,
                store=store,
                level=level,
            )
        )
        return Agent(name, config, self.workdir / f"{name}.log")

    @property
    def proc(self) -> asyncio.subprocess.Process | None:
        """The single agentd's process (the first replica's with several)."""
        return self.agents[0].proc

    async def start_agent(self, agent: Agent, up: int | None = None) -> None:
        """Start `agent`; return once `up` agentd (all of them by default) are subscribed."""
        log = open(agent.log, "ab")  # noqa: ASYNC230, SIM115 (child's stdout)
        agent.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "agentd",
            "run",
            "--config",
            str(agent.config),
            stdout=log,
            stderr=log,
            env={**os.environ, "NOTIFY_SOCKET": ""},
        )
        log.close()
        # the others were subscribed before (one may be reconnecting after a dropped
        # WebSocket, which takes well under these 30 s)
        want = len(self.agents) if up is None else up
        await self.sim.wait_for(lambda: subscribed(self.sim) >= want, 30)

    async def kill_agent(self, agent: Agent) -> None:
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGKILL)
        await agent.proc.wait()
        # its connection is gone, so the restart's wait counts the new one
        await self.sim.wait_for(lambda: subscribed(self.sim) < len(self.agents), 10)

    async def stop_agents(self) -> None:
        """SIGTERM every agentd still running (SIGKILL one that does not stop in 30 s)."""
        for agent in self.agents:
            if agent.proc is not None and agent.proc.returncode is None:
                agent.proc.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(agent.proc.wait(), 30)
                except TimeoutError:
                    agent.proc.kill()
                    await agent.proc.wait()

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
                # with replicas: one at a time, restarted at once, so the other one is up
                agent = self.rng.choice(self.agents) if len(self.agents) > 1 else self.agents[0]
                await self.kill_agent(agent)
                await self.start_agent(agent)
                self.restarts_survived += 1
                last_kill = time.monotonic()
                continue
            # every fault stays on with replicas: each is one VoIPBIN does to all of them at
            # once (a dropped pod's WebSockets, expired tokens, 5xx/429 bursts) or to one call
            # (its tts pod, its STT), whichever replica serves that call
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
                # one rule a method: a rule's method is a name, not a pattern
                for method in ("GET", "POST"):
                    f.fail(method, r".*", 429, count=5, retry_after=0.2)
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
        # a reply said twice, or one sentence of it: every sentence the echo backend says
        # comes from the caller's words ("You said: ..." and the split turn's "And a detail.")
        doubles = sum(
            n - 1
            for text, n in said.items()
            if (text.startswith("You said") or text == "And a detail.") and n > 1
        )
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

    async def drive(self, calls: int, concurrency: int, kill_every: float) -> dict[str, Any]:
        """Start the agentd, place the calls under chaos, wait for the sessions to end; the
        report of what the callers heard."""
        sim = self.sim
        for n, agent in enumerate(self.agents, 1):
            await self.start_agent(agent, up=n)
        stop = asyncio.Event()
        chaos = asyncio.create_task(self.chaos(kill_every, stop))
        gate = asyncio.Semaphore(concurrency)

        async def guarded(i: int) -> dict[str, Any]:
            async with gate:
                return await self.one_call(i, limit_s=30.0)

        try:
            results = await asyncio.gather(*(guarded(i) for i in range(calls)))
        finally:
            stop.set()
            await chaos
        sim.faults.duplicate_rate = sim.faults.lose_rate = 0.0
        # everything has ended: the (restarted) agentd must have stopped every session
        with contextlib.suppress(TimeoutError):
            await sim.wait_for(lambda: not sim.leaks(), 60)
        leaks = sim.leaks()
        return {
            "calls": calls,
            "served": sum(r["served"] for r in results),
            "not_served": sum(not r["served"] for r in results),
            "leaked_sessions": len(leaks),
            "double_replies": sum(r["doubles"] for r in results),
            "split_turns_answered_in_part": sum(r["partial"] for r in results),
            "daemon_restarts": self.restarts,
            "daemon_restarts_survived": self.restarts_survived,
            "faults": dict(self.faults) | {"duplicate_rate": 0.10, "lose_rate": 0.02},
            "rest_requests": len(sim.requests),
            "not_served_examples": [
                {"call_id": r["call_id"], "heard": r["story"]} for r in results if not r["served"]
            ][:5],
            "double_reply_examples": [
                {"call_id": r["call_id"], "heard": r["story"]} for r in results if r["doubles"]
            ][:5],
            "leak_examples": leaks[:5],
        }

    def replica_report(self) -> dict[str, Any]:
        """What the replicas' logs say: takeovers, and the events to read when a call failed."""
        events = {e: sum(len(a.events(e)) for a in self.agents) for e in REPLICA_EVENTS}
        takeovers = sum(
            1
            for agent in self.agents
            for line in agent.events("lease.claimed")
            if int(line.get("epoch", 0)) >= 2
        )
        return {
            "replicas": len(self.agents),
            "takeovers": takeovers,
            "replica_events": events,
            "logs": [str(a.log) for a in self.agents],
        }


async def calls_taken_over(store_url: str) -> int:
    """How many calls' leases ended with epoch 2 or more: served by more than one replica."""
    from agentd.store_pg import PgStore  # asyncpg: only for the replicas' mode

    store = await PgStore.open(store_url, max_size=1)
    try:
        return sum(1 for lease in await store.leases() if lease.epoch >= 2)
    finally:
        await store.close()


async def run(
    calls: int,
    concurrency: int,
    kill_every: float,
    seed: int,
    *,
    out: Path | None = None,
    workdir: Path | None = None,
    replicas: int = 1,
    store_url: str | None = None,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Run the soak; its report. `replicas` > 1 runs that many agentd on the PostgreSQL
    database at `store_url` (empty, or agentd's own) and kills one of them at a time. Without
    a `workdir`, a run that is not clean leaves agentd's logs and store in `keep`."""
    if replicas < 1:
        raise ValueError("replicas: at least 1")
    if replicas > 1 and not store_url:
        raise ValueError("several replicas need a PostgreSQL store_url")
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
            soak = Soak(sim, workdir or Path(tmp), seed, replicas=replicas, store_url=store_url)
            try:
                report = await soak.drive(calls, concurrency, kill_every)
            finally:
                await soak.stop_agents()  # also when the soak failed: no agentd left behind
            if workdir is None and keep is not None:
                kept = keep_logs(Path(tmp), report, keep)
                if kept is not None:
                    report["logs_kept"] = str(kept)
            if replicas > 1:
                assert store_url is not None
                report |= soak.replica_report()
                report["calls_taken_over"] = await calls_taken_over(store_url)
    report["seconds"] = round(time.monotonic() - started, 1)
    return report


def clean(report: dict[str, Any]) -> bool:
    """Every call served, no session leaked, no reply said twice."""
    return not (report["not_served"] or report["leaked_sessions"] or report["double_replies"])


def keep_logs(workdir: Path, report: dict[str, Any], dest: Path) -> Path | None:
    """A run that is not clean: its logs and store copied to `dest` (the work directory is
    a temporary one), so what went wrong can be read; None for a clean run."""
    if clean(report):
        return None
    shutil.copytree(workdir, dest, ignore=shutil.ignore_patterns("*.sock"), dirs_exist_ok=True)
    return dest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.soak", description=__doc__.split("\n")[0])
    p.add_argument("--calls", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--kill-every", type=float, default=20.0, help="seconds between SIGKILLs")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("soak-report.json"))
    p.add_argument(
        "--workdir",
        type=Path,
        help="keep agentd's config, store and log here (without it, a run that is not clean "
        "keeps them in soak-logs/ beside the report)",
    )
    p.add_argument("--replicas", type=int, default=1, help="agentd processes on one PostgreSQL (2)")
    p.add_argument(
        "--store-url", help="the replicas' PostgreSQL database (postgresql://...), empty"
    )
    args = p.parse_args(argv)
    if args.replicas < 1:
        p.error("--replicas: at least 1")
    if args.replicas > 1 and not args.store_url:
        p.error("--replicas 2 needs --store-url (a PostgreSQL database agentd may migrate)")
    report = asyncio.run(
        run(
            args.calls,
            args.concurrency,
            args.kill_every,
            args.seed,
            workdir=args.workdir,
            replicas=args.replicas,
            store_url=args.store_url,
            keep=args.out.with_name("soak-logs"),
        )
    )
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    return 0 if clean(report) else 1  # a caller left unanswered fails the run as a leak does


if __name__ == "__main__":
    raise SystemExit(main())
