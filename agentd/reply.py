"""A backend reply as the call sees it: sentences as soon as they exist, then done or failed.

The backend streams text (and maybe a tool call); the reply is cut into sentences, each fed back
to the call at once, so the first sentence is spoken while the rest is still being generated.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from agentd import logs
from agentd.backends import Backend, NoReply, ToolCall, Usage
from agentd.commands import (
    AskBackend,
    ReplyDone,
    ReplyFailed,
    ReplyIncomplete,
    ReplySentence,
    Result,
)
from agentd.names import Action, EndCall, TransferTo
from agentd.secret import redact
from agentd.sentences import SentenceBuffer, speakable

log = logs.get_logger("agentd.reply")

TAIL_WAIT_S = 0.005
#: what is read of one reply at most (about four minutes of speech): past it the stream is
#: closed and what came is said; a runaway model or a service's megabyte of text must not
#: queue hours of speech
MAX_REPLY_CHARS = 4000


async def stream_reply(
    backend: Backend,
    cmd: AskBackend,
    feed: Callable[[Result], None],
    *,
    clock: Callable[[], float],
    timeout_s: float,
) -> None:
    """Run the backend on `cmd`'s history; every outcome goes to `feed`. Cancel it to drop it."""
    buf = SentenceBuffer()
    stream: Any = None
    extra = _Besides()
    first: float | None = None
    unread = True  # the first character may be a turn-completion marker: never spoken
    said = False
    try:
        stream = backend.reply(cmd.call_id, cmd.history)
        # `timeout_s` bounds each silence, before the first chunk and between two, not the
        # whole reply: a healthy model streaming a long answer slowly is not cut off
        async with asyncio.timeout(timeout_s) as timeout:
            silence = _Silence(timeout, timeout_s)
            async for chunk in _read(stream, buf, cmd.turn):
                silence.broken()
                if extra.took(chunk):
                    continue
                if first is None and chunk:
                    first = clock()
                text: str = chunk
                if unread and text.strip():
                    unread = False
                    verdict, text = _verdict(text)
                    if cmd.marker and verdict != COMPLETE:
                        feed(ReplyIncomplete(cmd.turn, long=verdict == LONG))
                        return
                said = _said(feed, cmd.turn, buf.feed(text)) or said
        if _said(feed, cmd.turn, buf.flush()) or said:
            await _let_it_go()
        elif extra.action is None and not extra.silent:
            # no text to say, no action: a proxy's HTML page, a JSON without "text", a model
            # that stopped at once. The caller would hear nothing until the silence reprompt
            feed(ReplyFailed(cmd.turn, "empty reply: the backend answered nothing to say"))
            return
        feed(ReplyDone(cmd.turn, extra.action, first, extra.tokens))
    except asyncio.CancelledError:
        raise
    except Exception as exc:  # any backend failure (a timeout too) becomes the fallback line
        _said_whole(feed, cmd.turn, buf)
        why = (
            "backend timed out"
            if isinstance(exc, TimeoutError)
            else redact(f"{type(exc).__name__}: {exc}")
        )
        feed(ReplyFailed(cmd.turn, why))
    finally:
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            with contextlib.suppress(Exception):
                await aclose()


class _Besides:
    """What a reply brings besides its text: an action, its token counts, or the backend's
    choice to say nothing."""

    __slots__ = ("action", "silent", "tokens")

    def __init__(self) -> None:
        self.action: Action | None = None
        self.tokens: tuple[int, int] | None = None
        self.silent = False

    def took(self, chunk: object) -> bool:
        """Whether `chunk` was one of these (text is not)."""
        if isinstance(chunk, str):
            return False
        if isinstance(chunk, ToolCall):
            self.action = _action(chunk) or self.action
        elif isinstance(chunk, Usage):
            self.tokens = (chunk.input_tokens, chunk.output_tokens)
        elif isinstance(chunk, NoReply):
            self.silent = True
        return True


class _Silence:
    """A timeout that bounds each silence of a stream: `broken()` when a chunk comes.

    The deadline moves at most every 1/32 of the timeout, not per token (a timer handle each):
    a silence is cut after 31/32 of the timeout at the earliest, never after more."""

    __slots__ = ("_loop", "_step", "_timeout", "_timeout_s")

    def __init__(self, timeout: asyncio.Timeout, timeout_s: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._timeout = timeout
        self._timeout_s = timeout_s
        self._step = timeout_s / 32

    def broken(self) -> None:
        """A chunk came: the next silence counts from now."""
        deadline = self._loop.time() + self._timeout_s
        when = self._timeout.when()
        if when is None or deadline - when >= self._step:
            self._timeout.reschedule(deadline)


async def _read(stream: Any, buf: SentenceBuffer, turn: int) -> AsyncIterator[Any]:
    """The chunks of `stream`, up to `MAX_REPLY_CHARS` of text; plus, when the text so far ends
    like a sentence ("noon.") and the next chunk is slow to come, an empty chunk after
    TAIL_WAIT_S that makes `buf` give up that sentence. Model streams send the space after a
    period with the *next* token, so without this the first sentence would be spoken one token
    interval late. One generator does both: each layer of generator costs every token."""
    it = stream.__aiter__()
    length = 0
    while True:
        try:
            if not buf.ends_a_sentence():
                # the usual case: no task, so a backend whose chunks are ready (a local model,
                # the echo) streams the whole reply in one step of the loop
                chunk = await it.__anext__()
            else:
                nxt = asyncio.ensure_future(it.__anext__())
                try:
                    done, _ = await asyncio.wait({nxt}, timeout=TAIL_WAIT_S)
                    if not done:
                        buf.end_tail()
                        yield ""
                    chunk = await nxt
                except BaseException:
                    nxt.cancel()
                    raise
        except StopAsyncIteration:
            return
        if isinstance(chunk, str):
            length += len(chunk)
            if length > MAX_REPLY_CHARS:
                log.warning("reply.too_long", turn=turn, kept_chars=MAX_REPLY_CHARS)
                yield chunk[: len(chunk) - (length - MAX_REPLY_CHARS)]
                return
        yield chunk


COMPLETE, SHORT, LONG = "\u2713", "\u25cb", "\u25d0"  # ✓ ○ ◐


def _verdict(chunk: str) -> tuple[str, str]:
    """The turn-completion marker a reply starts with, and the text after it. A reply with
    none is taken as complete: a model that forgets the marker still answers."""
    text = chunk.lstrip()
    if text[:1] in (COMPLETE, SHORT, LONG):
        return text[0], text[1:]
    return COMPLETE, chunk


def _action(call: ToolCall) -> Action | None:
    """A tool call as the state machine's action; unknown tools are logged and ignored."""
    if call.name == "end_call":
        return EndCall()
    if call.name == "transfer":
        # without a number (arguments missing, or not JSON) it is still a transfer asked for:
        # the call tells the caller it failed, rather than leave them waiting for it
        return TransferTo(str(call.arguments.get("number", "")).strip())
    log.warning("backend.unknown_tool", tool=call.name)
    return None


def _said(feed: Callable[[Result], None], turn: int, sentences: list[str]) -> bool:
    """Each sentence as the voice should read it (one that was only markup says nothing);
    whether any was fed."""
    fed = False
    for sentence in sentences:
        text = speakable(sentence)
        if text:
            feed(ReplySentence(turn, text))
            fed = True
    return fed


def _said_whole(feed: Callable[[Result], None], turn: int, buf: SentenceBuffer) -> None:
    """A reply that fails after a whole sentence came (its end waiting only for the space the
    next chunk would bring): that sentence is the answer, said rather than the fallback line
    (a reply that said something gets none). A sentence cut short stays unsaid."""
    if buf.ends_a_sentence():
        _said(feed, turn, buf.flush())


async def _let_it_go() -> None:
    """Yield to the loop before the reply's end is fed: the `/say` its sentences made starts
    first, and the reply's bookkeeping (its records, its timers) comes after. Not between
    sentences: those a backend has ready at once (the echo, a local model) stay queued together
    and go in one `/say` (the lane merges them); a streaming backend yields between its chunks
    anyway."""
    await asyncio.sleep(0)
