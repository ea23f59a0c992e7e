"""The `http` backend: your own service (RAG, NLP, rules) behind one URL.

Request, `POST url` with an optional `Authorization: Bearer <api_key>`::

    {"call_id": "...", "text": "<the caller's last utterance>",
     "history": [{"role": "system" | "assistant" | "user", "content": "..."}, ...]}

The answer is chosen by its Content-Type:

* `application/json`: one object `{"text": "...", "action": ...}` (all keys optional);
* `text/event-stream`: each event's `data` is a text chunk, or a JSON object as above;
* `application/x-ndjson`: one JSON object as above per line.

`action` is `"end_call"` or `{"transfer": "+15551234567"}`; `{"tool": {"name", "arguments"}}`
is accepted too. Streamed text chunks are joined as they are, so they carry their own spaces.
"""

from __future__ import annotations

import codecs
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import aiohttp

from agentd.backends import Chunk, ToolCall, last_user_text
from agentd.backends.wire import (
    BackendError,
    Retry,
    bearer,
    decode_json,
    iter_lines,
    iter_sse,
    new_session,
    post_stream,
    read_body,
)
from agentd.commands import Message
from agentd.secret import Secret, display_url, redact

_KIND = "http"
# refused before any work was done, so safe to send again; a 500 or a gateway's 502/504 may come
# after the service acted on the turn (logged it, booked something), and is said as it is
_RETRY = Retry(frozenset({429, 503}))
_NDJSON = frozenset(
    {"application/x-ndjson", "application/ndjson", "application/jsonl", "application/json-lines"}
)


class HttpBackend:
    """Asks `url` for each reply and streams back what it answers."""

    def __init__(self, *, url: str, api_key: Secret | None, timeout_s: float) -> None:
        self.url = url
        self._api_key = api_key
        self.timeout_s = timeout_s
        self._http: aiohttp.ClientSession | None = None

    def __repr__(self) -> str:
        return f"HttpBackend(url={display_url(self.url)!r})"

    def _session(self) -> aiohttp.ClientSession:
        if self._http is None or self._http.closed:
            self._http = new_session(self.timeout_s)
        return self._http

    @staticmethod
    def request_body(call_id: str, history: Sequence[Message]) -> dict[str, Any]:
        """What the service receives for one turn."""
        return {
            "call_id": call_id,
            "text": last_user_text(history),
            "history": [{"role": role, "content": text} for role, text in history],
        }

    async def reply(self, call_id: str, history: Sequence[Message]) -> AsyncIterator[Chunk]:
        """Stream the service's reply, whichever of the three shapes it answers in."""
        async with post_stream(
            self._session(),
            self.url,
            body=self.request_body(call_id, history),
            headers={
                "Accept": "application/json, text/event-stream, application/x-ndjson",
                **bearer(self._api_key),
            },
            kind=_KIND,
            retry=_RETRY,
            budget_s=self.timeout_s,
        ) as resp:
            ctype = resp.content_type
            if ctype == "text/event-stream":
                async with contextlib.aclosing(iter_sse(resp.content)) as events:
                    async for data in events:
                        if data.strip() == "[DONE]":
                            break
                        for chunk in _from_event(data):
                            yield chunk
            elif ctype in _NDJSON:
                async with contextlib.aclosing(iter_lines(resp.content)) as lines:
                    async for line in lines:
                        if line.strip():
                            for chunk in _from_object(decode_json(line, _KIND, "NDJSON line")):
                                yield chunk
            elif ctype == "text/plain":
                # as it comes: its first sentence is said while the rest is read, and a reply
                # that runs on is closed at the reply's limit, not read to its end
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                async for piece in resp.content.iter_any():
                    if said := decoder.decode(piece):
                        yield said
                if said := decoder.decode(b"", final=True):
                    yield said
            else:
                raw = await read_body(resp, _KIND)
                obj = decode_json(raw.decode("utf-8", errors="replace"), _KIND, "JSON reply")
                for chunk in _from_object(obj):
                    yield chunk

    async def aclose(self) -> None:
        """Close the session and its pooled connections."""
        if self._http is not None:
            await self._http.close()
            self._http = None


def _from_event(data: str) -> list[Chunk]:
    """One SSE event: a JSON object or string when it looks like one, else plain text."""
    if data[:1] in ("{", '"'):
        try:
            obj = decode_json(data, _KIND, "event")
        except BackendError:
            return [data]  # text that happens to start with a brace or a quote
        if isinstance(obj, str):
            return [obj] if obj else []
        return _from_object(obj)
    return [data] if data else []


def _from_object(obj: Any) -> list[Chunk]:
    """`{"text", "action", "tool"}` as chunks; a wrong shape is the service's bug, reported."""
    if not isinstance(obj, dict):
        raise BackendError(f"{_KIND} backend: expected a JSON object, got {type(obj).__name__}")
    out: list[Chunk] = []
    text = obj.get("text")
    if not text and obj.get("action") is None and obj.get("tool") is None:
        err = obj.get("error")
        if err:
            # a service that says its failure with a 200: in its words, not as "empty reply"
            message = err.get("message") if isinstance(err, dict) else err
            said = " ".join(str(message or err).split())[:300]
            raise BackendError(redact(f"{_KIND} backend: error: {said}"))
    if text is not None:
        if not isinstance(text, str):
            raise BackendError(f"{_KIND} backend: 'text' must be a string")
        if text:
            out.append(text)
    if obj.get("action") is not None:
        out.append(_action(obj["action"]))
    tool = obj.get("tool")
    if tool is not None:
        if not (isinstance(tool, dict) and isinstance(tool.get("name"), str)):
            raise BackendError(f"{_KIND} backend: 'tool' must be {{'name', 'arguments'}}")
        args = tool.get("arguments") or {}
        if not isinstance(args, dict):
            raise BackendError(f"{_KIND} backend: 'tool.arguments' must be an object")
        out.append(ToolCall(tool["name"], args))
    return out


def _action(action: Any) -> ToolCall:
    """`"end_call"` or `{"transfer": "+1555..."}` as the tool call the executor understands.
    Other names pass through: the executor logs and ignores a tool it does not know."""
    if isinstance(action, str) and action:
        return ToolCall(action)
    if isinstance(action, dict) and len(action) == 1:
        ((name, value),) = action.items()
        if name == "transfer" and isinstance(value, str):
            return ToolCall("transfer", {"number": value})
        if isinstance(value, dict):
            return ToolCall(str(name), value)
    raise BackendError(
        f'{_KIND} backend: \'action\' must be "end_call" or {{"transfer": "+1555..."}}'
    )
