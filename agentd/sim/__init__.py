"""A faithful local VoIPBIN simulator (REST + WebSocket over loopback) with a scripted caller.

Follows the server code, not the docs (see ``docs/protocol.md``; §12 lists where they differ)::

    async with Simulator(SimSettings(playback_chars_per_s=200)) as sim:
        call_id = sim.inbound_call(caller=Caller([Utterance("hello")]))
        ...
"""

from agentd.sim.faults import Faults
from agentd.sim.model import Caller, Line, Outcome, SimCall, Utterance
from agentd.sim.records import Request
from agentd.sim.settings import SimSettings
from agentd.sim.simulator import Simulator

__all__ = [
    "Caller",
    "Faults",
    "Line",
    "Outcome",
    "Request",
    "SimCall",
    "SimSettings",
    "Simulator",
    "Utterance",
]
