"""A tiny OpenAI-compatible chat-completions stub: a realistic reply, streamed or whole.

`POST /v1/chat/completions` answers the same reply to everything. With `"stream": true` it sends
SSE chunks (`data: {"choices": [{"delta": {"content": ...}}]}`, then `data: [DONE]`): the first
token after `ttft_s`, then one token every `1 / tokens_per_s`. Without, it answers the whole
message once the last token would have been generated. Tokens are cut the way OpenAI's are: words
with their leading space, punctuation on its own (`" that"`, `"."`, `" Your"`).

Every request is recorded with the monotonic times (same clock as the simulator's, on Linux) of
its arrival, first token, the token that completed the first sentence, and the last token; with
how many tokens it streamed, whether the client left before the end (a cancelled request), and
the last user message it was asked with.

A reply may hold the placeholder `{n}`: each request gets the reply with `{n}` replaced by its
number (1, 2, ..., three digits, one token), so a spoken line tells which request it came from.
"""

from __future__ import annotations

import asyncio
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
    n: int = 0  # 1 for the stub's first request
    text: str = ""  # the reply it was given
    tokens_sent: int = 0
    cancelled: bool = False  # the client went away before the last token
    t_cancel: float = 0.0  # when the stub noticed (at most one token interval late)
    last_user: str = ""  # the last user message of the request


class LlmStub:
    """The stub server (aiohttp, loopback, port 0)."""

    def __init__(
        self, *, ttft_s: float = 0.3, tokens_per_s: float = 30.0, reply: str = REPLY
    ) -> None:
        self.ttft_s = ttft_s
        self.tokens_per_s = tokens_per_s
        self.reply = reply
        self.toks = tokens(self.reply_for(0))
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

    def reply_for(self, n: int) -> str:
        """The reply request `n` gets (`{n}` replaced by its number)."""
        return self.reply.replace("{n}", f"{n:03d}")

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        rec = Served(stream=False, t_request=time.monotonic(), n=len(self.served) + 1)
        rec.text = self.reply_for(rec.n)
        body = await request.json()
        rec.stream = bool(body.get("stream"))
        rec.last_user = _last_user(body)
        self.served.append(rec)
        step = 1.0 / self.tokens_per_s
        toks = tokens(rec.text)
        if not rec.stream:
            try:
                await asyncio.sleep(self.ttft_s + step * (len(toks) - 1))
            except asyncio.CancelledError:
                rec.cancelled, rec.t_cancel = True, time.monotonic()
                raise
            rec.t_first_token = rec.t_first_sentence = rec.t_done = time.monotonic()
            rec.tokens_sent = len(toks)
            return web.json_response(
                {
                    "object": "chat.completion",
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": rec.text},
                            "finish_reason": "stop",
                        }
                    ],
                }
            )
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        try:
            await self._stream(resp, rec, step, toks)
        except ConnectionError:  # the client left (a barge-in, a superseded request): fine
            rec.cancelled, rec.t_cancel = True, time.monotonic()
        except asyncio.CancelledError:
            rec.cancelled, rec.t_cancel = True, time.monotonic()
            raise
        return resp

    async def _stream(
        self, resp: web.StreamResponse, rec: Served, step: float, toks: list[str]
    ) -> None:
        start = rec.t_request + self.ttft_s
        first_sentence = first_sentence_tokens(toks)
        for i, tok in enumerate(toks):
            delay = start + i * step - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            chunk = {
                "object": "chat.completion.chunk",
                "choices": [{"index": 0, "delta": {"content": tok}}],
            }
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
            rec.tokens_sent += 1
            now = time.monotonic()
            if i == 0:
                rec.t_first_token = now
            if i + 1 == first_sentence:
                rec.t_first_sentence = now
        rec.t_done = time.monotonic()
        await resp.write(b"data: [DONE]\n\n")
        await resp.write_eof()


def _last_user(body: object) -> str:
    """The content of the request's last user message ("" if none)."""
    messages = body.get("messages") if isinstance(body, dict) else None
    if not isinstance(messages, list):
        return ""
    for m in reversed(messages):
        if isinstance(m, dict) and m.get("role") == "user" and isinstance(m.get("content"), str):
            return str(m["content"])
    return ""
