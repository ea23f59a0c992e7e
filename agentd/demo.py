"""`agentd demo`: the real daemon against the built-in VoIPBIN simulator, no account needed.

A scripted caller phones in, talks to the agent (interrupting it once), and hangs up; the demo
prints the conversation as the caller heard it, with the time from the end of each caller turn
to the agent's voice, and checks that no session was left running. Exit code 0 means all of
that worked.

It runs on the simulator's real-world timing (a voice reads ~15 characters a second, the TTS
starts ~1.1 s after a /say, the STT's final transcript comes ~1.1 s after the caller stops), so
the call takes about half a minute, as it would on a phone.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Sequence

from agentd import logs
from agentd.backends import last_user_text
from agentd.commands import Message
from agentd.config import load
from agentd.daemon import Daemon
from agentd.sim import Caller, SimSettings, Simulator, Utterance

OUR_NUMBER = "+15551234567"
CALLER_NUMBER = "+15550001111"


class DemoBackend:
    """A tiny rule-based "bank assistant" that streams its replies word by word."""

    RULES = (
        (
            "balance",
            "Sure. Your balance is one thousand two hundred dollars. "
            "Your last payment of fifty dollars went out on Monday, "
            "and your next statement is due on the first of the month.",
        ),
        ("card", "I have blocked your card. A new one is on its way and arrives in five days."),
        ("bye", "Thank you for calling. Goodbye!"),
    )

    async def reply(self, call_id: str, history: Sequence[Message]) -> AsyncIterator[str]:
        """Pick a canned reply and stream it like an LLM would."""
        text = last_user_text(history).lower()
        answer = next((a for k, a in self.RULES if k in text), "I can help with that. What else?")
        for word in answer.split(" "):
            await asyncio.sleep(0.01)  # an LLM's time per token, so streaming is visible
            yield word + " "

    async def aclose(self) -> None:
        """Nothing to release."""


SCRIPT = Caller(
    [
        Utterance("Hi, what is my account balance?"),
        # the caller cuts the long answer short
        Utterance("Sorry, actually I lost my card.", barge_in_after_s=1.0),
        Utterance("Great, thanks. Bye."),
    ],
    hangup_after_s=0.3,
)


async def run(quiet: bool = False) -> int:
    """Run the demo; return the exit code."""
    out = sys.stdout
    async with Simulator(SimSettings()) as sim:
        config = load(
            None,
            env={},
            overrides={
                "voipbin": {"api_url": sim.api_url, "accesskey": sim.accesskey},
                "agent": {"numbers": [OUR_NUMBER]},
                "daemon": {"drain_s": 5.0},
                "store": {"path": ""},  # nothing to resume: the demo ends its calls on exit
                "status": {"socket": ""},
            },
        )
        daemon = Daemon(config, backend=DemoBackend())
        task = asyncio.create_task(daemon.run())
        try:
            await asyncio.wait_for(daemon.stream.ready.wait(), 10)
            if not quiet:
                print(
                    f"simulator at {sim.api_url}; agentd subscribed; calling {OUR_NUMBER}", file=out
                )
            call_id = sim.inbound_call(source=CALLER_NUMBER, destination=OUR_NUMBER, caller=SCRIPT)
            await sim.wait_call_status(call_id, "hangup", timeout=120)
            await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
        finally:
            daemon.stop()
            await task
        print(f"\ncall {call_id}", file=out)
        lines = sim.get_call(call_id).conversation
        turns = [li for li in lines if li.who == "caller"]
        for i, line in enumerate(lines):
            if line.who == "caller":
                # what the caller waits through: the end of their words to the agent's voice
                reply = next((li for li in lines[i + 1 :] if li.who == "agent"), None)
                lat = ""
                if reply is not None and line.t_end is not None:
                    lat = f"   (agent answered in {(reply.t_start - line.t_end) * 1000:.0f} ms)"
                print(f"  caller: {line.text}{lat}", file=out)
            else:
                cut = "  [cut off by the caller]" if line.cut else ""
                print(f"  agent:  {line.text}{cut}", file=out)
        leaks = sim.leaks()
        requests = len(sim.requests)
        print(
            f"\n{len(turns)} turns, {requests} REST requests, {len(leaks)} leaked sessions",
            file=out,
        )
        if leaks:
            print(f"LEAKED: {leaks}", file=out)
            return 1
        return 0


def main(quiet: bool = False) -> int:
    """Entry point for `agentd demo`."""
    logs.configure("warning", "console", stream=sys.stderr)
    return asyncio.run(run(quiet))
