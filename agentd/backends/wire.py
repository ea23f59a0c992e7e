"""HTTP plumbing the `openai` and `http` kinds share: the session, line-framed streams, errors.

Server-sent events and NDJSON are parsed by hand over `resp.content`: it is a few dozen lines, and
the aiohttp SSE client libraries are stale. Every error raised here is a `BackendError` whose text
is safe to log: it carries the HTTP status and the server's own message, never a request header,
and it goes through `redact()` in case the server echoes our key back (some do, on a 401).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from yarl import URL

from agentd import __version__, logs
from agentd.backoff import delays
from agentd.neterrors import cannot_connect
from agentd.secret import Secret, display_url, redact

log = logs.get_logger("agentd.backends")

# an error page can be large (an HTML 502 from a proxy): read only this much of it
_ERROR_BODY_LIMIT = 4096
_ERROR_TEXT_LIMIT = 300
#: the longest line of a stream (an SSE or NDJSON event): a server that never ends its line
#: must not fill memory while it is waited for
MAX_LINE_BYTES = 1 << 20


class BackendError(Exception):
    """A backend failed to give a reply. The message is safe to log: no credential, no header.
    `code`: the server's own name for the error (OpenAI's `error.code`), when it gave one."""

    def __init__(self, message: str, *, code: str = "") -> None:
        super().__init__(message)
        self.code = code


def new_session(timeout_s: float) -> aiohttp.ClientSession:
    """One session per backend, so connections (and TLS) are reused from turn to turn.

    `total=None`: a reply streams for as long as it streams; the executor bounds the whole reply
    with `backend.timeout_s`. `sock_read` bounds each silence between two chunks, so a server that
    stalls fails after `timeout_s`, not after aiohttp's default of 300 s. Must be called with a
    running loop (the session binds to it), hence created lazily on the first reply.
    """
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=5, sock_read=timeout_s)
    # no cap on connections (aiohttp's default is 100): each live reply holds one for as long
    # as it streams, and a reply queued behind the hundredth waits out its timeout unasked
    connector = aiohttp.TCPConnector(limit=0)
    return aiohttp.ClientSession(
        timeout=timeout, connector=connector, headers={"User-Agent": f"agentd/{__version__}"}
    )


#: the most of a whole (not streamed) JSON reply read: its text is at most 4,000 characters
#: (`reply.MAX_REPLY_CHARS`); a service answering megabytes is not read to the end first
MAX_BODY_BYTES = 4 << 20


async def read_body(resp: aiohttp.ClientResponse, kind: str) -> bytes:
    """A whole reply's body, up to `MAX_BODY_BYTES`: past it a `BackendError`."""
    parts: list[bytes] = []
    size = 0
    async for data in resp.content.iter_any():
        size += len(data)
        if size > MAX_BODY_BYTES:
            raise BackendError(f"{kind} backend: reply larger than {MAX_BODY_BYTES >> 20} MiB")
        parts.append(data)
    return b"".join(parts)


def bearer(api_key: Secret | None) -> dict[str, str]:
    """The Authorization header, only when a key is set (Ollama and llama.cpp need none)."""
    if api_key:
        return {"Authorization": f"Bearer {api_key.reveal()}"}
    return {}


@dataclass(frozen=True, slots=True)
class Retry:
    """Which refusals a kind sends again, a moment later, within the same turn.

    Only before the reply's first byte, so nothing is said twice; at most `tries` in all, and
    only while the wait (the server's `Retry-After`, else a short backoff) is at most
    `RETRY_WAIT_MAX_S` and fits in `backend.timeout_s`: past that the caller is better served
    by the fallback line at once than by a long silence."""

    statuses: frozenset[int] = frozenset()
    tries: int = 3
    #: sent once more, at once, when the connection is found closed before any answer: a
    #: pooled one the server dropped as idle (uvicorn after 5 s; aiohttp keeps them 15 s) just
    #: as the request went out. Only where asking twice is harmless (a model's completion)
    resend_dropped: bool = False
    #: error codes (OpenAI's `error.code`) that no retry changes, whatever their status: an
    #: account out of credit answers 429 `insufficient_quota`, which is no rate limit
    final_codes: frozenset[str] = frozenset()


NO_RETRY = Retry()
#: the longest a caller is kept in silence waiting to send a refused request again
RETRY_WAIT_MAX_S = 2.0
_RETRY_BASE_S, _RETRY_CAP_S = 0.25, 1.0


@contextlib.asynccontextmanager
async def post_stream(
    session: aiohttp.ClientSession,
    url: str,
    *,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    kind: str,
    retry: Retry = NO_RETRY,
    budget_s: float = math.inf,
) -> AsyncIterator[aiohttp.ClientResponse]:
    """POST `body` and hand over the 2xx response; any other status is a `BackendError`, after
    the tries `retry` allows within `budget_s` (the reply's timeout).

    A redirect is not followed: aiohttp would turn the POST into a GET without the turn (301,
    302), or take the conversation to another host without the key; the error says where it
    points. If the consumer stops early (a barge-in cancels the reply task, the executor's
    timeout fires, a parse error), the connection is closed rather than returned to the pool:
    that is what tells the server to stop generating, and a half-read stream could never be
    reused anyway. Connection failures become `BackendError` too; timeouts stay `TimeoutError`,
    which the executor reports as "backend timed out".
    """
    loop = asyncio.get_running_loop()
    start = loop.time()
    waits = delays(_RETRY_BASE_S, _RETRY_CAP_S)
    try:
        for tries in range(1, max(retry.tries, 1) + 1):
            resp = await _post(session, url, body, headers, retry.resend_dropped)
            async with resp:
                if 200 <= resp.status < 300:
                    try:
                        yield resp
                    except BaseException:
                        resp.close()
                        raise
                    return
                error = await http_error(resp, kind, named=retry.final_codes)
                if resp.status not in retry.statuses or error.code in retry.final_codes:
                    raise error
                told = _retry_after(resp.headers)
            wait = told if told is not None else next(waits)
            if told is not None and (
                wait > RETRY_WAIT_MAX_S or loop.time() + wait - start >= budget_s
            ):
                raise BackendError(f"{error} (Retry-After {wait:g} s)")
            if tries == retry.tries or loop.time() + wait - start >= budget_s:
                raise BackendError(f"{error} ({tries} tries)" if tries > 1 else str(error))
            log.info("backend.retry", status=resp.status, wait_s=round(wait, 3), tries=tries)
            await asyncio.sleep(wait)
    except (TimeoutError, BackendError):
        raise
    except aiohttp.ClientConnectorError as exc:
        raise BackendError(redact(f"{kind} backend: {cannot_connect(exc)}")) from exc
    except aiohttp.ClientError as exc:
        # aiohttp's texts name the host and the OS error, never the request headers
        raise BackendError(redact(f"{kind} backend: {type(exc).__name__}: {exc}")) from exc


async def _post(
    session: aiohttp.ClientSession,
    url: str,
    body: Mapping[str, Any],
    headers: Mapping[str, str],
    resend_dropped: bool,
) -> aiohttp.ClientResponse:
    """The POST's response; sent once more when the connection was dropped before any answer
    (`Retry.resend_dropped`). aiohttp resends only idempotent requests itself."""
    try:
        return await session.post(url, json=body, headers=headers, allow_redirects=False)
    except aiohttp.ClientConnectorError:
        raise  # no connection was made: nothing stale to step past
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError) as exc:
        if not resend_dropped:
            raise
        log.info("backend.resent", reason=f"{type(exc).__name__}: {exc}")
        return await session.post(url, json=body, headers=headers, allow_redirects=False)


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """The server's wait before a retry: OpenAI's `retry-after-ms`, else `Retry-After` in
    seconds (an HTTP date is not waited on: no server we know sends one to an API client)."""
    ms = _seconds(headers.get("retry-after-ms"))
    return ms / 1000 if ms is not None else _seconds(headers.get("Retry-After"))


def _seconds(value: str | None) -> float | None:
    """A non-negative number of a header, uncapped: a long wait is reported as the server said
    it (it is not waited on anyway)."""
    try:
        seconds = float(value) if value else math.nan
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


async def http_error(
    resp: aiohttp.ClientResponse, kind: str, *, named: frozenset[str] = frozenset()
) -> BackendError:
    """A `BackendError` for a non-2xx answer: the status and what the server said about it
    (and its error code, when one of `named`), or for a redirect, where it points."""
    if 300 <= resp.status < 400 and (location := resp.headers.get("Location")):
        where = display_url(str(resp.url.join(URL(location))))
        return BackendError(
            redact(
                f"{kind} backend: HTTP {resp.status}: redirected to {where} (agentd does not "
                "follow redirects: configure that address)"
            )
        )
    raw = b""
    try:
        # read() returns what has arrived so far: loop until the limit or the end of the body
        while len(raw) < _ERROR_BODY_LIMIT:
            part = await resp.content.read(_ERROR_BODY_LIMIT - len(raw))
            if not part:
                break
            raw += part
    except (aiohttp.ClientError, TimeoutError):
        pass  # the status alone still says what went wrong
    message = server_message(raw) or resp.reason or "no message"
    code = error_code(raw)
    status = f"{resp.status} {code}" if code in named else str(resp.status)
    return BackendError(redact(f"{kind} backend: HTTP {status}: {message}"), code=code)


def _json_or_none(text: str) -> Any:
    """`text` decoded as JSON, or None: an error body is whatever a server or proxy sent (a
    page of `[[[[` is too deep for the decoder: a RecursionError, not a ValueError)."""
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return None


def error_code(raw: bytes) -> str:
    """OpenAI's `{"error": {"code": ...}}` (else its `type`) of an error body; "" for none."""
    obj = _json_or_none(raw.decode("utf-8", errors="replace"))
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return ""
    code = err.get("code") or err.get("type")
    # a server's word, logged: short and plain, never a body
    return code if isinstance(code, str) and code.isidentifier() and len(code) <= 64 else ""


def server_message(raw: bytes) -> str:
    """The human part of an error body: OpenAI's `{"error": {"message"}}`, FastAPI's `detail`,
    a plain `message` or `error` string, else the text itself, cut short."""
    text = raw.decode("utf-8", errors="replace").strip()
    obj = _json_or_none(text)
    if isinstance(obj, dict):
        err = obj.get("error")
        if isinstance(err, dict) and isinstance(err.get("message"), str):
            text = err["message"]
        elif isinstance(err, str):
            text = err
        else:
            for key in ("message", "detail"):
                if isinstance(obj.get(key), str):
                    text = obj[key]
                    break
    # one log line, whatever the server's formatting; redacted before it is cut, or an echoed
    # key cut in two would no longer be the key the redaction knows, and its start would show
    text = redact(" ".join(text.split()))
    if len(text) > _ERROR_TEXT_LIMIT:
        text = text[:_ERROR_TEXT_LIMIT] + "…"
    return text


async def iter_lines(content: aiohttp.StreamReader) -> AsyncGenerator[str, None]:
    """Decoded lines without their `\\n` or `\\r\\n`. Lines are split on bytes before decoding,
    so a multi-byte character is never cut in two.

    Read a network chunk at a time and split here: aiohttp's `readline` (two a streamed token,
    its `data:` line and the blank one) costs as much as the rest of the token's handling."""
    rest = b""
    async for chunk in content.iter_any():
        lines = (rest + chunk if rest else chunk).split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE_BYTES:
            raise BackendError(f"backend sent a line of more than {MAX_LINE_BYTES} bytes")
        for raw in lines:
            yield raw.decode("utf-8", errors="replace").rstrip("\r")
    if rest:
        yield rest.decode("utf-8", errors="replace").rstrip("\r")


async def iter_sse(content: aiohttp.StreamReader) -> AsyncGenerator[str, None]:
    """The `data` of each server-sent event, as the SSE spec frames it.

    A blank line ends an event; several `data:` lines in one event are joined with `\\n`; lines
    starting with `:` are comments (keepalives); `event:`, `id:`, `retry:` and unknown fields carry
    nothing we use. An event still open when the stream ends is delivered too: some servers close
    right after the last `data:` line.
    """
    data: list[str] = []
    async with contextlib.aclosing(iter_lines(content)) as lines:
        async for line in lines:
            if not line:
                if data:
                    yield "\n".join(data)
                    data = []
                continue
            if line.startswith(":"):
                continue
            name, _, value = line.partition(":")
            if name == "data":
                data.append(value.removeprefix(" "))
    if data:
        yield "\n".join(data)


def decode_json(data: str, kind: str, what: str) -> Any:
    """`json.loads`, with a `BackendError` that shows the start of the bad payload."""
    try:
        return orjson.loads(data)  # a streamed token's JSON: ~1 µs less than the stdlib's
    except ValueError:
        pass
    try:
        return json.loads(data)  # what orjson refuses and the stdlib takes (NaN, huge integers)
    except ValueError:
        sample = redact(" ".join(data.split()))[:80]  # redacted whole, then cut (as above)
        raise BackendError(f"{kind} backend: malformed {what}: {sample!r}") from None
