"""The REST client's error paths: retries that are safe, never a /say twice, budgets, re-login."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import structlog.testing
from aiohttp import web
from aioresponses import aioresponses
from yarl import URL

from agentd.ratelimit import (
    BACKGROUND,
    TOOL_BURST,
    TOOL_RATE_PER_S,
    URGENT,
    VOIPBIN_BURST,
    VOIPBIN_RATE_PER_S,
    RateLimiter,
    tool_budget,
)
from agentd.secret import Secret
from agentd.sim import Caller, Simulator
from agentd.sim.model import SimSpeaking, SimTranscript
from agentd.voipbin import (
    TRANSCRIBE_START_RETRY_S,
    ApiError,
    Credentials,
    LoginRefused,
    PermissionDenied,
    VoipbinClient,
)
from tests import conftest
from tests.support import CALLER, OUR_NUMBER, StartAgent, serving

API = "http://voipbin.test/v1.0"


def client_for(sim: Simulator, **kw: float) -> VoipbinClient:
    return VoipbinClient(sim.api_url, Credentials(accesskey=Secret(sim.accesskey)), **kw)


async def answered(sim: Simulator) -> str:
    """An answered call that stays up."""
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_call_status(call_id, "progressing")
    return call_id


async def live_speaking(sim: Simulator, client: VoipbinClient) -> str:
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_call_status(call_id, "progressing")
    return str((await client.start_speaking(call_id, "en-US", "gcp", "v"))["id"])


async def test_a_say_that_may_have_been_spoken_is_never_sent_again(sim: Simulator) -> None:
    client = client_for(sim)
    try:
        sid = await live_speaking(sim, client)
        # the server speaks it, then answers 500: a retry would make the caller hear it twice
        sim.faults.fail("POST", r"/say$", 500, count=1, apply=True)
        with pytest.raises(ApiError) as info:
            await client.say(sid, "Only once.")
        assert info.value.status == 500
        assert len(sim.requests_matching("POST", r"/say$")) == 1
    finally:
        await client.close()


async def test_idempotent_requests_are_retried_through_5xx(sim: Simulator) -> None:
    client = client_for(sim)
    try:
        sid = await live_speaking(sim, client)
        sim.faults.fail("POST", r"/stop$", 503, count=2)
        await client.stop_speaking(sid)
        assert [r.status for r in sim.requests_matching("POST", r"/stop$")] == [503, 503, 200]
        assert sim.speakings[sid].status == "stopped"
    finally:
        await client.close()


async def test_failed_attempts_and_failed_requests_are_counted_apart(sim: Simulator) -> None:
    # what agentd_rest_errors_total and agentd_rest_requests_failed_total read: a retry that
    # then succeeds is an error but no failure, a request given up on is one failure
    client = client_for(sim, deadline_s=0.5)
    try:
        sim.faults.fail("GET", r"/customer$", 503, count=2)
        assert await client.customer_id() == sim.customer_id
        assert (client.errors, client.failures) == (2, 0)
        sim.faults.fail("GET", r"/customer$", 503, count=1000)
        with pytest.raises(ApiError):
            await client.customer_id()
        attempts = len(sim.requests_matching("GET", r"/customer$"))
        assert attempts >= 5  # the 2 + 1 above, and at least two retries before the deadline
        assert (client.errors, client.failures) == (attempts - 1, 1)
    finally:
        await client.close()


async def test_answers_a_caller_expects_are_no_failures(sim: Simulator) -> None:
    # a stop of a session already gone (404) and a hangup of a call already over (409) are
    # the answers a hangup brings: not counted as errors nor failed requests. A refusal is
    client = client_for(sim)
    try:
        sid = await live_speaking(sim, client)
        sim.faults.fail("POST", r"/stop$", 404, apply=True)
        with pytest.raises(ApiError) as info:
            await client.stop_speaking(sid)
        assert info.value.status == 404
        sim.faults.fail("DELETE", r"/speakings/", 404)
        with pytest.raises(ApiError):
            await client.delete_speaking(sid)
        call_id = await answered(sim)
        sim.faults.fail("POST", r"/hangup$", 409, apply=True)
        await client.hangup(call_id)  # over already: done
        assert (client.errors, client.failures) == (0, 0)
        sim.faults.fail("POST", r"/stop$", 400)
        with pytest.raises(ApiError):
            await client.stop_speaking(sid)
        assert (client.errors, client.failures) == (1, 1)
    finally:
        await client.close()


async def test_a_5xx_retry_leaves_the_shared_budget_alone(sim: Simulator) -> None:
    # only a 429 holds the budget every call shares: a 503 of one request is no reason to take
    # the burst from the others (it was cut to a single request)
    client = client_for(sim, rate_per_s=1.0, burst=10)
    try:
        sid = await live_speaking(sim, client)
        sim.faults.fail("POST", r"/stop$", 503, count=1)
        await client.stop_speaking(sid)
        assert [r.status for r in sim.requests_matching("POST", r"/stop$")] == [503, 200]
        for _ in range(5):  # at 1 request/s, each would wait a second without its burst
            await asyncio.wait_for(client.limiter.acquire(), 0.5)
    finally:
        await client.close()


@pytest.mark.slow  # waits out a real Retry-After: 1 s
async def test_429_waits_for_retry_after_even_for_a_say(sim: Simulator) -> None:
    client = client_for(sim)
    try:
        sid = await live_speaking(sim, client)
        sim.faults.fail("POST", r"/say$", 429, count=1, retry_after=0.2)
        await client.say(sid, "After the wait.")  # a 429 was refused at the gate: safe to resend
        first, second = sim.requests_matching("POST", r"/say$")
        assert (first.status, second.status) == (429, 200)
        assert second.t - first.t >= 0.2
    finally:
        await client.close()


async def test_4xx_is_final(sim: Simulator) -> None:
    client = client_for(sim)
    try:
        with pytest.raises(ApiError) as info:
            await client.get_call("00000000-0000-0000-0000-00000000abcd")
        assert (info.value.status, info.value.reason) == (404, "CALL_NOT_FOUND")
        assert len(sim.requests_matching("GET", r"/calls/")) == 1
    finally:
        await client.close()


async def test_expired_jwt_logs_in_again_once(sim: Simulator) -> None:
    creds = Credentials(username=sim.settings.username, password=Secret("demo-password"))
    sim.settings.password = "demo-password"
    client = VoipbinClient(sim.api_url, creds)
    try:
        await client.login()
        first = creds.token
        sim.faults.expire_tokens()
        assert await client.customer_id() == sim.customer_id
        assert creds.token is not None and creds.token != first
        statuses = [r.status for r in sim.requests_matching("GET", r"/customer$")]
        assert statuses == [401, 200]
    finally:
        await client.close()


@pytest.mark.parametrize("status", [503, 429])
async def test_a_login_outage_is_waited_out_and_the_refused_say_sent_once(
    sim: Simulator, status: int
) -> None:
    """A /say refused 401 never ran: while the login that must follow it fails for want of an
    answer (a 503, its own per-IP rate limit's 429), the say waits for a login that gets
    through and goes out then, once. Raising the login's 503 as the say's own would count
    against the session's tts pod (two in a row replace a healthy session) and, with `aws`,
    be taken for a say that played: the caller would never hear the reply."""
    creds = Credentials(username=sim.settings.username, password=Secret("demo-password"))
    sim.settings.password = "demo-password"
    client = VoipbinClient(sim.api_url, creds)
    try:
        await client.login()
        speaking_id = await live_speaking(sim, client)
        sim.faults.expire_tokens()
        sim.faults.fail("POST", r"^/auth/login$", status, count=2, retry_after=0.2)
        await client.say(speaking_id, "Our hours are nine to five.")
        logins = [r.status for r in sim.requests_matching("POST", r"^/auth/login$")]
        assert logins == [200, status, status, 200]
        says = [r.status for r in sim.requests_matching("POST", r"/say$")]
        assert says == [401, 200]
    finally:
        await client.close()


async def test_a_wrong_password_is_a_refused_login_not_an_outage(sim: Simulator) -> None:
    creds = Credentials(username=sim.settings.username, password=Secret("Wrong-Password-42"))
    client = VoipbinClient(sim.api_url, creds)
    try:
        with pytest.raises(LoginRefused) as info:
            await client.customer_id()  # no token yet: a 401, then the login
        assert str(info.value) == (
            "HTTP 400 LOGIN_FAILED login refused: check voipbin.username and voipbin.password"
        )
        assert [r.status for r in sim.requests_matching("POST", r"/auth/login$")] == [400]
    finally:
        await client.close()


async def test_wrong_credentials_are_not_retried(sim: Simulator) -> None:
    client = VoipbinClient(sim.api_url, Credentials(accesskey=Secret("vb_wrong_key_123")))
    try:
        with pytest.raises(ApiError) as info:
            await client.customer_id()
        assert info.value.status == 401
        assert "vb_wrong_key_123" not in str(info.value)
    finally:
        await client.close()


async def test_unreachable_server_gives_up_at_the_deadline() -> None:
    client = VoipbinClient(
        "http://127.0.0.1:9/v1.0", Credentials(token=Secret("jwt.a.b")), deadline_s=0.3
    )
    try:
        with pytest.raises(ApiError) as info:
            await client.hangup("c1")
        assert info.value.status == 0
    finally:
        await client.close()


async def test_a_failing_flush_gives_up_soon_and_a_stop_later(sim: Simulator) -> None:
    # a flush is worth something only at once: the session's next /say waits behind it
    client = VoipbinClient(sim.api_url, Credentials(accesskey=Secret(sim.accesskey)))
    try:
        sim.faults.fail("POST", r"/flush$", 503, count=100)
        with pytest.raises(ApiError) as info:
            await client.flush("s1")
        assert info.value.status == 503
        flushes = len(sim.requests_matching("POST", r"/flush$"))
        sim.faults.fail("POST", r"/stop$", 503, count=100)
        with pytest.raises(ApiError):
            await client.stop_speaking("s1")
        stops = len(sim.requests_matching("POST", r"/stop$"))
        # the same backoff, a quarter of the time: fewer tries
        assert 2 <= flushes < stops
    finally:
        await client.close()


async def test_the_speakings_are_read_past_the_first_page(sim: Simulator) -> None:
    # stopped sessions stay in the list, newest first: on a busy account a call's session,
    # a minute old, is pages down
    old = datetime.now(UTC) - timedelta(minutes=1)

    def speaking(sid: str, status: str, at: datetime) -> SimSpeaking:
        return SimSpeaking(
            sid,
            sim.customer_id,
            "call",
            f"call-{sid}",
            "en-US",
            "elevenlabs",
            "",
            "out",
            status,
            at,
        )

    sim.world.speakings["spk-ours"] = speaking("spk-ours", "active", old)
    for n in range(1, 251):
        at = old + timedelta(seconds=n / 10)
        sim.world.speakings[f"spk-{n}"] = speaking(f"spk-{n}", "stopped", at)
    client = VoipbinClient(sim.api_url, Credentials(accesskey=Secret(sim.accesskey)))
    try:
        listed = await client.list_speakings()
    finally:
        await client.close()
    assert len(listed) == 251 and listed[-1]["id"] == "spk-ours"
    # three pages: the third, short, is the last (asking for a fourth costs a request)
    assert len(sim.requests_matching("GET", r"/speakings$")) == 3


async def test_recent_calls_go_back_an_hour_and_no_further(sim: Simulator) -> None:
    # VoIPBIN hangs every call up after an hour: older pages of the account's history (ended
    # calls are listed too) cannot hold a live call and are not read
    ids = [sim.inbound_call(f"+1555800{i:04d}", "+15559990000") for i in range(130)]
    long_ago = datetime.now(UTC) - timedelta(hours=1, minutes=30)
    for n, call_id in enumerate(ids[:120]):
        sim.world.calls[call_id].tm_create = long_ago + timedelta(seconds=n)
    client = client_for(sim)
    try:
        recent = await client.recent_calls()
    finally:
        await client.close()
    assert {c["id"] for c in recent} == set(ids[120:])
    assert len(sim.requests_matching("GET", r"/calls$")) == 1  # page one ends in old calls


@pytest.mark.parametrize("legacy", [False, True], ids=["paged", "paging ignored"])
async def test_transcripts_are_read_back_from_either_server_without_looping(
    sim: Simulator, legacy: bool
) -> None:
    # before 2026-09 VoIPBIN ignored page_size and page_token: every page is the 100 newest,
    # with the same next_page_token. Read twice, then stopped on the repeated token (not
    # requested up to the page limit, a hundred times)
    sim.settings.legacy_transcripts = legacy
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_call_status(call_id, "progressing")
    trn = sim.speech.start_transcribe(sim.get_call(call_id), "en-US", "in", "aws")
    for n in range(130):
        tsc = SimTranscript(
            id=f"tsc-{n:03d}",
            customer_id=sim.customer_id,
            transcribe_id=trn.id,
            direction="in",
            message=f"sentence {n}",
            offset_ms=1000 * n + 250 * (n % 4),
            tm_create=sim.world.clock.now(),
            legacy=legacy,
        )
        sim.world.transcripts[tsc.id] = tsc
    client = client_for(sim)
    try:
        read = await client.transcripts_in_order(trn.id)
    finally:
        await client.close()
    kept = range(30, 130) if legacy else range(130)  # the old server never lists the first 30
    assert [t["message"] for t in read] == [f"sentence {n}" for n in kept]
    assert len(sim.requests_matching("GET", r"/transcripts$")) == 2


# ---- aioresponses: shapes the simulator never produces ---------------------------------------


async def test_error_without_envelope_and_garbage_retry_after() -> None:
    client = VoipbinClient(API, Credentials(accesskey=Secret("vb_unit_test_key")), deadline_s=0.5)
    try:
        with aioresponses() as mock:
            mock.post(f"{API}/speakings/s1/flush", status=404, body="not json")
            mock.get(
                f"{API}/customer",
                status=429,
                headers={"Retry-After": "soon"},
                payload={"error": {"reason": "X"}},
            )
            mock.get(f"{API}/customer", status=200, payload=[])
            with pytest.raises(ApiError) as flush:
                await client.flush("s1")
            assert (flush.value.status, flush.value.reason) == (404, "")
            with pytest.raises(ApiError) as customer:  # a 200 that is not a customer object
                await client.customer_id()
            assert customer.value.reason == "BAD_RESPONSE"
    finally:
        await client.close()
    assert not conftest.AIORESPONSES_SHIM or conftest._ShimResponse.shim_calls >= 3


async def test_recent_calls_keep_the_pages_read_when_a_later_one_fails() -> None:
    # the newest calls are the likeliest to be live: a refused second page must not lose them
    client = VoipbinClient(API, Credentials(accesskey=Secret("vb_unit_test_key")), deadline_s=0.5)
    now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    newest = [{"id": f"c-{n}", "tm_create": now} for n in range(100)]  # a full page
    page = {"result": newest, "next_page_token": now}
    calls = re.compile(rf"^{re.escape(API)}/calls\?")
    try:
        with aioresponses() as mock:
            mock.get(calls, status=200, payload=page)
            mock.get(calls, status=403, payload={"error": {"reason": "PERMISSION_DENIED"}})
            mock.get(calls, status=403, payload={"error": {"reason": "PERMISSION_DENIED"}})
            with structlog.testing.capture_logs() as logs:
                recent = await client.recent_calls()
            assert [c["id"] for c in recent] == [c["id"] for c in newest]
            assert [e["read"] for e in logs if e["event"] == "voipbin.calls_partial"] == [100]
            with pytest.raises(ApiError):  # nothing read: the caller hears of the failure
                await client.recent_calls()
    finally:
        await client.close()


async def test_transcripts_of_an_older_server_are_read_back_in_the_order_they_were_said() -> None:
    # tm_transcript is year 1 plus the offset, in Go's RFC 3339 with trailing zeros trimmed
    # (REFERENCE.md §6): "08Z" is 8 s, "08.5Z" 8.5 s; as text, "08.5Z" < "08Z" < "08.25Z"
    client = VoipbinClient(API, Credentials(accesskey=Secret("vb_unit_test_key")), deadline_s=0.5)
    said = ["08", "08.25", "08.5", "09.004", "10"]  # seconds since the transcribe started
    newest_first = [
        {"id": f"t-{s}", "transcribe_id": "t", "direction": "in", "message": s,
         "tm_transcript": f"0001-01-01T00:00:{s}Z", "tm_create": "2026-08-20T10:00:15Z"}
        for s in reversed(said)
    ]  # fmt: skip
    try:
        with aioresponses() as mock:
            mock.get(
                re.compile(rf"^{re.escape(API)}/transcripts\?"),
                status=200,
                payload={"result": newest_first, "next_page_token": ""},
            )
            read = await client.transcripts_in_order("t")
        assert [t["message"] for t in read] == said
    finally:
        await client.close()


async def test_a_login_answered_200_without_a_json_token_is_a_clear_error() -> None:
    # a captive portal or a proxy's HTML page answers 200 too: no token, not a JSON error
    login = "http://voipbin.test/auth/login"
    client = VoipbinClient(API, Credentials(username="ops", password=Secret("pw-unit-test-1")))
    try:
        with aioresponses() as mock:
            mock.post(login, status=200, body="<html>Sign in to the Wi-Fi</html>")
            mock.post(login, status=200, payload={"token": ""})
            for _ in range(2):
                with pytest.raises(ApiError) as info:
                    await client.login()
                assert str(info.value) == "HTTP 502 LOGIN_FAILED login answer has no token"
        assert client.credentials.token is None
    finally:
        await client.close()


# ---- the budget ---------------------------------------------------------------------------


async def test_rate_limiter_serves_urgent_requests_first() -> None:
    limiter = RateLimiter(rate=100.0, burst=1)
    await limiter.acquire()  # the burst is spent: the next token comes in 10 ms
    order: list[str] = []

    async def take(name: str, prio: int) -> None:
        await limiter.acquire(prio)
        order.append(name)

    tasks = [asyncio.create_task(take(f"poll{i}", BACKGROUND)) for i in range(3)]
    tasks.append(asyncio.create_task(take("say", URGENT)))  # queued last, served first
    await asyncio.sleep(0)  # one loop pass: every waiter is queued long before the next token
    assert limiter.queue_depth == 4
    await asyncio.gather(*tasks)
    assert order == ["say", "poll0", "poll1", "poll2"]
    assert limiter.queue_depth == 0


async def test_a_429_spends_the_budget() -> None:
    limiter = RateLimiter(rate=1000.0, burst=50)
    limiter.penalise(0.05)  # nothing for 50 ms, whatever the burst
    loop = asyncio.get_running_loop()
    start = loop.time()
    await limiter.acquire(URGENT)
    assert loop.time() - start >= 0.04


async def test_placed_call_found_in_groupcalls_as_the_docs_show() -> None:
    client = VoipbinClient(API, Credentials(accesskey=Secret("vb_unit_test_key")))
    try:
        with aioresponses() as mock:
            mock.post(
                f"{API}/calls",
                status=200,
                payload={"calls": [], "groupcalls": [{"id": "g1", "call_ids": ["c9"]}]},
            )
            assert await client.place_call("+1555", "+1666") == [{"id": "c9"}]
            (sent,) = mock.requests[("POST", URL(f"{API}/calls"))]
            assert sent.kwargs["headers"]["Cookie"] == "accesskey=vb_unit_test_key"
            assert not sent.kwargs.get("params")  # nothing in the URL
    finally:
        await client.close()


# ---- bodies both ways ------------------------------------------------------------------------


async def test_json_bodies_both_ways_including_what_orjson_refuses() -> None:
    """Requests carry UTF-8 JSON with its content type; answers are read as the stdlib would:
    an empty or non-JSON body is None, NaN and a declared latin-1 charset still decode."""
    got: list[tuple[str, bytes]] = []
    answers = iter(
        [
            web.Response(body=b"", content_type="application/json"),
            web.Response(text="<html>gateway</html>", content_type="text/html"),
            web.Response(body=b'{"id": "s1", "level": NaN}', content_type="application/json"),
            web.Response(
                body='{"id": "caf\xe9"}'.encode("latin-1"),
                headers={"Content-Type": "application/json; charset=latin-1"},
            ),
            web.Response(body=' {"id": "ünï"} '.encode(), content_type="application/json"),
        ]
    )

    async def handle(request: web.Request) -> web.Response:
        got.append((request.headers.get("Content-Type", ""), await request.read()))
        return next(answers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    async with serving(app) as port:
        url = f"http://127.0.0.1:{port}/v1.0"
        client = VoipbinClient(url, Credentials(accesskey=Secret("vb_body_test_key")))
        try:
            bodies = [
                await client.request("POST", "/speakings/s1/say", json={"text": "ça va ? 残高"}),
                await client.request("GET", "/calls/c1"),
                await client.request("GET", "/calls/c1"),
                await client.request("GET", "/calls/c1"),
                await client.request("GET", "/calls/c1"),
            ]
        finally:
            await client.close()
    assert bodies[:2] == [None, None]
    assert bodies[2]["id"] == "s1" and bodies[2]["level"] != bodies[2]["level"]  # NaN
    assert bodies[3:] == [{"id": "café"}, {"id": "ünï"}]
    content_type, sent = got[0]
    assert content_type == "application/json"
    assert json.loads(sent.decode("utf-8")) == {"text": "ça va ? 残高"}
    assert [c for c, _ in got[1:]] == [""] * 4  # no body, no content type


# ---- credentials travel in headers, never in a URL ---------------------------------------------


class Recorder:
    """A loopback HTTP server that answers every request with `{}` and keeps what it got."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, dict[str, str]]] = []  # (path with query, headers)
        self.url = ""

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.append((request.path_qs, dict(request.headers)))
        return web.json_response({"id": "cust-1", "result": []})


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/v1.0"
    yield rec
    await runner.cleanup()


async def test_the_access_key_is_a_cookie_header(recorder: Recorder) -> None:
    client = VoipbinClient(recorder.url, Credentials(accesskey=Secret("vb_cookie_only_key")))
    try:
        await client.customer_id()
        await client.find_transcribe("c1", "en-US")  # a request with query parameters
        await client.hangup("c1")
    finally:
        await client.close()
    assert [path for path, _ in recorder.seen] == [
        "/v1.0/customer",
        "/v1.0/transcribes?reference_type=call&reference_id=c1",
        "/v1.0/calls/c1/hangup",
    ]
    for _, headers in recorder.seen:
        assert headers["Cookie"] == "accesskey=vb_cookie_only_key"
        assert "Authorization" not in headers


async def test_a_jwt_stays_a_bearer_header_and_wins_over_a_key(recorder: Recorder) -> None:
    creds = Credentials(accesskey=Secret("vb_unused_key"), token=Secret("aaa.bbb.ccc"))
    client = VoipbinClient(recorder.url, creds)
    try:
        await client.customer_id()
    finally:
        await client.close()
    ((path, headers),) = recorder.seen
    assert path == "/v1.0/customer"
    assert headers["Authorization"] == "Bearer aaa.bbb.ccc"
    assert "vb_unused_key" not in str(headers)


async def test_no_request_of_a_whole_call_carries_the_key_in_its_url(
    sim: Simulator, agent: StartAgent
) -> None:
    await agent()
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_for(lambda: bool(sim.requests_matching("POST", r"/say$")))
    await sim.hangup(call_id)
    await sim.wait_for(lambda: not sim.leaks())
    upgrades = [r for r in sim.requests if r.path == "/v1.0/ws"]
    assert upgrades and all(r.status == 101 for r in upgrades)  # the cookie was accepted
    assert len(sim.requests) > 5
    for request in sim.requests:
        assert "accesskey" not in request.query, request.path
        assert request.status != 401, request.path


# ---- no answer, in words -----------------------------------------------------------------------


async def test_a_name_that_does_not_resolve_says_so() -> None:
    # getaddrinfo's error codes are no errnos: os.strerror(-2) read "Unknown error -2"
    client = VoipbinClient(
        "http://api.voipbin.invalid/v1.0", Credentials(accesskey=Secret("vb_dns_test_key"))
    )
    client.deadline_s = 0.01  # one try is enough
    try:
        with pytest.raises(ApiError) as info:
            await client.customer_id()
    finally:
        await client.close()
    message = str(info.value)
    assert message.startswith("ClientConnectorDNSError: cannot resolve api.voipbin.invalid: ")
    assert "Unknown error" not in message


async def test_a_tls_failure_is_not_an_os_error(recorder: Recorder) -> None:
    # https to a plain HTTP server: OpenSSL's code 1 is no errno ("Operation not permitted")
    url = recorder.url.replace("http://", "https://")
    client = VoipbinClient(url, Credentials(accesskey=Secret("vb_tls_test_key")))
    client.deadline_s = 0.01
    try:
        with pytest.raises(ApiError) as info:
            await client.customer_id()
    finally:
        await client.close()
    host_port = url.split("/")[2]
    assert str(info.value).startswith(
        f"ClientConnectorSSLError: cannot connect to {host_port}: TLS: [SSL: "
    )
    assert "Operation not permitted" not in str(info.value)


# ---- hangup, permissions, the budget ------------------------------------------------------------


async def test_the_transcribe_a_409_speaks_of_is_found_whatever_case_the_language_was_in(
    sim: Simulator,
) -> None:
    client = client_for(sim)
    try:
        call_id = await answered(sim)
        tid = await client.start_transcribe(call_id, "en_us", "")  # kept as en-US
        with pytest.raises(ApiError) as info:
            await client.start_transcribe(call_id, "EN-US", "")
        assert info.value.status == 409
        assert await client.find_transcribe(call_id, "en_us") == tid
        assert await client.find_transcribe(call_id, "de-DE") is None
    finally:
        await client.close()


async def test_a_slow_transcribe_start_is_waited_for_not_sent_again(sim: Simulator) -> None:
    # VoIPBIN checks for a duplicate before its media start and inserts the row after: a start
    # sent again meanwhile would make a second transcribe, billed beside the first
    sim.world.settings.transcribe_start_s = 0.6
    client = client_for(sim, timeout_s=0.3)  # shorter than the start: other requests give up
    try:
        call_id = await answered(sim)
        tid = await client.start_transcribe(call_id, "en-US", "")
        assert [t.id for t in sim.world.transcribes_of(call_id)] == [tid]
        assert len(sim.requests_matching("POST", r"/transcribes$")) == 1
    finally:
        await client.close()


async def test_a_transcribe_start_for_a_call_gone_is_sent_once_and_a_blip_again_briefly(
    sim: Simulator,
) -> None:
    # a call that hung up answers 500 to every start (transcribehandler/start.go
    # `isValidReference`): sent once, the call decides what comes next (nothing, once it is
    # over). A 503 may be a blip of the gateway: sent again, for a few seconds at most
    client = client_for(sim)
    try:
        call_id = await answered(sim)
        await sim.hangup(call_id)
        with pytest.raises(ApiError) as info:
            await client.start_transcribe(call_id, "en-US", "")
        assert info.value.status == 500
        assert len(sim.requests_matching("POST", r"/transcribes$")) == 1

        live = await answered(sim)
        sim.faults.fail("POST", r"/transcribes$", 503, count=1000)
        with pytest.raises(ApiError) as info:
            await client.start_transcribe(live, "en-US", "")
        assert info.value.status == 503
        sent = [r.t for r in sim.requests_matching("POST", r"/transcribes$")][1:]
        assert len(sent) > 1
        assert sent[-1] - sent[0] <= TRANSCRIBE_START_RETRY_S + 0.5
    finally:
        await client.close()


async def test_a_hangup_answered_409_means_the_call_already_ended(sim: Simulator) -> None:
    client = client_for(sim)
    try:
        call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
        await sim.wait_call_status(call_id, "progressing")
        sim.faults.fail("POST", r"/hangup$", 409)  # what the spec promises for an ended call
        await client.hangup(call_id)  # success: nothing left to hang up
        assert [r.status for r in sim.requests_matching("POST", r"/hangup$")] == [409]
        sim.faults.fail("POST", r"/hangup$", 404)
        with pytest.raises(ApiError) as info:  # other refusals still reach the executor
            await client.hangup(call_id)
        assert info.value.status == 404
    finally:
        await client.close()


async def test_a_403_on_customer_names_the_missing_permission(sim: Simulator) -> None:
    client = client_for(sim)
    try:
        sim.faults.fail("GET", r"/customer$", 403)
        with pytest.raises(PermissionDenied) as info:
            await client.customer_id()
        assert info.value.status == 403 and info.value.reason == "PERMISSION_DENIED"
        assert "lacks the CustomerAdmin or CustomerManager permission" in str(info.value)
        assert len(sim.requests_matching("GET", r"/customer$")) == 1
    finally:
        await client.close()


async def test_a_frozen_account_is_not_a_missing_permission() -> None:
    client = VoipbinClient(API, Credentials(accesskey=Secret("vb_unit_test_key")))
    try:
        with aioresponses() as mock:
            body = {"error": {"status": "PERMISSION_DENIED", "reason": "ACCOUNT_FROZEN"}}
            mock.get(f"{API}/customer", status=403, payload=body)
            with pytest.raises(ApiError) as info:
                await client.customer_id()
        assert not isinstance(info.value, PermissionDenied)  # recoverable: keep retrying
        assert info.value.reason == "ACCOUNT_FROZEN"
    finally:
        await client.close()


def test_the_default_budget_leaves_headroom_below_voipbins_limit() -> None:
    limiter = VoipbinClient(API, Credentials()).limiter
    assert (limiter.rate, limiter.burst) == (15.0, 28.0)
    # the daemon and a command line tool beside it stay below VoIPBIN's 17/s, burst 33
    rate, burst = tool_budget(limiter.rate, limiter.burst)
    assert (rate, burst) == (TOOL_RATE_PER_S, TOOL_BURST)
    assert limiter.rate + rate < VOIPBIN_RATE_PER_S
    assert limiter.burst + burst < VOIPBIN_BURST
    assert tool_budget(0, 0) == (0.0, 0.0)  # the budget turned off stays off
    assert tool_budget(0.5, 1) == (0.5, 1.0)  # never more than the daemon's own
