"""A tiny OpenAI-compatible chat-completions stub: a realistic reply, streamed or whole.

`POST /v1/chat/completions` answers the same reply to everything. With `"stream": true` it sends
SSE chunks (`data: {"choices": [{"delta": {"content": ...}}]}`, then `data: [DONE]`): the first
token after `ttft_s`, then one token every `1 / tokens_per_s`. Without, it answers the whole
message once the last token would have been generated. Tokens are cut the way OpenAI's are: words
with their leading space, punctuation on its own (`" that"`, `"."`, `" Your"`).

Every request is recorded with the monotonic times (same clock as the simulator's, on Linux) of
its arrival, first token, the token that completed the first sentence, and the last token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from dataclasses import dataclass

from aiohttp import web

REPLY = (
    "Sure, I can help with that. Your balance is one thousand two hundred dollars. "
    "Is there anything else I can do for you today?"
)


def tokens(text: str) -> list[str]:
    """Words with their leading space, punctuation marks on their own."""
    return re.findall(r"\s?\w+|\s?[^\w\s]", text)


def first_sentence_tokens(toks: list[str]) -> int:
    """How many tokens up to and including the first sentence-ending mark."""
    for i, tok in enumerate(toks):
        if tok.strip() in (".", "!", "?"):
            return i + 1
    return len(toks)


@dataclass
class Served:
    """One completion request, timed."""

    stream: bool
    t_request: float
    t_first_token: float = 0.0
    t_first_sentence: float = 0.0
    t_done: float = 0.0


class LlmStub:
    """The stub server (aiohttp, loopback, port 0)."""

    def __init__(
        self, *, ttft_s: float = 0.3, tokens_per_s: float = 30.0, reply: str = REPLY
    ) -> None:
        self.ttft_s = ttft_s
        self.tokens_per_s = tokens_per_s
        self.reply = reply
        self.toks = tokens(reply)
        self.first_sentence = first_sentence_tokens(self.toks)
        self.served: list[Served] = []
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._completions)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = int(self._runner.addresses[0][1])
        self.url = f"http://127.0.0.1:{port}/v1/chat/completions"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        rec = Served(stream=False, t_request=time.monotonic())
        body = await request.json()
        rec.stream = bool(body.get("stream"))
        self.served.append(rec)
        step = 1.0 / self.tokens_per_s
        if not rec.stream:
            await asyncio.sleep(self.ttft_s + step * (len(self.toks) - 1))
            rec.t_first_token = rec.t_first_sentence = rec.t_done = time.monotonic()
            return web.json_response(
                {
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": self.reply},
                            "finish_reason": "stop",
                        }
                    ],
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):  # the client left (a barge-in): fine
            await self._stream(resp, rec, step)
        return resp

    async def _stream(self, resp: web.StreamResponse, rec: Served, step: float) -> None:
        start = rec.t_request + self.ttft_s
        for i, tok in enumerate(self.toks):
            delay = start + i * step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": tok}}],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            now = time.monotonic()
            if i == 0:
                rec.t_first_token = now
            if i + 1 == self.first_sentence:
                rec.t_first_sentence = now
        rec.t_done = time.monotonic()
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()
