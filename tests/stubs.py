"""Stub backends for the tests: real aiohttp servers on 127.0.0.1, port 0.

`OpenAIStub` speaks the Chat Completions streaming API the way OpenAI does (a role chunk, one
chunk per token, tool calls in fragments, `data: [DONE]`), paced by a scripted time to first token
and tokens per second. `HttpStub` answers as a user's own service would: JSON, SSE or NDJSON.
Both record every request and every stream, and a stream knows whether its client went away
before the end (`closed_early`): the handler is cancelled when the client disconnects
(`handler_cancellation=True`), and a write to a closed connection fails.

The `py_*` functions at the bottom are targets for the `python` kind (`tests.stubs:py_whole`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import re
import time
from collections import deque
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web

from agentd.backends import ToolCall
from agentd.commands import Message


@dataclass
class Seen:
    """One request as a stub received it."""

    t: float  # time.monotonic(), like the simulator's request log
    headers: dict[str, str]
    body: Any
    query: dict[str, str] = field(default_factory=dict)

    @property
    def messages(self) -> list[dict[str, Any]]:
        """The `messages` (OpenAI) or `history` (http kind) of the request."""
        if not isinstance(self.body, dict):
            return []
        return list(self.body.get("messages") or self.body.get("history") or [])


@dataclass
class Stream:
    """One streamed response, as the stub saw it go out."""

    request: Seen
    planned: int  # how many events the script has
    sent: int = 0  # how many were written
    finished_at: float | None = None  # after the last event, before the end of the body
    closed_early: asyncio.Event = field(default_factory=asyncio.Event)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the handler ended, either way


def tokens(text: str) -> list[str]:
    """Split like a tokenizer would for the purpose of a test: words with their leading space."""
    return re.findall(r"\s*\S+", text)


class StubServer:
    """An aiohttp app on 127.0.0.1:0 that can pace a stream and tell when its client left."""

    def __init__(self) -> None:
        self.app = web.Application()
        self.requests: list[Seen] = []
        self.streams: list[Stream] = []
        self._runner: web.AppRunner | None = None
        self._handlers: set[asyncio.Task[Any]] = set()
        self.port = 0

    @property
    def url(self) -> str:
        """http://127.0.0.1:<port>"""
        return f"http://127.0.0.1:{self.port}"

    async def __aenter__(self) -> StubServer:
        # handler_cancellation: a client that disconnects cancels the handler, which is how a
        # stream learns at once that it was closed early (aiohttp's default since 3.9 is off)
        self._runner = web.AppRunner(self.app, handler_cancellation=True, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in list(self._handlers):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _seen(self, request: web.Request) -> Seen:
        raw = await request.read()
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = raw.decode(errors="replace")
        seen = Seen(time.monotonic(), dict(request.headers), body, dict(request.query))
        self.requests.append(seen)
        return seen

    async def _stream(
        self,
        request: web.Request,
        seen: Seen,
        content_type: str,
        events: Sequence[bytes],
        *,
        first_s: float,
        per_s: float,
    ) -> web.StreamResponse:
        """Write `events` one by one: `first_s` before the first, then `per_s` per second."""
        stream = Stream(seen, planned=len(events))
        self.streams.append(stream)
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        resp = web.StreamResponse(headers={"Content-Type": content_type})
        try:
            await resp.prepare(request)
            if first_s > 0:
                await asyncio.sleep(first_s)  # the model thinking: simulated latency
            for i, event in enumerate(events):
                if i and per_s > 0:
                    await asyncio.sleep(1 / per_s)
                await resp.write(event)
                stream.sent += 1
            stream.finished_at = time.monotonic()
            await resp.write_eof()
        except ConnectionResetError:
            stream.closed_early.set()  # the write found the connection gone
        except asyncio.CancelledError:
            stream.closed_early.set()  # the client disconnected while we waited
            raise
        finally:
            stream.done.set()
            self._handlers.discard(task)
        return resp


# ---- OpenAI-compatible --------------------------------------------------------------------------


@dataclass
class Script:
    """One scripted Chat Completions reply."""

    text: str = ""
    tool_calls: Sequence[tuple[str, dict[str, Any]]] = ()
    status: int = 200  # not 2xx: an OpenAI-style error object with `error_message`
    error_message: str = "The server had an error while processing your request."
    error_type: str = "server_error"  # the error object's `type` and `code` (OpenAI's
    error_code: str | None = None  # out-of-credit 429: both "insufficient_quota")
    headers: Mapping[str, str] = field(default_factory=dict)  # of the error (`Retry-After`)
    first_token_s: float = 0.0
    tokens_per_s: float = 0.0  # 0: as fast as possible
    crlf: bool = False  # end lines with \r\n, as some proxies do
    raw: Sequence[str] | None = None  # send these lines verbatim instead (malformed streams)
    whole: bool = False  # answer one JSON completion, as a server that ignores `stream` does
    finish: str = ""  # the finish_reason sent ("length", "content_filter"); "" for the usual one
    parts: Sequence[dict[str, Any]] | None = None  # `whole`: the content as a list of parts


class OpenAIStub(StubServer):
    """`POST /v1/chat/completions`, streamed. Scripts are used in order, then `default`."""

    def __init__(self, default: Script | None = None) -> None:
        super().__init__()
        self.default = default or Script("Hello from the stub.")
        self.scripts: deque[Script] = deque()
        self.app.router.add_post("/v1/chat/completions", self._chat)

    async def __aenter__(self) -> OpenAIStub:
        await super().__aenter__()
        return self

    @property
    def base_url(self) -> str:
        """What `backend.base_url` should be."""
        return f"{self.url}/v1"

    def script(self, *scripts: Script) -> None:
        """Queue replies for the next requests."""
        self.scripts.extend(scripts)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        seen = await self._seen(request)
        script = self.scripts.popleft() if self.scripts else self.default
        if not 200 <= script.status < 300:
            error = {
                "message": script.error_message,
                "type": script.error_type,
                "param": None,
                "code": script.error_code,
            }
            return web.json_response(
                {"error": error}, status=script.status, headers=dict(script.headers)
            )
        if script.whole:
            content = list(script.parts) if script.parts is not None else script.text or None
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if script.tool_calls:
                message["tool_calls"] = [
                    {
                        "id": f"call_{i}",
                        "type": "function",
                        "function": {"name": name, "arguments": json.dumps(args)},
                    }
                    for i, (name, args) in enumerate(script.tool_calls)
                ]
            choice = {"index": 0, "message": message, "finish_reason": script.finish or "stop"}
            whole = {
                "object": "chat.completion",
                "choices": [choice],
                "usage": usage_of(seen.body, script),
            }
            return web.json_response(whole)
        eol = "\r\n" if script.crlf else "\n"
        if script.raw is not None:
            events = [line.encode() for line in script.raw]
        else:
            model = seen.body.get("model", "") if isinstance(seen.body, dict) else ""
            chunks = completion_chunks(model, script)
            options = seen.body.get("stream_options") if isinstance(seen.body, dict) else None
            if isinstance(options, dict) and options.get("include_usage"):
                # as OpenAI does: one more chunk, with no choices, after the last
                usage = usage_of(seen.body, script)
                chunks.append({"object": "chat.completion.chunk", "choices": [], "usage": usage})
            events = [f"data: {json.dumps(chunk)}{eol}{eol}".encode() for chunk in chunks]
            events.insert(0, f": keepalive{eol}{eol}".encode())  # a comment, as proxies send
            events.append(f"data: [DONE]{eol}{eol}".encode())
        return await self._stream(
            request,
            seen,
            "text/event-stream",
            events,
            first_s=script.first_token_s,
            per_s=script.tokens_per_s,
        )


def usage_of(body: Any, script: Script) -> dict[str, int]:
    """The stub's token counts: a word a prompt token, `tokens()` of the reply."""
    messages = body.get("messages", []) if isinstance(body, dict) else []
    prompt = sum(len(str(m.get("content", "")).split()) for m in messages)
    return {"prompt_tokens": prompt, "completion_tokens": len(tokens(script.text))}


def completion_chunks(model: str, script: Script) -> list[dict[str, Any]]:
    """The `chat.completion.chunk` objects OpenAI would stream for `script`."""

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return {
            "id": "chatcmpl-stub",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
        }

    out = [chunk({"role": "assistant", "content": ""})]
    out += [chunk({"content": tok}) for tok in tokens(script.text)]
    for index, (name, args) in enumerate(script.tool_calls):
        # like OpenAI: the id and name first with empty arguments, then the JSON in pieces
        first = {"index": index, "id": f"call_{index}", "type": "function"}
        out.append(chunk({"tool_calls": [{**first, "function": {"name": name, "arguments": ""}}]}))
        text = json.dumps(args)
        for i in range(0, len(text), 4):
            piece = {"index": index, "function": {"arguments": text[i : i + 4]}}
            out.append(chunk({"tool_calls": [piece]}))
    out.append(chunk({}, script.finish or ("tool_calls" if script.tool_calls else "stop")))
    return out


# ---- the http kind ------------------------------------------------------------------------------


@dataclass
class HttpReply:
    """One scripted answer of a user's HTTP service."""

    kind: Literal["json", "sse", "ndjson", "text"] = "json"
    parts: Sequence[Any] = ()  # json: [object]; sse: str or dict events; ndjson: dicts
    status: int = 200
    first_s: float = 0.0
    per_s: float = 0.0
    headers: Mapping[str, str] = field(default_factory=dict)  # of a json or text answer


class HttpStub(StubServer):
    """`POST /reply` (the `backend.url`). Replies are used in order, then `default`."""

    def __init__(self, default: HttpReply | None = None) -> None:
        super().__init__()
        self.default = default or HttpReply("json", [{"text": "Hello from the service."}])
        self.replies: deque[HttpReply] = deque()
        self.app.router.add_post("/reply", self._reply)

    async def __aenter__(self) -> HttpStub:
        await super().__aenter__()
        return self

    @property
    def reply_url(self) -> str:
        """What `backend.url` should be."""
        return f"{self.url}/reply"

    def script(self, *replies: HttpReply) -> None:
        """Queue answers for the next requests."""
        self.replies.extend(replies)

    async def _reply(self, request: web.Request) -> web.StreamResponse:
        seen = await self._seen(request)
        reply = self.replies.popleft() if self.replies else self.default
        if reply.kind == "json":
            body = reply.parts[0] if reply.parts else {}
            return web.json_response(body, status=reply.status, headers=dict(reply.headers))
        if reply.kind == "text":
            text = "".join(reply.parts)
            return web.Response(text=text, status=reply.status, headers=dict(reply.headers))
        if reply.kind == "sse":
            events = [
                f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n".encode()
                for p in reply.parts
            ]
            ctype = "text/event-stream"
        else:
            events = [(json.dumps(p) + "\n").encode() for p in reply.parts]
            ctype = "application/x-ndjson"
        return await self._stream(
            request, seen, ctype, events, first_s=reply.first_s, per_s=reply.per_s
        )


# ---- the python kind ----------------------------------------------------------------------------

PY_CLOSED: list[str] = []  # call ids whose generator was closed (its `finally` ran)
not_callable = 42


async def py_whole(call_id: str, history: list[Message]) -> str:
    """An async function: the whole reply at once."""
    return f"Python heard: {history[-1][1]}. It has {len(history)} messages."


async def py_nothing(call_id: str, history: list[Message]) -> None:
    """An async function with nothing to say."""


async def py_stream(call_id: str, history: list[Message]) -> AsyncIterator[str | ToolCall]:
    """An async generator: text in pieces, then a tool call."""
    for piece in ("Thanks for ", "calling. ", "Goodbye!"):
        yield piece
    yield ToolCall("end_call")


async def py_endless(call_id: str, history: list[Message]) -> AsyncIterator[str]:
    """A generator that never ends by itself; records being closed."""
    try:
        yield "One moment. "
        await asyncio.Event().wait()
        yield "never"
    finally:
        PY_CLOSED.append(call_id)


async def py_bad_chunk(call_id: str, history: list[Message]) -> AsyncIterator[Any]:
    """Yields something that is not text."""
    yield 42


def py_sync(call_id: str, history: list[Message]) -> str:
    """Not async: refused when agentd starts."""
    return "sync"


# not a plain function, so let through at start; what it returns is refused at the first reply
py_sync_partial = functools.partial(py_sync)


class PyAsyncCallable:
    """An object whose __call__ is async: accepted."""

    async def __call__(self, call_id: str, history: list[Message]) -> str:
        return "from an object"


class PySyncCallable:
    """An object whose __call__ is a plain method: refused when agentd starts."""

    def __call__(self, call_id: str, history: list[Message]) -> str:
        return "sync"


py_async_object = PyAsyncCallable()
py_sync_object = PySyncCallable()


async def py_raises(call_id: str, history: list[Message]) -> str:
    """Fails like a buggy user function."""
    raise RuntimeError("the knowledge base is down")


async def py_breaks_halfway(call_id: str, history: list[Message]) -> AsyncIterator[str]:
    """A generator that fails after a sentence and a half."""
    yield "We open at nine. "
    yield "We close"
    raise RuntimeError("the knowledge base is down")


async def py_blocks(call_id: str, history: list[Message]) -> str:
    """An async function that holds the event loop, as one calling `requests` does."""
    time.sleep(0.3)  # noqa: ASYNC251 (the mistake under test, not a wait)
    return "Done."


async def py_blocks_later(call_id: str, history: list[Message]) -> AsyncIterator[str]:
    """A generator whose second step holds the event loop."""
    yield "One. "
    await asyncio.sleep(0)
    time.sleep(0.3)  # noqa: ASYNC251 (the mistake under test)
    yield "Two."
