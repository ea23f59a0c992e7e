"""Shared fixtures: a real simulator on loopback and real daemons talking to it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from agentd.backends import Backend
from agentd.config import load
from agentd.daemon import Daemon
from agentd.sim import SimSettings, Simulator
from tests.support import OUR_NUMBER, PLAYBACK, StartAgent


def merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


@pytest.fixture
def sim_settings() -> SimSettings:
    return SimSettings(playback_chars_per_s=PLAYBACK, speech_words_per_s=40.0)


@pytest.fixture
async def sim(sim_settings: SimSettings) -> AsyncIterator[Simulator]:
    async with Simulator(sim_settings) as s:
        yield s


@pytest.fixture
async def agent(sim: Simulator) -> AsyncIterator[StartAgent]:
    """Start daemons against `sim`; at the end stop them and check nothing leaked."""
    running: list[tuple[Daemon, asyncio.Task[None]]] = []

    async def start(impl: Backend | None = None, **sections: dict[str, Any]) -> Daemon:
        base = {
            "voipbin": {"api_url": sim.api_url, "accesskey": sim.accesskey},
            "agent": {"numbers": [OUR_NUMBER], "chars_per_s": PLAYBACK},
            "daemon": {"drain_s": 5.0},
        }
        config = load(None, env={}, overrides=merge(base, sections))
        daemon = Daemon(config, backend=impl)
        task = asyncio.create_task(daemon.run())
        running.append((daemon, task))
        await asyncio.wait_for(daemon.stream.ready.wait(), 5)
        return daemon

    yield start
    for daemon, task in running:
        daemon.stop()
        await asyncio.wait_for(task, 10)
    assert sim.leaks() == []
