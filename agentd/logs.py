"""Logging: structlog, JSON lines under systemd, key=value on a terminal, secrets scrubbed.

The redaction processor runs last, on the rendered line, so nothing added by an earlier processor —
an exception text, a traceback — can carry a credential out. Tracebacks never include local
variables (structlog's default dict tracebacks would, after redaction of the event dict).
"""

from __future__ import annotations

import logging
import os
import sys
from typing import Any, TextIO

import structlog
from structlog.tracebacks import ExceptionDictTransformer

from agentd.secret import redact

# journald reads a "<N>" syslog priority prefix on each stdout line (SyslogLevelPrefix=yes)
_PRIORITY = {"debug": 7, "info": 6, "warning": 4, "error": 3, "critical": 2, "exception": 3}


def _redact_line(_: Any, __: str, line: Any) -> Any:
    return redact(line) if isinstance(line, str) else line


def _journal_prefix(_: Any, method: str, event_dict: dict[str, Any]) -> dict[str, Any]:
    event_dict["_prio"] = _PRIORITY.get(event_dict.get("level", method), 6)
    return event_dict


class _PrefixedJSON:
    """JSON renderer that puts the journald priority in front of the line."""

    def __init__(self) -> None:
        self._json = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, method: str, event_dict: dict[str, Any]) -> str:
        prio = event_dict.pop("_prio", None)
        line = str(self._json(logger, method, event_dict))
        return f"<{prio}>{line}" if prio is not None else line


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set up structlog (and stdlib logging of our dependencies) once, at start."""
    stream = stream or sys.stdout
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    numeric = getattr(logging, level.upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: Any
    if fmt == "json":
        on_journal = bool(os.environ.get("JOURNAL_STREAM") or os.environ.get("INVOCATION_ID"))
        shared += [
            structlog.processors.ExceptionRenderer(ExceptionDictTransformer(show_locals=False)),
        ]
        if on_journal:
            shared.append(_journal_prefix)
            renderer = _PrefixedJSON()
        else:
            renderer = structlog.processors.JSONRenderer()
    else:
        shared.append(structlog.processors.format_exc_info)
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
    structlog.configure(
        processors=[*shared, renderer, _redact_line],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )
    # dependencies log through stdlib logging: keep them quiet and on the same stream
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    handler.addFilter(_StdlibRedactor())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(numeric, logging.WARNING))


class _StdlibRedactor(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.msg = redact(record.getMessage())
        record.args = ()
        return True
