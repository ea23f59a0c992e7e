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

from agentd.events import is_real_time
from agentd.voipbin import ApiError, VoipbinClient, transcript_order

POLL_S = 1.0  # the pace when the budget is off (rate_per_s = 0): the limiter would not wait


async def follow(client: VoipbinClient, call_id: str) -> int:
    """Print status changes and transcripts of `call_id`; 0 if it was answered, 1 if not."""
    status = ""
    answered = False
    finished: set[str] = set()  # transcribes read after they were done: nothing more comes
    printed: set[str] = set()
    while True:
        try:
            call = await client.get_call(call_id)
        except ApiError as exc:
            print(f"agentd: cannot follow the call: {exc}", file=sys.stderr)
            return 1
        new = str(call.get("status", ""))
        # a short call can be answered and over between two polls: tm_progressing tells
        # (absent, null or the docs' 9999-01-01 "never" if it was not)
        answered = answered or new == "progressing" or is_real_time(call.get("tm_progressing"))
        if new != status:
            status = new
            extra = f" ({call.get('hangup_reason')})" if status == "hangup" else ""
            print(f"[{status}]{extra}", flush=True)
        transcribes = await _transcribes_to_read(client, call_id, finished) if answered else []
        for transcribe_id in transcribes:
            lines = [t async for t in client.transcripts(transcribe_id)]
            lines.sort(key=transcript_order)
            for t in lines:
                if t.get("id") not in printed:
                    printed.add(str(t.get("id")))
                    who = "callee" if t.get("direction") == "in" else "agent"  # we called
                    print(f"{who}: {t.get('message', '')}", flush=True)
        if status == "hangup":
            return 0 if answered else 1
        if client.limiter.rate <= 0:
            await asyncio.sleep(POLL_S)


async def _transcribes_to_read(
    client: VoipbinClient, call_id: str, finished: set[str]
) -> list[str]:
    """The call's transcribes (the daemon started them) whose transcripts may have grown,
    oldest first. Listed on every poll: the daemon replaces a call's transcribe (a quiet
    callee, a restart's stray one), and the callee's later words are on the new one. One that
    is done is read once more, then no longer (`finished`)."""
    body = await client.request(
        "GET", "/transcribes", params={"reference_type": "call", "reference_id": call_id}
    )
    items = body.get("result") if isinstance(body, dict) else None
    ids: list[str] = []
    for t in reversed(items or []):  # VoIPBIN lists the newest first
        if not isinstance(t, dict) or not isinstance(t.get("id"), str) or t["id"] in finished:
            continue
        ids.append(str(t["id"]))
        if t.get("status") == "done":
            finished.add(str(t["id"]))
    return ids
