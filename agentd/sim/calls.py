"""Call lifecycles: outbound dialing outcomes, inbound number flows, flow actions, hangups.

States (docs/protocol.md §4.1): ``dialing -> ringing -> progressing -> terminating -> hangup``,
``canceling -> hangup`` for a local hangup before answer; ``hangup`` is final. A flow that runs out
of actions is hung up by the server; every call is capped at ``max_call_s`` (reason ``timeout``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from agentd.sim.caller import run_caller
from agentd.sim.clock import go_time
from agentd.sim.model import (
    JSON,
    NIL_UUID,
    Caller,
    Line,
    Outcome,
    SimCall,
    SimGroupcall,
    new_id,
)
from agentd.sim.speech import Speech
from agentd.sim.state import World

#: Time between a local hangup (terminating/canceling) and the channel being gone (hangup).
LOCAL_HANGUP_DELAY_S = 0.02
#: The number flow of an inbound call: answer, then keep the call up for an hour.
INBOUND_FLOW: list[JSON] = [
    {"type": "answer"},
    {"type": "sleep", "option": {"duration": 3600000}},
]
_OUTCOME_REASON = {"busy": "busy", "noanswer": "noanswer", "failed": "failed"}
_ADDRESS_KEYS = ("type", "target", "target_name", "name", "detail")


def clean_address(addr: Any) -> JSON:
    """An Address as the server echoes it: known string fields, empty ones omitted."""
    if not isinstance(addr, dict):
        return {}
    return {k: addr[k] for k in _ADDRESS_KEYS if isinstance(addr.get(k), str) and addr[k]}


class Calls:
    """Creates calls and runs their lifecycles."""

    def __init__(self, world: World, speech: Speech) -> None:
        self.world = world
        self.speech = speech
        #: Outbound behaviour per destination target (``None`` = any destination).
        self.outbound: dict[str | None, tuple[Outcome, Caller | None]] = {None: (Outcome(), None)}

    # -- creation ---------------------------------------------------------------------------------

    def _new_call(
        self, source: JSON, destination: JSON, direction: Literal["incoming", "outgoing"]
    ) -> SimCall:
        call = SimCall(
            id=new_id(),
            customer_id=self.world.customer_id,
            source=source,
            destination=destination,
            direction=direction,
            status="ringing" if direction == "incoming" else "dialing",
            tm_create=self.world.clock.now(),
        )
        self.world.calls[call.id] = call
        call.tasks.append(
            self.world.spawn(self._max_duration(call), name=f"sim-call-cap-{call.id}")
        )
        return call

    def create_inbound(
        self, source: str, destination: str, caller: Caller | None, answer_after_s: float
    ) -> SimCall:
        """An incoming call running the number flow (answer + sleep 1 h)."""
        call = self._new_call(
            {"type": "tel", "target": source}, {"type": "tel", "target": destination}, "incoming"
        )
        self.world.emit("call_created", call.to_json())
        call.tasks.append(
            self.world.spawn(
                self._run_actions(call, INBOUND_FLOW, caller, answer_after_s),
                name=f"sim-flow-{call.id}",
            )
        )
        return call

    def create_outbound(
        self, source: JSON, destination: JSON, actions: list[JSON], groupcall: SimGroupcall | None
    ) -> SimCall:
        """An outgoing call; the far end behaves per :meth:`set_outbound`."""
        call = self._new_call(source, destination, "outgoing")
        if groupcall is not None:
            call.groupcall_id_internal = groupcall.id
            call.flow_id = groupcall.flow_id
        self.world.emit("call_created", call.to_json())
        outcome, caller = self.outbound.get(destination.get("target"), self.outbound[None])
        call.tasks.append(
            self.world.spawn(
                self._outbound(call, outcome, actions, caller), name=f"sim-flow-{call.id}"
            )
        )
        return call

    def set_outbound(
        self, outcome: Outcome, caller: Caller | None = None, destination: str | None = None
    ) -> None:
        """How the far end of future outbound calls (to ``destination``, or any) behaves."""
        self.outbound[destination] = (outcome, caller)

    # -- status changes ---------------------------------------------------------------------------

    def _set_status(self, call: SimCall, status: str) -> None:
        now = self.world.clock.now()
        call.status = status
        call.tm_update = now
        if status == "ringing":
            call.tm_ringing = now
        elif status == "progressing":
            call.tm_progressing = now
            call.t_answer = time.monotonic()
        self.world.emit(f"call_{status}", call.to_json())

    def _answer(self, call: SimCall, caller: Caller | None) -> None:
        self._set_status(call, "progressing")
        gc = self.world.groupcalls.get(call.groupcall_id_internal or "")
        if gc is not None and gc.status == "progressing":
            gc.answer_call_id = call.id
            gc.tm_update = self.world.clock.now()
            self.world.emit("groupcall_progressing", gc.to_json())
        if caller is not None:
            call.tasks.append(
                self.world.spawn(
                    run_caller(self.world, self.speech, self, call, caller),
                    name=f"sim-caller-{call.id}",
                )
            )

    def _cancel_tasks(self, call: SimCall) -> None:
        me = asyncio.current_task()
        for task in call.tasks:
            if task is not me:
                task.cancel()

    def _finish(self, call: SimCall, by: str, reason: str) -> None:
        """The channel is gone: final ``hangup``, transcribes end, audio stops."""
        if call.ended:
            return
        self._cancel_tasks(call)
        now = self.world.clock.now()
        call.status = "hangup"
        call.hangup_by = by
        call.hangup_reason = reason
        call.tm_hangup = now
        call.tm_update = now
        self.world.emit("call_hangup", call.to_json())
        self.speech.on_call_hangup(call)
        gc = self.world.groupcalls.get(call.groupcall_id_internal or "")
        if gc is not None and gc.status != "hangup":
            gc.status = "hangup"
            gc.tm_update = now
            self.world.emit("groupcall_hangup", gc.to_json())

    def hangup_local(self, call: SimCall, reason: str = "normal") -> None:
        """Our side hangs up: ``terminating`` (or ``canceling`` before an outgoing answer)."""
        if call.status in ("hangup", "terminating", "canceling"):
            return
        if call.direction == "outgoing" and call.status in ("dialing", "ringing"):
            self._set_status(call, "canceling")
            reason = "cancel"
        else:
            self._set_status(call, "terminating")
        self._cancel_tasks(call)
        self.world.spawn(self._finish_later(call, reason), name=f"sim-hangup-{call.id}")

    async def _finish_later(self, call: SimCall, reason: str) -> None:
        await asyncio.sleep(LOCAL_HANGUP_DELAY_S)
        self._finish(call, "local", reason)

    def hangup_remote(self, call: SimCall, reason: str = "normal") -> None:
        """The far end hangs up (ignored once we are already hanging up)."""
        if call.status in ("hangup", "terminating", "canceling"):
            return
        self._finish(call, "remote", reason)

    # -- flows ------------------------------------------------------------------------------------

    async def _max_duration(self, call: SimCall) -> None:
        await asyncio.sleep(self.world.settings.max_call_s)
        self.hangup_local(call, reason="timeout")

    async def _outbound(
        self, call: SimCall, outcome: Outcome, actions: list[JSON], caller: Caller | None
    ) -> None:
        await asyncio.sleep(outcome.ring_after_s)
        self._set_status(call, "ringing")
        await asyncio.sleep(outcome.answer_after_s)
        if outcome.result != "answer":
            self._finish(call, "remote", _OUTCOME_REASON[outcome.result])
            return
        self._answer(call, caller)
        await self._run_actions(call, actions, None, 0.0)

    async def _run_actions(
        self,
        call: SimCall,
        actions: list[JSON],
        caller: Caller | None,
        answer_after_s: float,
    ) -> None:
        """Execute flow actions in order; when they run out the server hangs the call up."""
        ids = [new_id() for _ in actions]
        for i, act in enumerate(actions):
            kind = str(act.get("type", ""))
            option = act.get("option") if isinstance(act.get("option"), dict) else None
            action: JSON = {
                "id": ids[i],
                "next_id": ids[i + 1] if i + 1 < len(ids) else NIL_UUID,
            }
            if kind:
                action["type"] = kind
            if option:
                action["option"] = option
            now = self.world.clock.now()
            action["tm_execute"] = go_time(now)
            call.action = action
            call.tm_update = now
            self.world.emit("call_updated", call.to_json())
            if kind == "answer" and call.status != "progressing":
                await asyncio.sleep(answer_after_s)
                self._answer(call, caller)
            elif kind == "sleep":
                duration_ms = _number(option, "duration", 0.0)
                await asyncio.sleep(duration_ms / 1000.0)
            elif kind == "hangup":
                break
            elif kind == "talk":
                text = str((option or {}).get("text", ""))
                await self._talk(call, text)
        self.hangup_local(call)

    async def _talk(self, call: SimCall, text: str) -> None:
        """A flow ``talk`` action: played to the call, recorded like agent speech."""
        if call.status != "progressing" or not text:
            return
        line = Line("agent", "", text, time.monotonic())
        call.conversation.append(line)
        try:
            await asyncio.sleep(len(text) / self.world.settings.playback_chars_per_s)
            line.text = text
        finally:
            line.t_end = time.monotonic()


def _number(option: JSON | None, key: str, default: float) -> float:
    value = (option or {}).get(key, default)
    return float(value) if isinstance(value, int | float) else default
