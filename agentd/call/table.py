"""What the call's small machines share: the error an impossible transition raises."""

from __future__ import annotations


class Illegal(Exception):
    """An internal input the machine's table does not allow; the machine's state is unchanged.

    Stale or duplicate *remote* input never raises (the protocol allows it); this is for inputs
    agentd itself produced in the wrong state — a bug the router records as an anomaly."""

    def __init__(self, machine: str, state: str, inp: str) -> None:
        super().__init__(f"{machine}: {inp} is not allowed in {state}")
        self.machine = machine
        self.state = state
        self.input = inp
