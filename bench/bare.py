"""The stack alone: what websockets in, aiohttp out and asyncio cost at the bench's load.

The least an agent on agentd's stack can do per turn: one WebSocket (`websockets`) subscribed
to the customer's events, one `aiohttp` session, and for each caller's final transcript one
`/say` of "You said: <text>." (agentd's `echo` reply). A call is answered as agentd answers it
(a transcribe, a speaking session, the greeting) and both sessions are stopped at hangup.
Nothing else: no log line, no store, no state machine, no dedupe, no timer, no retry, no
barge-in. The garbage collector is tuned as `agentd run` tunes it, and each WebSocket message
is handled where websockets parses it, as agentd does (`agentd.stream.DirectConnection`): the
comparison is of the work, not of GC settings or of how frames are read. The bench runs it
beside agentd on the section-1 loads so the report can tell the stack's share of agentd's CPU
from agentd's own. Not an agent anyone should run.

    python -m bench.bare API_URL WS_URL ACCESSKEY

It prints "ready" once it has sent its subscription; VoIPBIN binds the topics a moment later
(bench.procs.start_bare waits for that).
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Coroutine
from typing import Any

import aiohttp
import orjson
import websockets
from websockets.typing import BytesLike

from agentd.cli import tune_gc
from agentd.stream import DirectConnection
from bench.baseline.agent import GREETING

_STATUS_EVENTS = {"progressing": "answered", "hangup": "hangup"}


def topics(customer_id: str) -> list[str]:
    """agentd's subscription (agentd.stream.topics; a test keeps the two the same)."""
    return [
        f"customer_id:{customer_id}:call:call_",
        f"customer_id:{customer_id}:transcript:transcript_created",
        f"customer_id:{customer_id}:transcribe:transcribe_",
    ]


def kind_of(frame: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """("transcript" | "answered" | "hangup" | None, the resource): VoIPBIN sends resources
    unwrapped, told apart by their fields. agentd.events does it with every check (event type
    hints, chained legs, group calls); the bench's frames need none of them: a speech event
    (an interim) carries `streaming_id`, a final transcript does not."""
    if isinstance(frame.get("data"), dict):  # the documented wrapper, should it come
        frame = frame["data"]
    if "transcribe_id" in frame and "message" in frame and "streaming_id" not in frame:
        return "transcript", frame
    if "destination" in frame and "status" in frame:
        return _STATUS_EVENTS.get(str(frame["status"])), frame
    return None, frame


async def run(api: str, ws_url: str, accesskey: str) -> None:
    """Serve every call of the customer until cancelled."""
    auth = {"Cookie": f"accesskey={accesskey}"}
    tasks: set[asyncio.Task[Any]] = set()
    sessions: dict[str, tuple[str, str]] = {}  # call id -> (transcribe id, speaking id)
    by_transcribe: dict[str, str] = {}
    answered: set[str] = set()

    def spawn(coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    async with aiohttp.ClientSession(headers=auth, cookie_jar=aiohttp.DummyCookieJar()) as http:

        async def rest(method: str, path: str, body: dict[str, Any] | None = None) -> Any:
            async with http.request(method, api + path, json=body) as resp:
                return await resp.json(content_type=None)

        async def answer(call_id: str) -> None:
            ref = {"reference_type": "call", "reference_id": call_id, "language": "en-US"}
            trn = await rest("POST", "/transcribes", {**ref, "direction": "in"})
            spk = await rest(
                "POST", "/speakings", {**ref, "provider": "elevenlabs", "direction": "out"}
            )
            sessions[call_id] = (trn["id"], spk["id"])
            by_transcribe[trn["id"]] = call_id
            await rest("POST", f"/speakings/{spk['id']}/say", {"text": GREETING})

        async def reply(speaking_id: str, text: str) -> None:
            await rest("POST", f"/speakings/{speaking_id}/say", {"text": f"You said: {text}."})

        async def hang_up(call_id: str) -> None:
            transcribe_id, speaking_id = sessions.pop(call_id, ("", ""))
            if speaking_id:
                await rest("POST", f"/speakings/{speaking_id}/stop")
                await rest("POST", f"/transcribes/{transcribe_id}/stop")

        customer = (await rest("GET", "/customer"))["id"]

        def on_message(raw: BytesLike, _text: bool) -> None:
            kind, obj = kind_of(orjson.loads(raw))
            if kind == "transcript" and obj.get("direction") == "in":
                call_id = by_transcribe.get(str(obj.get("transcribe_id")))
                if call_id in sessions:
                    text = str(obj.get("message", "")).rstrip(".!? ")
                    spawn(reply(sessions[call_id][1], text))
            elif kind == "answered" and obj["id"] not in answered:
                answered.add(obj["id"])
                spawn(answer(obj["id"]))
            elif kind == "hangup":
                spawn(hang_up(obj["id"]))

        async with websockets.connect(
            ws_url,
            additional_headers=auth,
            max_queue=None,
            compression=None,
            create_connection=DirectConnection,
        ) as ws:
            assert isinstance(ws, DirectConnection)
            ws.on_message = on_message
            subscribe = {"type": "subscribe", "topics": topics(customer)}
            await ws.send(orjson.dumps(subscribe).decode())
            print("ready", flush=True)
            await ws.wait_closed()


def main() -> None:
    api, ws_url, accesskey = sys.argv[1:4]
    tune_gc()
    asyncio.run(run(api, ws_url, accesskey))


if __name__ == "__main__":
    main()
