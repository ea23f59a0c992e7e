"""The log pipeline: one JSON line per call, written off the loop, bounded, secrets scrubbed."""

from __future__ import annotations

import io
import json
import logging
import threading
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
import structlog

from agentd import logs
from agentd.secret import Secret


@pytest.fixture(autouse=True)
def _reset() -> Iterator[None]:
    yield
    logs.flush()
    structlog.reset_defaults()


def _lines(out: io.StringIO) -> list[dict[str, object]]:
    assert logs.flush()
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_lines_are_written_by_the_writer_thread_in_order_with_the_bound_call_id() -> None:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    log = structlog.get_logger("agentd.test")
    with logs.bound(call_id="c1"):
        for i in range(100):
            log.info("event", n=i)
        with logs.bound(turn=2):
            log.warning("nested")
    log.info("unbound")
    lines = _lines(out)
    assert [line["n"] for line in lines[:100]] == list(range(100))
    assert {line["call_id"] for line in lines[:101]} == {"c1"}
    assert lines[100]["turn"] == 2 and lines[100]["level"] == "warning"
    assert "call_id" not in lines[101] and "turn" not in lines[101]
    assert all(str(line["timestamp"]).endswith("Z") for line in lines)
    assert logs.dropped() == 0


def test_timestamps_are_utc_to_the_microsecond_and_follow_the_clock(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = datetime.fromisoformat(logs._Clock()().replace("Z", "+00:00"))
    assert abs((datetime.now(UTC) - real).total_seconds()) < 60
    now = [1_765_000_799_999_999_500]  # 2025-12-06T05:59:59.999999500Z, then a second later
    monkeypatch.setattr(logs.time, "time_ns", lambda: now[0])
    clock = logs._Clock()
    first = clock()
    now[0] += 1_000_000_600
    assert (first, clock()) == ("2025-12-06T05:59:59.999999Z", "2025-12-06T06:00:01.000000Z")


def test_a_field_with_keys_other_than_strings_still_renders() -> None:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    log = structlog.get_logger("agentd.test")
    log.info("tallies", by_status={404: 2, 500: 1}, plain={"a": 1})
    (line,) = _lines(out)
    assert line["by_status"] == {"404": 2, "500": 1} and line["plain"] == {"a": 1}
    assert out.getvalue().endswith("}\n") and out.getvalue().count("\n") == 1


def test_debug_lines_are_filtered_at_info() -> None:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    structlog.get_logger().debug("hidden")
    structlog.get_logger().info("shown")
    assert [line["event"] for line in _lines(out)] == ["shown"]


class _Stalled(io.StringIO):
    """A sink that blocks (a full journald pipe) until released."""

    def __init__(self) -> None:
        super().__init__()
        self.entered = threading.Event()
        self.release = threading.Event()

    def write(self, s: str) -> int:
        self.entered.set()
        assert self.release.wait(10), "the test never released the sink"
        return super().write(s)


def test_a_stalled_sink_drops_and_counts_lines_instead_of_blocking_the_logger(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(logs, "QUEUE_LINES", 10)
    out = _Stalled()
    logs.configure("info", "json", stream=out)
    log = structlog.get_logger("agentd.test")
    before = logs.dropped()
    log.info("first")
    assert logs.flush(timeout_s=0.2) is False  # the writer took "first" and is stuck writing it
    assert out.entered.wait(5)
    for i in range(30):  # returns at once although nothing can be written
        log.info("queued", n=i)
    assert logs.dropped() - before == 20
    out.release.set()
    lines = _lines(out)
    assert [line["event"] for line in lines[:11]] == ["first"] + ["queued"] * 10
    assert [line.get("n") for line in lines[1:11]] == list(range(10))
    [report] = [line for line in lines if line["event"] == "log.dropped"]
    assert report["count"] == 20 and report["level"] == "warning"


def test_journald_lines_carry_the_syslog_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    structlog.get_logger().info("hello")
    structlog.get_logger().error("bad")
    assert logs.flush()
    info, error = out.getvalue().splitlines()
    assert info.startswith("<6>{") and error.startswith("<3>{")
    assert json.loads(info[3:])["event"] == "hello"


def test_a_secret_is_scrubbed_even_where_json_escapes_it() -> None:
    awkward = 'pa"ss\\wörd-123'
    Secret(awkward)
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    log = structlog.get_logger()
    log.info("login", detail=f"refused for {awkward}", url="https://x/y?accesskey=abc123&b=1")
    log.info("repr", secret=Secret("another-secret-value"))
    assert logs.flush()
    text = out.getvalue()
    assert "ss\\\\w" not in text and "wörd" not in text and "abc123" not in text
    assert "another-secret-value" not in text
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["detail"] == "refused for ***"
    assert first["url"] == "https://x/y?accesskey=***&b=1"
    assert second["secret"] == "Secret('***')"


def test_stdlib_records_go_through_the_same_sink_redacted() -> None:
    out = io.StringIO()
    logs.configure("info", "json", stream=out)
    Secret("stdlib-secret-value")
    logging.getLogger("aiohttp.client").warning("retry with %s", "stdlib-secret-value")
    try:
        raise ConnectionError("refused: stdlib-secret-value")
    except ConnectionError:
        logging.getLogger("asyncpg.pool").warning("Failed to restore", exc_info=True)
    assert logs.flush()
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["event"] == "retry with ***"
    assert (first["logger"], first["level"]) == ("aiohttp.client", "warning")
    # one line, the exception named (redacted) rather than traced
    assert second["event"] == "Failed to restore"
    assert second["error"] == "ConnectionError: refused: ***"
    assert "Traceback" not in out.getvalue()


def test_console_format_is_key_value_with_the_call_id() -> None:
    out = io.StringIO()
    logs.configure("info", "console", stream=out, background=False)
    with logs.bound(call_id="c9"):
        structlog.get_logger().info("event", type="SpeechEvent")
    line = out.getvalue()
    assert "event" in line and "call_id=c9" in line and "type=SpeechEvent" in line
    assert line.endswith("\n") and line.count("\n") == 1


def test_module_loggers_follow_a_new_configuration_and_capture_logs() -> None:
    log = logs.get_logger("agentd.test_module")
    first, second = io.StringIO(), io.StringIO()
    logs.configure("info", "json", stream=first)
    log.info("one")
    logs.configure("warning", "json", stream=second)
    log.info("filtered now")
    log.warning("two")
    with structlog.testing.capture_logs() as captured:
        log.warning("three")
    assert [line["event"] for line in _lines(first)] == ["one"]
    assert [line["event"] for line in _lines(second)] == ["two"]
    assert [entry["event"] for entry in captured] == ["three"]
