"""The `openai` backend: any OpenAI-compatible Chat Completions endpoint, streamed.

Works with OpenAI itself and with the servers that copy its API (Ollama, llama.cpp, vLLM, LM
Studio, LiteLLM, ...). The reply is requested with `stream: true` so the first sentence can be
spoken while the model is still writing the rest. Text deltas are yielded as they arrive; tool
calls arrive in fragments (a name, then the JSON arguments a few characters at a time) and are
yielded as whole `ToolCall`s once the stream ends.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp

from agentd import logs
from agentd.backends import Chunk, ToolCall, Usage, tools_for
from agentd.backends.wire import (
    BackendError,
    Retry,
    bearer,
    decode_json,
    iter_sse,
    new_session,
    post_stream,
    read_body,
    server_message,
)
from agentd.commands import Message
from agentd.secret import Secret, display_url, redact

log = logs.get_logger("agentd.backends.openai")

_KIND = "openai"
# as OpenAI's own SDKs: a rate limit, a conflict, a timeout and the 5xx are worth a second try
# (a completion has no side effect to repeat)
#: OpenAI's answer (a 429) for an account out of credit: no retry helps until someone pays
OUT_OF_CREDIT = "insufficient_quota"
_RETRY = Retry(
    frozenset({408, 409, 429, 500, 502, 503, 504}),
    resend_dropped=True,
    final_codes=frozenset({OUT_OF_CREDIT}),
)


@dataclass
class _PartialCall:
    """A tool call being assembled from streamed fragments."""

    name: str = ""
    id: str = ""
    arguments: list[str] = field(default_factory=list)
    decoded: dict[str, Any] | None = None  # some servers send the arguments already as an object

    def add(self, fragment: dict[str, Any]) -> None:
        """Merge one `delta.tool_calls[]` fragment."""
        if isinstance(fragment.get("id"), str) and not self.id:
            self.id = fragment["id"]
        function = fragment.get("function")
        if not isinstance(function, dict):
            return
        name = function.get("name")
        # OpenAI sends the name once; a server that repeats it in every fragment must not
        # produce "end_callend_call"
        if isinstance(name, str) and name and name != self.name:
            self.name += name
        args = function.get("arguments")
        if isinstance(args, str):
            self.arguments.append(args)
        elif isinstance(args, dict):
            self.decoded = args

    def finish(self) -> ToolCall:
        """The whole call. Arguments that are not a JSON object are dropped with a warning:
        the spoken part of the reply is still good, and the executor ignores a tool it cannot
        use."""
        if self.decoded is not None:
            return ToolCall(self.name, self.decoded)
        raw = "".join(self.arguments).strip()
        if not raw:
            return ToolCall(self.name, {})
        try:
            args = json.loads(raw)
        except ValueError:
            args = None
        if not isinstance(args, dict):
            # the arguments may hold the caller's details: log their size, not their content
            log.warning("backend.bad_tool_arguments", tool=self.name, length=len(raw))
            return ToolCall(self.name, {})
        return ToolCall(self.name, args)


class _ToolCalls:
    """Tool-call fragments keyed by their `index`.

    Servers that omit `index` (some compatibility layers send each call whole) get one: a
    fragment that brings an id or a name starts a new call, one without continues the last.
    """

    def __init__(self) -> None:
        self._calls: dict[int, _PartialCall] = {}

    def add(self, fragments: Any) -> None:
        """Merge a `delta.tool_calls` list."""
        if not isinstance(fragments, list):
            return
        for frag in fragments:
            if not isinstance(frag, dict):
                continue
            index = frag.get("index")
            if not isinstance(index, int) or isinstance(index, bool):
                function = frag.get("function")
                starts = bool(frag.get("id")) or (
                    isinstance(function, dict) and bool(function.get("name"))
                )
                last = max(self._calls, default=-1)
                index = last + 1 if starts or last < 0 else last
            self._calls.setdefault(index, _PartialCall()).add(frag)

    def finish(self) -> Iterator[ToolCall]:
        """The assembled calls, in index order; nameless fragments are dropped."""
        for index in sorted(self._calls):
            call = self._calls[index]
            if call.name:
                yield call.finish()


class _Thoughts:
    """Drops a reasoning model's `<think>...</think>` from the start of its reply.

    Servers with a reasoning parser send the thinking apart (`reasoning_content`, `reasoning`,
    never read here); without one (llama.cpp, vLLM, LM Studio serving qwen3 or a deepseek-r1
    distill) it comes as content, and the caller would hear the model think aloud. Only at the
    start, where those models put it: a reply that mentions the tag later is said as it is. The
    tags may be cut across chunks, so a chunk that could be their beginning is held back."""

    __slots__ = ("_held", "_state")
    # "start" (nothing said yet), "thinking", "after" (the thinking ended), "saying"

    _OPEN, _CLOSE = "<think>", "</think>"

    def __init__(self) -> None:
        self._state = "start"
        self._held = ""

    def said(self, chunk: str, *, end: bool = False) -> str:
        """What of `chunk` is to be said (`end`: the reply is over, let go of what is held)."""
        if self._state == "saying":
            return chunk
        text = self._held + chunk
        self._held = ""
        if self._state == "start":
            head = text.lstrip()
            if head.startswith(self._OPEN):
                self._state = "thinking"
                text = head[len(self._OPEN) :]
            elif self._OPEN.startswith(head) and not end:
                self._held = text  # blank, or "<thi": not decided yet
                return ""
            else:
                self._state = "saying"
                return text
        if self._state == "thinking":
            close = text.find(self._CLOSE)
            if close < 0:
                # the thinking is dropped; what could be the start of the closing tag is kept
                for n in range(min(len(self._CLOSE) - 1, len(text)), 0, -1):
                    if self._CLOSE.startswith(text[-n:]):
                        self._held = text[-n:]
                        break
                return ""
            self._state = "after"
            text = text[close + len(self._CLOSE) :]
        # the blank lines between the thinking and the answer are not a sentence of their own
        text = text.lstrip()
        if text:
            self._state = "saying"
        return text


class OpenAIBackend:
    """Streams replies from `POST {base_url}/chat/completions`."""

    def __init__(
        self,
        *,
        base_url: str,
        model: str,
        api_key: Secret | None,
        temperature: float,
        max_tokens: int,
        tools: bool,
        timeout_s: float,
        transfer_numbers: Sequence[str] = (),
        usage: bool = True,
    ) -> None:
        # a query (`?api-version=`) stays after the path: appended to the string, the path
        # went into the query
        parts = urlsplit(base_url)
        self.url = urlunsplit(parts._replace(path=parts.path.rstrip("/") + "/chat/completions"))
        self.model = model
        self._api_key = api_key
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.tools = tools_for(transfer_numbers) if tools else []
        self.timeout_s = timeout_s
        self.usage = usage
        self._http: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"OpenAIBackend(url={display_url(self.url)!r}, model={self.model!r})"

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = new_session(self.timeout_s)
        return self._http

    def request_body(self, history: Sequence[Message]) -> dict[str, Any]:
        """The Chat Completions request for `history` (system, assistant and user messages)."""
        body: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": role, "content": text} for role, text in history],
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "stream": True,
        }
        if self.tools:
            body["tools"] = self.tools
        if self.usage:
            # the last chunk then carries the reply's token counts (for the call report)
            body["stream_options"] = {"include_usage": True}
        return body

    async def reply(self, call_id: str, history: Sequence[Message]) -> AsyncIterator[Chunk]:
        """Stream the model's reply: text as it is generated, then any tool calls."""
        async with contextlib.AsyncExitStack() as stack:
            try:
                resp = await stack.enter_async_context(
                    post_stream(
                        self._session(),
                        self.url,
                        body=self.request_body(history),
                        headers={"Accept": "text/event-stream", **bearer(self._api_key)},
                        kind=_KIND,
                        retry=_RETRY,
                        budget_s=self.timeout_s,
                    )
                )
            except BackendError as exc:
                if exc.code == OUT_OF_CREDIT:
                    self._out_of_credit(call_id)
                raise
            calls = _ToolCalls()
            thoughts = _Thoughts()
            finish: object = None
            if resp.content_type == "text/html":
                raise await _web_page(resp)
            if resp.content_type == "application/json":
                # a server that ignores `stream: true` answers with one whole completion
                raw = await read_body(resp, _KIND)
                obj = decode_json(raw.decode("utf-8", errors="replace"), _KIND, "response")
                spent = _usage(obj) if self.usage else None
                choice = _first_choice(obj)
                finish = choice.get("finish_reason")
                message = choice.get("message")
                if isinstance(message, dict):
                    content = _text(message.get("content"))
                    if content and (said := thoughts.said(content)):
                        yield said
                    calls.add(message.get("tool_calls"))
                if spent is not None:
                    yield spent
            else:
                async with contextlib.aclosing(iter_sse(resp.content)) as events:
                    async for data in events:
                        if data.strip() == "[DONE]":
                            break
                        obj = decode_json(data, _KIND, "stream event")
                        spent = _usage(obj) if self.usage else None
                        if spent is not None:
                            yield spent  # the final chunk (`include_usage`), with no choices
                        choice = _first_choice(obj)
                        finish = choice.get("finish_reason") or finish
                        delta = choice.get("delta")
                        if not isinstance(delta, dict):
                            continue
                        content = _text(delta.get("content"))
                        if content and (said := thoughts.said(content)):
                            yield said
                        calls.add(delta.get("tool_calls"))
            if said := thoughts.said("", end=True):
                yield said
            self._unfinished(call_id, finish)
            for call in calls.finish():
                yield call

    def _out_of_credit(self, call_id: str) -> None:
        """Every turn gets the fallback line until someone acts: said at error, not retried."""
        log.error(
            "backend.out_of_credit",
            call_id=call_id,
            url=display_url(self.url),
            hint="the account of backend.api_key has no credit left (429 insufficient_quota): "
            "add credit or raise its limit, or set another backend.api_key; until then every "
            "turn gets the fallback line",
        )

    def _unfinished(self, call_id: str, finish: object) -> None:
        """Say why a reply ended early: its last sentence is cut off, or it is empty."""
        if finish == "length":
            log.warning(
                "backend.truncated",
                call_id=call_id,
                max_tokens=self.max_tokens,
                hint="the reply reached backend.max_tokens and was cut: raise it, or ask the "
                "model for shorter replies in the system prompt",
            )
        elif finish == "content_filter":
            log.warning(
                "backend.filtered",
                call_id=call_id,
                hint="the model's content filter stopped the reply",
            )

    async def aclose(self) -> None:
        """Close the session and its pooled connections."""
        if self._http is not None:
            await self._http.close()
            self._http = None


_TITLE = re.compile(rb"<title[^>]*>(.*?)</title", re.IGNORECASE | re.DOTALL)


async def _web_page(resp: aiohttp.ClientResponse) -> BackendError:
    """An HTML page answered with a 200: `base_url` is a web UI's port (Open WebUI, LM
    Studio's), a proxy's login page or an app's catch-all, not the API. Its SSE parse would find
    no `data:` line, and the turn would fail as an "empty reply" with nothing to go on."""
    raw = b""
    with contextlib.suppress(aiohttp.ClientError, TimeoutError):
        raw = await resp.content.read(4096)
    title = _TITLE.search(raw)
    said = server_message(title.group(1) if title else raw)
    return BackendError(
        redact(
            f"{_KIND} backend: answered a web page (text/html), not a completion: is base_url "
            f"the API's address (often ending in /v1)? The page: {said!r}"
        )
    )


def _usage(obj: Any) -> Usage | None:
    """The `usage` of a completion or chunk, when it carries one."""
    usage = obj.get("usage") if isinstance(obj, dict) else None
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    return Usage(prompt, completion)


def _first_choice(obj: Any) -> dict[str, Any]:
    """`choices[0]` of a completion or chunk; an `{"error": ...}` object (sent mid-stream by
    OpenAI and vLLM when generation fails) is raised as a `BackendError`."""
    if not isinstance(obj, dict):
        raise BackendError(f"{_KIND} backend: expected a JSON object, got {type(obj).__name__}")
    err = obj.get("error")
    if err:
        message = err.get("message") if isinstance(err, dict) else err
        text = redact(" ".join(str(message).split()))[:300]  # cut after: a key cut is unknown
        raise BackendError(f"{_KIND} backend: error in stream: {text}")
    choices = obj.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0]
    return {}


def _text(content: object) -> str:
    """A message's or delta's `content` as text: a string, or the text of a list of parts.

    Mistral (its reasoning models, and others through the same API) sends content as parts,
    `[{"type": "thinking", ...}, {"type": "text", "text": "..."}]`: only the text parts are
    the reply; a thought, a reference or an image is never said."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        return ""
    texts = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") == "text":
            text = part.get("text")
            if isinstance(text, str):
                texts.append(text)
    return "".join(texts)
