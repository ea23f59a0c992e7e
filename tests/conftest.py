"""Shared fixtures: a real simulator on loopback and real daemons talking to it."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator
from typing import Any

import aioresponses.core
import pytest
from aiohttp import ClientResponse

from agentd import logs
from agentd.backends import Backend
from agentd.config import load
from agentd.daemon import Daemon
from agentd.sim import SimSettings, Simulator
from tests.stubs import HttpStub, OpenAIStub
from tests.support import (
    END_OF_TURN,
    FINAL_HOLD,
    FINAL_WAIT,
    OUR_NUMBER,
    PLAYBACK,
    SAY_LATENCY,
    SPECULATE,
    StartAgent,
)


class _NoopStreamWriter:
    """Enough of aiohttp's AbstractStreamWriter for a response that was never sent."""

    output_size = 0


def _needs_aioresponses_shim() -> bool:
    # aiohttp >= 3.14 requires `stream_writer`; aioresponses <= 0.7.9 does not pass it
    # (pnuckowski/aioresponses#289). Inert on older aiohttp and once aioresponses ships the fix.
    required = "stream_writer" in inspect.signature(ClientResponse.__init__).parameters
    passed = "stream_writer" in inspect.getsource(aioresponses.core.RequestMatch._build_response)
    return required and not passed


class _ShimResponse(ClientResponse):
    shim_calls = 0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        if "stream_writer" not in kwargs:
            type(self).shim_calls += 1
            kwargs["stream_writer"] = _NoopStreamWriter()
        super().__init__(*args, **kwargs)


AIORESPONSES_SHIM = _needs_aioresponses_shim()
if AIORESPONSES_SHIM:
    aioresponses.core.ClientResponse = _ShimResponse  # type: ignore[misc]


def merge(base: dict[str, dict[str, Any]], extra: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {k: dict(v) for k, v in base.items()}
    for section, values in extra.items():
        out.setdefault(section, {}).update(values)
    return out


@pytest.fixture(autouse=True)
def _loggers_follow_the_config() -> None:
    """Module loggers are bound once per configuration (agentd/logs.py): a test that reset
    structlog's configuration must not leave the next one logging into its stream."""
    logs.rebind()


@pytest.fixture
def sim_settings() -> SimSettings:
    return SimSettings(
        playback_chars_per_s=PLAYBACK,
        speech_words_per_s=40.0,
        stt_final_delay_s=0.05,
        stt_final_delay_gcp_s=0.04,
        stt_split_gap_s=0.03,
        speaking_create_s=0.02,
        say_latency_s=SAY_LATENCY,
        stop_latency_s=0.02,
        playback_cjk_chars_per_s=PLAYBACK * 0.4,
        pod_rpc_timeout_s=0.1,
        pod_breaker_open_s=1.0,
    )


@pytest.fixture
async def sim(sim_settings: SimSettings) -> AsyncIterator[Simulator]:
    async with Simulator(sim_settings) as s:
        yield s


@pytest.fixture
async def agent(sim: Simulator, tmp_path: Any) -> AsyncIterator[StartAgent]:
    """Start daemons against `sim`; at the end stop them and check nothing leaked."""
    running: list[tuple[Daemon, asyncio.Task[None]]] = []

    async def start(impl: Backend | None = None, **sections: dict[str, Any]) -> Daemon:
        base = {
            "voipbin": {"api_url": sim.api_url, "accesskey": sim.accesskey},
            "agent": {
                "numbers": [OUR_NUMBER],
                "chars_per_s": PLAYBACK,
                "say_latency_s": SAY_LATENCY,
                "final_hold_s": FINAL_HOLD,
                "final_wait_s": FINAL_WAIT,
                "end_of_turn_s": END_OF_TURN,
                "end_of_turn_stop_s": END_OF_TURN * 1.5,
                "speculate_s": SPECULATE,
                # a filler is one more /say in tests that count them: fillers are tested
                # on their own (test_listen, test_turn_taking)
                "filler_after_s": 0,
            },
            "daemon": {"drain_s": 5.0, "stop_sessions_on_shutdown": True},
            "store": {"path": str(tmp_path / f"agentd-{len(running)}.db")},
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


@pytest.fixture
async def llm() -> AsyncIterator[OpenAIStub]:
    """A local OpenAI-compatible server (real HTTP, real SSE)."""
    async with OpenAIStub() as stub:
        yield stub


@pytest.fixture
async def service() -> AsyncIterator[HttpStub]:
    """A local stand-in for a user's own HTTP backend."""
    async with HttpStub() as stub:
        yield stub
