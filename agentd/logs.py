"""Logging: structlog, JSON lines under systemd, key=value on a terminal, secrets scrubbed.

Every event and command is logged at info, so a line must cost next to nothing on the event loop:

- JSON lines are rendered by one processor (`_JsonLine`) with orjson, a timestamp string cached per
  second, and the call's bound fields read from one context variable (`bound`), instead of
  structlog's generic chain (contextvars merge, stamper, stdlib json);
- the line is handed to a writer thread (`Sink`) that writes batches; the loop never blocks on
  the sink. The queue is bounded: when the sink stalls (a full journald pipe, a slow disk) lines
  are dropped and counted (`dropped()`, the `agentd_log_lines_dropped` metric, and a `log.dropped`
  line once the sink moves again) rather than the loop waiting.

The redaction runs last, on the rendered line, so nothing added by an earlier processor — an
exception text, a traceback — can carry a credential out. Tracebacks never include local
variables (structlog's default dict tracebacks would, after redaction of the event dict).
"""

from __future__ import annotations

import atexit
import contextvars
import logging
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from types import MappingProxyType, TracebackType
from typing import Any, TextIO

import orjson
import structlog
from structlog.tracebacks import ExceptionDictTransformer

from agentd.secret import redact, redact_bytes

# journald reads a "<N>" syslog priority prefix on each stdout line (SyslogLevelPrefix=yes)
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}
_LEVEL = {"exception": "error", "warn": "warning", "failure": "error", "msg": "info"}

#: lines waiting for the writer; beyond this the sink is stalled and new lines are dropped
QUEUE_LINES = 20_000
#: how often the writer wakes on its own; the loop never signals it for an ordinary line
WRITE_EVERY_S = 0.05

_NO_FIELDS: Mapping[str, Any] = MappingProxyType({})
_fields: contextvars.ContextVar[Mapping[str, Any]] = contextvars.ContextVar(
    "agentd_log_fields", default=_NO_FIELDS
)


class bound:  # lower case: used like a function, `with logs.bound(call_id=...):`
    """Bind fields (the call id) to every line logged inside the block, in this context only."""

    __slots__ = ("_fields", "_token")

    def __init__(self, **fields: Any) -> None:
        self._fields = fields
        self._token: contextvars.Token[Mapping[str, Any]] | None = None

    def __enter__(self) -> None:
        self._token = bind(**self._fields)

    def __exit__(
        self,
        _type: type[BaseException] | None,
        _exc: BaseException | None,
        _tb: TracebackType | None,
    ) -> None:
        if self._token is not None:
            _fields.reset(self._token)


def bind(**fields: Any) -> contextvars.Token[Mapping[str, Any]]:
    """Bind `fields` to every line logged in this context until `unbind(token)`: what `bound`
    does, without its object (the dispatcher's step, nine a turn)."""
    outer = _fields.get()
    return _fields.set({**outer, **fields} if outer else fields)


def unbind(token: contextvars.Token[Mapping[str, Any]]) -> None:
    """Undo `bind`."""
    _fields.reset(token)


class Logger:
    """A module's logger: a structlog logger bound once per configuration, not once per line.

    structlog's module-level proxy builds a new bound logger on every call (when loggers are not
    cached), a few microseconds a line; cached for good, they would keep a stale configuration.
    These are rebound by `configure` and `rebind`. structlog's `capture_logs` edits the
    processor list in place, so it sees their lines; after `structlog.reset_defaults()` (tests),
    call `rebind()`."""

    __slots__ = ("debug", "error", "exception", "info", "name", "warning")

    def __init__(self, name: str) -> None:
        self.name = name
        self._bind()
        _LOGGERS.append(self)

    def _bind(self) -> None:
        bound = structlog.get_logger(self.name).bind()
        self.debug: Callable[..., Any] = _fast("debug", bound.debug)
        self.info: Callable[..., Any] = _fast("info", bound.info)
        self.warning: Callable[..., Any] = _fast("warning", bound.warning)
        self.error: Callable[..., Any] = _fast("error", bound.error)
        self.exception: Callable[..., Any] = bound.exception


class _Direct:
    """A level's method when lines are JSON: the renderer and the sink called directly.

    structlog's bound logger copies its context and walks the processor list for every line,
    a third of a line's cost; with one processor, ours, there is nothing to walk. The list is
    looked at on every line: `structlog.testing.capture_logs` swaps its content in place, and
    its lines must reach the capture."""

    __slots__ = ("_method", "_processors", "_render", "_slow")

    def __init__(
        self, method: str, render: _JsonLine, processors: list[Any], slow: Callable[..., Any]
    ) -> None:
        self._method = method
        self._render = render
        self._processors = processors
        self._slow = slow

    def __call__(self, event: str, *args: Any, **fields: Any) -> None:
        processors = self._processors
        if args or len(processors) != 1 or processors[0] is not self._render:
            self._slow(event, *args, **fields)
            return
        fields["event"] = event
        _SINK.msg(self._render(None, self._method, fields))


def _fast(method: str, slow: Callable[..., Any]) -> Callable[..., Any]:
    """`slow` (structlog's method), or a `_Direct` one when lines are JSON and `method` is
    at or above the configured level."""
    processors = structlog.get_config()["processors"]
    if (
        len(processors) == 1
        and isinstance(processors[0], _JsonLine)
        and _NUMERIC[method] >= _level[0]
    ):
        return _Direct(method, processors[0], processors, slow)
    return slow


_NUMERIC = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
_level = [logging.INFO]  # the configured level (`configure`)


_LOGGERS: list[Logger] = []


def get_logger(name: str) -> Logger:
    """The logger named `name` (a dotted agentd module name), made once at import."""
    return Logger(name)


def rebind() -> None:
    """Bind every module logger to structlog's current configuration."""
    for logger in _LOGGERS:
        logger._bind()


def _merge_bound(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in _fields.get().items():
        event_dict.setdefault(key, value)
    return event_dict


class _Clock:
    """ISO-8601 UTC timestamps; the date and time part is formatted once per second."""

    __slots__ = ("_prefix", "_second")

    def __init__(self) -> None:
        self._second = -1
        self._prefix = ""

    def __call__(self) -> str:
        ns = time.time_ns()  # integer arithmetic: exact microseconds, and ~40 % cheaper
        second = ns // 1_000_000_000
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{ns // 1000 % 1_000_000:06d}Z"


def _fallback(obj: object) -> str:
    # what orjson cannot serialise is shown as its repr (a Secret shows "Secret('***')")
    return repr(obj)


class _JsonLine:
    """The whole JSON rendering in one processor: bound fields, level, time, exception, orjson."""

    def __init__(self, journal: bool) -> None:
        self._journal = journal
        self._clock = _Clock()
        self._exception = structlog.processors.ExceptionRenderer(
            ExceptionDictTransformer(show_locals=False)
        )

    def __call__(self, logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> bytes:
        bound = _fields.get()  # `_merge_bound` inline: a call less on every line
        if bound:
            for key, value in bound.items():
                event_dict.setdefault(key, value)
        level = _LEVEL.get(method, method)
        event_dict["level"] = level
        event_dict["timestamp"] = self._clock()
        if "exc_info" in event_dict or "exception" in event_dict:
            event_dict = self._exception(logger, method, event_dict)
        line = orjson.dumps(event_dict, default=_fallback, option=orjson.OPT_NON_STR_KEYS)
        line = redact_bytes(line)
        if self._journal:
            return b"<%d>%s\n" % (_PRIORITY.get(level, 6), line)
        return line + b"\n"


def _redact_line(_: Any, __: str, line: Any) -> Any:
    return redact(line) + "\n" if isinstance(line, str) else line


class Sink:
    """Where every line goes: a writer thread with a bounded queue, or straight to the stream.

    structlog's logger factory returns this one object for every logger, so a logger costs no
    allocation per line and `configure` can point all of them at a new stream."""

    def __init__(self) -> None:
        self._stream: TextIO = sys.stdout
        self._lines: deque[bytes] = deque()
        self._wake = threading.Event()
        self._written = threading.Condition()
        self._taken = 0  # lines the writer has taken off the queue and written
        self._queued = 0  # lines put on the queue
        self._dropped = 0
        self._reported = 0
        self._thread: threading.Thread | None = None
        self.background = False

    def point(self, stream: TextIO, *, background: bool) -> None:
        """Write to `stream` from now on (after what is queued), in a thread if `background`."""
        self.flush()
        self._stream = stream
        self.background = background
        if background and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="agentd-log", daemon=True)
            self._thread.start()

    def dropped(self) -> int:
        """Lines dropped so far because the sink was stalled."""
        return self._dropped

    def msg(self, line: bytes | str) -> None:
        """Take one rendered line (it ends with a newline)."""
        data = line.encode() if isinstance(line, str) else line
        if not self.background:
            self._write([data])
            return
        if len(self._lines) >= QUEUE_LINES:
            self._dropped += 1
            return
        self._lines.append(data)
        self._queued += 1

    log = debug = info = warning = warn = error = critical = exception = fatal = failure = msg

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued line is written (at shutdown, in tests); False on timeout."""
        if self._thread is None or threading.current_thread() is self._thread:
            return True
        target = self._queued
        deadline = time.monotonic() + timeout_s
        with self._written:
            while self._taken < target:
                self._wake.set()
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._written.wait(min(left, WRITE_EVERY_S))
        return True

    def _run(self) -> None:
        while True:
            self._wake.wait(WRITE_EVERY_S)
            self._wake.clear()
            batch: list[bytes] = []
            lines = self._lines
            while lines:
                batch.append(lines.popleft())
            taken = len(batch)
            if self._dropped != self._reported:
                batch.append(_drop_line(self._dropped - self._reported))
                self._reported = self._dropped
            if batch:
                self._write(batch)
            with self._written:
                self._taken += taken
                self._written.notify_all()

    def _write(self, batch: list[bytes]) -> None:
        data = b"".join(batch)
        try:
            buffer = getattr(self._stream, "buffer", None)
            if buffer is not None:
                self._stream.flush()  # anything written as text before
                buffer.write(data)
                buffer.flush()
            else:
                self._stream.write(data.decode("utf-8", "replace"))
                self._stream.flush()
        except (OSError, ValueError):
            # a closed or broken stream: there is nowhere to say so; count the lines as lost
            self._dropped += len(batch)
            self._reported = self._dropped


def _drop_line(count: int) -> bytes:
    return (
        orjson.dumps(
            {
                "event": "log.dropped",
                "count": count,
                "hint": "the log sink could not keep up: lines dropped rather than delay calls",
                "level": "warning",
                "timestamp": _Clock()(),
            }
        )
        + b"\n"
    )


_SINK = Sink()
atexit.register(_SINK.flush)


def _sink_factory(*_: Any) -> Sink:
    return _SINK


def dropped() -> int:
    """Log lines dropped because the sink was stalled (the `agentd_log_lines_dropped` metric)."""
    return _SINK.dropped()


def flush(timeout_s: float = 5.0) -> bool:
    """Write every queued line now (at shutdown, and in tests before reading the stream)."""
    return _SINK.flush(timeout_s)


def configure(
    level: str = "info", fmt: str = "auto", stream: TextIO | None = None, *, background: bool = True
) -> None:
    """Set up structlog (and stdlib logging of our dependencies) once, at start."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    numeric = getattr(logging, level.upper(), logging.INFO)
    _level[0] = numeric
    processors: list[Any]
    if fmt == "json":
        on_journal = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
        processors = [_JsonLine(on_journal)]
    else:
        processors = [
            _merge_bound,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.dev.ConsoleRenderer(
                colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
            ),
            _redact_line,
        ]
    _SINK.point(stream, background=background)
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=_sink_factory,
        cache_logger_on_first_use=False,
    )
    rebind()
    # dependencies log through stdlib logging: keep them quiet and in the same sink
    root = logging.getLogger()
    root.handlers[:] = [_StdlibHandler()]
    root.setLevel(max(numeric, logging.WARNING))


class _StdlibHandler(logging.Handler):
    """Stdlib records (asyncpg, aiohttp...) as our own lines: the same format, redacted, one
    line each. An exception is named, not traced: a dependency's retry loop would otherwise
    fill the journal with its internals."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            fields: dict[str, Any] = {"logger": record.name}
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                fields["error"] = redact(f"{type(exc).__name__}: {exc}")
            structlog.get_logger().log(record.levelno, redact(record.getMessage()), **fields)
        except Exception:
            self.handleError(record)
