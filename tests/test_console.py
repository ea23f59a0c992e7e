"""`agentd console`: the real daemon and the user's backend against the in-process simulator,
driven from a pipe, from a pseudo-terminal (typed lines, a barge-in), and from Python."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import os
import pty
import re
import sys
import threading
from pathlib import Path

import pytest

import agentd.config
from agentd import console
from agentd.call.settings import CallSettings
from agentd.sim import Line
from tests.stubs import OpenAIStub, Script
from tests.support import run_cli

API_URL = "http://127.0.0.1:9/v1.0"  # never contacted: console_config only builds the config
ACCESSKEY = "vb_console_test_key"
# a long sentence (no full stop inside: the echo answers it in one /say) for the agent to be
# talked over while it reads it back
LONG = (
    "I would like to hear about every single savings account you offer including the "
    "interest rates the monthly fees the minimum balances the withdrawal limits and "
    "whether I can open one online without visiting a branch in person this week"
)


def clean_env() -> dict[str, str]:
    """The test's environment without a deployed agentd's settings."""
    return {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_")}


def transcript(out: str) -> list[str]:
    """The transcript's lines without their time stamps."""
    return [m.group(1) for m in re.finditer(r"^\[\s*\d+\.\d\d\] (.*?)\r?$", out, re.MULTILINE)]


async def run_console(
    *args: str, stdin: str, cwd: Path, limit_s: float = 60.0
) -> tuple[int, str, str]:
    """`python -m agentd console ...` with `stdin` piped in, in `cwd` (where it keeps its
    call history)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentd",
        "console",
        *args,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
        cwd=cwd,
    )
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), limit_s)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def call_of(out: str) -> str:
    """The id of the call the console made."""
    found = re.search(r"^call (\S+) answered", out, re.MULTILINE)
    assert found is not None, out
    return found.group(1)


async def calls_show(call_id: str, store: Path) -> str:
    """`agentd calls show ID --store STORE`, as a user runs it after the console."""
    code, out, err = await run_cli("calls", "show", call_id, "--store", str(store))
    assert code == 0, err
    return out


# ---- the configuration ---------------------------------------------------------------------------


def test_without_a_config_file_it_is_the_echo_backend_and_the_defaults() -> None:
    config = console.console_config(None, API_URL, ACCESSKEY, env={})
    assert config.backend.kind == "echo"
    assert config.call == CallSettings()
    assert config.numbers == (console.CONSOLE_NUMBER,)
    assert config.voipbin.api_url == API_URL
    assert config.voipbin.ws_url == "ws://127.0.0.1:9/v1.0/ws"
    assert config.voipbin.accesskey is not None
    assert config.voipbin.accesskey.reveal() == ACCESSKEY
    assert (config.store_path, config.status_socket, config.metrics_listen) == ("", "", "")


def test_the_users_voipbin_store_and_observability_are_replaced_the_rest_kept(
    tmp_path: Path,
) -> None:
    path = tmp_path / "agentd.toml"
    path.write_text(
        f"""
[voipbin]
api_url = "https://api.voipbin.net/v1.0"
accesskey_file = "{tmp_path}/no-such-key"
token_file = "{tmp_path}/no-such-token"
rate_per_s = 5
[agent]
numbers = ["+15559990000"]
greeting = "Stub bank, hello."
system_prompt = "You are the stub bank."
end_of_turn_s = 0.5
[backend]
kind = "openai"
base_url = "http://127.0.0.1:1/v1"
model = "m"
[store]
path = "{tmp_path}/agentd.db"
[status]
socket = "{tmp_path}/status.sock"
[metrics]
listen = "127.0.0.1:9464"
"""
    )
    # a deployed agentd's environment does not leak in either
    env = {"AGENTD_VOIPBIN_TOKEN": "a.b.c", "AGENTD_STORE_PATH": "/var/lib/agentd/agentd.db"}
    config = console.console_config(str(path), API_URL, ACCESSKEY, env=env)
    assert config.source == str(path)
    assert config.voipbin.api_url == API_URL
    assert config.voipbin.token is None
    assert config.voipbin.rate_per_s == 5  # agentd's own request budget is the user's
    assert config.numbers == (console.CONSOLE_NUMBER,)
    assert (config.store_path, config.status_socket, config.metrics_listen) == ("", "", "")
    assert config.call.greeting == "Stub bank, hello."
    assert config.call.system_prompt == "You are the stub bank."
    assert (config.backend.kind, config.backend.model) == ("openai", "m")
    assert console.describe_backend(config) == "openai m at http://127.0.0.1:1/v1"
    # an http backend's key in its query (Azure's ?code=) is masked in the banner
    http = dataclasses.replace(
        config,
        backend=dataclasses.replace(
            config.backend, kind="http", url="https://rag.example/reply?code=AZSECRET123"
        ),
    )
    assert console.describe_backend(http) == "http https://rag.example/reply?code=***"
    # --fast: agentd's timing shrinks with the simulator's, the user's values scaled
    fast = console.console_config(str(path), API_URL, ACCESSKEY, fast=True, env=env)
    assert fast.call.end_of_turn_s == pytest.approx(0.05)
    assert fast.call.say_latency_s == pytest.approx(console.sim_settings(True).say_latency_s)
    assert fast.call.rate == pytest.approx(console.sim_settings(True).playback_chars_per_s)
    assert fast.call.silence_s == config.call.silence_s  # the typist is not ten times quicker
    assert fast.call.greeting == config.call.greeting


def test_the_services_traces_are_off_in_the_console(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `sudo agentd console` with the service's config sent the console's made-up calls to the
    # production collector ("nothing leaves the machine but what your backend sends"), and
    # where the otel extra was missing it stopped at a config error about traces
    path = tmp_path / "agentd.toml"
    path.write_text('[otel]\nenabled = true\nendpoint = "https://collector.example:4318"\n')
    env = {"AGENTD_OTEL_ENABLED": "true", "AGENTD_OTEL_ENDPOINT": "https://other.example"}
    config = console.console_config(str(path), API_URL, ACCESSKEY, env=env)
    assert not config.otel.enabled
    monkeypatch.setattr(agentd.config, "otel_installed", lambda: False)  # the extra missing
    assert not console.console_config(str(path), API_URL, ACCESSKEY, env=env).otel.enabled


def test_a_service_config_on_postgresql_is_no_config_error(tmp_path: Path) -> None:
    # the console keeps its own SQLite file (or none): the service's database, its password
    # file (root's, unreadable) and a url beside the console's path are none of its business
    path = tmp_path / "agentd.toml"
    path.write_text(
        f"""
[store]
url = "postgresql://agentd@db.example:5432/agentd"
password_file = "{tmp_path}/no-such-password"
"""
    )
    config = console.console_config(str(path), API_URL, ACCESSKEY, store="c.db", env={})
    assert (config.store_url, config.store_path) == (None, "c.db")


def test_which_agent_line_answers_a_caller_line_and_which_were_interrupted() -> None:
    lines = [
        Line("agent", "Hello.", "Hello.", 0.0, 1.0),
        Line("caller", "Hi", "Hi", 2.0, 2.5),
        Line("agent", "You said", "You said: Hi.", 3.0, 3.4, cut=True),
        Line("caller", "wait", "wait", 3.2, 3.6),
        Line("agent", "You said: wait.", "You said: wait.", 3.5, 4.0),  # before their last word
        Line("agent", "Anything", "Anything else?", 4.2, 4.3, cut=True),  # cut by the hangup
    ]
    assert console.reply_index(lines, 1) == 2
    assert console.reply_index(lines, 3) == 5
    assert [k for k in range(len(lines)) if console.interrupted(lines, k)] == [2]


def test_a_backchannel_the_agent_talked_through_is_no_unanswered_turn() -> None:
    lines = [
        Line("agent", "Your balance is ten.", "Your balance is ten.", 0.0, 2.0),
        Line("caller", "ok", "ok", 1.0, 1.2),  # over the agent, which went on uncut
        Line("caller", "and", "and", 2.5, 2.7),  # after it: a turn of its own, unanswered
    ]
    assert console.reply_index(lines, 1) is None
    assert [console.talked_through(lines, i) for i in (1, 2)] == [True, False]


# ---- whole calls ---------------------------------------------------------------------------------


@pytest.mark.slow  # a subprocess and a three-turn call: about 3 s
async def test_piped_lines_are_said_in_turn_and_the_echo_answers_each(tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text(
        f"""
[voipbin]
accesskey_file = "{tmp_path}/no-such-key"
[agent]
numbers = ["+15559990000"]
[store]
path = "{tmp_path}/agentd.db"
[status]
socket = "{tmp_path}/status.sock"
"""
    )
    said = ["Hi, what is my account balance?", "", "I lost my card.", "Great, thanks. Bye."]
    code, out, err = await run_console(
        "--fast", "--config", str(config), stdin="\n".join(said) + "\n", cwd=tmp_path
    )
    assert code == 0, out + err
    assert "backend echo" in out.splitlines()[0]
    lines = transcript(out)
    assert lines[0] == "agent:  Hello, thank you for calling. How can I help you today?"
    # one caller line per non-empty input line, each answered once its turn came
    assert [x for x in lines if x.startswith("caller:")] == [f"caller: {s}" for s in said if s]
    answers = [x for x in lines if x.startswith("agent:  You said:")]
    assert [re.sub(r"\s+\(.*\)$", "", a) for a in answers] == [
        "agent:  You said: Hi, what is my account balance.",
        "agent:  You said: I lost my card.",
        "agent:  You said: Great, thanks. Bye.",
    ]
    assert all(re.search(r"\(\d+\.\d\d s after the caller's last word\)$", a) for a in answers)
    assert lines[-1] == "call ended: the caller hung up"
    assert "[cut off]" not in out  # each line waited for the answer to the one before
    assert re.search(
        r"^3 turns; the caller's last word to the agent's voice: \d+ ms, \d+ ms, \d+ ms$",
        out,
        re.MULTILINE,
    )
    assert re.search(r"^0 interruptions, \d+ REST requests, 0 sessions left open$", out, re.M)
    # the store and the status socket of the config stayed off: the call is in the console's
    files = set(os.listdir(tmp_path))
    assert "agentd.db" not in files and "status.sock" not in files
    call_id = call_of(out)
    assert f"agentd calls show {call_id} --store agentd-console.db" in out
    shown = await calls_show(call_id, tmp_path / "agentd-console.db")
    assert "You said: I lost my card." in shown


@pytest.mark.slow  # a subprocess and a call with the OpenAI stub: about 2 s
async def test_the_configured_backend_and_agent_settings_are_used(tmp_path: Path) -> None:
    async with OpenAIStub(Script("Your balance is twelve dollars. Anything else?")) as llm:
        config = tmp_path / "agentd.toml"
        config.write_text(
            f"""
[agent]
greeting = "Stub bank, hello."
system_prompt = "You are the stub bank."
[backend]
kind = "openai"
base_url = "{llm.base_url}"
model = "stub-model"
api_key = "sk-console-test-key"
"""
        )
        code, out, err = await run_console(
            "--fast", "--config", str(config), stdin="What is my balance?\n", cwd=tmp_path
        )
    assert code == 0, out + err
    assert f"backend openai stub-model at {llm.base_url} ({config})" in out.splitlines()[0]
    lines = transcript(out)
    assert lines[0] == "agent:  Stub bank, hello."
    assert "caller: What is my balance?" in lines
    heard = " ".join(
        x for x in lines if x.startswith("agent:  Your") or x.startswith("agent:  Any")
    )
    assert "Your balance is twelve dollars." in heard
    # the stub was asked with the user's model, system prompt and key, and the caller's words
    asked = [r for r in llm.requests if r.messages and r.messages[-1]["role"] == "user"]
    assert asked
    body = asked[-1].body
    assert body["model"] == "stub-model"
    assert body["messages"][0] == {"role": "system", "content": "You are the stub bank."}
    assert body["messages"][-1]["content"] == "What is my balance?"
    assert asked[-1].headers["Authorization"] == "Bearer sk-console-test-key"
    assert "sk-console-test-key" not in out + err


@pytest.mark.slow  # a whole call in-process: about 1.5 s
async def test_in_process_the_agent_hanging_up_ends_the_console(tmp_path: Path) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text('[backend]\nkind = "python"\ncallable = "tests.stubs:py_stream"\n')
    read_fd, write_fd = os.pipe()
    # one line, and the input stays open: the agent says goodbye and hangs up
    os.write(write_fd, b"Hello there.\n")
    out = io.StringIO()
    try:
        code = await asyncio.wait_for(
            console.run(str(config), fast=True, stdin_fd=read_fd, out=out, env={}), 30
        )
    finally:
        os.close(write_fd)  # the reader thread sees the end of input and ends
        for thread in threading.enumerate():
            if thread.name == "agentd-console-stdin":
                thread.join(5)
        os.close(read_fd)  # only now: a number reused under the thread's read would be read
    text = out.getvalue()
    assert code == 0, text
    lines = transcript(text)
    assert lines[2:] == [
        "caller: Hello there.",
        lines[3],
        "agent:  (end of audio)",
        "call ended: the agent hung up",
    ]
    assert re.fullmatch(
        r"agent:  Thanks for calling\. Goodbye!   \(\d\.\d\d s after the caller's last word\)",
        lines[3],
    )
    assert re.search(
        r"^1 turn; .*\n0 interruptions, \d+ REST requests, 0 sessions left open$", text, re.M
    )


# ---- a pseudo-terminal: typed lines, and a barge-in ----------------------------------------------


class Terminal:
    """The master side of a pty: what the console printed, and typing into it."""

    def __init__(self, master: int) -> None:
        self.master = master
        self.text = ""
        self.pos = 0  # where the next `until` starts looking
        self.closed = False
        self._changed = asyncio.Event()
        asyncio.get_running_loop().add_reader(master, self._read)

    def _read(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except OSError:  # EIO: the child closed its side
            data = b""
        if not data:
            self.closed = True
            asyncio.get_running_loop().remove_reader(self.master)
        self.text += data.decode(errors="replace")
        self._changed.set()

    def type(self, line: str) -> None:
        """Type `line` and Enter."""
        os.write(self.master, line.encode() + b"\r")

    async def until(self, pattern: str, timeout_s: float = 20.0) -> re.Match[str]:
        """Wait for `pattern` in the output after the last match."""
        async with asyncio.timeout(timeout_s):
            while True:
                m = re.compile(pattern, re.MULTILINE).search(self.text, self.pos)
                if m is not None:
                    self.pos = m.end()
                    return m
                assert not self.closed, f"the console ended without {pattern!r}:\n{self.text}"
                self._changed.clear()
                await self._changed.wait()

    def close(self) -> None:
        """Stop watching the pty and close it."""
        if not self.closed:
            asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)


@pytest.mark.slow  # a subprocess in a pty and a call with a barge-in: about 4 s
async def test_typed_in_a_terminal_a_line_said_over_the_agent_cuts_it_off(
    tmp_path: Path,
) -> None:
    config = tmp_path / "agentd.toml"
    config.write_text('[backend]\nkind = "echo"\n')
    master, slave = pty.openpty()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "agentd",
        "console",
        "--fast",
        "--config",
        str(config),
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=clean_env(),
        start_new_session=True,
        cwd=tmp_path,  # where the console keeps its call (agentd-console.db)
    )
    os.close(slave)
    term = Terminal(master)
    try:
        await term.until(r"^Type what the caller says")
        await term.until(r"agent:  \(end of audio\)")  # the greeting, heard to its end
        term.type(LONG)
        reply = await term.until(r"agent:  You said: I would like")
        # the agent reads the long line back: the caller talks over it
        term.type("wait, stop please")
        await term.until(r"caller: wait, stop please")
        cut = await term.until(
            r'agent:  \[cut off by the caller\] the caller heard "You said: ([^"]*)"'
        )
        assert 0 < len(cut.group(1)) < len(LONG) // 2
        assert "(end of audio)" not in term.text[reply.end() : cut.start()]
        await term.until(r"agent:  You said: wait, stop please\.   \(\d+\.\d\d s after")
        term.type("/hangup")
        await term.until(r"call ended: the caller hung up")
        await term.until(r"^2 turns; the caller's last word to the agent's voice: \d+ ms, \d+ ms")
        await term.until(r"^1 interruption, \d+ REST requests, 0 sessions left open")
        assert await asyncio.wait_for(proc.wait(), 20) == 0
        # and the call is in the history, with the reply the caller cut off
        shown = await calls_show(call_of(term.text), tmp_path / "agentd-console.db")
        assert "[cut off by the caller]" in shown
        assert "wait, stop please" in shown
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        term.close()


def test_a_reader_that_goes_away_gets_no_traceback(tmp_path: Path) -> None:
    # `agentd console < script | head -1`: head closes the pipe after one line
    import subprocess

    proc = subprocess.Popen(
        [sys.executable, "-m", "agentd", "console", "--fast", "--store", ""],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=tmp_path,
    )
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    proc.stdin.write(b"hello there\nwhat time is it\n/hangup\n")
    proc.stdin.close()
    assert proc.stdout.readline().startswith(b"agentd console:")
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141
    assert "Traceback" not in err and "BrokenPipeError" not in err
