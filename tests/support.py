"""Constants and types the tests share."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from agentd.daemon import Daemon

OUR_NUMBER = "+15551234567"
CALLER = "+15550001111"
# fast audio and speech keep the tests short; the daemon is told the same playback speed
PLAYBACK = 400.0

StartAgent = Callable[..., Awaitable[Daemon]]
