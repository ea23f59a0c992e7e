"""OpenTelemetry traces (`[otel]`, the extra `agentd[otel]`): the spans built from a call's records,
no words on them without the opt-in, a whole call through a real daemon, a real OTLP/HTTP export
over loopback, and agentd without the extra."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

import agentd.otel
from agentd.call.history import History
from agentd.commands import Record
from agentd.config import OTEL_MISSING, Config, ConfigError, OtelConfig, load
from agentd.names import Kind
from agentd.otel import Tracing, traces_url
from agentd.sim import Caller, Simulator, Utterance
from tests.support import CALLER, OUR_NUMBER, StartAgent

BASE: dict[str, dict[str, Any]] = {
    "voipbin": {"accesskey": "vb_x"},
    "agent": {"numbers": ["*"]},
    "backend": {"kind": "openai", "model": "gpt-4o-mini"},
}
CALL = "c-1"
HEARD = "where is my order"  # the caller's words
SAID = "It shipped yesterday."  # the agent's
MS = 1_000_000  # ns


def config(**otel: Any) -> Config:
    return load(None, env={}, overrides={**BASE, "otel": {"enabled": True, **otel}})


@dataclass
class Clock:
    """The daemon's monotonic clock and the wall clock, moved together."""

    mono: float = 100.0
    wall: int = 1_700_000_000_000 * MS

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += round(seconds * 1e9)


@dataclass
class FakeCall:
    """What the traces read of a live call (agentd.otel.CallView)."""

    id: str = CALL
    direction: str = "incoming"
    turn: int = 0
    turn_times: dict[str, float] = field(default_factory=dict)
    history: History = field(default_factory=History)
    hangup_reason: str = ""


def tracing(clock: Clock, **otel: Any) -> tuple[Tracing, InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    t = Tracing(
        config(**otel), clock=lambda: clock.mono, wall_ns=lambda: clock.wall, exporter=memory
    )
    return t, memory


def record(what: Kind, /, **data: object) -> Record:
    return Record(CALL, what, dict(data))


def one_call(t: Tracing, clock: Clock, call: FakeCall | None) -> int:
    """A call's records as a daemon feeds them: answered, a turn, a barge-in, a backchannel, an
    error, the hangup. Returns when the caller's turn ended (wall ns)."""
    t.started(CALL)
    clock.advance(0.5)
    t.record(record(Kind.ANSWERED, direction="incoming"), call)
    clock.advance(2.0)
    turn_end = clock.wall
    if call is not None:
        call.turn = 1
        call.turn_times["transcript"] = clock.mono
        call.history.user(HEARD, 1)
        call.history.extend_reply(SAID, 1)
    clock.advance(0.9)  # the record comes when the reply is complete
    timings = {"first_token_ms": 300.0, "first_sentence_ms": 420.0, "first_say_ms": 450.0}
    t.record(record(Kind.TOKENS, turn=1, input=120, output=9), call)  # just before its turn
    t.record(record(Kind.TURN, turn=1, **timings, last_say_ms=900.0), call)
    clock.advance(0.3)
    t.record(record(Kind.BARGE_IN, turn=1, by="speech"), call)
    t.record(record(Kind.BACKCHANNEL, text="uh-huh"), call)
    t.record(record(Kind.ERROR, what="say", status=503), call)
    clock.advance(1.0)
    t.record(record(Kind.ENDED, hangup_by="remote", reason="normal", answered=True), call)
    if call is not None:
        call.hangup_reason = "normal"
    clock.advance(0.2)
    t.finished(CALL, call)
    return turn_end


def spans_by_name(memory: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    spans = memory.get_finished_spans()
    out = {s.name: s for s in spans}
    assert len(out) == len(spans)
    return out


def words_anywhere(span: ReadableSpan) -> list[str]:
    values = [str(v) for v in (span.attributes or {}).values()]
    values += [str(v) for e in span.events for v in (e.attributes or {}).values()]
    return [v for v in values if any(w in v for w in (HEARD, SAID, "uh-huh"))]


# ---- unit: records in, spans out ---------------------------------------------------------------


async def test_a_call_span_with_its_turn_span_attributes_and_events() -> None:
    clock = Clock()
    t, memory = tracing(clock)
    started = clock.wall
    turn_end = one_call(t, clock, None)
    ended = clock.wall
    await t.close()

    spans = spans_by_name(memory)
    assert set(spans) == {"call", "chat gpt-4o-mini"}
    call, turn = spans["call"], spans["chat gpt-4o-mini"]
    assert call.parent is None
    assert turn.parent is not None and turn.parent.span_id == call.context.span_id
    assert turn.context.trace_id == call.context.trace_id
    assert (call.start_time, call.end_time) == (started, ended)
    assert call.kind is SpanKind.INTERNAL and turn.kind is SpanKind.CLIENT
    assert call.resource.attributes["service.name"] == "agentd"
    assert dict(call.attributes or {}) == {
        "agentd.call.id": CALL,
        "gen_ai.conversation.id": CALL,
        "agentd.call.direction": "incoming",
        "agentd.call.hangup_by": "remote",
        "agentd.call.hangup_reason": "normal",
        "agentd.call.answered": True,
        "agentd.call.turns": 1,
    }
    assert [e.name for e in call.events] == [
        "agentd.answered",
        "agentd.barge_in",
        "agentd.backchannel",
        "agentd.error",
        "agentd.ended",
    ]
    barge_in, backchannel, error = call.events[1:4]
    assert dict(barge_in.attributes or {}) == {"agentd.turn": 1, "agentd.by": "speech"}
    assert dict(backchannel.attributes or {}) == {}  # its words are not put on a span
    assert dict(error.attributes or {}) == {"agentd.what": "say", "agentd.status": 503}
    assert call.status.status_code is StatusCode.UNSET

    # no call to read the end of the caller's turn from: counted back from the record
    assert turn.start_time == turn_end
    assert turn.end_time == turn_end + 900 * MS  # the last /say
    assert dict(turn.attributes or {}) == {
        "gen_ai.operation.name": "chat",
        "gen_ai.conversation.id": CALL,
        "gen_ai.request.model": "gpt-4o-mini",
        "agentd.call.id": CALL,
        "agentd.turn": 1,
        "agentd.turn.first_token_ms": 300.0,
        "agentd.turn.first_sentence_ms": 420.0,
        "agentd.turn.first_say_ms": 450.0,
        "agentd.turn.last_say_ms": 900.0,
        "gen_ai.usage.input_tokens": 120,
        "gen_ai.usage.output_tokens": 9,
    }
    assert [(e.name, e.timestamp - turn_end) for e in turn.events] == [
        ("agentd.first_token", 300 * MS),
        ("agentd.first_sentence", 420 * MS),
        ("agentd.first_say", 450 * MS),
        ("agentd.last_say", 900 * MS),
    ]


async def test_no_words_on_any_span_without_the_opt_in() -> None:
    clock = Clock()
    t, memory = tracing(clock)
    assert config().otel.include_text is False  # the default
    one_call(t, clock, FakeCall())
    await t.close()
    spans = memory.get_finished_spans()
    assert len(spans) == 2
    for span in spans:
        assert words_anywhere(span) == []
        assert not {"gen_ai.input.messages", "gen_ai.output.messages"} & set(span.attributes or {})


async def test_words_with_include_text_and_the_turn_timed_from_the_call() -> None:
    clock = Clock()
    t, memory = tracing(clock, include_text=True)
    turn_end = one_call(t, clock, FakeCall())
    await t.close()

    spans = spans_by_name(memory)
    turn = spans["chat gpt-4o-mini"]
    assert turn.start_time == turn_end  # the call's own time of the end of the caller's turn
    attrs = turn.attributes or {}
    assert json.loads(str(attrs["gen_ai.input.messages"])) == [
        {"role": "user", "parts": [{"type": "text", "content": HEARD}]}
    ]
    assert json.loads(str(attrs["gen_ai.output.messages"])) == [
        {"role": "assistant", "parts": [{"type": "text", "content": SAID}], "finish_reason": "stop"}
    ]
    backchannel = next(e for e in spans["call"].events if e.name == "agentd.backchannel")
    assert dict(backchannel.attributes or {}) == {"agentd.text": "uh-huh"}


async def test_the_turn_span_is_timed_from_the_call_even_when_its_record_comes_late() -> None:
    """A reply timed only when the call ends (never said) still starts at the caller's turn."""
    clock = Clock()
    t, memory = tracing(clock)
    call = FakeCall(turn=2, turn_times={"transcript": clock.mono})
    turn_end = clock.wall
    t.started(CALL)
    clock.advance(5.0)
    t.record(record(Kind.TURN, turn=2, first_token_ms=200.0), call)
    t.finished(CALL, call)
    await t.close()
    turn = spans_by_name(memory)["chat gpt-4o-mini"]
    assert (turn.start_time, turn.end_time) == (turn_end, turn_end + 200 * MS)
    assert (spans_by_name(memory)["call"].attributes or {})["agentd.call.turns"] == 2


async def test_without_a_known_model_the_turn_span_is_chat() -> None:
    clock = Clock()
    memory = InMemorySpanExporter()
    cfg = load(
        None,
        env={},
        overrides={**BASE, "backend": {"kind": "echo"}, "otel": {"enabled": True}},
    )
    t = Tracing(cfg, clock=lambda: clock.mono, wall_ns=lambda: clock.wall, exporter=memory)
    t.record(record(Kind.TURN, turn=1, first_say_ms=10.0, last_say_ms=20.0))
    t.finished(CALL)
    await t.close()
    turn = spans_by_name(memory)["chat"]
    assert "gen_ai.request.model" not in (turn.attributes or {})


async def test_a_crashed_call_has_the_error_status() -> None:
    clock = Clock()
    t, memory = tracing(clock)
    t.started(CALL)
    t.record(record(Kind.FAILED, error="KeyError"))
    t.finished(CALL)
    await t.close()
    call = spans_by_name(memory)["call"]
    assert call.status.status_code is StatusCode.ERROR
    assert (call.attributes or {})["error.type"] == "KeyError"
    assert [e.name for e in call.events] == ["agentd.failed"]


async def test_a_released_leg_makes_no_span_and_live_calls_end_at_close() -> None:
    clock = Clock()
    t, memory = tracing(clock)
    t.started("leg")  # taken on, then released: no record, no span
    t.finished("leg")
    t.started(CALL)
    t.record(record(Kind.ANSWERED, direction="outgoing"))
    clock.advance(1.0)
    await t.close()  # the daemon stops with the call left for the next agentd
    [call] = memory.get_finished_spans()
    attrs = call.attributes or {}
    assert attrs["agentd.call.unfinished"] is True
    assert attrs["agentd.call.direction"] == "outgoing"
    assert call.end_time == clock.wall


# ---- config ------------------------------------------------------------------------------------


def test_otel_is_off_by_default() -> None:
    assert load(None, env={}, overrides=BASE).otel == OtelConfig()
    assert OtelConfig().enabled is False and OtelConfig().include_text is False


def test_otel_keys_from_the_file_and_the_environment(tmp_path: Any) -> None:
    path = tmp_path / "agentd.toml"
    path.write_text(
        '[voipbin]\naccesskey = "vb_x"\n[agent]\nnumbers = ["*"]\n'
        '[otel]\nenabled = true\nendpoint = "http://[::1]:4318"\nservice_name = "agent-7"\n'
    )
    otel = load(path, env={"AGENTD_OTEL_INCLUDE_TEXT": "true"}).otel
    assert otel == OtelConfig(True, "http://[::1]:4318", "agent-7", include_text=True)


@pytest.mark.parametrize("endpoint", ["127.0.0.1:4318", "grpc://127.0.0.1:4317", "http://"])
def test_an_endpoint_that_is_no_http_url_is_refused(endpoint: str) -> None:
    with pytest.raises(ConfigError, match=r"^otel\.endpoint: not an http\(s\) URL"):
        config(endpoint=endpoint)


def test_an_empty_service_name_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^otel\.service_name: must not be empty"):
        config(service_name=" ")


@pytest.fixture
def without_opentelemetry(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every opentelemetry module unimportable, as without the extra."""
    for name in [*sys.modules, "opentelemetry"]:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            monkeypatch.setitem(sys.modules, name, None)
    yield


@pytest.mark.usefixtures("without_opentelemetry")
def test_enabled_without_the_extra_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        config()
    assert str(info.value) == OTEL_MISSING
    assert f"{sys.executable} -m pip install -c constraints.txt opentelemetry-sdk" in str(
        info.value
    )
    assert load(None, env={}, overrides=BASE).otel.enabled is False  # off: nothing needed


def test_the_tracer_without_the_extra_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config()  # loaded while installed, then the packages go away
    for name in [*sys.modules, "opentelemetry"]:
        if name == "opentelemetry" or name.startswith("opentelemetry."):
            monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ConfigError, match=r"-m pip install -c constraints\.txt opentelemetry-sdk"):
        Tracing(cfg)


def test_agentd_imports_and_starts_without_opentelemetry() -> None:
    """A subprocess where opentelemetry cannot be imported: agentd imports, a daemon is built
    and no opentelemetry module is loaded; enabling traces is a config error."""
    script = textwrap.dedent(
        """
        import sys
        from importlib.abc import MetaPathFinder

        class NoOtel(MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ModuleNotFoundError(name)
                return None

        sys.meta_path.insert(0, NoOtel())
        import agentd.cli, agentd.daemon, agentd.otel
        from agentd.config import ConfigError, load
        base = {"voipbin": {"accesskey": "vb_x"}, "agent": {"numbers": ["*"]}}
        daemon = agentd.daemon.Daemon(load(None, env={}, overrides=base))
        assert daemon.tracing is None
        try:
            load(None, env={}, overrides={**base, "otel": {"enabled": True}})
        except ConfigError as exc:
            print(exc)
        loaded = [m for m in sys.modules if m.startswith("opentelemetry")]
        assert not loaded, loaded
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=30, check=False
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == OTEL_MISSING


def test_the_traces_url() -> None:
    assert traces_url("http://127.0.0.1:4318") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("http://127.0.0.1:4318/") == "http://127.0.0.1:4318/v1/traces"
    assert traces_url("https://otel.example/v1/traces") == "https://otel.example/v1/traces"
    assert traces_url("https://otel.example?key=k1") == "https://otel.example/v1/traces?key=k1"
    assert traces_url("https://otel.example/otlp/?key=k1") == (
        "https://otel.example/otlp/v1/traces?key=k1"
    )


# ---- a real OTLP/HTTP export over loopback -----------------------------------------------------


async def test_spans_are_exported_over_otlp_http_when_the_daemon_closes(
    aiohttp_server: Any,
) -> None:
    """The real exporter posts protobuf to a loopback collector; `close()` flushes it."""
    got: list[ExportTraceServiceRequest] = []
    arrived = asyncio.Event()

    async def receive(request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        got.append(ExportTraceServiceRequest.FromString(await request.read()))
        arrived.set()
        return web.Response(body=b"", content_type="application/x-protobuf")

    app = web.Application()
    app.router.add_post("/v1/traces", receive)
    server = await aiohttp_server(app, host="127.0.0.1", port=0)
    clock = Clock()
    endpoint = f"http://127.0.0.1:{server.port}"
    t = Tracing(
        config(endpoint=endpoint, service_name="agentd-test"),
        clock=lambda: clock.mono,
        wall_ns=lambda: clock.wall,
    )
    assert t.endpoint == endpoint + "/v1/traces"
    one_call(t, clock, None)
    await t.close()  # flushes on the SDK's thread while this loop serves the request
    await asyncio.wait_for(arrived.wait(), 5)
    [resource_spans] = [rs for req in got for rs in req.resource_spans]
    service = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
    assert service["service.name"] == "agentd-test"
    names = sorted(s.name for ss in resource_spans.scope_spans for s in ss.spans)
    assert names == ["call", "chat gpt-4o-mini"]


# ---- end to end: a whole call through a real daemon --------------------------------------------


@pytest.mark.slow  # a whole call
async def test_a_whole_call_makes_one_call_span_with_its_turn_spans(
    sim: Simulator, agent: StartAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    memory = InMemorySpanExporter()
    monkeypatch.setattr(agentd.otel, "otlp_exporter", lambda endpoint: memory)
    daemon = await agent(otel={"enabled": True})
    assert daemon.tracing is not None
    caller = Caller([Utterance("Hello there"), Utterance("How are you")], hangup_after_s=0.05)
    call_id = sim.inbound_call(CALLER, OUR_NUMBER, caller)
    await sim.wait_call_status(call_id, "hangup", timeout=10)
    await asyncio.wait_for(daemon.dispatcher.wait_idle(), 5)
    daemon.stop()
    await asyncio.wait_for(daemon.stopped.wait(), 10)  # the spans are flushed on the way out

    spans = memory.get_finished_spans()
    [call] = [s for s in spans if s.name == "call"]
    turns = sorted((s for s in spans if s.name == "chat"), key=lambda s: s.start_time or 0)
    assert len(spans) == 1 + len(turns)
    attrs = call.attributes or {}
    assert attrs["agentd.call.id"] == call_id
    assert attrs["agentd.call.direction"] == "incoming"
    assert attrs["agentd.call.hangup_reason"] == "normal"
    assert attrs["agentd.call.turns"] == 2
    assert "agentd.call.unfinished" not in attrs
    assert "agentd.answered" in [e.name for e in call.events]
    assert [(s.attributes or {})["agentd.turn"] for s in turns] == [1, 2]
    for turn in turns:
        assert turn.parent is not None and turn.parent.span_id == call.context.span_id
        assert turn.context.trace_id == call.context.trace_id
        assert call.start_time is not None and call.end_time is not None
        assert turn.start_time is not None and turn.end_time is not None
        assert call.start_time <= turn.start_time <= turn.end_time <= call.end_time
        t_attrs = turn.attributes or {}
        assert t_attrs["gen_ai.operation.name"] == "chat"
        assert t_attrs["agentd.turn.first_say_ms"] == t_attrs["agentd.turn.last_say_ms"]
        assert turn.end_time - turn.start_time == pytest.approx(
            float(str(t_attrs["agentd.turn.last_say_ms"])) * MS, abs=MS
        )
        assert "agentd.first_say" in [e.name for e in turn.events]
        assert words_anywhere(turn) == [] and not any("Hello" in str(v) for v in t_attrs.values())
