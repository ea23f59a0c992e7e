"""Call lifecycles: outbound dialing outcomes, inbound number flows, flow actions, hangups,
confbridges and transfers.

States (docs/protocol.md §4.1): ``dialing -> ringing -> progressing -> terminating -> hangup``,
``canceling -> hangup`` for a local hangup before answer; ``hangup`` is final. A flow that runs out
of actions is hung up by the server; every call is capped at ``max_call_s`` (reason ``timeout``).

Confbridges and transfers follow ``voipbin/monorepo``: the ``connect`` action
(``bin-flow-manager/pkg/activeflowhandler/actionhandle.go``, ``actionHandleConnect``) makes a
``connect`` confbridge, dials its destinations with the flow ``[confbridge_join, hangup]`` and
joins the call to it; ``confbridge_join`` blocks until the call leaves
(``bin-call-manager/pkg/callhandler/bridge.go``, ``bridgeLeftJoin``: then the next action); a
``connect`` confbridge left with one call terminates unless flagged ``no_auto_leave``
(``bin-call-manager/pkg/confbridgehandler/leaved.go``). Transfers are
``bin-transfer-manager/pkg/transferhandler/`` (``transfer.go``, ``blind.go``, ``attended.go``,
``transferee.go``, ``transferer.go``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Literal

from agentd.sim.caller import run_caller
from agentd.sim.clock import go_time
from agentd.sim.errors import ApiError
from agentd.sim.model import (
    JSON,
    NIL_UUID,
    Caller,
    ConfbridgeType,
    Line,
    Outcome,
    SimCall,
    SimConfbridge,
    SimFlow,
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
#: Address types a call (or groupcall member) can be made to.
DIALABLE = ("tel", "sip", "agent", "extension")
#: The confbridge flag a blind transfer sets so that hanging the transferer up does not end it.
NO_AUTO_LEAVE = "no_auto_leave"


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
        #: Flows by id (``POST /calls`` ``flow_id``, a number's flow), confbridges by id.
        self.flows: dict[str, SimFlow] = {}
        self.confbridges: dict[str, SimConfbridge] = {}
        #: Live transfers by their groupcall id and by their transferer call id.
        self._transfer_by_gc: dict[str, JSON] = {}
        self._transfer_by_call: dict[str, JSON] = {}

    # -- flows ------------------------------------------------------------------------------------

    def create_flow(
        self, actions: list[JSON], customer_id: str | None = None, name: str = ""
    ) -> SimFlow:
        """A stored flow (``customer_id`` defaults to the simulator's customer)."""
        flow = SimFlow(
            id=new_id(),
            customer_id=customer_id or self.world.customer_id,
            actions=[dict(a) for a in actions],
            tm_create=self.world.clock.now(),
            name=name,
        )
        self.flows[flow.id] = flow
        return flow

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
        self,
        source: str,
        destination: str,
        caller: Caller | None,
        answer_after_s: float,
        flow: SimFlow | None = None,
    ) -> SimCall:
        """An incoming call running the number's flow (default: answer + sleep 1 h)."""
        call = self._new_call(
            {"type": "tel", "target": source}, {"type": "tel", "target": destination}, "incoming"
        )
        actions = INBOUND_FLOW
        if flow is not None:
            call.flow_id = flow.id
            actions = flow.actions
        self.world.emit("call_created", call.to_json())
        call.tasks.append(
            self.world.spawn(
                self._run_actions(call, actions, caller, answer_after_s),
                name=f"sim-flow-{call.id}",
            )
        )
        return call

    def create_outbound(
        self,
        source: JSON,
        destination: JSON,
        actions: list[JSON],
        groupcall: SimGroupcall | None,
        master: SimCall | None = None,
    ) -> SimCall:
        """An outgoing call; the far end behaves per :meth:`set_outbound`.

        ``master`` is the call it is chained to: hung up with it (``callhandler/hangup.go``).
        """
        call = self._new_call(source, destination, "outgoing")
        if groupcall is not None:
            call.groupcall_id_internal = groupcall.id
            call.flow_id = groupcall.flow_id
        self.world.emit("call_created", call.to_json())
        if master is not None and not master.ending:
            # Chained after creation, both announced (call-manager chained_call.go).
            master.chained_call_ids.append(call.id)
            call.master_call_id = master.id
            self._touch(master)
            self._touch(call)
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

    def _touch(self, call: SimCall) -> None:
        """A change the server announces with ``call_updated``."""
        call.tm_update = self.world.clock.now()
        self.world.emit("call_updated", call.to_json())

    def _answer(self, call: SimCall, caller: Caller | None) -> None:
        self._set_status(call, "progressing")
        gc = self.world.groupcalls.get(call.groupcall_id_internal or "")
        if gc is not None and gc.status == "progressing" and gc.answer_call_id == NIL_UUID:
            gc.answer_call_id = call.id
            gc.tm_update = self.world.clock.now()
            self.world.emit("groupcall_progressing", gc.to_json())
            # ring_all + hangup_others: the first answer ends the other legs.
            for other_id in gc.call_ids:
                if other_id != call.id:
                    self.hangup_local(self.world.calls[other_id])
            self._transferee_answered(gc)
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
        self._leave_confbridge(call)
        # The master's hangup takes its chained calls down (callhandler/hangup.go).
        for chained_id in call.chained_call_ids:
            self.hangup_local(self.world.calls[chained_id])
        gc = self.world.groupcalls.get(call.groupcall_id_internal or "")
        if (
            gc is not None
            and gc.status != "hangup"
            and all(self.world.calls[c].ended for c in gc.call_ids)
        ):
            gc.status = "hangup"
            gc.tm_update = now
            self.world.emit("groupcall_hangup", gc.to_json())
            self._transferee_hungup(gc)
        self._transferer_hungup(call)

    def hangup_local(self, call: SimCall, reason: str = "normal") -> None:
        """Our side hangs up: ``terminating`` (or ``canceling`` before an outgoing answer)."""
        if call.ending:
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
        if call.ending:
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

    def _set_action(self, call: SimCall, action_id: str, next_id: str, act: JSON) -> None:
        """The call's current action, announced with ``call_updated``."""
        kind = str(act.get("type", ""))
        option = act.get("option") if isinstance(act.get("option"), dict) else None
        action: JSON = {"id": action_id, "next_id": next_id}
        if kind:
            action["type"] = kind
        if option:
            action["option"] = option
        action["tm_execute"] = go_time(self.world.clock.now())
        call.action = action
        self._touch(call)

    async def _run_actions(
        self,
        call: SimCall,
        actions: list[JSON],
        caller: Caller | None,
        answer_after_s: float,
    ) -> None:
        """Execute flow actions in order; when they run out the server hangs the call up.

        A failed action moves on to the next (``callhandler/action.go``, ``actionExecute``).
        """
        ids = [new_id() for _ in actions]
        for i, act in enumerate(actions):
            kind = str(act.get("type", ""))
            option = act.get("option") if isinstance(act.get("option"), dict) else None
            if kind == "connect":
                # A flow-manager action: the call only sees the confbridge_join it pushes.
                await self._connect(call, option or {})
                continue
            self._set_action(call, ids[i], ids[i + 1] if i + 1 < len(ids) else NIL_UUID, act)
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
            elif kind == "confbridge_join":
                await self._confbridge_join(call, str((option or {}).get("confbridge_id", "")))
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

    # -- confbridges ------------------------------------------------------------------------------

    def new_confbridge(self, kind: ConfbridgeType) -> SimConfbridge:
        """An empty confbridge of the simulator's customer."""
        cb = SimConfbridge(id=new_id(), customer_id=self.world.customer_id, type=kind)
        self.confbridges[cb.id] = cb
        return cb

    async def _connect(self, call: SimCall, option: JSON) -> None:
        """``connect``: a new ``connect`` confbridge, its destinations dialled with
        ``[confbridge_join, hangup]`` (chained to this call), then this call joins it
        (``bin-flow-manager/pkg/activeflowhandler/actionhandle.go``, ``actionHandleConnect``).
        No call created = the action fails and the flow moves on."""
        cb = self.new_confbridge("connect")
        join: JSON = {"type": "confbridge_join", "option": {"confbridge_id": cb.id}}
        source = clean_address(option.get("source"))
        raw = option.get("destinations")
        created = [
            self.create_outbound(source, dest, [join, {"type": "hangup"}], None, master=call)
            for dest in (clean_address(d) for d in (raw if isinstance(raw, list) else []))
            if dest.get("type") in DIALABLE
        ]
        if not created:
            return
        self._set_action(call, new_id(), NIL_UUID, join)
        await self._confbridge_join(call, cb.id)

    async def _confbridge_join(self, call: SimCall, confbridge_id: str) -> None:
        """Join and stay until kicked (``confbridgehandler/join.go``, ``joined.go``); an unknown
        or ended confbridge fails the action."""
        cb = self.confbridges.get(confbridge_id)
        if cb is None or cb.status != "progressing" or call.ended:
            return
        cb.call_ids.append(call.id)
        call.confbridge_id = cb.id
        # The first call of a connect bridge hears ringback until another joins (joined.go).
        cb.ringing = cb.type == "connect" and len(cb.call_ids) == 1
        self._touch(call)
        await self.world.wait_for(lambda: call.confbridge_id != cb.id, timeout=None)

    def _leave_confbridge(self, call: SimCall) -> None:
        """The call leaves its confbridge (``confbridgehandler/leaved.go``): a ``connect`` one
        left with a single call terminates unless flagged ``no_auto_leave``."""
        cb = self.confbridges.get(call.confbridge_id)
        call.confbridge_id = NIL_UUID
        if cb is None:
            return
        if call.id in cb.call_ids:
            cb.call_ids.remove(call.id)
        if not call.ended:
            self._touch(call)  # bridgeLeftJoin announces it, then runs the next action
        if (
            cb.type == "connect"
            and cb.status == "progressing"
            and len(cb.call_ids) == 1
            and NO_AUTO_LEAVE not in cb.flags
        ):
            self.terminate_confbridge(cb)
        self.world.notify()

    def terminate_confbridge(self, cb: SimConfbridge) -> None:
        """End the bridge: every call left in it moves on to its next action
        (``confbridgehandler/terminate.go``, ``callhandler/bridge.go``)."""
        if cb.status != "progressing":
            return
        cb.status = "terminated"
        cb.ringing = False
        for call_id in list(cb.call_ids):
            self._leave_confbridge(self.world.calls[call_id])

    # -- groupcalls and transfers -----------------------------------------------------------------

    def create_groupcall(
        self, source: JSON, destinations: list[JSON], actions: list[JSON], master_call_id: str
    ) -> SimGroupcall | None:
        """A ring-all groupcall, one call per dialable destination; ``None`` when there is none
        (``bin-call-manager/pkg/groupcallhandler/start.go``: "have no destination")."""
        dests = [d for d in (clean_address(a) for a in destinations) if d.get("type") in DIALABLE]
        if not dests:
            return None
        gc = SimGroupcall(
            id=new_id(),
            customer_id=self.world.customer_id,
            source=source,
            destinations=dests,
            flow_id=new_id(),
            call_ids=[],
            status="progressing",
            tm_create=self.world.clock.now(),
        )
        self.world.groupcalls[gc.id] = gc
        master = self.world.calls.get(master_call_id)
        self.world.emit("groupcall_created", gc.to_json())
        for dest in dests:
            call = self.create_outbound(source, dest, actions, gc, master=master)
            gc.call_ids.append(call.id)
        return gc

    def start_transfer(self, kind: str, transferer: SimCall, addresses: list[JSON]) -> JSON:
        """``POST /transfers`` behind the gateway: refused (500) unless the transferer is in a
        confbridge (``transfer.go``, ``transferInit``: "no confbridge id found").

        Blind (``blind.go``): flag the bridge ``no_auto_leave``, hang the transferer up, ring the
        bridge, dial the transferees with ``[confbridge_join]``. Attended (``attended.go``): the
        other calls in the bridge get music on hold and ``mute_direction: in``; the transferer
        stays. Any error is a bare 500 (``listenhandler/v1_transfers.go``).
        """
        cb = self.confbridges.get(transferer.confbridge_id)
        if cb is None or kind not in ("blind", "attended"):
            raise ApiError(500, "INTERNAL")
        join: list[JSON] = [{"type": "confbridge_join", "option": {"confbridge_id": cb.id}}]
        if kind == "blind":
            cb.flags.add(NO_AUTO_LEAVE)
            self.hangup_local(transferer)
            cb.ringing = True
        else:
            self._hold_others(cb, transferer, on=True)
        gc = self.create_groupcall(transferer.source, addresses, join, transferer.master_call_id)
        if gc is None:
            if kind == "blind":
                cb.flags.discard(NO_AUTO_LEAVE)
            else:
                self._hold_others(cb, transferer, on=False)
            raise ApiError(500, "INTERNAL")
        now = go_time(self.world.clock.now())
        transfer: JSON = {
            "id": new_id(),
            "customer_id": self.world.customer_id,
            "type": kind,
            "transferer_call_id": transferer.id,
            "transferee_addresses": list(gc.destinations),
            "transferee_call_id": NIL_UUID,
            "groupcall_id": gc.id,
            "confbridge_id": cb.id,
            "tm_create": now,
            "tm_update": now,
            "tm_delete": None,
        }
        self.world.transfers[transfer["id"]] = transfer
        self._transfer_by_gc[gc.id] = transfer
        self._transfer_by_call[transferer.id] = transfer
        transferer.transfers.append(transfer)
        self.world.notify()
        return transfer

    def _hold_others(self, cb: SimConfbridge, transferer: SimCall, *, on: bool) -> None:
        """Music on hold and inbound mute for every other call in the bridge (``attended.go``,
        ``attendedBlock`` / ``attendedUnblock``)."""
        for call_id in cb.call_ids:
            other = self.world.calls[call_id]
            if other.id == transferer.id or other.ended:
                continue
            other.moh = on
            other.mute_direction = "in" if on else ""
            self._touch(other)

    def _set_transferee(self, transfer: JSON, call_id: str) -> None:
        transfer["transferee_call_id"] = call_id
        transfer["tm_update"] = go_time(self.world.clock.now())

    def _transferee_answered(self, gc: SimGroupcall) -> None:
        """``transferee.go`` ``TransfereeAnswer``: blind unflags the bridge, records the
        transferee and stops the ringback; attended does nothing."""
        transfer = self._transfer_by_gc.get(gc.id)
        if transfer is None or transfer["type"] != "blind":
            return
        cb = self.confbridges.get(transfer["confbridge_id"])
        if cb is not None:
            cb.flags.discard(NO_AUTO_LEAVE)
            cb.ringing = False
        self._set_transferee(transfer, gc.answer_call_id)

    def _transferee_hungup(self, gc: SimGroupcall) -> None:
        """``transferee.go`` ``TransfereeHangup`` while no transferee is recorded: blind (nobody
        answered) terminates the bridge, so the calls left move on to their next action;
        attended takes the others off hold."""
        transfer = self._transfer_by_gc.pop(gc.id, None)
        if transfer is None or transfer["transferee_call_id"] != NIL_UUID:
            return
        cb = self.confbridges.get(transfer["confbridge_id"])
        if cb is None:
            return
        if transfer["type"] == "blind":
            self.terminate_confbridge(cb)
        else:
            self._hold_others(cb, self.world.calls[transfer["transferer_call_id"]], on=False)

    def _transferer_hungup(self, call: SimCall) -> None:
        """``transferer.go`` ``TransfererHangup``: attended either completes (the transferee
        answered: recorded, the others taken off hold) or ends the bridge."""
        transfer = self._transfer_by_call.pop(call.id, None)
        if transfer is None or transfer["type"] != "attended":
            return
        gc = self.world.groupcalls.get(transfer["groupcall_id"])
        cb = self.confbridges.get(transfer["confbridge_id"])
        if gc is None or cb is None:
            return
        if gc.answer_call_id == NIL_UUID:
            self.terminate_confbridge(cb)
            return
        self._set_transferee(transfer, gc.answer_call_id)
        self._hold_others(cb, call, on=False)


def _number(option: JSON | None, key: str, default: float) -> float:
    value = (option or {}).get(key, default)
    return float(value) if isinstance(value, int | float) else default
