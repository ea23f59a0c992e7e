"""The REST client's error paths: retries that are safe, never a /say twice, budgets, re-login."""

from __future__ import annotations

import asyncio

import pytest
from aioresponses import aioresponses

from agentd.ratelimit import BACKGROUND, URGENT, RateLimiter
from agentd.sim import Caller, Simulator
from agentd.voipbin import ApiError, Credentials, Secret, VoipbinClient
from tests import conftest
from tests.support import CALLER, OUR_NUMBER

API = "http://voipbin.test/v1.0"


def client_for(sim: Simulator, **kw: float) -> VoipbinClient:
    return VoipbinClient(sim.api_url, Credentials(accesskey=Secret(sim.accesskey)), **kw)


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


# ---- aioresponses: shapes the simulator never produces ---------------------------------------


async def test_error_without_envelope_and_garbage_retry_after() -> None:
    client = VoipbinClient(API, Credentials(accesskey=Secret("vb_unit_test_key")), deadline_s=0.5)
    try:
        with aioresponses() as mock:
            mock.post(
                f"{API}/speakings/s1/flush?accesskey=vb_unit_test_key", status=404, body="not json"
            )
            mock.get(
                f"{API}/customer?accesskey=vb_unit_test_key",
                status=429,
                headers={"Retry-After": "soon"},
                payload={"error": {"reason": "X"}},
            )
            mock.get(f"{API}/customer?accesskey=vb_unit_test_key", status=200, payload=[])
            with pytest.raises(ApiError) as flush:
                await client.flush("s1")
            assert (flush.value.status, flush.value.reason) == (404, "")
            with pytest.raises(ApiError) as customer:  # a 200 that is not a customer object
                await client.customer_id()
            assert customer.value.reason == "BAD_RESPONSE"
    finally:
        await client.close()
    assert not conftest.AIORESPONSES_SHIM or conftest._ShimResponse.shim_calls >= 3


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
                f"{API}/calls?accesskey=vb_unit_test_key",
                status=200,
                payload={"calls": [], "groupcalls": [{"id": "g1", "call_ids": ["c9"]}]},
            )
            assert await client.place_call("+1555", "+1666") == [{"id": "c9"}]
    finally:
        await client.close()
