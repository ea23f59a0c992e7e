"""`agentd calls`: the call history kept in the store, read-only.

`agentd calls` lists the calls, newest first; `agentd calls show ID` shows one: its
conversation, the timings of each turn, what went wrong, and the billed sessions with their
cleanup. It never writes: it opens the SQLite file with `mode=ro` (WAL lets a running daemon
keep writing beside it), or PostgreSQL (`[store] url`) in a read-only session.

Only the config file's `[store]` is read (or `$AGENTD_STORE_PATH`, `$AGENTD_STORE_URL`): no
VoIPBIN credential is needed to look at the history, the same rule as `agentd status`.
PostgreSQL's password is found where `agentd run` finds it.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sqlite3
import sys
import time
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Protocol
from urllib.parse import quote

from agentd.call.report import ERROR_KINDS
from agentd.config import ConfigError, load_store_url
from agentd.names import TURN_TIMINGS, Kind
from agentd.store_schema import StoreError

EXIT_NOT_FOUND: Final = 1
EXIT_NO_STORE: Final = 2

_UNITS: Final = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"(\d+(?:\.\d+)?)\s*([smhdw])")
_ERROR_WHATS: Final = tuple(sorted(k.value for k in ERROR_KINDS))
_CUT_MARK: Final = " —"  # History marks a reply cut by a barge-in: what was heard, then " —"
# where the systemd service keeps the store: its StateDirectory (the installed config names it)
SERVICE_STORE: Final = "/var/lib/agentd/agentd.db"


class HistoryError(Exception):
    """The history cannot be read: no store configured, no file, not agentd's. Exit 2."""


class Reader(Protocol):
    """A store opened read-only. Queries use `?` marks (PostgreSQL's reader numbers them)."""

    def rows(self, sql: str, params: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        """The rows of one query."""
        ...

    def close(self) -> None:
        """Let the store go."""
        ...


class SqliteReader:
    """The SQLite store file (`open_read_only`)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def rows(self, sql: str, params: Iterable[object] = ()) -> list[tuple[Any, ...]]:
        """The rows of one query."""
        return self._conn.execute(sql, tuple(params)).fetchall()

    def close(self) -> None:
        """Close the file."""
        self._conn.close()


def open_history(
    config_path: str | None, store: str | None = None, env: Mapping[str, str] | None = None
) -> Reader:
    """The store to read: the file `store` if given, else the config's PostgreSQL (`[store]
    url`) or SQLite file (`store_path`). HistoryError if it cannot be read."""
    if store is not None:
        if not store:
            # `store.path = ""` turns the store off; an empty --store is a mistake
            raise HistoryError("--store: empty path (name the store file to read)")
        return SqliteReader(open_read_only(store))
    try:
        url = load_store_url(config_path, env)
    except ConfigError as exc:
        raise HistoryError(str(exc)) from None
    if url is None:
        return SqliteReader(open_read_only(store_path(config_path, env)))
    from agentd.store_pg import PgReader  # asyncpg only for a PostgreSQL store

    try:
        return PgReader.open(url)
    except StoreError as exc:
        raise HistoryError(str(exc)) from None


# ---- where the store is, and opening it read-only -----------------------------------------------


def store_path(config_path: str | None, env: Mapping[str, str] | None = None) -> str:
    """The store the daemon with this config writes: `$AGENTD_STORE_PATH`, the config's
    `[store] path`, else the default `agentd.db` — or, when there is none here, the systemd
    service's store (so `sudo agentd calls` finds it). "" = the store is off."""
    env = os.environ if env is None else env
    if "AGENTD_STORE_PATH" in env:
        return env["AGENTD_STORE_PATH"]
    if config_path:
        try:
            raw = tomllib.loads(Path(config_path).read_text(encoding="utf-8"))
        except OSError as exc:
            raise HistoryError(f"cannot read {config_path}: {exc.strerror or exc}") from None
        except tomllib.TOMLDecodeError as exc:
            raise HistoryError(f"{config_path}: not valid TOML: {exc}") from None
        section = raw.get("store")
        value = section.get("path") if isinstance(section, dict) else None
        if isinstance(value, str):
            return value
    if not os.path.exists("agentd.db") and os.path.exists(SERVICE_STORE):
        return SERVICE_STORE
    return "agentd.db"


def open_read_only(path: str) -> sqlite3.Connection:
    """The store, opened so that nothing can be written; HistoryError if it cannot be used."""
    if not path:
        raise HistoryError(
            'the store is off (store.path = ""): agentd keeps no call history. '
            "Set [store] path to keep one."
        )
    full = os.path.abspath(path)
    if not os.path.exists(full):
        raise HistoryError(f"no store at {full}: has agentd run with this config yet?")
    try:
        conn = sqlite3.connect(f"file:{quote(full)}?mode=ro", uri=True)
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        conn.execute("SELECT count(*) FROM calls").fetchone()
    except sqlite3.Error as exc:
        raise HistoryError(f"{full} is not a usable agentd store: {exc}") from None
    if version < 1:
        conn.close()
        raise HistoryError(f"{full} is not an agentd store")
    return conn


# ---- --since ------------------------------------------------------------------------------------


def parse_since(text: str, now: float) -> float:
    """`2h`, `30m`, `7d`, `90s`, `1w` back from `now`, or a date / date-time (ISO 8601, local
    time unless it says otherwise): the unix time calls must have started at or after."""
    m = _DURATION.fullmatch(text.strip())
    if m:
        return now - float(m.group(1)) * _UNITS[m.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise HistoryError(
            f"--since {text!r}: expected a duration (90s, 30m, 2h, 7d, 1w) or a date "
            "(2025-01-31, 2025-01-31T14:00)"
        ) from None


# ---- reading ------------------------------------------------------------------------------------


def _loads(raw: str | None, default: Any) -> Any:
    if raw is None:
        return default
    try:
        return json.loads(raw)
    except ValueError:
        return default


def list_calls(db: Reader, since: float | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The calls, newest first, with what the list shows of each."""
    rows = db.rows(
        """SELECT call_id, direction, phase, hangup_reason, turn, created_at, ended_at
           FROM calls WHERE created_at >= ? ORDER BY created_at DESC, id DESC LIMIT ?""",
        (since if since is not None else float("-inf"), limit),
    )
    ids = [r[0] for r in rows]
    errors: dict[str, int] = {}
    reports: dict[str, dict[str, Any]] = {}
    if ids:
        marks = ",".join("?" * len(ids))
        whats = ",".join("?" * len(_ERROR_WHATS))
        for cid, n in db.rows(
            f"""SELECT call_id, count(*) FROM events
                WHERE call_id IN ({marks}) AND what IN ({whats}) GROUP BY call_id""",
            (*ids, *_ERROR_WHATS),
        ):
            errors[cid] = int(n)
        for cid, data in db.rows(
            f"SELECT call_id, data FROM events WHERE call_id IN ({marks}) AND what = ?",
            (*ids, Kind.REPORT.value),
        ):
            reports[cid] = _loads(data, {})
    out = []
    for cid, direction, phase, reason, turn, created, ended in rows:
        report = reports.get(cid)
        if report is not None and isinstance(report.get("duration_s"), (int, float)):
            duration: float | None = float(report["duration_s"])
        elif ended is not None:
            duration = float(ended) - float(created)
        else:
            duration = None  # still live (or left live by an agentd that stopped)
        out.append(
            {
                "call_id": cid,
                "started_at": float(created),
                "ended_at": None if ended is None else float(ended),
                "direction": direction,
                "phase": phase,
                "duration_s": None if duration is None else round(duration, 1),
                "turns": int(turn),
                "hangup_reason": reason,
                "errors": errors.get(cid, 0),
            }
        )
    return out


def find_call(db: Reader, wanted: str) -> str:
    """The full id of the call `wanted` names (the id, or an unambiguous start of it)."""
    exact = db.rows("SELECT call_id FROM calls WHERE call_id = ?", (wanted,))
    if exact:
        return str(exact[0][0])
    like = wanted.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
    rows = db.rows("SELECT call_id FROM calls WHERE call_id LIKE ? ESCAPE '\\' LIMIT 3", (like,))
    if len(rows) == 1:
        return str(rows[0][0])
    if rows:
        raise LookupError(f"{wanted!r} matches several calls: give more of the id")
    raise LookupError(f"no call {wanted!r} in the store")


def show_call(db: Reader, call_id: str) -> dict[str, Any]:
    """Everything the store has of one call, arranged for `agentd calls show`."""
    [row] = db.rows(
        """SELECT direction, phase, status, hangup_reason, turn, history, pending_stops,
                  created_at, ended_at FROM calls WHERE call_id = ?""",
        (call_id,),
    )
    direction, phase, status, reason, turn, history, pending, created, ended = row
    created = float(created)
    events = [
        (float(at), str(what), _loads(data, {}))
        for at, what, data in db.rows(
            "SELECT at, what, data FROM events WHERE call_id = ? ORDER BY id", (call_id,)
        )
    ]
    transcripts = [
        {"at_s": round(float(at) - created, 2), "direction": d, "text": t}
        for d, t, at in db.rows(
            "SELECT direction, text, at FROM transcripts WHERE call_id = ? ORDER BY id",
            (call_id,),
        )
    ]
    # a long call's older messages, stored as `history` events as they left its kept history
    older = [
        m for _, what, data in events if what == Kind.HISTORY for m in data.get("messages", ())
    ]
    kept = _loads(history, [])
    conversation, source = _conversation(
        older + (kept if isinstance(kept, list) else []), transcripts
    )

    def of(kind: Kind) -> list[dict[str, Any]]:
        return [
            {"at_s": round(at - created, 2), **data} for at, what, data in events if what == kind
        ]

    ended_ev = of(Kind.ENDED)
    reports = of(Kind.REPORT)
    return {
        "call_id": call_id,
        "direction": direction,
        "phase": phase,
        "status": status,
        "started_at": created,
        "ended_at": None if ended is None else float(ended),
        "hangup_reason": reason,
        "hangup_by": ended_ev[0].get("hangup_by", "") if ended_ev else "",
        "turns": int(turn),
        "conversation_source": source,
        "conversation": conversation,
        "transcripts": transcripts,
        "turn_timings": of(Kind.TURN),
        "barge_ins": of(Kind.BARGE_IN),
        "not_answered": [
            {"at_s": round(at - created, 2), "why": what, "text": data.get("text", "")}
            for at, what, data in events
            if what in (Kind.BACKCHANNEL, Kind.ECHO)
        ],
        "errors": [
            {"at_s": round(at - created, 2), "kind": what, **data}
            for at, what, data in events
            if what in _ERROR_WHATS
        ],
        "report": reports[-1] if reports else None,
        "unconfirmed_stops": [list(p) for p in _loads(pending, [])],
    }


def _conversation(
    history: list[Any], transcripts: list[dict[str, Any]]
) -> tuple[list[dict[str, Any]], str]:
    """The conversation and where it comes from. The call's history is the truest record:
    the agent's lines as the caller heard them (a reply cut by a barge-in keeps only what was
    played) and the caller's turns as answered (finals joined into one turn). VoIPBIN's final
    transcripts are the fallback: what was transcribed, not what was heard."""
    lines = []
    for item in history:
        if not (isinstance(item, list) and len(item) == 2) or item[0] == "system":
            continue
        role, text = str(item[0]), str(item[1])
        cut = text.endswith(_CUT_MARK)
        lines.append(
            {
                "who": "agent" if role == "assistant" else "caller",
                "text": text[: -len(_CUT_MARK)] if cut else text,
                "cut_off": cut,
            }
        )
    if lines:
        return lines, "history"
    lines = [
        {
            "who": "caller" if t["direction"] == "in" else "agent",
            "text": t["text"],
            "cut_off": False,
        }
        for t in transcripts
    ]
    return lines, "transcripts" if lines else "none"


# ---- rendering ----------------------------------------------------------------------------------


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def _secs(value: object) -> str:
    return f"{value:.1f} s" if isinstance(value, (int, float)) else "-"


def render_list(calls: Sequence[Mapping[str, Any]]) -> str:
    """The list as an aligned table."""
    if not calls:
        return "no calls in the store"
    head = ("CALL", "STARTED", "DIRECTION", "DURATION", "TURNS", "HANGUP", "ERRORS")
    rows = [
        (
            c["call_id"],
            _when(c["started_at"]),
            c["direction"] or "-",
            _secs(c["duration_s"]) if c["duration_s"] is not None else f"({c['phase']})",
            str(c["turns"]),
            c["hangup_reason"] or "-",
            str(c["errors"]),
        )
        for c in calls
    ]
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip()
        for r in (head, *rows)
    )


_SOURCES: Final = {
    "history": "from the call's history: the agent's lines as the caller heard them "
    "(a reply cut by a barge-in keeps only what played), the caller's turns as answered",
    "transcripts": "from VoIPBIN's final transcripts (the call kept no history)",
    "none": "nothing was said",
}


def render_show(doc: Mapping[str, Any]) -> str:
    """One call, for a person."""
    out = [f"call {doc['call_id']}"]
    ended = doc["ended_at"]
    out.append(
        f"  {doc['direction'] or 'unknown direction'}, started {_when(doc['started_at'])}, "
        + (f"ended {_when(ended)}" if ended is not None else f"not ended ({doc['phase']})")
    )
    if doc["hangup_reason"]:
        by = f" by {doc['hangup_by']}" if doc["hangup_by"] else ""
        out.append(f"  hangup: {doc['hangup_reason']}{by}")
    report = doc["report"]
    if report:
        latency = report.get("first_say_ms")
        lat = (
            f", first say p50 {latency['p50']:.0f} ms, p90 {latency['p90']:.0f} ms, "
            f"max {latency['max']:.0f} ms"
            if isinstance(latency, dict)
            else ""
        )
        if report.get("answered") is False:
            out.append("  not answered")  # busy, no answer, failed: no time, turn or say
        else:
            out.append(
                f"  {_secs(report.get('duration_s'))} answered, {report.get('turns', 0)} turns, "
                f"{report.get('barge_ins', 0)} barge-ins, {report.get('backchannels', 0)} "
                f"backchannels{lat}"
            )
    out += ["", f"Conversation ({_SOURCES[doc['conversation_source']]}):"]
    for line in doc["conversation"]:
        cut = "  [cut off by the caller]" if line["cut_off"] else ""
        out.append(f"  {line['who']:>6}: {line['text']}{cut}")
    if doc["not_answered"]:
        out += ["", "Heard but not answered:"]
        for n in doc["not_answered"]:
            out.append(f"  +{n['at_s']:.1f} s  {n['why']}: {n['text']}")
    out += [
        "",
        "Turns (ms from the end of the caller's turn: their last words, or on finals their "
        "final transcript):",
    ]
    if doc["turn_timings"]:
        keys = [f"{name}_ms" for name in TURN_TIMINGS]
        out.append("  TURN  FIRST TOKEN  FIRST SENTENCE  FIRST SAY  LAST SAY")
        for t in doc["turn_timings"]:
            cells = [f"{t[k]:.0f}" if isinstance(t.get(k), (int, float)) else "-" for k in keys]
            out.append(
                f"  {t.get('turn', '?')!s:<4}  {cells[0]:>11}  {cells[1]:>14}  "
                f"{cells[2]:>9}  {cells[3]:>8}"
            )
    else:
        out.append("  none timed")
    for b in doc["barge_ins"]:
        out.append(f"  barge-in at +{b['at_s']:.1f} s, turn {b.get('turn')} (by {b.get('by')})")
    out += ["", "Errors:"]
    if doc["errors"]:
        for e in doc["errors"]:
            rest = ", ".join(f"{k}={v}" for k, v in e.items() if k not in ("at_s", "kind"))
            out.append(f"  +{e['at_s']:.1f} s  {e['kind']}: {rest}")
    else:
        out.append("  none")
    return "\n".join(out + _render_sessions(doc))


def _render_sessions(doc: Mapping[str, Any]) -> list[str]:
    report = doc["report"]
    out = ["", "Sessions (billed from creation until confirmed gone):"]
    sessions = report.get("sessions", []) if report else []
    for s in sessions:
        how = s.get("confirmed")
        state = f"confirmed {how}" if how else "NOT confirmed stopped: may still be billing"
        out.append(f"  {s['kind']:<10} {s['id']}  open {_secs(s.get('open_s'))}  {state}")
    if report:
        secs = report.get("session_seconds", {})
        out.append(
            f"  total: speaking {_secs(secs.get('speaking'))}, "
            f"transcribe {_secs(secs.get('transcribe'))}"
        )
        if report.get("restored"):
            # the sessions it resumed are listed, timed from when this agentd saw them
            out.append(
                "  (restored after a restart: open times count from the restart, VoIPBIN's "
                "bill from each session's creation; sessions that ended before it are not "
                "listed)"
            )
    else:
        out.append("  no call report (the call is live, or ended before agentd kept reports)")
    for kind, sid in doc["unconfirmed_stops"]:
        out.append(f"  stop of {kind} {sid} never confirmed: stop it by hand")
    return out


# ---- the command --------------------------------------------------------------------------------


def main(
    config_path: str | None,
    *,
    call_id: str | None = None,
    since: str | None = None,
    as_json: bool = False,
    limit: int = 100,
    store: str | None = None,
) -> int:
    """`agentd calls` (no `call_id`) or `agentd calls show ID`; `store`: this file rather
    than the one the config names."""
    try:
        db = open_history(config_path, store)
    except HistoryError as exc:
        print(f"agentd calls: {exc}", file=sys.stderr)
        return EXIT_NO_STORE
    with contextlib.closing(db):
        try:
            if call_id is None:
                start = parse_since(since, time.time()) if since else None
                calls = list_calls(db, start, limit)
                text = json.dumps(calls, indent=2) if as_json else render_list(calls)
            else:
                doc = show_call(db, find_call(db, call_id))
                text = (
                    json.dumps(doc, indent=2, ensure_ascii=False) if as_json else render_show(doc)
                )
        except HistoryError as exc:
            print(f"agentd calls: {exc}", file=sys.stderr)
            return EXIT_NO_STORE
        except LookupError as exc:
            print(f"agentd calls: {exc}", file=sys.stderr)
            return EXIT_NOT_FOUND
        except sqlite3.Error as exc:
            print(f"agentd calls: cannot read the store: {exc}", file=sys.stderr)
            return EXIT_NO_STORE
        except StoreError as exc:  # PostgreSQL's, its password already taken out
            print(f"agentd calls: {exc}", file=sys.stderr)
            return EXIT_NO_STORE
    print(text)
    return 0
