"""CPU a streamed token costs agentd: `python -m bench.tokens [--tokens N] [--runs R] [--apart]`.

An OpenAI-compatible server in another process streams `--tokens` chat completion chunks; this
process reads them with the `openai` backend through `stream_reply` (sentence splitting and the
reply's bookkeeping included, its sentences fed to a no-op), and prints its own CPU time per
token for each run. By default the server writes 50 events at a time (a fast model behind a
proxy that buffers); `--apart` writes each on its own, 0.2 ms apart (one network read a token:
then the wake-up dominates). See bench/PROFILE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from asyncio.subprocess import PIPE

from agentd import reply as reply_module
from agentd.backends.openai import OpenAIBackend
from agentd.commands import AskBackend
from agentd.reply import stream_reply

SERVER = r"""
import asyncio, json, sys
from aiohttp import web

count, apart = int(sys.argv[1]), sys.argv[2] == "1"
words = "Sure thing, your balance is forty two dollars.".split(" ")


def event(i):
    delta = {"content": words[i % len(words)] + " "}
    chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
             "choices": [{"index": 0, "delta": delta, "finish_reason": None}]}
    return b"data: " + json.dumps(chunk).encode() + b"\n\n"


async def chat(request):
    await request.read()
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await resp.prepare(request)
    events = [event(i) for i in range(count)] + [b"data: [DONE]\n\n"]
    step = 1 if apart else 50
    for i in range(0, len(events), step):
        await resp.write(b"".join(events[i : i + step]))
        if apart:
            await asyncio.sleep(0.0002)
    return resp


async def main():
    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()


asyncio.run(main())
"""


async def measure(tokens: int, runs: int, apart: bool) -> list[float]:
    """µs of this process's CPU per token, one figure per run (the first run warms up)."""
    server = await asyncio.create_subprocess_exec(
        sys.executable, "-c", SERVER, str(tokens), "1" if apart else "0", stdout=PIPE
    )
    try:
        assert server.stdout is not None
        port = int(await server.stdout.readline())
        backend = OpenAIBackend(
            base_url=f"http://127.0.0.1:{port}/v1",
            model="m",
            api_key=None,
            temperature=0.0,
            max_tokens=tokens,
            tools=False,
            timeout_s=10.0,
            usage=False,
        )
        reply_module.MAX_REPLY_CHARS = 1 << 30  # the whole stream, not four minutes of it
        ask = AskBackend("bench", 1, (("user", "what is my balance"),))
        out = []
        for _ in range(runs + 1):
            start = time.process_time()
            await stream_reply(backend, ask, lambda _: None, clock=time.monotonic, timeout_s=10)
            out.append((time.process_time() - start) / tokens * 1e6)
        await backend.aclose()
        return out[1:]
    finally:
        server.kill()
        await server.wait()


def main() -> None:
    """Parse the options, run, print."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=3000)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--apart", action="store_true", help="one network write a token")
    args = parser.parse_args()
    figures = asyncio.run(measure(args.tokens, args.runs, args.apart))
    shown = ", ".join(f"{f:.2f}" for f in figures)
    print(f"µs of CPU a token, per run: {shown} (median {sorted(figures)[len(figures) // 2]:.2f})")


if __name__ == "__main__":
    main()
