"""SIGHUP: what a reload applies, and the warning for what it does not."""

from __future__ import annotations

import asyncio
from pathlib import Path

from structlog.testing import capture_logs

from agentd.config import load
from agentd.daemon import Daemon
from agentd.sim import Simulator
from tests.support import OUR_NUMBER

CONFIG = """
[voipbin]
api_url = "{api}"
accesskey_file = "{keyfile}"
timeout_s = {timeout}
[agent]
numbers = ["{number}"]
greeting = "{greeting}"
[log]
level = "{level}"
[store]
path = "{store}"
[status]
socket = ""
"""


def write(path: Path, sim: Simulator, key: str, *, greeting: str, timeout: int, level: str) -> None:
    keyfile = path.parent / "accesskey"
    keyfile.write_text(key)
    path.write_text(
        CONFIG.format(
            api=sim.api_url,
            keyfile=keyfile,
            timeout=timeout,
            number=OUR_NUMBER,
            greeting=greeting,
            level=level,
            store=path.parent / "agentd.db",
        )
    )


async def test_a_reload_names_the_changes_it_leaves_for_a_restart(
    sim: Simulator, tmp_path: Path
) -> None:
    config = tmp_path / "agentd.toml"
    write(config, sim, sim.accesskey, greeting="Hello.", timeout=10, level="info")
    daemon = Daemon(load(config, env={}))
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.stream.ready.wait(), 5)
        # a new greeting (applied), and three changes that need a restart: the key rotated
        # in its file, the REST timeout and the log level; the reload used to log only
        # reload.done
        rotated = "vb_rotated_key_0123456789"
        write(config, sim, rotated, greeting="Hi again.", timeout=5, level="debug")
        with capture_logs() as logged:
            daemon.reload()
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)
    events = [line["event"] for line in logged]
    assert events[-2:] == ["reload.restart_needed", "reload.done"]
    warning = logged[-2]
    assert warning["log_level"] == "warning"
    assert warning["keys"] == ["voipbin.accesskey", "voipbin.timeout_s", "log.level"]
    assert rotated not in repr(logged) and sim.accesskey not in repr(logged)
    assert daemon.config.call.greeting == "Hi again."  # what a reload does apply


async def test_a_reload_that_changes_only_what_it_applies_warns_of_nothing(
    sim: Simulator, tmp_path: Path
) -> None:
    config = tmp_path / "agentd.toml"
    write(config, sim, sim.accesskey, greeting="Hello.", timeout=10, level="info")
    daemon = Daemon(load(config, env={}))
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.stream.ready.wait(), 5)
        write(config, sim, sim.accesskey, greeting="Hi again.", timeout=10, level="info")
        with capture_logs() as logged:
            daemon.reload()
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)
    assert [line["event"] for line in logged] == ["reload.done"]
