"""The short soak (the long one is `make soak`): faults, SIGKILL restarts, and still no leaks."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests import soak

# the short soak: faults and SIGKILL restarts, about 20 s
pytestmark = pytest.mark.slow


async def test_short_soak(tmp_path: Path) -> None:
    report = await soak.run(calls=40, concurrency=20, kill_every=3.0, seed=3, workdir=tmp_path)
    assert report["leaked_sessions"] == 0
    assert report["double_replies"] == 0
    assert report["served"] == report["calls"], report["not_served_examples"]
    assert report["daemon_restarts_survived"] == report["daemon_restarts"] >= 1
    assert (tmp_path / "agentd.db").exists()  # the restarted agentd resumed calls from this store
