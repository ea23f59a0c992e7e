"""Control routes for benchmarks, under ``/_sim/bench/`` (POST, JSON bodies, loopback only).

A benchmark runs the simulator in its own process and measures agentd from the simulator's own
clock: when an event was published, and when a request arrived (both ``time.monotonic()``, which is
system-wide on Linux, so a driver in another process can compare them with its own).

* ``now`` -> ``{"t"}``: the simulator's clock.
* ``calls`` ``{"count", "spread_s", "text", "every_s", "turns", "source", "destination"}`` ->
  ``{"ids"}``: ``count`` inbound calls created at once and answered evenly over ``spread_s``; each
  caller says ``text`` ``every_s`` seconds after its previous utterance (``turns`` times, whatever
  the agent does) and never hangs up by itself. Each keeps to its own timeline from its planned
  answer, so the callers stay staggered even when the simulator runs late for a while.
* ``burst`` ``{"text"}`` -> ``{"t", "count"}``: every answered call that is not over
  (``progressing``) has its caller say ``text``, all starting at the same instant ``t``, so
  every final transcript is due at once (the bench's burst; start calls with ``"turns": 0`` so
  their callers say nothing else). Only the callers' speech is scheduled: publishing is unchanged.
* ``hangup_all`` -> ``{"count"}``: the far end hangs up every call that is not over.
* ``events`` ``{"since", "types"}``: published events at or after ``since`` (optionally only those
  types) as ``{"t", "type", "call_id", "direction"}``; ``call_id`` is resolved for transcripts and
  speech events through their transcribe.
* ``requests`` ``{"since"}``: served REST requests as ``{"t", "method", "path", "kind", "status",
  "call_id"}``; ``kind`` is the route without ids (``POST /speakings/say``).
* ``ws`` -> open WebSocket connections ``{"connected_at", "subscribed_at", "subscriptions"}``.
* ``drop_ws`` -> ``{"t"}``: drop every WebSocket now (as the ``drop_websockets`` fault).
* ``webhook`` ``{"url"}``: deliver every event to ``url`` from now on (``null`` stops).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from agentd.sim.model import JSON, Caller, Utterance

if TYPE_CHECKING:
    from agentd.sim.simulator import Simulator


class BenchError(ValueError):
    """A bad bench control request (the control API answers 400)."""


def request_kind(method: str, path: str) -> str:
    """``POST /v1.0/speakings/<id>/say`` -> ``POST /speakings/say``; ids become ``{id}`` only
    when nothing follows them (``GET /calls/{id}``)."""
    parts = [p for p in path.split("/") if p]
    if parts and parts[0] == "v1.0":
        parts = parts[1:]
    if not parts:
        return f"{method} /"
    out = [parts[0]]
    if len(parts) == 2:
        out.append("{id}")
    elif len(parts) > 2:
        out.extend(parts[2:])
    return f"{method} /" + "/".join(out)


def _float(body: JSON, key: str, default: float) -> float:
    value = body.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise BenchError(f"{key} must be a number")
    return float(value)


class BenchApi:
    """What a benchmark driver needs beyond the plain control API."""

    def __init__(self, sim: Simulator) -> None:
        self.sim = sim

    async def route(self, parts: list[str], body: JSON) -> Any:
        """Serve ``POST /_sim/bench/<parts>``; ``None`` = no such route."""
        match parts:
            case ["now"]:
                return {"t": time.monotonic()}
            case ["calls"]:
                return {"ids": self.start_calls(body)}
            case ["burst"]:
                return self.burst(body)
            case ["hangup_all"]:
                return {"count": self.hangup_all()}
            case ["events"]:
                types = body.get("types")
                if types is not None and not (
                    isinstance(types, list) and all(isinstance(t, str) for t in types)
                ):
                    raise BenchError("types must be a list of strings")
                return self.events(_float(body, "since", 0.0), types)
            case ["requests"]:
                return self.requests(_float(body, "since", 0.0))
            case ["ws"]:
                return self.ws()
            case ["drop_ws"]:
                t = time.monotonic()
                self.sim.faults.drop_websockets()
                return {"t": t}
            case ["webhook"]:
                url = body.get("url")
                if url is not None and not isinstance(url, str):
                    raise BenchError("url must be a string or null")
                self.sim.webhooks.set_url(url)
                return {"ok": True}
        return None

    def start_calls(self, body: JSON) -> list[str]:
        """Create the calls; answers are spread evenly over ``spread_s``."""
        count = int(_float(body, "count", 1))
        if not 1 <= count <= 100_000:
            raise BenchError("count must be 1..100000")
        spread = _float(body, "spread_s", 0.0)
        every = _float(body, "every_s", 4.0)
        turns = int(_float(body, "turns", 1000))
        text = body.get("text", "what is my balance")
        if not isinstance(text, str) or not text.strip():
            raise BenchError("text must be a non-empty string")
        source = str(body.get("source", "+15550001111"))
        destination = str(body.get("destination", "+15551234567"))
        ids = []
        t = time.monotonic()
        for i in range(count):
            caller = Caller(
                [Utterance(text, pause_s=every, wait_for_agent=False) for _ in range(turns)],
                hangup_after_s=None,
                # each caller keeps its own slot: a pause of this simulator (a GC of the 1,000
                # calls just created) would otherwise bunch the callers due in it for good
                paced_from=t + spread * i / count,
            )
            ids.append(self.sim.inbound_call(source, destination, caller, spread * i / count))
        return ids

    def burst(self, body: JSON) -> JSON:
        """Every caller of a call in progress says ``text``, all from the same instant."""
        text = body.get("text", "what is my balance")
        if not isinstance(text, str) or not text.strip():
            raise BenchError("text must be a non-empty string")
        # one start time for all: the tasks below run one after another, and a start read in
        # each would spread the burst over the time it takes to launch them
        t = time.monotonic()
        live = [c for c in self.sim.world.calls.values() if c.status == "progressing"]
        for call in live:
            call.tasks.append(  # cancelled with the call's other tasks when it ends
                self.sim.world.spawn(
                    self.sim.speech.stt.caller_says(call, text, start=t),
                    name=f"sim-burst-{call.id}",
                )
            )
        return {"t": t, "count": len(live)}

    def hangup_all(self) -> int:
        """Remote hangup of every call that is not over."""
        live = [c for c in self.sim.calls.values() if not c.ending]
        for call in live:
            self.sim._calls.hangup_remote(call)
        return len(live)

    def events(self, since: float, types: list[str] | None) -> list[JSON]:
        """Events published at or after ``since``."""
        world = self.sim.world
        wanted = set(types) if types is not None else None
        out: list[JSON] = []
        for (event_type, payload), t in zip(world.events, world.event_times, strict=True):
            if t < since or (wanted is not None and event_type not in wanted):
                continue
            call_id = ""
            if event_type.startswith("call_"):
                call_id = str(payload.get("id", ""))
            elif "transcribe_id" in payload:
                trn = world.transcribes.get(str(payload["transcribe_id"]))
                call_id = trn.reference_id if trn is not None else ""
            elif event_type.startswith("transcribe_"):
                call_id = str(payload.get("reference_id", ""))
            out.append(
                {
                    "t": t,
                    "type": event_type,
                    "call_id": call_id,
                    "direction": payload.get("direction"),
                }
            )
        return out

    def requests(self, since: float) -> list[JSON]:
        """REST requests served that arrived at or after ``since``."""
        world = self.sim.world
        out: list[JSON] = []
        for r in self.sim.requests:
            if r.t < since:
                continue
            parts = [p for p in r.path.split("/") if p]
            call_id = ""
            if len(parts) >= 3 and parts[1] == "calls":
                call_id = parts[2]
            elif len(parts) >= 3 and parts[1] == "speakings" and parts[2] in world.speakings:
                call_id = world.speakings[parts[2]].reference_id
            elif len(parts) >= 3 and parts[1] == "transcribes" and parts[2] in world.transcribes:
                call_id = world.transcribes[parts[2]].reference_id
            elif isinstance(r.body, dict) and isinstance(r.body.get("reference_id"), str):
                call_id = r.body["reference_id"]
            out.append(
                {
                    "t": r.t,
                    "method": r.method,
                    "path": r.path,
                    "kind": request_kind(r.method, r.path),
                    "status": r.status,
                    "call_id": call_id,
                }
            )
        return out

    def ws(self) -> list[JSON]:
        """Open WebSocket connections."""
        return [
            {
                "connected_at": c.connected_at,
                "subscribed_at": c.subscribed_at,
                "subscriptions": len(c.subscriptions),
            }
            for c in self.sim.ws_connections
            if not c.closed
        ]
