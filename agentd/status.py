"""`agentd status`: a read-only Unix socket that answers every client with one JSON document.

The daemon listens on a Unix stream socket (never a TCP port), by default
`$RUNTIME_DIRECTORY/agentd.sock` (/run/agentd under systemd). Whoever connects gets the status
document and then the end of the stream; the server never reads what a client sends, so
nothing a client says can change the daemon. The socket is mode 0660 (set after
bind, whatever the umask), a stale socket left by a crashed agentd is replaced, a live one is
left alone, and the file is removed on shutdown.

The client side (`agentd status`) uses a plain blocking socket: it connects, reads until the
end, and prints a report (or the raw JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import sys
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from agentd import __version__, logs
from agentd.config import SOCKET_NAME, default_status_socket

log = logs.get_logger("agentd.status")

SOCKET_MODE = 0o660
RUNTIME_SOCKET = f"/run/agentd/{SOCKET_NAME}"  # where the systemd unit's daemon listens


class StatusError(Exception):
    """The status socket cannot be served (the message says why)."""


# ---- the document -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LiveCall:
    """One live call as `agentd status` lists it."""

    id: str
    direction: str
    phase: str
    turn: int
    age_s: float | None  # since this agentd took the call on


@dataclass(frozen=True, slots=True)
class Connection:
    """The WebSocket to VoIPBIN."""

    state: str
    since_s: float | None  # how long it has been subscribed; None while it is not
    connects: int
    reconnects: int
    last_frame_age_s: float | None
    last_error: str = ""  # why it is not up, while it is not


@dataclass(frozen=True, slots=True)
class Counters:
    """Totals since this agentd started."""

    calls_served: int
    calls_taken: int
    events: int
    duplicates: int
    ignored: int
    rejected_frames: int
    reconnects: int
    rest_errors: int
    rest_queue_depth: int
    barge_ins: int
    backend_failures: int
    leaks: int
    log_lines_dropped: int = 0
    store_write_failures: int = 0  # writes the store refused or timed out (locked, down)
    # `reconnects` counts every attempt after a failure; these, the connections that were up
    connections_lost: int = 0
    # `rest_errors` counts every failed attempt; these, the requests that failed for good
    rest_requests_failed: int = 0


@dataclass(frozen=True, slots=True)
class ReplicaRow:
    """One live replica, from its heartbeat row."""

    id: str
    host: str
    pid: int | None
    calls: int | None  # the calls it served at its last heartbeat
    seen_s: float  # since its last heartbeat


@dataclass(frozen=True, slots=True)
class OwnerRow:
    """Who serves a live call: its lease."""

    call_id: str
    owner: str
    epoch: int
    expires_in_s: float


@dataclass(frozen=True, slots=True)
class Replicas:
    """Several agentd on one PostgreSQL: this replica, the others, and who owns which call."""

    id: str
    lease_s: float
    store_reachable: bool
    rate_per_s: float  # this replica's share of the account's budget
    leases_held: int
    live: tuple[ReplicaRow, ...]
    owners: tuple[OwnerRow, ...]
    claimed: int
    taken_by_others: int
    takeovers: int
    lost: int


@dataclass(frozen=True, slots=True)
class Snapshot:
    """What the daemon is doing, as plain values (the daemon builds it: `Daemon.status_snapshot`).

    Ages are in seconds, measured by the daemon's clocks; `document()` rounds them."""

    uptime_s: float | None
    accepting_calls: bool
    connection: Connection
    last_event_age_s: float | None
    calls: tuple[LiveCall, ...]
    counters: Counters
    replicas: Replicas | None = None

    def document(self) -> dict[str, Any]:
        """The status document: plain JSON types only, safe to show (no secret, no transcript)."""
        conn = self.connection
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_s": _seconds(self.uptime_s),
            "accepting_calls": self.accepting_calls,
            "connection": {
                "state": conn.state,
                "since_s": _seconds(conn.since_s),
                "connects": conn.connects,
                "reconnects": conn.reconnects,
                "last_frame_age_s": _seconds(conn.last_frame_age_s),
                "last_error": conn.last_error or None,
            },
            "last_event_age_s": _seconds(self.last_event_age_s),
            "calls": [{**asdict(call), "age_s": _seconds(call.age_s)} for call in self.calls],
            "counters": asdict(self.counters),
            "replicas": None if self.replicas is None else _replicas(self.replicas),
        }


def _replicas(r: Replicas) -> dict[str, Any]:
    doc = asdict(r)
    doc["rate_per_s"] = round(r.rate_per_s, 3)
    doc["live"] = [{**asdict(row), "seen_s": _seconds(row.seen_s)} for row in r.live]
    doc["owners"] = [
        {**asdict(row), "expires_in_s": round(row.expires_in_s, 3)} for row in r.owners
    ]
    return doc


def _seconds(age: float | None) -> float | None:
    return None if age is None else round(max(0.0, age), 3)


# ---- the server ---------------------------------------------------------------------------------


class StatusServer:
    """Serves the document of a fresh `snapshot()` to every client of the Unix socket at
    `path`, then hangs up."""

    def __init__(
        self, path: str, snapshot: Callable[[], Snapshot], *, timeout_s: float = 2.0
    ) -> None:
        self.path = path
        self.snapshot = snapshot
        self.timeout_s = timeout_s
        self._server: asyncio.AbstractServer | None = None
        self._identity: tuple[int, int] | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        """Bind the socket (replacing a stale one); `StatusError` or `OSError` if impossible."""
        await _clear_stale(self.path)
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)
        # after bind: the mode must not depend on the umask (systemd's UMask=0077 would give 0600)
        os.chmod(self.path, SOCKET_MODE)
        st = os.stat(self.path)
        self._identity = (st.st_dev, st.st_ino)
        log.info("status.listening", socket=self.path)

    async def close(self) -> None:
        """Stop serving and remove the socket file (if it is still ours)."""
        if self._server is None:
            return
        self._server.close()
        for task in list(self._handlers):
            task.cancel()
        await self._server.wait_closed()
        self._server = None
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._identity:
                os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Nothing the client sends is read: it gets the document, the end of the stream, and
        # the connection closes. (A client that did send something may see a reset after the
        # document instead of a clean end: the kernel's way of saying its bytes went unread.)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            body = json.dumps(self.snapshot().document(), separators=(",", ":")) + "\n"
            writer.write(body.encode())
            writer.write_eof()
            async with asyncio.timeout(self.timeout_s):
                await writer.drain()
        except TimeoutError:
            writer.transport.abort()  # a client that does not read holds nothing of ours
        except OSError:
            pass  # the client went away: its problem
        except Exception:
            log.exception("status.failed")
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if task is not None:
                self._handlers.discard(task)


async def _clear_stale(path: str) -> None:
    """Remove a socket file left by a crashed agentd; refuse to touch anything else."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise StatusError(f"{path} exists and is not a socket; not replacing it")
    try:
        _, writer = await asyncio.wait_for(asyncio.open_unix_connection(path), 2.0)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # nobody listens: left over from a crash
        log.info("status.stale_socket_removed", socket=path)
        return
    except (OSError, TimeoutError) as exc:
        raise StatusError(f"{path}: cannot tell whether it is in use: {exc}") from None
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    raise StatusError(f"{path} is in use by another running agentd")


# ---- the client: `agentd status` ----------------------------------------------------------------


class NotRunning(Exception):
    """No agentd answers on the socket (the message is the one line to print)."""


def fetch(path: str, timeout_s: float = 5.0) -> dict[str, Any]:
    """Connect, read the whole document, return it; `NotRunning` if nobody answers."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    chunks: list[bytes] = []
    try:
        try:
            sock.connect(path)
        except FileNotFoundError:
            raise NotRunning(f"agentd is not running (no status socket at {path})") from None
        except ConnectionRefusedError:
            raise NotRunning(
                f"agentd is not running (nothing listens on the status socket {path})"
            ) from None
        except PermissionError:
            raise NotRunning(
                f"agentd status: permission denied on {path} (run as root or the agentd user)"
            ) from None
        except OSError as exc:
            raise NotRunning(f"agentd status: cannot connect to {path}: {exc}") from None
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                raise NotRunning(f"agentd status: no answer on {path}") from None
            except ConnectionResetError:
                break  # whatever arrived before the reset is complete or fails to parse below
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        sock.close()
    try:
        doc = json.loads(b"".join(chunks))
    except ValueError:
        raise NotRunning(f"agentd status: {path} did not answer with a status document") from None
    if not isinstance(doc, dict):
        raise NotRunning(f"agentd status: {path} did not answer with a status document")
    return doc


def client_socket(
    arg: str | None, config_path: str | None, env: Mapping[str, str] | None = None
) -> str:
    """Which socket `agentd status` asks: `--socket`, `$AGENTD_STATUS_SOCKET`, the config's
    `[status] socket`, else the first existing default (the same rule as the daemon's, then
    /run/agentd/agentd.sock for `sudo agentd status` beside the systemd service). "" = off.

    Only the config file's status and store keys are read: no secret is needed to ask."""
    env = os.environ if env is None else env
    if arg:
        return os.path.abspath(arg)
    if "AGENTD_STATUS_SOCKET" in env:
        value = env["AGENTD_STATUS_SOCKET"]
        return os.path.abspath(value) if value else ""
    raw: dict[str, Any] = {}
    if config_path:
        try:
            raw = tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
        except PermissionError:
            # guessing the socket without it would report a running service as not running
            raise NotRunning(
                f"agentd status: cannot read {config_path}: permission denied "
                "(run with sudo, or name the socket: --socket)"
            ) from None
        except OSError as exc:
            raise NotRunning(
                f"agentd status: cannot read {config_path}: {exc.strerror or exc} "
                "(name the socket: --socket)"
            ) from None
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            # the socket it names is unknown: the default's "not running" may be untrue
            raise NotRunning(
                f"agentd status: {config_path}: not valid TOML: {exc} (name the socket: --socket)"
            ) from None
    section = raw.get("status")
    configured = section.get("socket") if isinstance(section, dict) else None
    if isinstance(configured, str):
        return os.path.abspath(configured) if configured else ""
    store = raw.get("store")
    store_path = store.get("path") if isinstance(store, dict) else None
    store_path = env.get("AGENTD_STORE_PATH", store_path if isinstance(store_path, str) else None)
    primary = default_status_socket(env, "agentd.db" if store_path is None else store_path)
    for candidate in (primary, RUNTIME_SOCKET, os.path.abspath(SOCKET_NAME)):
        if os.path.exists(candidate):
            return candidate
        parent = os.path.dirname(candidate)
        if os.path.isdir(parent) and not os.access(parent, os.X_OK):
            # a directory we may not look into (the service's /run/agentd, 0700): the socket
            # may well be there, and connecting to it says "permission denied", not "not running"
            return candidate
    return primary


def duration(seconds: float | None) -> str:
    """4.2 s, 3m 12s, 2h 03m, 3d 04h."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(seconds)
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


_COUNTERS = (
    ("calls_served", "calls served"),
    ("events", "events"),
    ("duplicates", "duplicates dropped"),
    ("rejected_frames", "rejected frames"),
    ("connections_lost", "connections lost"),
    ("reconnects", "reconnects"),
    ("rest_requests_failed", "REST requests failed"),
    ("rest_errors", "REST errors"),
    ("rest_queue_depth", "REST queue depth"),
    ("barge_ins", "barge-ins"),
    ("backend_failures", "backend failures"),
    ("leaks", "leaked sessions"),
    ("log_lines_dropped", "log lines dropped"),
    ("store_write_failures", "store write failures"),
)


def render(doc: Mapping[str, Any]) -> str:
    """The status document as a short report for a person."""
    conn = doc.get("connection") or {}
    calls = doc.get("calls") or []
    counters = doc.get("counters") or {}
    state = str(conn.get("state", "?"))
    since = conn.get("since_s")
    link = f"{state} for {duration(since)}" if since is not None else state
    link += (
        f" ({_n(conn.get('connects', 0), 'connect')}, {_n(conn.get('reconnects', 0), 'reconnect')})"
    )
    if conn.get("last_error"):
        link += f"; last error: {conn['last_error']}"
    lines = [
        f"agentd {doc.get('version', '?')} (pid {doc.get('pid', '?')}), "
        f"up {duration(doc.get('uptime_s'))}"
        + ("" if doc.get("accepting_calls", True) else ", shutting down"),
        f"VoIPBIN:    {link}",
        f"last event: {_ago(doc.get('last_event_age_s'))}",
        f"live calls: {len(calls)}",
    ]
    if calls:
        rows = [("CALL", "DIRECTION", "PHASE", "TURN", "AGE")] + [
            (
                str(c.get("id", "")),
                str(c.get("direction") or "-"),
                str(c.get("phase", "")),
                str(c.get("turn", "")),
                duration(c.get("age_s")),
            )
            for c in calls
        ]
        lines += _table(rows)
    replicas = doc.get("replicas")
    if isinstance(replicas, Mapping):
        lines += _render_replicas(replicas)
    lines.append("counters:")
    width = max(len(label) for _, label in _COUNTERS)
    for key, label in _COUNTERS:
        if key in counters:
            lines.append(f"  {label.ljust(width)}  {counters[key]}")
    return "\n".join(lines)


def _render_replicas(r: Mapping[str, Any]) -> list[str]:
    me = str(r.get("id", "?"))
    reach = "reachable" if r.get("store_reachable") else "UNREACHABLE"
    lines = [
        f"replica:    {me} (lease {r.get('lease_s')} s, PostgreSQL {reach}, "
        f"{r.get('rate_per_s')} req/s of the account's budget)",
        f"  leases held {r.get('leases_held')}, claimed {r.get('claimed')}, "
        f"taken over {r.get('takeovers')}, lost {r.get('lost')}, "
        f"left to other replicas {r.get('taken_by_others')}",
    ]
    live = r.get("live") or []
    lines.append(f"replicas:   {len(live)} live")
    rows = [("REPLICA", "HOST", "PID", "CALLS", "SEEN")] + [
        (
            str(x.get("id", "")) + (" (this one)" if x.get("id") == me else ""),
            str(x.get("host") or "-"),
            str(x.get("pid") or "-"),
            str(x.get("calls") if x.get("calls") is not None else "-"),
            _ago(x.get("seen_s")),
        )
        for x in live
    ]
    lines += _table(rows)
    owners = r.get("owners") or []
    if owners:
        lines.append("calls by owner:")
        owned = [("CALL", "OWNER", "EPOCH", "LEASE")] + [
            (
                str(o.get("call_id", "")),
                str(o.get("owner", "")),
                str(o.get("epoch", "")),
                _lease_left(o.get("expires_in_s")),
            )
            for o in owners
        ]
        lines += _table(owned)
    return lines


def _lease_left(seconds: object) -> str:
    if not isinstance(seconds, int | float):
        return "-"
    return f"{seconds:.1f} s left" if seconds > 0 else "expired: up for takeover"


def _table(rows: Sequence[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return [
        ("  " + "  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True))).rstrip()
        for row in rows
    ]


def _n(count: object, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _ago(age: float | None) -> str:
    return "none yet" if age is None else f"{duration(age)} ago"


def main(socket_arg: str | None, as_json: bool, config_path: str | None) -> int:
    """`agentd status`: print the report (or the JSON); 1 when no agentd answers."""
    try:
        path = client_socket(socket_arg, config_path)
        if not path:
            print("agentd status: the status socket is off (status.socket = '')", file=sys.stderr)
            return 1
        doc = fetch(path)
    except NotRunning as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(json.dumps(doc, indent=2) if as_json else render(doc))
    return 0
