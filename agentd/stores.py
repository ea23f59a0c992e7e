"""Which store a config asks for: open it, describe it, check it (`agentd check-config`).

`[store] url` (PostgreSQL, `agentd.store_pg.PgStore`) for several replicas sharing one database;
otherwise `[store] path` (SQLite, `agentd.store.Store`), the default for one box; neither
(`path = ""`) keeps no store. Both stores offer the same call methods.

Leases: only PostgreSQL has them (`PgStore.claim/renew/...`, used by `agentd.replicas`). The
SQLite store is one process's file, so it has none: its process owns every call it serves.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from agentd.calls import SERVICE_STORE
from agentd.config import Config
from agentd.store import LATEST_VERSION, Store, StoreError

if TYPE_CHECKING:
    from agentd.store_pg import PgStore

__all__ = ["check_store", "describe_store", "open_store"]


async def open_store(config: Config) -> Store | PgStore | None:
    """Open (and migrate) the daemon's store; None when the config keeps none. A SQLite store
    is held for the daemon alone (`Store.open`'s `exclusive`).

    Raises StoreError (with no password in it) if it cannot be opened."""
    if config.store_url is not None:
        from agentd.store_pg import PgStore

        return await PgStore.open(config.store_url)
    if config.store_path:
        return await Store.open(config.store_path, exclusive=True)
    return None


def describe_store(config: Config) -> str:
    """One line naming the store, fit to print (never a password)."""
    if config.store_url is not None:
        return f"postgresql {config.store_url.shown}"
    if config.store_path:
        return f"sqlite {os.path.abspath(config.store_path)}"
    return 'off (store.path = ""): no restart recovery, no call history'


async def check_store(config: Config) -> tuple[bool, str]:
    """(usable, a line for check-config). Reads the schema version; never creates or migrates."""
    what = describe_store(config)
    if config.store_url is not None:
        from agentd.store_pg import LATEST_PG_VERSION, pg_schema_version

        try:
            version = await pg_schema_version(config.store_url)
        except StoreError as exc:
            return False, str(exc)
        return _version_line(what, version, LATEST_PG_VERSION)
    if not config.store_path:
        return True, what
    return _check_sqlite(what, config.store_path)


def _check_sqlite(what: str, store_path: str) -> tuple[bool, str]:
    """The SQLite file's schema version, read-only (a few local syscalls: fine on the loop)."""
    path = Path(os.path.abspath(store_path))
    if not path.exists():
        if not path.parent.is_dir():
            if str(path) == SERVICE_STORE:
                # checked after `make install`, before the first start: systemd makes it then
                return True, f"{what}, created at the first start (the unit's StateDirectory=)"
            return False, f"{what}: the directory {path.parent} does not exist"
        return True, f"{what}, created at the first start"
    try:
        conn = sqlite3.connect(f"file:{quote(str(path))}?mode=ro", uri=True)
        try:
            version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error as exc:
        return False, f"{what}: not a usable agentd store: {exc}"
    return _version_line(what, version, LATEST_VERSION)


def _version_line(what: str, version: int, latest: int) -> tuple[bool, str]:
    if version > latest:
        return False, f"{what}: schema version {version}, newer than this agentd's {latest}"
    if version == 0:
        return True, f"{what}, empty: agentd creates its tables at the first start"
    if version < latest:
        return True, f"{what}, schema version {version}, migrated to {latest} at the next start"
    return True, f"{what}, schema version {version}"
