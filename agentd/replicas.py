"""This replica's leases: which calls it may act on, claiming, renewing and taking them over.

Several agentd processes share one PostgreSQL (`[store] url`); each call is served by the one
replica that holds its lease (`agentd.store_pg`: owner, epoch, expiry on the database's clock).
This module is the shell around those statements for one process:

- `claim` a new call before acting on it: the first replica to claim serves it, the others
  leave its events alone;
- `renew` every lease held, every `lease_s / 3`; a call missing from the answer was taken over;
- `holds(call_id)` is the fencing check, without a round trip: True only before the local
  deadline of the lease, counted on this process's monotonic clock from the moment the last
  claim or renew was *sent*, minus a margin. The database's expiry is later than that (it was
  computed after the statement arrived), so once another replica can take the call over, this
  one has stopped acting on it — even after a SIGSTOP, a partition or a loop stall;
- `expired` leases of live calls are claimed by whoever sees them first: a takeover, restored
  from the store the way a restart resumes a call;
- a heartbeat row per replica: the live replicas split VoIPBIN's per-account rate limit.

While PostgreSQL is unreachable nothing can be renewed: a replica keeps acting on its calls
until their local deadlines, then goes quiet on them (no other replica can take them over
either, so no caller hears two agents), and takes no new call. When the database answers again
the quiet calls are up for takeover and are resumed from the store, by this replica or another.
What a replica did on a call before it went quiet (a turn answered) could not be written
either: it `park`s the call's last state and writes it first when the database answers
(`unpark`, only if nobody took the call over), and every replica waits one `lease_s` after the
database came back before it takes a call over, so the takeover finds that turn answered.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from agentd import __version__, logs
from agentd.store import StoreError

if TYPE_CHECKING:
    from agentd.store import CallRecord
    from agentd.store_pg import Lease, PgStore
    from agentd.store_pg import Replica as Heartbeat

log = logs.get_logger("agentd.replicas")

DEFAULT_LEASE_S = 3.0
# the part of a lease we never use: what a renew's statement may take to reach the database
MARGIN_FRACTION = 0.2


def new_replica_id(name: str = "") -> str:
    """`name` (the host name by default), the pid and a random tag: unique per process start,
    so a restarted agentd never mistakes the leases of the one before it for its own."""
    return f"{name or socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@dataclass
class Held:
    """A lease this replica holds: its epoch, and until when (local monotonic) it may act."""

    epoch: int
    until: float


class Replica:
    """One process's view of the leases: what it holds, and the statements that change that."""

    def __init__(
        self,
        store: PgStore,
        replica_id: str,
        *,
        lease_s: float = DEFAULT_LEASE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.id = replica_id
        self.lease_s = lease_s
        self.clock = clock
        self.held: dict[str, Held] = {}
        self.live: list[Heartbeat] = []  # the live replicas at the last heartbeat, this one too
        self.owners: list[Lease] = []  # who serves which live call, as of a recent heartbeat
        self._beats = 0
        self.reachable = True  # did the last statement reach the database?
        self.on_reachable: Callable[[], None] | None = None  # called when it answers again
        self.counters = {"claimed": 0, "taken_by_others": 0, "takeovers": 0, "lost": 0}
        # the last state of calls whose lease lapsed here, with that lease's epoch: written when
        # the database answers again
        self.parked: dict[str, tuple[CallRecord, int]] = {}
        self._back_at = -math.inf  # when (local clock) the database last answered again

    @property
    def usable_s(self) -> float:
        """How long after sending a claim or renew this replica may act on the calls."""
        return self.lease_s * (1.0 - MARGIN_FRACTION)

    @property
    def renew_every_s(self) -> float:
        return self.lease_s / 3.0

    @property
    def replicas(self) -> int:
        """How many replicas share the account (1 before the first heartbeat is read)."""
        return max(1, len(self.live))

    @property
    def settling(self) -> bool:
        """Within `lease_s` of the database answering again: no takeover yet, so that the
        replicas that lost calls to the outage write their parked states first."""
        return self.clock() < self._back_at + self.lease_s

    def holds(self, call_id: str) -> bool:
        """The fencing check: may this replica act on the call now?"""
        held = self.held.get(call_id)
        return held is not None and self.clock() < held.until

    def lapsed(self) -> list[str]:
        """Calls whose lease ran out here without a renew (the database did not answer)."""
        now = self.clock()
        return [call_id for call_id, held in self.held.items() if now >= held.until]

    def forget(self, call_id: str) -> Held | None:
        """Stop renewing the call's lease (it ended, or it was lost); the lease lapses."""
        return self.held.pop(call_id, None)

    def park(self, rec: CallRecord, epoch: int) -> None:
        """Keep the last state of a call whose lease lapsed here (at `epoch`): the writes of
        its last moments may have failed with the database, and whoever takes the call over
        must find the turns it answered, or it answers them again."""
        self.parked[rec.call_id] = (rec, epoch)

    async def unpark(self) -> bool:
        """Write the parked states, each only if nobody took its call over since; False if the
        database did not answer (they stay parked)."""
        for call_id, (rec, epoch) in list(self.parked.items()):
            try:
                await self.store.save_call_fenced(rec, self.id, epoch)
            except StoreError as exc:
                self._unreachable(exc)
                return False
            self._reachable()
            del self.parked[call_id]
        return True

    async def claim(self, call_id: str) -> int | None:
        """Try to own the call: its epoch if this replica now serves it (1: nobody served it
        before), 0 if another replica does, None if the database did not answer (nobody can
        take a new call then)."""
        sent = self.clock()
        try:
            epoch = await self.store.claim(call_id, self.id, self.lease_s)
        except StoreError as exc:
            self._unreachable(exc)
            return None
        self._reachable()
        if epoch is None:
            self.counters["taken_by_others"] += 1
            return 0
        self.held[call_id] = Held(epoch, sent + self.usable_s)
        self.counters["takeovers" if epoch > 1 else "claimed"] += 1
        log.info("lease.claimed", call_id=call_id, epoch=epoch)
        return epoch

    async def renew(self) -> list[str]:
        """Extend every lease held; the calls that were taken over meanwhile (lost)."""
        if not self.held:
            return []
        sent = self.clock()
        asked = list(self.held)
        try:
            kept = await self.store.renew(self.id, self.lease_s, asked)
        except StoreError as exc:
            self._unreachable(exc)
            return []
        self._reachable()
        until = sent + self.usable_s
        lost = []
        for call_id in asked:
            held = self.held.get(call_id)
            if held is None:
                continue  # ended while the renew was on its way
            if call_id in kept:
                held.until = until
            else:
                lost.append(call_id)
        return lost

    async def expired(self) -> list[str]:
        """Live calls whose lease expired (owner dead, paused or gone): up for takeover."""
        try:
            leases = await self.store.expired_leases()
        except StoreError as exc:
            self._unreachable(exc)
            return []
        self._reachable()
        return [lease.call_id for lease in leases]

    async def beat(self, calls: int) -> None:
        """Say this replica lives, and count the live ones (the rate limit's share)."""
        info: dict[str, object] = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "version": __version__,
            "calls": calls,
        }
        try:
            await self.store.heartbeat(self.id, info)
            self.live = await self.store.live_replicas(within_s=self.lease_s)
            if self._beats % 3 == 0:  # for `agentd status`: every lease_s is fresh enough
                self.owners = await self.store.live_leases()
            self._beats += 1
        except StoreError as exc:
            self._unreachable(exc)
            return
        self._reachable()

    async def leave(self) -> None:
        """A clean stop: hand every call over at once (released, not left to expire) and drop
        the heartbeat row, so the others take the calls and the whole rate limit."""
        if not await self.unpark():
            return
        for call_id, held in list(self.held.items()):
            try:
                await self.store.release(call_id, self.id, held.epoch)
            except StoreError as exc:
                self._unreachable(exc)
                return
            del self.held[call_id]
        try:
            await self.store.leave(self.id)
        except StoreError as exc:
            self._unreachable(exc)

    def _unreachable(self, exc: StoreError) -> None:
        if self.reachable:
            log.error(
                "store.unreachable",
                error=str(exc),
                hint="calls go quiet when their leases lapse; new calls are not taken",
            )
        self.reachable = False

    def _reachable(self) -> None:
        if not self.reachable:
            log.info("store.reachable", leases=len(self.held), parked=len(self.parked))
            self.reachable = True
            self._back_at = self.clock()
            if self.on_reachable is not None:
                self.on_reachable()
