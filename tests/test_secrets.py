"""No credential reaches a log line, an exception text or a traceback, whatever happens."""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import structlog

from agentd import logs
from agentd.config import load
from agentd.daemon import Daemon
from agentd.secret import Secret, redact
from agentd.sim import Caller, SimSettings, Simulator, Utterance
from agentd.voipbin import ApiError, Credentials, VoipbinClient
from tests.support import CALLER, FINAL_HOLD, OUR_NUMBER, PLAYBACK, SAY_LATENCY, serving

if TYPE_CHECKING:
    from tests.pg import PgServer

pytest_plugins = ["tests.pg"]  # a real PostgreSQL, for the URL of a [store]

PASSWORD = "s3cret-Pa55word"
ACCESSKEY_HINT = "vb_"


@pytest.fixture
def captured_logs() -> Iterator[io.StringIO]:
    out = io.StringIO()
    logs.configure("debug", "json", stream=out)
    yield out
    structlog.reset_defaults()


def test_secret_never_prints() -> None:
    s = Secret("vb_abcdefgh12345")
    assert "vb_abcdefgh12345" not in f"{s} {s!r} {[s]} { ({'k': s}) }"
    assert redact("GET /x?accesskey=vb_abcdefgh12345&a=1 token=eyJabc") == (
        "GET /x?accesskey=***&a=1 token=***"
    )


@pytest.mark.slow  # a whole run with faults
async def test_a_full_run_with_login_expiry_and_faults_leaks_no_credential(
    captured_logs: io.StringIO, tmp_path: Path
) -> None:
    settings = SimSettings(
        playback_chars_per_s=PLAYBACK,
        speech_words_per_s=40.0,
        username="agent-user",
        password=PASSWORD,
    )
    async with Simulator(settings) as sim:
        config = load(
            None,
            env={},
            overrides={
                "voipbin": {"api_url": sim.api_url, "username": "agent-user", "password": PASSWORD},
                "agent": {
                    "numbers": [OUR_NUMBER],
                    "chars_per_s": PLAYBACK,
                    "say_latency_s": SAY_LATENCY,
                    "final_hold_s": FINAL_HOLD,
                },
                "store": {"path": str(tmp_path / "agentd.db")},  # not the working directory's
            },
        )
        daemon = Daemon(config)
        task = asyncio.create_task(daemon.run())
        await asyncio.wait_for(daemon.stream.ready.wait(), 5)
        tokens = {daemon.client.credentials.token.reveal()}  # type: ignore[union-attr]
        # the JWT expires and the connection drops: the daemon must log in again
        sim.faults.expire_tokens()
        sim.faults.drop_websockets()
        sim.faults.fail("POST", r"/transcribes$", 500, count=1)
        call_id = sim.inbound_call(CALLER, OUR_NUMBER, Caller([Utterance("my key is secret")]))
        await sim.wait_call_status(call_id, "hangup", timeout=15)
        await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
        tokens.add(daemon.client.credentials.token.reveal())  # type: ignore[union-attr]
        accesskey = sim.accesskey
        # an access-key client whose server is gone: the error must not carry the URL's key
        gone = VoipbinClient(
            "http://127.0.0.1:9/v1.0", Credentials(accesskey=Secret(accesskey)), deadline_s=0.5
        )
        with pytest.raises(ApiError) as info:
            await gone.customer_id()
        await gone.close()
        structlog.get_logger().error("probe", error=str(info.value), exc=repr(info.value))
        daemon.stop()
        await task
    assert logs.flush()
    text = captured_logs.getvalue()
    assert len(tokens) == 2, "the daemon did not log in again after the expiry"
    assert "voipbin.login" in text and "You said: my key is secret." in text
    for secret in (PASSWORD, accesskey, *tokens):
        assert secret not in text
    for line in text.splitlines():
        json.loads(line)  # every line is one JSON object


def test_exception_tracebacks_carry_no_locals(captured_logs: io.StringIO) -> None:
    def fail(secret: str) -> None:
        raise RuntimeError("boom")

    key = Secret("vb_local_variable_key")
    try:
        fail(key.reveal())
    except RuntimeError:
        structlog.get_logger().exception("crash")
    assert logs.flush()
    text = captured_logs.getvalue()
    assert "boom" in text
    assert "vb_local_variable_key" not in text
    assert '"locals"' not in text


@pytest.mark.parametrize(
    ("query", "forms"),
    [
        ("code=AZFUNC-SECRET-123", ["AZFUNC-SECRET-123"]),
        # under a name the redaction does not know for a key's, percent-encoded as a key of
        # base64 or with a space must be: aiohttp's error quotes it re-encoded its own way
        ("tenant=Zk9%2Bq%2FW3xYz%3D%3D", ["Zk9%2Bq/W3xYz%3D%3D", "Zk9+q/W3xYz==", "Zk9%2Bq"]),
        ("tenant=abc%20defghi", ["abc%20defghi", "abc defghi"]),
    ],
)
async def test_a_key_in_the_backend_url_never_shows(
    captured_logs: io.StringIO, query: str, forms: list[str]
) -> None:
    # Azure Functions take their key in the URL: `?code=`. A redirect's error quotes where it
    # points (agentd does not follow it), which reaches the call's backend_failed record and
    # the log
    from aiohttp import web

    from agentd.secret import display_url

    async def loop(request: web.Request) -> web.Response:
        raise web.HTTPTemporaryRedirect(str(request.rel_url))

    app = web.Application()
    app.router.add_post("/api/reply", loop)
    async with serving(app) as port:
        url = f"http://127.0.0.1:{port}/api/reply?{query}"
        error, backend = await _http_backend_error(url)
    structlog.get_logger().error("backend_failed", error=error)
    assert logs.flush()
    shown = f"{captured_logs.getvalue()} {redact(error)} {backend} {display_url(url)}"
    assert "redirected to" in error and f"{query.partition('=')[0]}=***" in shown
    for form in forms:
        assert form not in shown


async def _http_backend_error(url: str) -> tuple[str, str]:
    """The error of the http backend at `url` (configured, so its secrets are known), and its
    repr."""
    from agentd.backends.http import HttpBackend
    from agentd.backends.wire import BackendError

    config = load(
        None,
        env={},
        overrides={
            "voipbin": {"accesskey": "vb_unit_test_key"},
            "agent": {"numbers": ["*"]},
            "backend": {"kind": "http", "url": url},
        },
    )
    backend = HttpBackend(url=config.backend.url, api_key=None, timeout_s=5)
    try:
        with pytest.raises(BackendError) as info:
            async for _ in backend.reply("c1", [("user", "hi")]):
                pass
    finally:
        await backend.aclose()
    return str(info.value), repr(backend)


@pytest.mark.parametrize("userinfo", ["bob:SECRETPW99", "SECRETPW99"])
async def test_the_basic_auth_of_a_backend_url_never_shows(
    captured_logs: io.StringIO, userinfo: str
) -> None:
    # a user part in the URL goes out as `Authorization: Basic base64(user:password)`; a
    # server that echoes its request headers in an error body must not make it show
    import base64

    from aiohttp import web

    async def echo_headers(request: web.Request) -> web.Response:
        return web.Response(status=500, text=f"boom {request.headers.get('Authorization')}")

    app = web.Application()
    app.router.add_post("/err", echo_headers)
    async with serving(app) as port:
        raw, _ = await _http_backend_error(f"http://{userinfo}@127.0.0.1:{port}/err")
    pair = userinfo if ":" in userinfo else f"{userinfo}:"
    encoded = base64.b64encode(pair.encode()).decode()
    assert "boom Basic ***" in raw  # the server did echo it, masked already in the error
    structlog.get_logger().error("backend_failed", error=raw)
    assert logs.flush()
    shown = f"{captured_logs.getvalue()} {redact(raw)}"
    assert "boom" in shown and encoded not in shown and "SECRETPW99" not in shown


@pytest.mark.parametrize(
    "url",
    [
        "https://user:TOPSECRET1@host.example/v1",
        "https://TOPSECRET1@host.example/v1",  # a token as the user alone
        "https://host.example/api?code=TOPSECRET1",
        "https://host.example/api?TOPSECRET1",  # a bare key
        "https://host.example/api#TOPSECRET1",
    ],
)
def test_a_url_shown_keeps_no_secret_of_its_own(url: str) -> None:
    from agentd.secret import display_url

    shown = display_url(url)
    assert "TOPSECRET1" not in shown and "host.example" in shown


# ---- an echoed key cut short: redacted whole, then cut ------------------------------------------


def _no_part_of(key: str, text: str) -> None:
    """Neither `key` nor any 8 characters of it in `text`."""
    for i in range(len(key) - 7):
        assert key[i : i + 8] not in text, f"{key[i : i + 8]!r} of the key in {text!r}"


async def test_an_echoed_key_cut_short_by_the_voipbin_error_never_shows_in_part(
    captured_logs: io.StringIO,
) -> None:
    # the error's message is cut at 200 characters: cut inside the key, what is left of it is
    # no longer the secret the redaction knows
    from aiohttp import web

    key = "vb_echoedKey0123456789abcdefXYZ"

    async def refuse(request: web.Request) -> web.Response:
        message = "x" * 180 + f" {request.cookies.get('accesskey')} is not valid"
        error = {"reason": f"bad key {key}", "message": message}
        return web.json_response({"error": error}, status=401)

    app = web.Application()
    app.router.add_get("/v1.0/customer", refuse)
    async with serving(app) as port:
        client = VoipbinClient(
            f"http://127.0.0.1:{port}/v1.0", Credentials(accesskey=Secret(key)), deadline_s=1
        )
        try:
            with pytest.raises(ApiError) as info:
                await client.customer_id()
        finally:
            await client.close()
    exc = info.value
    structlog.get_logger().error("probe", error=str(exc), reason=exc.reason)
    assert logs.flush()
    assert exc.status == 401 and "x" * 150 in str(exc)
    _no_part_of(key, f"{exc} {exc.reason} {captured_logs.getvalue()}")


@pytest.mark.parametrize("kind", ["http", "openai"])
async def test_an_echoed_key_cut_short_by_a_backend_error_never_shows_in_part(
    captured_logs: io.StringIO, kind: str
) -> None:
    # a backend's error text is cut at 300 characters: a server echoing our key (some do, on
    # a 401) just before the cut must not show its start
    from aiohttp import web

    from agentd.backends.http import HttpBackend
    from agentd.backends.openai import OpenAIBackend
    from agentd.backends.wire import BackendError

    key = f"sk-{kind}-echoed-0123456789abcdefghij"

    async def refuse(request: web.Request) -> web.StreamResponse:
        echoed = "x" * 280 + " " + request.headers["Authorization"]
        if kind == "http":
            return web.json_response({"detail": echoed}, status=401)
        # OpenAI and vLLM send an error mid-stream, as an event
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        await resp.write(f"data: {json.dumps({'error': {'message': echoed}})}\n\n".encode())
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", refuse)
    async with serving(app) as port:
        url = f"http://127.0.0.1:{port}/v1"
        backend: HttpBackend | OpenAIBackend
        if kind == "http":
            backend = HttpBackend(url=f"{url}/chat/completions", api_key=Secret(key), timeout_s=5)
        else:
            backend = OpenAIBackend(
                base_url=url,
                model="m",
                api_key=Secret(key),
                temperature=0.0,
                max_tokens=10,
                tools=False,
                timeout_s=5,
            )
        try:
            with pytest.raises(BackendError) as info:
                async for _ in backend.reply("c1", [("user", "hi")]):
                    pass
        finally:
            await backend.aclose()
    structlog.get_logger().error("backend_failed", error=str(info.value))
    assert logs.flush()
    assert "x" * 250 in str(info.value)
    _no_part_of(key, f"{info.value} {captured_logs.getvalue()}")


# ---- what the command line prints: the `<3>` line, check-config, agentd calls ------------------

LEAKY_MODULE = """
import os

# a user's module that fails at import, quoting the key it was given
KEY = open(os.environ["LEAKY_KEY_FILE"]).read().strip()
raise RuntimeError(f"the model service refused the key {KEY}")
"""

CLI_CONFIG = """
[voipbin]
api_url = "{api}"
accesskey = "{accesskey}"
timeout_s = 2
[agent]
numbers = ["+15551234567"]
[backend]
{backend}
[store]
{store}
"""


@pytest.mark.slow  # agentd check-config and agentd run, as processes
async def test_a_python_backend_failing_with_its_key_leaks_it_on_no_error_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the import error of a python backend is the one line agentd run leaves (at <3> under
    # systemd) and check-config prints: it quotes the user's exception, whatever it holds
    import os

    from tests.support import run_cli

    key = "sk-python-backend-key-42"
    keyfile = tmp_path / "backend-api-key"
    keyfile.write_text(key + "\n")
    (tmp_path / "leaky_backend.py").write_text(LEAKY_MODULE)
    monkeypatch.setenv("LEAKY_KEY_FILE", str(keyfile))
    monkeypatch.setenv("PYTHONPATH", f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    config = tmp_path / "agentd.toml"
    backend = f'kind = "python"\ncallable = "leaky_backend:reply"\napi_key_file = "{keyfile}"'
    config.write_text(
        CLI_CONFIG.format(
            api="http://127.0.0.1:9/v1.0",
            accesskey="vb_unit_test_key",
            backend=backend,
            store=f'path = "{tmp_path / "agentd.db"}"',
        )
    )
    for command in ("check-config", "run"):
        code, out, err = await run_cli(command, "--config", str(config))
        assert code == 2, (out, err)
        assert "config error: backend.callable: cannot import 'leaky_backend'" in err
        assert "refused the key ***" in err and key not in out + err


@pytest.mark.slow  # agentd calls and check-config, as processes
async def test_the_tls_key_passphrase_of_a_postgresql_url_never_shows(
    tmp_path: Path, pg_server: PgServer
) -> None:
    # asyncpg takes the passphrase of the client's TLS key (`sslpassword=`) only in the DSN,
    # which agentd prints (check-config, agentd calls, its errors) and keeps in its config
    from agentd.config import PgUrl
    from agentd.stores import describe_store
    from tests.support import run_cli

    passphrase = "TLS-key-Passphrase-77"
    name = pg_server.create_database()
    try:
        url = f"{pg_server.url(name)}&sslpassword={passphrase}"
        async with Simulator() as sim:
            path = tmp_path / "agentd.toml"
            path.write_text(
                CLI_CONFIG.format(
                    api=sim.api_url,
                    accesskey=sim.accesskey,
                    backend='kind = "echo"',
                    store=f'url = "{url}"',
                )
            )
            code, out, err = await run_cli("check-config", "--config", str(path))
            assert code == 0, (out, err)
            assert "store: ok (postgresql postgresql://postgres@/" in out
        # nothing in it yet: the error names the database, by its URL
        calls = await run_cli("calls", "--config", str(path))
        assert calls[0] != 0 and f"/{name}?" in calls[2] and "has no agentd store" in calls[2]
        config = load(path, env={})
        assert config.store_url is not None
        shown = [
            out + err,
            calls[1] + calls[2],
            repr(config),
            str(config.store_url),
            describe_store(config),
            repr(PgUrl.parse(url)),
        ]
        for text in shown:
            assert "sslpassword=***" in text and passphrase not in text, text
    finally:
        pg_server.drop_database(name)


def test_the_repr_of_a_config_shows_no_key_of_a_url() -> None:
    # a traceback with locals, a debugger, a `{config!r}` in a message: the key of a backend's
    # or a collector's URL must not come with it
    config = load(
        None,
        env={},
        overrides={
            "voipbin": {"accesskey": "vb_unit_test_key"},
            "agent": {"numbers": ["*"]},
            "backend": {"kind": "http", "url": "https://user:REPR-PW-1@fn.example/api?code=REPR-2"},
            "otel": {"endpoint": "https://otel:REPR-PW-3@collector.example:4318?key=REPR-4"},
        },
    )
    shown = f"{config!r} {config.backend!r} {config.otel!r}"
    assert "fn.example/api" in shown and "collector.example:4318" in shown
    assert "REPR-" not in shown


# ---- OpenTelemetry: the exporter's headers ------------------------------------------------------


def test_a_malformed_otel_header_is_not_logged_with_its_key(
    captured_logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    # `Authorization: Bearer ...` (as a request writes it, not `name=value`): the exporter
    # ignores it, and logs it whole to say so
    from agentd.otel import Tracing

    key = "otel-malformed-key-0451"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_HEADERS", f"Authorization: Bearer {key}")
    config = load(
        None,
        env={},
        overrides={
            "voipbin": {"accesskey": "vb_unit_test_key"},
            "agent": {"numbers": ["*"]},
            "otel": {"enabled": True, "endpoint": "http://127.0.0.1:9"},
        },
    )
    tracing = Tracing(config)
    tracing.provider.shutdown()
    assert logs.flush()
    text = captured_logs.getvalue()
    assert "Header format invalid" in text  # the exporter did say it
    assert key not in text


async def test_an_otel_header_echoed_by_the_collector_is_not_logged(
    captured_logs: io.StringIO, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a collector (or a proxy before it) that refuses the export quoting the key it was sent:
    # the exporter logs the reason it was given
    from aiohttp import web

    from agentd.commands import Record
    from agentd.names import Kind
    from agentd.otel import Tracing

    key = "otel-header-key-8812"
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_TRACES_HEADERS", f"authorization=Bearer%20{key}")

    async def refuse(request: web.Request) -> web.Response:
        return web.Response(status=401, reason=f"refused {request.headers['Authorization']}")

    app = web.Application()
    app.router.add_post("/v1/traces", refuse)
    async with serving(app) as port:
        config = load(
            None,
            env={},
            overrides={
                "voipbin": {"accesskey": "vb_unit_test_key"},
                "agent": {"numbers": ["*"]},
                "otel": {"enabled": True, "endpoint": f"http://127.0.0.1:{port}"},
            },
        )
        tracing = Tracing(config)
        tracing.started("c-1")
        tracing.record(Record("c-1", Kind.ANSWERED, {}))
        tracing.finished("c-1")
        await tracing.close()  # exports on the SDK's thread while this loop answers
    assert logs.flush()
    text = captured_logs.getvalue()
    assert "Failed to export" in text and "refused ***" in text
    assert key not in text
