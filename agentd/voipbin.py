"""VoIPBIN REST client: one aiohttp session, a shared rate budget, and retries that are safe.

Retry rules (docs/protocol.md §6.3, decided in agentd/backoff.py): 429 waits for
`Retry-After` and is retried (the gateway refused it, nothing happened); 401 logs in again once
when a username/password is configured; 5xx and connection errors are retried with backoff and
jitter within a deadline, but only for idempotent requests — a `/say` that may have reached the
server is never sent again, or the caller would hear it twice. Other 4xx are final. No URL with
its query string and no header is ever put in an exception or a log line.

Credentials travel in headers only, never in a URL: a JWT as `Authorization: Bearer`, an access
key as `Cookie: accesskey=<key>` (VoIPBIN reads that cookie before `?accesskey=`; its own client
sends it so). A URL ends up in proxy logs, load balancer logs and tracebacks; a header does not.
"""

from __future__ import annotations

import asyncio
import contextlib
import json as json_module
import time
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

from agentd import fence, logs
from agentd.backoff import Decision, classify, decide, delays, parse_retry_after
from agentd.events import timestamp
from agentd.language import same as same_language
from agentd.neterrors import cannot_connect
from agentd.ratelimit import (
    BACKGROUND,
    DEFAULT_BURST,
    DEFAULT_RATE_PER_S,
    SETUP,
    URGENT,
    RateLimiter,
)
from agentd.secret import Secret, redact

log = logs.get_logger("agentd.voipbin")

SAY_LIMIT_BYTES = 5000
#: How long a `POST /transcribes` is waited for: its media start may take 10 s on VoIPBIN's
#: side (the gateway itself waits 60 s, `servicehandler/transcribe.go`)
TRANSCRIBE_START_TIMEOUT_S = 30.0
#: How long a `POST /transcribes` answered with a 5xx is sent again
TRANSCRIBE_START_RETRY_S = 4.0
#: What a `POST /transcribes` for a call that hung up (or is hanging up) is answered
_NOT_A_LIVE_CALL = frozenset((500,))
#: Polly's plain-text limit (3,000 billed characters per `SynthesizeSpeech`): with aws the pod
#: hands it the say's whole text (bin-tts-manager `streaminghandler/aws.go`), and a longer one
#: fails, which VoIPBIN answers 404 like a dead session
POLLY_MAX_CHARS = 3000


def say_max_chars(tts_provider: str) -> int:
    """The most characters one `/say` may carry with `tts_provider`."""
    return POLLY_MAX_CHARS if tts_provider == "aws" else SAY_LIMIT_BYTES


KEEP_CALL_UP = [{"type": "sleep", "option": {"duration": 3_600_000}}]
# GET /customer needs one of these agent permissions (an access key counts as CustomerAdmin):
# bin-api-manager/pkg/servicehandler/customer.go, CustomerSelfGet
CUSTOMER_PERMISSIONS = "CustomerAdmin or CustomerManager"


class ApiError(Exception):
    """VoIPBIN answered with an error (or did not answer: `status` 0)."""

    def __init__(self, status: int, reason: str = "", message: str = "", request_id: str = ""):
        self.status = status
        self.reason = redact(reason)  # VoIPBIN's or a proxy's word, kept in the call's records
        self.request_id = request_id
        head = f"HTTP {status} {reason}" if status else f"{reason}:"  # 0: no answer at all
        super().__init__(redact(f"{head} {message}".strip()))


class PermissionDenied(ApiError):
    """VoIPBIN refused our credentials a right they need (a 403): retrying cannot help, someone
    has to change the credentials or their permissions."""


class LoginError(ApiError):
    """`POST /auth/login` failed: the error is the login's, not the request's that needed it."""


class LoginRefused(LoginError):
    """VoIPBIN refused the username and password. Retrying may help only once someone fixes
    the account on VoIPBIN's side or the config (a restart applies a new password)."""


#: what a refused login says; VoIPBIN's bare 400 tells nothing more
LOGIN_REFUSED = "login refused: check voipbin.username and voipbin.password"


#: What a stop, delete or flush of a session VoIPBIN already ended and removed answers: an
#: outcome its caller expects (as good as stopped), not a failed request
GONE = frozenset((404,))
#: What a hangup or read of a call that is over answers (already hung up: 409; deleted: 404):
#: what its caller expects at a hangup. Not 403: that may be a permission the credentials lack
CALL_OVER = frozenset((404, 409))


#: Pages of 100 a sweep (or the adoption of a session in the way) reads of GET /speakings:
#: the sessions of the last thousand creates on the account, all calls together.
SPEAKING_PAGES = 10


@dataclass
class Credentials:
    """One way to authenticate: an access key, a JWT, or a username and password to log in."""

    accesskey: Secret | None = None
    token: Secret | None = None
    username: str = ""
    password: Secret | None = None

    @property
    def can_login(self) -> bool:
        """Whether a fresh JWT can be had with a username and password."""
        return bool(self.username and self.password)

    @property
    def sent(self) -> str:
        """What `VoipbinClient.auth` sends, in words, for an operator told it was refused."""
        if self.token:
            return "the JWT of the login" if self.can_login else "the JWT (voipbin.token)"
        if self.accesskey:
            return "the access key (voipbin.accesskey)"
        return "no credentials"


@dataclass(frozen=True, slots=True)
class _Attempt:
    """One try of a request: VoIPBIN's answer, or none (`status` 0)."""

    status: int
    body: Any = None
    retry_after: float | None = None
    reached: bool = True  # whether the request may have reached the server
    error: str = ""  # without an answer: what went wrong (an exception's type name)
    detail: str = ""  # and in words: "cannot connect to host:port: Connection refused"

    @property
    def failed(self) -> bool:
        """No answer, or an error answer."""
        return self.status == 0 or self.status >= 400

    def api_error(self) -> ApiError:
        """The error to raise when giving up."""
        if self.status == 0:
            return ApiError(0, self.error, self.detail or "no answer from VoIPBIN")
        return _api_error(self.status, self.body)


#: the items of a full page of a list (VoIPBIN's default `page_size`, and its largest)
FULL_PAGE = 100
#: VoIPBIN hangs every call up after an hour (docs/protocol.md): an older call is not live
CALL_CAP_S = 3600.0
#: how far this machine's clock may be ahead of VoIPBIN's without a live call looking too old
CLOCK_MARGIN_S = 600.0


class VoipbinClient:
    """The REST calls agentd makes, over one `aiohttp.ClientSession`."""

    def __init__(
        self,
        api_url: str,
        credentials: Credentials,
        *,
        rate_per_s: float = DEFAULT_RATE_PER_S,
        burst: float = DEFAULT_BURST,
        timeout_s: float = 10.0,
        deadline_s: float = 20.0,
    ) -> None:
        self.api_url = api_url.rstrip("/")
        parts = urlsplit(self.api_url)
        self.root_url = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        self.credentials = credentials
        self.limiter = RateLimiter(rate_per_s, burst)
        self.deadline_s = deadline_s
        self._timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=min(5.0, timeout_s))
        self._session: aiohttp.ClientSession | None = None
        self._login_lock = asyncio.Lock()
        # failed attempts (each retry, each 429) and failed requests (the caller got an error):
        # a 429 burst under load moves the first, a VoIPBIN that stays down moves both
        self.errors = 0
        self.failures = 0
        # None: each retry is a warning in the log. A list: why each retry was needed, kept for
        # a tool that says so in its own words (check-config's one line per check)
        self.retries: list[str] | None = None
        # why the latest request was retried ("GET /customer: HTTP 503"): the status shows it
        # while the first lookup of the customer keeps failing (no connection to speak of yet)
        self.last_retry = ""

    @property
    def session(self) -> aiohttp.ClientSession:
        """The process-wide HTTP session (created on first use)."""
        if self._session is None or self._session.closed:
            # no cookie jar: a `token` cookie kept from /auth/login would win over the
            # credentials we send (VoIPBIN reads that cookie first), even after it expires
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                headers={"User-Agent": "agentd"},
                cookie_jar=aiohttp.DummyCookieJar(),
            )
        return self._session

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()

    # ---- credentials -----------------------------------------------------------------------

    def auth(self) -> dict[str, str]:
        """The headers carrying the credentials (REST and the WebSocket upgrade alike); a JWT
        wins over an access key. Never a query parameter: URLs get logged."""
        c = self.credentials
        if c.token:
            return {"Authorization": f"Bearer {c.token.reveal()}"}
        if c.accesskey:
            # VoIPBIN parses a Bearer value as a JWT and refuses a key there: the cookie it is
            return {"Cookie": f"accesskey={c.accesskey.reveal()}"}
        return {}

    async def login(self) -> None:
        """POST /auth/login (at the host root, not under /v1.0) and keep the JWT."""
        c = self.credentials
        if not c.can_login or c.password is None:
            raise ApiError(401, "INVALID_CREDENTIALS", "no username/password to log in with")
        body = {"username": c.username, "password": c.password.reveal()}
        try:
            async with self.session.post(f"{self.root_url}/auth/login", json=body) as resp:
                if resp.status == 400:
                    # VoIPBIN's answer to any refused login (a wrong name or password)
                    raise LoginRefused(400, "LOGIN_FAILED", LOGIN_REFUSED)
                if resp.status != 200:
                    raise LoginError(resp.status, "LOGIN_FAILED", "login failed")
                data = await _read_json(resp)  # a proxy's HTML page is no token either
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise LoginError(0, type(exc).__name__, f"login failed: {_no_answer(exc)}") from None
        token = data.get("token") if isinstance(data, dict) else None
        if not isinstance(token, str) or not token:
            raise LoginError(502, "LOGIN_FAILED", "login answer has no token")
        c.token = Secret(token)
        log.info("voipbin.login", username=c.username)

    async def reauthenticate(self, stale: Secret | None) -> bool:
        """Log in again after a 401, once per stale token; False if we cannot."""
        if not self.credentials.can_login:
            return False
        async with self._login_lock:
            if self.credentials.token is not None and self.credentials.token != stale:
                return True  # someone else already logged in again
            await self.login()
            return True

    async def _reauthenticate_by(
        self, stale: Secret | None, deadline: float, waits: Iterator[float]
    ) -> bool:
        """`reauthenticate`, a login that fails for want of an answer (no answer, a 5xx, a 429
        of the login's own rate limit) tried again until `deadline`. The request that needed it
        was refused with a 401 before it ran: it may go again once a login gets through, a
        `/say` too. Its caller must not take the login's 503 for the request's own: a `/say`
        answered 503 counts against its tts pod, and with `aws` is taken for said."""
        while True:
            try:
                return await self.reauthenticate(stale)
            except LoginRefused:
                raise
            except LoginError as err:
                if err.status not in (0, 429) and err.status < 500:
                    raise
                self.errors += 1
                wait = next(waits)
                if wait >= deadline - time.monotonic():
                    raise
                self.last_retry = f"POST /auth/login: {err}"
                if self.retries is None:
                    log.warning("voipbin.login_retry", error=str(err), wait_s=round(wait, 2))
                else:
                    self.retries.append(str(err))
                await asyncio.sleep(wait)

    # ---- the request loop ------------------------------------------------------------------

    async def request(
        self,
        method: str,
        path: str,
        *,
        json: Any = None,
        params: dict[str, str] | None = None,
        priority: int = BACKGROUND,
        idempotent: bool = True,
        deadline_s: float | None = None,
        timeout_s: float | None = None,
        final: frozenset[int] = frozenset(),
        expected: frozenset[int] = frozenset(),
    ) -> Any:
        """Send one API request with retries; return the decoded JSON body (or None).
        `timeout_s`: each attempt's own, instead of the client's; `final`: statuses that are
        this request's considered answer, raised at once however retryable they look;
        `expected`: statuses its caller expects and takes for an outcome, not a failure (a
        stop of a session already gone: 404), raised at once and counted in neither `errors`
        nor `failures`."""
        deadline = time.monotonic() + (deadline_s or self.deadline_s)
        waits = delays()
        relogged = False
        payload = None if json is None else orjson.dumps(json)  # once, whatever the retries
        answered = False  # with a status in `expected`
        try:
            while True:
                await self.limiter.acquire(priority)
                fence.check()  # the lease may have run out while we queued for the token
                stale = self.credentials.token
                attempt = await self._attempt(method, path, payload, params, timeout_s)
                if not attempt.failed:
                    return attempt.body
                if attempt.status in expected:
                    answered = True
                    raise attempt.api_error() from None
                self.errors += 1
                if attempt.status in final:
                    raise attempt.api_error() from None
                verdict = classify(
                    attempt.status,
                    idempotent=idempotent,
                    reached=attempt.reached,
                    relogged=relogged,
                )
                if verdict == "reauth" and await self._reauthenticate_by(stale, deadline, waits):
                    relogged = True
                    continue
                step = decide(
                    verdict,
                    remaining_s=deadline - time.monotonic(),
                    retry_after=attempt.retry_after,
                    backoff=waits,
                )
                if step.hold_s > 0:  # a 429 only: a 5xx of one request leaves the others' burst
                    self.limiter.penalise(step.hold_s)
                if step.verdict not in ("retry", "rate_limited"):
                    raise attempt.api_error() from None
                self.last_retry = f"{method} {path}: {_retry_reason(attempt, step)}"
                if self.retries is None:
                    _log_retry(method, path, attempt, step)
                else:
                    self.retries.append(_retry_reason(attempt, step))
                await asyncio.sleep(step.wait_s)
        except ApiError:
            if not answered:
                self.failures += 1
            raise

    async def _attempt(
        self,
        method: str,
        path: str,
        payload: bytes | None,
        params: dict[str, str] | None,
        timeout_s: float | None = None,
    ) -> _Attempt:
        """Send the request once: what VoIPBIN answered, or that it did not."""
        sent = False
        headers = self.auth()
        if payload is not None:
            headers["Content-Type"] = "application/json"
        timeout = self._timeout  # not None: for aiohttp that is no timeout at all
        if timeout_s is not None:
            timeout = aiohttp.ClientTimeout(total=timeout_s, sock_connect=timeout.sock_connect)
        try:
            async with self.session.request(
                method,
                self.api_url + path,
                data=payload,
                params=params,
                headers=headers,
                timeout=timeout,
            ) as resp:
                sent = True
                body = await _read_json(resp)
                retry_after = parse_retry_after(resp.headers.get("Retry-After"))
                return _Attempt(resp.status, body, retry_after)
        except (aiohttp.ClientError, TimeoutError) as exc:
            # a request that never connected cannot have reached the server
            reached = sent or not isinstance(exc, aiohttp.ClientConnectorError)
            return _Attempt(0, reached=reached, error=type(exc).__name__, detail=_no_answer(exc))

    # ---- the API ---------------------------------------------------------------------------

    async def customer_id(self) -> str:
        """GET /customer → our customer id (used in WebSocket topics).

        A 403 raises `PermissionDenied` naming what is missing: a login whose agent lacks the
        CustomerAdmin or CustomerManager permission, or a direct (resource-scoped) token. A
        frozen account (403 ACCOUNT_FROZEN) stays a plain `ApiError`: it can be recovered."""
        try:
            body = await self.request("GET", "/customer", priority=SETUP)
        except ApiError as exc:
            if exc.status == 403 and exc.reason != "ACCOUNT_FROZEN":
                raise _customer_denied(exc) from None
            raise
        cid = body.get("id") if isinstance(body, dict) else None
        if not isinstance(cid, str) or not cid:
            raise ApiError(502, "BAD_RESPONSE", "customer has no id")
        return cid

    async def get_call(
        self, call_id: str, *, expected: frozenset[int] = frozenset()
    ) -> dict[str, Any]:
        """GET /calls/{id}; `expected`: the statuses the caller takes for an answer (a call
        over: `CALL_OVER`), no failure."""
        return _obj(await self.request("GET", f"/calls/{call_id}", expected=expected))

    async def recent_calls(
        self, within_s: float = CALL_CAP_S + CLOCK_MARGIN_S, max_pages: int = 50
    ) -> list[dict[str, Any]]:
        """GET /calls, newest first, page after page back to the calls created `within_s` ago
        (by this machine's clock): every call that may still be live. One page is the newest
        100 calls of the account, ended ones and other numbers' included: on a busy account a
        live call can be on the second."""
        horizon = datetime.now(UTC) - timedelta(seconds=within_s)
        found: list[dict[str, Any]] = []
        pages = self._pages("/calls", {"page_size": str(FULL_PAGE)}, max_pages)
        try:
            async with contextlib.aclosing(pages):
                async for call in pages:
                    created = timestamp(call.get("tm_create"))
                    if created is not None and created < horizon:
                        break  # newest first: the rest are older still
                    found.append(call)
        except ApiError as exc:
            if not found:
                raise
            # the newest calls are the likeliest to be live: use them rather than none
            log.warning("voipbin.calls_partial", read=len(found), error=str(exc))
        return found

    async def place_call(
        self, source: str, destination: str, flow_id: str = ""
    ) -> list[dict[str, Any]]:
        """POST /calls to one tel destination; returns the created calls."""
        body: dict[str, Any] = {
            "source": {"type": "tel", "target": source},
            "destinations": [{"type": "tel", "target": destination}],
        }
        if flow_id:
            body["flow_id"] = flow_id
        else:
            # without a flow VoIPBIN hangs the call up right after answer
            body["actions"] = KEEP_CALL_UP
        # placing a call is not idempotent: a retry could ring the callee twice
        resp = await self.request("POST", "/calls", json=body, priority=SETUP, idempotent=False)
        calls = resp.get("calls") if isinstance(resp, dict) else None
        found = [c for c in calls or [] if isinstance(c, dict)]
        if not found and isinstance(resp, dict):
            # the docs' tutorial reads tel calls from groupcalls[].call_ids: accept that too
            for group in resp.get("groupcalls") or []:
                ids = group.get("call_ids") if isinstance(group, dict) else None
                found += [{"id": i} for i in ids or [] if isinstance(i, str)]
        return found

    async def hangup(self, call_id: str) -> None:
        """POST /calls/{id}/hangup (idempotent). A 409 is success: the call already ended.

        The server code answers 200 to a hangup of an ended call, but the OpenAPI spec and the
        docs promise 409 CALL_ALREADY_HANGUP; either way the call is over, which is what the
        caller of this method wants to know."""
        try:
            await self.request(
                "POST", f"/calls/{call_id}/hangup", priority=URGENT, expected=CALL_OVER
            )
        except ApiError as exc:
            if exc.status != 409:
                raise
            log.info("voipbin.hangup_already_ended", call_id=call_id, reason=exc.reason)

    async def transfer(self, transferer_call_id: str, number: str) -> None:
        """POST /transfers: a blind transfer; VoIPBIN hangs the transferer up and rings `number`
        into the confbridge the transferer was in (docs/protocol.md §9)."""
        body = {
            "transfer_type": "blind",
            "transferer_call_id": transferer_call_id,
            "transferee_addresses": [{"type": "tel", "target": number}],
        }
        await self.request("POST", "/transfers", json=body, priority=URGENT, idempotent=False)

    async def start_transcribe(
        self, call_id: str, language: str, provider: str, direction: str = "in"
    ) -> str:
        """POST /transcribes → transcribe id. A 409 means one already runs on the call."""
        body = {
            "reference_type": "call",
            "reference_id": call_id,
            "language": language,
            "direction": direction,
        }
        if provider:
            body["provider"] = provider
        # Waited for as long as VoIPBIN may take: its duplicate check comes before the media
        # start and the row after it (bin-transcribe-manager `start.go` `startLive`), so a
        # start sent again while the first is still starting makes a second transcribe, billed
        # beside the first. After this long the first has its row: a 409 answers a retry. An
        # error answered at once is retried for a few seconds only, and a 500 not at all: it
        # is VoIPBIN's answer for a call no longer dialing, ringing or progressing
        # (transcribehandler/start.go `isValidReference`), the usual one when the caller hung
        # up while the start waited, and sent again it only spends the account's budget on a
        # call that is gone. The call itself tries again later, while it lives.
        raw = await self.request(
            "POST",
            "/transcribes",
            json=body,
            priority=SETUP,
            timeout_s=TRANSCRIBE_START_TIMEOUT_S,
            deadline_s=TRANSCRIBE_START_RETRY_S,
            final=_NOT_A_LIVE_CALL,
        )
        return _id(raw)

    async def find_transcribe(self, call_id: str, language: str) -> str | None:
        """The live transcribe on a call (after a 409), or None."""
        live = await self.live_transcribes(call_id, language)
        return live[0] if live else None

    async def live_transcribes(self, call_id: str, language: str) -> list[str]:
        """The ids of the call's transcribes in `language` that are `progressing`."""
        body = await self.request(
            "GET", "/transcribes", params={"reference_type": "call", "reference_id": call_id}
        )
        return [
            _id(t)
            for t in _result(body)
            if t.get("status") == "progressing"
            and t.get("reference_id", call_id) == call_id
            and same_language(str(t.get("language", language)), language)
        ]

    async def stop_transcribe(self, transcribe_id: str) -> None:
        """POST /transcribes/{id}/stop (idempotent)."""
        await self.request(
            "POST",
            f"/transcribes/{transcribe_id}/stop",
            priority=URGENT,
            deadline_s=STOP_DEADLINE_S,
            expected=GONE,
        )

    async def transcripts(self, transcribe_id: str) -> AsyncIterator[dict[str, Any]]:
        """Every transcript of a transcribe, following `next_page_token`, deduplicated by id."""
        async for t in self._pages("/transcripts", {"transcribe_id": transcribe_id}, 100):
            yield t

    async def _pages(
        self, path: str, params: dict[str, str], max_pages: int
    ) -> AsyncGenerator[dict[str, Any], None]:
        """The items of a list, page after page (`next_page_token`, at most `max_pages`),
        deduplicated by id; it ends on a page shorter than a full one (VoIPBIN's default and
        largest, 100, unless `page_size` asks fewer), an empty one or a token seen before."""
        seen: set[str] = set()
        token = ""
        full = int(params.get("page_size", FULL_PAGE))
        for _ in range(max_pages):
            query = {**params, "page_token": token} if token else params
            body = await self.request("GET", path, params=query)
            items = _result(body)
            for item in items:
                iid = item.get("id")
                if isinstance(iid, str) and iid not in seen:
                    seen.add(iid)
                    yield item
            nxt = body.get("next_page_token") if isinstance(body, dict) else None
            if len(items) < full or not isinstance(nxt, str) or not nxt or nxt == token:
                return  # a short page is the last: asking for the next costs a request
            token = nxt

    async def transcripts_in_order(self, transcribe_id: str) -> list[dict[str, Any]]:
        """Every transcript, oldest first (the API answers newest first)."""
        items = [t async for t in self.transcripts(transcribe_id)]

        return sorted(items, key=transcript_order)

    async def start_speaking(
        self, call_id: str, language: str, provider: str, voice_id: str
    ) -> dict[str, Any]:
        """POST /speakings (direction out: what the caller hears) → the Speaking."""
        body = {
            "reference_type": "call",
            "reference_id": call_id,
            "language": language,
            "provider": provider,
            "voice_id": voice_id,
            "direction": "out",
        }
        # not retried on 5xx: the server may have created it (one live session per call)
        return _obj(
            await self.request("POST", "/speakings", json=body, priority=SETUP, idempotent=False)
        )

    async def list_speakings(self, max_pages: int = SPEAKING_PAGES) -> list[dict[str, Any]]:
        """GET /speakings, newest first, `max_pages` pages of 100 at most, deduplicated by id.

        Stopped sessions stay in the list: on a busy account the first page may hold none of a
        call's, created a minute ago."""
        return [s async for s in self._pages("/speakings", {"page_size": "100"}, max_pages)]

    async def get_speaking(
        self, speaking_id: str, *, expected: frozenset[int] = frozenset()
    ) -> dict[str, Any]:
        """GET /speakings/{id}; `expected` as for `get_call` (`GONE`)."""
        return _obj(await self.request("GET", f"/speakings/{speaking_id}", expected=expected))

    async def say(self, speaking_id: str, text: str) -> None:
        """POST /speakings/{id}/say; never re-sent once it may have reached the server."""
        await self.request(
            "POST",
            f"/speakings/{speaking_id}/say",
            json={"text": text},
            priority=URGENT,
            idempotent=False,
        )

    async def flush(self, speaking_id: str) -> None:
        """POST /speakings/{id}/flush, retried for `FLUSH_DEADLINE_S` at most."""
        await self.request(
            "POST",
            f"/speakings/{speaking_id}/flush",
            priority=URGENT,
            deadline_s=FLUSH_DEADLINE_S,
            expected=GONE,  # nothing was playing any more
        )

    async def stop_speaking(self, speaking_id: str) -> None:
        """POST /speakings/{id}/stop (idempotent)."""
        await self.request(
            "POST",
            f"/speakings/{speaking_id}/stop",
            priority=URGENT,
            deadline_s=STOP_DEADLINE_S,
            expected=GONE,
        )

    async def delete_speaking(self, speaking_id: str) -> str:
        """DELETE /speakings/{id}: removes the session even when its tts pod is gone.

        Returns the status the deleted row was left in. VoIPBIN stops the stream on its pod
        first, but only logs a stop that failed (bin-api-manager `servicehandler/speaking.go`
        `SpeakingDelete`) and answers 200 all the same: `"active"` then means a row deleted
        over a stream nobody stopped (its `speaking_stopped`, which ends the billing, never
        comes)."""
        body = await self.request(
            "DELETE",
            f"/speakings/{speaking_id}",
            priority=URGENT,
            deadline_s=STOP_DEADLINE_S,
            expected=GONE,
        )
        return str(body.get("status", "")) if isinstance(body, dict) else ""

    async def delete_transcribe(self, transcribe_id: str) -> None:
        """DELETE /transcribes/{id}: for a transcribe a /stop cannot end (an orphan)."""
        await self.request(
            "DELETE",
            f"/transcribes/{transcribe_id}",
            priority=URGENT,
            deadline_s=STOP_DEADLINE_S,
            expected=GONE,
        )


#: The origin of an older server's `tm_transcript` (year 1 plus the offset)
_YEAR_ONE = datetime(1, 1, 1, tzinfo=UTC)


def transcript_order(t: dict[str, Any]) -> tuple[float, float]:
    """A transcript's place in its transcribe: `offset_ms`, or on older servers the time of its
    `tm_transcript` (else `tm_create`). Compared as times, not text: Go trims a fraction's
    trailing zeros (REFERENCE.md §6), and "…:08.5Z" sorts before "…:08Z" as text."""
    offset = t.get("offset_ms")
    if isinstance(offset, (int, float)):
        return (float(offset), 0.0)
    at = timestamp(t.get("tm_transcript")) or timestamp(t.get("tm_create"))
    return (0.0, (at - _YEAR_ONE).total_seconds() if at is not None else 0.0)


#: How long one stop (or delete) retries on its own. A call escalates a stop that failed (to a
#: DELETE, which works without the session's dead pod) and retries it later: a stop retried here
#: for the whole request deadline would only hold up the session's other commands.
STOP_DEADLINE_S = 4.0
#: How long a flush retries. It is worth something only at once: the session's later `/say`s
#: wait behind it, and a flush that got through late would cut the next reply.
FLUSH_DEADLINE_S = 1.0


async def _read_json(resp: aiohttp.ClientResponse) -> Any:
    """The body as JSON (orjson: a fifth of the stdlib's time here), None if it is not."""
    raw = (await resp.read()).strip()
    if not raw:
        return None
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError:
        pass
    try:  # what orjson refuses and the stdlib reads (NaN, a charset other than UTF-8, ...)
        return json_module.loads(raw.decode(resp.get_encoding(), "replace"))
    except (ValueError, RecursionError, LookupError):
        return None


def customer_hint(exc: BaseException) -> str | None:
    """What to check when GET /customer failed in a way no retry fixes by itself."""
    if isinstance(exc, ApiError) and exc.status == 404:
        # GET /customer is on every VoIPBIN: a 404 is a base URL without its version path
        return "GET /customer answered 404: check voipbin.api_url (it ends in /v1.0)"
    return None


def _no_answer(exc: BaseException) -> str:
    """Why VoIPBIN gave no answer, for an operator: where a connection failed, or that it timed
    out."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return cannot_connect(exc)
    if isinstance(exc, TimeoutError):
        return "no answer in time (voipbin.timeout_s)"
    return "no answer from VoIPBIN"


def _retry_reason(attempt: _Attempt, step: Decision) -> str:
    if step.verdict == "rate_limited":
        return "rate limited (429)"
    return f"HTTP {attempt.status}" if attempt.status else str(attempt.api_error())


def _log_retry(method: str, path: str, attempt: _Attempt, step: Decision) -> None:
    if step.verdict == "rate_limited":
        log.warning("voipbin.rate_limited", method=method, path=path, wait_s=step.wait_s)
    elif attempt.status == 0:
        log.warning("voipbin.retry", method=method, path=path, error=str(attempt.api_error()))
    else:
        log.warning("voipbin.retry", method=method, path=path, status=attempt.status)


def _customer_denied(exc: ApiError) -> PermissionDenied:
    """The 403 of GET /customer, saying which permission the credentials lack."""
    if exc.reason == "DIRECT_ACCESS_NOT_SUPPORTED":
        why = "a direct (resource-scoped) token cannot read the customer; use an access key"
    else:
        why = (
            f"the login lacks the {CUSTOMER_PERMISSIONS} permission that GET /customer and the "
            "customer-wide event topics need: grant it to that agent, or use an access key"
        )
    return PermissionDenied(403, exc.reason or "PERMISSION_DENIED", why, exc.request_id)


def _api_error(status: int, body: Any) -> ApiError:
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        return ApiError(
            status,
            str(err.get("reason") or err.get("status") or ""),
            # redacted before it is cut: a key the server echoes, cut in two, is no longer
            # the key the redaction knows, and its first part would show
            redact(str(err.get("message") or ""))[:200],
            str(err.get("request_id") or ""),
        )
    return ApiError(status)


def _obj(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(502, "BAD_RESPONSE", "expected a JSON object")
    return body


def _id(body: Any) -> str:
    value = _obj(body).get("id")
    if not isinstance(value, str) or not value:
        raise ApiError(502, "BAD_RESPONSE", "answer has no id")
    return value


def _result(body: Any) -> list[dict[str, Any]]:
    items = body.get("result") if isinstance(body, dict) else body
    return [i for i in items if isinstance(i, dict)] if isinstance(items, list) else []
