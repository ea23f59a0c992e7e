"""Wall-clock timestamps in the server's JSON formats.

Go's ``time.Time`` marshals as RFC 3339 with trailing zeros of the fraction trimmed; page tokens and
JWT ``expire`` claims use a fixed six-digit layout (compared as strings by the server).
"""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

_ONE_US = timedelta(microseconds=1)


def utcnow() -> datetime:
    """Current UTC time (timezone-aware)."""
    return datetime.now(UTC)


def go_time(dt: datetime) -> str:
    """Format like Go's ``time.RFC3339Nano`` in UTC: ``2026-08-20T10:00:07.5Z``."""
    dt = dt.astimezone(UTC)
    base = dt.strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{dt.microsecond:06d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def go_now_nano() -> str:
    """Go's ``time.Now()`` as JSON: RFC 3339 with nanoseconds, trailing zeros trimmed
    (``2026-08-20T10:00:12.000123456Z``). What is published straight from memory carries it (a
    speech event's ``tm_event``, ``bin-transcribe-manager/pkg/streaminghandler/result.go``);
    what is read back from the database has microseconds (:func:`go_time`)."""
    secs, nanos = divmod(time.time_ns(), 1_000_000_000)
    base = datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    frac = f"{nanos:09d}".rstrip("0")
    return f"{base}.{frac}Z" if frac else f"{base}Z"


def year_one_time(offset_ms: int) -> str:
    """Go's ``time.Time{}.Add(offset)`` as JSON: ``0001-01-01T00:00:08.99184Z`` (strftime cannot
    print year 1 with its four digits everywhere, so the date is written out)."""
    dt = datetime(1, 1, 1, tzinfo=UTC) + timedelta(milliseconds=offset_ms)
    frac = f"{dt.microsecond:06d}".rstrip("0")
    clock = f"{dt.year:04d}-{dt.month:02d}-{dt.day:02d}T{dt:%H:%M:%S}"
    return f"{clock}.{frac}Z" if frac else f"{clock}Z"


def fixed_time(dt: datetime) -> str:
    """Format with exactly six fractional digits (page tokens, JWT ``expire``)."""
    return dt.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_fixed_time(text: str) -> datetime | None:
    """Parse a page token; ``None`` when it is not in the fixed layout."""
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
    except ValueError:
        return None


class UniqueClock:
    """Strictly increasing timestamps, so ``tm_create`` page cursors ("older than") never tie."""

    def __init__(self) -> None:
        self._last = datetime.min.replace(tzinfo=UTC)

    def now(self) -> datetime:
        """The current time, bumped by a microsecond if it would repeat the previous one."""
        now = utcnow()
        if now <= self._last:
            now = self._last + _ONE_US
        self._last = now
        return now
