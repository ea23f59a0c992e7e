"""Prometheus metrics, served on a loopback address only (`[metrics] listen`, off by default).

Each daemon has its own `CollectorRegistry` (not prometheus_client's global one), so several
daemons in one process — the tests — never share a counter. Two kinds of metrics:

- counted from the daemon's records as they happen (`record()`): calls answered by direction,
  calls ended by reason, barge-ins, leaked sessions, backend failures, the turn latency histogram
  (caller transcript -> first `/say`, from each `turn` record's `first_say_ms`); and from each
  finished call's `call_report`, the seconds its speaking and transcribe sessions stayed open
  (what VoIPBIN bills) and the turns it had;
- read at scrape time from the counters the daemon keeps anyway (`live()`): reconnect
  attempts and lost connections, failed REST attempts and failed requests, rejected frames,
  live calls, REST queue depth, log lines dropped, store write failures, connected.

The endpoint is prometheus_client's own aiohttp handler (`prometheus_client.aiohttp`) on a small
aiohttp app: `GET /metrics`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import TypeGuard

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agentd import logs
from agentd.call.report import talked_over
from agentd.commands import Record
from agentd.config import parse_listen
from agentd.names import Kind

log = logs.get_logger("agentd.metrics")

# transcript -> first /say: agentd's own overhead is a few ms, a streaming LLM adds 0.2-2 s
FIRST_SAY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
)
_MAX_REASONS = 32  # distinct hangup reasons kept as labels; the rest count as "other"
_LABEL = re.compile(r"[a-z0-9_]{1,40}")

Live = Callable[[], Mapping[str, float]]


class _LiveCollector(Collector):
    """Values the daemon already counts, read when Prometheus scrapes."""

    def __init__(self, live: Live) -> None:
        self.live = live

    def collect(self) -> Iterable[Metric]:
        v = self.live()
        # attempts and their outcome apart: an outage of ten minutes is some twenty reconnect
        # attempts but one lost connection, and a burst of 429s many errors but no failure
        yield CounterMetricFamily(
            "agentd_reconnects",
            "WebSocket reconnect attempts to VoIPBIN: one after a lost connection, and one more "
            "for each attempt that fails while VoIPBIN is unreachable",
            value=v["reconnects"],
        )
        yield CounterMetricFamily(
            "agentd_connections_lost",
            "WebSocket connections to VoIPBIN that were open and ended (once each, however many "
            "reconnect attempts follow)",
            value=v["connections_lost"],
        )
        yield CounterMetricFamily(
            "agentd_rest_errors",
            "VoIPBIN REST attempts that failed: each 429 and each retried error counts "
            "(not the answers expected at a hangup)",
            value=v["rest_errors"],
        )
        yield CounterMetricFamily(
            "agentd_rest_requests_failed",
            "VoIPBIN REST requests that failed after their retries (an error for the caller); "
            "not the answers expected at a hangup (a stop of a session already gone: 404)",
            value=v["rest_requests_failed"],
        )
        yield CounterMetricFamily(
            "agentd_rejected_frames",
            "WebSocket frames that could not be used",
            value=v["rejected_frames"],
        )
        yield GaugeMetricFamily("agentd_live_calls", "Calls not yet ended", value=v["live_calls"])
        yield GaugeMetricFamily(
            "agentd_rest_queue_depth",
            "REST requests waiting for the rate budget",
            value=v["rest_queue_depth"],
        )
        yield CounterMetricFamily(
            "agentd_log_lines_dropped",
            "Log lines dropped because the log sink could not keep up",
            value=v["log_lines_dropped"],
        )
        yield CounterMetricFamily(
            "agentd_store_write_failures",
            "Store writes that failed (a restart may not find the latest state of those calls)",
            value=v["store_write_failures"],
        )
        yield GaugeMetricFamily(
            "agentd_connected", "1 while subscribed to VoIPBIN's WebSocket", value=v["connected"]
        )
        if "leases_held" in v:  # several replicas on PostgreSQL
            yield from _replica_metrics(v)


def _replica_metrics(v: Mapping[str, float]) -> Iterable[Metric]:
    """This replica's share of the calls (each replica serves its own endpoint)."""
    yield GaugeMetricFamily(
        "agentd_leases_held", "Calls this replica holds the lease of", value=v["leases_held"]
    )
    yield GaugeMetricFamily(
        "agentd_replicas_live",
        "Replicas with a recent heartbeat, this one too",
        value=v["replicas_live"],
    )
    yield GaugeMetricFamily(
        "agentd_store_reachable",
        "1 while PostgreSQL answers this replica",
        value=v["store_reachable"],
    )
    claims = CounterMetricFamily(
        "agentd_lease_claims", "First claims of new calls, by who won", labels=["won"]
    )
    claims.add_metric(["true"], v["lease_claims"])
    claims.add_metric(["false"], v["lease_claims_lost"])
    yield claims
    yield CounterMetricFamily(
        "agentd_takeovers",
        "Calls taken over from a replica that stopped renewing",
        value=v["takeovers"],
    )
    yield CounterMetricFamily(
        "agentd_calls_lost",
        "Calls this replica stopped serving: its lease lapsed or was taken over",
        value=v["calls_lost"],
    )


class Metrics:
    """One daemon's metrics and, once started, the loopback HTTP endpoint serving them."""

    def __init__(self, listen: str, live: Live) -> None:
        self.host, self.port = parse_listen(listen)
        self.registry = CollectorRegistry()
        r = self.registry
        self.calls = Counter("agentd_calls", "Calls answered by agentd", ["direction"], registry=r)
        for direction in ("incoming", "outgoing"):
            self.calls.labels(direction=direction)
        self.calls_ended = Counter(
            "agentd_calls_ended", "Calls ended, by hangup reason", ["reason"], registry=r
        )
        self.barge_ins = Counter(
            "agentd_barge_ins", "Times the caller talked over the agent", registry=r
        )
        self.leaks = Counter(
            "agentd_leaks", "Sessions agentd could not stop (stop them by hand)", registry=r
        )
        self.backend_failures = Counter(
            "agentd_backend_failures",
            "Replies the backend failed: an error, or no answer within backend.timeout_s",
            registry=r,
        )
        self.turn_first_say = Histogram(
            "agentd_turn_first_say_seconds",
            "From the caller's transcript to the first /say of the reply",
            buckets=FIRST_SAY_BUCKETS,
            registry=r,
        )
        self.session_seconds = Counter(
            "agentd_session_seconds",
            "Seconds VoIPBIN sessions stayed open, by kind, summed over finished calls",
            ["kind"],
            registry=r,
        )
        for kind in ("speaking", "transcribe"):
            self.session_seconds.labels(kind=kind)
        self.turns = Counter(
            "agentd_turns", "Caller turns of finished calls (from their reports)", registry=r
        )
        r.register(_LiveCollector(live))
        self._reasons: set[str] = set()
        self._runner: web.AppRunner | None = None

    def record(self, record: Record) -> None:
        """Count one of the daemon's records."""
        data = record.data
        match record.what:
            case Kind.ANSWERED:
                self.calls.labels(direction=_label(data.get("direction"), "unknown")).inc()
            case Kind.ENDED:
                self.calls_ended.labels(reason=self._reason(data.get("reason"))).inc()
            case Kind.BARGE_IN:
                if talked_over(record):
                    self.barge_ins.inc()
            case Kind.LEAK:
                self.leaks.inc()
            case Kind.BACKEND_FAILED:
                self.backend_failures.inc()
            case Kind.TURN:
                ms = data.get("first_say_ms")
                if isinstance(ms, (int, float)) and not isinstance(ms, bool) and ms >= 0:
                    self.turn_first_say.observe(ms / 1000)
            case Kind.REPORT:
                self._report(data)

    def _report(self, data: Mapping[str, object]) -> None:
        """A finished call's report: its session seconds and turns (bad values are skipped:
        a counter must never go down, and a report is no reason to fail the record path)."""
        seconds = data.get("session_seconds")
        if isinstance(seconds, Mapping):
            for kind in ("speaking", "transcribe"):
                value = seconds.get(kind)
                if _amount(value):
                    self.session_seconds.labels(kind=kind).inc(value)
        turns = data.get("turns")
        if _amount(turns):
            self.turns.inc(turns)

    def _reason(self, value: object) -> str:
        reason = _label(value, "normal")
        if reason not in self._reasons:
            if len(self._reasons) >= _MAX_REASONS:
                return "other"  # a label per unknown string would grow without bound
            self._reasons.add(reason)
        return reason

    async def start(self) -> None:
        """Serve `GET /metrics` on the loopback address; `port` becomes the bound port."""
        app = web.Application()
        app.router.add_get("/metrics", make_aiohttp_handler(self.registry))
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            site = web.TCPSite(runner, self.host, self.port)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.port = int(runner.addresses[0][1])
        log.info("metrics.listening", url=f"http://{_hostport(self.host, self.port)}/metrics")

    async def close(self) -> None:
        """Stop the endpoint."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None


def _amount(value: object) -> TypeGuard[int | float]:
    """A number a counter may be increased by."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value >= 0


def _label(value: object, default: str) -> str:
    text = str(value).strip().lower() if isinstance(value, str) else ""
    return text if _LABEL.fullmatch(text) else default


def _hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
