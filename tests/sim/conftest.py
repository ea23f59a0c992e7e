"""Fixtures for simulator tests: a started fast simulator and an authenticated HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from simhelpers import fast_settings

from agentd.sim import Simulator


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    """A started simulator with fast playback/speech and no rate limit."""
    async with Simulator(fast_settings()) as s:
        yield s


@pytest.fixture
async def http(sim: Simulator) -> AsyncIterator[aiohttp.ClientSession]:
    """A client that sends the access key as a cookie header (never in the URL)."""
    async with aiohttp.ClientSession(
        headers={"Cookie": f"accesskey={sim.accesskey}"},
        timeout=aiohttp.ClientTimeout(total=5),
    ) as session:
        yield session
