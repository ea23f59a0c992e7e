"""The processes a benchmark runs: the simulator and agentd, each in its own process."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import aiohttp

from agentd.sim.settings import SimSettings
from bench.bare import topics as bare_topics

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    env.pop("INVOCATION_ID", None)
    return env


async def _drain(stream: asyncio.StreamReader | None) -> None:
    """Read and discard a child's output so its pipe never fills up."""
    if stream is None:
        return
    while await stream.read(65536):
        pass


@dataclass
class Sim:
    """`agentd sim` in its own process, and a client for its `/_sim/` control API."""

    proc: asyncio.subprocess.Process
    api_url: str
    ws_url: str
    accesskey: str
    base_url: str
    http: aiohttp.ClientSession
    drain: asyncio.Task[None]

    async def bench(self, route: str, body: dict[str, Any] | None = None) -> Any:
        """POST /_sim/bench/<route>."""
        return await self.control("POST", f"bench/{route}", body or {})

    async def control(self, method: str, route: str, body: dict[str, Any] | None = None) -> Any:
        """Any `/_sim/` route; raises on a non-2xx answer."""
        async with self.http.request(method, f"{self.base_url}/_sim/{route}", json=body) as resp:
            data = await resp.json()
            if resp.status >= 300:
                raise RuntimeError(f"/_sim/{route}: {resp.status} {data}")
            return data

    async def now(self) -> float:
        """The simulator's monotonic clock."""
        return float((await self.bench("now"))["t"])

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
        await self.http.close()
        await _terminate(self.proc)
        self.drain.cancel()


#: The agents section 1 and its burst compare: agentd (`agentd run`, `echo` backend) and the
#: tutorial's agent (`bench/baseline/agent.py --echo`), each with its own simulator.
AGENTS = ("agentd", "baseline")
#: Section 1 also runs the stack alone (`bench/bare.py`): its CPU is what websockets, aiohttp and
#: asyncio cost at the same load, the part of agentd's that is not agentd's own work.
LOAD_AGENTS = (*AGENTS, "bare")

#: The simulator's TTS/STT latencies (measured: ~1 s each) shrunk, as the playback speed is:
#: the bench measures agentd's own cost, and callers must not wait seconds for every turn.
LATENCY_SCALE = 0.05
#: What agentd is told of them: its /say latency estimate, and no turn hold. These sections time
#: agentd's own path from the caller's final transcript to its /say, so they answer on finals:
#: turn-taking policy is not overhead (the default, answering on interims before the final, is
#: measured on VoIPBIN's timing in the conversation section)
AGENT_TIMING = {
    "say_latency_s": SimSettings().scaled(LATENCY_SCALE).say_latency_s,
    "final_hold_s": 0.0,
    "reply_on": "final",
}


async def start_sim(
    *, rate_limit: bool, playback_chars_per_s: float, speech_words_per_s: float
) -> Sim:
    """Start `agentd sim --port 0` and read the URLs and the access key it prints."""
    args = [
        "-m",
        "agentd.sim.standalone",
        "--port",
        "0",
        "--playback-chars-per-s",
        str(playback_chars_per_s),
        "--speech-words-per-s",
        str(speech_words_per_s),
        "--latency-scale",
        str(LATENCY_SCALE),
    ]
    if not rate_limit:
        args.append("--no-rate-limit")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=_env(),
        cwd=ROOT,
    )
    return await attach_sim(proc)


async def attach_sim(proc: asyncio.subprocess.Process) -> Sim:
    """The `Sim` of a simulator process, once it has printed its URLs and access key."""
    assert proc.stdout is not None
    lines: dict[str, str] = {}
    async with asyncio.timeout(20):
        while "control api" not in lines:
            raw = await proc.stdout.readline()
            if not raw:
                raise RuntimeError("the simulator exited before it was ready")
            key, _, value = raw.decode().partition(":")
            if value:
                lines[key.strip()] = value.strip()
    drain = asyncio.get_running_loop().create_task(_drain(proc.stdout))
    api = lines["api url"]
    return Sim(
        proc=proc,
        api_url=api,
        ws_url=lines["ws url"],
        accesskey=lines["access key"],
        base_url=api.removesuffix("/v1.0"),
        http=aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)),
        drain=drain,
    )


async def _module(name: str, *args: str) -> asyncio.subprocess.Process:
    """`python -m name args` from the repository, its stdout a pipe for its first line."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        name,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env=_env(),
        cwd=ROOT,
    )


async def start_baseline(sim: Sim, llm_url: str | None = None) -> Agent:
    """The tutorial's agent (bench/baseline/agent.py), fed by the simulator's webhook delivery.

    It asks the LLM at `llm_url`; with `None` it runs with `--echo` (replies "You said: <text>."
    with no model request, like agentd's `echo` backend), for the overhead and burst loads."""
    reply = ["--echo"] if llm_url is None else ["--llm", llm_url]
    proc = await _module(
        "bench.baseline.agent", "--api", sim.api_url, "--accesskey", sim.accesskey, *reply
    )
    assert proc.stdout is not None
    url = (await proc.stdout.readline()).decode().partition(":")[2].strip()
    await sim.bench("webhook", {"url": url})
    return Agent(proc)


async def start_bare(sim: Sim) -> Agent:
    """The stack alone (bench/bare.py) on `sim`'s WebSocket, once it has subscribed."""
    proc = await _module("bench.bare", sim.api_url, sim.ws_url, sim.accesskey)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(20):
            if (await proc.stdout.readline()).strip() != b"ready":
                raise RuntimeError("bench.bare exited before it subscribed")
            # VoIPBIN binds a subscription's topics a moment later (the simulator models it)
            # and drops the events published before: agentd reads what it missed over REST,
            # bare.py cannot, so the load starts once all its topics are bound
            want = len(bare_topics(""))
            while True:
                conns = await sim.bench("ws")  # polled: the simulator's state, in its process
                if any(c["subscriptions"] >= want for c in conns):
                    break
                await asyncio.sleep(0.01)
    except BaseException:
        await _terminate(proc)
        raise
    return Agent(proc)


class Endpoint(Protocol):
    """Where agentd's config points it: a simulator (`Sim`), or nowhere (bench/wholeturn.py)."""

    @property
    def api_url(self) -> str: ...

    @property
    def accesskey(self) -> str: ...


def agent_config(sim: Endpoint, path: Path, **sections: dict[str, Any]) -> Path:
    """Write an agentd TOML config for `sim` (extra keys per section) and return its path."""
    base: dict[str, dict[str, Any]] = {
        "voipbin": {"api_url": sim.api_url, "accesskey": sim.accesskey},
        "agent": {"numbers": ["*"]},  # every call of the simulator is the bench's
        "backend": {"kind": "echo"},
        "log": {"level": "info", "format": "json"},
        "daemon": {"drain_s": 10.0},
        "store": {"path": str(path.with_suffix(".db"))},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    if base["store"].get("url"):
        # PostgreSQL instead of the SQLite file (agentd refuses both); its status socket would
        # default to ./agentd.sock, shared by every replica: put it next to the config instead
        del base["store"]["path"]
        base.setdefault("status", {}).setdefault("socket", str(path.with_suffix(".sock")))
    out = []
    for name, values in base.items():
        out.append(f"[{name}]")
        for key, value in values.items():
            out.append(f"{key} = {_toml(value)}")
        out.append("")
    path.write_text("\n".join(out))
    return path


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


@dataclass
class Agent:
    """One agentd process (`agentd run`, or bench.agent with a bench backend)."""

    proc: asyncio.subprocess.Process
    started_at: float = field(default_factory=time.monotonic)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def stop(self) -> None:
        """SIGTERM (agentd drains its calls), SIGKILL if it lingers."""
        await _terminate(self.proc, grace_s=15.0)

    def kill(self) -> None:
        """SIGKILL: no cleanup at all."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGKILL)


async def start_agent(
    config: Path, *, stub_url: str | None = None, log: Path | None = None
) -> Agent:
    """`agentd run --config <config>`; with `stub_url`, bench.agent with the streaming stub.

    Its JSON log lines go to `log` (for evidence when a section finds a fault), else nowhere."""
    if stub_url is None:
        argv = [str(VENV_BIN / "agentd"), "run", "--config", str(config)]
    else:
        argv = [sys.executable, "-m", "bench.agent", "--config", str(config), "--llm", stub_url]
    if log is None:
        proc = await asyncio.create_subprocess_exec(
            *argv,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            env=_env(),
            cwd=ROOT,
        )
        return Agent(proc)
    with log.open("ab") as out:  # the child keeps its own descriptor
        proc = await asyncio.create_subprocess_exec(
            *argv, stdout=out, stderr=asyncio.subprocess.STDOUT, env=_env(), cwd=ROOT
        )
    return Agent(proc)


async def wait_subscribed(sim: Sim, *, after: float = 0.0, timeout_s: float = 20.0) -> float:
    """Until a WebSocket connection subscribed after `after`; returns when (simulator clock)."""
    async with asyncio.timeout(timeout_s):
        while True:
            for conn in await sim.bench("ws"):
                t = conn["subscribed_at"]
                if t is not None and t >= after:
                    return float(t)
            await asyncio.sleep(0.01)


async def _terminate(proc: asyncio.subprocess.Process, grace_s: float = 5.0) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace_s)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


@dataclass
class Usage:
    """CPU time (s) and resident memory (bytes) of a process at one instant."""

    t: float
    cpu_s: float
    rss: int


def usage(pid: int) -> Usage:
    """Read /proc/<pid>/stat and /proc/<pid>/status."""
    t = time.monotonic()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    cpu = (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime
    rss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) * 1024
    return Usage(t, cpu, rss)
