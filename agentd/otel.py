"""OpenTelemetry traces (`[otel]`, off by default; the optional extra `agentd[otel]`).

Built from the daemon's records, like the metrics (agentd/metrics.py), with no change to the call
machines: they stay pure, and a daemon without `[otel] enabled = true` never imports
OpenTelemetry.

- a span per call (`call`), from when this agentd took the call on to when it was finished and
  cleaned up: the call id, direction, hangup reason and who hung up, the number of turns;
- a child span per turn (`chat` or `chat <model>`: the GenAI semantic conventions' inference
  span, `gen_ai.operation.name = "chat"`), from the end of the caller's turn to the reply's last
  /say, rebuilt from the `turn` record's timings; each timing is an attribute
  (`agentd.turn.first_say_ms`, ...) and an event at its moment (`agentd.first_say`, ...);
- every other record (barge-ins, backchannels, fillers, errors, leaks, ...) as an event on the
  call span, named `agentd.<kind>`; a call whose handler crashed gets the error status.

No words of the caller or the agent are put on a span unless `include_text = true`: then the
turn span carries the caller's words and the reply said (`gen_ai.input.messages`,
`gen_ai.output.messages`) and the backchannel and echo events their words (`agentd.text`).

Spans go to the collector over OTLP/HTTP (protobuf) through a `BatchSpanProcessor`: export runs
on the SDK's own thread, never on the event loop; `close()` flushes and shuts it down.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit, urlunsplit

from agentd import __version__, logs
from agentd.call.history import History
from agentd.commands import Record
from agentd.config import OTEL_MISSING, Config, ConfigError
from agentd.names import TURN_TIMINGS, Kind
from agentd.secret import learn_headers, learn_url

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.trace import Span, Tracer
    from opentelemetry.util.types import AttributeValue

log = logs.get_logger("agentd.otel")

#: where the exporter reads the headers it sends (the second wins when both are set)
HEADER_VARIABLES = ("OTEL_EXPORTER_OTLP_HEADERS", "OTEL_EXPORTER_OTLP_TRACES_HEADERS")
TRACES_PATH = "/v1/traces"  # the OTLP/HTTP traces path, added to `endpoint`
EXPORT_TIMEOUT_S = 5.0  # one export request; the SDK retries a failed one until then
TEXT_KEYS = frozenset({"text"})  # record data that holds someone's words
_CALL_ATTRS = {"direction": "direction", "reason": "hangup_reason", "hangup_by": "hangup_by"}


class CallView(Protocol):
    """What the traces read of a live call (agentd.call.Call)."""

    @property
    def id(self) -> str: ...
    @property
    def direction(self) -> str: ...
    @property
    def turn(self) -> int: ...
    @property
    def turn_times(self) -> Mapping[str, float]: ...
    @property
    def history(self) -> History: ...
    @property
    def hangup_reason(self) -> str: ...


@dataclass(slots=True)
class _CallSpan:
    span: Span
    turns: int = 0
    # turn -> (input, output) tokens, from the reply's `tokens` record, for its turn span
    tokens: dict[int, tuple[int, int]] = field(default_factory=dict)


def traces_url(endpoint: str) -> str:
    """`http://127.0.0.1:4318` -> `http://127.0.0.1:4318/v1/traces` (a URL with the path already
    is kept as it is)."""
    parts = urlsplit(endpoint)
    path = parts.path.rstrip("/")
    if not path.endswith(TRACES_PATH):
        path += TRACES_PATH  # before the query (a collector's key may ride in it), not after
    return urlunsplit(parts._replace(path=path))


def otlp_exporter(endpoint: str) -> SpanExporter:
    """The OTLP/HTTP (protobuf) exporter to the collector at `endpoint`. Tests replace this."""
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    # the exporter reads its headers (an API key, most often) from the environment, and its
    # warnings and errors reach our log: a malformed header is logged whole, an endpoint's
    # query shows in a connection error. Learnt before it is built, so both are redacted
    learn_url(endpoint)
    for name in HEADER_VARIABLES:
        learn_headers(os.environ.get(name, ""))
    return OTLPSpanExporter(endpoint=traces_url(endpoint), timeout=EXPORT_TIMEOUT_S)


class Tracing:
    """One daemon's traces: its own `TracerProvider` (never the global one, so several daemons in
    one process — the tests — never share spans)."""

    def __init__(
        self,
        config: Config,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_ns: Callable[[], int] = time.time_ns,
        exporter: SpanExporter | None = None,
    ) -> None:
        try:
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import BatchSpanProcessor
        except ImportError:
            raise ConfigError(OTEL_MISSING) from None
        o = config.otel
        self.include_text = o.include_text
        # the model is known only for the openai kind; the others are the user's own code
        self.model = config.backend.model if config.backend.kind == "openai" else ""
        self.clock = clock  # the daemon's: the calls' turn times are on it
        self.wall_ns = wall_ns
        self.endpoint = traces_url(o.endpoint)
        resource = Resource.create({"service.name": o.service_name, "service.version": __version__})
        self.provider: TracerProvider = TracerProvider(resource=resource)
        self.provider.add_span_processor(
            BatchSpanProcessor(exporter if exporter is not None else otlp_exporter(o.endpoint))
        )
        self.tracer: Tracer = self.provider.get_tracer("agentd", __version__)
        self._seen: dict[str, int] = {}  # call id -> when this agentd took it on (ns)
        self._calls: dict[str, _CallSpan] = {}

    # ---- what the daemon tells us --------------------------------------------------------------

    def started(self, call_id: str) -> None:
        """This agentd took the call on. Its span opens with its first record: a leg that is
        only released (chained to another call) makes no span."""
        self._seen.setdefault(call_id, self.wall_ns())

    def record(self, record: Record, call: CallView | None = None) -> None:
        """One of the daemon's records; `call` is the live call it is about, when known."""
        state = self._calls.get(record.call_id) or self._open(record.call_id, call)
        if record.what is Kind.TURN:
            self._turn(state, record, call)
            return
        if record.what is Kind.TOKENS:
            turn, spent_in, spent_out = (record.data.get(k) for k in ("turn", "input", "output"))
            if isinstance(turn, int) and isinstance(spent_in, int) and isinstance(spent_out, int):
                state.tokens[turn] = (spent_in, spent_out)  # its turn span comes next
                return
        span = state.span
        data = record.data
        for key, name in _CALL_ATTRS.items():
            value = data.get(key)
            if record.what in (Kind.ANSWERED, Kind.STATUS, Kind.ENDED) and value:
                span.set_attribute(f"agentd.call.{name}", str(value))
        if record.what is Kind.ENDED and isinstance(data.get("answered"), bool):
            span.set_attribute("agentd.call.answered", bool(data["answered"]))
        if record.what is Kind.FAILED:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, f"call handler failed: {data.get('error')}"))
            span.set_attribute("error.type", str(data.get("error") or "failed"))
        span.add_event(f"agentd.{record.what.value}", self._attributes(data))

    def finished(self, call_id: str, call: CallView | None = None) -> None:
        """The call ended and is cleaned up: its span ends."""
        self._seen.pop(call_id, None)
        state = self._calls.pop(call_id, None)
        if state is not None:
            self._end(state, call)

    def dropped(self, call_id: str) -> None:
        """Another replica serves the call (it claimed it first, or took it over): nothing more
        of it comes here. Its span, if this agentd opened one, ends now, marked
        `agentd.call.lost`: left open it would be held until agentd stops, then exported with
        the whole uptime as its length."""
        self._seen.pop(call_id, None)
        state = self._calls.pop(call_id, None)
        if state is not None:
            state.span.set_attribute("agentd.call.lost", True)
            self._end(state, None)

    def force_flush(self) -> bool:
        """Export what has ended so far (blocks until done: not on the event loop)."""
        return self.provider.force_flush()

    async def close(self) -> None:
        """End the spans of calls still live (left to the next agentd, or not drained), then
        flush and shut the exporter down, off the event loop."""
        for state in self._calls.values():
            state.span.set_attribute("agentd.call.unfinished", True)
            self._end(state, None)
        self._calls.clear()
        self._seen.clear()
        await asyncio.to_thread(self.provider.shutdown)

    # ---- spans ---------------------------------------------------------------------------------

    def _open(self, call_id: str, call: CallView | None) -> _CallSpan:
        attrs: dict[str, AttributeValue] = {
            "agentd.call.id": call_id,
            "gen_ai.conversation.id": call_id,
        }
        if call is not None and call.direction:
            attrs["agentd.call.direction"] = call.direction
        start = self._seen.get(call_id) or self.wall_ns()
        span = self.tracer.start_span("call", attributes=attrs, start_time=start)
        state = self._calls[call_id] = _CallSpan(span)
        return state

    def _end(self, state: _CallSpan, call: CallView | None) -> None:
        span = state.span
        turns = state.turns
        if call is not None:
            turns = max(turns, call.turn)
            if call.hangup_reason:
                span.set_attribute("agentd.call.hangup_reason", call.hangup_reason)
        span.set_attribute("agentd.call.turns", turns)
        span.end(end_time=self.wall_ns())

    def _turn(self, state: _CallSpan, record: Record, call: CallView | None) -> None:
        """A child span from the end of the caller's turn to the reply's last /say."""
        from opentelemetry.trace import SpanKind, set_span_in_context

        data = record.data
        turn = data.get("turn")
        turn = turn if isinstance(turn, int) and not isinstance(turn, bool) else 0
        offsets = {k: v for k in TURN_TIMINGS if (v := _ms(data.get(f"{k}_ms"))) is not None}
        start = self._turn_start(call, turn, max(offsets.values(), default=0.0))
        attrs: dict[str, AttributeValue] = {
            "gen_ai.operation.name": "chat",
            "gen_ai.conversation.id": record.call_id,
            "agentd.call.id": record.call_id,
            "agentd.turn": turn,
        }
        if self.model:
            attrs["gen_ai.request.model"] = self.model
        if turn in state.tokens:
            spent_in, spent_out = state.tokens.pop(turn)
            attrs["gen_ai.usage.input_tokens"] = spent_in
            attrs["gen_ai.usage.output_tokens"] = spent_out
        for key, ms in offsets.items():
            attrs[f"agentd.turn.{key}_ms"] = ms
        if self.include_text and call is not None:
            attrs.update(_turn_text(call.history, turn))
        span = self.tracer.start_span(
            f"chat {self.model}" if self.model else "chat",
            context=set_span_in_context(state.span),
            kind=SpanKind.CLIENT,
            attributes=attrs,
            start_time=start,
        )
        for key, ms in offsets.items():
            span.add_event(f"agentd.{key}", timestamp=start + _ns(ms))
        span.end(end_time=start + _ns(max(offsets.values(), default=0.0)))
        state.turns += 1

    def _turn_start(self, call: CallView | None, turn: int, longest_ms: float) -> int:
        """When the caller's turn ended (ns since the epoch): the call's own time of it while the
        call is still at that turn, else counted back from now (a turn record is made when the
        reply is complete or first said, within milliseconds of its last timing)."""
        now = self.wall_ns()
        if call is not None and call.turn == turn and "transcript" in call.turn_times:
            return now - _ns(max(0.0, self.clock() - call.turn_times["transcript"]) * 1000)
        return now - _ns(longest_ms)

    def _attributes(self, data: Mapping[str, object]) -> dict[str, AttributeValue]:
        out: dict[str, AttributeValue] = {}
        for key, value in data.items():
            if key in TEXT_KEYS and not self.include_text:
                continue
            if isinstance(value, (str, bool, int, float)):
                out[f"agentd.{key}"] = value
            elif value is not None:
                out[f"agentd.{key}"] = str(value)
        return out


def _turn_text(history: History, turn: int) -> dict[str, AttributeValue]:
    """The caller's words of `turn` and the reply said to them, as the GenAI conventions' message
    attributes (JSON). Only this turn's: the whole history on every turn would grow with the
    call."""
    heard = [m.text for m in history.msgs if m.role == "user" and m.turn == turn]
    said = [m.text for m in history.msgs if m.role == "assistant" and m.turn == turn]
    out: dict[str, AttributeValue] = {}
    if heard:
        out["gen_ai.input.messages"] = json.dumps(
            [{"role": "user", "parts": [{"type": "text", "content": heard[-1]}]}],
            ensure_ascii=False,
        )
    if said:
        reply = {
            "role": "assistant",
            "parts": [{"type": "text", "content": said[-1]}],
            "finish_reason": "stop",
        }
        out["gen_ai.output.messages"] = json.dumps([reply], ensure_ascii=False)
    return out


def _ms(value: object) -> float | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0:
        return float(value)
    return None


def _ns(ms: float) -> int:
    return round(ms * 1_000_000)
