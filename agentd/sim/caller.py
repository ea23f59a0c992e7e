"""The scripted caller: when each utterance is said, and when the caller hangs up.

Rules (see :class:`~agentd.sim.model.Utterance`):

* default: wait until the caller has heard the agent say something since the previous utterance
  started (the greeting, for the first one) and all its audio has finished, then ``pause_s``;
* ``barge_in_after_s``: start that long after the agent starts playing its next reply audio;
* ``wait_for_agent=False``: ``pause_s`` after the previous utterance, whatever the agent does;
  with :attr:`~agentd.sim.model.Caller.paced_from` set, on a timeline from that instant, so a
  late simulator (its own GC, a busy loop) does not bunch callers together for the rest of a run;
* ``backchannel_after_s``: like a barge-in, but the caller expects no answer: the next utterance
  still waits for the reply the backchannel was said over (said even if that reply has ended).

The caller stops talking before the STT reports its words (:mod:`agentd.sim.stt`): the last
final transcript comes ``stt_final_delay_s`` after the end of the utterance.

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
    """Until the caller heard the agent say something sent after ``baseline``, and it is
    silent again. A /say cut before its audio started was never heard: a caller waits on."""
    await world.wait_for(
        lambda: any(seq > baseline for seq, _ in call.play_log) and not world.agent_busy(call.id),
        timeout=None,
    )


async def _after_reply_starts(world: World, call: SimCall, baseline: int, after_s: float) -> None:
    """Until ``after_s`` after the agent's first audio since ``baseline`` started playing."""
    await world.wait_for(lambda: any(seq > baseline for seq, _ in call.play_log), timeout=None)
    t_reply = next(t for seq, t in call.play_log if seq > baseline)
    delay = t_reply + after_s - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


async def _wait_turn(world: World, call: SimCall, utt: Utterance, baseline: int) -> None:
    after_s = (
        utt.backchannel_after_s if utt.backchannel_after_s is not None else utt.barge_in_after_s
    )
    if after_s is not None:
        await _after_reply_starts(world, call, baseline, after_s)
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


def _paced(utt: Utterance) -> bool:
    """Said on the clock alone (not waiting for the agent, nor keyed to its reply)."""
    return (
        not utt.wait_for_agent and utt.barge_in_after_s is None and utt.backchannel_after_s is None
    )


async def run_caller(
    world: World, speech: Speech, calls: Calls, call: SimCall, caller: Caller
) -> None:
    """Play ``caller``'s script on ``call`` (started when the call is answered)."""
    baseline = call.say_seq
    paced = caller.paced_from
    for utt in caller.utterances:
        start = None
        if paced is not None and _paced(utt):
            start = paced + utt.pause_s
            delay = start - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        else:
            await _wait_turn(world, call, utt, baseline)
        if call.status != "progressing":
            return
        end = await speech.stt.caller_says(
            call, utt.text, utt.finals, start=start, settled_as=utt.settled_as
        )
        if paced is not None:
            paced = end
        if utt.backchannel_after_s is None:
            # an answer comes after the words it answers: what the agent sent while the caller
            # was talking is the reply they talked over
            baseline = call.say_seq
    if caller.hangup_after_s is None:
        return
    await _wait_answered(world, call, baseline)
    await asyncio.sleep(caller.hangup_after_s)
    calls.hangup_remote(call)
