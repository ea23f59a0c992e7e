"""`agentd console`: talk to your own agent in the terminal before deploying it.

The real daemon runs with the user's configured backend and `[agent]` settings, but its
`[voipbin]` is replaced by the built-in simulator, in-process: no account, no store, no status
socket, no metrics endpoint, no traces. The console phones the agent and plays the caller: each
line the user types is said with `Simulator.caller_says`, so VoIPBIN's STT timing (interims as
the words come, the final ~1.1 s after the last one) and the daemon's own turn taking and
barge-in logic do the rest. Typed while the agent speaks, a line is a barge-in.

It prints the conversation as the call heard it: each agent line when its audio would start,
and when it ended or was cut off, in seconds since the call was answered (the simulator's
timing model: a voice reads ~15 characters a second and starts ~1.1 s after its /say), and for
each caller line the time from their last word to the agent's voice. `/hangup` or end of input
ends the call; a summary follows, and the exit code is 1 if a session was left open.

Piped input (not a terminal) plays like a scripted caller: each line is said once the agent has
answered the previous one and its audio has finished.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import dataclasses
import os
import signal
import sys
import threading
import time
from collections.abc import Mapping
from typing import TextIO

from agentd import logs
from agentd.config import Config, VoipbinConfig, default_ws_url, load
from agentd.daemon import Daemon
from agentd.secret import Secret, display_url
from agentd.sim import Line, SimCall, SimSettings, Simulator

#: The console's own call history (`agentd calls show ID --store agentd-console.db`).
DEFAULT_STORE = "agentd-console.db"
CONSOLE_NUMBER = "+15551234567"  # the number the console calls (agent.numbers is forced to it)
CALLER_NUMBER = "+15550001111"
FAST_SCALE = 0.1  # --fast: every latency of the service and of agentd x0.1, every rate x10
HANGUP = "/hangup"
# piped input: a line waits for the agent's answer to the previous one, but not forever (a turn
# the backend judged unfinished, with the silence reprompt off, would never be answered)
ANSWER_WAIT_S = 30.0
# piped input: the caller's pause after the agent's audio ends before saying the next line (a
# reply's next sentence may come a moment after the last one ended); x0.1 under --fast
PAUSE_S = 0.5
READY_TIMEOUT_S = 30.0
IDLE_TIMEOUT_S = 15.0
# environment overrides of what the console replaces: a deployed agentd's must not leak in
_REPLACED_ENV = (
    "AGENTD_VOIPBIN_",
    "AGENTD_STORE_",
    "AGENTD_STATUS_",
    "AGENTD_METRICS_",
    "AGENTD_OTEL_",
)


def sim_settings(fast: bool) -> SimSettings:
    """VoIPBIN's real timing, or with --fast all of it ten times quicker (rates too)."""
    real = SimSettings()
    if not fast:
        return real
    return dataclasses.replace(
        real.scaled(FAST_SCALE),
        speech_words_per_s=real.speech_words_per_s / FAST_SCALE,
        playback_chars_per_s=real.playback_chars_per_s / FAST_SCALE,
        playback_cjk_chars_per_s=real.playback_cjk_chars_per_s / FAST_SCALE,
    )


def console_config(
    path: str | None,
    api_url: str,
    accesskey: str,
    *,
    fast: bool = False,
    env: Mapping[str, str] | None = None,
    store: str = "",
) -> Config:
    """The user's config (or the defaults: the echo backend) with its [voipbin] replaced by the
    simulator at `api_url`, its store by `store` (the console's own: "" = none), status socket,
    metrics and traces off, and agent.numbers forced to the number the console calls."""
    env = dict(os.environ if env is None else env)
    for name in list(env):
        if name.startswith(_REPLACED_ENV) or name == "AGENTD_AGENT_NUMBERS":
            del env[name]
    # every credential key is blanked, so load() neither reads the user's key files nor
    # complains about credentials it will not use
    blank = ("accesskey_file", "token", "token_file", "username", "password", "password_file")
    config = load(
        path,
        env=env,
        overrides={
            "voipbin": {"api_url": api_url, "ws_url": "", "accesskey": accesskey}
            | {key: "" for key in blank},
            "agent": {"numbers": [CONSOLE_NUMBER]},
            # never the daemon's store: a restarted daemon would try to resume these calls
            "store": {"path": store, "url": "", "password": "", "password_file": ""},
            "status": {"socket": ""},
            "metrics": {"listen": ""},
            # the console's made-up calls are no traces for the service's collector
            "otel": {"enabled": False},
        },
    )
    v = config.voipbin
    # and a systemd credential (CREDENTIALS_DIRECTORY) for a token cannot sneak in either
    voipbin = VoipbinConfig(
        api_url=api_url,
        ws_url=default_ws_url(api_url),
        accesskey=Secret(accesskey),
        token=None,
        username="",
        password=None,
        rate_per_s=v.rate_per_s,
        burst=v.burst,
        timeout_s=v.timeout_s,
    )
    call = config.call.scaled(FAST_SCALE) if fast else config.call
    return dataclasses.replace(config, voipbin=voipbin, call=call)


def describe_backend(config: Config) -> str:
    """One line on where replies come from."""
    b = config.backend
    if b.kind == "openai":
        return f"openai {b.model} at {display_url(b.base_url)}"
    if b.kind == "http":
        return f"http {display_url(b.url)}"  # a key in its query (`?code=`) stays hidden
    if b.kind == "python":
        return f"python {b.callable}"
    return "echo"


# ---- the conversation as the call heard it -----------------------------------------------------


def reply_index(lines: list[Line], i: int) -> int | None:
    """The agent line that answered caller line `i`: the first one whose audio started after
    the caller's last word, before they spoke again (None: not answered, or not yet)."""
    said = lines[i]
    if said.t_end is None:
        return None
    for k in range(i + 1, len(lines)):
        line = lines[k]
        if line.who == "caller":
            return None
        if line.t_start >= said.t_end:
            return k
    return None


def interrupted(lines: list[Line], k: int) -> bool:
    """Whether agent line `k` was cut off by the caller speaking over it (not by a hangup)."""
    line = lines[k]
    if not line.cut or line.t_end is None:
        return False
    return any(c.who == "caller" and line.t_start <= c.t_start <= line.t_end for c in lines)


class Transcript:
    """Prints the call's lines as they start and end, with times since the answer."""

    def __init__(self, call: SimCall, out: TextIO) -> None:
        self.call = call
        self.out = out
        self.t0 = call.t_answer if call.t_answer is not None else time.monotonic()
        self.started = 0  # lines whose start was printed
        self.ended: set[int] = set()  # agent lines whose end was printed

    def due(self) -> bool:
        """Whether something new happened that is not printed yet."""
        lines = self.call.conversation
        if len(lines) > self.started:
            return True
        return any(
            line.who == "agent" and line.t_end is not None and i not in self.ended
            for i, line in enumerate(lines)
        )

    def flush(self) -> None:
        """Print what happened since the last flush, in the order it happened."""
        lines = self.call.conversation
        events: list[tuple[float, int, str]] = []
        for i in range(self.started, len(lines)):
            events.append((lines[i].t_start, i, self._start(lines, i)))
        self.started = len(lines)
        for i, line in enumerate(lines[: self.started]):
            if line.who == "agent" and line.t_end is not None and i not in self.ended:
                self.ended.add(i)
                text = "agent:  (end of audio)"
                if line.cut:
                    by = " by the caller" if interrupted(lines, i) else ""
                    heard = line.text.strip()
                    what = f'the caller heard "{heard}"' if heard else "before a word was heard"
                    text = f"agent:  [cut off{by}] {what}"
                events.append((line.t_end, i, text))
        for t, _, text in sorted(events):
            self.say(t, text)

    def say(self, t: float, text: str) -> None:
        """One line of the transcript, stamped `t` (monotonic) relative to the answer."""
        print(f"[{t - self.t0:7.2f}] {text}", file=self.out, flush=True)

    def _start(self, lines: list[Line], k: int) -> str:
        line = lines[k]
        if line.who == "caller":
            return f"caller: {line.text}"
        note = ""
        # the latest caller line before this one: is this the start of its answer?
        i = next((j for j in range(k - 1, -1, -1) if lines[j].who == "caller"), None)
        if i is not None and reply_index(lines, i) == k:
            said_end = lines[i].t_end
            assert said_end is not None
            note = f"   ({line.t_start - said_end:.2f} s after the caller's last word)"
        return f"agent:  {line.planned}{note}"

    async def follow(self, sim: Simulator) -> None:
        """Print as the call goes, until cancelled."""
        while True:
            await sim.world.wait_for(self.due, timeout=None)
            self.flush()


def talked_through(lines: list[Line], i: int) -> bool:
    """Whether caller line `i` came while an agent line played on to its end, uncut."""
    t = lines[i].t_start
    return any(
        line.who == "agent" and not line.cut and line.t_start <= t <= (line.t_end or t)
        for line in lines[:i]
    )


def summary(sim: Simulator, call: SimCall) -> tuple[list[str], bool]:
    """The closing lines, and whether a session was left open."""
    lines = call.conversation
    turns = [i for i, line in enumerate(lines) if line.who == "caller"]
    waits = []
    for i in turns:
        k = reply_index(lines, i)
        end = lines[i].t_end
        if k is not None and end is not None:
            waits.append(f"{(lines[k].t_start - end) * 1000:.0f} ms")
        else:
            # an "ok" the agent talked on through was a backchannel, not a question left hanging
            waits.append("said over the agent" if talked_through(lines, i) else "no answer")
    cuts = sum(1 for k, line in enumerate(lines) if line.who == "agent" and interrupted(lines, k))
    leaks = sim.leaks()
    out = [
        f"{len(turns)} turn{'' if len(turns) == 1 else 's'}"
        + (f"; the caller's last word to the agent's voice: {', '.join(waits)}" if waits else ""),
        f"{cuts} interruption{'' if cuts == 1 else 's'}, {len(sim.requests)} REST requests, "
        f"{len(leaks)} sessions left open",
    ]
    if leaks:
        out.append(f"LEAKED: {leaks}")
    return out, bool(leaks)


# ---- input --------------------------------------------------------------------------------------


def start_reader(fd: int, inbox: asyncio.Queue[str | None]) -> threading.Thread:
    """Read lines from `fd` on a thread into `inbox` (None at end of input).

    A thread, because a regular file (`< script.txt`) cannot be watched by the event loop; and
    os.read, not sys.stdin, so that no buffer lock is held at interpreter exit by a daemon thread
    still blocked on the terminal."""
    loop = asyncio.get_running_loop()

    def put(item: str | None) -> bool:
        try:
            loop.call_soon_threadsafe(inbox.put_nowait, item)
        except RuntimeError:  # the loop is closed: the console is done
            return False
        return True

    def read() -> None:
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""
        while True:
            try:
                data = os.read(fd, 4096)
            except OSError:  # a terminal that went away (EIO) ends the input too
                data = b""
            if not data:
                rest = pending + decoder.decode(b"", final=True)
                if rest.strip():
                    put(rest)
                put(None)
                return
            pending += decoder.decode(data)
            while "\n" in pending:
                line, pending = pending.split("\n", 1)
                if not put(line.rstrip("\r")):
                    return

    thread = threading.Thread(target=read, name="agentd-console-stdin", daemon=True)
    thread.start()
    return thread


class ConsoleCaller:
    """Says the user's lines on the call."""

    def __init__(self, sim: Simulator, call: SimCall, *, interactive: bool, pause_s: float) -> None:
        self.sim = sim
        self.call = call
        self.interactive = interactive
        self.pause_s = pause_s
        self.baseline = 0  # say_seq before which agent audio does not answer the next line

    def answered(self) -> bool:
        """The agent said something since the caller's last line, and is silent now."""
        call = self.call
        heard = any(seq > self.baseline for seq, _ in call.play_log)
        return call.ended or (heard and not self.sim.world.agent_busy(call.id))

    async def wait_answered(self) -> None:
        """Like a scripted caller: until the agent has answered and finished, then a pause; a
        polite caller waits again if the agent started another sentence meanwhile. Bounded:
        a turn the agent does not answer does not stop the script."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(ANSWER_WAIT_S):
                while True:
                    await self.sim.world.wait_for(self.answered, timeout=None)
                    await asyncio.sleep(self.pause_s)
                    if self.answered():
                        return

    async def say(self, text: str) -> None:
        """The caller says `text`, word by word, at the simulator's speed."""
        await self.sim.caller_says(self.call.id, text)
        # what the agent sent while the caller talked is the reply they talked over
        self.baseline = self.call.say_seq

    async def converse(self, inbox: asyncio.Queue[str | None]) -> None:
        """Say the lines from `inbox` until /hangup or the end of input."""
        queue: asyncio.Queue[str] = asyncio.Queue()
        speaker = asyncio.create_task(self._speak(queue)) if self.interactive else None
        try:
            while True:
                item = await inbox.get()
                if item is None:
                    if not self.interactive:
                        await self.wait_answered()  # the last line's answer, heard to its end
                    return
                text = item.strip()
                if text == HANGUP:
                    return
                if not text:
                    continue
                if speaker is not None:
                    # typed: said at once, even over the agent (a barge-in); one at a time
                    queue.put_nowait(text)
                    continue
                await self.wait_answered()
                if self.call.ended:
                    return
                await self.say(text)
        finally:
            if speaker is not None:
                speaker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await speaker

    async def _speak(self, queue: asyncio.Queue[str]) -> None:
        while True:
            await self.say(await queue.get())


# ---- the whole console --------------------------------------------------------------------------


async def run(
    config_path: str | None,
    *,
    fast: bool = False,
    stdin_fd: int = 0,
    out: TextIO | None = None,
    log_file: TextIO | None = None,
    env: Mapping[str, str] | None = None,
    store: str = "",
) -> int:
    """Run one console call; return the exit code (1: a session was left open). With a
    `store` the call is kept there, for `agentd calls show ID --store PATH`."""
    out = out or sys.stdout
    interactive = os.isatty(stdin_fd)
    loop = asyncio.get_running_loop()
    async with Simulator(sim_settings(fast)) as sim:
        config = console_config(
            config_path, sim.api_url, sim.accesskey, fast=fast, env=env, store=store
        )
        if log_file is not None:
            logs.configure(config.log_level, "json", stream=log_file)
        daemon = Daemon(config)
        task = loop.create_task(daemon.run())
        transcript: Transcript | None = None
        printer: asyncio.Task[None] | None = None
        try:
            await _wait_ready(daemon, task)
            _header(config, fast, log_file, interactive, out)
            for warning in config.warnings:
                print(f"config: warning: {warning}", file=out, flush=True)
            inbox: asyncio.Queue[str | None] = asyncio.Queue()
            start_reader(stdin_fd, inbox)
            call_id = sim.inbound_call(source=CALLER_NUMBER, destination=CONSOLE_NUMBER)
            call = sim.get_call(call_id)
            await sim.wait_for(lambda: call.t_answer is not None or call.ended, READY_TIMEOUT_S)
            print(f"call {call_id} answered; times are seconds since then", file=out, flush=True)
            transcript = Transcript(call, out)
            printer = loop.create_task(transcript.follow(sim))
            await _converse(
                sim,
                call,
                ConsoleCaller(
                    sim,
                    call,
                    interactive=interactive,
                    pause_s=PAUSE_S * (FAST_SCALE if fast else 1.0),
                ),
                inbox,
            )
            hung_up_by_agent = call.ended
            if not call.ended:
                await sim.hangup(call_id)
            t_hangup = time.monotonic()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(daemon.dispatcher.wait_idle(), IDLE_TIMEOUT_S)
        finally:
            daemon.stop()
            await task
            if printer is not None:
                printer.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await printer
        assert transcript is not None
        code = _report(sim, call, transcript, by_agent=hung_up_by_agent, t_hangup=t_hangup, out=out)
        if store:
            print(f"the call is kept: agentd calls show {call_id} --store {store}", file=out)
        return code


async def _wait_ready(daemon: Daemon, task: asyncio.Task[None]) -> None:
    """Until the daemon is subscribed; its own error if it stopped first."""
    ready = asyncio.create_task(daemon.stream.ready.wait())
    await asyncio.wait({ready, task}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if ready.done():
        return
    ready.cancel()
    if task.done():
        task.result()  # the daemon's own error, as it is
    raise RuntimeError(f"agentd did not connect within {READY_TIMEOUT_S:g} s")


def _report(
    sim: Simulator,
    call: SimCall,
    transcript: Transcript,
    *,
    by_agent: bool,
    t_hangup: float,
    out: TextIO,
) -> int:
    """The rest of the transcript, the hangup and the summary; the exit code."""
    transcript.flush()
    transcript.say(t_hangup, f"call ended: {'the agent' if by_agent else 'the caller'} hung up")
    lines, leaked = summary(sim, call)
    print("", file=out)
    for line in lines:
        print(line, file=out, flush=True)
    return 1 if leaked else 0


async def _converse(
    sim: Simulator, call: SimCall, caller: ConsoleCaller, inbox: asyncio.Queue[str | None]
) -> None:
    """The caller's side until /hangup or end of input; cut short by Ctrl-C or by the agent
    hanging up (both cancel it: a line being said stops mid-word, as it would on a phone)."""
    loop = asyncio.get_running_loop()
    talk = loop.create_task(caller.converse(inbox))
    ended = loop.create_task(sim.world.wait_for(lambda: call.ended, timeout=None))

    def interrupt() -> None:
        # the first Ctrl-C hangs up cleanly; a second one is Python's KeyboardInterrupt again
        loop.remove_signal_handler(signal.SIGINT)
        talk.cancel()

    with contextlib.suppress(NotImplementedError, RuntimeError):  # not the main thread
        loop.add_signal_handler(signal.SIGINT, interrupt)
    try:
        await asyncio.wait({talk, ended}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(signal.SIGINT)
        for t in (talk, ended):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await t


def _header(
    config: Config, fast: bool, log_file: TextIO | None, interactive: bool, out: TextIO
) -> None:
    """What runs, on what timing, where agentd's log goes, and (typing) how to use it."""
    source = config.source or "no config file: the defaults"
    timing = f"VoIPBIN's timing x{FAST_SCALE:g} (--fast)" if fast else "VoIPBIN's real timing"
    where = (
        f"agentd's log: {log_file.name}" if log_file is not None else "agentd's warnings: stderr"
    )
    print(
        f"agentd console: backend {describe_backend(config)} ({source}); "
        f"the built-in simulator, {timing}; {where}",
        file=out,
        flush=True,
    )
    if interactive:
        print(
            "Type what the caller says, one line at a time; typing while the agent speaks "
            f"interrupts it. {HANGUP}, Ctrl-D or Ctrl-C hangs up.",
            file=out,
            flush=True,
        )


def main(
    config_path: str | None,
    *,
    fast: bool = False,
    log_path: str | None = None,
    store: str = DEFAULT_STORE,
) -> int:
    """Entry point for `agentd console`."""
    if log_path is None:
        # the terminal is the transcript's: only warnings and errors of agentd go beside it
        logs.configure("warning", "console", stream=sys.stderr)
        return asyncio.run(run(config_path, fast=fast, store=store))
    with open(log_path, "a", encoding="utf-8") as log_file:
        logs.configure("warning", "json", stream=log_file)
        return asyncio.run(run(config_path, fast=fast, log_file=log_file, store=store))
