"""The store's file: the pragmas, the schema and its migrations, opening it; the row types.

The schema is versioned with `PRAGMA user_version` and migrated forward, in one transaction, by
the ordered steps in `MIGRATIONS`. `open_connection` runs on the store's worker thread
(`agentd.store_worker`); `agentd.store.Store` is the API on top.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
from dataclasses import dataclass, field
from typing import Final

__all__ = ["LATEST_VERSION", "MIGRATIONS", "CallRecord", "StoreError", "open_connection"]

_BUSY_TIMEOUT_MS: Final = 5000  # another process (sqlite3 CLI, a backup) may hold the lock briefly

# WAL: readers never block the writer and a commit is one append to the -wal file.
# synchronous=FULL: every commit fsyncs the WAL. NORMAL would already survive `kill -9` of the
# process (a commit is in the OS page cache once write() returned), but on a power cut or a VM
# reset it can lose the last commits, and a lost commit here is a lost session id that VoIPBIN
# bills until someone stops it. The fsync is paid once per batch, off the per-turn hot path.
_PRAGMAS: Final = (
    f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MS}",
    "PRAGMA journal_mode = WAL",
    "PRAGMA synchronous = FULL",
    "PRAGMA foreign_keys = ON",
)

MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    # version 1: calls, their events and their transcripts
    (
        """CREATE TABLE calls (
            id            INTEGER PRIMARY KEY,   -- explicit, so VACUUM keeps "oldest first"
            call_id       TEXT NOT NULL UNIQUE,
            direction     TEXT NOT NULL,
            phase         TEXT NOT NULL,
            status        TEXT NOT NULL,
            transcribe_id TEXT,
            speaking_id   TEXT,
            pending_stops TEXT NOT NULL DEFAULT '[]',   -- JSON [[kind, session id], ...]
            greeted       INTEGER NOT NULL DEFAULT 0,
            turn          INTEGER NOT NULL DEFAULT 0,
            history       TEXT NOT NULL DEFAULT '[]',   -- JSON [[role, text], ...]
            hangup_reason TEXT NOT NULL DEFAULT '',
            created_at    REAL NOT NULL,
            updated_at    REAL NOT NULL,
            ended_at      REAL                          -- set when phase becomes 'ended'
        )""",
        "CREATE INDEX calls_phase ON calls(phase)",
        """CREATE TABLE events (
            id      INTEGER PRIMARY KEY,
            call_id TEXT NOT NULL,
            at      REAL NOT NULL,
            what    TEXT NOT NULL,
            data    TEXT NOT NULL                        -- JSON object
        )""",
        """CREATE TABLE transcripts (
            id            INTEGER PRIMARY KEY,
            call_id       TEXT NOT NULL,
            transcript_id TEXT NOT NULL UNIQUE,
            direction     TEXT NOT NULL,
            text          TEXT NOT NULL,
            at            REAL NOT NULL
        )""",
    ),
    # version 2: the transcript ids a call already answered (so a redelivered transcript after a
    # restart is not answered twice), and per-call indexes: events() and transcript() were full
    # table scans, and so was prune's delete
    (
        "ALTER TABLE calls ADD COLUMN seen_transcripts TEXT NOT NULL DEFAULT '[]'",
        "CREATE INDEX events_call ON events(call_id, id)",
        "CREATE INDEX transcripts_call ON transcripts(call_id, id)",
    ),
    # version 3: our hangup not yet confirmed by VoIPBIN, and the action waiting for the
    # goodbye to play (a restart runs them: else the caller is left on a call with no agent,
    # the goodbye said)
    (
        "ALTER TABLE calls ADD COLUMN hangup_pending INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE calls ADD COLUMN after_reply TEXT NOT NULL DEFAULT ''",
    ),
)
LATEST_VERSION: Final = len(MIGRATIONS)


class StoreError(Exception):
    """The store cannot be used: wrong or corrupt file, newer schema, disk error, closed."""


class StoreUnreachable(StoreError):
    """The store's server did not answer (refused, timed out, still starting): trying again
    later may work, unlike a wrong password or a database that is not agentd's."""


@dataclass(frozen=True)
class CallRecord:
    """Everything needed to pick a call up again after a restart (immutable, so thread-safe)."""

    call_id: str
    direction: str  # incoming / outgoing
    phase: str  # new/dialing/ringing/answered/active/ending/ended
    status: str  # last VoIPBIN call status seen
    transcribe_id: str | None
    speaking_id: str | None
    pending_stops: tuple[tuple[str, str], ...]  # (kind, session id) not yet confirmed stopped
    greeted: bool
    turn: int
    history: tuple[tuple[str, str], ...]  # (role, text)
    hangup_reason: str = ""
    seen_transcripts: tuple[str, ...] = ()  # transcript ids already answered, newest last
    hangup_pending: bool = False  # our hangup sent, not yet confirmed
    after_reply: str = ""  # what to do once the goodbye has played: "end_call", "transfer:+1…"
    # when the call was first saved (the store's clock): read back only, never written over,
    # and not part of the call's state (two saves of one state compare equal)
    created_at: float = field(default=0.0, compare=False)


# ---- opening and migrating ----------------------------------------------------------------------


def open_connection(path: str) -> tuple[sqlite3.Connection, int]:
    """Connect, set the pragmas, migrate. Runs on the worker thread. Returns (conn, version)."""
    _create_owner_only(path)
    try:
        # isolation_level=None: no implicit BEGINs, the worker writes BEGIN/COMMIT itself
        conn = sqlite3.connect(path, isolation_level=None, timeout=_BUSY_TIMEOUT_MS / 1000)
    except sqlite3.Error as exc:
        raise StoreError(f"cannot open {path}: {exc}") from None
    try:
        for pragma in _PRAGMAS:
            conn.execute(pragma)
        version = _migrate(conn, path)
    except StoreError:
        conn.close()
        raise
    except sqlite3.DatabaseError as exc:
        conn.close()
        # "file is not a database", "database disk image is malformed": a clear one-liner
        raise StoreError(f"{path} is not a usable agentd database: {exc}") from None
    except sqlite3.Error as exc:
        conn.close()
        raise StoreError(f"cannot open {path}: {exc}") from None
    return conn, version


def _create_owner_only(path: str) -> None:
    """Create the store file 0600 if it does not exist yet.

    It holds what callers said. sqlite3 would create it 0666 minus the umask (0644 from a
    shell); only the systemd unit's UMask=0077 kept it private. SQLite gives the -wal and -shm
    files the database file's own mode, so those follow. A file that already exists keeps the
    mode its owner gave it (0640 for a group that reads the history, say): agentd does not
    second-guess a choice someone made on purpose. A failure here (no such directory) is left
    for sqlite3 to report as it always has."""
    if not path or path.startswith((":", "file:")):
        return  # in-memory or URI names are not files agentd creates
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    with contextlib.suppress(OSError):  # FileExistsError included: then it is not ours to chmod
        os.close(os.open(path, flags, 0o600))


def _version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _check_version(version: int, path: str) -> None:
    if version > LATEST_VERSION:
        raise StoreError(
            f"{path} has schema version {version}; this agentd knows up to {LATEST_VERSION} "
            "(an agentd newer than this one migrated it)"
        )


def _migrate(conn: sqlite3.Connection, path: str) -> int:
    version = _version(conn)
    _check_version(version, path)
    if version == LATEST_VERSION:
        return version
    # IMMEDIATE: two agentd processes starting together must not both run step N
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = _version(conn)  # re-read under the lock
        _check_version(version, path)
        if version == 0:
            tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
            if tables:
                raise StoreError(f"{path} is an SQLite database, but not agentd's")
        for target in range(version + 1, LATEST_VERSION + 1):
            for statement in MIGRATIONS[target - 1]:
                conn.execute(statement)
        # user_version is part of the transaction: the steps and the number commit together
        conn.execute(f"PRAGMA user_version = {LATEST_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return LATEST_VERSION
