"""Each backend kind against real stub servers on loopback (tests/stubs.py): request shape,
streaming, tool calls, errors, and that a credential never reaches an exception."""

from __future__ import annotations

import asyncio
import inspect
import json
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.base_protocol import BaseProtocol
from structlog.testing import capture_logs

from agentd.backends import Backend, Chunk, NoReply, ToolCall, Usage, tools_for, wire
from agentd.backends.http import HttpBackend
from agentd.backends.openai import OpenAIBackend
from agentd.backends.python import BackendConfigError, PythonBackend
from agentd.backends.wire import BackendError, iter_lines
from agentd.commands import (
    AskBackend,
    Message,
    ReplyDone,
    ReplyFailed,
    ReplySentence,
    Result,
)
from agentd.config import ConfigError, load
from agentd.daemon import make_backend
from agentd.reply import stream_reply
from agentd.secret import Secret
from tests import stubs
from tests.stubs import HttpReply, HttpStub, OpenAIStub, Script, tokens

HISTORY: tuple[Message, ...] = (
    ("system", "You are brief."),
    ("assistant", "Hello, how can I help?"),
    ("user", "What are your opening hours?"),
)
KEY = "sk-test-4f9c2a7b1e0d"


def openai(
    stub: OpenAIStub | str,
    *,
    key: str | None = None,
    tools: bool = True,
    timeout_s: float = 5.0,
    usage: bool = False,
) -> OpenAIBackend:
    return OpenAIBackend(
        base_url=stub if isinstance(stub, str) else stub.base_url,
        model="test-model",
        api_key=Secret(key) if key else None,
        temperature=0.2,
        max_tokens=123,
        tools=tools,
        timeout_s=timeout_s,
        usage=usage,
    )


async def collect(backend: Backend, history: tuple[Message, ...] = HISTORY) -> list[Chunk]:
    try:
        return [chunk async for chunk in backend.reply("call-1", history)]
    finally:
        await backend.aclose()


def text_of(chunks: list[Chunk]) -> str:
    return "".join(c for c in chunks if isinstance(c, str))


def refused_url() -> str:
    """A loopback URL nothing listens on: bind a port, then free it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def first_chunk_then_cancel(backend: Backend) -> None:
    """Consume a reply in a task, cancel it after the first chunk, as a barge-in does."""
    got_one = asyncio.Event()

    async def consume() -> None:
        async for _ in backend.reply("call-1", HISTORY):
            got_one.set()

    task = asyncio.create_task(consume())
    await asyncio.wait_for(got_one.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


# ---- openai -------------------------------------------------------------------------------------


async def test_openai_request_has_model_messages_stream_tools_and_the_key(
    llm: OpenAIStub,
) -> None:
    await collect(openai(llm, key=KEY))
    [seen] = llm.requests
    assert seen.headers["Authorization"] == f"Bearer {KEY}"
    assert seen.body == {
        "model": "test-model",
        "messages": [{"role": r, "content": t} for r, t in HISTORY],
        "temperature": 0.2,
        "max_tokens": 123,
        "stream": True,
        "tools": tools_for(),
    }
    assert [t["function"]["name"] for t in seen.body["tools"]] == ["end_call"]


async def test_openai_base_url_with_a_query_keeps_it_after_the_path(llm: OpenAIStub) -> None:
    # `?api-version=` (Azure, some gateways): "/chat/completions" was appended to the query,
    # and the request went to `/v1` with a mangled version
    chunks = await collect(openai(f"{llm.base_url}/?api-version=2024-10-21", key=KEY))
    assert text_of(chunks) == "Hello from the stub."
    [seen] = llm.requests
    assert seen.query == {"api-version": "2024-10-21"}


def test_the_transfer_tool_is_offered_only_with_allowed_numbers_and_only_those() -> None:
    [_, transfer] = tools_for(["+15550009999"])
    assert transfer["function"]["name"] == "transfer"
    assert transfer["function"]["parameters"]["properties"]["number"]["enum"] == ["+15550009999"]


async def test_openai_without_a_key_sends_no_auth_header_and_without_tools_no_tools(
    llm: OpenAIStub,
) -> None:
    await collect(openai(llm, tools=False))
    [seen] = llm.requests
    assert "Authorization" not in seen.headers
    assert "tools" not in seen.body
    assert seen.body["stream"] is True


async def test_openai_text_is_yielded_while_the_server_still_streams(llm: OpenAIStub) -> None:
    text = "We open at nine. We close at five. On Sundays we are closed."
    llm.script(Script(text, tokens_per_s=50))
    backend = openai(llm)
    chunks: list[Chunk] = []
    finished_at_first_chunk: list[float | None] = []
    try:
        async for chunk in backend.reply("call-1", HISTORY):
            if not chunks:
                finished_at_first_chunk.append(llm.streams[0].finished_at)
            chunks.append(chunk)
    finally:
        await backend.aclose()
    assert finished_at_first_chunk == [None]  # the stub had not finished yet
    assert text_of(chunks) == text
    assert len(chunks) == len(stubs.tokens(text))  # one chunk per token, no buffering


async def test_openai_tool_calls_are_assembled_from_streamed_fragments(llm: OpenAIStub) -> None:
    llm.script(
        Script(
            "Transferring you now.",
            tool_calls=[("transfer", {"number": "+15557654321"}), ("end_call", {})],
        )
    )
    chunks = await collect(openai(llm))
    assert text_of(chunks) == "Transferring you now."
    assert chunks[-2:] == [
        ToolCall("transfer", {"number": "+15557654321"}),
        ToolCall("end_call", {}),
    ]
    # the arguments really came in pieces of four characters
    fragments = [
        c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"]
        for c in stubs.completion_chunks("m", Script(tool_calls=[("transfer", {"number": "+1"})]))
        if "tool_calls" in c["choices"][0]["delta"]
    ]
    assert fragments == ["", '{"nu', "mber", '": "', '+1"}']


async def test_openai_tool_calls_without_index_each_start_a_new_call(llm: OpenAIStub) -> None:
    def event(delta: dict[str, Any]) -> str:
        return f"data: {json.dumps({'choices': [{'index': 0, 'delta': delta}]})}\n\n"

    llm.script(
        Script(
            raw=[
                event({"content": "Bye."}),
                event({"tool_calls": [{"id": "a", "function": {"name": "end_call"}}]}),
                event(
                    {
                        "tool_calls": [
                            {"id": "b", "function": {"name": "transfer", "arguments": '{"num'}}
                        ]
                    }
                ),
                event({"tool_calls": [{"function": {"arguments": 'ber": "+1555"}'}}]}),
                "data: [DONE]\n\n",
            ]
        )
    )
    chunks = await collect(openai(llm))
    assert chunks == ["Bye.", ToolCall("end_call", {}), ToolCall("transfer", {"number": "+1555"})]


async def test_openai_tolerates_crlf_comments_and_a_missing_done(llm: OpenAIStub) -> None:
    llm.script(Script("Line endings do not matter.", crlf=True))
    assert text_of(await collect(openai(llm))) == "Line endings do not matter."
    llm.script(
        Script(
            raw=[
                ": ping\n\n",
                "event: message\n",
                'data: {"choices": [{"delta": {"content": "No done"}}]}\n\n',
                'data: {"choices": [], "usage": {"total_tokens": 3}}\n\n',
                'data: {"choices": [{"delta": {"content": " marker."}}]}',  # no blank line, EOF
            ]
        )
    )
    assert text_of(await collect(openai(llm))) == "No done marker."


async def test_openai_reports_the_tokens_a_reply_cost_when_asked(llm: OpenAIStub) -> None:
    llm.script(Script("Two words."))
    chunks = await collect(openai(llm, usage=True))
    assert llm.requests[0].body["stream_options"] == {"include_usage": True}
    assert text_of(chunks) == "Two words."
    # the stub counts a prompt token a word, and its reply's tokens
    assert chunks[-1] == Usage(input_tokens=13, output_tokens=len(tokens("Two words.")))
    # a server that answers one whole completion says it in the completion
    llm.script(Script("Whole.", whole=True))
    assert (await collect(openai(llm, usage=True)))[-1] == Usage(13, len(tokens("Whole.")))
    # not asked: not sent, and nothing reported
    llm.script(Script("Quiet."))
    chunks = await collect(openai(llm))
    assert "stream_options" not in llm.requests[2].body
    assert not any(isinstance(c, Usage) for c in chunks)


async def test_openai_a_reply_cut_by_max_tokens_or_a_filter_is_logged_with_a_hint(
    llm: OpenAIStub,
) -> None:
    # the operator hears a sentence cut off mid-word: the log says why and what to change
    llm.script(
        Script("We open at nine and close", finish="length"),
        Script("Partial", finish="length", whole=True),
        Script("", finish="content_filter"),
        Script("All is well."),
    )
    with capture_logs() as logs:
        replies = [text_of(await collect(openai(llm))) for _ in range(4)]
    assert replies == ["We open at nine and close", "Partial", "", "All is well."]
    warnings = [(e["event"], e["call_id"]) for e in logs if e["log_level"] == "warning"]
    assert warnings == [
        ("backend.truncated", "call-1"),
        ("backend.truncated", "call-1"),
        ("backend.filtered", "call-1"),
    ]
    truncated = next(e for e in logs if e["event"] == "backend.truncated")
    assert truncated["max_tokens"] == 123 and "backend.max_tokens" in truncated["hint"]


def _event(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def _delta(delta: Any) -> str:
    return _event({"choices": [{"index": 0, "delta": delta, "finish_reason": None}]})


async def test_openai_a_reasoning_models_thinking_is_never_said(llm: OpenAIStub) -> None:
    # qwen3 or deepseek-r1 on llama.cpp or vLLM without a reasoning parser stream their
    # thinking as content inside <think>: the caller heard the model think aloud. Servers that
    # do parse it send `reasoning_content` (vLLM, DeepSeek) or `reasoning` (Ollama, OpenRouter)
    llm.script(
        Script(
            raw=[
                _delta({"role": "assistant", "content": None}),
                _delta({"content": "<thi"}),  # the tag cut across two chunks
                _delta({"content": "nk>\nThe user asks about hours. "}),
                _delta({}),
                _event({"choices": []}),
                _delta({"content": "Say nine to five.</th"}),
                _delta({"content": "ink>\n\nWe open"}),
                _delta({"reasoning_content": "(a parsed thought)", "content": None}),
                _delta({"reasoning": "(an Ollama thought)", "content": ""}),
                _delta({"content": " at nine."}),
                "data: [DONE]\n\n",
            ]
        ),
        Script("<think>\nShort.\n</think>\n\nAll at once.", whole=True),
        # text that only mentions the tag later on is the reply, said as it is
        Script("Type <think> in the box."),
    )
    assert text_of(await collect(openai(llm))) == "We open at nine."
    assert text_of(await collect(openai(llm))) == "All at once."
    assert text_of(await collect(openai(llm))) == "Type <think> in the box."


async def test_openai_content_sent_as_parts_is_said_without_the_thinking(
    llm: OpenAIStub,
) -> None:
    # Mistral's API (magistral, and others behind it) sends `content` as a list of parts: the
    # thinking in its own part, the reply in "text" parts; it was dropped whole, and the
    # caller heard the fallback line
    thinking = {"type": "thinking", "thinking": [{"type": "text", "text": "They ask hours."}]}
    llm.script(
        Script(
            raw=[
                _delta({"role": "assistant", "content": [thinking]}),
                _delta({"content": [{"type": "text", "text": "We open"}]}),
                _delta({"content": " at nine."}),  # a plain string may follow
                _delta({"content": [{"type": "reference", "reference_ids": [1]}]}),
                "data: [DONE]\n\n",
            ]
        ),
        Script(parts=[thinking, {"type": "text", "text": "All at once."}], whole=True),
    )
    assert text_of(await collect(openai(llm))) == "We open at nine."
    assert text_of(await collect(openai(llm))) == "All at once."


async def test_openai_answer_that_is_not_streamed_is_accepted(llm: OpenAIStub) -> None:
    llm.script(Script("All at once.", tool_calls=[("end_call", {})], whole=True))
    assert await collect(openai(llm)) == ["All at once.", ToolCall("end_call", {})]


async def test_openai_malformed_tool_arguments_drop_the_arguments_not_the_reply(
    llm: OpenAIStub,
) -> None:
    llm.script(
        Script(
            raw=[
                'data: {"choices": [{"delta": {"content": "Okay."}}]}\n\n',
                'data: {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": '
                '{"name": "transfer", "arguments": "{\\"number\\": "}}]}}]}\n\n',
                "data: [DONE]\n\n",
            ]
        )
    )
    assert await collect(openai(llm)) == ["Okay.", ToolCall("transfer", {})]


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_openai_error_status_raises_with_status_and_server_message(
    llm: OpenAIStub, status: int
) -> None:
    llm.script(Script(status=status, error_message=f"Something is wrong ({status})."))
    with pytest.raises(BackendError) as info:
        await collect(openai(llm, key=KEY))
    assert str(info.value) == f"openai backend: HTTP {status}: Something is wrong ({status})."
    assert len(llm.requests) == 1  # a wrong request is not sent again


def test_an_error_body_nested_too_deep_for_the_decoder_is_shown_as_text() -> None:
    # a proxy's or a broken server's body: `[[[[…` raised RecursionError out of the decoder,
    # where the turn wanted an error that says what came back
    raw = b"[" * 4000
    assert wire.error_code(raw) == ""
    assert wire.server_message(raw).startswith("[[[[")


@pytest.mark.parametrize(
    ("status", "retry_after"),
    [(429, "0"), (429, None), (500, None), (502, None), (503, "0.1"), (504, None)],
)
async def test_openai_a_busy_or_failing_server_is_asked_again_within_the_turn(
    llm: OpenAIStub, status: int, retry_after: str | None
) -> None:
    # OpenAI's rate limit, a vLLM restarting behind its proxy: the next try a moment later
    # answers, where the caller heard the fallback line and had to ask again
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    llm.script(Script(status=status, headers=headers), Script("Here you go."))
    with capture_logs() as logs:
        assert text_of(await collect(openai(llm, key=KEY))) == "Here you go."
    assert len(llm.requests) == 2
    [retry] = [e for e in logs if e["event"] == "backend.retry"]
    assert retry["status"] == status and retry["log_level"] == "info"
    if retry_after is not None:
        assert retry["wait_s"] == float(retry_after)


async def test_openai_gives_up_after_three_tries_and_says_how_many(llm: OpenAIStub) -> None:
    llm.script(*[Script(status=503, error_message="Overloaded.")] * 3, Script("Too late."))
    with pytest.raises(BackendError) as info:
        await collect(openai(llm))
    assert str(info.value) == "openai backend: HTTP 503: Overloaded. (3 tries)"
    assert len(llm.requests) == 3


QUOTA = (
    "You exceeded your current quota, please check your plan and billing details. For more "
    "information on this error, read the docs: "
    "https://platform.openai.com/docs/guides/error-codes/api-errors."
)


async def test_openai_out_of_credit_is_no_rate_limit_and_fails_at_once(llm: OpenAIStub) -> None:
    # OpenAI answers an account out of credit with a 429 too, and no retry ever succeeds: the
    # caller sat through the tries for nothing before the fallback line
    out = Script(
        status=429,
        error_message=QUOTA,
        error_type="insufficient_quota",
        error_code="insufficient_quota",
        headers={"Retry-After": "0"},
    )
    llm.script(out, Script("Never heard."))
    backend = openai(llm, key=KEY)
    try:
        with capture_logs() as logs:
            heard = await _replied(backend, 5.0)
    finally:
        await backend.aclose()
    assert len(llm.requests) == 1
    [failed] = heard
    assert isinstance(failed, ReplyFailed)  # the call says the fallback line
    assert "openai backend: HTTP 429 insufficient_quota: You exceeded" in failed.error
    assert [e for e in logs if e["event"] == "backend.retry"] == []
    [told] = [e for e in logs if e["event"] == "backend.out_of_credit"]
    assert told["log_level"] == "error" and "backend.api_key" in told["hint"]
    assert all(KEY not in str(e) for e in logs)


async def test_openai_a_retry_after_longer_than_a_caller_waits_is_not_waited(
    llm: OpenAIStub,
) -> None:
    # the caller would sit in silence for it: the fallback now, and the operator told why
    llm.script(
        Script(status=429, error_message="Rate limit reached.", headers={"Retry-After": "20"})
    )
    with pytest.raises(BackendError) as info:
        await collect(openai(llm, timeout_s=30))
    assert str(info.value) == "openai backend: HTTP 429: Rate limit reached. (Retry-After 20 s)"
    assert len(llm.requests) == 1
    # nor a wait that would outlast backend.timeout_s
    llm.script(Script(status=503, headers={"Retry-After": "1"}))
    with pytest.raises(BackendError, match=r"HTTP 503: .* \(Retry-After 1 s\)"):
        await collect(openai(llm, timeout_s=0.5))
    assert len(llm.requests) == 2


async def test_openai_a_web_page_answered_with_200_says_so_and_what_page() -> None:
    # base_url at a web UI's port (Open WebUI, LM Studio's, a login page): its HTML has no
    # `data:` line, so the reply was "empty" and the operator had nothing to go on
    from aiohttp import web

    from tests.support import serving

    page = "<!doctype html>\n<html><head>\n<title> Open WebUI </title></head><body>app</body>"

    async def chat(request: web.Request) -> web.Response:
        return web.Response(text=page, content_type="text/html")

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serving(app) as port:
        with pytest.raises(BackendError) as info:
            await collect(openai(f"http://127.0.0.1:{port}/v1", key=KEY))
    assert str(info.value) == (
        "openai backend: answered a web page (text/html), not a completion: is base_url the "
        "API's address (often ending in /v1)? The page: 'Open WebUI'"
    )


async def test_openai_malformed_stream_line_raises_after_the_good_text(llm: OpenAIStub) -> None:
    llm.script(
        Script(
            raw=[
                'data: {"choices": [{"delta": {"content": "Fine so far."}}]}\n\n',
                "data: {this is not json\n\n",
            ]
        )
    )
    backend = openai(llm)
    got: list[Chunk] = []
    with pytest.raises(BackendError, match="malformed stream event"):
        try:
            async for chunk in backend.reply("call-1", HISTORY):
                got.append(chunk)
        finally:
            await backend.aclose()
    assert got == ["Fine so far."]


async def test_openai_error_object_in_the_stream_raises(llm: OpenAIStub) -> None:
    llm.script(Script(raw=['data: {"error": {"message": "model overloaded"}}\n\n']))
    with pytest.raises(BackendError, match="error in stream: model overloaded"):
        await collect(openai(llm))


async def test_openai_connection_refused_raises_a_backend_error_without_the_key() -> None:
    url = refused_url()
    with pytest.raises(BackendError) as info:
        await collect(openai(url + "/v1", key=KEY))
    # said as VoIPBIN's are, not aiohttp's "Cannot connect to host ... [Connect call failed ...]"
    host_port = url.removeprefix("http://")
    assert str(info.value) == f"openai backend: cannot connect to {host_port}: Connection refused"
    assert KEY not in str(info.value) and KEY not in repr(info.value)


async def test_openai_key_echoed_by_the_server_never_reaches_the_exception(
    llm: OpenAIStub,
) -> None:
    llm.script(Script(status=401, error_message=f"Incorrect API key provided: {KEY}."))
    backend = openai(llm, key=KEY)
    assert KEY not in repr(backend) and KEY not in str(vars(backend))
    with pytest.raises(BackendError) as info:
        await collect(backend)
    text = f"{info.value} {info.value!r} {info.value.__cause__!r} {info.value.args}"
    assert "HTTP 401" in text and "Incorrect API key provided: ***" in text
    assert KEY not in text and "Authorization" not in text and "Bearer" not in text


async def test_openai_cancelling_the_reply_closes_the_stream(llm: OpenAIStub) -> None:
    llm.script(Script("word " * 200, tokens_per_s=20))
    backend = openai(llm)
    try:
        await first_chunk_then_cancel(backend)
        await asyncio.wait_for(llm.streams[0].closed_early.wait(), 5)
    finally:
        await backend.aclose()
    assert llm.streams[0].sent < llm.streams[0].planned


async def test_openai_silent_server_times_out_after_timeout_s(llm: OpenAIStub) -> None:
    llm.script(Script("too late", first_token_s=30))
    with pytest.raises(TimeoutError):
        await collect(openai(llm, timeout_s=0.2))
    await asyncio.wait_for(llm.streams[0].closed_early.wait(), 5)


async def _replied(backend: Backend, timeout_s: float) -> list[Result]:
    """What the call hears of one reply, through `stream_reply` as the executor runs it."""
    heard: list[Result] = []
    ask = AskBackend("call-1", 1, HISTORY)
    await stream_reply(backend, ask, heard.append, clock=lambda: 0.0, timeout_s=timeout_s)
    return heard


async def test_openai_a_stall_mid_reply_keeps_the_whole_sentences_and_the_next_turn_works(
    llm: OpenAIStub,
) -> None:
    # a model that streams a sentence and a half, then nothing for longer than timeout_s
    first, rest = _delta({"content": "We open at nine. We close"}), _delta({"content": " at"})
    llm.script(Script(raw=[first, rest], tokens_per_s=0.2))
    backend = openai(llm, key=KEY, timeout_s=0.3)
    try:
        with capture_logs() as logs:
            heard = await _replied(backend, 0.3)
        # the whole sentence stands, the half one is not said, and no fallback on top
        assert heard == [
            ReplySentence(1, "We open at nine."),
            ReplyFailed(1, "backend timed out"),
        ]
        assert all(KEY not in str(e) for e in logs)
        await asyncio.wait_for(llm.streams[0].closed_early.wait(), 5)  # the model was hung up on
        session = backend._http
        heard = await _replied(backend, 0.3)  # the next turn, on the same session
        assert heard[0] == ReplySentence(1, "Hello from the stub.")
        assert isinstance(heard[-1], ReplyDone) and backend._http is session
    finally:
        await backend.aclose()


async def test_openai_a_connection_cut_mid_reply_fails_the_turn_not_the_session() -> None:
    from aiohttp import web

    from tests.support import serving

    answered = 0

    async def chat(request: web.Request) -> web.StreamResponse:
        nonlocal answered
        answered += 1
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        if answered == 1:
            await resp.write(_delta({"content": "We open at nine. We close"}).encode())
            assert request.transport is not None
            request.transport.close()  # the server dies mid-reply
            return resp
        await resp.write(f"{_delta({'content': 'Back again.'})}data: [DONE]\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serving(app) as port:
        backend = openai(f"http://127.0.0.1:{port}/v1", timeout_s=5)
        try:
            first = await _replied(backend, 5)
            assert first[0] == ReplySentence(1, "We open at nine.")
            assert isinstance(first[1], ReplyFailed) and len(first) == 2
            assert first[1].error.startswith("BackendError: openai backend: ClientPayloadError")
            second = await _replied(backend, 5)
            assert second[0] == ReplySentence(1, "Back again.")
        finally:
            await backend.aclose()


async def test_openai_reuses_its_session_and_aclose_releases_it(llm: OpenAIStub) -> None:
    backend = openai(llm)
    assert text_of([c async for c in backend.reply("a", HISTORY)]) == "Hello from the stub."
    session = backend._http
    assert text_of([c async for c in backend.reply("b", HISTORY)]) == "Hello from the stub."
    assert backend._http is session and session is not None
    await backend.aclose()
    assert session.closed


# ---- http ---------------------------------------------------------------------------------------


def http(stub: HttpStub | str, *, key: str | None = None, timeout_s: float = 5.0) -> HttpBackend:
    url = stub if isinstance(stub, str) else stub.reply_url
    return HttpBackend(url=url, api_key=Secret(key) if key else None, timeout_s=timeout_s)


async def test_http_request_has_call_id_last_text_and_history(service: HttpStub) -> None:
    await collect(http(service, key=KEY))
    await collect(http(service))
    with_key, without = service.requests
    assert with_key.headers["Authorization"] == f"Bearer {KEY}"
    assert "Authorization" not in without.headers
    assert with_key.body == {
        "call_id": "call-1",
        "text": "What are your opening hours?",
        "history": [{"role": r, "content": t} for r, t in HISTORY],
    }


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ({"text": "Nine to five."}, ["Nine to five."]),
        ({"text": "Goodbye.", "action": "end_call"}, ["Goodbye.", ToolCall("end_call")]),
        (
            {"text": "One moment.", "action": {"transfer": "+15557654321"}},
            ["One moment.", ToolCall("transfer", {"number": "+15557654321"})],
        ),
        (
            {"tool": {"name": "transfer", "arguments": {"number": "+1555"}}},
            [ToolCall("transfer", {"number": "+1555"})],
        ),
        ({}, []),
    ],
)
async def test_http_json_answers(
    service: HttpStub, answer: dict[str, Any], expected: list[Chunk]
) -> None:
    service.script(HttpReply("json", [answer]))
    assert await collect(http(service)) == expected


async def test_http_sse_answer_mixes_text_chunks_and_objects(service: HttpStub) -> None:
    service.script(
        HttpReply(
            "sse",
            ["We open ", '" at nine."', {"text": " Bye.", "action": "end_call"}, "[DONE]"],
        )
    )
    assert await collect(http(service)) == ["We open ", " at nine.", " Bye.", ToolCall("end_call")]


async def test_http_ndjson_answer(service: HttpStub) -> None:
    service.script(
        HttpReply(
            "ndjson",
            [{"text": "Let me "}, {"text": "transfer you."}, {"action": {"transfer": "+1555"}}],
        )
    )
    chunks = await collect(http(service))
    assert chunks == ["Let me ", "transfer you.", ToolCall("transfer", {"number": "+1555"})]


async def test_http_plain_text_answer(service: HttpStub) -> None:
    service.script(HttpReply("text", ["Just text."]))
    assert await collect(http(service)) == ["Just text."]


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (
            HttpReply(
                "json", [{"detail": "index not ready"}], status=503, headers={"Retry-After": "30"}
            ),
            r"HTTP 503: index not ready \(Retry-After 30 s\)$",
        ),
        (HttpReply("json", [{"text": 5}]), "'text' must be a string"),
        (HttpReply("json", [{"action": {"dance": 1}}]), "'action' must be"),
        (HttpReply("json", [["not", "an", "object"]]), "expected a JSON object, got list"),
        (HttpReply("ndjson", ["a string line"]), "expected a JSON object, got str"),
        (HttpReply("text", ["<html>oops</html>"], status=502), "HTTP 502: <html>oops</html>"),
    ],
)
async def test_http_errors_say_what_is_wrong(
    service: HttpStub, reply: HttpReply, message: str
) -> None:
    service.script(reply)
    with pytest.raises(BackendError, match=message):
        await collect(http(service))


async def test_http_a_busy_service_is_asked_again_a_failing_one_is_not(service: HttpStub) -> None:
    # 429 and 503 say the request was refused before any work: safe to send again. A 500 may
    # come after the service acted on the turn (logged it, booked something): said as is
    service.script(
        HttpReply("json", [{"detail": "busy"}], status=503, headers={"Retry-After": "0"}),
        HttpReply("json", [{"text": "Now I can."}]),
        HttpReply("json", [{"detail": "index exploded"}], status=500),
        HttpReply("json", [{"text": "Never asked."}]),
    )
    assert await collect(http(service)) == ["Now I can."]
    assert len(service.requests) == 2
    with pytest.raises(BackendError, match=r"^http backend: HTTP 500: index exploded$"):
        await collect(http(service))
    assert len(service.requests) == 3


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_http_a_redirect_is_not_followed_and_the_error_says_where_it_points(
    service: HttpStub, status: int
) -> None:
    # aiohttp turned the POST into a GET without the turn on a 301 or 302 (the service said
    # "405 Method Not Allowed", or worse answered its GET page), and took the conversation to
    # another host without the key on any redirect across hosts
    service.script(
        HttpReply("text", ["Moved"], status=status, headers={"Location": "/v2/reply?code=s3cr3t"})
    )
    with pytest.raises(BackendError) as info:
        await collect(http(service, key=KEY))
    assert str(info.value) == (
        f"http backend: HTTP {status}: redirected to {service.url}/v2/reply?code=*** "
        "(agentd does not follow redirects: configure that address)"
    )
    assert len(service.requests) == 1


async def test_http_an_error_answered_with_200_is_said_in_the_services_words(
    service: HttpStub,
) -> None:
    # else "empty reply", and the operator never saw why the service had nothing to say
    service.script(
        HttpReply("json", [{"error": {"message": "index not loaded", "code": 17}}]),
        HttpReply("ndjson", [{"text": "Let me see. "}, {"error": "lookup failed"}]),
        HttpReply("json", [{"text": "Said anyway.", "error": "partial"}]),
    )
    with pytest.raises(BackendError, match=r"^http backend: error: index not loaded$"):
        await collect(http(service))
    got: list[Chunk] = []
    backend = http(service)
    with pytest.raises(BackendError, match=r"^http backend: error: lookup failed$"):
        try:
            async for chunk in backend.reply("call-1", HISTORY):
                got.append(chunk)
        finally:
            await backend.aclose()
    assert got == ["Let me see. "]
    # text beside it is the answer: said
    assert await collect(http(service)) == ["Said anyway."]


async def test_http_key_never_reaches_the_exception(service: HttpStub) -> None:
    service.script(HttpReply("json", [{"error": f"bad token {KEY}"}], status=401))
    with pytest.raises(BackendError) as info:
        await collect(http(service, key=KEY))
    assert str(info.value) == "http backend: HTTP 401: bad token ***"
    url = refused_url()
    with pytest.raises(BackendError) as refused:
        await collect(http(url + "/reply", key=KEY))
    assert str(refused.value) == (
        f"http backend: cannot connect to {url.removeprefix('http://')}: Connection refused"
    )


async def test_http_cancelling_an_sse_reply_closes_the_stream(service: HttpStub) -> None:
    service.script(HttpReply("sse", [f"word {i}. " for i in range(100)], per_s=20))
    backend = http(service)
    try:
        await first_chunk_then_cancel(backend)
        await asyncio.wait_for(service.streams[0].closed_early.wait(), 5)
    finally:
        await backend.aclose()


# ---- python ------------------------------------------------------------------------------------


async def test_python_async_function_gets_call_id_and_a_list_history() -> None:
    assert await collect(PythonBackend(target="tests.stubs:py_async_object")) == ["from an object"]
    chunks = await collect(PythonBackend(target="tests.stubs:py_whole"))
    assert chunks == ["Python heard: What are your opening hours?. It has 3 messages."]
    # None: nothing to say, by choice (not an empty reply by mistake)
    assert await collect(PythonBackend(target="tests.stubs:py_nothing")) == [NoReply()]


async def test_python_async_generator_streams_text_and_tool_calls() -> None:
    chunks = await collect(PythonBackend(target="tests.stubs:py_stream"))
    assert chunks == ["Thanks for ", "calling. ", "Goodbye!", ToolCall("end_call")]


async def test_python_generator_is_closed_when_the_reply_is_cancelled() -> None:
    backend = PythonBackend(target="tests.stubs:py_endless")
    stubs.PY_CLOSED.clear()
    await first_chunk_then_cancel(backend)
    assert stubs.PY_CLOSED == ["call-1"]


@pytest.mark.parametrize(
    ("target", "message"),
    [
        ("tests.no_such_module:fn", "cannot import 'tests.no_such_module': ModuleNotFoundError"),
        ("tests.stubs:no_such_function", "'tests.stubs:no_such_function': no attribute"),
        ("tests.stubs:not_callable", "is not callable (it is a int)"),
        ("tests.stubs", "expected 'module:function'"),
        ("tests.stubs:", "expected 'module:function'"),
        # a plain def would hold every call while it runs, on the event loop
        ("tests.stubs:py_sync", "is a plain function: make it an async def"),
        ("tests.stubs:py_sync_object", "is a plain function: make it an async def"),
    ],
)
def test_python_bad_target_is_refused_at_construction(target: str, message: str) -> None:
    with pytest.raises(BackendConfigError) as info:
        PythonBackend(target=target)
    assert message in str(info.value)


def test_python_module_not_found_says_where_agentd_looks() -> None:
    # `agentd console --config ./agentd.toml` with `mypkg/` beside it: the console script's
    # Python does not look in the current directory, and "No module named 'mypkg'" alone left
    # a new user guessing why a module that is right there is not found
    with pytest.raises(BackendConfigError) as info:
        PythonBackend(target="nope_pkg.agent:reply")
    message = str(info.value)
    assert message.startswith(
        "cannot import 'nope_pkg.agent': ModuleNotFoundError: No module named 'nope_pkg'"
    )
    assert f"agentd's Python ({sys.executable})" in message
    assert "install your package into that venv" in message
    assert "PYTHONPATH" in message


def test_python_module_whose_dependency_is_missing_names_the_dependency(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "needs_dep.py").write_text("import nope_dependency\n\nasync def reply(c, h): ...\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BackendConfigError) as info:
        PythonBackend(target="needs_dep:reply")
    message = str(info.value)
    assert message.startswith("cannot import 'needs_dep': ModuleNotFoundError: No module named")
    # the module was found: the hint is about what it imports, not about PYTHONPATH
    assert "it imports 'nope_dependency'" in message
    assert f"agentd's Python ({sys.executable})" in message
    assert "PYTHONPATH" not in message


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        (
            "tests.stubs:py_sync_partial",
            BackendError,
            "must be an async function or an async generator",
        ),
        ("tests.stubs:py_bad_chunk", BackendError, "yielded a int; expected str or ToolCall"),
    ],
)
async def test_python_misbehaving_function_fails_the_reply(
    target: str, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        await collect(PythonBackend(target=target))


@pytest.mark.parametrize("target", ["py_raises", "py_breaks_halfway"])
async def test_python_function_that_raises_says_what_and_where_in_one_line(target: str) -> None:
    # "KeyError: 'text'" alone, in a backend_failed line with no traceback, left the author
    # of the function to guess which of their lines raised it
    got: list[Chunk] = []
    backend = PythonBackend(target=f"tests.stubs:{target}")
    with pytest.raises(BackendError) as info:
        async for chunk in backend.reply("call-1", HISTORY):
            got.append(chunk)
    line = inspect.getsourcelines(getattr(stubs, target))[1]
    raised_at = next(
        n
        for n, text in enumerate(inspect.getsourcelines(getattr(stubs, target))[0], line)
        if "raise " in text
    )
    assert str(info.value) == (
        f"python backend: tests.stubs:{target} raised RuntimeError: the knowledge base is down "
        f"(at {stubs.__file__}:{raised_at}, in {target})"
    )
    assert isinstance(info.value.__cause__, RuntimeError)
    assert got == ([] if target == "py_raises" else ["We open at nine. ", "We close"])


@pytest.mark.parametrize(
    ("target", "said"), [("py_blocks", ["Done."]), ("py_blocks_later", ["One. ", "Two."])]
)
async def test_python_function_that_holds_the_event_loop_is_named_in_a_warning(
    target: str, said: list[str]
) -> None:
    # an async def that calls time.sleep or requests passes every check at start, then
    # freezes every call on the box while it runs, and nothing said so
    with capture_logs() as logs:
        assert await collect(PythonBackend(target=f"tests.stubs:{target}")) == said
    [warning] = [e for e in logs if e["event"] == "backend.blocked_loop"]
    assert warning["log_level"] == "warning" and warning["target"] == f"tests.stubs:{target}"
    assert warning["held_s"] >= 0.3 and "asyncio.to_thread" in warning["hint"]
    # one that awaits is not suspected, however long it waits
    with capture_logs() as logs:
        await collect(PythonBackend(target="tests.stubs:py_stream"))
    assert [e for e in logs if e["event"] == "backend.blocked_loop"] == []


# ---- make_backend -------------------------------------------------------------------------------


def config_for(**backend: Any) -> Any:
    overrides = {"voipbin": {"accesskey": "vb_test"}, "agent": {"numbers": ["*"]}}
    return load(None, env={}, overrides={**overrides, "backend": backend})


async def test_make_backend_builds_every_kind(llm: OpenAIStub) -> None:
    built = make_backend(
        config_for(kind="openai", base_url=llm.base_url, api_key=KEY, model="m", tools=False)
    )
    assert isinstance(built, OpenAIBackend)
    assert built.url == f"{llm.base_url}/chat/completions" and not built.tools
    assert text_of(await collect(built)) == "Hello from the stub."
    assert llm.requests[0].headers["Authorization"] == f"Bearer {KEY}"
    assert isinstance(make_backend(config_for(kind="http", url="http://x/y")), HttpBackend)
    python = make_backend(config_for(kind="python", callable="tests.stubs:py_whole"))
    assert isinstance(python, PythonBackend)


def test_make_backend_reports_an_unimportable_callable_as_a_config_error() -> None:
    with pytest.raises(
        ConfigError, match=r"^backend\.callable: cannot import 'nope_pkg\.mod': ModuleNotFoundError"
    ):
        make_backend(config_for(kind="python", callable="nope_pkg.mod:fn"))


async def test_replies_beyond_a_hundred_at_once_are_not_queued_behind_a_connection_pool() -> None:
    # one backend session serves every call; aiohttp's default pool holds 100 connections,
    # and the 101st reply waited (its timeout running) for one of them to finish
    from aiohttp import web

    from tests.support import serving

    wanted = 101
    arrived = 0
    everyone = asyncio.Event()

    async def chat(request: web.Request) -> web.StreamResponse:
        nonlocal arrived
        arrived += 1
        if arrived == wanted:
            everyone.set()
        await everyone.wait()  # none answers before all are in: a pool of 100 never gets there
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        delta = {"choices": [{"index": 0, "delta": {"content": "Hi."}}]}
        await resp.write(f"data: {json.dumps(delta)}\n\ndata: [DONE]\n\n".encode())
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    async with serving(app) as port:
        backend = openai(f"http://127.0.0.1:{port}/v1", timeout_s=30)
        try:
            replies = await asyncio.wait_for(
                asyncio.gather(
                    *(_text(backend.reply(f"call-{i}", HISTORY)) for i in range(wanted))
                ),
                10,
            )
        finally:
            everyone.set()  # else the server's cleanup waits for its handlers
            await backend.aclose()
    assert replies == ["Hi."] * wanted


async def _text(chunks: Any) -> str:
    return "".join([c async for c in chunks if isinstance(c, str)])


# ---- the stream's lines -------------------------------------------------------------------------


class _Connected(BaseProtocol):
    """A connection that stays open: the reader below is fed by hand, not by a socket."""

    @property
    def connected(self) -> bool:
        return True


async def _fed_bytewise(data: bytes) -> list[str]:
    """The lines `iter_lines` makes of `data` arriving one byte per network read."""
    loop = asyncio.get_running_loop()
    reader = aiohttp.StreamReader(_Connected(loop), 2**16, loop=loop)

    async def arrive() -> None:
        for i in range(len(data)):
            reader.feed_data(data[i : i + 1])
            await asyncio.sleep(0)  # one read each: the consumer runs before the next byte
        reader.feed_eof()

    producer = asyncio.create_task(arrive())
    lines = [line async for line in iter_lines(reader)]
    await producer
    return lines


async def test_stream_lines_are_whole_whatever_the_network_cuts() -> None:
    # a line, and a two-byte character, across reads; CRLF and LF ends; no end at EOF
    data = 'data: {"content": "Café"}\r\n\r\n: ping\ndata: tail'.encode()
    assert await _fed_bytewise(data) == ['data: {"content": "Café"}', "", ": ping", "data: tail"]


async def test_a_stream_line_without_an_end_is_refused_past_the_limit(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(wire, "MAX_LINE_BYTES", 64)
    assert await _fed_bytewise(b"x" * 64 + b"\n") == ["x" * 64]
    with pytest.raises(BackendError, match="more than 64 bytes"):
        await _fed_bytewise(b"data: " + b"x" * 80)


def test_stream_json_takes_what_the_stdlib_takes() -> None:
    assert (
        wire.decode_json('{"n": NaN, "big": 123456789012345678901234567890}', "x", "y")["big"]
        == 123456789012345678901234567890
    )
    with pytest.raises(BackendError, match="malformed event"):
        wire.decode_json("{nope", "x", "event")


async def test_openai_a_pooled_connection_the_server_closed_is_not_the_callers_problem() -> None:
    # a server drops an idle keep-alive connection after a few seconds (uvicorn: 5 s), aiohttp
    # keeps it 15 s: a turn that reuses it just then finds it closed before any answer. The
    # request never reached the model: it is sent again on a new connection, not failed
    body = (
        b'data: {"choices":[{"delta":{"content":"Hello."}}]}\n\n'
        b'data: {"choices":[{"delta":{},"finish_reason":"stop"}]}\n\ndata: [DONE]\n\n'
    )
    answer = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Content-Length: %d\r\nConnection: keep-alive\r\n\r\n%s" % (len(body), body)
    )
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        first_connection = connections == 1
        requests = 0
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:  # the client closed it: done
                writer.close()
                return
            length = next(
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")
                if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            requests += 1
            if first_connection and requests == 2:
                writer.close()  # it was closing as idle when the request came: no answer
                return
            writer.write(answer)
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    backend = openai(f"http://127.0.0.1:{port}/v1", tools=False)
    try:
        for _ in range(2):  # the second turn reuses the first one's connection
            chunks = [c async for c in backend.reply("call-1", HISTORY)]
            assert text_of(chunks) == "Hello."
    finally:
        await backend.aclose()
        server.close()
        await server.wait_closed()
    assert connections == 2
