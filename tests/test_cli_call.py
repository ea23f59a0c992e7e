"""`agentd call`: places an outbound call the running daemon serves; `--wait` follows it; a call
that no running daemon would serve is refused unless `--force`."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

from agentd.follow import follow
from agentd.ratelimit import BACKGROUND, RateLimiter
from agentd.secret import Secret
from agentd.sim import Caller, Outcome, Simulator, Utterance
from agentd.voipbin import Credentials, VoipbinClient
from tests.support import CALLER, OUR_NUMBER, StartAgent, run_cli, serving

if TYPE_CHECKING:
    from pathlib import Path

CONFIG = """
[voipbin]
api_url = "{api}"
accesskey = "{key}"
{voipbin_extra}
[agent]
numbers = ["{number}"]
[status]
socket = "{socket}"
"""


def write(
    tmp_path: Path, sim: Simulator, socket: str, number: str = OUR_NUMBER, voipbin_extra: str = ""
) -> Path:
    """A config for `agentd call`; `socket`: where it looks for the running daemon."""
    config = tmp_path / "agentd.toml"
    config.write_text(
        CONFIG.format(
            api=sim.api_url,
            key=sim.accesskey,
            number=number,
            socket=socket,
            voipbin_extra=voipbin_extra,
        )
    )
    return config


@pytest.mark.slow  # a subprocess following a whole call
async def test_call_wait_prints_the_conversation(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    daemon = await agent()
    config = write(tmp_path, sim, daemon.config.status_socket)
    # a caller slow enough to hang up after a poll or two of `--wait`
    sim.on_outbound(Outcome("answer"), Caller([Utterance("hello agent")], hangup_after_s=1.5))
    code, out, err = await run_cli(
        "call", "--to", "+15559876543", "--config", str(config), "--wait"
    )
    assert code == 0, err
    lines = out.splitlines()
    call_id = lines[0]
    assert sim.get_call(call_id).direction == "outgoing"
    post = sim.requests_matching("POST", r"/calls$")[0]
    assert post.body["source"] == {"type": "tel", "target": OUR_NUMBER}  # from agent.numbers
    assert "[hangup] (normal)" in lines
    assert "callee: hello agent" in lines
    assert sim.accesskey not in out + err


@pytest.mark.slow  # a subprocess following a whole call
async def test_call_that_is_not_answered_exits_1(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    daemon = await agent()
    config = write(tmp_path, sim, daemon.config.status_socket)
    sim.on_outbound(Outcome("noanswer"))
    code, out, _ = await run_cli("call", "--to", "+15559876543", "--config", str(config), "--wait")
    assert code == 1
    assert "[hangup] (noanswer)" in out.splitlines()


async def test_a_call_from_a_number_agentd_does_not_serve_is_refused(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    daemon = await agent()
    config = write(tmp_path, sim, daemon.config.status_socket)
    code, out, err = await run_cli(
        "call", "--to", "+15559876543", "--from", "+15550002222", "--config", str(config)
    )
    assert code == 1 and out == ""
    assert err.strip() == (
        "agentd: not calling: no running agentd would serve the call: +15550002222 is not one "
        f"of agent.numbers ({OUR_NUMBER}). Pass --force to place it anyway."
    )
    assert sim.requests_matching("POST", r"/calls$") == []


async def test_a_call_is_refused_while_the_daemon_cannot_reach_voipbin(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    # the callee answered to silence: the daemon was up, but not connected to VoIPBIN's event
    # stream, so nothing served the call until it reconnected (if ever)
    daemon = await agent()
    config = write(tmp_path, sim, daemon.config.status_socket)
    await daemon.stream.ready.wait()
    sim.faults.refuse_ws(503, count=1000)
    sim.faults.drop_websockets()
    await sim.wait_for(lambda: daemon.stream.stats.last_error == "HTTP 503 on connect", 10)
    try:
        code, out, err = await run_cli("call", "--to", "+15559876543", "--config", str(config))
        assert sim.requests_matching("POST", r"/calls$") == []
        assert (code, out) == (1, "")
        assert err.startswith(
            "agentd: not calling: no running agentd would serve the call: the running agentd "
            "is not connected to VoIPBIN (reconnecting; last error: HTTP 503 on connect)"
        )
        assert err.endswith("Pass --force to place it anyway.\n")
    finally:
        sim.faults.accept_ws()


async def test_a_call_is_refused_while_voipbin_refuses_the_daemons_access_key(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    # the key was deleted on VoIPBIN's side: the open WebSocket lives on until it drops, then
    # every upgrade is refused 401. No login can fix it: the status says so, not "reconnecting"
    daemon = await agent()
    config = write(tmp_path, sim, daemon.config.status_socket)
    await daemon.stream.ready.wait()
    sim.auth.revoke_accesskey()
    sim.faults.drop_websockets()
    try:
        await sim.wait_for(lambda: daemon.stream.stats.state == "unauthorised", 10)
        assert daemon.status_line() == "0 live calls, VoIPBIN unauthorised"
        code, out, err = await run_cli("call", "--to", "+15559876543", "--config", str(config))
        assert sim.requests_matching("POST", r"/calls$") == []
        assert (code, out) == (1, "")
        assert err.startswith(
            "agentd: not calling: no running agentd would serve the call: the running agentd "
            "is not connected to VoIPBIN (unauthorised; last error: HTTP 401 on connect: "
            "VoIPBIN refused the access key (voipbin.accesskey): revoked, expired or wrong)"
        )
        assert sim.accesskey not in out + err
    finally:
        sim.auth.accesskey_revoked = False


async def test_a_call_without_a_running_daemon_is_refused_unless_forced(
    sim: Simulator, tmp_path: Path
) -> None:
    socket = tmp_path / "agentd.sock"  # nobody listens there
    config = write(tmp_path, sim, str(socket))
    code, out, err = await run_cli("call", "--to", "+15559876543", "--config", str(config))
    assert code == 1 and out == ""
    assert err.strip() == (
        "agentd: not calling: no running agentd would serve the call: agentd is not running "
        f"(no status socket at {socket}). Pass --force to place it anyway."
    )
    assert sim.requests_matching("POST", r"/calls$") == []

    sim.on_outbound(Outcome("noanswer"))
    code, out, err = await run_cli(
        "call", "--to", "+15559876543", "--config", str(config), "--force"
    )
    assert code == 0, err
    assert out.strip() in sim.calls
    assert len(sim.requests_matching("POST", r"/calls$")) == 1


async def test_a_call_is_placed_when_the_daemon_answers_and_serves_every_call(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    daemon = await agent(agent={"numbers": ["*"]})
    config = write(tmp_path, sim, daemon.config.status_socket, number="*")
    sim.on_outbound(Outcome("noanswer"))
    code, out, err = await run_cli(
        "call", "--to", "+15559876543", "--from", "+15550002222", "--config", str(config)
    )
    assert code == 0, err
    assert out.strip() in sim.calls
    (post,) = sim.requests_matching("POST", r"/calls$")
    assert post.body["source"] == {"type": "tel", "target": "+15550002222"}


async def test_a_call_whose_answer_was_a_5xx_may_have_been_placed(
    sim: Simulator, tmp_path: Path
) -> None:
    # VoIPBIN created the call and then answered 500: "call failed" invited a retry that
    # rings the callee twice
    config = write(tmp_path, sim, str(tmp_path / "agentd.sock"))
    sim.on_outbound(Outcome("noanswer"))
    sim.faults.fail("POST", r"/calls$", 500, apply=True)
    code, out, err = await run_cli(
        "call", "--to", "+15559876543", "--config", str(config), "--force"
    )
    assert code == 3 and out == ""
    assert err.startswith("agentd: the call may have been placed: VoIPBIN's answer was lost (")
    assert "agentd calls --since 10m" in err and "ring the callee twice" in err
    assert len(err.strip().splitlines()) == 1
    assert len(sim.requests_matching("POST", r"/calls$")) == 1  # never sent twice
    assert len(sim.calls) == 1  # and indeed it was placed


async def test_a_call_without_an_answer_in_time_may_have_been_placed(
    sim: Simulator, tmp_path: Path
) -> None:
    config = write(tmp_path, sim, str(tmp_path / "agentd.sock"), voipbin_extra="timeout_s = 0.3")
    sim.on_outbound(Outcome("noanswer"))
    sim.faults.delay("POST", r"/calls$", 3.0)
    code, out, err = await run_cli(
        "call", "--to", "+15559876543", "--config", str(config), "--force"
    )
    assert code == 3 and out == ""
    assert "may have been placed" in err and "TimeoutError" in err


async def test_a_call_refused_with_a_4xx_was_not_placed(sim: Simulator, tmp_path: Path) -> None:
    config = write(tmp_path, sim, str(tmp_path / "agentd.sock"))
    sim.faults.fail("POST", r"/calls$", 400)
    code, out, err = await run_cli(
        "call", "--to", "+15559876543", "--config", str(config), "--force"
    )
    assert code == 1 and out == ""
    assert err.startswith("agentd: call failed, not placed: HTTP 400")
    assert sim.calls == {}


async def test_a_call_whose_login_failed_was_not_placed(tmp_path: Path) -> None:
    # the POST /calls was refused 401 and the login it needed answered 503: the 503 was the
    # login's, and the call was never created ("may have been placed" invited a wary wait)
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.Response(status=503 if request.path == "/auth/login" else 401)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    password = tmp_path / "password"
    password.write_text("pw-call-test-1\n")
    config = tmp_path / "agentd.toml"
    async with serving(app) as port:
        config.write_text(
            f'[voipbin]\napi_url = "http://127.0.0.1:{port}/v1.0"\nusername = "ops"\n'
            f'password_file = "{password}"\n[agent]\nnumbers = ["{OUR_NUMBER}"]\n'
        )
        code, out, err = await run_cli(
            "call", "--to", "+15559876543", "--config", str(config), "--force"
        )
    assert (code, out) == (1, "")
    *retries, last = err.splitlines()
    assert last.startswith("agentd: call failed, not placed: HTTP 503 LOGIN_FAILED login failed")
    # the login is tried again within the request's deadline (a login outage is waited out);
    # the call itself, refused before it ran, is never sent again without one
    assert retries and all("voipbin.login_retry" in line for line in retries)
    assert seen[0] == "POST /v1.0/calls"
    assert set(seen[1:]) == {"POST /auth/login"} and len(seen) == len(retries) + 2


async def test_a_call_serving_every_number_without_a_caller_id_says_what_to_set(
    sim: Simulator, tmp_path: Path
) -> None:
    # it used to send the user to agent.numbers, which was set
    config = write(tmp_path, sim, str(tmp_path / "agentd.sock"), number="*")
    code, out, err = await run_cli("call", "--to", "+15559876543", "--config", str(config))
    assert (code, out) == (2, "")
    assert err == (
        "agentd: config error: agent.caller_id: set it, or pass --from: "
        'agent.numbers = ["*"] gives no number to call from\n'
    )
    assert sim.requests == []


E164_HINT = (
    "is not a phone number in E.164 form "
    '(+, a country code, up to 15 digits in all, e.g. "+15551234567")'
)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (["--to", ""], f"--to: '' {E164_HINT}"),
        (["--to", "abc"], f"--to: 'abc' {E164_HINT}"),
        (["--to", "5559876543"], f"--to: '5559876543' {E164_HINT}"),
        (["--to", "+1 (555) 987-6543"], f"--to: '+1 (555) 987-6543' {E164_HINT}"),
        (["--to", "+1" + "2" * 24], f"--to: '+1{'2' * 24}' {E164_HINT}: 25 digits"),
        (["--to", "+0123456"], f"--to: '+0123456' {E164_HINT}: no country code starts with 0"),
        # full-width digits, as a CJK input method types them: they were "too short"
        (
            ["--to", "+１５５５９８７６５４３"],
            f"--to: '+１５５５９８７６５４３' {E164_HINT}: digits other than 0-9",
        ),
        (["--to", "+15559876543", "--from", "555-0100"], f"--from: '555-0100' {E164_HINT}"),
        (
            ["--to", OUR_NUMBER],
            f"--to: {OUR_NUMBER} is one of agentd's own numbers (agent.numbers or caller_id): "
            "the agent would be calling itself",
        ),
        (
            ["--to", "+15559876543", "--from", "+15559876543"],
            "--to: +15559876543 is the number the call is from (--from)",
        ),
    ],
)
async def test_a_number_that_cannot_be_called_is_refused_with_exit_2(
    sim: Simulator, tmp_path: Path, args: list[str], error: str
) -> None:
    # every one of these used to be sent to VoIPBIN (with --force, even to ourselves)
    config = write(tmp_path, sim, str(tmp_path / "agentd.sock"))
    code, out, err = await run_cli("call", *args, "--config", str(config), "--force")
    assert (code, out) == (2, "")
    assert err == f"agentd: not calling: {error}\n"
    assert sim.requests == []


class CountingLimiter(RateLimiter):
    """The budget, counting what it let through and at which priority."""

    def __init__(self, rate: float, burst: float) -> None:
        super().__init__(rate, burst)
        self.granted: list[int] = []

    async def acquire(self, priority: int = BACKGROUND) -> None:
        await super().acquire(priority)
        self.granted.append(priority)


async def test_wait_polls_through_the_clients_budget_and_is_paced_by_it(
    sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    client = VoipbinClient(sim.api_url, Credentials(accesskey=Secret(sim.accesskey)))
    client.limiter = limiter = CountingLimiter(rate=10.0, burst=2)
    sim.on_outbound(Outcome("answer"), Caller([], hangup_after_s=None))
    try:
        (call,) = await client.place_call(OUR_NUMBER, "+15559876543")
        call_id = str(call["id"])
        limiter.granted.clear()
        loop = asyncio.get_running_loop()
        started = loop.time()
        following = asyncio.create_task(follow(client, call_id))
        await sim.wait_for(lambda: len(sim.requests_matching("GET", rf"/calls/{call_id}$")) >= 6)
        await sim.hangup(call_id)
        assert await asyncio.wait_for(following, 5) == 0
        elapsed = loop.time() - started
    finally:
        await client.close()
    assert "[hangup] (normal)" in capsys.readouterr().out.splitlines()
    polls = [r for r in sim.requests if r.method == "GET"]
    # every poll took a token of the budget, at the lowest priority: no pacing of its own
    assert len(limiter.granted) == len(polls) and set(limiter.granted) == {BACKGROUND}
    # the budget alone paced them: never more than the bucket allows, and not one a second
    assert len(polls) <= 2 + 10.0 * elapsed
    assert len(polls) > 1 + elapsed


async def test_wait_takes_the_docs_never_sentinel_for_a_call_never_answered(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # VoIPBIN's docs show unset times as "9999-01-01 00:00:00.000000" (the server omits them;
    # REFERENCE.md §6, §13 #17): a busy callee's call was not answered
    never = "9999-01-01 00:00:00.000000"
    call = {"id": "c1", "status": "hangup", "hangup_reason": "busy", "tm_progressing": never}
    asked: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        asked.append(request.path)
        if request.path == "/v1.0/calls/c1":
            return web.json_response(call)
        return web.json_response({"result": [], "next_page_token": ""})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    async with serving(app) as port:
        api = f"http://127.0.0.1:{port}/v1.0"
        client = VoipbinClient(api, Credentials(accesskey=Secret("vb_unit_test_key")))
        try:
            assert await follow(client, "c1") == 1
        finally:
            await client.close()
    assert asked == ["/v1.0/calls/c1"]  # no transcribe looked for
    assert capsys.readouterr().out.splitlines() == ["[hangup] (busy)"]


async def test_wait_prints_what_the_callee_says_on_each_transcribe_of_the_call(
    sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    # the daemon replaces a call's transcribe (a quiet callee, a restart's stray one): `--wait`
    # kept reading the first one it found and printed nothing the callee said after that
    client = VoipbinClient(sim.api_url, Credentials(accesskey=Secret(sim.accesskey)))
    client.limiter = RateLimiter(rate=0.0, burst=1)  # off: follow polls every POLL_S
    sim.on_outbound(Outcome("answer"), Caller([], hangup_after_s=None))

    def heard(text: str) -> bool:
        return any(t.message == text for t in sim.transcripts.values())

    try:
        (call,) = await client.place_call(OUR_NUMBER, "+15559876543")
        call_id = str(call["id"])
        await sim.wait_call_status(call_id, "progressing")
        first = await client.start_transcribe(call_id, "en-US", "aws")
        following = asyncio.create_task(follow(client, call_id))
        await sim.wait_for(lambda: bool(sim.requests_matching("GET", r"/transcribes$")))
        await sim.caller_says(call_id, "hello who is this")
        await sim.wait_for(lambda: heard("hello who is this"))
        await client.stop_transcribe(first)
        await client.start_transcribe(call_id, "en-US", "aws")
        await sim.caller_says(call_id, "sorry I was away")
        await sim.wait_for(lambda: heard("sorry I was away"))
        await sim.hangup(call_id)
        assert await asyncio.wait_for(following, 10) == 0
    finally:
        await client.close()
    lines = capsys.readouterr().out.splitlines()
    assert [line for line in lines if line.startswith("callee:")] == [
        "callee: hello who is this",
        "callee: sorry I was away",
    ]


async def test_wait_follows_the_call_through_an_outage_of_voipbin(
    sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    # VoIPBIN answering 503 for a while is waited out, as the daemon waits it out: the call
    # goes on meanwhile (it gave up with exit 1, "not answered", after the client's retries)
    client = VoipbinClient(
        sim.api_url, Credentials(accesskey=Secret(sim.accesskey)), deadline_s=0.5
    )
    client.limiter = RateLimiter(rate=0.0, burst=1)  # off: follow polls every POLL_S
    sim.on_outbound(Outcome("answer"), Caller([], hangup_after_s=None))
    try:
        (call,) = await client.place_call(OUR_NUMBER, "+15559876543")
        call_id = str(call["id"])
        await sim.wait_call_status(call_id, "progressing")
        following = asyncio.create_task(follow(client, call_id))
        await sim.wait_for(lambda: bool(sim.requests_matching("GET", r"/transcribes$")))
        sim.faults.fail("GET", r"^/v1.0/", 503, count=1000)
        failed = len(sim.requests)
        await sim.wait_for(lambda: len(sim.requests) > failed + 4)  # through the retries
        assert not following.done()
        sim.faults.heal()
        await sim.hangup(call_id)
        assert await asyncio.wait_for(following, 30) == 0
    finally:
        await client.close()
    out = capsys.readouterr()
    assert "[hangup] (normal)" in out.out.splitlines()
    assert "VoIPBIN is not answering" in out.err and "VoIPBIN answers again" in out.err


async def test_wait_stops_when_voipbin_refuses_the_call_for_good(
    sim: Simulator, capsys: pytest.CaptureFixture[str]
) -> None:
    client = VoipbinClient(sim.api_url, Credentials(accesskey=Secret(sim.accesskey)))
    try:
        assert await follow(client, "3f1e6a4e-0000-4000-8000-000000000000") == 1
    finally:
        await client.close()
    assert "cannot follow the call" in capsys.readouterr().err


@pytest.mark.slow  # `agentd hangup` in a subprocess, a live call
async def test_hangup_ends_a_live_call_and_the_daemon_stops_its_sessions(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    daemon = await agent()
    config = write(tmp_path, sim, daemon.config.status_socket)
    call_id = sim.inbound_call(
        CALLER, OUR_NUMBER, Caller([Utterance("hello")], hangup_after_s=None)
    )
    await daemon.dispatcher.wait_until(
        lambda: any(c.id == call_id and c.turn >= 1 for c in daemon.dispatcher.live_calls())
    )
    code, out, err = await run_cli("hangup", call_id, "--config", str(config))
    assert (code, out) == (0, f"hung up: {call_id}\n"), err
    assert sim.get_call(call_id).status == "hangup"
    # the daemon heard the hangup as any other: the call is over for it, its sessions stopped
    await daemon.dispatcher.wait_until(lambda: not daemon.dispatcher.live_calls())
    await sim.wait_for(lambda: sim.leaks() == [], 10)
    assert sim.accesskey not in out + err


@pytest.mark.slow  # `agentd hangup` in a subprocess
async def test_hangup_of_a_call_voipbin_does_not_know_exits_1(
    sim: Simulator, tmp_path: Path
) -> None:
    config = write(tmp_path, sim, str(tmp_path / "none.sock"))
    unknown = "0b6f7f40-5a4e-4c1e-9d59-5b8e0c7f2a11"
    code, out, err = await run_cli("hangup", unknown, "--config", str(config))
    assert (code, out) == (1, "")
    assert f"agentd: no call {unknown} on this account" in err


async def test_hangup_of_something_that_is_no_call_id_sends_nothing(
    sim: Simulator, tmp_path: Path
) -> None:
    config = write(tmp_path, sim, str(tmp_path / "none.sock"))
    code, _, err = await run_cli("hangup", "../numbers/1", "--config", str(config))
    assert code == 2
    assert "not a call id: '../numbers/1'" in err
    assert sim.requests == []
