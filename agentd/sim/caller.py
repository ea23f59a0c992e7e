"""The scripted caller: when each utterance is said, and when the caller hangs up.

Rules (see :class:`~agentd.sim.model.Utterance`):

* default: wait until the agent has said something since the previous utterance started (the
  greeting, for the first one) and all its audio has finished, then ``pause_s``;
* ``barge_in_after_s``: start that long after the agent starts playing its next reply audio;
* ``wait_for_agent=False``: ``pause_s`` after the previous utterance, whatever the agent does.

After the last utterance has been answered and the agent's audio has finished, the caller hangs up
after ``hangup_after_s`` (never when ``None``).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from agentd.sim.model import Caller, SimCall, Utterance
from agentd.sim.speech import Speech
from agentd.sim.state import World

if TYPE_CHECKING:
    from agentd.sim.calls import Calls


async def _wait_answered(world: World, call: SimCall, baseline: int) -> None:
    """Until the agent said something after ``baseline`` and is silent again."""
    await world.wait_for(
        lambda: call.say_seq > baseline and not world.agent_busy(call.id), timeout=None
    )


async def _wait_turn(world: World, call: SimCall, utt: Utterance, baseline: int) -> None:
    if utt.barge_in_after_s is not None:
        await world.wait_for(lambda: any(seq > baseline for seq, _ in call.play_log), timeout=None)
        t_reply = next(t for seq, t in call.play_log if seq > baseline)
        delay = t_reply + utt.barge_in_after_s - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        return
    if not utt.wait_for_agent:
        await asyncio.sleep(utt.pause_s)
        return
    while True:
        await _wait_answered(world, call, baseline)
        await asyncio.sleep(utt.pause_s)
        # A polite caller waits again if the agent started another sentence during the pause.
        if not world.agent_busy(call.id):
            return


async def run_caller(
    world: World, speech: Speech, calls: Calls, call: SimCall, caller: Caller
) -> None:
    """Play ``caller``'s script on ``call`` (started when the call is answered)."""
    baseline = call.say_seq
    for utt in caller.utterances:
        await _wait_turn(world, call, utt, baseline)
        if call.status != "progressing":
            return
        baseline = call.say_seq
        await speech.caller_says(call, utt.text)
    if caller.hangup_after_s is None:
        return
    await _wait_answered(world, call, baseline)
    await asyncio.sleep(caller.hangup_after_s)
    calls.hangup_remote(call)
