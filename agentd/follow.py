"""`agentd call --wait`: follow one call over REST and print its conversation until it ends.

It polls rather than opening a second WebSocket, so it works the same next to a running daemon.
Every poll goes through the client's budget (`VoipbinClient.limiter`, at background priority),
and that budget paces the loop: `agentd call` builds its client with a tool's share of the
account's 17 requests/s (agentd/ratelimit.py, `tool_budget`), which the daemon leaves free. So
following a call never pushes the account over VoIPBIN's limit, however fast the loop could go.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from agentd.backoff import delays
from agentd.call.core import outage
from agentd.events import is_real_time
from agentd.voipbin import ApiError, VoipbinClient

POLL_S = 1.0  # the pace when the budget is off (rate_per_s = 0): the limiter would not wait
# the waits between polls while VoIPBIN does not answer (after the client's own retries)
OUTAGE_BASE_S, OUTAGE_CAP_S = 1.0, 10.0


async def follow(client: VoipbinClient, call_id: str) -> int:
    """Print status changes and transcripts of `call_id`; 0 if it was answered, 1 if not.

    An outage of VoIPBIN (no answer, 429, 5xx past the client's retries) is waited out, as the
    daemon serving the call waits it out: the call goes on meanwhile. Any other refusal (the
    call unknown, the key refused) ends the follow with 1."""
    status = ""
    answered = False
    finished: set[str] = set()  # transcribes read after they were done: nothing more comes
    printed: set[str] = set()
    waits = delays(OUTAGE_BASE_S, OUTAGE_CAP_S)
    waiting_out = False
    while True:
        try:
            call = await client.get_call(call_id)
            # a short call can be answered and over between two polls: tm_progressing tells
            # (absent, null or the docs' 9999-01-01 "never" if it was not)
            now_answered = (
                answered
                or call.get("status") == "progressing"
                or is_real_time(call.get("tm_progressing"))
            )
            lines, done = await _new_lines(client, call_id, finished) if now_answered else ([], [])
        except ApiError as exc:
            if not outage(exc.status):
                print(f"agentd: cannot follow the call: {exc}", file=sys.stderr)
                return 1
            if not waiting_out:
                print(f"agentd: VoIPBIN is not answering ({exc}); still following", file=sys.stderr)
                waiting_out = True
            await asyncio.sleep(next(waits))
            continue
        if waiting_out:
            print("agentd: VoIPBIN answers again", file=sys.stderr)
            waiting_out, waits = False, delays(OUTAGE_BASE_S, OUTAGE_CAP_S)
        answered = now_answered
        finished.update(done)
        new = str(call.get("status", ""))
        if new != status:
            status = new
            extra = f" ({call.get('hangup_reason')})" if status == "hangup" else ""
            print(f"[{status}]{extra}", flush=True)
        for t in lines:
            if t.get("id") not in printed:
                printed.add(str(t.get("id")))
                who = "callee" if t.get("direction") == "in" else "agent"  # we called
                print(f"{who}: {t.get('message', '')}", flush=True)
        if status == "hangup":
            return 0 if answered else 1
        if client.limiter.rate <= 0:
            await asyncio.sleep(POLL_S)


async def _new_lines(
    client: VoipbinClient, call_id: str, finished: set[str]
) -> tuple[list[dict[str, Any]], list[str]]:
    """The transcripts of the call's transcribes (the daemon started them) that may have
    grown, in the order they were said, and those of the transcribes that are done (read
    this once more, then no longer: `finished`, updated by the caller once they are shown).

    Listed on every poll: the daemon replaces a call's transcribe (a quiet callee, a restart's
    stray one), and the callee's later words are on the new one."""
    body = await client.request(
        "GET", "/transcribes", params={"reference_type": "call", "reference_id": call_id}
    )
    items = body.get("result") if isinstance(body, dict) else None
    lines: list[dict[str, Any]] = []
    done: list[str] = []
    for t in reversed(items or []):  # VoIPBIN lists the newest first
        if not isinstance(t, dict) or not isinstance(t.get("id"), str) or t["id"] in finished:
            continue
        lines += await client.transcripts_in_order(t["id"])
        if t.get("status") == "done":
            done.append(t["id"])
    return lines, done
