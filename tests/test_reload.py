"""SIGHUP: what a reload applies, and the warning for what it does not."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from structlog.testing import capture_logs

from agentd.config import load
from agentd.daemon import Daemon
from agentd.sim import Caller, Simulator, Utterance
from tests.stubs import OpenAIStub, Script
from tests.support import CALLER, OUR_NUMBER

CONFIG = """
[voipbin]
api_url = "{api}"
accesskey_file = "{keyfile}"
timeout_s = {timeout}
[agent]
numbers = ["{number}"]
greeting = "{greeting}"
{agent}
[log]
level = "{level}"
[store]
path = "{store}"
[status]
socket = ""
"""


def write(
    path: Path,
    sim: Simulator,
    key: str,
    *,
    greeting: str = "Hello.",
    timeout: int = 10,
    level: str = "info",
    backend: str = "",
    agent: str = "",
    daemon: str = "",
) -> None:
    """The test's config at `path` (`backend`: a `[backend]` table's body, if any; `agent`:
    more `[agent]` keys)."""
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
            agent=agent,
            store=path.parent / "agentd.db",
        )
        + (f"[backend]\n{backend}\n" if backend else "")
        + (f"[daemon]\n{daemon}\n" if daemon else "")
    )


@asynccontextmanager
async def running(config: Path) -> AsyncIterator[Daemon]:
    """A daemon started on `config`, subscribed; stopped at the end."""
    daemon = Daemon(load(config, env={}))
    task = asyncio.create_task(daemon.run())
    try:
        await asyncio.wait_for(daemon.stream.ready.wait(), 5)
        yield daemon
    finally:
        daemon.stop()
        await asyncio.wait_for(task, 10)


async def test_a_reload_names_the_changes_it_leaves_for_a_restart(
    sim: Simulator, tmp_path: Path
) -> None:
    config = tmp_path / "agentd.toml"
    write(config, sim, sim.accesskey, greeting="Hello.", timeout=10, level="info")
    async with running(config) as daemon:
        # a new greeting (applied), and three changes that need a restart: the key rotated
        # in its file, the REST timeout and the log level; the reload used to log only
        # reload.done
        rotated = "vb_rotated_key_0123456789"
        write(config, sim, rotated, greeting="Hi again.", timeout=5, level="debug")
        with capture_logs() as logged:
            daemon.reload()
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
    async with running(config) as daemon:
        write(config, sim, sim.accesskey, greeting="Hi again.", timeout=10, level="info")
        with capture_logs() as logged:
            daemon.reload()
    assert [line["event"] for line in logged] == ["reload.done"]


async def test_a_second_reload_still_names_the_changes_left_for_a_restart(
    sim: Simulator, tmp_path: Path
) -> None:
    # the first reload warned of log.level; the second, for a new greeting only, compared
    # with the first one's config and said nothing, though the log level was still info
    config = tmp_path / "agentd.toml"
    write(config, sim, sim.accesskey, greeting="Hello.", level="info")
    async with running(config) as daemon:
        write(config, sim, sim.accesskey, greeting="Hello.", level="debug")
        daemon.reload()
        write(config, sim, sim.accesskey, greeting="Hi again.", level="debug")
        with capture_logs() as logged:
            daemon.reload()
        assert [line["event"] for line in logged] == ["reload.restart_needed", "reload.done"]
        assert logged[0]["keys"] == ["log.level"]
        # put back as it runs: nothing is left for a restart
        write(config, sim, sim.accesskey, greeting="Hi again.", level="info")
        with capture_logs() as logged:
            daemon.reload()
        assert [line["event"] for line in logged] == ["reload.done"]


async def test_a_reload_warns_of_a_doubtful_setting_it_applies_as_a_start_does(
    sim: Simulator, tmp_path: Path
) -> None:
    # a voice of another provider: every /say is refused and the caller hears nothing. A
    # start logs config.warning (README, troubleshooting); a reload applied it without a word
    config = tmp_path / "agentd.toml"
    write(config, sim, sim.accesskey)
    async with running(config) as daemon:
        write(
            config,
            sim,
            sim.accesskey,
            agent='tts_provider = "aws"\nvoice_id = "21m00Tcm4TlvDq8ikWAM"',
        )
        with capture_logs() as logged:
            daemon.reload()
    assert [line["event"] for line in logged] == ["config.warning", "reload.done"]
    assert logged[0]["log_level"] == "warning"
    assert "looks like a voice id of elevenlabs" in logged[0]["warning"]
    assert daemon.config.call.voice_id == "21m00Tcm4TlvDq8ikWAM"  # applied all the same


def backend_config(path: Path, sim: Simulator, base_url: str) -> None:
    write(path, sim, sim.accesskey, backend=f'kind = "openai"\nbase_url = "{base_url}"')


async def test_a_reload_gives_new_calls_the_new_backend_and_live_calls_keep_theirs(
    sim: Simulator, tmp_path: Path
) -> None:
    reply = "First sentence here. Second sentence now. Third one ends it."
    config = tmp_path / "agentd.toml"
    async with OpenAIStub(Script(reply, first_token_s=0.6)) as old, OpenAIStub() as new:
        backend_config(config, sim, old.base_url)
        async with running(config) as daemon:
            utterances = [Utterance("what is my balance?"), Utterance("and my savings?")]
            live = sim.inbound_call(destination=OUR_NUMBER, caller=Caller(utterances))
            # the reload comes while the old backend is working on the live call's reply
            await sim.wait_for(lambda: len(old.requests) == 1, 15)
            backend_config(config, sim, new.base_url)
            daemon.reload()
            await sim.wait_call_status(live, "hangup", timeout=30)
            fresh = sim.inbound_call(
                destination=OUR_NUMBER, caller=Caller([Utterance("hello there?")])
            )
            await sim.wait_call_status(fresh, "hangup", timeout=30)
            await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    said = " ".join(li.planned for li in sim.get_call(live).conversation if li.who == "agent")
    assert reply in said  # the reply under way at the reload was said whole
    assert len(old.requests) == 2  # and the live call's next turn asked the old backend
    assert len(new.requests) == 1  # the call that began after the reload asked the new one
    fresh_said = [li.planned for li in sim.get_call(fresh).conversation if li.who == "agent"]
    assert "Hello from the stub." in fresh_said


async def test_a_reload_to_another_tts_provider_leaves_a_live_calls_says_as_they_were(
    sim: Simulator, tmp_path: Path
) -> None:
    # aws takes at most 3,000 characters a /say, the others 5,000 bytes: the sentences queued
    # behind a /say go out merged up to that. A live call keeps its provider (its session was
    # made with it): its replies are not cut for another one, mid-reply least of all
    # 14 sentences of 282 characters (3,961; a reply is read up to 4,000): however many go
    # out in the first /say (the stream's chunks decide), up to three, the rest queues
    # behind it past 3,000 characters
    story = " ".join([("story " * 47).strip() + "."] * 14)
    config = tmp_path / "agentd.toml"
    async with OpenAIStub(Script(story, first_token_s=0.6)) as stub:
        backend_config(config, sim, stub.base_url)
        async with running(config) as daemon:
            live = sim.inbound_call(
                CALLER, OUR_NUMBER, Caller([Utterance("tell me a story?")], hangup_after_s=None)
            )
            # the reload comes while the live call's reply is on its way
            await sim.wait_for(lambda: len(stub.requests) == 1, 15)
            text = config.read_text().replace("[agent]\n", '[agent]\ntts_provider = "aws"\n')
            config.write_text(text)
            daemon.reload()
            assert daemon.config.call.tts_provider == "aws"
            sim.faults.delay("POST", r"/say$", 1.0)  # the rest of the reply queues behind it

            def says() -> list[str]:
                sent = [r.body["text"] for r in sim.requests_matching("POST", r"/say$")]  # type: ignore[index]
                return [t for t in sent if "story" in t]

            await sim.wait_for(lambda: " ".join(says()).split() == story.split(), 15)
            await sim.hangup(live)
            await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    assert max(len(t) for t in says()) > 3000  # merged as the call's own provider takes them


async def test_a_live_call_left_alone_stays_so_after_a_reload_adds_its_number_and_is_counted(
    sim: Simulator, tmp_path: Path
) -> None:
    # not ours when it came: whatever answered it serves it, and the agent does not start
    # talking over it mid-call (the next reconcile read it as ours). The reload says so
    other = "+15559990000"
    config = tmp_path / "agentd.toml"
    write(config, sim, sim.accesskey)
    async with running(config) as daemon:
        left = sim.inbound_call(CALLER, other, Caller([], hangup_after_s=None))
        await sim.wait_for(lambda: daemon.dispatcher.counters["ignored"] >= 1, 10)
        both = f'numbers = ["{OUR_NUMBER}", "{other}"]'
        config.write_text(config.read_text().replace(f'numbers = ["{OUR_NUMBER}"]', both))
        with capture_logs() as logged:
            daemon.reload()
        assert [line["event"] for line in logged] == ["reload.calls_left_alone", "reload.done"]
        assert logged[0]["calls"] == 1
        # a reconnect's reconcile reads the live call again, then a new call to the number
        reads = len(sim.requests_matching("GET", r"/calls$"))
        sim.faults.drop_websockets()
        await sim.wait_for(lambda: len(sim.requests_matching("GET", r"/calls$")) > reads, 10)
        fresh = sim.inbound_call(CALLER, other, Caller([], hangup_after_s=None))
        await sim.wait_for(lambda: bool(sim.get_call(fresh).conversation), 10)  # greeted
        assert set(daemon.dispatcher.calls) == {fresh}
        await sim.hangup(fresh)
        await sim.hangup(left)
        await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    assert sim.get_call(left).conversation == []
    assert [s for s in sim.speakings.values() if s.reference_id == left] == []


async def test_a_reload_during_the_drain_or_after_the_stop_is_skipped_and_leaks_nothing(
    sim: Simulator, tmp_path: Path
) -> None:
    # a SIGHUP may come while `systemctl stop` drains, or after it: the handler stays installed.
    # A config applied then would take no call, and its backend, made after the executor
    # closed the old one, would never be closed
    config = tmp_path / "agentd.toml"
    drain = 'stop_sessions_on_shutdown = true\nshutdown_goodbye = "Bye now."\ndrain_s = 10'
    write(config, sim, sim.accesskey, daemon=drain)
    daemon = Daemon(load(config, env={}))
    task = asyncio.create_task(daemon.run())
    await asyncio.wait_for(daemon.stream.ready.wait(), 5)
    call = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
    await sim.wait_for(lambda: bool(sim.get_call(call).conversation), 10)
    backend = daemon.backend
    daemon.stop()
    await sim.wait_for(lambda: "Bye now." in [li.text for li in sim.get_call(call).conversation])
    assert not task.done()  # the drain is under way: the goodbye is being said
    write(config, sim, sim.accesskey, greeting="Changed.", daemon=drain, backend='kind = "echo"')
    with capture_logs() as during:
        daemon.reload()
    daemon.stop()  # a second SIGTERM in the drain
    await asyncio.wait_for(task, 15)
    with capture_logs() as after:
        daemon.reload()
    assert sim.get_call(call).status == "hangup"
    assert sim.leaks() == []
    assert [(line["event"], line["reason"]) for line in during + after] == [
        ("reload.skipped", "stopping")
    ] * 2
    assert daemon.config.call.greeting == "Hello." and daemon.backend is backend


async def test_a_reload_of_a_broken_config_keeps_the_running_one_and_says_why_in_one_line(
    sim: Simulator, tmp_path: Path
) -> None:
    config = tmp_path / "agentd.toml"
    write(config, sim, sim.accesskey, greeting="Hello.")
    good = config.read_text()
    edited = good.replace('greeting = "Hello."', 'greeting = "Changed."')
    # each mistake, and what its one line must name
    broken = {
        edited.replace('"Changed."', '"Changed.'): "not valid TOML",
        edited + '[backend]\nkind = "nope"\n': "backend.kind",
        edited + '[backend]\nkind = "python"\ncallable = "no_such_module_here:reply"\n': (
            "no_such_module_here"
        ),
        "": "no such config file",  # deleted, or moved aside while being edited
    }
    async with running(config) as daemon:
        running_config, backend = daemon.config, daemon.backend
        for text, why in broken.items():
            if text:
                config.write_text(text)
            else:
                config.unlink()
            with capture_logs() as logged:
                daemon.reload()
            assert [line["event"] for line in logged] == ["reload.failed"], logged
            assert logged[0]["log_level"] == "error"
            assert why in logged[0]["error"] and "\n" not in logged[0]["error"]
            assert daemon.config is running_config and daemon.backend is backend
            config.write_text(good)


async def test_a_reload_while_the_stream_reconnects_applies_and_the_live_call_goes_on(
    sim: Simulator, tmp_path: Path
) -> None:
    config = tmp_path / "agentd.toml"
    write(config, sim, sim.accesskey, greeting="Hello.")
    async with running(config) as daemon:
        live = sim.inbound_call(
            CALLER, OUR_NUMBER, Caller([Utterance("after the outage")], hangup_after_s=None)
        )
        await sim.wait_for(lambda: bool(sim.get_call(live).conversation), 10)
        sim.faults.refuse_ws(503, count=1000)
        sim.faults.drop_websockets()
        await sim.wait_for(lambda: daemon.stream.stats.reconnects >= 2, 15)
        assert not daemon.stream.ready.is_set()  # down, retrying
        write(config, sim, sim.accesskey, greeting="Hi again.")
        with capture_logs() as logged:
            daemon.reload()
        assert [line["event"] for line in logged] == ["reload.done"]
        sim.faults.accept_ws()
        await asyncio.wait_for(daemon.stream.ready.wait(), 15)
        await sim.wait_for(
            lambda: (
                "You said: after the outage." in [li.text for li in sim.get_call(live).conversation]
            ),
            15,
        )
        fresh = sim.inbound_call(CALLER, OUR_NUMBER, Caller([], hangup_after_s=None))
        await sim.wait_for(lambda: bool(sim.get_call(fresh).conversation), 10)
        await sim.hangup(fresh)
        await sim.hangup(live)
        await asyncio.wait_for(daemon.dispatcher.wait_idle(), 10)
    assert sim.get_call(live).conversation[0].planned == "Hello."  # the live call kept its own
    assert sim.get_call(fresh).conversation[0].planned == "Hi again."
    assert sim.leaks() == []
