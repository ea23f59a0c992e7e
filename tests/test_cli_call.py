"""`agentd call`: places an outbound call the running daemon serves; `--wait` follows it."""

from __future__ import annotations

from pathlib import Path

import pytest

from agentd.sim import Caller, Outcome, Simulator, Utterance
from tests.support import OUR_NUMBER, StartAgent, run_cli

# `agentd call` subprocesses following whole calls
pytestmark = pytest.mark.slow

CONFIG = """
[voipbin]
api_url = "{api}"
accesskey = "{key}"
[agent]
numbers = ["{number}"]
"""


async def test_call_wait_prints_the_conversation(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    await agent()
    config = tmp_path / "agentd.toml"
    config.write_text(CONFIG.format(api=sim.api_url, key=sim.accesskey, number=OUR_NUMBER))
    # a caller slow enough to hang up after a poll or two of `--wait`
    sim.on_outbound(Outcome("answer"), Caller([Utterance("hello agent")], hangup_after_s=1.5))
    code, out, err = await run_cli(
        "call", "--to", "+15559876543", "--config", str(config), "--wait"
    )
    assert code == 0, err
    lines = out.splitlines()
    call_id = lines[0]
    assert sim.get_call(call_id).direction == "outgoing"
    post = sim.requests_matching("POST", r"/calls$")[0]
    assert post.body["source"] == {"type": "tel", "target": OUR_NUMBER}  # from agent.numbers
    assert "[hangup] (normal)" in lines
    assert "caller: hello agent" in lines
    assert sim.accesskey not in out + err


async def test_call_that_is_not_answered_exits_1(
    sim: Simulator, agent: StartAgent, tmp_path: Path
) -> None:
    await agent()
    config = tmp_path / "agentd.toml"
    config.write_text(CONFIG.format(api=sim.api_url, key=sim.accesskey, number=OUR_NUMBER))
    sim.on_outbound(Outcome("noanswer"))
    code, out, _ = await run_cli(
        "call", "--to", "+15559876543", "--from", "+15550002222", "--config", str(config), "--wait"
    )
    assert code == 1
    assert "[hangup] (noanswer)" in out.splitlines()
