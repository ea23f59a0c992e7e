"""sd_notify and the systemd watchdog, with no dependency.

systemd documents the notification protocol itself as the stable interface (sd_notify(3)):
one ``AF_UNIX``/``SOCK_DGRAM`` datagram of newline-separated ``KEY=VALUE`` assignments, sent
to the socket named by ``$NOTIFY_SOCKET``. A leading ``@`` in that variable means the Linux
abstract namespace (a leading NUL byte in the address). The watchdog is configured by
``$WATCHDOG_USEC`` and applies only to the process named by ``$WATCHDOG_PID``, when that is set.

Nothing here may take the daemon down. Every send is a single non-blocking ``sendto`` on a
fresh socket. A missing socket, a full queue or any other ``OSError`` is logged at debug
level and reported as ``False``. Outside systemd (``$NOTIFY_SOCKET`` unset) every call does
nothing.

The parsing and formatting are pure functions (:func:`notify_address`,
:func:`watchdog_usec_for`, :func:`format_message`), so most of the logic tests without sockets.

Typical use in the daemon::

    notifier = Notifier.from_env()
    progress = ProgressStamp()           # the supervisor calls progress.mark() as it works
    wd = asyncio.create_task(watchdog_loop(notifier, progress.fresh_within(20.0)))
    notifier.ready(status="connected to VoIPBIN")
    ...
    notifier.stopping()
    wd.cancel()
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Callable, Mapping

__all__ = [
    "Notifier",
    "ProgressStamp",
    "format_message",
    "monotonic_usec",
    "notify_address",
    "watchdog_loop",
    "watchdog_usec_for",
]

log = logging.getLogger(__name__)

# Characters that would break the line-oriented protocol: a newline starts a new assignment.
_UNSAFE = str.maketrans({"\n": " ", "\r": " ", "\0": " "})


def notify_address(notify_socket: str | None) -> bytes | None:
    """Turn ``$NOTIFY_SOCKET`` into an ``AF_UNIX`` address, or ``None`` if we cannot use it.

    ``/run/systemd/notify`` is a filesystem socket. ``@name`` is the abstract socket
    ``\\0name``. Anything else is rejected, like libsystemd does: an unset or empty value, a
    relative path, or systemd >= 254's ``vsock:`` addresses (Debian 12 ships 252).
    """
    if not notify_socket:
        return None
    if notify_socket.startswith("@"):
        if len(notify_socket) == 1:
            return None
        return b"\0" + os.fsencode(notify_socket[1:])
    if notify_socket.startswith("/"):
        return os.fsencode(notify_socket)
    return None


def watchdog_usec_for(env: Mapping[str, str], pid: int) -> int | None:
    """Return the watchdog timeout in microseconds that applies to process ``pid``, if any.

    It is ``$WATCHDOG_USEC`` when that is a positive integer and ``$WATCHDOG_PID`` is unset or
    equal to ``pid``. Otherwise ``None``: no watchdog, a malformed value, or a watchdog that
    belongs to another process (for instance a parent that passed its environment on to us).
    """
    raw_usec = env.get("WATCHDOG_USEC")
    if not raw_usec:
        return None
    try:
        usec = int(raw_usec, 10)
    except ValueError:
        return None
    if usec <= 0:
        return None
    raw_pid = env.get("WATCHDOG_PID")
    if raw_pid:
        try:
            owner = int(raw_pid, 10)
        except ValueError:
            return None
        if owner != pid:
            return None
    return usec


def format_message(*assignments: str) -> bytes:
    """Join ``KEY=VALUE`` assignments into one notification datagram.

    Each assignment must contain ``=`` (a ``ValueError`` otherwise: a programming error).
    A newline in a value would start a new assignment and a NUL would end the message, so
    both become spaces. The datagram has no trailing newline, and systemd accepts it without one.
    """
    if not assignments:
        raise ValueError("a notification needs at least one KEY=VALUE assignment")
    lines: list[str] = []
    for assignment in assignments:
        key, sep, _ = assignment.partition("=")
        if not sep or not key:
            raise ValueError(f"not a KEY=VALUE assignment: {assignment!r}")
        lines.append(assignment.translate(_UNSAFE))
    return "\n".join(lines).encode("utf-8", "replace")


def monotonic_usec() -> int:
    """``CLOCK_MONOTONIC`` in microseconds, which is what ``MONOTONIC_USEC=`` expects."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Sends sd_notify messages to systemd. Every method is a no-op outside systemd.

    Build it with :meth:`from_env`. Each send method returns ``True`` if the datagram was
    handed to the kernel, and ``False`` if it was not sent (not under systemd, or an
    ``OSError``, which is logged at debug level). It never raises.
    """

    def __init__(self, address: bytes | None, watchdog_usec: int | None = None) -> None:
        """Use ``address`` (see :func:`notify_address`) and a watchdog timeout that is ours."""
        self._address = address
        self._watchdog_usec = watchdog_usec if watchdog_usec and watchdog_usec > 0 else None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ, *, pid: int | None = None) -> Notifier:
        """Read ``$NOTIFY_SOCKET``, ``$WATCHDOG_USEC`` and ``$WATCHDOG_PID`` from ``env``.

        ``pid`` defaults to :func:`os.getpid` and is the process the watchdog must belong to.
        """
        address = notify_address(env.get("NOTIFY_SOCKET"))
        if address is None and env.get("NOTIFY_SOCKET"):
            log.debug("sd_notify: unsupported NOTIFY_SOCKET %r, disabled", env["NOTIFY_SOCKET"])
        watchdog_usec = watchdog_usec_for(env, os.getpid() if pid is None else pid)
        return cls(address, watchdog_usec)

    def __repr__(self) -> str:
        return f"Notifier(address={self._address!r}, watchdog_usec={self._watchdog_usec!r})"

    @property
    def enabled(self) -> bool:
        """True when running under systemd with a usable ``$NOTIFY_SOCKET``."""
        return self._address is not None

    @property
    def watchdog_usec(self) -> int | None:
        """The watchdog timeout systemd set for this process, in microseconds, or ``None``."""
        return self._watchdog_usec if self.enabled else None

    @property
    def watchdog_interval_s(self) -> float | None:
        """How often to send ``WATCHDOG=1``: half the timeout, in seconds, or ``None``."""
        usec = self.watchdog_usec
        return None if usec is None else usec / 2 / 1_000_000

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` assignments as one datagram. Never blocks.

        It raises nothing for I/O problems. Only a malformed assignment raises ``ValueError``.
        """
        if self._address is None:
            return False
        data = format_message(*assignments)
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(data, self._address)
        except OSError as exc:
            # ENOENT / ECONNREFUSED: no listener; EAGAIN: systemd's queue is full. A lost
            # notification is harmless, but crashing the daemon over it would not be.
            log.debug("sd_notify: could not send %r: %s", data, exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) finished: ``READY=1``, with an optional ``STATUS=``."""
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1", f"STATUS={status}")

    def status(self, text: str) -> bool:
        """Set the one-line status that ``systemctl status`` shows."""
        return self.send(f"STATUS={text}")

    def reloading(self) -> bool:
        """A reload (SIGHUP) started. Follow it with :meth:`ready` once the reload is done.

        ``MONOTONIC_USEC`` is required with ``RELOADING=1`` by systemd >= 253
        (``Type=notify-reload``). systemd 252 ignores it.
        """
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> bool:
        """Shutdown (the drain) has started: ``STOPPING=1``."""
        return self.send("STOPPING=1")

    def watchdog(self) -> bool:
        """Feed the watchdog: ``WATCHDOG=1``, only if the watchdog is set for this process.

        If ``$WATCHDOG_PID`` names another process, that process owns the watchdog. Feeding it
        from here would keep a hung owner alive, so nothing is sent.
        """
        if self.watchdog_usec is None:
            return False
        return self.send("WATCHDOG=1")


class ProgressStamp:
    """A monotonic "last made progress" stamp for the watchdog's health check.

    The supervisor calls :meth:`mark` each time it gets real work done, such as a loop
    iteration or a message handled. :meth:`fresh_within` returns the ``is_healthy`` callable
    that :func:`watchdog_loop` takes. A new stamp counts as fresh.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        """``clock`` must be monotonic. It can be injected in tests."""
        self._clock = clock
        self._last = clock()

    def mark(self) -> None:
        """Record progress now."""
        self._last = self._clock()

    def age_s(self) -> float:
        """Seconds since the last :meth:`mark` (or since creation)."""
        return self._clock() - self._last

    def fresh_within(self, max_age_s: float) -> Callable[[], bool]:
        """An ``is_healthy`` check: was there progress in the last ``max_age_s`` seconds?"""
        if max_age_s <= 0:
            raise ValueError("max_age_s must be positive")

        def is_healthy() -> bool:
            return self.age_s() <= max_age_s

        return is_healthy


async def watchdog_loop(notifier: Notifier, is_healthy: Callable[[], bool]) -> None:
    """Send ``WATCHDOG=1`` every ``notifier.watchdog_interval_s``, but only while healthy.

    Returns at once if no watchdog is set for this process. Otherwise it runs until
    cancelled. The first check is made immediately. While ``is_healthy()`` is false (or
    raises), nothing is sent. systemd then kills the service with SIGABRT when
    ``WatchdogSec`` expires, and ``Restart=on-failure`` starts it again. This is intended: a
    daemon that is alive but stuck should be restarted. If the event loop itself is blocked,
    this coroutine cannot run at all, which has the same effect.
    """
    interval = notifier.watchdog_interval_s
    if interval is None:
        return
    healthy_before = True
    while True:
        try:
            healthy = bool(is_healthy())
        except Exception:
            log.exception("sd_notify: watchdog health check raised; treating as unhealthy")
            healthy = False
        if healthy:
            if not healthy_before:
                log.warning("sd_notify: healthy again, resuming watchdog pings")
            notifier.watchdog()
        elif healthy_before:
            log.warning(
                "sd_notify: unhealthy, withholding watchdog pings; systemd aborts and "
                "restarts the service once WatchdogSec (%.0f s) passes without one",
                interval * 2,
            )
        healthy_before = healthy
        await asyncio.sleep(interval)
